"""Architecture search: candidates within the budget ranked by loss on rows importance did not use,
scored on the Megatron model exactly as ``pare prune`` builds them (the printed command reproduces
the loss through transformers), the same at TP=2 / PP=2 as at TP=1; the best retrained with
``pare prune`` + ``pare distill`` + ``pare eval``'s functions (a killed search redoes only what is
unfinished); latency and memory budgets, the roofline against measured decode time."""

import json
import os
import shlex
import signal
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conversion.convert import export_hf
from pare_nemo.data import load_token_data
from pare_nemo.importance import importance, load_scores
from pare_nemo.losses import next_token_nll
from pare_nemo.prune import num_params, prune
from pare_nemo.search import (
    first_held_out_row,
    keys_per_layer,
    measure,
    probe_cpu,
    rank_correlation,
    roofline,
    search,
    shape_cost,
)
from pare_nemo.tiny import tiny_config
from tests.dist_workers import fork, spawn

GRID = dict(ffn=[256, 128], heads=[4, 2], hidden=[64, 56], layers=[4, 3])  # 4 within 0.7 ± 10%
ROWS = dict(data="pydoc", num_samples=8, seq_length=64)


@pytest.fixture(scope="module")
def scores(tmp_path_factory, trained):
    """Importance on rows 0..8 (calibration) and 8..16 (layer_loss) of pydoc at 64 tokens."""
    path = tmp_path_factory.mktemp("search_scores") / "s.pt"
    return importance(megatron_path=str(trained["mg"]), data="pydoc", scores_path=str(path),
                      num_samples=8, seq_length=64, layer_loss_samples=8, report=False)


@pytest.fixture(scope="module")
def total(trained):
    return num_params(AutoModelForCausalLM.from_pretrained(trained["hf"]).config)


@pytest.fixture(scope="module")
def result(tmp_path_factory, trained, scores, total):
    out = search(megatron_path=str(trained["mg"]), scores_path=scores, budget=0.7 * total,
                 tolerance=0.1, **ROWS, **GRID,
                 out_path=str(tmp_path_factory.mktemp("search") / "search.json"))
    return json.loads(open(out).read())


def test_candidates_within_budget_ranked_on_unused_rows(trained, scores, total, result):
    rows = result["candidates"]
    assert len(rows) == 4 and {r["target_num_layers"] for r in rows} == {3, 4}
    assert all(0.63 * total <= r["params"] <= 0.77 * total for r in rows)
    assert [r["loss"] for r in rows] == sorted(r["loss"] for r in rows)
    assert result["skipped"] == []
    # importance used rows 0..16 (8 calibration + 8 layer_loss): search scores rows 16..24
    assert load_scores(scores)["metadata"]["rows_used"] == 16
    assert result["held_out_rows"] == [16, 24]
    meta = {"data": "pydoc", "seq_length": 64, "pack": True, "split": "train", "rows_used": 16}
    assert first_held_out_row(meta, "pydoc", 64, True, "train") == 16
    assert first_held_out_row(meta, "pydoc", 32, True, "train") == 0  # other rows: nothing to skip
    assert first_held_out_row(meta, "other.jsonl", 64, True, "train") == 0


