"""The engine every stage runs on: micro-batches, megatron's schedules (forward-only passes and the
training step), and the reductions over data- and pipeline-parallel ranks.

Training is done with megatron-core's own machinery, as Megatron-LM's ``pretrain`` does it
(megatron/training/training.py: ``get_model``, ``setup_model_and_optimizer``, ``train_step``):

- ``setup_training`` wraps the model in ``Float16Module`` (bf16) and megatron's
  ``DistributedDataParallel`` (contiguous fp32 gradient buffers, reduce-scattered over DP), builds
  megatron's distributed optimizer (Adam on fp32 main params, its state sharded over DP, gradient
  clipping) and an ``OptimizerParamScheduler`` (linear warmup, cosine decay), and sets the
  ``TransformerConfig`` hooks the schedules call (``finalize_model_grads_func``; with
  ``overlap_grad_reduce`` also ``no_sync_func``, ``grad_sync_func``).
- ``run_step`` runs one iteration: ``get_forward_backward_func()`` over the micro-batches
  (any PP), ``finalize_model_grads`` (DP reduce-scatter, TP/PP all-reduces of replicated weights,
  division by the global number of loss tokens), ``optimizer.step()`` (which all-gathers the
  updated bf16 params) and the scheduler step; ``train_step`` does it for plain LM training.

The loss is per token (``config.calculate_per_token_loss=True``, megatron's 3-value convention
``(loss_sum, num_tokens, {"lm loss": [loss_sum, num_tokens]})``), so a step's gradient is that of
the mean loss over every real token of the global batch, whatever the DP size or micro-batching.
The model must be built with ``parallel_output=True``; losses come from :mod:`pare_nemo.losses`
on vocab-parallel logits.

Forward-only passes (importance, search, eval, distillation's validation) go through the same
schedule with ``forward_only=True``: ``run_forward`` (outputs or reduced loss reports),
``forward_logits`` and ``forward_loss`` (the summed LM loss over rows, on every rank).
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pare_nemo.parallel import device

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "saved after a signal; run me again to resume"


# ---------------------------------------------------------------- micro-batches


@dataclass
class MicroBatch:
    """What one forward step of a GPTModel reads: ``tokens``, ``mask`` (real tokens) [b, s],
    ``document_ids`` [b, s] or None (packed rows: each token attends only to its own document,
    RoPE positions restart per document; the model's ``attention_mask``), ``position_ids`` and
    optional ``targets``."""

    tokens: torch.Tensor
    mask: torch.Tensor
    document_ids: torch.Tensor | None
    position_ids: torch.Tensor
    targets: dict | None = None  # what a loss reads beside the tokens (stored teacher top k)

    def run(self, model):
        """``model``'s output (vocab-parallel logits on the last stage, activations elsewhere)."""
        return model(input_ids=self.tokens, position_ids=self.position_ids,
                     attention_mask=self.document_ids)


def micro_batches(tokens: torch.Tensor, mask: torch.Tensor | None = None,
                  micro_batch_size: int = 1, document_ids: torch.Tensor | None = None,
                  targets: dict | None = None) -> list[MicroBatch]:
    """Rows [N, S] (and their mask, document ids, ``targets``: tensors with a row per token row)
    cut into micro-batches on this rank's device."""
    n, s = tokens.shape
    if n % micro_batch_size:
        raise ValueError(f"{n} rows not divisible by micro_batch_size {micro_batch_size}")
    mask = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask
    for name, t in (("mask", mask), ("document_ids", document_ids)):
        if t is not None and t.shape != tokens.shape:
            raise ValueError(f"{name} {tuple(t.shape)} does not match tokens "
                             f"{tuple(tokens.shape)}")
    dev = device()
    positions = torch.arange(s, device=dev).expand(micro_batch_size, s)
    rows = [slice(i, i + micro_batch_size) for i in range(0, n, micro_batch_size)]
    return [MicroBatch(tokens[r].to(dev), mask[r].to(dev),
                       None if document_ids is None else document_ids[r].to(dev), positions,
                       None if targets is None else {k: v[r].to(dev) for k, v in targets.items()})
            for r in rows]


def data_parallel_share(rows):
    """This data-parallel rank's rows (every ``dp``-th, from its rank on) of anything sliceable."""
    from megatron.core import parallel_state as ps

    return rows[ps.get_data_parallel_rank()::ps.get_data_parallel_world_size()]


# ---------------------------------------------------------------- the schedule, and reductions


def schedule(chunks: list, forward_step, batches: list, forward_only: bool,
             adjust_tensor_shapes_fn=None) -> list:
    """megatron's forward(-backward) schedule (1F1B under PP) over ``batches``; returns the loss
    functions' reports collected on the last pipeline stage."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    kwargs = {}
    if adjust_tensor_shapes_fn is not None and ps.get_pipeline_model_parallel_world_size() > 1:
        kwargs["adjust_tensor_shapes_fn"] = adjust_tensor_shapes_fn
    b, s = batches[0].tokens.shape
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=chunks,
        num_microbatches=len(batches), seq_length=s, micro_batch_size=b,
        forward_only=forward_only, **kwargs)


def sum_over_replicas(t: torch.Tensor, pipeline: bool = True) -> torch.Tensor:
    """``t`` summed over the data-parallel ranks and (``pipeline``) the pipeline stages, in place:
    partial sums each DP replica / stage computed become the job's total, on every rank."""
    from megatron.core import parallel_state as ps

    if dist.is_initialized():
        dist.all_reduce(t, group=ps.get_data_parallel_group())
        if pipeline and ps.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(t, group=ps.get_pipeline_model_parallel_group())
    return t


def reduce_reports(reports: list) -> dict:
    """Means over the global batch of the ``{name: tensor([sum, count])}`` reports the last
    pipeline stage collected: summed over micro-batches and DP, then sent to every rank (so each
    rank returns the same numbers)."""
    from megatron.core import parallel_state as ps

    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    names = sorted(reports[0]) if last and reports else []
    if ps.get_pipeline_model_parallel_world_size() > 1:
        box = [names]
        dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                                   group=ps.get_pipeline_model_parallel_group())
        names = box[0]
    total = torch.zeros(len(names), 2, device=device())
    for r in reports if last else []:
        total += torch.stack([r[n].to(total) for n in names])
    sum_over_replicas(total)  # the other stages add zeros
    return {n: (t[0] / t[1]).item() for n, t in zip(names, total)}


