"""The Megatron-Core Olmo 3 computes what transformers' Olmo3ForCausalLM computes (fp32, <= 1e-5)."""

import pytest
import torch

from pare_nemo.engine import forward_logits
from pare_nemo.olmo3 import bridge
from pare_nemo.olmo3.model import build_olmo3_model
from pare_nemo.parallel import distributed
from pare_nemo.tiny import random_olmo3, tiny_config

S, W = 48, 8  # sequences longer than the sliding window

CASES = {
    "mha_yarn": dict(num_heads=4, num_kv_heads=4),
    "gqa_yarn": dict(num_heads=8, num_kv_heads=2, hidden_size=64, head_dim=16),
    "gqa_no_yarn": dict(num_heads=4, num_kv_heads=1, yarn=False),
    "mixed_types": dict(num_layers=5, num_heads=4, num_kv_heads=2, layer_types=[
        "full_attention", "sliding_attention", "full_attention", "sliding_attention",
        "sliding_attention"]),
    "window_ge_seq": dict(sliding_window=64),
    "head_dim_ne_hidden_over_heads": dict(num_heads=4, num_kv_heads=2, head_dim=24),
}


def megatron_from_hf(hf):
    cfg = hf.config
    mcfg = bridge.megatron_config(cfg, dtype=torch.float32, perform_initialization=False)
    model = build_olmo3_model(mcfg, bridge.padded_vocab_size(cfg.vocab_size), parallel_output=False)
    hsd, msd = hf.state_dict(), model.state_dict()
    for mname, hnames, kind in bridge.expand(cfg.num_hidden_layers):
        msd[mname].copy_(bridge.to_megatron(kind, [hsd[h] for h in hnames], cfg))
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case):
    cfg = tiny_config(vocab_size=300, **{"sliding_window": W, **CASES[case]})
    hf = random_olmo3(cfg, seed=3)
    tokens = torch.randint(0, 300, (2, S), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
    with distributed(1, 1):
        out = forward_logits(megatron_from_hf(hf), tokens, micro_batch_size=1)
    assert out.shape[-1] == bridge.padded_vocab_size(300)
    diff = (out[..., :300] - ref).abs().max().item()
    assert diff <= 1e-5, f"{case}: max |diff| = {diff}"


def test_sliding_window_matters():
    """Guard against a test that would pass with full attention everywhere."""
    cfg = tiny_config(vocab_size=300, sliding_window=W)
    hf = random_olmo3(cfg, seed=3)
    tokens = torch.randint(0, 300, (1, S), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
        cfg.sliding_window = S
        full = random_olmo3(cfg, seed=3)(tokens).logits
    assert (ref - full).abs().max() > 1e-3


def test_torch_path_chosen_without_transformer_engine():
    from pare_nemo.olmo3.model import have_te, olmo3_layer_spec

    spec = olmo3_layer_spec()
    linear = spec.submodules.self_attention.submodules.linear_qkv
    assert have_te() or linear.__module__.startswith("megatron.core.tensor_parallel")


def test_flex_sliding_window_path_equals_sdpa():
    """The GPU path for sliding layers (compiled FlexAttention with a block mask) computes the same
    function as the CPU path (SDPA with a boolean mask); checked here on CPU."""
    from pare_nemo.olmo3.model import causal_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 256, 16, generator=g) for n in (4, 2, 2))
    ref = causal_attention(q, k, v, window=32, scale=0.3, use_flex=False)
    out = causal_attention(q, k, v, window=32, scale=0.3, use_flex=True)
    assert (out - ref).abs().max() <= 1e-5
