"""Multi-process (gloo) workers for the TP/PP tests. Functions live in a module so that
``torch.multiprocessing.spawn`` can import them in the child processes."""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

from pare_nemo.parallel import free_port

_INHERITED = []  # a forked worker's references to its parent's process groups, kept for life


def _keep_inherited_groups() -> None:
    """In a forked worker: hold on to every process group object the parent left in a module
    (``pare_nemo.parallel.destroy_distributed`` drops megatron's, so normally none). Their threads
    were not forked: freeing one here joins threads that are not this process's and hangs. Kept
    for life (the worker leaves through os._exit); inherited cycles are never collected here."""
    import gc
    import sys

    gc.freeze()
    pg = torch.distributed.ProcessGroup
    for name, module in list(sys.modules.items()):
        if name.startswith(("megatron", "torch.distributed", "pare_nemo", "tests")):
            _INHERITED.extend(v for v in list(vars(module).values())
                              if issubclass(type(v), pg))


def _entry(rank, world, port, fn, args, err_dir, forked=False):
    if forked:
        _keep_inherited_groups()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # (forked: the parent's OpenMP threads were not; a team of more hangs)
    try:
        fn(*args)
    except BaseException:
        Path(err_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        from pare_nemo.parallel import destroy_distributed

        destroy_distributed()


def spawn(fn, world: int, *args, tmp: Path):
    """Run ``fn(*args)`` in ``world`` gloo processes; re-raise the first rank's traceback.

    The processes are forked from this one (which has imported torch, megatron and transformers:
    ~24 s a process on 2 cores if each imported them anew), unless CUDA is initialized here (a
    forked child cannot use it): then spawned."""
    err_dir = Path(tmp) / "errors"
    err_dir.mkdir(parents=True, exist_ok=True)
    method = "spawn" if torch.cuda.is_initialized() else "fork"
    if method == "fork":
        import gc

        gc.collect()  # this process's garbage (old groups) freed here, where their threads are
    try:
        mp.start_processes(_entry, args=(world, free_port(), fn, args, str(err_dir),
                                         method == "fork"),
                           nprocs=world, start_method=method)
    except Exception as e:
        errs = "\n".join(p.read_text() for p in sorted(err_dir.glob("*.err")))
        raise AssertionError(f"distributed worker failed ({e}):\n{errs}") from e


def _forked(fn, args, kwargs):
    _keep_inherited_groups()
    torch.set_num_threads(1)  # the parent's OpenMP threads were not forked: a team of more hangs
    fn(*args, **kwargs)


def fork(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in one forked process (this one's imports, its inherited groups
    kept as :func:`spawn`'s workers do), started; the ``multiprocessing.Process``."""
    import gc
    import multiprocessing

    gc.collect()
    proc = multiprocessing.get_context("fork").Process(target=_forked, args=(fn, args, kwargs))
    proc.start()
    return proc


def logits_worker(tp, pp, ckpt, tokens, out_file, save_to=None):
    """Load ``ckpt`` at (tp, pp), write the last stage's logits, optionally save at (tp, pp)."""
    from megatron.core import parallel_state as ps

    from pare_nemo.checkpoint import (
        atomic_output_dir,
        load_model,
        read_model_config,
        save_model,
    )
    from pare_nemo.engine import forward_logits
    from pare_nemo.parallel import init_distributed

    init_distributed(tp, pp)
    model, hf_config = load_model(ckpt)
    logits = forward_logits(model, tokens, micro_batch_size=1)
    if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
        torch.save(logits, out_file)
    if save_to:
        _, padded, dtype = read_model_config(ckpt)
        with atomic_output_dir(save_to) as tmp:
            save_model(model, tmp, hf_config, padded, dtype)
