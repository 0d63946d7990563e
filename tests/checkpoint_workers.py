"""Training runs that save and resume pare_nemo.checkpoint training checkpoints, for
tests/test_checkpoint_training.py. Functions live in a module so that
``torch.multiprocessing.spawn`` can import them in the child processes."""

from __future__ import annotations

import random

import numpy as np
import torch

GLOBAL_BATCH, MICRO_BATCH = 4, 1


def batch(tokens: torch.Tensor, iteration: int, dp: int, dp_rank: int) -> torch.Tensor:
    """Iteration ``iteration``'s rows of ``tokens`` (wrapping around): this DP rank's share."""
    rows = (torch.arange(GLOBAL_BATCH) + iteration * GLOBAL_BATCH) % tokens.shape[0]
    share = GLOBAL_BATCH // dp
    return tokens[rows[dp_rank * share:(dp_rank + 1) * share]]


def snapshot(model_chunks, optimizer) -> dict:
    """What a resume must restore, independent of the DP size: the model's weights (replicated
    over DP), the optimizer's fp32 main params and Adam moments in its buffer layout (gathered over
    DP by megatron), and draws from every random generator (megatron's tensor-parallel RNG tracker
    included: a draw advances it, so each snapshot sees it in another state)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from megatron.core.utils import unwrap_model

    model = unwrap_model(model_chunks[0])
    opt = optimizer.chained_optimizers[0].get_parameter_state_dp_zero(
        use_gloo_comm=True, return_on_all_ranks=True)
    with get_cuda_rng_tracker().fork():
        tracker_draw = torch.rand(4)
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items() if v is not None},
        "optimizer": {f"{b}.{k}": v.clone() for b, per_dtype in opt.items() if isinstance(b, int)
                      for state in per_dtype.values() for k, v in state.items()
                      if isinstance(v, torch.Tensor)},
        "rng": (torch.rand(4), random.random(), np.random.rand(2), tracker_draw),
    }


def train_run(ckpt, tokens, steps, train_dir, saves=(), async_saves=(), keep_last=None,
              resume=False) -> dict:
    """Train ``ckpt`` (bf16 params, fp32 main params) at TP=1, DP=world for iterations up to
    ``steps`` on fixed batches of ``tokens``; first resume from ``train_dir`` if ``resume``. Save a
    training checkpoint after the iterations in ``saves`` (synchronously) and ``async_saves``
    (megatron's async save, finalized every step). Returns the losses by iteration, a snapshot
    after every save and after the resume, and what the tracker said right after each
    asynchronous save was scheduled."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    from pare_nemo.checkpoint import (
        finalize_async_saves,
        latest_iteration,
        load_model,
        load_training_checkpoint,
        save_training_checkpoint,
    )
    from pare_nemo.config import Optimizer
    from pare_nemo.engine import setup_training, train_step
    from pare_nemo.parallel import init_distributed

    init_distributed(1, 1)
    model, hf_config = load_model(ckpt, parallel_output=True, dtype=torch.bfloat16,
                                  calculate_per_token_loss=True)
    chunks, optimizer, scheduler = setup_training(model,
                                                  Optimizer(lr=3e-3, warmup_steps=2, min_lr=3e-4),
                                                  steps)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    out = {"loss": {}, "saved": {}, "tracker_when_scheduled": {}}
    start = 0
    if resume:
        state = load_training_checkpoint(train_dir, chunks, optimizer, scheduler)
        start = state["iteration"]
        out["resumed"] = {"state": state, **snapshot(chunks, optimizer)}
    queue = AsyncCallsQueue() if async_saves else None
    for it in range(start, steps):
        tok = batch(tokens, it, dp, dp_rank)
        out["loss"][it] = train_step(chunks, optimizer, scheduler, tok,
                                     torch.ones_like(tok, dtype=torch.bool),
                                     hf_config.vocab_size, micro_batch_size=MICRO_BATCH).loss
        if queue is not None:
            finalize_async_saves(queue)
        if it + 1 in saves or it + 1 in async_saves:
            state = {"iteration": it + 1, "consumed_samples": (it + 1) * GLOBAL_BATCH}
            save_training_checkpoint(train_dir, it + 1, chunks, optimizer, scheduler, state,
                                     keep_last=keep_last,
                                     async_queue=queue if it + 1 in async_saves else None)
            if it + 1 in async_saves:
                out["tracker_when_scheduled"][it + 1] = latest_iteration(train_dir)
            out["saved"][it + 1] = snapshot(chunks, optimizer)
    if queue is not None:
        finalize_async_saves(queue, blocking=True)
    return out


def run_and_resume(ckpt, tokens, steps, train_dir, out_file):
    """Run A: train for ``steps`` iterations, saving after 2 and 3 and, asynchronously, 4,
    keeping the last 2. Run B, in the same processes with everything rebuilt (model, optimizer,
    scheduler, parallel state, RNG tracker) and the global RNGs reseeded: resume from the last
    checkpoint and train to ``steps``. Rank 0 writes both runs' results."""
    import torch.distributed as dist

    a = train_run(ckpt, tokens, steps, train_dir, saves=(2, 3), async_saves=(4,), keep_last=2)
    torch.manual_seed(1000)  # only the checkpoint can put the generators back where A had them
    random.seed(1000)
    np.random.seed(1000)
    b = train_run(ckpt, tokens, steps, train_dir, resume=True)
    if dist.get_rank() == 0:
        torch.save({"a": a, "b": b}, out_file)
