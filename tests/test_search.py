"""Architecture search: candidates within the budget ranked by loss on rows importance did not use,
scored on the Megatron model exactly as ``pare prune`` builds them (the printed command reproduces
the loss through transformers), the same at TP=2 / PP=2 as at TP=1."""

import json
import shlex

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conversion.convert import export_hf
from pare_nemo.data import load_token_data
from pare_nemo.importance import importance, load_scores
from pare_nemo.losses import next_token_nll
from pare_nemo.prune import num_params, prune
from pare_nemo.search import first_held_out_row, search
from tests.dist_workers import spawn

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