@pytest.mark.parametrize("which", ["best", "best_depth"])
def test_command_reproduces_the_loss_through_transformers(tmp_path, trained, scores, result, which):
    """The printed ``pare prune`` command, run with prune() + export_hf, gives a model whose
    transformers loss on the recorded rows equals the search loss (fp32; measured 1e-7..3e-7): for the
    best row, and for the best depth-pruned row (its layers chosen by the same layer_metric)."""
    rows = result["candidates"]
    best = rows[0] if which == "best" else next(r for r in rows if r["target_num_layers"] == 3)
    argv = shlex.split(best["prune_command"])
    assert argv[:2] == ["pare", "prune"]
    args = dict(a.split("=", 1) for a in argv[2:])
    assert args["megatron_path"] == str(trained["mg"]) and args["scores_path"] == scores
    assert args["layer_metric"] == "layer_loss" and args["protect_full_attention"] == "false"
    targets = {k: int(v) for k, v in args.items() if k.startswith("target_")}
    assert targets == {k: best[k] for k in targets} and len(targets) == 4
    hf_dir = export_hf(prune(megatron_path=args["megatron_path"], scores_path=args["scores_path"],
                             save_path=str(tmp_path / "p"), layer_metric=args["layer_metric"],
                             protect_full_attention=args["protect_full_attention"] == "true",
                             **targets), str(tmp_path / "hf"))
    start, end = result["held_out_rows"]
    held = load_token_data("pydoc", AutoTokenizer.from_pretrained(hf_dir), end, 64)[start:]
    assert held.sha256() == result["held_out_sha256"]
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        s, n = next_token_nll(model(held.tokens).logits, held.tokens, held.mask,
                              model.config.vocab_size)
    assert abs((s / n).item() - best["loss"]) <= 1e-4, ((s / n).item(), best["loss"])


def _search_worker(tp, pp, ckpt, scores, budget, out):
    search(megatron_path=ckpt, scores_path=scores, budget=budget, tolerance=0.1, tp=tp, pp=pp,
           out_path=out, **ROWS, **GRID)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_parallel_search_equals_tp1(tmp_path, trained, scores, total, result, tp, pp):
    """Same losses at TP=2 and PP=2 (fp32, gloo; measured 1.2e-7 and 0). At PP=2 the 3-layer candidates do
    not divide into 2 stages: they are skipped and reported."""
    spawn(_search_worker, 2, tp, pp, str(trained["mg"]), scores, 0.7 * total,
          str(tmp_path / "s.json"), tmp=tmp_path)
    par = json.loads((tmp_path / "s.json").read_text())
    key = lambda r: tuple(r[k] for k in r if k.startswith("target_"))  # noqa: E731
    ref = {key(r): r["loss"] for r in result["candidates"]}
    got = {key(r): r["loss"] for r in par["candidates"]}
    if pp == 2:
        assert {k for k in ref if k[3] == 3} == {key(s) for s in par["skipped"]}
        assert all("pp=2 does not divide num_hidden_layers=3" in s["reason"]
                   for s in par["skipped"])
        ref = {k: v for k, v in ref.items() if k[3] == 4}
    assert got.keys() == ref.keys() and got
    assert all(abs(got[k] - ref[k]) <= 1e-5 for k in ref), (got, ref)
    assert par["held_out_rows"] == result["held_out_rows"]


def test_bad_input(tmp_path, trained, scores, total):
    ck = str(trained["mg"])
    with pytest.raises(ValueError, match="no candidate"):
        search(megatron_path=ck, scores_path=scores, budget=10.0, **ROWS)
    with pytest.raises(TypeError, match="data"):
        search(megatron_path=ck, scores_path=scores, budget=0.7 * total, num_samples=8,
               seq_length=64)
    s = load_scores(scores)
    s["layer_loss"] = torch.full_like(s["layer_loss"], float("nan"))
    torch.save(s, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="layer_loss_samples=0"):
        search(megatron_path=ck, scores_path=str(tmp_path / "nan.pt"), budget=0.7 * total, **ROWS,
               **GRID)


# ---------------------------------------------------------------- retraining the best candidates

RETRAIN = dict(retrain_top=2, retrain_steps=8, retrain_batch_size=8, retrain_lr=1e-3, retrain_warmup=2,
               retrain_dtype="float32", score_samples=8)


def _kill_when_done(proc, retrain_dir):
    """SIGKILL the search ``proc`` as soon as its first candidate is retrained (its eval.json);
    that candidate's name."""
    first, deadline = None, time.time() + 900
    while proc.is_alive() and time.time() < deadline:
        kept = retrain_dir / "zero_shot.json"
        if first is None and kept.exists():
            first = json.loads(kept.read_text())["result"]["candidates"][0]["name"]
        if first and (retrain_dir / first / "eval.json").exists():
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.join()
    return first


