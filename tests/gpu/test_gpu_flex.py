"""FlexAttention (compiled, block masks) vs SDPA with the dense boolean mask, on CUDA in bf16, through
``pare_nemo.olmo3.model.causal_attention(use_flex=True / False)``: sliding window 4096 at S = 8192, and
packed documents; outputs and gradients. Also: the compiled kernel is not recompiled for every
sequence length, and the block masks are built without an S x S tensor on the GPU.

Tolerances. Neither bf16 kernel is exact, so both are compared with an fp32 reference (SDPA with
the dense mask on fp32 inputs): Flex's error may be at most 1.5x SDPA's mean error and 2x its max
error (+1e-3, below the bf16 spacing 2**-8 of outputs ~1). A wrong mask (window off, a document
boundary ignored) changes outputs by O(0.1-1): the guard checks the sliding output differs from
plain causal attention by more than 0.05.
"""

import pytest
import torch

from tests.gpu import require_cuda

require_cuda()

S, W, HEADS, KV_HEADS, D = 8192, 4096, 16, 8, 128
SCALE = 3 / D**0.5  # q.k / sqrt(d) x 3: peaked attention, so the mask matters


def qkv(b, s, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(b, h, s, D, device="cuda", generator=g, dtype=torch.bfloat16)
            for h in (HEADS, KV_HEADS, KV_HEADS)]


def run(q, k, v, grad, window, doc_ids, use_flex, dtype):
    """Output and (dq, dk, dv) of causal_attention on copies of q, k, v in ``dtype``."""
    from pare_nemo.olmo3.model import causal_attention

    x = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = causal_attention(*x, window, SCALE, use_flex=use_flex, doc_ids=doc_ids)
    out.backward(grad.to(dtype))
    return [out.detach().float()] + [t.grad.float() for t in x]


def compare(window, doc_ids, b):
    q, k, v = qkv(b, S, seed=b)
    grad = torch.randn(b, HEADS, S, D, device="cuda", dtype=torch.bfloat16)
    ref = run(q, k, v, grad, window, doc_ids, False, torch.float32)
    sdpa = run(q, k, v, grad, window, doc_ids, False, torch.bfloat16)
    flex = run(q, k, v, grad, window, doc_ids, True, torch.bfloat16)
    for name, r, s_, f in zip(("out", "dq", "dk", "dv"), ref, sdpa, flex):
        es, ef = (s_ - r).abs(), (f - r).abs()
        print(f"  {name}: |flex - fp32| max {ef.max():.2e} mean {ef.mean():.2e}; "
              f"|sdpa - fp32| max {es.max():.2e} mean {es.mean():.2e}; "
              f"|flex - sdpa| max {(f - s_).abs().max():.2e}")
        assert ef.mean() <= 1.5 * es.mean() + 1e-3, name
        assert ef.max() <= 2 * es.max() + 1e-3, name
    return ref[0]


def test_flex_equals_sdpa_sliding_window_8192():
    print(f"\nsliding window {W}, S={S}, bf16, {HEADS} heads / {KV_HEADS} KV heads")
    out = compare(W, None, 1)
    q, k, v = qkv(1, S, seed=1)
    from pare_nemo.olmo3.model import causal_attention

    with torch.no_grad():
        plain = causal_attention(q.float(), k.float(), v.float(), None, SCALE)
    assert (plain - out).abs().max() > 0.05  # the window matters


def test_flex_equals_sdpa_documents_8192():
    rows = [[5000, 1000, 2192], [100, 4100, 1500, 2492]]
    ids = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r))
                       for r in rows]).cuda()
    print(f"\ndocuments {rows}, sliding window {W}, S={S}, bf16")
    compare(W, ids, 2)


def _graphs():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("docs", [False, True], ids=["sliding", "documents"])
def test_compiled_once_for_varying_lengths(docs):
    """torch.compile(dynamic=None): the first length compiles static kernels, the second dynamic
    ones, later lengths compile nothing (the document path also compiles create_block_mask, so up
    to 4 graphs there). Window 512 is used by no other test."""
    from pare_nemo.olmo3.model import causal_attention

    added = []
    for s in (1024, 1536, 2048, 2560):
        q, k, v = qkv(1, s, seed=s)
        ids = (torch.arange(s, device="cuda") // 700)[None] if docs else None
        before = _graphs()
        with torch.no_grad():
            causal_attention(q, k, v, 512, SCALE, use_flex=True, doc_ids=ids)
        added.append(_graphs() - before)
    print(f"\n{'document' if docs else 'sliding'} path: graphs compiled at lengths "
          f"1024/1536/2048/2560: {added}")
    assert added[2:] == [0, 0] and sum(added) <= 4


def _peak_extra_mib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return out, (torch.cuda.max_memory_allocated() - start) / 2**20


@pytest.mark.parametrize("kind", ["sliding", "documents"])
def test_block_masks_without_s_by_s_tensor(kind):
    """Building the S = 8192 block mask allocates far less than one S x S bool (64 MiB) on the GPU
    (the eager create_block_mask allocates ~640 MiB there: int64 q_idx - kv_idx over the grid).
    The document mask is built by the compiled create_block_mask. The sliding mask needs
    pare_nemo.olmo3.model._sliding_block_mask to use the compiled builder on CUDA too; it fails until
    then."""
    from pare_nemo.olmo3 import model as pm

    if kind == "sliding":
        def build():
            return pm._sliding_block_mask.__wrapped__(W, S, S, "cuda")  # bypass the lru_cache
    else:
        def build():  # a new ids tensor each call: no cache hit
            ids = (torch.arange(S, device="cuda") // 3000)[None].repeat(2, 1)
            return pm._document_block_mask(W, ids, S, S)
    build()  # compile
    bm, peak = _peak_extra_mib(build)
    print(f"\n{kind} block mask S={S}: peak extra GPU memory {peak:.1f} MiB "
          f"(one S x S bool: {S * S / 2**20:.0f} MiB); kv blocks per query block "
          f"{(bm.kv_num_blocks + bm.full_kv_num_blocks)[0, 0, -1].item()}")
    assert peak < S * S / 2**20 / 4
