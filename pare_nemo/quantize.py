"""Post-training quantization (seed 003) with NVIDIA ModelOpt: calibrate an HF model (a Pare
Megatron checkpoint is exported first), quantize its linear layers and export the HF checkpoint
ModelOpt writes for deployment (``config.json`` ``quantization_config`` with
``quant_method: modelopt``, ``hf_quant_config.json``, quantized safetensors). Embeddings, the
output layer and the norms stay in ``dtype``.

| format    | ModelOpt config        | weights                    | activations                 |
|-----------|------------------------|----------------------------|-----------------------------|
| `fp8`     | `FP8_DEFAULT_CFG`      | float8_e4m3, a scale each  | fp8, static per-tensor scale|
| `int8`    | `INT8_SMOOTHQUANT_CFG` | int8, a scale per row      | int8 static, after SmoothQuant's per-channel pre-scale (W8A8_SQ_PER_CHANNEL) |
| `int8_wo` | `INT8_WEIGHT_ONLY_CFG` | int8, a scale per row      | not quantized (W8A16)       |

vLLM serves the ``fp8`` export (``--quantization modelopt``); it refuses ModelOpt's int8 formats
(vLLM's int8 path reads llm-compressor's compressed-tensors format instead).

transformers has no ModelOpt quantizer: ``from_pretrained`` of such an export loads the raw
fp8/int8 numbers without their scales and gives wrong outputs without a word. Pare therefore
loads exports with :func:`load_causal_lm`, which dequantizes the weights (``w * weight_scale``)
and quantizes each linear's input as the runtime does (``input_scale``, ``pre_quant_scale``), so
``pare eval`` measures the quantized model itself, on any device. It needs no ModelOpt.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from pathlib import Path

import torch

from pare_nemo.config import QuantizeConfig

QUANT_CONFIG = "hf_quant_config.json"  # ModelOpt's description of an export
REPORT_FILE = "quantize.json"
MODELOPT_CONFIGS = {"fp8": "FP8_DEFAULT_CFG", "int8": "INT8_SMOOTHQUANT_CFG",
                    "int8_wo": "INT8_WEIGHT_ONLY_CFG"}
FP8_MAX = 448.0  # float8_e4m3fn


def quantize(cfg: QuantizeConfig | None = None, **flat) -> str:
    """Post-training quantization (fp8 / int8) with ModelOpt into a deployable HF checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conversion.convert import export_hf
    from pare_nemo.checkpoint import atomic_output_dir, check_output_dir
    from pare_nemo.data import NotEnoughData, load_token_data
    from pare_nemo.parallel import device

    cfg = QuantizeConfig.of(cfg, **flat)
    # ---- everything checked before any work
    source = cfg.check()
    rows = cfg.rows
    inputs = [source]
    check_output_dir(cfg.output, cfg.overwrite, inputs)
    cfg.text.check()
    dtype, dev = getattr(torch, cfg.dtype), device()

    with atomic_output_dir(cfg.output, cfg.overwrite, inputs) as tmp:
        hf_dir = Path(source)
        if cfg.megatron_path:
            hf_dir = export_hf(cfg.megatron_path, str(tmp.parent / f".{tmp.name}.hf"),
                               overwrite=True)
        from transformers import AutoConfig

        from pare_nemo.config import check_seq_length

        check_seq_length(rows.seq_length, AutoConfig.from_pretrained(hf_dir))
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        try:
            data = load_token_data(cfg.text.data, tokenizer, rows.num_samples +
                                   cfg.held_out_samples, rows.seq_length, pack=cfg.text.pack,
                                   split=cfg.text.split)
        except NotEnoughData as e:
            raise NotEnoughData(f"{e} (num_samples={rows.num_samples} to calibrate + "
                                f"held_out_samples={cfg.held_out_samples})") from None
        calib, held = data[:rows.num_samples], data[rows.num_samples:]
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(dev).eval()
        mbs = rows.micro_batch_size
        before = lm_loss(model, held.tokens, held.mask, mbs)

        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint

        def forward_loop(m):
            with torch.no_grad():
                for i in range(0, len(calib), mbs):
                    m(input_ids=calib.tokens[i:i + mbs].to(dev),
                      attention_mask=calib.mask[i:i + mbs].to(dev).long())

        t0 = time.perf_counter()
        model = mtq.quantize(model, copy.deepcopy(getattr(mtq, MODELOPT_CONFIGS[cfg.format])),
                             forward_loop)
        seconds = time.perf_counter() - t0
        fake = lm_loss(model, held.tokens, held.mask, mbs)
        export_hf_checkpoint(model, dtype=dtype, export_dir=str(tmp))  # changes model: last use
        del model
        tokenizer.save_pretrained(tmp)
        reloaded = lm_loss(load_causal_lm(tmp, dtype).to(dev), held.tokens, held.mask, mbs)
        algo = json.loads((tmp / QUANT_CONFIG).read_text())["quantization"]["quant_algo"]
        report = {"format": cfg.format, "quant_algo": algo, "source": str(source),
                  "dtype": cfg.dtype, "loss_before": before, "loss_fake_quant": fake,
                  "loss_export": reloaded, "calibration_samples": rows.num_samples,
                  "held_out_samples": cfg.held_out_samples, "seq_length": rows.seq_length,
                  "data": cfg.text.data, "calibration_seconds": seconds}
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1))
        if cfg.megatron_path:
            shutil.rmtree(hf_dir, ignore_errors=True)
    print(f"quantize {cfg.format} ({algo}): held-out loss {before:.4f} -> {reloaded:.4f} (PPL "
          f"{math.exp(before):.2f} -> {math.exp(reloaded):.2f}; fake-quant {fake:.4f}) on "
          f"{cfg.held_out_samples} rows x {rows.seq_length}; export: {cfg.output}")
    return str(cfg.output)


