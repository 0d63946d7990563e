"""Sparsity (pare_nemo/sparsify.py) on the ``trained`` tiny Olmo 3 (4 layers, hidden 64, FFN 256,
trained briefly on pydoc text) and masked distillation on conftest's ``distill_env``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pare_nemo.sparsify import (
    LINEARS,
    MASK_FILE,
    REPORT_FILE,
    key,
    load_masks,
    sparsify,
)
from tests.dist_workers import spawn

CALIB = dict(data="pydoc", num_samples=64, seq_length=64, micro_batch_size=8,
             held_out_samples=64)


def report(path) -> dict:
    return json.loads((Path(path) / REPORT_FILE).read_text())


def weights_and_masks(path) -> tuple[dict, dict]:
    """The decoder linears' full weights (TP=1 load) and the saved kept masks."""
    from pare_nemo.checkpoint import load_model, read_model_config
    from pare_nemo.parallel import distributed

    n = read_model_config(path)[0].num_hidden_layers
    keys = [key(i, name) for i in range(n) for name in LINEARS]
    with distributed(1, 1):
        model, _ = load_model(path, dtype=torch.float32)
        params = dict(model.named_parameters())
        weights = {k: params[k].detach().clone() for k in keys}
    return weights, load_masks(path, keys)


def with_outlier_channels(src: Path, dst: Path, sigma: float = 1.0, seed: int = 0) -> str:
    """The same function with LLM-like input outliers: the input channels of every linear_fc2
    and linear_proj scaled by exp(sigma * N(0, 1)) (up and v rows times s, down and o columns
    divided by it), as a Megatron checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conversion.convert import import_hf

    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in m.model.layers:
            for up, down in ((layer.mlp.up_proj, layer.mlp.down_proj),
                             (layer.self_attn.v_proj, layer.self_attn.o_proj)):
                s = torch.exp(sigma * torch.randn(up.weight.shape[0], generator=g))
                up.weight.mul_(s[:, None])
                down.weight.div_(s[None, :])
    m.save_pretrained(dst / "hf")
    AutoTokenizer.from_pretrained(src).save_pretrained(dst / "hf")
    return import_hf(str(dst / "hf"), str(dst / "mg"))


def test_wanda_and_sparsegpt_beat_magnitude(tmp_path, trained):
    """50% unstructured. On the plain tiny model (no outlier features; its input channels have
    similar norms) magnitude is as good as Wanda: held-out loss 2.4458 -> magnitude 2.6039, Wanda
    2.6205, SparseGPT 2.5684. LLMs have input channels far larger than the rest (Dettmers et al.
    2022), which is why Wanda and SparseGPT weigh each weight by its input. The same model with
    such channels (a function-preserving rescaling, sigma=1; loss before unchanged): magnitude
    3.249, Wanda 2.6205 (its score is invariant to input scale), SparseGPT 2.802 (its block-wide
    threshold is not invariant to the rescaled up/v rows). Over rescaling seeds 0/1/2: magnitude
    3.249 / 3.309 / 3.394, Wanda 2.6205 each time, SparseGPT 2.802 / 2.835 / 2.893: margins of
    0.63+ and 0.44+ against the 0.3 and 0.2 asserted."""
    plain = {m: report(sparsify(megatron_path=str(trained["mg"]), save_path=str(tmp_path / m),
                                method=m, **CALIB)) for m in ("magnitude", "wanda", "sparsegpt")}
    for r in plain.values():
        assert abs(r["measured_sparsity"] - 0.5) < 1e-3, r
        assert r["loss_before"] < r["loss_after"] < r["loss_before"] + 0.4, r
    assert plain["sparsegpt"]["loss_after"] < plain["magnitude"]["loss_after"]
    outl = with_outlier_channels(trained["hf"], tmp_path / "outliers")
    rows = {m: report(sparsify(megatron_path=outl, save_path=str(tmp_path / f"o_{m}"),
                               method=m, **CALIB)) for m in ("magnitude", "wanda", "sparsegpt")}
    print({m: (round(plain[m]["loss_after"], 4), round(rows[m]["loss_after"], 4)) for m in rows})
    assert rows["wanda"]["loss_before"] == pytest.approx(plain["wanda"]["loss_before"], abs=1e-4)
    assert rows["wanda"]["loss_after"] == pytest.approx(plain["wanda"]["loss_after"], abs=2e-3)
    assert rows["wanda"]["loss_after"] < rows["magnitude"]["loss_after"] - 0.3
    assert rows["sparsegpt"]["loss_after"] < rows["magnitude"]["loss_after"] - 0.2


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_two_four_is_exact(tmp_path, trained, method):
    """pattern=2:4: every group of 4 consecutive input weights has at least 2 zeros, the mask
    file says which, and the checkpoint is zero exactly where the mask is."""
    out = sparsify(megatron_path=str(trained["mg"]), save_path=str(tmp_path / "s"),
                   method=method, pattern="2:4", **CALIB)
    r = report(out)
    assert r["sparsity"] == 0.5 and r["pattern"] == "2:4"
    assert r["loss_after"] < r["loss_before"] + 0.6, r
    weights, masks = weights_and_masks(out)
    for k, w in weights.items():
        groups = (w == 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert (groups >= 2).all(), k
        assert masks[k].reshape(w.shape[0], -1, 4).sum(-1).eq(2).all(), k
        assert (w[~masks[k]] == 0).all(), k


def _sparsify_worker(tp, pp, ckpt, out, method):
    sparsify(megatron_path=ckpt, save_path=out, method=method, tp=tp, pp=pp, **CALIB)


def test_tp2_pp2_masks_equal_tp1(tmp_path, trained):
    """SparseGPT at TP=2 x PP=2 (its Hessians need the row-parallel layers' inputs gathered over
    TP; each stage's masks reach the file): the same masks as TP=1, and the same weights to float
    rounding."""
    ref = sparsify(megatron_path=str(trained["mg"]), save_path=str(tmp_path / "ref"),
                   method="sparsegpt", **CALIB)
    spawn(_sparsify_worker, 4, 2, 2, str(trained["mg"]), str(tmp_path / "par"), "sparsegpt",
          tmp=tmp_path)
    (wa, ma), (wb, mb) = weights_and_masks(ref), weights_and_masks(tmp_path / "par")
    assert ma.keys() == mb.keys()
    differ = sum(int((ma[k] != mb[k]).sum()) for k in ma)
    assert differ == 0, f"{differ} mask entries differ"
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    assert report(tmp_path / "par")["loss_after"] == pytest.approx(report(ref)["loss_after"],
                                                                   abs=1e-4)


def test_masked_distillation_keeps_zeros_and_lowers_loss(tmp_path, distill_env):
    """The teacher sparsified 50% by Wanda, then distilled from the dense teacher for 20 steps
    with its mask: every pruned weight is still exactly zero (checked here and by the run's own
    integrity file), the mask travels with the run, and the held-out loss falls. Measured (2-core
    CPU): dense teacher 3.6358, sparse 3.7348, after 20 masked steps 3.6589 (data seed 1234);
    seeds 1/2/3: 3.6427 / 3.6603 / 3.6469, gains of 0.075-0.092 against the 0.04 asserted."""
    from pare_nemo.distill import distill
    from tests.test_distill import RUN, held_out_loss

    env = distill_env
    sparse = sparsify(megatron_path=env["teacher"], save_path=str(tmp_path / "sparse"),
                      method="wanda", **CALIB)
    run = distill(**RUN, train_steps=20, save_interval=20, teacher_path=env["teacher"],
                  student_path=sparse, mask=sparse, data=env["data"],
                  save_path=str(tmp_path / "run"))
    check = json.loads((Path(run) / "sparse_integrity.json").read_text())
    assert check["ok"] and check["nonzero_pruned"] == 0 and check["pruned_weights"] > 0, check
    assert (Path(run) / MASK_FILE).exists()
    weights, masks = weights_and_masks(run)
    assert all((w[~masks[k]] == 0).all() for k, w in weights.items())
    changed = sum(int((w[masks[k]] != 0).sum()) for k, w in weights.items())
    assert changed > 0.99 * sum(int(m.sum()) for m in masks.values())
    before, after = held_out_loss(sparse, env["held"]), held_out_loss(run, env["held"])
    print("held-out loss: sparse", round(before, 4), "masked distillation", round(after, 4))
    assert after < before - 0.04


def test_bad_input_is_refused_before_any_work(tmp_path, trained, distill_env):
    from pare_nemo.distill import distill

    mg = str(trained["mg"])
    for kw, msg in ((dict(method="obs"), "method="), (dict(pattern="4:2"), "pattern="),
                    (dict(pattern="2:4", sparsity=0.7), "disagrees"),
                    (dict(sparsity=1.0), "sparsity=")):
        with pytest.raises(ValueError, match=msg):
            sparsify(megatron_path=mg, save_path=str(tmp_path / "x"), **CALIB | kw)
    assert not (tmp_path / "x").exists()
    env = distill_env
    sparse = sparsify(megatron_path=env["teacher"], save_path=str(tmp_path / "sp"),
                      method="magnitude", **CALIB)
    with pytest.raises(ValueError, match="does not fit this student"):
        distill(**dict(train_steps=2, save_interval=2, warmup_steps=0, teacher_path=env["teacher"],
                       student_path=env["width"], mask=sparse, data=env["data"],
                       save_path=str(tmp_path / "run")))
    with pytest.raises(FileNotFoundError, match="sparsity_mask"):
        distill(train_steps=2, save_interval=2, warmup_steps=0, teacher_path=env["teacher"],
                student_path=env["width"], mask=str(tmp_path), data=env["data"],
                save_path=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
