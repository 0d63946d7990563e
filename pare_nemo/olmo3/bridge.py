"""The Olmo 3 <-> Megatron-Core bridge: a config provider and one declarative table of weight mappings.

Everything Pare knows about how an HF ``Olmo3ForCausalLM`` maps onto Pare's Megatron model lives here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pare_nemo.olmo3.model import FULL, SLIDING, Olmo3TransformerConfig, fusions

VOCAB_PAD_MULTIPLE = 1024  # padded vocab divisible by 128 x TP for TP up to 8, for any TP saved/loaded

# Megatron config fields Pare sets for Olmo 3 no matter the size.
_FIXED = dict(
    normalization="RMSNorm",
    gated_linear_unit=True,
    activation_func=F.silu,
    add_bias_linear=False,
    add_qkv_bias=False,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    qk_layernorm=True,
    bias_dropout_fusion=False,  # no bias, no dropout; the layer adds its residuals itself
    masked_softmax_fusion=False,  # Pare's own core attention (SDPA / FlexAttention)
    persist_layer_norm=False,  # Pare's own RMSNorm
)  # bias_activation_fusion, gradient_accumulation_fusion, apply_rope_fusion: model.fusions()

SUPPORTED_ARCHITECTURES = ("Olmo3ForCausalLM",)


def padded_vocab_size(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE


def hf_dtype(hf_config) -> torch.dtype:
    dt = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or "float32"
    return getattr(torch, dt) if isinstance(dt, str) else dt


def pipeline_split(num_layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage: even when ``pp`` divides ``num_layers``; otherwise the first and
    last stages take the remainder (first one more when it is odd), the middle stages
    ``num_layers // pp`` each (megatron's ``num_layers_in_first/last_pipeline_stage``)."""
    middle, rem = divmod(num_layers, pp)
    if rem == 0 or pp == 1:
        return [middle] * pp
    first, last = middle + (rem + 1) // 2, middle + rem // 2
    return [first] + [middle] * (pp - 2) + [last]


