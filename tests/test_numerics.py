"""Training-grade numerics: the RMS norms' autograd Function (pare_nemo.olmo3.model._RMSNormFunction) and
megatron's SwiGLU fusion.

- The norm computes transformers' function (fp32 statistics, weight applied in fp32): fp32 values
  equal the eager formula's bit for bit, and gradients agree to 1e-6 relative (fp32 sums in another
  order: ~1e-7). float64 gradcheck, also at TP=2 for the QK norm (gloo, 2 processes).
- It saves for backward only x in its own dtype and per-row statistics: in bf16, no fp32 copy of an
  activation is kept (the eager formula kept two fp32 copies of each norm's input).
- megatron's fused SwiGLU (``bias_activation_fusion``) computes the plain SwiGLU, with and without
  the layer's MLP recompute.
"""

import pytest
import torch

from pare_nemo.olmo3 import bridge
from pare_nemo.olmo3.model import Olmo3QKNorm, fusions, olmo3_layer_spec, rms_norm
from pare_nemo.parallel import distributed
from pare_nemo.tiny import tiny_config
from tests.dist_workers import spawn

EPS = 1e-6


def eager(x, w, dims=1):
    """The eager formula the Function replaces (what transformers' Olmo3RMSNorm computes)."""
    xf = x.float().flatten(-dims) if dims > 1 else x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
    return (w.flatten() * xf).to(x.dtype).reshape(x.shape)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def inputs(shape, wshape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(dtype).requires_grad_()
    w = (1 + torch.randn(wshape, generator=g) / 4).to(dtype).requires_grad_()
    return x, w


@pytest.mark.parametrize("dims", [1, 2])
def test_gradcheck_float64(dims):
    shape = (3, 2, 4, 5) if dims == 2 else (3, 2, 6)
    x, w = inputs(shape, shape[-dims:], torch.float64)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, EPS, dims=dims), (x, w))


@pytest.mark.parametrize("dims", [1, 2])
def test_equals_eager_fp32(dims):
    shape = (7, 3, 4, 16) if dims == 2 else (7, 3, 64)
    x, w = inputs(shape, shape[-dims:], torch.float32)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    out = rms_norm(x, w, EPS, dims=dims)
    gx, gw = torch.autograd.grad(out, (x, w), g)
    ref = eager(x, w, dims)
    rx, rw = torch.autograd.grad(ref, (x, w), g)
    if dims == 1:
        assert torch.equal(out, ref)  # the same fp32 ops in the same order
    else:
        assert rel(out, ref) <= 1e-6  # mean over two dims vs over the flattened one
    assert rel(gx, rx) <= 1e-6 and rel(gw, rw) <= 1e-6, (rel(gx, rx), rel(gw, rw))
    assert gx.dtype == x.dtype and gw.dtype == w.dtype


