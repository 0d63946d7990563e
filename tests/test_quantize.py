"""Post-training quantization (pare_nemo/quantize.py, NVIDIA ModelOpt on CPU: its fake-quant
kernels are plain torch there) of the ``trained`` tiny Olmo 3, and ``pare eval`` of the exports
beside a sparse checkpoint (sparsity and bits in its table)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROWS = dict(data="pydoc", num_samples=32, seq_length=64, micro_batch_size=8, held_out_samples=64)
ALGO = {"int8": "W8A8_SQ_PER_CHANNEL", "fp8": "FP8"}
WEIGHT_DTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, trained):
    from pare_nemo.quantize import quantize

    root = tmp_path_factory.mktemp("quant")
    return {fmt: Path(quantize(megatron_path=str(trained["mg"]), output=str(root / fmt),
                               format=fmt, dtype="float32", **ROWS)) for fmt in ALGO}


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_export_is_modelopts_and_reloads_within_a_bound(exports, fmt):
    """The export is ModelOpt's HF format (quantized linears with their scales, the embeddings
    unquantized) and, read back by load_causal_lm, computes the fake-quantized model (1e-3).
    Measured (held-out 64 x 64 tokens, fp32 2.49674): int8 SmoothQuant 2.49779 (+0.0010), fp8
    2.50147 (+0.0047); the bounds asserted are 0.01 and 0.02."""
    from safetensors import safe_open

    out = exports[fmt]
    r = json.loads((out / "quantize.json").read_text())
    assert json.loads((out / "config.json").read_text())["quantization_config"][
        "quant_method"] == "modelopt"
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"][
        "quant_algo"] == ALGO[fmt] == r["quant_algo"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == WEIGHT_DTYPE[fmt]
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == WEIGHT_DTYPE[fmt]
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert {"model.layers.0.mlp.down_proj.weight_scale",
            "model.layers.0.mlp.down_proj.input_scale"} <= names
    assert r["loss_export"] == pytest.approx(r["loss_fake_quant"], abs=1e-3)
    assert 0 <= r["loss_export"] - r["loss_before"] < {"int8": 0.01, "fp8": 0.02}[fmt], r


def test_eval_shows_sparsity_and_bits(tmp_path, trained, exports):
    """pare eval of the dense checkpoint, a 2:4-sparse one and the int8 export: sparsity and bits
    per row (json and table); the export's loss is the dequantized model's, near the dense one."""
    from conversion.convert import export_hf
    from pare_nemo.eval import evaluate
    from pare_nemo.sparsify import sparsify

    sparse = sparsify(megatron_path=str(trained["mg"]), save_path=str(tmp_path / "sparse"),
                      method="wanda", pattern="2:4", **ROWS)
    dense_hf = export_hf(str(trained["mg"]), str(tmp_path / "dense_hf"))
    out = evaluate(checkpoints=f"dense:{trained['mg']},dense_hf:{dense_hf},sparse:{sparse},"
                               f"int8:{exports['int8']}", data="pydoc", num_samples=16,
                   seq_length=64, micro_batch_size=8, dtype="float32", report=False,
                   output=str(tmp_path / "eval.json"))
    rows = {r["name"]: r for r in json.loads(Path(out).read_text())}
    assert rows["dense"]["sparsity"] == 0 and rows["dense"]["bits"] == 32
    assert rows["sparse"]["sparsity"] == pytest.approx(0.5) and rows["sparse"]["bits"] == 32
    assert rows["int8"]["bits"] == 8 and rows["dense_hf"]["bits"] == 32
    assert rows["dense_hf"]["loss"] == pytest.approx(rows["dense"]["loss"], abs=1e-4)
    assert abs(rows["int8"]["loss"] - rows["dense_hf"]["loss"]) < 0.01


def test_bad_input_is_refused_before_any_work(tmp_path, trained):
    from pare_nemo.quantize import quantize

    mg = str(trained["mg"])
    for kw, err, msg in (
            (dict(megatron_path=mg, format="int4"), ValueError, "format="),
            (dict(megatron_path=mg, hf_path=str(trained["hf"])), ValueError, "exactly one"),
            (dict(), ValueError, "exactly one"),
            (dict(hf_path=str(tmp_path)), FileNotFoundError, "config.json")):
        with pytest.raises(err, match=msg):
            quantize(output=str(tmp_path / "q"), **ROWS | kw)
    assert not (tmp_path / "q").exists()
