"""Stage 3: knowledge distillation of a pruned student from its teacher (Minitron, arXiv 2407.14679
and 2408.11796), on megatron-core.

    loss = alpha * CE(student) + (1 - alpha) * T^2 * KD(teacher || student)     (last stage)
         + intermediate_weight * sum over pairs (i, j) of d(h_student[i], h_teacher[j])
         + embedding_weight * d(e_student, e_teacher)

- KD is :func:`pare_nemo.losses.kl_divergence` on vocab-parallel logits (forward KL, reverse KL or
  JSD(beta), temperature T, optional teacher top-k), per token, never gathering the vocabulary.
- ``d`` is :func:`pare_nemo.losses.state_distance`: ``1 - cos`` or the mean squared error over the
  hidden size, per token. ``h[i]`` is layer i's output (the residual stream after its post-norms);
  ``e`` the embedding output. When the hidden size was pruned, the teacher's states are compared
  on the channels the student kept (``hidden_match="kept"``, the plan knows them) or through a
  learned linear map of the student's state (``hidden_match="projection"``: trained with the
  student, saved in its checkpoint under ``distill_projections``, dropped at export).
- Pairs: student layer i with the teacher layer it was copied from (``prune_plan.json`` beside
  the student), or with ``teacher_layers``.
- ``balance=True`` scales each intermediate term to the logit term's magnitude, using the means of
  the previous step (all ranks agree; the first step uses scale 1).

Teacher and student run at the same TP/PP/DP layout, on the same micro-batch, inside one forward
step of megatron's schedule. The teacher is frozen: eval mode, no gradients, no optimizer, no DDP.
Under pipeline parallelism each stage runs its student and teacher layers; the activations sent
between stages are ``cat([student, teacher], -1)`` (megatron's ``adjust_tensor_shapes_fn``), and
an intermediate pair must have both layers on one stage. Intermediate terms computed on a stage
other than the last enter backward through :class:`_AttachLoss` (as megatron's MoE auxiliary losses
do) and are reported through an all-reduce of their own.

The stage (``distill``) reads a :class:`pare_nemo.config.DistillConfig`: ``check`` refuses bad input
before any work, :class:`Distillation` sets a run up and runs its loop (``train``): checkpoints
every ``save_interval`` steps and on SIGTERM/SIGUSR1 (then exit code 75, which
``slurm/distill.sh`` turns into a requeue); a run started again with the same config resumes from
the latest complete checkpoint and continues the same loss curve; NaN/inf steps are skipped
(``on_nan="skip"``) or stop the run (``"stop"``) and are never saved. The run directory's files
are :mod:`pare_nemo.rundir`'s, the metrics :mod:`pare_nemo.metrics`'.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from pare_nemo import rundir
from pare_nemo.config import KD, DistillConfig, need
from pare_nemo.engine import MicroBatch

MAX_SKIPPED_IN_A_ROW = 10  # non-finite steps in a row that stop a run


class _AttachLoss(torch.autograd.Function):
    """Returns ``x`` unchanged; backward also sends gradient 1 into ``loss``. A loss computed on a
    pipeline stage other than the last thereby joins the backward pass the schedule starts from
    the last stage's loss (megatron's ``MoEAuxLossAutoScaler`` does this for MoE auxiliary losses).
    Per-token sums, like the main loss: finalize_model_grads divides both by the token count."""

    @staticmethod
    def forward(ctx, x, loss):
        ctx.loss_shape = loss.shape
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones(ctx.loss_shape, device=grad.device, dtype=torch.float32)


# ---------------------------------------------------------------- the plan: which layers pair up


@dataclass
class Pairing:
    student_layers: list[int]  # global student layer indices with an intermediate loss
    teacher_layers: list[int]  # their partners
    hidden: list[int] | None  # teacher channels the student kept (None: same hidden size)


def pairing(student_config, teacher_config, plan: dict | None, kd: KD) -> Pairing:
    """Layer pairs and kept hidden channels, checked against both models."""
    ls, lt = student_config.num_hidden_layers, teacher_config.num_hidden_layers
    hs, ht = student_config.hidden_size, teacher_config.hidden_size
    if plan is not None:
        need(len(plan["layers"]) == ls and len(plan["hidden"]) == hs
             and max(plan["layers"]) < lt and max(plan["hidden"]) < ht,
             "the student's prune_plan.json does not fit these models (its kept layers/channels: "
             f"{len(plan['layers'])}/{len(plan['hidden'])}, student {ls} layers / hidden {hs}, "
             f"teacher {lt} / {ht}): was the student pruned from this teacher?")
        origin, hidden = list(plan["layers"]), list(plan["hidden"])
    else:
        need(hs == ht or not kd.states,
             f"student hidden {hs} != teacher hidden {ht} and no prune_plan.json beside the "
             "student to say which channels it kept: intermediate and embedding losses need it "
             "(logit-only distillation does not)")
        origin, hidden = (list(range(ls)) if ls == lt else None), None
    if hidden is not None and hidden == list(range(ht)):
        hidden = None
    if kd.intermediate_loss == "none":
        need(not (kd.student_layers or kd.teacher_layers),
             "student_layers / teacher_layers given but intermediate_loss=none")
        return Pairing([], [], hidden)
    s = list(range(ls)) if kd.student_layers is None else list(kd.student_layers)
    bad = [i for i in s if not 0 <= i < ls]
    need(not bad, f"student_layers {bad} out of range: the student has {ls} layers "
                  f"(0..{ls - 1})")
    if kd.teacher_layers is None:
        need(origin is not None, f"no prune_plan.json beside the student and {ls} != {lt} "
                                 "layers: give teacher_layers=[...] to pair with student_layers")
        t = [origin[i] for i in s]
    else:
        t = list(kd.teacher_layers)
        need(len(t) == len(s), f"teacher_layers has {len(t)} entries for {len(s)} student layers")
        bad = [j for j in t if not 0 <= j < lt]
        need(not bad, f"teacher_layers {bad} out of range: the teacher has {lt} layers "
                      f"(0..{lt - 1})")
    return Pairing(s, t, hidden)


def stage_of(layer: int, num_layers: int, pp: int) -> int:
    from pare_nemo.olmo3.bridge import pipeline_split

    end = 0
    for stage, n in enumerate(pipeline_split(num_layers, pp)):
        end += n
        if layer < end:
            return stage
    raise ValueError(f"layer {layer} out of range for {num_layers} layers")


def check_pairs_on_stages(p: Pairing, ls: int, lt: int, pp: int) -> None:
    """Under pipeline parallelism both layers of a pair must live on one stage."""
    from pare_nemo.olmo3.bridge import pipeline_split

    apart = [(i, j) for i, j in zip(p.student_layers, p.teacher_layers)
             if stage_of(i, ls, pp) != stage_of(j, lt, pp)]
    need(pp == 1 or not apart,
         f"at pp={pp} these (student, teacher) layer pairs fall on different pipeline stages: "
         f"{apart} (layers per stage: student {pipeline_split(ls, pp)}, teacher "
         f"{pipeline_split(lt, pp)}); choose pairs on one stage with student_layers=/"
         "teacher_layers=, or run at pp=1")


# ---------------------------------------------------------------- the two models in one step


class Distiller:
    """This rank's student (DDP-wrapped chunk) and teacher, and the megatron forward step that
    runs both on a micro-batch and returns the distillation loss."""

    def __init__(self, student_chunk, teacher, student_config, teacher_config, pairing: Pairing,
                 vocab_size: int, kd: KD):
        """``teacher``: this rank's teacher GPTModel, or None (offline: each micro-batch brings
        the teacher's stored top k as its ``targets``; or CE alone, ``alpha=1``)."""
        from megatron.core import parallel_state as ps
        from megatron.core.utils import get_attr_wrapped_model

        self.student, self.teacher = student_chunk, teacher
        self.p, self.vocab, self.kd = pairing, vocab_size, kd
        self.scales: dict[str, float] = {}  # balance: per-term scale from the previous step
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.first = ps.is_pipeline_first_stage()
        self.last = ps.is_pipeline_last_stage()
        self.hs = student_config.hidden_size
        self.ht = teacher_config.hidden_size if teacher is not None else 0
        self.hidden_index = None if pairing.hidden is None else torch.tensor(pairing.hidden)
        self.aux: dict[str, torch.Tensor] = {}  # per step: name -> [sum, count] (this rank)

        # which pairs live here, in local layer indices
        gpt_s = get_attr_wrapped_model(student_chunk, "decoder", return_model_obj=True)
        self.gpt_s = gpt_s
        s_layers = list(gpt_s.decoder.layers)
        t_layers = list(teacher.decoder.layers) if teacher is not None else []
        s_off = s_layers[0].layer_number - 1 if s_layers else 0
        t_off = t_layers[0].layer_number - 1 if t_layers else 0
        self.pairs = [(i, j) for i, j in zip(pairing.student_layers, pairing.teacher_layers)
                      if 0 <= i - s_off < len(s_layers)]
        self._states: dict = {}
        self._hooks = []
        for i, j in self.pairs:
            self._hooks.append(s_layers[i - s_off].register_forward_hook(self._keep(("s", i))))
            self._hooks.append(t_layers[j - t_off].register_forward_hook(self._keep(("t", j))))
        if kd.embedding_weight and self.first:
            self._hooks.append(gpt_s.embedding.register_forward_hook(self._keep(("s", "emb"))))
            self._hooks.append(teacher.embedding.register_forward_hook(self._keep(("t", "emb"))))
        # the student's set_input_tensor splits [student | teacher] activations (pp > 1)
        if self.pp > 1 and teacher is not None:
            original = gpt_s.set_input_tensor

            def set_input_tensor(input_tensor):
                x = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor
                if x is None:
                    original(input_tensor)
                    teacher.set_input_tensor(None)
                    return
                original(x[..., :self.hs])
                teacher.set_input_tensor(x[..., self.hs:].detach())

            gpt_s.set_input_tensor = set_input_tensor

    def _keep(self, key):
        def hook(module, args, output):
            self._states[key] = output[0] if isinstance(output, tuple) else output
        return hook

    def remove_hooks(self):
        for h in self._hooks:
            h.remove()

    def adjust_tensor_shapes(self, recv_shapes, send_shapes):
        """megatron's ``adjust_tensor_shapes_fn``: stages exchange [s, b, h_s + h_t] (the
        student's activations alone without a teacher)."""
        widen = lambda shapes: [(*s[:-1], self.hs + self.ht) for s in shapes]  # noqa: E731
        return widen(recv_shapes), widen(send_shapes)

    def _match(self, s_state, t_state, name):
        """The student state and the teacher state on comparable channels."""
        if self.hidden_index is None:
            return s_state, t_state
        if self.kd.hidden_match == "kept":
            return s_state, t_state.index_select(-1, self.hidden_index.to(t_state.device))
        return self.gpt_s.distill_projections[name](s_state), t_state

    def _add(self, name, value_sum, count):
        t = torch.stack([value_sum.detach().float(), count.float()])
        self.aux[name] = self.aux.get(name, 0) + t

    def forward_step(self, data_iterator, model):
        from pare_nemo.losses import (
            kl_divergence,
            kl_divergence_stored,
            next_token_nll,
            state_distance,
        )

        kd = self.kd
        mb: MicroBatch = next(data_iterator)
        self._states.clear()
        t_out = None
        if self.teacher is not None:
            with torch.no_grad():
                t_out = mb.run(self.teacher)
        s_out = mb.run(model)

        # intermediate terms of the pairs on this stage
        m = mb.mask.t().float()  # [s, b] like the hidden states
        n = mb.mask.sum()
        aux = s_out.new_zeros((), dtype=torch.float32)
        terms = [(f"layer {i}->{j}", ("s", i), ("t", j), kd.intermediate_weight)
                 for i, j in self.pairs]
        if kd.embedding_weight and self.first:
            terms.append(("embedding", ("s", "emb"), ("t", "emb"), kd.embedding_weight))
        for name, ks, kt, w in terms:
            s_state, t_state = self._match(self._states[ks], self._states[kt].detach(),
                                           _proj_key(name))
            distance = kd.intermediate_loss if kd.intermediate_loss != "none" else "cosine"
            d = (state_distance(s_state, t_state, distance) * m).sum()
            self._add(name, d, n)
            aux = aux + w * self.scales.get(name, 1.0) * d
        self._states.clear()

        if not self.last:  # send [student | teacher] on; the local terms join backward here
            out = s_out if t_out is None else torch.cat([s_out, t_out.to(s_out.dtype)], dim=-1)
            return (_AttachLoss.apply(out, aux) if terms else out), _no_loss

        def loss_func(logits):
            opts = dict(kind=kd.kd, beta=kd.beta, temperature=kd.temperature,
                        tp_group=self.tp_group)
            reports, loss = {}, logits.new_zeros((), dtype=torch.float32)
            if t_out is not None:
                per_token = kl_divergence(logits, t_out, self.vocab, top_k=kd.top_k, **opts)
            elif mb.targets is not None:  # offline: the teacher's stored top k
                t = mb.targets
                per_token = kl_divergence_stored(logits, t["ids"].long(), t["logprobs"],
                                                 t["log_rest"], self.vocab, **opts)
            if t_out is not None or mb.targets is not None:
                kd_sum = (per_token * mb.mask).sum() * kd.temperature**2
                reports["kd"] = torch.stack([kd_sum.detach(), n.float()])
                loss = (1 - kd.alpha) * kd_sum if kd.alpha else kd_sum
            if kd.alpha or not torch.is_grad_enabled():  # validation reports the LM loss too
                ce, count = next_token_nll(logits, mb.tokens, mb.mask, self.vocab, self.tp_group)
                reports["ce"] = torch.stack([ce.detach(), count.float()])
                if kd.alpha:
                    loss = loss + kd.alpha * ce
            return loss + aux, n, reports

        return s_out, loss_func

    def total(self, losses: dict, inter: dict) -> float:
        """The step's loss per token from its reported means: what the gradient was taken of
        (``losses["loss"]`` holds only the terms computed on the last stage)."""
        kd = self.kd
        out = (1 - kd.alpha) * losses.get("kd", 0.0) + kd.alpha * losses.get("ce", 0.0)
        for n, v in inter.items():
            w = kd.embedding_weight if n == "embedding" else kd.intermediate_weight
            out += w * self.scales.get(n, 1.0) * v
        return out

    def reduce_aux(self) -> dict[str, float]:
        """Means over the global batch of this step's intermediate terms (each computed on one
        stage, on every DP replica); resets them."""
        from pare_nemo.engine import sum_over_replicas
        from pare_nemo.parallel import device

        names = sorted(_term_names(self))
        total = torch.zeros(len(names), 2, device=device())
        for k, name in enumerate(names):
            if name in self.aux:
                total[k] = self.aux[name].to(total)
        self.aux = {}
        if not names:
            return {}
        sum_over_replicas(total)
        return {n: (t[0] / t[1]).item() for n, t in zip(names, total)}

    def rebalance(self, result, inter: dict) -> None:
        """``balance``: scale each intermediate term to the KD term's magnitude of this step."""
        if self.kd.balance and not result.skipped:
            kd_mean = result.losses.get("kd", 0.0)
            self.scales = {n: (kd_mean / v if v > 0 else 1.0) for n, v in inter.items()}

    def validate(self, chunks, batches: list[MicroBatch]) -> dict:
        """Mean KD (and CE, intermediate terms) of the student on held-out rows, forward only."""
        from pare_nemo.engine import reduce_reports, schedule

        for c in chunks:
            c.eval()
        with torch.no_grad():
            reports = schedule(chunks, self.forward_step, batches, forward_only=True,
                               adjust_tensor_shapes_fn=self.adjust_tensor_shapes)
        out = reduce_reports(reports) | self.reduce_aux()
        for c in chunks:
            c.train()
        return out