# ---------------------------------------------------------------- forward-only passes


def run_forward(model, tokens: torch.Tensor, mask: torch.Tensor | None = None,
                micro_batch_size: int = 1, step_fn=None, progress=None,
                document_ids: torch.Tensor | None = None, targets: dict | None = None) -> list:
    """Forward ``tokens`` [N, S] through a (possibly pipeline-parallel) GPTModel with megatron's
    forward-only schedule, ``2 x PP`` micro-batches at a time. ``step_fn(micro_batch)`` is called
    on every stage just before that stage runs a micro-batch and may return a loss function (then
    its reported dicts are returned) or None (then the model outputs are). Returns the last
    stage's results (empty on other stages); ``progress.update(n)`` is called after each chunk.
    ``document_ids`` [N, S], ``targets``: see :class:`MicroBatch`."""
    from megatron.core import parallel_state as ps

    n = tokens.shape[0]
    if n % micro_batch_size:
        raise ValueError(f"{n} samples not divisible by micro_batch_size {micro_batch_size}")
    per_call = micro_batch_size * max(2 * ps.get_pipeline_model_parallel_world_size(), 1)
    model.eval()

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        loss_func = step_fn(mb) if step_fn is not None else None
        return mb.run(model), loss_func

    outputs = []
    for start in range(0, n, per_call):
        part = slice(start, start + per_call)
        batches = micro_batches(tokens[part], None if mask is None else mask[part],
                                micro_batch_size,
                                None if document_ids is None else document_ids[part],
                                None if targets is None else {k: v[part]
                                                              for k, v in targets.items()})
        with torch.no_grad():
            outputs += schedule([model], forward_step, batches, forward_only=True)
        if progress is not None:
            progress.update(len(batches) * micro_batch_size)
    return outputs