def megatron_config(hf_config, tp: int = 1, pp: int = 1, dtype: torch.dtype | None = None,
                    sequence_parallel: bool = False, **overrides) -> Olmo3TransformerConfig:
    """The provider: HF ``Olmo3Config`` -> Pare's ``Olmo3TransformerConfig``. A layer count ``pp``
    does not divide gets megatron's uneven split (:func:`pipeline_split`); only stages that allow
    it (distillation) pass such a count (``check_parallel_sizes(uneven_pipeline=True)``)."""
    dtype = dtype or hf_dtype(hf_config)
    head_dim = getattr(hf_config, "head_dim", None) or (
        hf_config.hidden_size // hf_config.num_attention_heads
    )
    rope = {t: dict(hf_config.rope_parameters[t]) for t in (SLIDING, FULL)}
    kw = dict(
        _FIXED,
        **fusions(),
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=head_dim,
        head_dim=head_dim,
        layernorm_epsilon=hf_config.rms_norm_eps,
        init_method_std=hf_config.initializer_range,
        layer_types=list(hf_config.layer_types),
        sliding_window=hf_config.sliding_window,
        rope_parameters=rope,
        max_position_embeddings=hf_config.max_position_embeddings,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    if pp > 1 and hf_config.num_hidden_layers % pp:
        split = pipeline_split(hf_config.num_hidden_layers, pp)
        kw.update(num_layers_in_first_pipeline_stage=split[0],
                  num_layers_in_last_pipeline_stage=split[-1])
    kw.update(overrides)
    return Olmo3TransformerConfig(**kw)


def check_parallel_sizes(hf_config, tp: int, pp: int, uneven_pipeline: bool = False) -> None:
    """Clear errors for TP/PP that do not divide the model, before any work starts."""
    problems = []
    if tp < 1 or pp < 1:
        problems.append(f"tp={tp} and pp={pp} must be >= 1")
    else:
        for what, n in (
            ("num_attention_heads", hf_config.num_attention_heads),
            ("num_key_value_heads", hf_config.num_key_value_heads),
            ("intermediate_size", hf_config.intermediate_size),
            ("hidden_size", hf_config.hidden_size),
        ):
            if n % tp:
                problems.append(f"tp={tp} does not divide {what}={n}")
        if hf_config.num_hidden_layers % pp and not (
                uneven_pipeline and min(pipeline_split(hf_config.num_hidden_layers, pp)) >= 1):
            problems.append(f"pp={pp} does not divide num_hidden_layers="
                            f"{hf_config.num_hidden_layers}" + ("" if uneven_pipeline else
                                                                " (only distillation splits unevenly)"))
        if padded_vocab_size(hf_config.vocab_size) % tp:
            problems.append(f"tp={tp} does not divide the padded vocabulary")
    if problems:
        raise ValueError("invalid parallel sizes: " + "; ".join(problems))


# ---------------------------------------------------------------- weight mapping table


@dataclass(frozen=True)
class Mapping:
    megatron: str  # name in the (TP=1, PP=1) Megatron state dict; {i} = layer index
    hf: tuple[str, ...]  # HF names it is made of
    kind: str = "copy"  # copy | qkv | gate_up | vocab


L = "decoder.layers.{i}."
H = "model.layers.{i}."
MAPPINGS: tuple[Mapping, ...] = (
    Mapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    Mapping(L + "self_attention.linear_qkv.weight",
            (H + "self_attn.q_proj.weight", H + "self_attn.k_proj.weight",
             H + "self_attn.v_proj.weight"), "qkv"),
    Mapping(L + "self_attention.q_layernorm.weight", (H + "self_attn.q_norm.weight",)),
    Mapping(L + "self_attention.k_layernorm.weight", (H + "self_attn.k_norm.weight",)),
    Mapping(L + "self_attention.linear_proj.weight", (H + "self_attn.o_proj.weight",)),
    Mapping(L + "post_attention_layernorm.weight", (H + "post_attention_layernorm.weight",)),
    Mapping(L + "mlp.linear_fc1.weight", (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"),
            "gate_up"),
    Mapping(L + "mlp.linear_fc2.weight", (H + "mlp.down_proj.weight",)),
    Mapping(L + "post_feedforward_layernorm.weight", (H + "post_feedforward_layernorm.weight",)),
    Mapping("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Mapping("output_layer.weight", ("lm_head.weight",), "vocab"),
)


def expand(num_layers: int) -> list[tuple[str, tuple[str, ...], str]]:
    """The table with {i} filled in: (megatron name, hf names, kind) for every tensor."""
    out = []
    for m in MAPPINGS:
        layers = range(num_layers) if "{i}" in m.megatron else [None]
        for i in layers:
            out.append((m.megatron.format(i=i), tuple(h.format(i=i) for h in m.hf), m.kind))
    return out


def row_blocks(kind: str, hf_config, copy_rows: int = 0) -> tuple[int, list[tuple[int, int, int, int]]]:
    """How a Megatron tensor is laid out from its HF tensors, as blocks of whole rows:
    (rows of the Megatron tensor, [(hf index, hf row start, hf row end, megatron row start)]).
    Every Olmo 3 transform is such a row placement (rows not covered are vocab padding, zero);
    import reads each block straight into place and export slices the blocks back out."""
    c = hf_config
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if kind == "copy":  # ``copy_rows``: the tensor's first dimension (elements of a 1-D tensor)
        return copy_rows, [(0, 0, copy_rows, 0)]
    if kind == "vocab":
        return padded_vocab_size(c.vocab_size), [(0, 0, c.vocab_size, 0)]
    if kind == "gate_up":  # megatron's GLU: first half is the gate (activation applied)
        f = c.intermediate_size
        return 2 * f, [(0, 0, f, 0), (1, 0, f, f)]
    if kind == "qkv":  # per query group: [the group's q heads, its k head, its v head]
        ng, per = c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads
        blocks, row = [], 0
        for g in range(ng):
            blocks.append((0, g * per * d, (g + 1) * per * d, row))
            blocks.append((1, g * d, (g + 1) * d, row + per * d))
            blocks.append((2, g * d, (g + 1) * d, row + (per + 1) * d))
            row += (per + 2) * d
        return row, blocks
    raise ValueError(f"unknown mapping kind {kind!r}")


def to_megatron(kind: str, tensors: list[torch.Tensor], hf_config) -> torch.Tensor:
    rows, blocks = row_blocks(kind, hf_config, tensors[0].shape[0])
    out = tensors[0].new_zeros(rows, *tensors[0].shape[1:])
    for i, s, e, d in blocks:
        out[d:d + e - s] = tensors[i][s:e]
    return out


def to_hf(kind: str, tensor: torch.Tensor, hf_config) -> list[torch.Tensor]:
    _, blocks = row_blocks(kind, hf_config, tensor.shape[0])
    n = max(b[0] for b in blocks) + 1
    parts = [[tensor[d:d + e - s] for i, s, e, d in blocks if i == j] for j in range(n)]
    return [p[0] if len(p) == 1 else torch.cat(p) for p in parts]


def hf_shapes(hf_config) -> dict[str, tuple[int, ...]]:
    """Expected shape of every HF tensor (to validate a checkpoint before converting it)."""
    c = hf_config
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    h, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,),
              "lm_head.weight": (v, h)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (c.num_attention_heads * d, h),
            p + "self_attn.k_proj.weight": (c.num_key_value_heads * d, h),
            p + "self_attn.v_proj.weight": (c.num_key_value_heads * d, h),
            p + "self_attn.o_proj.weight": (h, c.num_attention_heads * d),
            p + "self_attn.q_norm.weight": (c.num_attention_heads * d,),
            p + "self_attn.k_norm.weight": (c.num_key_value_heads * d,),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
            p + "post_feedforward_layernorm.weight": (h,),
        }
    return shapes
