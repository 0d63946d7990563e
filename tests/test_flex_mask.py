"""FlexAttention block masks of pare_nemo.olmo3.model at the issue's size (S = 8192, sliding window 4096):
they equal the dense mask (element by element and block by block), they skip what the window and
the documents exclude, they can be built without an S x S tensor, and the compiled FlexAttention
kernel is not recompiled for every sequence length.

How the masks are built. ``create_block_mask`` run eagerly evaluates ``mask_mod`` over the whole
[B, H, S, S] grid (torch's ``create_mask``): at S = 8192 the sliding mask's ``q_idx - kv_idx``
alone is a 512 MiB int64 tensor, and the process's resident memory grows by ~640 MiB (measured
here). Compiled (``torch.compile(create_block_mask)``, which pare_nemo.olmo3.model uses for document masks
on GPU) it fuses the evaluation into the per-block reduction and allocates no S x S tensor: the
test below measures its peak resident memory on CPU (~0 MiB above the result, compiled in ~7 s).
The eager build is the control that shows the measurement sees S x S tensors.
"""

import gc
from pathlib import Path

import pytest
import torch

from pare_nemo.olmo3 import model as pm

S, W, BLOCK = 8192, 4096, 128
NB = S // BLOCK  # 64 blocks per side


def dense_mask(window: int, seg: torch.Tensor | None = None, s: int = S) -> torch.Tensor:
    """The reference mask [b, s, s] (what the SDPA path of ``causal_attention`` uses)."""
    i = torch.arange(s, dtype=torch.int32)[:, None]
    j = torch.arange(s, dtype=torch.int32)[None, :]
    keep = (i >= j) & (i - j < window)
    if seg is None:
        return keep[None]
    return keep & (seg[:, :, None] == seg[:, None, :])


def block_pattern(dense: torch.Tensor):
    """(any, all) over each 128 x 128 block of a dense mask: [b, NB, NB] each."""
    b = dense.shape[0]
    blocks = dense.view(b, NB, BLOCK, NB, BLOCK)
    return blocks.any(4).any(2), blocks.all(4).all(2)