def forward_logits(model, tokens: torch.Tensor, micro_batch_size: int = 1,
                   document_ids: torch.Tensor | None = None):
    """Logits [N, S, V_padded] on the last pipeline stage (gathered over TP if the model was built
    with ``parallel_output=False``), None on other stages. ``document_ids``: see run_forward."""
    from megatron.core import parallel_state as ps

    outs = run_forward(model, tokens, micro_batch_size=micro_batch_size,
                       document_ids=document_ids)
    return torch.cat(outs, dim=0) if ps.is_pipeline_last_stage() else None


def forward_loss(model, tokens: torch.Tensor, mask: torch.Tensor | None, micro_batch_size: int,
                 vocab_size: int, document_ids: torch.Tensor | None = None) -> tuple[float, int]:
    """(summed next-token NLL, predicted tokens) of ``model`` (built with ``parallel_output=True``)
    over this rank's rows, summed over the data-parallel ranks: the same on every rank. The loss
    is :func:`pare_nemo.losses.next_token_nll`, accumulated in fp64."""
    total = forward_loss_sums(model, tokens, mask, micro_batch_size, vocab_size, document_ids)
    return total[0, 0].item(), int(total[0, 1].item())


def forward_loss_sums(model, tokens: torch.Tensor, mask: torch.Tensor | None,
                      micro_batch_size: int, vocab_size: int,
                      document_ids: torch.Tensor | None = None, groups: torch.Tensor | None = None,
                      num_groups: int = 0) -> torch.Tensor:
    """[1 + num_groups, 2] fp64 (summed next-token NLL, predicted tokens) of :func:`forward_loss`:
    over all positions, then over each group's. ``groups`` [N, S] gives the group of the loss at
    each position (-1: none), e.g. a position bucket. The same on every rank."""
    from megatron.core import parallel_state as ps

    from pare_nemo.losses import grouped_sums, next_token_losses

    tp_group = ps.get_tensor_model_parallel_group()
    dev = device()

    def step(mb):
        def loss_func(logits):  # vocab-parallel logits on the last stage
            per_token, keep = next_token_losses(logits, mb.tokens, mb.mask, vocab_size, tp_group)
            groups_here = mb.targets["groups"] if num_groups else None
            sums = grouped_sums(per_token.detach(), keep, groups_here, num_groups)
            s = (per_token * keep).sum()
            return s, {"sums": sums}
        return loss_func

    outs = run_forward(model, tokens, mask, micro_batch_size, step, document_ids=document_ids,
                       targets=None if groups is None else {"groups": groups})
    total = torch.zeros(1 + num_groups, 2, dtype=torch.float64, device=dev)
    for o in outs:
        total += o["sums"].to(dev)
    sum_over_replicas(total)  # stages other than the last add zeros
    return total


# ---------------------------------------------------------------- training


@dataclass
class StepResult:
    loss: float  # mean loss per token over the global batch
    grad_norm: float | None  # before clipping; None if the step was skipped
    lr: float  # the learning rate this step used
    skipped: bool  # no update: the loss or a gradient was not finite
    losses: dict = field(default_factory=dict)  # each reported component's mean over the batch


