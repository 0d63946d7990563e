"""Multi-process (gloo) workers for the TP/PP tests. Functions live in a module so that
``torch.multiprocessing.spawn`` can import them in the child processes."""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

from pare_nemo.parallel import free_port


def _entry(rank, world, port, fn, args, err_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        fn(*args)
    except BaseException:
        Path(err_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        from pare_nemo.parallel import destroy_distributed

        destroy_distributed()


def spawn(fn, world: int, *args, tmp: Path):
    """Run ``fn(*args)`` in ``world`` gloo processes; re-raise the first rank's traceback."""
    err_dir = Path(tmp) / "errors"
    err_dir.mkdir(parents=True, exist_ok=True)
    try:
        mp.spawn(_entry, args=(world, free_port(), fn, args, str(err_dir)), nprocs=world)
    except Exception as e:
        errs = "\n".join(p.read_text() for p in sorted(err_dir.glob("*.err")))
        raise AssertionError(f"distributed worker failed:\n{errs}") from e


def logits_worker(tp, pp, ckpt, tokens, out_file, save_to=None):
    """Load ``ckpt`` at (tp, pp), write the last stage's logits, optionally save at (tp, pp)."""
    from megatron.core import parallel_state as ps

    from pare_nemo.checkpoint import atomic_output_dir, load_model, read_model_config, save_model
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
