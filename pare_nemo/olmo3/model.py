"""Olmo 3 as a Megatron-Core model.

Computes exactly what ``transformers.Olmo3ForCausalLM`` computes, with megatron-core's tensor- and
pipeline-parallel layers:

    h   = x + post_attention_layernorm(attn(x))          # post-norm, no pre-norms
    out = h + post_feedforward_layernorm(mlp(h))         # SwiGLU
    attn: q = q_norm(W_q x), k = k_norm(W_k x)           # RMSNorm over the *whole* q / k projection
          RoPE per layer type (default theta for sliding layers, YaRN for full layers)
          sliding-window (``sliding_window`` tokens, self included) or full causal attention

Only the pieces Olmo 3 needs are Pare's own (the layer, the QK norm, the core attention, the RMS
norm); the projections, MLP, embedding, output layer, block and GPTModel are megatron-core's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache, partial

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    BaseTransformerLayer,
    get_transformer_layer_offset,
)
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from megatron.core.utils import make_viewless_tensor

SLIDING, FULL = "sliding_attention", "full_attention"


def have_te() -> bool:
    """Transformer Engine is used only when it imports (never a hard dependency)."""
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear  # noqa: F401
    except Exception:
        return False
    return True


def fusions() -> dict[str, bool]:
    """megatron's fused kernels that apply to Olmo 3, each on where it runs (config fields):

    - ``bias_activation_fusion``: megatron's SwiGLU as one autograd Function compiled by
      ``torch.compile`` (saves only the fc1 output). Same function as the plain SwiGLU (fp32:
      equal values, gradients within 1 ulp; bf16 is rounded once instead of twice). GPU only: on
      CPU it would be compiled in every process (seconds each) for no gain.
    - ``gradient_accumulation_fusion``: weight gradients accumulated straight into megatron DDP's
      fp32 ``main_grad`` (so the model must be wrapped in megatron's DDP to backprop). GPTModel's
      output layer is always megatron's ColumnParallelLinear, which needs apex's
      ``fused_weight_gradient_mlp_cuda`` for it (TE's linears have their own).
    - ``apply_rope_fusion``: TE's fused RoPE. Only positions 0..s-1 per row: document ids
      (per-token positions) need it off (the layer refuses the pair), so callers packing documents
      pass ``apply_rope_fusion=False``.
    """
    cuda = torch.cuda.is_available()
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
        apex_wgrad = True
    except Exception:
        apex_wgrad = False
    return dict(bias_activation_fusion=cuda, gradient_accumulation_fusion=cuda and apex_wgrad,
                apply_rope_fusion=cuda and have_te())


@dataclass
class Olmo3TransformerConfig(TransformerConfig):
    """megatron-core's TransformerConfig plus what Olmo 3 adds, kept per layer so depth pruning
    can drop layers and keep each remaining layer's attention type and RoPE."""

    layer_types: list[str] = field(default_factory=list)
    sliding_window: int = 4096
    rope_parameters: dict = field(default_factory=dict)  # {layer_type: HF rope dict}
    head_dim: int = 128
    max_position_embeddings: int = 65536

    def __post_init__(self):
        super().__post_init__()
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers"
            )
        unknown = set(self.layer_types) - {SLIDING, FULL}
        if unknown:
            raise ValueError(f"unknown layer types {sorted(unknown)}; expected {SLIDING}/{FULL}")


# ---------------------------------------------------------------- RoPE (per layer type)


@lru_cache(maxsize=None)
def _rope_cached(rope_items: tuple, head_dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    from transformers import Olmo3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = dict(rope_items)
    hf = Olmo3Config(
        head_dim=head_dim,
        hidden_size=head_dim,
        num_attention_heads=1,
        max_position_embeddings=max_pos,
        rope_parameters={SLIDING: rope, FULL: rope},
    )
    if rope.get("rope_type", "default") == "default":
        inv_freq = 1.0 / (
            rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)
        )
        return inv_freq, 1.0
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, "cpu", layer_type=FULL)
    return inv_freq.float(), float(attention_factor)


def rope_for_layer_type(config: Olmo3TransformerConfig, layer_type: str):
    """(inv_freq, attention_factor) computed by transformers' own RoPE init functions."""
    rope = config.rope_parameters[layer_type]
    items = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in rope.items()))
    return _rope_cached(items, config.head_dim, config.max_position_embeddings)