def setup_training(model, optimizer, train_steps: int, overlap_grad_reduce: bool = False):
    """Wrap ``model`` (a GPTModel or a list of virtual-pipeline chunks, built at the current TP/PP
    with ``parallel_output=True``) for training with the settings of ``optimizer``
    (:class:`pare_nemo.config.Optimizer`) over ``train_steps`` steps. Returns ``(model_chunks,
    optimizer, scheduler)``: ``model_chunks`` is a list of DDP-wrapped chunks to train."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.module import Float16Module

    opt = optimizer
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    config = chunks[0].config
    opt.check(train_steps)
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

    megatron_optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=opt.lr, min_lr=opt.min_lr,
                        weight_decay=opt.weight_decay, adam_beta1=opt.BETAS[0],
                        adam_beta2=opt.BETAS[1], bf16=config.bf16,
                        params_dtype=config.params_dtype, use_distributed_optimizer=True,
                        clip_grad=opt.clip_grad),
        chunks)
    scheduler = OptimizerParamScheduler(
        megatron_optimizer, init_lr=0.0 if opt.warmup_steps else opt.lr, max_lr=opt.lr,
        min_lr=opt.min_lr, lr_warmup_steps=opt.warmup_steps, lr_decay_steps=train_steps,
        lr_decay_style="cosine", start_wd=opt.weight_decay, end_wd=opt.weight_decay,
        wd_incr_steps=train_steps, wd_incr_style="constant")

    # the hooks megatron's schedules read from the config (training.py sets the same). No
    # grad_scale_func: without fp16 the loss scale is 1, the schedules' default when it is unset.
    # Setting it to the optimizer's bound method would close a cycle that runs through autograd's
    # C++ graph (the fp32 optimizer's param shards are views of the params, their grad_fn reaching
    # DDP's AccumulateGrad hooks), which gc cannot see: a finished run would keep its model, DDP,
    # optimizer and gloo threads alive in a process that runs stage after stage.
    config.finalize_model_grads_func = finalize_model_grads
    if overlap_grad_reduce:
        no_sync = [c.no_sync for c in chunks]
        grad_sync = [c.start_grad_sync for c in chunks]
        config.no_sync_func = no_sync[0] if len(chunks) == 1 else no_sync
        config.grad_sync_func = grad_sync[0] if len(chunks) == 1 else grad_sync
    return chunks, megatron_optimizer, scheduler


def train_step(model_chunks, optimizer, scheduler, tokens: torch.Tensor, mask: torch.Tensor,
               vocab_size: int, micro_batch_size: int = 1, loss_fn=None) -> StepResult:
    """One LM training iteration on this DP rank's share ``tokens``, ``mask`` [b, s] of the global
    batch (every TP/PP rank of a DP replica gets the same rows). ``loss_fn(logits, tokens, mask)``
    returns ``(loss_sum, num_tokens)`` for a micro-batch (default:
    :func:`pare_nemo.losses.next_token_nll`)."""
    if loss_fn is None:
        from megatron.core import parallel_state as ps

        from pare_nemo.losses import next_token_nll

        tp_group = ps.get_tensor_model_parallel_group()

        def loss_fn(logits, t, m):
            return next_token_nll(logits, t, m, vocab_size, tp_group)

    def forward_step(data_iterator, model):
        mb = next(data_iterator)

        def loss_func(logits):
            loss, num_tokens = loss_fn(logits, mb.tokens, mb.mask)
            return loss, num_tokens.int(), {}

        return mb.run(model), loss_func

    return run_step(model_chunks, optimizer, scheduler,
                    micro_batches(tokens, mask, micro_batch_size), forward_step)


def run_step(model_chunks, optimizer, scheduler, batches: list[MicroBatch], forward_step,
             adjust_tensor_shapes_fn=None, on_nan: str = "skip", mask=None) -> StepResult:
    """One training iteration over ``batches`` (this DP rank's) with megatron's schedule.

    ``forward_step(data_iterator, model)`` is megatron's ``forward_step_func``: it takes the next
    micro-batch, runs ``model`` and returns ``(output, loss_func)``; on the last pipeline stage
    ``loss_func(output)`` returns ``(loss_sum, num_tokens, {name: tensor([sum, count])})``: the
    per-token loss summed over the micro-batch, its token count and any components to report.

    NaN guard: when the loss or any gradient is not finite on any rank, no update happens (the
    optimizer and scheduler do not step) and the result says ``skipped``; with ``on_nan="stop"``
    a ``FloatingPointError`` is raised instead. Either way nothing poisoned reaches the weights.

    ``mask`` (:class:`pare_nemo.sparsify.Mask`): the gradients of pruned weights are zeroed
    before the update and the weights re-zeroed after it.
    """
    if on_nan not in ("skip", "stop"):
        raise ValueError(f"on_nan={on_nan!r}: expected 'skip' or 'stop'")

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
    losses = reduce_reports(schedule(model_chunks, wrapped_forward_step, batches,
                                     forward_only=False,
                                     adjust_tensor_shapes_fn=adjust_tensor_shapes_fn))

    if mask is not None:
        mask.grads()
    finite = torch.tensor([1.0 if all(math.isfinite(v) for v in losses.values()) else 0.0],
                          device=device())
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
    if mask is not None:
        mask.weights()
    if update_successful:
        scheduler.step(increment=1)
    return StepResult(loss=losses["loss"],
                      grad_norm=None if grad_norm is None else float(grad_norm), lr=lr,
                      skipped=not update_successful, losses=losses)


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
        flag = torch.tensor([1.0 if self.received else 0.0], device=device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