def test_bf16_grads_match_eager():
    """bf16 in and out, fp32 inside: the gradients round to what the eager formula gives, within
    a bf16 rounding (2^-8 relative)."""
    x, w = inputs((16, 2, 64), (64,), torch.bfloat16)
    g = torch.randn(16, 2, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    out = rms_norm(x, w, EPS)
    gx, gw = torch.autograd.grad(out, (x, w), g)
    ref = eager(x, w)
    rx, rw = torch.autograd.grad(ref, (x, w), g)
    assert torch.equal(out, ref)
    assert gx.dtype == gw.dtype == torch.bfloat16
    assert rel(gx.float(), rx.float()) <= 2**-8 and rel(gw.float(), rw.float()) <= 2**-8


# ---------------------------------------------------------------- saved activations in bf16


def saved(fn, exclude=()):
    """{storage: (bytes, dtype, numel)} of what autograd saves while running ``fn`` (parameters in
    ``exclude`` left out: they are not activations)."""
    skip = {p.untyped_storage().data_ptr() for p in exclude}
    out = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            out[st.data_ptr()] = (st.nbytes(), t.dtype, t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return out


def test_norm_saves_only_bf16_input_and_row_stats():
    s, b, h = 64, 2, 128
    x, w = inputs((s, b, h), (h,), torch.bfloat16)
    got = saved(lambda: rms_norm(x, w, EPS), exclude=[w])
    assert sum(v[0] for v in got.values()) == s * b * h * 2 + s * b * 4  # x (bf16) + rstd (fp32)
    before = saved(lambda: eager(x, w), exclude=[w])
    assert sum(v[0] for v in before.values()) >= 2 * s * b * h * 4  # two fp32 copies of x


def test_layer_keeps_no_fp32_activation():
    """One bf16 layer forward: no fp32 tensor of activation size is saved (only per-row statistics
    and attention's per-head ones), and the two post-norms alone save 6 bytes less per element of
    [s, b, h] each than with the eager formula."""
    from megatron.core.transformer.spec_utils import build_module

    s, b = 64, 2
    hf = tiny_config(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2)
    with distributed(1, 1):
        cfg = bridge.megatron_config(hf, dtype=torch.bfloat16, perform_initialization=False)
        layer = build_module(olmo3_layer_spec(False), config=cfg, layer_number=1).bfloat16()
        params = list(layer.parameters())
        x = torch.randn(s, b, hf.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        after = saved(lambda: layer(x), exclude=params)
        norms = [layer.post_attention_layernorm, layer.post_feedforward_layernorm]
        for m in norms:
            m.forward = lambda t, m=m: eager(t, m.weight)
        before = saved(lambda: layer(x), exclude=params)
    smallest = s * b * hf.num_key_value_heads * hf.head_dim  # k: the smallest activation
    assert max(n for _, dt, n in after.values() if dt == torch.float32) < smallest
    total = lambda d: sum(v[0] for v in d.values())  # noqa: E731
    assert total(before) - total(after) >= 2 * 6 * s * b * hf.hidden_size


# ---------------------------------------------------------------- QK norm at TP=2 (gloo)


def qk_norm_tp2_worker():
    """Each rank: the QK norm module over its heads (TP=2) against the whole-row norm (TP=1) of
    the same full input; then a float64 gradcheck of the full function at TP=2 (each rank sees the
    full input and output through megatron's copy / gather, which sum gradients over TP as
    finalize_model_grads does for the replicated QK-norm weight)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import (
        copy_to_tensor_model_parallel_region,
        gather_from_tensor_model_parallel_region,
    )

    from pare_nemo.parallel import init_distributed

    init_distributed(2, 1)
    rank, group = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_group()
    hf = tiny_config(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=8)
    cfg = bridge.megatron_config(hf, tp=2, dtype=torch.float32, perform_initialization=False)
    norm = Olmo3QKNorm(cfg, hidden_size=None, eps=EPS, kind="q")
    heads, d = 4, 8
    x, w = inputs((5, 2, heads, d), (heads * d,), torch.float32)  # same on both ranks
    with torch.no_grad():
        norm.weight.copy_(w)
    g = torch.randn(5, 2, heads, d, generator=torch.Generator().manual_seed(1))
    mine = slice(rank * heads // 2, (rank + 1) * heads // 2)
    xl = x.detach()[:, :, mine].clone().requires_grad_()
    out = norm(xl)
    out.backward(g[:, :, mine])
    ref = rms_norm(x, w.view(heads, d), EPS, dims=2)
    rx, rw = torch.autograd.grad(ref, (x, w), g)
    assert rel(out, ref[:, :, mine]) <= 1e-6
    assert rel(xl.grad, rx[:, :, mine]) <= 1e-6, rel(xl.grad, rx[:, :, mine])
    gw = norm.weight.grad.clone()
    assert gw[torch.arange(heads * d) // d // (heads // 2) != rank].abs().max() == 0  # other slice
    dist.all_reduce(gw, group=group)  # finalize_model_grads' TP sum
    assert rel(gw, rw) <= 1e-6, rel(gw, rw)

    def full(x, w):  # [s, b, heads, d], [heads * d] -> [s, b, heads * d], TP inside
        x, w = copy_to_tensor_model_parallel_region(x), copy_to_tensor_model_parallel_region(w)
        n = heads * d // 2
        out = rms_norm(x[:, :, mine], w[rank * n:(rank + 1) * n].view(heads // 2, d), EPS, dims=2,
                       group=group, size=heads * d)
        return gather_from_tensor_model_parallel_region(out.flatten(-2))

    x64, w64 = inputs((2, 1, heads, d), (heads * d,), torch.float64, seed=2)
    assert torch.autograd.gradcheck(full, (x64, w64))


def test_qk_norm_tp2_equals_tp1(tmp_path):
    spawn(qk_norm_tp2_worker, 2, tmp=tmp_path)


# ---------------------------------------------------------------- megatron's fused SwiGLU


def test_fusions_off_on_cpu():
    """The CPU path computes what it computed before: no fusion is switched on without CUDA."""
    if torch.cuda.is_available():
        pytest.skip("CPU only")
    assert not any(fusions().values())
    cfg = bridge.megatron_config(tiny_config(), dtype=torch.float32)
    assert not (cfg.bias_activation_fusion or cfg.gradient_accumulation_fusion
                or cfg.apply_rope_fusion)


def test_fused_swiglu_equals_plain():
    """megatron's bias_swiglu fusion (torch.compile'd) in the layer, with the MLP recomputed in
    backward, gives the plain SwiGLU layer's output and gradients (fp32: 1e-6 relative)."""
    from megatron.core.transformer.spec_utils import build_module

    hf = tiny_config(hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2)
    x = torch.randn(8, 2, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    results, state = [], None
    with distributed(1, 1):
        for fused in (False, True):
            extra = dict(recompute_granularity="selective", recompute_modules=["mlp"]) if fused \
                else {}
            cfg = bridge.megatron_config(hf, dtype=torch.float32, bias_activation_fusion=fused,
                                         **extra)
            layer = build_module(olmo3_layer_spec(False), config=cfg, layer_number=1)
            state = state or layer.state_dict()
            layer.load_state_dict(state)
            assert layer.recompute_mlp == fused
            x.grad = None
            out, _ = layer(x)
            out.square().sum().backward()  # megatron's recompute needs .backward(), not .grad()
            results.append((out.detach(), [x.grad, *(p.grad for p in layer.parameters())]))
    (out0, g0), (out1, g1) = results
    assert rel(out1, out0) <= 1e-6
    for a, b in zip(g1, g0):
        assert rel(a, b) <= 1e-6, rel(a, b)