@pytest.fixture(scope="module")
def retrained(tmp_path_factory, trained, scores, total, distill_env):
    """A search that retrains its 2 best candidates, SIGKILLed once the first is done, then run
    again to the end."""
    root = tmp_path_factory.mktemp("retrain")
    kw = dict(megatron_path=str(trained["mg"]), scores_path=scores, budget=0.7 * total,
              tolerance=0.1, **ROWS, **GRID, **RETRAIN, distill_data=distill_env["data"],
              out_path=str(root / "search.json"))
    rdir = root / "search_retrain"
    proc = fork(search, **kw)
    first = _kill_when_done(proc, rdir)
    killed = proc.exitcode == -signal.SIGKILL
    done = sorted(p.parent.name for p in rdir.glob("*/eval.json"))
    stamp = {p.name: p.stat().st_mtime_ns for p in (rdir / first).rglob("*") if p.is_file()}
    out = search(**kw)
    return dict(kw=kw, rdir=rdir, first=first, killed=killed, done=done, stamp=stamp,
                result=json.loads(open(out).read()), out=out)


def test_killed_search_reruns_only_unfinished(retrained):
    r, rdir, first = retrained["result"], retrained["rdir"], retrained["first"]
    assert retrained["killed"] and retrained["done"] == [first]
    # the finished candidate's files are untouched by the rerun; the other one is done now
    now = {p.name: p.stat().st_mtime_ns for p in (rdir / first).rglob("*") if p.is_file()}
    assert now == retrained["stamp"]
    top = r["candidates"][:2]
    assert top[0]["name"] == first and all("retrained" in x for x in top)
    assert "retrained" not in r["candidates"][2]
    for x in top:
        metrics = (rdir / x["name"] / "distilled" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(m)["step"] for m in metrics] == list(range(1, 9))  # each step once
        after = x["retrained"]
        assert after["loss_after"] < after["loss_before"] - 0.01, after  # it learned
    assert sorted(x["retrained"]["rank"] for x in top) == [1, 2]
    rho = r["retrain"]["rank_correlation"]
    assert rho in (-1.0, 1.0)  # two candidates: the same order or swapped
    chosen = min(top, key=lambda x: x["retrained"]["loss_after"])
    assert r["chosen"] == chosen["name"]
    assert os.path.getsize(retrained["out"].replace(".json", ".png")) > 10_000


def test_retrained_loss_equals_separate_prune_and_distill(tmp_path, retrained):
    """The row's printed ``pare prune`` and ``pare distill`` commands, run through the CLI into
    other directories, then ``pare eval`` on the same rows: the same losses (fp32, CPU; measured
    identical)."""
    from pare_nemo.cli import main
    from pare_nemo.eval import evaluate
    from pare_nemo.search import eval_config

    row = retrained["result"]["candidates"][1]  # the one the rerun retrained
    prune_argv = shlex.split(row["prune_command"])[1:]
    prune_argv = [a for a in prune_argv if not a.startswith("save_path=")]
    main(prune_argv + [f"save_path={tmp_path / 'pruned'}"])
    distill_argv = shlex.split(row["retrained"]["distill_command"])[1:]
    assert {"distill", f"train_steps={RETRAIN['retrain_steps']}", "dtype=float32",
            f"lr={RETRAIN['retrain_lr']}"} <= set(distill_argv)
    distill_argv = [a for a in distill_argv if not a.startswith(("student_path=", "save_path="))]
    main(distill_argv + [f"student_path={tmp_path / 'pruned'}",
                         f"save_path={tmp_path / 'distilled'}"])
    from pare_nemo.config import SearchConfig

    out = evaluate(eval_config(SearchConfig.of(**retrained["kw"]), tmp_path))
    before, after = json.loads(open(out).read())
    assert abs(before["loss"] - row["retrained"]["loss_before"]) <= 1e-6
    assert abs(after["loss"] - row["retrained"]["loss_after"]) <= 1e-6, (
        after["loss"], row["retrained"])


