"""Train Pare's Megatron Olmo 3 with megatron-core's own machinery (the core distillation reuses).

As Megatron-LM's ``pretrain`` does it (megatron/training/training.py: ``get_model``,
``setup_model_and_optimizer``, ``train_step``):

- ``setup_training`` wraps the model in ``Float16Module`` (bf16) and megatron's
  ``DistributedDataParallel`` (contiguous fp32 gradient buffers, reduce-scattered over DP), builds
  megatron's distributed optimizer (Adam on fp32 main params, its state sharded over DP, gradient
  clipping) and an ``OptimizerParamScheduler`` (linear warmup, cosine decay), and sets the
  ``TransformerConfig`` hooks the schedules call (``finalize_model_grads_func``,
  ``grad_scale_func``; with ``overlap_grad_reduce`` also ``no_sync_func``, ``grad_sync_func``).
- ``train_step`` runs one iteration: ``get_forward_backward_func()`` over the micro-batches
  (any PP), ``finalize_model_grads`` (DP reduce-scatter, TP/PP all-reduces of replicated weights,
  division by the global number of loss tokens), ``optimizer.step()`` (which all-gathers the
  updated bf16 params) and the scheduler step.

The loss is per token (``config.calculate_per_token_loss=True``, megatron's 3-value convention
``(loss_sum, num_tokens, {"lm loss": [loss_sum, num_tokens]})``), so a step's gradient is that of
the mean loss over every real token of the global batch, whatever the DP size or micro-batching.
The model must be built with ``parallel_output=True``; losses come from :mod:`pare_nemo.losses`
on vocab-parallel logits.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class StepResult:
    loss: float  # mean loss per token over the global batch
    grad_norm: float | None  # before clipping; None if the step was skipped
    lr: float  # the learning rate this step used
    skipped: bool  # no update: the loss or a gradient was not finite
    losses: dict = field(default_factory=dict)  # each reported component's mean over the batch


def setup_training(model, lr: float, train_steps: int, warmup_steps: int = 0, min_lr: float = 0.0,
                   weight_decay: float = 0.0, clip_grad: float = 1.0, betas=(0.9, 0.95),
                   overlap_grad_reduce: bool = False):
    """Wrap ``model`` (a GPTModel or a list of virtual-pipeline chunks, built at the current TP/PP
    with ``parallel_output=True``) for training. Returns ``(model_chunks, optimizer, scheduler)``:
    ``model_chunks`` is a list of DDP-wrapped chunks to pass to :func:`train_step`."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.module import Float16Module

    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    config = chunks[0].config
    if not 0 <= warmup_steps < train_steps:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) < train_steps ({train_steps})")
    if not 0 <= min_lr <= lr:
        raise ValueError(f"need 0 <= min_lr ({min_lr}) <= lr ({lr})")
    if config.fp16:
        raise ValueError("fp16 is not supported; use bf16 or fp32")
    if not config.calculate_per_token_loss:
        raise ValueError("build the model with calculate_per_token_loss=True (train_step's loss is "
                         "a per-token sum, normalized by finalize_model_grads)")

    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=True, overlap_grad_reduce=overlap_grad_reduce,
        grad_reduce_in_fp32=True)
    if config.bf16:
        chunks = [Float16Module(config, c) for c in chunks]
    chunks = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=c,
                                      disable_bucketing=i > 0)
              for i, c in enumerate(chunks)]
    for c in chunks:  # make the DP replicas start equal (as megatron's get_model does)
        c.broadcast_params()

    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=lr, min_lr=min_lr, weight_decay=weight_decay,
                        adam_beta1=betas[0], adam_beta2=betas[1], bf16=config.bf16,
                        params_dtype=config.params_dtype, use_distributed_optimizer=True,
                        clip_grad=clip_grad),
        chunks)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup_steps else lr, max_lr=lr, min_lr=min_lr,
        lr_warmup_steps=warmup_steps, lr_decay_steps=train_steps, lr_decay_style="cosine",
        start_wd=weight_decay, end_wd=weight_decay, wd_incr_steps=train_steps,
        wd_incr_style="constant")

    # the hooks megatron's schedules read from the config (training.py sets the same)
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    if overlap_grad_reduce:
        no_sync = [c.no_sync for c in chunks]
        grad_sync = [c.start_grad_sync for c in chunks]
        config.no_sync_func = no_sync[0] if len(chunks) == 1 else no_sync
        config.grad_sync_func = grad_sync[0] if len(chunks) == 1 else grad_sync
    return chunks, optimizer, scheduler


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, vocab_size: int):
    """``(loss_sum, num_tokens)`` of next-token cross-entropy on vocab-parallel ``logits``
    [b, s, V_local] over positions whose token and next token are real (the last position has no
    next token)."""
    from megatron.core import parallel_state as ps

    from pare_nemo.losses import cross_entropy

    labels = torch.roll(tokens, -1, dims=1)
    keep = mask & torch.roll(mask, -1, dims=1)
    keep[:, -1] = False
    per_token = cross_entropy(logits, labels, vocab_size,
                              tp_group=ps.get_tensor_model_parallel_group())
    return (per_token * keep).sum(), keep.sum()


