"""Document masking for packed rows: with document ids, each document of a packed row gets exactly
the logits it gets alone (fp32, <= 1e-5); the FlexAttention path (GPU) computes the same function
as the SDPA path (CPU) with document masks."""

import pytest
import torch

from pare_nemo.checkpoint import load_model
from pare_nemo.engine import forward_logits
from pare_nemo.olmo3.model import segments, causal_attention, document_ids
from pare_nemo.parallel import distributed

# Two packed rows of 48 tokens (> the sliding window of 8), documents ending with EOS.
ROWS = [[13, 21, 14], [30, 18]]


@pytest.fixture(scope="module")
def packed(megatron_gqa):
    """Logits of the packed rows with and without document ids, and of each document alone."""
    from pare_nemo.checkpoint import read_model_config

    cfg = read_model_config(megatron_gqa)[0]
    eos, g = cfg.eos_token_id, torch.Generator().manual_seed(0)
    docs = []
    for lengths in ROWS:
        row = []
        for n in lengths:
            body = torch.randint(0, cfg.vocab_size - 1, (n - 1,), generator=g)
            body[body >= eos] += 1  # no EOS inside a document
            row.append(torch.cat([body, torch.tensor([eos])]))
        docs.append(row)
    tokens = torch.stack([torch.cat(row) for row in docs])
    ids = document_ids(tokens, eos)
    v = cfg.vocab_size
    with distributed(1, 1):
        model, _ = load_model(megatron_gqa)
        masked = forward_logits(model, tokens, micro_batch_size=2, document_ids=ids)[..., :v]
        plain = forward_logits(model, tokens, micro_batch_size=2)[..., :v]
        alone = [[forward_logits(model, d[None])[0, :, :v] for d in row] for row in docs]
    return dict(masked=masked, plain=plain, alone=alone, ids=ids)


def _pieces(logits_row, lengths):
    return torch.split(logits_row, lengths, dim=0)


def test_each_document_gets_its_standalone_logits(packed):
    for r, lengths in enumerate(ROWS):
        for d, (got, ref) in enumerate(zip(_pieces(packed["masked"][r], lengths),
                                           packed["alone"][r])):
            diff = (got - ref).abs().max().item()
            assert diff <= 1e-5, f"row {r} document {d}: max |diff| = {diff}"


def test_without_document_ids_later_documents_differ(packed):
    """Guard: the rows really need the mask (later documents see earlier ones without it)."""
    for r, lengths in enumerate(ROWS):
        pieces = _pieces(packed["plain"][r], lengths)
        assert (pieces[0] - packed["alone"][r][0]).abs().max() <= 1e-5  # nothing before it
        for got, ref in zip(pieces[1:], packed["alone"][r][1:]):
            assert (got - ref).abs().max() > 1e-2


def test_document_ids_and_positions():
    eos = 2
    tokens = torch.tensor([[5, 2, 7, 8, 2, 9], [2, 2, 4, 4, 4, 4]])
    ids = document_ids(tokens, eos)
    assert ids.tolist() == [[0, 0, 1, 1, 1, 2], [0, 1, 2, 2, 2, 2]]
    seg, pos = segments(ids)
    assert pos.tolist() == [[0, 1, 0, 1, 2, 0], [0, 0, 0, 1, 2, 3]]
    # documents are runs of equal ids: a repeated id later in the row is a new document
    seg, pos = segments(torch.tensor([[3, 3, 1, 3]]))
    assert seg.tolist() == [[1, 1, 2, 3]] and pos.tolist() == [[0, 1, 0, 0]]


def test_flex_document_path_equals_sdpa():
    """GPU path (compiled FlexAttention, mask_mod = causal & window & same document) equals the
    CPU path (SDPA with a boolean mask), per row, on CPU."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 256, 16, generator=g) for n in (4, 2, 2))
    ids = torch.cat([torch.zeros(2, 1, dtype=torch.long),
                     (torch.rand(2, 255, generator=g) < 0.02).long()], 1).cumsum(1)
    assert ids[:, -1].min() >= 2  # several documents per row
    ref = causal_attention(q, k, v, window=32, scale=0.3, use_flex=False, doc_ids=ids)
    out = causal_attention(q, k, v, window=32, scale=0.3, use_flex=True, doc_ids=ids)
    assert (out - ref).abs().max() <= 1e-5
    # the mask matters: without document ids the outputs differ
    plain = causal_attention(q, k, v, window=32, scale=0.3, use_flex=False)
    assert (plain - ref).abs().max() > 1e-2


def test_bad_document_ids_refused():
    q = k = v = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="document ids"):
        causal_attention(q, k, v, None, 0.5, doc_ids=torch.zeros(1, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="integer document ids"):
        causal_attention(q, k, v, None, 0.5, doc_ids=torch.zeros(1, 8))