def _retrain_worker(kw):
    search(**kw)


def test_retrained_losses_at_tp2_equal_tp1(tmp_path, retrained):
    kw = dict(retrained["kw"], tp=2, retrain_top=1, out_path=str(tmp_path / "s.json"))
    spawn(_retrain_worker, 2, kw, tmp=tmp_path)
    par = json.loads((tmp_path / "s.json").read_text())["candidates"][0]
    ref = retrained["result"]["candidates"][0]
    assert par["name"] == ref["name"]
    got, want = par["retrained"], ref["retrained"]
    assert abs(got["loss_before"] - want["loss_before"]) <= 1e-5  # measured 1.2e-7
    assert abs(got["loss_after"] - want["loss_after"]) <= 1e-5, (got, want)  # measured 1.5e-7


def test_rerun_with_other_retraining_is_refused(retrained):
    """A finished candidate is reused only for the same retraining settings."""
    with pytest.raises(ValueError, match="retrained with other settings"):
        search(**dict(retrained["kw"], retrain_steps=9))


def test_retrain_bad_input(trained, scores, total, distill_env):
    kw = dict(megatron_path=str(trained["mg"]), scores_path=scores, budget=0.7 * total,
              tolerance=0.1, **ROWS, **GRID)
    with pytest.raises(ValueError, match="distill_data"):
        search(**kw, retrain_top=2)
    with pytest.raises(ValueError, match="retrain_batch_size=7"):
        search(**kw, retrain_top=2, distill_data=distill_env["data"], retrain_batch_size=7,
               micro_batch_size=2)
    with pytest.raises(ValueError, match="validation split"):
        search(**kw, retrain_top=2, distill_data=distill_env["data"], score_samples=10 ** 6)


# ---------------------------------------------------------------- latency and memory