def from_indices(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """BlockMask's (num blocks, indices) [b, 1, NB], [b, 1, NB, NB] -> dense [b, NB, NB]."""
    out = torch.zeros(num.shape[0], NB, NB, dtype=torch.bool)
    for b in range(num.shape[0]):
        for q in range(NB):
            out[b, q, idx[b, 0, q, : num[b, 0, q]].long()] = True
    return out


def check_against_dense(bm, dense: torch.Tensor, seg: torch.Tensor | None):
    """Element level: the block mask's mask_mod over the full grid equals ``dense``. Block level:
    the listed blocks are exactly the blocks with any kept element, the 'full' ones (no mask_mod
    applied in them) exactly those with all elements kept."""
    assert bm.BLOCK_SIZE == (BLOCK, BLOCK) and bm.seq_lengths == (S, S)
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    for b in range(dense.shape[0]):
        assert torch.equal(bm.mask_mod(torch.tensor(b), torch.tensor(0), i, j), dense[b])
    any_, all_ = block_pattern(dense)
    partial = from_indices(bm.kv_num_blocks, bm.kv_indices)
    full = from_indices(bm.full_kv_num_blocks, bm.full_kv_indices)
    assert not (partial & full).any()
    assert torch.equal(full, all_)
    assert torch.equal(partial, any_ & ~all_)
    assert torch.equal(bm.to_dense()[:, 0].bool(), any_)


def test_sliding_block_mask_8192():
    bm = pm._sliding_block_mask(W, S, S, "cpu")
    check_against_dense(bm, dense_mask(W), None)
    # structure: query block q sees key blocks q-32..q (a 4096-token window spans 32 blocks and
    # is not block aligned): the diagonal block and block q-32 are partial, the 31 between full
    q = torch.arange(NB)
    total = bm.kv_num_blocks[0, 0] + bm.full_kv_num_blocks[0, 0]
    assert torch.equal(total, torch.minimum(q, torch.tensor(W // BLOCK)) + 1)
    assert bm.kv_num_blocks[0, 0, W // BLOCK:].eq(2).all()
    assert bm.full_kv_num_blocks[0, 0, W // BLOCK:].eq(W // BLOCK - 1).all()
    visited = total.sum().item()
    print(f"sliding S={S} W={W}: {visited} of {NB * (NB + 1) // 2} causal blocks visited "
          f"({visited / (NB * NB):.2f} of all)")


def doc_ids() -> torch.Tensor:
    """Two packed rows: documents longer and shorter than the window, boundaries not aligned to
    blocks."""
    rows = [[5000, 1000, 2192], [100, 4100, 1500, 2492]]
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r))
                        for r in rows])


def test_document_block_mask_8192():
    ids = doc_ids()
    seg, _ = pm.segments(ids)
    bm = pm._document_block_mask(W, ids, S, S)
    dense = dense_mask(W, seg)
    check_against_dense(bm, dense, seg)
    # a query block inside the third document of row 0 (tokens 6000..8191) visits no key block
    # of the earlier documents: its first key block is the one holding token 6000
    for q in range(6016 // BLOCK, NB):
        first = min(bm.kv_indices[0, 0, q, : bm.kv_num_blocks[0, 0, q]].min().item(),
                    bm.full_kv_indices[0, 0, q, : bm.full_kv_num_blocks[0, 0, q]].min().item()
                    if bm.full_kv_num_blocks[0, 0, q] else NB)
        assert first == 6000 // BLOCK
    sliding = pm._sliding_block_mask(W, S, S, "cpu")
    fewer = (bm.kv_num_blocks + bm.full_kv_num_blocks).sum((1, 2))
    assert (fewer < (sliding.kv_num_blocks + sliding.full_kv_num_blocks).sum()).all()


def _rss_mib():
    status = Path("/proc/self/status").read_text().split("\n")
    get = {line.split(":")[0]: int(line.split()[1]) for line in status if line[:5] in ("VmRSS", "VmHWM")}
    return get["VmRSS"] / 1024, get["VmHWM"] / 1024


def peak_extra_mib(fn):
    """``fn()`` and how far the process's resident memory peaked above where it started (MiB):
    the kernel's high-water mark, reset through /proc/self/clear_refs just before."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    start, _ = _rss_mib()
    out = fn()
    return out, _rss_mib()[1] - start


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_compiled_block_masks_need_no_s_by_s_tensor():
    """pare_nemo.olmo3.model's compiled create_block_mask (used for document masks on GPU) builds the
    S = 8192 masks with a peak far below one S x S bool (64 MiB), and gives the eager masks."""
    from torch.nn.attention.flex_attention import create_block_mask

    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as e:
        pytest.skip(f"cannot reset the resident-memory high-water mark: {e}")
    compiled = pm._compiled_create_block_mask()
    seg, _ = pm.segments(doc_ids())
    cases = {"sliding": (pm._mask_mod(W, None), None), "documents": (pm._mask_mod(W, seg), 2)}
    sxs_bool = S * S / 2**20
    for name, (mod, b) in cases.items():
        def build(make=compiled):
            return make(mod, b, None, S, S, device="cpu")

        build()  # compile (static shapes; ~7 s on 2 cores)
        bm, peak = peak_extra_mib(build)
        eager, eager_peak = peak_extra_mib(lambda: build(create_block_mask))
        print(f"{name} block mask S={S}: peak extra resident memory compiled {peak:.0f} MiB, "
              f"eager {eager_peak:.0f} MiB (one S x S bool: {sxs_bool:.0f} MiB)")
        assert eager_peak > sxs_bool  # the measurement sees S x S tensors
        assert peak < sxs_bool / 4
        for a in ("kv_num_blocks", "full_kv_num_blocks"):
            assert torch.equal(getattr(bm, a), getattr(eager, a))
        assert torch.equal(bm.to_dense(), eager.to_dense())


def test_compiled_flex_compiles_once_for_varying_lengths():
    """``_compiled_flex`` (torch.compile(dynamic=None)): the first length gets a static kernel,
    the second a dynamic one, later lengths reuse it; for the sliding and the document paths.
    Each output equals the SDPA path's (fp32, <= 1e-5). Window 96 is used by no other test, so the
    counts do not depend on which tests ran before in the same process."""
    from torch._dynamo.utils import counters

    def graphs():
        return counters["stats"]["unique_graphs"]

    g = torch.Generator().manual_seed(0)
    for docs in (False, True):
        added = []
        for s in (256, 384, 512):
            q, k, v = (torch.randn(1, n, s, 16, generator=g) for n in (4, 2, 2))
            ids = None
            if docs:
                ids = (torch.arange(s) // 100)[None]  # documents of 100 tokens
            before = graphs()
            out = pm.causal_attention(q, k, v, 96, 0.25, use_flex=True, doc_ids=ids)
            added.append(graphs() - before)
            ref = pm.causal_attention(q, k, v, 96, 0.25, use_flex=False, doc_ids=ids)
            assert (out - ref).abs().max() <= 1e-5
        print(f"{'document' if docs else 'sliding'} path: graphs compiled at lengths "
              f"256/384/512: {added}")
        assert sum(added) <= 2 and added[2] == 0