# ---------------------------------------------------------------- norms


class _RMSNormFunction(torch.autograd.Function):
    """``weight * x / rms(x)`` over the last ``dims`` dimensions, with transformers' numerics
    (statistics in fp32, weight applied in fp32, result cast back to x's dtype), saving for
    backward only x in its own dtype, the per-row ``rstd`` (fp32, one value per row) and the
    weight: an eager fp32 RMSNorm keeps two fp32 copies of x for autograd (4x the bf16 bytes).

    ``group`` (tensor parallelism: each rank holds part of every row): the sum of squares is
    all-reduced over it and divided by ``size``, the full row length. Backward, with
    ``xhat = x * rstd`` and ``gw = grad * weight`` (rows of length ``size``)::

        d weight = sum over rows of grad * xhat                    (this rank's slice)
        d x      = rstd * (gw - xhat * sum(gw * xhat) / size)

    where ``sum(gw * xhat)`` runs over the full row, so it is all-reduced over ``group`` too
    (it is the gradient reaching the all-reduced sum of squares).
    """

    @staticmethod
    def forward(ctx, x, weight, eps, dims, group, size):
        dtype = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for gradcheck
        red = tuple(range(-dims, 0))
        xf = x.to(dtype)
        if group is None:
            mean_sq = xf.pow(2).mean(red, keepdim=True)
            size = math.prod(x.shape[-dims:])
        else:
            mean_sq = xf.pow(2).sum(red, keepdim=True)
            torch.distributed.all_reduce(mean_sq, group=group)
            mean_sq = mean_sq / size
        rstd = torch.rsqrt(mean_sq + eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.dims, ctx.group, ctx.size = dims, group, size
        return (weight * (xf * rstd)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        red = tuple(range(-ctx.dims, 0))
        xhat = x.to(rstd.dtype) * rstd
        grad = grad.to(rstd.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            rows = tuple(range(x.dim() - ctx.dims))
            grad_w = (grad * xhat).sum(rows).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            gw = grad * weight
            dot = (gw * xhat).sum(red, keepdim=True)
            if ctx.group is not None:
                torch.distributed.all_reduce(dot, group=ctx.group)
            grad_x = (rstd * (gw - xhat * (dot / ctx.size))).to(x.dtype)
        return grad_x, grad_w, None, None, None, None


def rms_norm(x, weight, eps: float, dims: int = 1, group=None, size: int | None = None):
    """RMSNorm of ``x`` over its last ``dims`` dimensions (``weight``: their shape); see
    :class:`_RMSNormFunction` for ``group`` / ``size`` (tensor-parallel rows)."""
    return _RMSNormFunction.apply(x, weight, eps, dims, group, size)


class Olmo3RMSNorm(torch.nn.Module):
    """RMSNorm with transformers' exact numerics (fp32 statistics, weight applied in fp32)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.config = config
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Olmo3QKNorm(MegatronModule):
    """RMSNorm over the whole q (or k) projection, i.e. over all heads, before RoPE.

    Input is megatron's per-rank ``[s, b, heads_local, head_dim]``. Under tensor parallelism each rank
    holds some heads, so the sum of squares is all-reduced across the TP group, and so is the
    full-row term of its backward (:class:`_RMSNormFunction`), so gradients are exact too.

    The weight is full-size (all heads) and replicated on every TP rank; each rank multiplies by its
    heads' slice (``narrow``, so its gradient lands in that slice, zeros elsewhere). megatron's
    ``finalize_model_grads`` sums every ``q_layernorm``/``k_layernorm`` gradient over TP when
    ``config.qk_layernorm`` (which SelfAttention needs to build these norms): the sum of the ranks'
    partial gradients is the exact full gradient, the same on every rank, so the replicas stay in
    sync. (A TP-sharded weight would get different heads' gradients added there.) A training loop
    that skips ``finalize_model_grads`` must do that TP sum itself.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, kind="q"):
        super().__init__(config=config)
        from megatron.core import parallel_state as ps

        self.tp_group = ps.get_tensor_model_parallel_group()
        tp = ps.get_tensor_model_parallel_world_size()
        heads = config.num_attention_heads if kind == "q" else config.num_query_groups
        self.full_size = heads * config.kv_channels
        self.local_size = self.full_size // tp
        self.offset = ps.get_tensor_model_parallel_rank() * self.local_size
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(self.full_size, dtype=config.params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # over [heads, head_dim] as they come (no flattening copy): k (and q without GQA) is a
        # strided view of the fused QKV output, alive for backward anyway (v is a view of it too),
        # so saving it costs nothing; megatron's GQA q is its own bf16 copy, saved as it is.
        weight = self.weight.narrow(0, self.offset, self.local_size).view(x.shape[-2:])
        tp = torch.distributed.is_initialized() and \
            torch.distributed.get_world_size(self.tp_group) > 1
        return rms_norm(x, weight, self.eps, dims=2, group=self.tp_group if tp else None,
                        size=self.full_size)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The full weight, replicated over TP and DP: replica id (0, tp rank, dp rank), so only
        TP rank 0 of DP rank 0 writes it; loads from checkpoints saved TP-sharded too (same
        global tensor)."""
        from megatron.core import parallel_state as ps

        sd = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            sd, prefix, {}, sharded_offsets, tp_group=self.tp_group,
            dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        )


# ---------------------------------------------------------------- core attention
#
# Document masking. A packed row holds several documents; ``attention_mask`` (megatron's argument,
# passed by GPTModel -> TransformerBlock -> layer -> SelfAttention -> core attention unchanged)
# may be an integer tensor of *document ids* [b, s]: a maximal run of equal ids in a row is one
# document (``document_ids`` makes them from EOS tokens). Then every token attends only to earlier
# tokens of its own document (and within the sliding window on sliding layers), and the layer
# restarts RoPE positions at 0 for each document, so a packed document gets the logits it gets
# alone. ``attention_mask=None``: the whole row is one sequence. (megatron's [b, 1, s, s] boolean
# masks are refused.)


def document_ids(tokens: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Document ids [b, s] for packed rows of ``tokens`` [b, s]: a new document starts after each
    EOS (the EOS belongs to the document it ends), as ``load_token_data(pack=True)`` packs them."""
    eos = (tokens == eos_token_id).long()
    return eos.cumsum(-1) - eos


def segments(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment index, position in segment), both [b, s], of each token; a segment is a maximal
    run of equal ids, so ids need not be sorted or contiguous numbers."""
    if doc_ids.dim() != 2 or doc_ids.dtype.is_floating_point or doc_ids.dtype == torch.bool:
        raise ValueError("attention_mask must be integer document ids [b, s] (or None); got "
                         f"{tuple(doc_ids.shape)} {doc_ids.dtype}")
    b, s = doc_ids.shape
    new = torch.ones_like(doc_ids, dtype=torch.bool)
    new[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    idx = torch.arange(s, device=doc_ids.device).expand(b, s)
    start = torch.where(new, idx, 0).cummax(dim=-1).values
    return new.long().cumsum(-1), idx - start


def _mask_mod(window: int | None, seg: torch.Tensor | None):
    """FlexAttention mask: causal, and within ``window`` tokens, and the same document."""
    def mask_mod(b, h, q_idx, kv_idx):
        keep = q_idx >= kv_idx
        if window is not None:
            keep = keep & (q_idx - kv_idx < window)
        if seg is not None:
            keep = keep & (seg[b, q_idx] == seg[b, kv_idx])
        return keep

    return mask_mod


@lru_cache(maxsize=16)
def _sliding_block_mask(window: int, q_len: int, kv_len: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    make = _compiled_create_block_mask() if device.startswith("cuda") else create_block_mask
    return make(_mask_mod(window, None), None, None, q_len, kv_len, device=device)


@lru_cache(maxsize=1)
def _compiled_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


_document_masks: dict = {}  # window -> (doc_ids, its version, BlockMask): one per forward


def _document_block_mask(window: int | None, doc_ids: torch.Tensor, q_len: int, kv_len: int):
    """The block mask for these document ids, made once per forward and shared by the layers of
    the same window (they get the same ``attention_mask`` object). On GPU ``create_block_mask`` is
    compiled, so no [b, s, s] mask is materialized; on CPU (tests) it is plain."""
    from torch.nn.attention.flex_attention import create_block_mask

    hit = _document_masks.get(window)
    if hit is not None and hit[0] is doc_ids and hit[1] == doc_ids._version:
        return hit[2]
    seg, _ = segments(doc_ids)
    make = _compiled_create_block_mask() if doc_ids.is_cuda else create_block_mask
    mask = make(_mask_mod(window, seg), doc_ids.shape[0], None, q_len, kv_len,
                device=doc_ids.device)
    _document_masks[window] = (doc_ids, doc_ids._version, mask)
    return mask


@lru_cache(maxsize=1)
def _compiled_flex():
    """FlexAttention compiled with torch's automatic dynamic shapes (``dynamic=None``): the first
    sequence length gets a static kernel (training's fixed length: the fastest), the first other
    length recompiles once with a dynamic length, and later lengths reuse that kernel.
    (``dynamic=False`` recompiled for every length until torch's recompile limit.)"""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=None)


def causal_attention(q, k, v, window: int | None, scale: float, use_flex: bool | None = None,
                     doc_ids: torch.Tensor | None = None):
    """Causal attention over [b, heads, s, d] (k/v may have fewer heads: GQA), optionally limited
    to a sliding window of ``window`` tokens (self included) and to each token's own document
    (``doc_ids`` [b, s], see ``document_ids``), without S x S scores on GPU.

    Full, one document: ``scaled_dot_product_attention(is_causal=True)`` (flash / cuDNN on GPU).
    Sliding or documents: FlexAttention with a block mask (compiled) on GPU; on CPU (tests, demo)
    SDPA with the equivalent boolean mask, the same function.
    """
    gqa = k.shape[1] != q.shape[1]
    sq, sk = q.shape[2], k.shape[2]
    if window is not None and window >= sk:
        window = None
    if window is None and doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if doc_ids is not None and tuple(doc_ids.shape) != (q.shape[0], sk):
        raise ValueError(f"document ids {tuple(doc_ids.shape)} do not match [b, s] = "
                         f"{(q.shape[0], sk)}")
    if use_flex if use_flex is not None else q.is_cuda:
        if doc_ids is None:
            mask = _sliding_block_mask(window, sq, sk, str(q.device))
        else:
            mask = _document_block_mask(window, doc_ids, sq, sk)
        return _compiled_flex()(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa)
    i = torch.arange(sq, device=q.device)[:, None]
    j = torch.arange(sk, device=q.device)[None, :]
    keep = i >= j
    if window is not None:
        keep = keep & (i - j < window)
    if doc_ids is not None:
        seg, _ = segments(doc_ids)
        keep = keep & (seg[:, -sq:, None] == seg[:, None, :])[:, None]  # [b, 1, sq, sk]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale, enable_gqa=gqa)


class Olmo3CoreAttention(MegatronModule):
    """megatron's core-attention slot, filled with :func:`causal_attention` for this layer's type.

    ``attention_mask``: None (one sequence per row) or integer document ids [b, s] (packed rows;
    see "Document masking" above).

    YaRN's attention factor multiplies both cos and sin in transformers, so it scales q.k by its
    square: that is folded into the softmax scale.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise NotImplementedError("context parallelism is not supported for Olmo 3 yet")
        self.layer_type = config.layer_types[layer_number - 1]
        self.window = config.sliding_window if self.layer_type == SLIDING else None
        _, attention_factor = rope_for_layer_type(config, self.layer_type)
        self.scale = attention_factor**2 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences are not supported by Olmo3CoreAttention")
        sq, b, np_, hn = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        out = causal_attention(q, k, v, self.window, self.scale, doc_ids=attention_mask)
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)


# ---------------------------------------------------------------- the post-norm layer


@dataclass
class Olmo3LayerSubmodules:
    self_attention: ModuleSpec
    mlp: object
    post_attention_layernorm: type = Olmo3RMSNorm
    post_feedforward_layernorm: type = Olmo3RMSNorm


class Olmo3TransformerLayer(MegatronModule, BaseTransformerLayer):
    """``h = x + norm(attn(x)); out = h + norm(mlp(h))``. Applies its own layer type's RoPE.

    What megatron's TransformerBlock expects of a layer that is not its ``TransformerLayer``:

    - forward takes the TransformerLayer keyword arguments (``hidden_states``, ``attention_mask``,
      ``context``, ``rotary_pos_emb``, ...) and returns ``(hidden_states, context)``.
    - ``attention_mask``: None, or document ids [b, s] for packed rows (see "Document masking"
      above): RoPE positions restart at 0 per document, and the core attention masks across
      documents. It reaches the layer unchanged from ``GPTModel.forward(attention_mask=...)``.
    - Full activation recompute (``recompute_granularity="full"``): megatron's
      ``recompute.checkpointed_forward`` calls non-TransformerLayer layers without ``context``
      and keeps the first item of a returned tuple, i.e. the hidden states; the layer is rerun
      in backward, under the same RNG state, by ``tensor_parallel.checkpoint``. Both call
      conventions are covered by tests/test_training.py (gradients equal transformers').
    - Selective recompute (``recompute_granularity="selective"``): ``"core_attn"`` is done by
      megatron's SelfAttention, ``"mlp"`` by this layer (as TransformerLayer does); the other
      modules do not exist in this layer and are refused.
    - Sequence parallelism: hidden states arrive as ``[s/tp, b, h]``; the QKV / fc1 linears
      all-gather them and the proj / fc2 linears reduce-scatter, so RoPE is built for the full
      ``s`` (the length of GPTModel's ``rotary_pos_emb``). The norm weights are marked
      ``sequence_parallel`` so megatron's finalize_model_grads all-reduces their gradients.
      (finalize_model_grads also sums the QK norms' gradients over TP: Olmo3QKNorm's replicated
      weights get partial gradients per rank, so that sum is exact.)
    """

    RECOMPUTE_MODULES = {"core_attn", "mlp"}

    def __init__(self, config: Olmo3TransformerConfig, submodules: Olmo3LayerSubmodules,
                 layer_number: int = 1, pg_collection=None, vp_stage=None, **kwargs):
        super().__init__(config=config)
        from megatron.core.process_groups_config import ProcessGroupCollection

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.layer_number = layer_number + get_transformer_layer_offset(
            config, vp_stage, torch.distributed.get_rank(pg_collection.pp)
            if torch.distributed.is_initialized() else 0
        )
        self.layer_type = config.layer_types[self.layer_number - 1]
        self.self_attention = build_module(
            submodules.self_attention, config=config, layer_number=self.layer_number,
            pg_collection=pg_collection,
        )
        self.post_attention_layernorm = submodules.post_attention_layernorm(
            config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
        )
        self.mlp = submodules.mlp(config=config, pg_collection=pg_collection, is_mtp_layer=False)
        self.post_feedforward_layernorm = submodules.post_feedforward_layernorm(
            config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
        )
        # RoPE frequencies stay fp32 whatever the module's dtype: a plain attribute, not a buffer,
        # so Float16Module / .bfloat16() / .to(dtype) leave it alone (as megatron's
        # RotaryEmbedding does). In bf16 the angle at position 4096 would be off by up to 1.7 rad.
        inv_freq, _ = rope_for_layer_type(config, self.layer_type)
        self.inv_freq = inv_freq.to(torch.float32).clone()
        self.recompute_mlp = False
        if config.recompute_granularity == "selective":
            unsupported = set(config.recompute_modules) - self.RECOMPUTE_MODULES
            if unsupported:
                raise ValueError(f"recompute_modules {sorted(unsupported)} do not apply to Olmo 3's"
                                 f" layer; supported: {sorted(self.RECOMPUTE_MODULES)}")
            self.recompute_mlp = "mlp" in config.recompute_modules
        self.skip = False  # identity when True: importance's layer_loss skips one layer at a time

    def rotary_freqs(self, seq_len: int, device, positions: torch.Tensor | None = None):
        """RoPE angles, always computed in fp32: [s, 1, 1, head_dim] for positions 0..s-1, or
        [s, b, 1, head_dim] for per-token ``positions`` [b, s]."""
        if self.inv_freq.device != torch.device(device):
            self.inv_freq = self.inv_freq.to(device)  # once: the layer stays on its device
        if positions is None:
            pos = torch.arange(seq_len, device=device, dtype=torch.float32)
            freqs = torch.outer(pos, self.inv_freq)
            return torch.cat([freqs, freqs], dim=-1)[:, None, None, :]  # [s, 1, 1, d]
        freqs = positions.t().to(torch.float32)[..., None] * self.inv_freq  # [s, b, d/2]
        return torch.cat([freqs, freqs], dim=-1)[:, :, None, :]  # [s, b, 1, d]

    def forward(self, hidden_states, attention_mask=None, context=None, rotary_pos_emb=None,
                packed_seq_params=None, inference_context=None, **kwargs):
        if packed_seq_params is not None or inference_context is not None:
            raise NotImplementedError("Olmo3TransformerLayer supports neither packed sequences nor "
                                      "megatron's inference context (KV cache)")
        if self.skip:
            return hidden_states, context
        # GPTModel's rotary embedding only tells us the full (pre-SP-split) sequence length;
        # each layer applies the RoPE of its own type.
        if rotary_pos_emb is not None:
            seq_len = rotary_pos_emb.shape[0]
        else:
            seq_len = hidden_states.shape[0] * (
                self.config.tensor_model_parallel_size if self.config.sequence_parallel else 1)
        positions = None
        if attention_mask is not None:  # document ids [b, s]: RoPE restarts at 0 per document
            if attention_mask.dim() != 2 or attention_mask.shape[1] != seq_len:
                raise ValueError(f"attention_mask must be document ids [b, {seq_len}] (or None); "
                                 f"got {tuple(attention_mask.shape)}")
            if self.config.apply_rope_fusion:
                raise NotImplementedError("document ids need apply_rope_fusion=False (per-token "
                                          "RoPE positions)")
            _, positions = segments(attention_mask)
        freqs = self.rotary_freqs(seq_len, hidden_states.device, positions)
        attn, _ = self.self_attention(hidden_states, attention_mask, rotary_pos_emb=(freqs, freqs))
        hidden_states = hidden_states + self.post_attention_layernorm(attn)
        if self.recompute_mlp and self.training:
            from megatron.core import tensor_parallel

            mlp, _ = tensor_parallel.checkpoint(self.mlp, False, hidden_states)
        else:
            mlp, _ = self.mlp(hidden_states)
        out = hidden_states + self.post_feedforward_layernorm(mlp)
        out = make_viewless_tensor(inp=out, requires_grad=out.requires_grad, keep_graph=True)
        return out, context


# ---------------------------------------------------------------- spec and model


def olmo3_layer_spec(use_te: bool | None = None) -> ModuleSpec:
    """TE linears when Transformer Engine imports, megatron-core's local ones otherwise."""
    if use_te is None:
        use_te = have_te()
    if use_te:
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear as Col,
            TERowParallelLinear as Row,
        )
    else:
        Col, Row = ColumnParallelLinear, RowParallelLinear
    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=Col,
            core_attention=Olmo3CoreAttention,
            linear_proj=Row,
            q_layernorm=partial(Olmo3QKNorm, kind="q"),
            k_layernorm=partial(Olmo3QKNorm, kind="k"),
        ),
    )
    mlp = partial(MLP.as_mlp_submodule, submodules=MLPSubmodules(linear_fc1=Col, linear_fc2=Row))
    return ModuleSpec(
        module=Olmo3TransformerLayer,
        submodules=Olmo3LayerSubmodules(self_attention=attention, mlp=mlp),
    )


def build_olmo3_model(config: Olmo3TransformerConfig, padded_vocab_size: int,
                      pre_process: bool = True, post_process: bool = True,
                      parallel_output: bool = True, use_te: bool | None = None,
                      vp_stage: int | None = None) -> GPTModel:
    """Build this pipeline rank's part of the model (model-parallel state must be initialized)."""
    from megatron.core import parallel_state as ps

    n_local = get_num_layers_to_build(config, vp_stage, ps.get_pipeline_model_parallel_rank())
    block = TransformerBlockSubmodules(
        layer_specs=[olmo3_layer_spec(use_te)] * n_local, layer_norm=Olmo3RMSNorm
    )
    sliding_theta = config.rope_parameters.get(SLIDING, {}).get("rope_theta", 10000.0)
    return GPTModel(
        config=config,
        transformer_layer_spec=block,
        vocab_size=padded_vocab_size,
        max_sequence_length=config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",  # only used for the sequence length; see the layer
        rotary_base=int(sliding_theta),
        vp_stage=vp_stage,
    )