def test_shape_cost_by_hand():
    """KV cache and FLOPs of a 3 sliding : 1 full Olmo 3 at a context past the window."""
    c = tiny_config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=4,
                    num_heads=4, num_kv_heads=2, sliding_window=16)
    assert keys_per_layer(c, 100) == [16, 16, 16, 100]
    assert keys_per_layer(c, 10) == [10, 10, 10, 10]
    cost = shape_cost(c, batch=2, context=100, dtype_bytes=2)
    hd = 16
    assert cost["kv_cache_bytes"] == 2 * 2 * 2 * hd * 2 * (16 * 3 + 100)
    matmul = num_params(c) - 1000 * 64
    assert cost["decode_flops"] == 2 * (2 * matmul + 4 * 64 * (16 * 3 + 100))
    pairs = 3 * (16 * 17 // 2 + 84 * 16) + 100 * 101 // 2
    assert cost["prefill_flops"] == 2 * (2 * matmul * 100 + 4 * 64 * pairs)
    decode, _ = roofline(cost, flops=1e30, bandwidth=1e9)  # memory-bound: bytes / bandwidth
    assert decode == pytest.approx((matmul * 2 + cost["kv_cache_bytes"]) / 1e9)


def test_latency_model_orders_shapes_as_measured_on_cpu():
    """Clearly different shapes (~0.3M, 4M and 34M decoder parameters): the roofline with this
    CPU's probed figures orders their decode steps as timing them does."""
    shapes = [tiny_config(vocab_size=1024, hidden_size=h, intermediate_size=4 * h, num_layers=n,
                          num_heads=4, num_kv_heads=4, sliding_window=16)
              for h, n in ((64, 2), (256, 4), (512, 8))]
    flops, bw = probe_cpu()
    model = [roofline(shape_cost(c, 1, 64, 4), flops, bw)[0] for c in shapes]
    timed = [measure(c, 1, 64, torch.float32)[0] for c in shapes]
    assert model == sorted(model) and timed == sorted(timed), (model, timed)
    assert timed[2] > 3 * timed[0], timed


def test_budgets_of_latency_and_memory(tmp_path, trained, scores, total):
    """budget_latency and budget_memory alone (no parameter budget): every candidate kept is within
    both, some of the grid is not, and the Pareto front is the candidates no other beats on both
    loss and decode time."""
    from pare_nemo.checkpoint import read_model_config

    c, _, _ = read_model_config(trained["mg"])
    lat = dict(latency="model", hardware="h100", latency_context=64, latency_batch_size=8)
    full = roofline(shape_cost(c, 8, 64, 2), 989e12, 3.35e12)[0]
    memory = shape_cost(c, 8, 64, 2)["memory_bytes"]
    out = search(megatron_path=str(trained["mg"]), scores_path=scores, **ROWS, **GRID, **lat,
                 budget_latency=0.8 * full, budget_memory=0.75 * memory,
                 out_path=str(tmp_path / "s.json"))
    r = json.loads(open(out).read())
    rows = r["candidates"]
    assert rows and len(rows) < 16 and r["latency"]["source"].startswith("roofline on h100")
    assert all(x["decode_s"] <= 0.8 * full and x["memory_bytes"] <= 0.75 * memory for x in rows)
    for x in rows:
        beaten = any(o["loss"] <= x["loss"] and o["decode_s"] <= x["decode_s"] and o is not x
                     for o in rows)
        assert x["pareto"] == (not beaten)
    assert rows[0]["pareto"]  # the lowest loss is on the front
    with pytest.raises(ValueError, match="budget_latency"):
        search(megatron_path=str(trained["mg"]), scores_path=scores, **ROWS, **GRID, **lat,
               budget_latency=1e-12, out_path=str(tmp_path / "t.json"))
    with pytest.raises(ValueError, match="no budget"):
        search(megatron_path=str(trained["mg"]), scores_path=scores, **ROWS, **GRID)


def test_rank_correlation():
    assert rank_correlation([1, 2, 3], [10, 20, 30]) == 1.0
    assert rank_correlation([1, 2, 3], [3, 2, 1]) == -1.0
    assert rank_correlation([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert rank_correlation([1], [2]) is None


def test_olmo3_7b_search_recipe_covers_width_depth_and_combined():
    """The 7B recipe's grid, on Olmo 3 7B's shape (scores of the right shapes; which channels
    they keep does not change a count): width-only, depth-only and combined candidates within
    4.5B ± 5%; the roofline prices them on an H100 at 8k context, depth-pruned ones fastest."""
    from pare_nemo.search import candidates_in_budget, price
    from recipes.olmo3 import olmo3_7b_search

    cfg = olmo3_7b_search()
    c = tiny_config(vocab_size=100278, hidden_size=4096, intermediate_size=11008, num_layers=32,
                    num_heads=32, head_dim=128, sliding_window=4096)
    L, g = 32, torch.Generator().manual_seed(0)
    scores = {"mlp": torch.rand(L, 11008, generator=g), "attention": torch.rand(L, 32, generator=g),
              "attn_ln": torch.rand(4096, generator=g), "ffn_ln": torch.rand(4096, generator=g),
              "layer": torch.rand(L, generator=g), "layer_loss": torch.rand(L, generator=g)}
    _, found, _ = candidates_in_budget(c, scores, cfg)
    shapes = [(t["target_ffn_hidden_size"], t["target_num_attention_heads"],
               t["target_hidden_size"], t["target_num_layers"]) for t, _, _ in found]
    assert all(4.275e9 <= n <= 4.725e9 for _, n, _ in found)
    assert any(n == 32 for *_, n in shapes)  # width only
    assert (11008, 32, 4096, 18) in shapes  # depth only
    assert any(n < 32 and (f, h, d) != (11008, 32, 4096) for f, h, d, n in shapes)  # combined
    for _, _, p in found:  # full-attention layers protected (every 4th)
        assert all(j in p.layers for j in range(3, 32, 4))
    source, costs = price([p.config for _, _, p in found], cfg)
    assert source.startswith("roofline on h100")
    fastest = min(range(len(found)), key=lambda i: costs[i]["decode_s"])
    assert shapes[fastest][3] == 18