def _no_loss(output):
    raise RuntimeError("loss_func called on a stage that is not the last")


def _proj_key(name: str) -> str:
    return "embedding" if name == "embedding" else "s" + name.split()[1].split("->")[0]


def _term_names(d: Distiller) -> list[str]:
    """Every intermediate term of the whole model (all stages), the same list on every rank."""
    names = [f"layer {i}->{j}" for i, j in zip(d.p.student_layers, d.p.teacher_layers)]
    return names + (["embedding"] if d.kd.embedding_weight else [])


def add_projections(student, pairing: Pairing, hs: int, ht: int, embedding: bool) -> None:
    """Learned student -> teacher maps (``hidden_match="projection"``) for the pairs on this stage,
    as a submodule of the student GPTModel so DDP, the optimizer and checkpoints include them."""
    if pairing.hidden is None:
        return
    layers = list(student.decoder.layers)
    off = layers[0].layer_number - 1 if layers else 0
    keys = [f"s{i}" for i in pairing.student_layers if 0 <= i - off < len(layers)]
    if embedding and student.pre_process:
        keys.append("embedding")
    p = student.embedding.word_embeddings.weight if student.pre_process else \
        next(student.parameters())
    mods = torch.nn.ModuleDict()
    for k in keys:
        lin = torch.nn.Linear(hs, ht, bias=False, device=p.device, dtype=p.dtype)
        with torch.no_grad():  # start as the "kept channels" embedding: x -> x placed in h_t
            lin.weight.zero_()
            for a, b in enumerate(pairing.hidden):
                lin.weight[b, a] = 1.0
        mods[k] = lin
    student.distill_projections = mods