def lm_loss(model, tokens: torch.Tensor, mask: torch.Tensor, micro_batch_size: int) -> float:
    """Mean next-token loss of an HF model over rows (the shared loss of pare_nemo.losses)."""
    from pare_nemo.losses import next_token_losses

    if not len(tokens):
        return float("nan")
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(tokens), micro_batch_size):
            t, m = tokens[i:i + micro_batch_size].to(dev), mask[i:i + micro_batch_size].to(dev)
            logits = model(input_ids=t, attention_mask=m.long()).logits
            per_token, keep = next_token_losses(logits, t, m, model.config.vocab_size)
            total += float((per_token * keep).sum())
            count += int(keep.sum())
    return total / count


# ---------------------------------------------------------------- reading an export back


def quant_algo(path: str | Path) -> str | None:
    """ModelOpt's ``quant_algo`` of an HF export (None: not quantized)."""
    f = Path(path) / QUANT_CONFIG
    return json.loads(f.read_text())["quantization"]["quant_algo"] if f.is_file() else None


class _QuantizeInput(torch.nn.Module):
    """A linear's input as the runtime sees it: times SmoothQuant's ``pre_quant_scale``, then
    quantized to fp8 or int8 with the static per-tensor ``input_scale`` and back."""

    def __init__(self, fp8: bool, input_scale: torch.Tensor | None, pre_quant_scale=None):
        super().__init__()
        self.fp8 = fp8
        self.register_buffer("scale", None if input_scale is None else
                             input_scale.float().reshape(()))
        self.register_buffer("pre", None if pre_quant_scale is None else
                             pre_quant_scale.float())

    def forward(self, x):
        dt, x = x.dtype, x.float()
        if self.pre is not None:
            x = x * self.pre
        if self.scale is not None:
            s = self.scale
            q = ((x / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() if self.fp8
                 else (x / s).round().clamp(-128, 127))
            x = q * s
        return x.to(dt)


def load_causal_lm(path: str | Path, dtype=torch.float32):
    """An HF causal LM: with ``from_pretrained``, or, for a ModelOpt export, rebuilt with its
    weights dequantized and its linears' inputs quantized as the runtime does."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    algo = quant_algo(path)
    if algo is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    config = AutoConfig.from_pretrained(path)
    if dtype == "auto":  # the dtype of the tensors left unquantized
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state |= load_file(f)
    plain = {}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, t in state.items():
        owner, leaf = name.rsplit(".", 1)
        if owner in linears and leaf in ("weight_scale", "input_scale", "pre_quant_scale"):
            continue
        if owner in linears and leaf == "weight" and f"{owner}.weight_scale" in state:
            scale = state[f"{owner}.weight_scale"].float()
            t = t.float() * (scale[:, None] if scale.dim() == 1 else scale)
        plain[name] = t.to(dtype)
    missing, unexpected = model.load_state_dict(plain, strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{path}: the export does not fit its config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    for name in linears:
        inp, pre = state.get(f"{name}.input_scale"), state.get(f"{name}.pre_quant_scale")
        if inp is not None or pre is not None:
            module = model.get_submodule(name)
            module.quantize_input = _QuantizeInput(algo.startswith("FP8"), inp, pre)
            module.register_forward_pre_hook(
                lambda m, args: (m.quantize_input(args[0]), *args[1:]))
    return model.eval()


def bits(path: str | Path, dtype: str) -> int:
    """Bits of a linear weight: 8 for a ModelOpt fp8/int8 export, else the dtype's."""
    if quant_algo(path):
        return 8
    return {"float32": 32, "bfloat16": 16, "float16": 16}.get(dtype, 16)
