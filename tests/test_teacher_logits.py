"""Offline distillation (issue: the seeds' offline teacher logits): ``pare teacher-logits`` stores
the teacher's top k over the distillation rows, ``pare distill teacher_logits=`` trains on them
with no teacher loaded. On the tiny teacher of tests/test_distill.py (conftest's distill_env)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_distill import RUN, held_out_loss, metrics

# the rows of a 6-step run of the tiny recipe's shapes: 6 x 16 rows of 64 tokens
ROWS = dict(global_batch_size=16, micro_batch_size=8, seq_length=64)


def store(env, out, **kw):
    from pare_nemo.teacher_logits import teacher_logits

    args = dict(ROWS, train_steps=6, teacher_path=env["teacher"], data=env["data"],
                output=str(out), shard_rows=32)
    return teacher_logits(**(args | kw))


def offline(env, save, logits, **kw):
    from pare_nemo.distill import distill

    args = dict(RUN, train_steps=6, save_interval=6, student_path=env["width"], data=env["data"],
                save_path=str(save), teacher_logits=str(logits))
    return distill(**(args | kw))


def online(env, save, **kw):
    from pare_nemo.distill import distill

    args = dict(RUN, train_steps=6, save_interval=6, student_path=env["width"], data=env["data"],
                save_path=str(save), teacher_path=env["teacher"])
    return distill(**(args | kw))


def test_full_k_offline_follows_online_kd(distill_env, tmp_path):
    """k = the whole vocabulary, fp32 log-probs, fp32 models: offline KD gives online KD's loss
    curve (the same divergence from stored values; measured |rel. diff| <= 2e-7)."""
    env = distill_env
    vocab = json.loads((Path(env["teacher"]) / "model_config.json").read_text())["hf_config"][
        "vocab_size"]
    out = store(env, tmp_path / "full", top_k=vocab, logprob_dtype="float32", dtype="float32")
    index = json.loads((Path(out) / "index.json").read_text())
    assert index["parts"]["train"]["rows"] == 96 and index["bytes_per_token"] == 4 + vocab * 8 + 4
    a = metrics(online(env, tmp_path / "online", dtype="float32"))
    b = metrics(offline(env, tmp_path / "offline", out, dtype="float32"))
    for key in ("kd", "loss", "grad_norm"):
        ra, rb = torch.tensor([r[key] for r in a]), torch.tensor([r[key] for r in b])
        assert torch.allclose(rb, ra, rtol=1e-5, atol=1e-7), (key, ra, rb)


def test_small_k_offline_recovers_the_pruned_student(distill_env, tmp_path):
    """k = 8 in fp16 (4 + 8 x 6 + 4 = 56 bytes per token), 60 steps: the student trained on the
    stored top k alone, no teacher loaded, recovers most of what pruning cost on held-out text.
    Measured here (2-core CPU): pruned 4.1433; offline top-8 3.8599 at the default data order and
    3.8539 / 3.8605 / 3.8571 at seeds 1 / 2 / 3 (gaps 0.283-0.289, spread 0.007); top-32 gave
    3.731-3.736 and online full-vocabulary KD 3.671 (tests/test_distill.py). Margin 0.15."""
    env = distill_env
    out = store(env, tmp_path / "top8", top_k=8, train_steps=60)
    save = offline(env, tmp_path / "kd8", out, train_steps=60, save_interval=60)
    pruned, kd = held_out_loss(env["width"], env["held"]), held_out_loss(save, env["held"])
    print("held-out loss pruned / offline top-8:", round(pruned, 4), round(kd, 4))
    assert kd < pruned - 0.15
    args = json.loads((Path(save) / "distill_args.json").read_text())
    assert args["models"]["teacher_path"] is None and args["models"]["teacher_logits"] == out


def test_kill_then_rerun_gives_byte_identical_shards(distill_env, tmp_path):
    """A teacher-logits run SIGKILLed after its first shards, run again: it finishes only what
    was missing (finished shards untouched) and every shard is byte for byte the uninterrupted
    run's."""
    env = distill_env
    args = [f"{k}={v}" for k, v in dict(ROWS, train_steps=12, teacher_path=env["teacher"],
                                         data=env["data"], top_k=16, shard_rows=16).items()]

    def cmd(out):
        return [sys.executable, "-m", "pare_nemo.cli", "teacher-logits", f"output={out}", *args]

    penv = dict(os.environ, OMP_NUM_THREADS="1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the uninterrupted run here, with the subprocesses' arithmetic
    try:
        store(env, tmp_path / "full", train_steps=12, top_k=16, shard_rows=16)
    finally:
        torch.set_num_threads(threads)
    out, partial = tmp_path / "killed", tmp_path / "killed.partial"
    p = subprocess.Popen(cmd(out), env=penv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while len(list(partial.glob("train-*.safetensors"))) < 3 and p.poll() is None:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists()
    done = {f.name: f.stat().st_mtime_ns for f in partial.glob("train-*.safetensors")}
    assert 3 <= len(done) < 12, done
    r = subprocess.run(cmd(out), env=penv, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {f: (out / f).stat().st_mtime_ns for f in done} == done  # not rewritten
    full = sorted(f.name for f in (tmp_path / "full").glob("*.safetensors"))
    assert full == sorted(f.name for f in out.glob("*.safetensors")) and len(full) == 12
    for name in full:
        assert (out / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name


def test_parallel_layouts_write_dp1s_shards(distill_env, tmp_path):
    """On 2 processes: DP=2 (each replica writes its own shards, round-robin), TP=2 (vocab-parallel
    top k) and PP=2 (the last stage writes) store what one process stores: the same top-k ids,
    log-probs to fp32 rounding. (One spawn runs the three layouts in turn.)"""
    from safetensors.torch import load_file

    from tests.dist_workers import spawn

    env = distill_env
    kw = dict(ROWS, train_steps=4, teacher_path=env["teacher"], data=env["data"], top_k=8,
              shard_rows=16, logprob_dtype="float32", dtype="float32")
    ref = store(env, tmp_path / "ref", **kw)
    layouts = {"dp2": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
    spawn(_store_worker, 2, [dict(kw, output=str(tmp_path / name), tp=tp, pp=pp)
                             for name, (tp, pp) in layouts.items()], tmp=tmp_path)
    names = sorted(f.name for f in Path(ref).glob("*.safetensors"))
    for layout in layouts:
        assert names == sorted(f.name for f in (tmp_path / layout).glob("*.safetensors"))
        for name in names:
            a, b = load_file(Path(ref) / name), load_file(tmp_path / layout / name)
            assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["tokens"], b["tokens"])
            assert torch.allclose(a["logprobs"], b["logprobs"], atol=1e-5), layout
            assert torch.allclose(a["log_rest"], b["log_rest"], atol=1e-5), layout


def test_offline_run_resumes_on_the_same_curve(distill_env, tmp_path):
    """An offline run cut back to its step-3 checkpoint and run again continues the same curve
    (resume reads the stored rows where it stopped)."""
    import shutil

    env = distill_env
    out = store(env, tmp_path / "k8", top_k=8)
    save = offline(env, tmp_path / "run", out, save_interval=3, keep_last=3)
    first = metrics(save)
    (Path(save) / "latest_checkpointed_iteration.txt").write_text("3")
    shutil.rmtree(Path(save) / "iter_0000006")
    offline(env, tmp_path / "run", out, save_interval=3, keep_last=3)
    assert [(r["step"], r["loss"]) for r in metrics(save)] == [(r["step"], r["loss"])
                                                               for r in first]


def _store_worker(runs: list[dict]):
    """Each run in turn in one process group (each stage sets up its own TP/PP groups in it)."""
    from pare_nemo.parallel import init_distributed
    from pare_nemo.teacher_logits import teacher_logits

    init_distributed(1, 1)
    for kwargs in runs:
        teacher_logits(**kwargs)


def test_refusals(distill_env, tmp_path):
    """Stored logits for other rows, intermediate losses without the teacher, another k or T, an
    unfinished output: refused before any work, clearly."""
    env = distill_env
    out = store(env, tmp_path / "k8", top_k=8, temperature=2.0)
    cases = [
        (dict(temperature=2.0, seq_length=32), r"\(seq_length differ"),
        (dict(temperature=2.0, train_steps=7), "train_rows differ"),
        (dict(temperature=2.0, seed=7), "seed differ"),
        (dict(temperature=1.0), "stored log-probs are at temperature 2.0"),
        (dict(temperature=2.0, top_k=4), "stored the top 8"),
        (dict(temperature=2.0, intermediate_loss="cosine"), "need the teacher itself"),
        (dict(temperature=2.0, teacher_path=env["teacher"]), "not both"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            offline(env, tmp_path / "bad", out, **kw)
        assert not (tmp_path / "bad").exists()
    with pytest.raises(FileNotFoundError, match="no finished pare teacher-logits output"):
        offline(env, tmp_path / "bad", tmp_path / "nowhere")
    with pytest.raises(FileExistsError, match="already exists"):
        store(env, tmp_path / "k8", top_k=8, temperature=2.0)
    with pytest.raises(ValueError, match="no teacher"):
        offline(env, tmp_path / "bad", out, teacher_logits=None, temperature=2.0)


def test_teacher_correction_lowers_the_teachers_loss(distill_env, tmp_path):
    """Teacher correction (arXiv 2408.11796): the teacher fine-tuned briefly with CE alone on the
    distillation data (alpha=1, student = the teacher, no teacher beside it: the same loop).
    Measured here (40 steps x 1024 tokens): held-out loss 3.6358 -> 3.5707 on the 20 pydoc
    documents no stage read, train CE 3.282 -> 3.156 (first / last step); margin 0.02."""
    from pare_nemo.distill import distill

    env = distill_env
    save = distill(**dict(RUN, train_steps=40, save_interval=40, student_path=env["teacher"],
                          data=env["data"], save_path=str(tmp_path / "corrected"), alpha=1.0))
    rows = metrics(save)
    assert "kd" not in rows[0] and rows[-1]["ce"] < rows[0]["ce"]
    before, after = held_out_loss(env["teacher"], env["held"]), held_out_loss(save, env["held"])
    print(f"teacher correction: held-out loss {before:.4f} -> {after:.4f}, train CE "
          f"{rows[0]['ce']:.3f} -> {rows[-1]['ce']:.3f}")
    assert after < before - 0.02
