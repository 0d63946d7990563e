"""Run megatron-core's local (non-TE) layers on a machine without a GPU.

megatron-core hard-codes a few CUDA calls (RoPE buffers and the global memory buffer ask for
``torch.cuda.current_device()``, the RNG tracker saves and restores CUDA RNG states,
dist_checkpointing and p2p call ``torch.cuda.synchronize()``, pipeline schedules allocate a
counter with ``device="cuda"``). This module redirects exactly those to the CPU. It is applied
only when ``torch.cuda.is_available()`` is false, so GPU runs never see it.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_applied = False


class _CudaLiteralsToCpu(TorchFunctionMode):
    """Rewrites ``device="cuda"`` in tensor factories (megatron's pipeline schedules) to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if dev is not None and str(dev).startswith("cuda"):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def apply_cpu_patches() -> bool:
    """Patch megatron-core's CUDA-only calls if no GPU is present. Returns True if patched."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: None
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    _CudaLiteralsToCpu().__enter__()
    _applied = True
    return True
