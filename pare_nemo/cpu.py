"""Run megatron-core's local (non-TE) layers on a machine without a GPU.

megatron-core hard-codes a few CUDA calls (RoPE buffers and the global memory buffer ask for
``torch.cuda.current_device()``, the RNG tracker saves and restores CUDA RNG states,
dist_checkpointing and p2p call ``torch.cuda.synchronize()``, pipeline schedules allocate a
counter with ``device="cuda"``, fully parallel checkpoint loads move the shards they exchange
with ``.cuda()``; for training, DDP's gradient sync asks for
``torch.cuda.current_stream()`` to wait on CUDA-graph events, and the distributed optimizer and
gradient clipping accept only tensors whose ``.type()`` is a ``torch.cuda.*`` name). This module
redirects exactly those to the CPU. It is applied only when ``torch.cuda.is_available()`` is
false, so GPU runs never see it.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_applied = False


class _CudaLiteralsToCpu(TorchFunctionMode):
    """Rewrites ``device="cuda"`` in tensor factories (megatron's pipeline schedules) to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cuda:  # fully parallel checkpoint loads exchange shards "on GPU"
            return args[0]
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if dev is not None and str(dev).startswith("cuda"):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def _tensor_types_read_as_cuda(fn):
    """Wraps a megatron function that checks ``param.type() in ['torch.cuda.BFloat16Tensor', ...]``
    (the distributed optimizer sorting its parameters, gradient clipping asserting fp32 grads):
    during it, ``Tensor.type()`` (no arguments) of a CPU tensor answers its CUDA name
    ('torch.BFloat16Tensor' -> 'torch.cuda.BFloat16Tensor'); nothing else about tensors changes."""
    cpu_type = torch.Tensor.type

    def cuda_named_type(self, *args, **kwargs):
        name = cpu_type(self, *args, **kwargs)
        if not args and not kwargs and not name.startswith("torch.cuda."):
            name = "torch.cuda." + name.removeprefix("torch.")
        return name

    def wrapped(*args, **kwargs):
        torch.Tensor.type = cuda_named_type
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.type = cpu_type

    return wrapped


def apply_cpu_patches() -> bool:
    """Patch megatron-core's CUDA-only calls if no GPU is present. Returns True if patched."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    from megatron.core.optimizer import optimizer as moptimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: torch.cpu.current_stream()  # no-op wait_event
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: None
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    _CudaLiteralsToCpu().__enter__()
    DistributedOptimizer.__init__ = _tensor_types_read_as_cuda(DistributedOptimizer.__init__)
    moptimizer.clip_grad_by_total_norm_fp32 = _tensor_types_read_as_cuda(
        moptimizer.clip_grad_by_total_norm_fp32)
    _applied = True
    return True
