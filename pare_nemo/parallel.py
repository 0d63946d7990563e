"""Process groups and model-parallel state, for every stage (the schedules that run on them are
:mod:`pare_nemo.engine`'s).

Under ``torchrun``/``srun`` the usual env variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
are read; without them a single local process group is made. NCCL on GPU, gloo on CPU (with the
CPU patches of :mod:`pare_nemo.cpu`).
"""

from __future__ import annotations

import gc
import os
import socket
from contextlib import contextmanager

import torch
import torch.distributed as dist

from pare_nemo.cpu import apply_cpu_patches


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cuda_device(local_rank: int, device_count: int) -> int:
    """The GPU index for the process of node-local rank ``local_rank`` that sees ``device_count``
    GPUs: ``local_rank`` where every task sees all the node's GPUs (torchrun, plain srun), 0 where
    the site binds one GPU per task (CUDA_VISIBLE_DEVICES holds one device), and in general
    ``local_rank % device_count``."""
    if device_count < 1:
        raise ValueError(f"no CUDA device visible (device_count={device_count})")
    return local_rank % device_count


def world_size() -> int:
    """The job's process count before torch.distributed starts: torchrun's WORLD_SIZE, else the
    number of srun tasks (SLURM_NTASKS), else 1. Same rule as :func:`init_distributed`."""
    if "RANK" in os.environ:
        return int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("SLURM_NTASKS", "1"))


# what tells a process it is one rank of a job (torchrun's, srun's, the rendezvous)
_JOB_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "MASTER_ADDR", "MASTER_PORT")


@contextmanager
def this_process_alone():
    """The body runs as a job of one process (``distributed`` inside it makes a local group),
    whatever launched it: for work one rank does after the job's group is gone, such as rank 0
    exporting checkpoints for the eval report while the other ranks have exited."""
    saved = {k: os.environ.pop(k) for k in _JOB_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def init_distributed(tp: int = 1, pp: int = 1, seed: int = 1234) -> None:
    """Initialize torch.distributed (if needed) and megatron-core's model-parallel groups."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    apply_cpu_patches()
    if not dist.is_initialized():
        if "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:  # srun tasks
            os.environ["RANK"] = os.environ["SLURM_PROCID"]
            os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
            os.environ["LOCAL_RANK"] = os.environ["SLURM_LOCALID"]
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
            torch.cuda.set_device(cuda_device(local_rank, torch.cuda.device_count()))
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:  # a single local process; nothing leaks into os.environ (and child processes)
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                                    rank=0, world_size=1)
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tp*pp = {tp * pp}")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(seed)


def _forget_megatron_groups() -> None:
    """Drop the references megatron keeps past ``destroy_model_parallel``: parallel_state globals
    it does not reset, and lru caches holding modules that hold groups (RotaryEmbedding.forward's
    keeps its ``self``). Otherwise those groups and their gloo threads outlive the job's group in
    a process that runs stage after stage (the demo, the search's retraining, the tests)."""
    import functools
    import sys

    for name, module in list(sys.modules.items()):
        if not name.startswith("megatron."):
            continue
        attrs = vars(module)
        for key, value in list(attrs.items()):
            if issubclass(type(value), dist.ProcessGroup):
                attrs[key] = None
            elif isinstance(value, functools._lru_cache_wrapper):
                value.cache_clear()
            elif isinstance(value, type) and value.__module__ == name:
                for member in vars(value).values():
                    if isinstance(member, functools._lru_cache_wrapper):
                        member.cache_clear()


def destroy_distributed() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    _forget_megatron_groups()
    if dist.is_initialized():
        dist.destroy_process_group()
    # A trained model, its DDP buffers and optimizer sit in reference cycles that hold the
    # process groups; each gloo group keeps its threads until the cycle is collected. Without this
    # a process that runs stage after stage (the demo, the test suite) piles up thousands of them.
    gc.collect()


@contextmanager
def distributed(tp: int = 1, pp: int = 1):
    """``with distributed(tp, pp): ...``; tears the groups down only if it created them."""
    created = not dist.is_initialized()
    try:
        init_distributed(tp, pp)
        yield
    finally:
        if created:
            destroy_distributed()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
