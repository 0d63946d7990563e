"""Training runs of Pare's Megatron Olmo 3 with pare_nemo.engine at any TP/DP, for
tests/test_train.py. Functions live in a module so that ``torch.multiprocessing.spawn`` can import
them in the child processes."""

from __future__ import annotations

import torch


def train_worker(tp, ckpt, tokens, mask, steps, global_batch, out_file, overlap_grad_reduce=False):
    """Train ``ckpt`` (bf16 params, fp32 main params in megatron's distributed optimizer) for
    ``steps`` iterations at TP=``tp`` and DP = world / tp, step i on rows
    [i * global_batch, (i + 1) * global_batch) of ``tokens`` (wrapping around), each DP rank taking
    its contiguous share in micro-batches of 4 (few micro-batches: few gloo round trips). Rank 0
    writes the per-step results, with how many main-param elements each rank's optimizer holds."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from pare_nemo.checkpoint import load_model
    from pare_nemo.config import Optimizer
    from pare_nemo.engine import setup_training, train_step
    from pare_nemo.parallel import init_distributed

    init_distributed(tp, 1)
    model, hf_config = load_model(ckpt, parallel_output=True, dtype=torch.bfloat16,
                                  calculate_per_token_loss=True)
    model_numel = sum(p.numel() for p in model.parameters())
    model_dtypes = {p.dtype for p in model.parameters()}
    chunks, optimizer, scheduler = setup_training(
        model, Optimizer(lr=3e-3, warmup_steps=10, min_lr=3e-4), steps,
        overlap_grad_reduce=overlap_grad_reduce)
    main = [p for g in optimizer.param_groups for p in g["params"]]
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    share = global_batch // dp
    n = tokens.shape[0]
    results = []
    for i in range(steps):
        rows = (torch.arange(global_batch) + i * global_batch) % n
        rows = rows[dp_rank * share:(dp_rank + 1) * share]
        results.append(train_step(chunks, optimizer, scheduler, tokens[rows], mask[rows],
                                  hf_config.vocab_size, micro_batch_size=4))
    held = [torch.tensor([sum(p.numel() for p in main)])
            for _ in range(dist.get_world_size())]
    dist.all_gather(held, held[0].clone())
    if dist.get_rank() == 0:
        torch.save({"loss": [r.loss for r in results], "grad_norm": [r.grad_norm for r in results],
                    "lr": [r.lr for r in results], "skipped": [r.skipped for r in results],
                    "main_numel": [int(h) for h in held], "model_numel": model_numel,
                    "model_dtypes": model_dtypes, "main_dtypes": {p.dtype for p in main}},
                   out_file)
