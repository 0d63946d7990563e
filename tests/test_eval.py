"""``pare eval`` (pare_nemo/eval.py): held-out loss / perplexity of Megatron and HF checkpoints on
the same tokens. A tiny GQA Olmo 3 (conftest ``hf_gqa``) and its Megatron import; data: the
paragraphs of pydoc_data.topics prepared with ``pare prepare-data`` (its validation split), or
pydoc read raw. The TP=2 / PP=2 / DP=2 test spawns 2 gloo processes (most of its time is their
imports)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from pare_nemo.cli import main

N, S = 8, 64  # rows x tokens evaluated


@pytest.fixture(scope="module")
def env(hf_gqa, megatron_gqa, tmp_path_factory):
    from pare_nemo.data import prepare_data
    from pare_nemo.tiny import pydoc_text

    root = tmp_path_factory.mktemp("eval")
    # one document per paragraph (~80 tokens): every row holds document boundaries
    (root / "paragraphs.txt").write_text("\n\n\n".join(pydoc_text().split("\n\n")))
    prepare_data(str(root / "paragraphs.txt"), str(hf_gqa), str(root / "data"))
    return dict(root=root, hf=Path(hf_gqa), mg=Path(megatron_gqa), data=str(root / "data"))


@pytest.fixture(scope="module")
def tp1(env) -> Path:
    """`pare eval` through the CLI at TP=1 on the prefix's validation rows (document-masked): the
    Megatron checkpoint and the HF model it was imported from."""
    out = env["root"] / "tp1"
    main(["eval", "report=false", f"checkpoints=mg:{env['mg']},hf:{env['hf']}",
          f"data={env['data']}",
          f"num_samples={N}", f"seq_length={S}", "micro_batch_size=2", f"output={out}"])
    return out / "eval.json"


def results(path) -> dict:
    return {r["name"]: r for r in json.loads(Path(path).read_text())}


def valid_rows(data: str, eos: int, split: str = "98,2,0", seed: int = 1234):
    """The validation rows distillation reads (megatron GPTDataset), built here independently."""
    from pare_nemo.data import batch_at, training_dataset
    from pare_nemo.parallel import distributed

    with distributed(1, 1):
        _, valid = training_dataset([data], S, 1, 1, seed, eos, split=split, valid_samples=N)
        return batch_at(valid, 0, N)


def test_megatron_equals_transformers_on_held_out_rows(env, tp1, capsys):
    """`pare eval` at TP=1 through the CLI: the Megatron checkpoint's document-masked loss equals
    transformers' on the HF model it came from (each document alone), on the validation rows
    distillation would read; with document_mask=false both equal transformers' own `labels=` loss
    on those rows; parameter counts are transformers'."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = results(tp1)
    plain_json = env["root"] / "plain.json"
    main(["eval", "report=false", f"checkpoints=mg:{env['mg']},hf:{env['hf']}",
          f"data={env['data']}",
          f"num_samples={N}", f"seq_length={S}", "micro_batch_size=2", "document_mask=false",
          f"output={plain_json}"])
    table = capsys.readouterr().out
    assert "held-out loss on 8 x 64 tokens" in table and "megatron" in table
    assert f"results: {plain_json}" in table
    plain = results(plain_json)

    hf = AutoModelForCausalLM.from_pretrained(env["hf"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(env["hf"])
    rows = valid_rows(env["data"], tok.eos_token_id)
    assert r["mg"]["sha256"] == r["hf"]["sha256"] == rows.sha256()
    assert (rows.tokens == tok.eos_token_id).any(), "no document boundary: the mask is not tested"
    with torch.no_grad():
        ref = hf(rows.tokens, labels=rows.tokens).loss.item()
    diffs = {"masked mg-hf": abs(r["mg"]["loss"] - r["hf"]["loss"]),
             "plain mg-transformers": abs(plain["mg"]["loss"] - ref),
             "plain hf-transformers": abs(plain["hf"]["loss"] - ref)}
    print("TP=1 |loss diff|:", diffs, "masked", r["mg"]["loss"], "plain", ref)
    assert max(diffs.values()) <= 1e-4
    # the document mask changes the loss (this random model barely uses its context: 6e-4) far
    # beyond the Megatron / transformers differences
    assert abs(r["mg"]["loss"] - ref) > 100 * max(diffs.values())
    for x in (*r.values(), *plain.values()):
        assert x["tokens"] == N * (S - 1)
        assert x["params"] == hf.num_parameters()
        assert x["non_embedding_params"] == hf.num_parameters(exclude_embeddings=True)
        assert x["ppl"] == pytest.approx(math.exp(x["loss"]), rel=1e-12)
        assert x["split"] == "98,2,0" and x["part"] == "valid"
    assert (r["mg"]["kind"], r["hf"]["kind"]) == ("megatron", "hf")

    # the loss by position, by hand: each document alone through transformers, the token at
    # position p (p >= 1) of a document longer than the window (8) in bucket p // 8
    from pare_nemo.olmo3.model import document_ids

    w = hf.config.sliding_window
    sums = torch.zeros(-(-S // w), 2, dtype=torch.float64)
    for row, ids in zip(rows.tokens, document_ids(rows.tokens, tok.eos_token_id)):
        for doc in row.split(torch.unique_consecutive(ids, return_counts=True)[1].tolist()):
            if len(doc) <= w:
                continue
            with torch.no_grad():
                logits = hf(doc[None]).logits[0, :-1]
            nll = torch.nn.functional.cross_entropy(logits, doc[1:], reduction="none")
            for p, v in enumerate(nll.tolist(), start=1):
                sums[p // w] += torch.tensor([v, 1.0], dtype=torch.float64)
    by_hand = (sums[:, 0] / sums[:, 1]).tolist()
    for x in (r["mg"], r["hf"]):
        b = x["by_position"]
        assert b["bucket"] == w and b["start"] == list(range(0, S, w))
        assert b["tokens"] == sums[:, 1].long().tolist() and min(b["tokens"]) > 0
        assert b["loss"] == pytest.approx(by_hand, abs=1e-4)
    # without the document mask a row is one document
    assert plain["mg"]["by_position"]["tokens"] == [N * (w - 1)] + [N * w] * (S // w - 1)


def test_tp2_pp2_dp2_match_tp1(env, tp1, tmp_path):
    """The same rows at TP=2, PP=2 and DP=2 (2 gloo processes; transformers split over both
    ranks) give TP=1's losses."""
    from tests.dist_workers import spawn
    from tests.eval_workers import eval_worker

    base = dict(data=env["data"], num_samples=N, seq_length=S)
    mg = f"mg:{env['mg']}"
    runs = [dict(base, checkpoints=f"{mg},hf:{env['hf']}", tp=2, output=str(tmp_path / "tp2")),
            dict(base, checkpoints=mg, pp=2, output=str(tmp_path / "pp2")),
            dict(base, checkpoints=mg, output=str(tmp_path / "dp2"))]
    spawn(eval_worker, 2, runs, tmp=tmp_path)
    ref = results(tp1)
    diffs = {}
    for name in ("tp2", "pp2", "dp2"):
        r = results(tmp_path / name / "eval.json")
        for k, x in r.items():
            assert x["tokens"] == N * (S - 1) and x["sha256"] == ref[k]["sha256"]
            diffs[f"{name} {k}"] = abs(x["loss"] - ref[k]["loss"])
            assert x["by_position"]["tokens"] == ref[k]["by_position"]["tokens"]
            diffs[f"{name} {k} by position"] = max(abs(a - b) for a, b in zip(
                x["by_position"]["loss"], ref[k]["by_position"]["loss"]))
    print("|loss - TP=1 loss|:", diffs)
    assert max(diffs.values()) <= 1e-4
    assert results(tmp_path / "tp2" / "eval.json")["mg"]["parallel"] == {"tp": 2, "pp": 1, "dp": 1}


def test_raw_text_skips_the_rows_importance_used(env, tmp_path):
    """Raw text (pydoc): a pruned checkpoint's prune_plan.json names scores computed on the same
    text, so evaluation starts after the tokens importance read; the loss is transformers'."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pare_nemo.data import load_token_data

    pruned = tmp_path / "pruned"
    shutil.copytree(env["mg"], pruned)
    torch.save({"metadata": {"data": "pydoc", "pack": True, "split": "train", "seq_length": 32,
                             "rows_used": 10}}, tmp_path / "scores.pt")
    (pruned / "prune_plan.json").write_text(json.dumps({"scores": str(tmp_path / "scores.pt")}))
    out = tmp_path / "raw.json"
    from pare_nemo.eval import evaluate

    evaluate(checkpoints=f"p:{pruned},{env['hf']}", data="pydoc", output=str(out), num_samples=4,
             seq_length=S, document_mask=False, report=False)
    r = results(out)
    start = 10 * 32 // S  # 320 tokens of importance = 5 rows of 64
    assert r["p"]["rows"] == [start, start + 4] and set(r) == {"p", env["hf"].name}
    tok = AutoTokenizer.from_pretrained(env["hf"])
    rows = load_token_data("pydoc", tok, start + 4, S)[start:]
    hf = AutoModelForCausalLM.from_pretrained(env["hf"], dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(rows.tokens, labels=rows.tokens).loss.item()
    assert r["p"]["sha256"] == rows.sha256()
    for x in r.values():
        assert abs(x["loss"] - ref) <= 1e-4, (x["loss"], ref)


def test_refused_before_any_work(env, tmp_path, monkeypatch):
    """Missing checkpoint, differing tokenizers, bad tp/pp, too few held-out rows, an existing
    output, a split that overlaps a distillation run's training documents and raw text a
    distillation run trained on: clear errors, before any model is loaded."""
    import transformers
    from transformers import AutoTokenizer

    import pare_nemo.checkpoint
    from pare_nemo.eval import evaluate

    def no_work(*a, **k):
        raise AssertionError("a model was loaded before the checks")

    monkeypatch.setattr(pare_nemo.checkpoint, "load_model", no_work)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_work)
    mg, data = f"mg:{env['mg']}", env["data"]
    other = tmp_path / "other"  # the HF model with one more token in its tokenizer
    shutil.copytree(env["hf"], other)
    tok = AutoTokenizer.from_pretrained(env["hf"])
    tok.add_tokens(["zzqq"])
    tok.save_pretrained(other)
    distilled = tmp_path / "distilled"  # a distillation run on this data with another split
    shutil.copytree(env["mg"], distilled)
    (distilled / "distill_args.json").write_text(json.dumps({"data": data, "split": "90,10,0"}))
    run = dict(num_samples=N, seq_length=S, output=str(tmp_path / "out.json"), report=False)
    cases = [
        ([mg, f"gone:{tmp_path / 'nope'}"], data, {}, FileNotFoundError,
         r"checkpoint 'gone' \(.*nope\) does not exist"),
        ([mg, f"other:{other}"], data, {}, ValueError, r"tokenizers of \['other'\] differ"),
        ([mg, "mg:" + str(env["hf"])], data, {}, ValueError, r"names \['mg'\] are given more"),
        ([mg], data, {"tp": 3}, ValueError, r"'mg': invalid parallel sizes: tp=3 does not divide"),
        ([mg], data, {"pp": 0}, ValueError, r"tp=1 and pp=0 must be >= 1"),
        ([mg], data, {"num_samples": 10**4}, ValueError,
         r"validation split \(98,2,0\) of .* holds"),
        ([mg], str(tmp_path / "missing"), {}, FileNotFoundError, r"data .*missing does not exist"),
        ([mg, f"d:{distilled}"], data, {"split": "98,2,0"}, ValueError,
         r"run 'd' trained on this data with split='90,10,0'"),
        ([f"d:{distilled}"], str(env["root"] / "paragraphs.txt"), {}, ValueError,
         r"run 'd' was trained on .*paragraphs.txt \(prepared as"),
    ]
    for ckpts, d, kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            evaluate(checkpoints=ckpts, data=d, **(run | kw))
    (tmp_path / "out.json").write_text("[]")
    with pytest.raises(SystemExit, match="pare eval: error: output .*out.json already exists"):
        main(["eval", "report=false", f"checkpoints={mg}", f"data={data}",
              f"output={tmp_path / 'out.json'}"])
    assert (tmp_path / "out.json").read_text() == "[]"


def test_distillation_split_is_used(env, tp1, tmp_path):
    """Without split=, a distillation run's split of the same data is read (its held-out part)."""
    from pare_nemo.eval import evaluate

    distilled = tmp_path / "distilled"
    shutil.copytree(env["mg"], distilled)
    (distilled / "distill_args.json").write_text(json.dumps({"data": env["data"],
                                                             "split": "90,10,0"}))
    out = evaluate(checkpoints=f"d:{distilled}", data=env["data"], output=str(tmp_path),
                   num_samples=N, seq_length=S, report=False)
    r = results(out)["d"]
    assert r["split"] == "90,10,0" and Path(out).name == "eval.json"
    assert r["sha256"] != results(tp1)["mg"]["sha256"]


def test_eval_recipes():
    """`pare eval recipe=…` finds the three recipes; they name teacher, pruned and distilled at the
    paths slurm/prune.sh and slurm/distill.sh write by default (checkpoints/<their recipe>)."""
    from pare_nemo.cli import command, recipe_config, recipes_for

    cmd = command("eval")
    assert set(recipes_for(cmd)) == {"olmo3_7b_eval_width", "olmo3_7b_eval_depth",
                                     "olmo3_7b_eval_combined"}
    r = recipe_config(cmd, "olmo3_7b_eval_depth").flat()
    assert r["checkpoints"] == ("teacher:checkpoints/olmo3-7b-instruct,"
                                "pruned:checkpoints/olmo3_7b_depth_4p5b,"
                                "distilled:checkpoints/olmo3_7b_distill_depth")
    script = (Path(__file__).resolve().parents[1] / "slurm" / "eval.sh").read_text()
    assert 'launch eval ${RECIPE:+recipe="$RECIPE"}' in script


def test_one_rank_runs_alone_after_the_job(monkeypatch):
    """The report's exports run in rank 0 after the other ranks left: `this_process_alone` makes
    `distributed` build a one-process group even where the launcher said WORLD_SIZE=2 (without
    it rank 0 would wait for rank 1 forever), and gives the job's variables back afterwards."""
    import torch.distributed as dist

    from pare_nemo.parallel import distributed, free_port, this_process_alone

    job = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    for k, v in job.items():
        monkeypatch.setenv(k, v)
    with this_process_alone(), distributed(1, 1):
        assert dist.get_world_size() == 1
    assert not dist.is_initialized()
    assert {k: os.environ[k] for k in job} == job


def test_window_only_model_gains_nothing_past_the_window(tmp_path, tokenizer):
    """Rows whose second half repeats the first (24 random tokens of 16, then the same 24): a model
    with a full-attention layer learns to copy across 24 tokens, so its loss past position 24
    falls far below ln 16; the same weights with every layer sliding (window 8: what depth pruning
    leaves when it drops the full-attention layers) cannot see the first half and gain nothing
    past the window. Through eval's loss by position on Megatron imports of both."""
    from transformers import Olmo3ForCausalLM

    from conversion.convert import import_hf
    from pare_nemo.config import EvalConfig
    from pare_nemo.eval import find_checkpoint, loss_of, position_buckets
    from pare_nemo.parallel import distributed
    from pare_nemo.tiny import tiny_config, train_briefly

    half, w = 24, 8

    def copy_rows(n, seed):
        x = torch.randint(4, 20, (n, half), generator=torch.Generator().manual_seed(seed))
        return torch.cat([x, x], 1)

    cfg = tiny_config(vocab_size=len(tokenizer), num_layers=2, sliding_window=w,
                      layer_types=["sliding_attention", "full_attention"])
    cfg.pad_token_id, cfg.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    model = train_briefly(Olmo3ForCausalLM(cfg), copy_rows(2048, 0), steps=300, batch=32)
    paths = {}
    for name, types in (("full", cfg.layer_types), ("window_only", ["sliding_attention"] * 2)):
        cfg.layer_types = types
        hf_dir = tmp_path / f"hf_{name}"
        m = Olmo3ForCausalLM(cfg)
        m.load_state_dict(model.state_dict())
        m.save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
        paths[name] = import_hf(str(hf_dir), str(tmp_path / f"mg_{name}"))
    rows = copy_rows(16, 1)
    buckets, nb = position_buckets(rows, None, w)
    assert nb == 2 * half // w
    gain = {}
    with distributed(1, 1):
        for name, path in paths.items():
            ev = EvalConfig.of(None, checkpoints=str(path), data="copy", num_samples=16,
                               seq_length=2 * half, micro_batch_size=4, document_mask=False)
            r = loss_of(find_checkpoint(name, str(path)), ev,
                        type("Rows", (), {"tokens": rows, "mask": torch.ones_like(rows).bool()}),
                        None, 1, buckets, w)
            loss = r["by_position"]["loss"]  # buckets 0-2: random tokens; 3-5: the copy
            gain[name] = sum(loss[1:3]) / 2 - sum(loss[3:]) / 3
            print(name, [round(x, 3) for x in loss])
    print("gain past position 24 (nats):", gain)
    assert gain["full"] > 1.5 and gain["window_only"] < 0.1