# ---------------------------------------------------------------- the stage


@dataclass
class Checked:
    """What ``check`` learned before any work."""

    teacher: object | None  # the teacher's HF config (None: no teacher checkpoint)
    student: object  # the student's HF config
    padded_vocab: int  # the student's padded vocabulary size
    pairs: Pairing
    dp: int  # data-parallel size
    resume: bool  # save_path holds this run's checkpoints
    stored: object | None  # the teacher's stored top k (teacher_logits=)


def check(cfg: DistillConfig) -> Checked:
    """Everything checked before any work starts: a clear error for bad input, nothing written."""
    from pare_nemo.prune import load_plan

    cfg.kd.check()
    cfg.run.check()
    cfg.optimizer.check(cfg.batch.train_steps)
    tc, sc, padded = cfg.models.check(cfg.kd)
    online = cfg.models.teacher(cfg.kd) is not None
    need(cfg.models.recompute != "full" or not cfg.kd.states,
         "recompute=full reruns whole layers in backward, so intermediate states have no graph: "
         "use recompute=selective with intermediate losses")
    dp = cfg.parallel.check(*((tc, sc) if online else (sc,)), uneven=True)
    cfg.batch.check(*((tc, sc) if online else (sc,)), dp=dp)
    pairs = Pairing([], [], None)
    if online:
        pairs = pairing(sc, tc, load_plan(cfg.models.student_path), cfg.kd)
        check_pairs_on_stages(pairs, sc.num_hidden_layers, tc.num_hidden_layers, cfg.parallel.pp)
    cfg.data.check(cfg.models.student_path)
    stored = check_stored(cfg) if cfg.models.teacher_logits else None
    return Checked(tc if online else None, sc, padded, pairs, dp, rundir.check_save_path(cfg),
                   stored)