def train_step(model_chunks, optimizer, scheduler, tokens: torch.Tensor, mask: torch.Tensor,
               vocab_size: int, micro_batch_size: int = 1, loss_fn=None) -> StepResult:
    """One LM training iteration on this DP rank's share ``tokens``, ``mask`` [b, s] of the global
    batch (every TP/PP rank of a DP replica gets the same rows). ``loss_fn(logits, tokens, mask)``
    returns ``(loss_sum, num_tokens)`` for a micro-batch (default: :func:`lm_loss`)."""
    from pare_nemo.parallel import device

    b, s = tokens.shape
    if mask.shape != tokens.shape:
        raise ValueError(f"mask {tuple(mask.shape)} does not match tokens {tuple(tokens.shape)}")
    if b % micro_batch_size:
        raise ValueError(f"{b} rows not divisible by micro_batch_size {micro_batch_size}")
    loss_fn = loss_fn or (lambda logits, t, m: lm_loss(logits, t, m, vocab_size))
    dev = device()
    positions = torch.arange(s, device=dev).expand(micro_batch_size, s)
    micro_batches = [(tokens[i:i + micro_batch_size].to(dev), mask[i:i + micro_batch_size].to(dev))
                     for i in range(0, b, micro_batch_size)]

    def forward_step(data_iterator, model):
        tok, msk = next(data_iterator)
        logits = model(input_ids=tok, position_ids=positions, attention_mask=None)

        def loss_func(logits):
            loss, num_tokens = loss_fn(logits, tok, msk)
            return loss, num_tokens.int(), {}

        return logits, loss_func

    return run_step(model_chunks, optimizer, scheduler, micro_batches, forward_step, s,
                    micro_batch_size)


def run_step(model_chunks, optimizer, scheduler, micro_batches: list, forward_step,
             seq_length: int, micro_batch_size: int, adjust_tensor_shapes_fn=None,
             on_nan: str = "skip") -> StepResult:
    """One training iteration over ``micro_batches`` (this DP rank's) with megatron's schedule.

    ``forward_step(data_iterator, model)`` is megatron's ``forward_step_func``: it takes the next
    micro-batch, runs ``model`` and returns ``(output, loss_func)``; on the last pipeline stage
    ``loss_func(output)`` returns ``(loss_sum, num_tokens, {name: tensor([sum, count])})``: the
    per-token loss summed over the micro-batch, its token count and any components to report.

    NaN guard: when the loss or any gradient is not finite on any rank, no update happens (the
    optimizer and scheduler do not step) and the result says ``skipped``; with ``on_nan="stop"``
    a ``FloatingPointError`` is raised instead. Either way nothing poisoned reaches the weights.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from pare_nemo.parallel import device

    if on_nan not in ("skip", "stop"):
        raise ValueError(f"on_nan={on_nan!r}: expected 'skip' or 'stop'")
    dev = device()

    def wrapped_forward_step(data_iterator, model):
        output, loss_func = forward_step(data_iterator, model)

        def wrapped_loss_func(out):
            loss, num_tokens, reports = loss_func(out)
            num_tokens = torch.as_tensor(num_tokens, device=loss.device).int()
            reports = dict(reports)
            reports["loss"] = torch.stack([loss.detach().float(), num_tokens.float()])
            return loss, num_tokens, reports

        return output, wrapped_loss_func

    for c in model_chunks:
        c.train()
        c.zero_grad_buffer()
    optimizer.zero_grad()
    kwargs = {}
    if adjust_tensor_shapes_fn is not None and ps.get_pipeline_model_parallel_world_size() > 1:
        kwargs["adjust_tensor_shapes_fn"] = adjust_tensor_shapes_fn
    reports = get_forward_backward_func()(
        forward_step_func=wrapped_forward_step, data_iterator=iter(micro_batches),
        model=model_chunks, num_microbatches=len(micro_batches), seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=False, **kwargs)
    losses = reduce_reports(reports)

    finite = torch.tensor([1.0 if all(math.isfinite(v) for v in losses.values()) else 0.0],
                          device=dev)
    for c in model_chunks:
        for buf in c.buffers + c.expert_parallel_buffers:
            if not torch.isfinite(buf.grad_data).all():
                finite.zero_()
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    lr = optimizer.param_groups[0]["lr"]
    if not finite.item():
        if on_nan == "stop":
            raise FloatingPointError(f"loss or gradients are not finite ({losses}); stopping "
                                     "without an update (on_nan=stop)")
        return StepResult(loss=losses["loss"], grad_norm=None, lr=lr, skipped=True,
                          losses=losses)
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful:
        scheduler.step(increment=1)
    return StepResult(loss=losses["loss"], grad_norm=None if grad_norm is None else float(grad_norm),
                      lr=lr, skipped=not update_successful, losses=losses)


def reduce_reports(reports: list) -> dict:
    """Means over the global batch of the ``{name: tensor([sum, count])}`` reports the last
    pipeline stage collected: summed over micro-batches and DP, then sent to every rank (so each
    rank returns the same numbers)."""
    from megatron.core import parallel_state as ps

    from pare_nemo.parallel import device

    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    names = sorted(reports[0]) if last and reports else []
    if ps.get_pipeline_model_parallel_world_size() > 1:
        box = [names]
        dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                                   group=ps.get_pipeline_model_parallel_group())
        names = box[0]
    total = torch.zeros(len(names), 2, device=device())
    if last:
        for r in reports:
            total += torch.stack([r[n].to(total) for n in names])
        dist.all_reduce(total, group=ps.get_data_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    return {n: (t[0] / t[1]).item() for n, t in zip(names, total)}


class StopSignals:
    """SIGTERM / SIGUSR1 (Slurm's warning before a time limit or preemption) set a flag instead of
    killing the process; the loop asks :meth:`requested` once per step (all ranks agree: the flag
    is all-reduced), then saves and exits with :data:`REQUEUE_EXIT_CODE`, which the Slurm script
    turns into ``scontrol requeue``. A second signal while saving is ignored."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def requested(self) -> bool:
        from pare_nemo.parallel import device

        flag = torch.tensor([1.0 if self.received else 0.0], device=device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "saved after a signal; run me again to resume"
