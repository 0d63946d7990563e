"""GPU tests (issue 8): run with ``python -m pytest tests/gpu -q -s`` on a machine with a CUDA GPU,
or ``benchmarks/gpu_suite.sh`` (see benchmarks/GPU.md). Without CUDA every module here skips at
import, with the reason, so the CPU suite collects them at no cost."""

import pytest
import torch

NO_CUDA = ("no CUDA GPU (torch.cuda.is_available() is False): tests/gpu runs on a GPU machine, "
           "see benchmarks/GPU.md")


def require_cuda():
    """Skip the calling test module when there is no GPU (call at module level)."""
    if not torch.cuda.is_available():
        pytest.skip(NO_CUDA, allow_module_level=True)


def olmo3_config(num_layers=16, hidden_size=2048, num_heads=16, num_kv_heads=8,
                 intermediate_size=5632, vocab_size=100278, sliding_window=4096):
    """An Olmo-3-shaped config, smaller: 3 sliding : 1 full layers, sliding window 4096, YaRN on
    the full layers with Olmo 3 7B's parameters (factor 8 over 8192 original positions, attention
    factor 1.2079, theta 5e5), 65536 positions, head_dim 128, Olmo 3's vocabulary size. The
    defaults (GQA, 8 KV heads) have 1.17B parameters."""
    from pare_nemo.tiny import tiny_config

    cfg = tiny_config(vocab_size=vocab_size, hidden_size=hidden_size,
                      intermediate_size=intermediate_size, num_layers=num_layers,
                      num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=128,
                      sliding_window=sliding_window, dtype="bfloat16")
    cfg.max_position_embeddings = 65536
    cfg.rope_parameters["full_attention"]["original_max_position_embeddings"] = 8192
    return cfg


def randomize_norms(model, q_scale=3.0, seed=0):
    """Random norm weights (1 + 0.2 N(0, 1), so a swapped or misplaced norm shows), q-norm weights
    times ``q_scale``: with unit q / k after their norms, q.k / sqrt(d) has std ~1 and attention
    over thousands of tokens is nearly uniform, which would hide position (RoPE / YaRN) and window
    errors; x3 makes it peaked (std ~3)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                w = 1 + 0.2 * torch.randn(p.shape, generator=g)
                q = "q_norm" in name or "q_layernorm" in name  # HF / Megatron names
                p.copy_(w * (q_scale if q else 1.0))
    return model