def check_stored(cfg: DistillConfig):
    """The teacher's stored top k (``teacher_logits=``), made for this run's rows, k and T."""
    from pare_nemo.teacher_logits import StoredLogits, _tokenizer_sha256

    stored = StoredLogits(cfg.models.teacher_logits)
    need(cfg.kd.top_k in (None, stored.top_k),
         f"top_k={cfg.kd.top_k}, but teacher_logits={stored.path} stored the top "
         f"{stored.top_k} (omit top_k: offline distillation uses the stored k)")
    need(cfg.kd.temperature == stored.temperature,
         f"temperature={cfg.kd.temperature}, but the stored log-probs are at temperature "
         f"{stored.temperature}: store them again at this temperature")
    eval_samples = cfg.run.eval_samples if cfg.run.eval_interval else 0
    stored.check(cfg.data, cfg.batch, eval_samples, _tokenizer_sha256(cfg.models.student_path))
    return stored


def distill(cfg: DistillConfig | None = None, **flat) -> str:
    """Distill a pruned student from its teacher (logit KD + optional intermediate losses)."""
    from pare_nemo.engine import StopSignals
    from pare_nemo.parallel import distributed

    cfg = DistillConfig.of(cfg, **flat)
    checked = check(cfg)
    with distributed(cfg.parallel.tp, cfg.parallel.pp), StopSignals() as signals:
        run = Distillation(cfg, checked)
        exit_code = run.train(signals)
        run.close(plot=exit_code == 0)
    if exit_code:
        sys.exit(exit_code)
    return cfg.run.save_path


class Distillation:
    """One distillation run on this rank: ``__init__`` sets it up (data, teacher and student,
    optimizer, run directory, resume), ``train`` is the loop."""

    def __init__(self, cfg: DistillConfig, checked: Checked):
        from pare_nemo.checkpoint import eos_token_id, load_model, load_training_checkpoint
        from pare_nemo.engine import setup_training
        from pare_nemo.metrics import Metrics, flops_per_token

        self.cfg, m, S = cfg, cfg.models, cfg.batch.seq_length
        self.rank0, self.dp, self.stored = dist.get_rank() == 0, checked.dp, checked.stored
        self.eos = eos_token_id(m.student_path)
        self.train_set, self.valid_set = self.datasets()
        torch.manual_seed(cfg.data.seed)
        dtype = getattr(torch, m.dtype)
        student, _ = load_model(m.student_path, parallel_output=True, dtype=dtype,
                                uneven_pipeline=True, **self.overrides(student=True))
        teacher = None
        if checked.teacher is not None:
            teacher, _ = load_model(m.teacher_path, parallel_output=True, dtype=dtype,
                                    uneven_pipeline=True, **self.overrides(student=False))
            teacher.eval()
            teacher.requires_grad_(False)
        self.mask = None
        if m.mask:  # pruned weights start (before the optimizer copies them) and stay at zero
            from pare_nemo.sparsify import Mask

            self.mask = Mask(m.mask, [student])
        if cfg.kd.hidden_match == "projection":
            add_projections(student, checked.pairs, checked.student.hidden_size,
                            checked.teacher.hidden_size, bool(cfg.kd.embedding_weight))
        self.chunks, self.optimizer, self.scheduler = setup_training(
            student, cfg.optimizer, cfg.batch.train_steps)
        self.distiller = Distiller(self.chunks[0], teacher, checked.student, checked.teacher,
                                   checked.pairs, checked.student.vocab_size, cfg.kd)
        if self.rank0 and not checked.resume:
            rundir.start(cfg, checked.student, checked.padded_vocab, dtype)
        dist.barrier()
        state = load_training_checkpoint(cfg.run.save_path, self.chunks, self.optimizer,
                                         self.scheduler) if checked.resume else None
        self.step = state["iteration"] if state else 0
        self.consumed = state["consumed_samples"] if state else 0
        self.distiller.scales = dict(state.get("balance_scales", {})) if state else {}
        flops = flops_per_token(checked.student, S) * 3 + (
            flops_per_token(checked.teacher, S) if teacher is not None else 0)
        self.metrics = Metrics(Path(cfg.run.save_path), self.step, cfg.batch.train_steps,
                               self.rank0, cfg.run.tensorboard, flops, dist.get_world_size(),
                               wandb=cfg.run.wandb, config=cfg.to_dict())
        if state:
            self.metrics.say(f"resuming {cfg.run.save_path} at step {self.step} "
                             f"({self.consumed} samples consumed)")

    def train(self, signals) -> int:
        """The loop, until ``train_steps``: a step, its metrics, validation, a checkpoint on the
        intervals; on SIGTERM/SIGUSR1 a checkpoint, then the exit code that requeues the job."""
        from pare_nemo.engine import REQUEUE_EXIT_CODE, run_step

        run, steps, gbs = self.cfg.run, self.cfg.batch.train_steps, self.cfg.batch.global_batch_size
        skipped_in_a_row = 0
        while self.step < steps:
            self.metrics.step_started()
            result = run_step(self.chunks, self.optimizer, self.scheduler,
                              self.batches(self.train_set, self.consumed, gbs),
                              self.distiller.forward_step,
                              adjust_tensor_shapes_fn=self.distiller.adjust_tensor_shapes,
                              on_nan=run.on_nan, mask=self.mask)
            terms = self.distiller.reduce_aux()
            self.step, self.consumed = self.step + 1, self.consumed + gbs
            skipped_in_a_row = skipped_in_a_row + 1 if result.skipped else 0
            if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                raise FloatingPointError(f"{skipped_in_a_row} steps in a row had a non-finite "
                                         "loss or gradient; stopping (nothing was saved from them)")
            self.distiller.rebalance(result, terms)
            row = self.row(result, terms)
            if self.due(run.eval_interval):
                row |= {f"valid {k}": v for k, v in self.validate().items()}
            self.metrics.add(row, log=self.due(run.log_interval))
            stop = signals.requested()
            if stop or self.due(run.save_interval):
                self.save()
            if stop and self.step < steps:
                self.metrics.say(f"{signals.received or 'stop signal'}: saved step {self.step}; "
                                 f"exiting with {REQUEUE_EXIT_CODE} so the job is requeued and "
                                 "resumes")
                return REQUEUE_EXIT_CODE
        return 0

    # ---- what the loop calls

    def due(self, interval: int) -> bool:
        """Every ``interval`` steps and at the last one (never for 0)."""
        return bool(interval) and (self.step % interval == 0
                                   or self.step == self.cfg.batch.train_steps)

    def batches(self, dataset, start: int, rows: int, part: str = "train") -> list[MicroBatch]:
        """This DP rank's micro-batches of the rows [start, start + rows) of ``dataset`` (with
        the teacher's stored top k for them, offline)."""
        from megatron.core import parallel_state as ps

        from pare_nemo.data import batch_at
        from pare_nemo.engine import micro_batches
        from pare_nemo.olmo3.model import document_ids

        rank = ps.get_data_parallel_rank()
        b = batch_at(dataset, start, rows, rank, self.dp)
        docs = document_ids(b.tokens, self.eos) if self.cfg.data.document_mask else None
        targets = None
        if self.stored is not None:
            n = len(b.tokens)
            targets = self.stored.rows(part, start + rank * n, n)
            need(torch.equal(targets.pop("tokens").long(), b.tokens),
                 f"the stored teacher logits' rows {start + rank * n}.. of {part} hold other "
                 "tokens than this run's data (the data files changed since they were stored?)")
        return micro_batches(b.tokens, b.mask, self.cfg.batch.micro_batch_size, docs, targets)

    def row(self, result, terms: dict) -> dict:
        """The step's metrics row (``metrics.jsonl``, TensorBoard, the log line)."""
        tokens = self.cfg.batch.global_batch_size * self.cfg.batch.seq_length
        row = {"step": self.step, "consumed_tokens": self.consumed * self.cfg.batch.seq_length,
               "loss": self.distiller.total(result.losses, terms),
               **{k: v for k, v in result.losses.items() if k != "loss"}, **terms,
               "lr": result.lr, "grad_norm": result.grad_norm, "skipped": result.skipped}
        self.metrics.count(tokens)
        if self.due(self.cfg.run.log_interval):
            row |= self.metrics.throughput()
        return row

    def validate(self) -> dict:
        return self.distiller.validate(
            self.chunks, self.batches(self.valid_set, 0, self.cfg.run.eval_samples, "valid"))

    def save(self) -> None:
        from pare_nemo.checkpoint import save_training_checkpoint

        save_training_checkpoint(
            self.cfg.run.save_path, self.step, self.chunks, self.optimizer, self.scheduler,
            {"iteration": self.step, "consumed_samples": self.consumed,
             "balance_scales": self.distiller.scales}, keep_last=self.cfg.run.keep_last)
        self.metrics.flush()

    def close(self, plot: bool) -> None:
        if self.mask is not None and self.step == self.cfg.batch.train_steps:
            self.check_mask()
        self.distiller.remove_hooks()
        self.metrics.close(plot)

    def check_mask(self) -> None:
        """The final sparse integrity check (pruned weights are still exactly zero), saved in
        the run directory; a violation is an error."""
        import json

        result = self.mask.integrity()
        if self.rank0:
            (Path(self.cfg.run.save_path) / rundir.SPARSITY_CHECK).write_text(
                json.dumps(result, indent=1))
            self.metrics.say(f"sparse integrity: {result['nonzero_pruned']} of "
                             f"{result['pruned_weights']:,} pruned weights are non-zero")
        if not result["ok"]:
            raise RuntimeError(f"sparse integrity check failed: {result}")

    # ---- set-up helpers

    def datasets(self):
        """(train, valid) packed-row datasets; every rank builds them (rank 0 writes the index
        cache)."""
        from pare_nemo.data import DataError, training_dataset

        c = self.cfg
        prefixes, weights = c.data.check()
        eval_samples = c.run.eval_samples if c.run.eval_interval else 0
        train, valid = training_dataset(
            prefixes, c.batch.seq_length, c.batch.rows,
            c.batch.global_batch_size, c.data.seed, self.eos, split=c.data.split,
            weights=weights, valid_samples=eval_samples or None)
        if eval_samples and valid is None:
            raise DataError(f"eval_interval needs a validation split; split={c.data.split!r} "
                            "has none")
        return train, valid

    def overrides(self, student: bool) -> dict:
        """Megatron config overrides: document masks need per-token RoPE positions (the unfused
        RoPE); the student trains with a per-token loss and its activation recompute."""
        out = {"apply_rope_fusion": False} if self.cfg.data.document_mask else {}
        recompute = self.cfg.models.recompute
        if student:
            out["calculate_per_token_loss"] = True
            if recompute != "none":
                full = recompute == "full"
                out.update(recompute_granularity=recompute,
                           recompute_method="uniform" if full else None,
                           recompute_num_layers=1 if full else None)
        return out
