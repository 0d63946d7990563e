"""Stage 3: knowledge distillation of a pruned student from its teacher (Minitron, arXiv 2407.14679
and 2408.11796), on megatron-core.

    loss = alpha * CE(student) + (1 - alpha) * T^2 * KD(teacher || student)     (last stage)
         + intermediate_weight * sum over pairs (i, j) of d(h_student[i], h_teacher[j])
         + embedding_weight * d(e_student, e_teacher)

- KD is :func:`pare_nemo.losses.kl_divergence` on vocab-parallel logits (forward KL, reverse KL or
  JSD(beta), temperature T, optional teacher top-k), per token, never gathering the vocabulary.
- ``d`` is ``1 - cos`` or the mean squared error over the hidden size, per token. ``h[i]`` is layer
  i's output (the residual stream after its post-norms); ``e`` the embedding output. When the hidden
  size was pruned, the teacher's states are compared on the channels the student kept
  (``hidden_match="kept"``, the plan knows them) or through a learned linear map of the student's
  state (``hidden_match="projection"``: trained with the student, saved in its checkpoint under
  ``distill_projections``, dropped at export).
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

The loop (``distill``): checkpoints every ``save_interval`` steps and on SIGTERM/SIGUSR1 (then exit
code 75, which ``slurm/distill.sh`` turns into a requeue); a run started again with the same
arguments resumes from the latest complete checkpoint and continues the same loss curve; NaN/inf
steps are skipped (``on_nan="skip"``) or stop the run (``"stop"``) and are never saved.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

ARGS_FILE = "distill_args.json"
KD_KINDS = ("forward", "reverse", "jsd")
INTERMEDIATE = ("none", "cosine", "mse")
HIDDEN_MATCH = ("kept", "projection")
# fields of distill_args.json that may change when a run is resumed
# (not train_steps: it sets the learning-rate schedule and the data order)
RESUMABLE_CHANGES = ("save_interval", "keep_last", "log_interval", "eval_interval",
                     "eval_samples", "on_nan", "tensorboard")


# ---------------------------------------------------------------- losses on hidden states


def state_distance(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token distance [...] between hidden states [..., h] (fp32): ``1 - cos`` or the mean
    squared error over the hidden size."""
    s, t = student.float(), teacher.float()
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-6)
    if kind == "mse":
        return (s - t).pow(2).mean(-1)
    raise ValueError(f"unknown intermediate loss {kind!r}; expected one of {INTERMEDIATE[1:]}")


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


def pairing(student_config, teacher_config, plan: dict | None, intermediate: str,
            student_layers: list[int] | None, teacher_layers: list[int] | None,
            embedding: bool = False) -> Pairing:
    """Layer pairs and kept hidden channels, checked against both models."""
    ls, lt = student_config.num_hidden_layers, teacher_config.num_hidden_layers
    hs, ht = student_config.hidden_size, teacher_config.hidden_size
    if plan is not None:
        if len(plan["layers"]) != ls or len(plan["hidden"]) != hs or max(plan["layers"]) >= lt \
                or max(plan["hidden"]) >= ht:
            raise ValueError("the student's prune_plan.json does not fit these models (its kept "
                             f"layers/channels: {len(plan['layers'])}/{len(plan['hidden'])}, "
                             f"student {ls} layers / hidden {hs}, teacher {lt} / {ht}): was the "
                             "student pruned from this teacher?")
        origin, hidden = list(plan["layers"]), list(plan["hidden"])
    else:
        if hs != ht and (intermediate != "none" or embedding):
            raise ValueError(f"student hidden {hs} != teacher hidden {ht} and no prune_plan.json "
                             "beside the student to say which channels it kept: intermediate "
                             "and embedding losses need it (logit-only distillation does not)")
        origin, hidden = (list(range(ls)) if ls == lt else None), None
    if hidden is not None and hidden == list(range(ht)):
        hidden = None
    if intermediate == "none":
        if student_layers or teacher_layers:
            raise ValueError("student_layers / teacher_layers given but intermediate_loss=none")
        return Pairing([], [], hidden)
    s = list(range(ls)) if student_layers is None else list(student_layers)
    bad = [i for i in s if not 0 <= i < ls]
    if bad:
        raise ValueError(f"student_layers {bad} out of range: the student has {ls} layers "
                         f"(0..{ls - 1})")
    if teacher_layers is None:
        if origin is None:
            raise ValueError(f"no prune_plan.json beside the student and {ls} != {lt} layers: "
                             "give teacher_layers=[...] to pair with student_layers")
        t = [origin[i] for i in s]
    else:
        t = list(teacher_layers)
        if len(t) != len(s):
            raise ValueError(f"teacher_layers has {len(t)} entries for {len(s)} student layers")
        bad = [j for j in t if not 0 <= j < lt]
        if bad:
            raise ValueError(f"teacher_layers {bad} out of range: the teacher has {lt} layers "
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


def check_pairs_on_stages(p: Pairing, ls: int, lt: int, pp: int, embedding_weight: float):
    """Under pipeline parallelism both layers of a pair must live on one stage."""
    from pare_nemo.olmo3.bridge import pipeline_split

    if pp == 1:
        return
    apart = [(i, j) for i, j in zip(p.student_layers, p.teacher_layers)
             if stage_of(i, ls, pp) != stage_of(j, lt, pp)]
    if apart:
        raise ValueError(
            f"at pp={pp} these (student, teacher) layer pairs fall on different pipeline stages: "
            f"{apart} (layers per stage: student {pipeline_split(ls, pp)}, teacher "
            f"{pipeline_split(lt, pp)}); choose pairs on "
            "one stage with student_layers=/teacher_layers=, or run at pp=1")


# ---------------------------------------------------------------- the two models in one step


class Distiller:
    """This rank's student (DDP-wrapped chunk) and teacher, and the megatron forward step that
    runs both on a micro-batch and returns the distillation loss."""

    def __init__(self, student_chunk, teacher, student_config, teacher_config, pairing: Pairing,
                 vocab_size: int, kd: str = "forward", beta: float = 0.5,
                 temperature: float = 1.0, top_k: int | None = None, alpha: float = 0.0,
                 intermediate: str = "none", intermediate_weight: float = 1.0,
                 embedding_weight: float = 0.0, hidden_match: str = "kept",
                 balance: bool = False):
        from megatron.core import parallel_state as ps
        from megatron.core.utils import get_attr_wrapped_model

        self.student, self.teacher = student_chunk, teacher
        self.p = pairing
        self.vocab = vocab_size
        self.kd, self.beta, self.T, self.top_k, self.alpha = kd, beta, temperature, top_k, alpha
        self.kind, self.w_inter, self.w_emb = intermediate, intermediate_weight, embedding_weight
        self.hidden_match, self.balance = hidden_match, balance
        self.scales: dict[str, float] = {}  # balance: per-term scale from the previous step
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.first = ps.is_pipeline_first_stage()
        self.last = ps.is_pipeline_last_stage()
        self.hs, self.ht = student_config.hidden_size, teacher_config.hidden_size
        self.hidden_index = None if pairing.hidden is None else torch.tensor(pairing.hidden)
        self.aux: dict[str, torch.Tensor] = {}  # per step: name -> [sum, count] (this rank)

        # which pairs live here, in local layer indices
        gpt_s = get_attr_wrapped_model(student_chunk, "decoder", return_model_obj=True)
        self.gpt_s = gpt_s
        s_layers, t_layers = list(gpt_s.decoder.layers), list(teacher.decoder.layers)
        s_off = s_layers[0].layer_number - 1 if s_layers else 0
        t_off = t_layers[0].layer_number - 1 if t_layers else 0
        self.pairs = [(i, j) for i, j in zip(pairing.student_layers, pairing.teacher_layers)
                      if 0 <= i - s_off < len(s_layers)]
        self._states: dict = {}
        self._hooks = []
        for i, j in self.pairs:
            self._hooks.append(s_layers[i - s_off].register_forward_hook(self._keep(("s", i))))
            self._hooks.append(t_layers[j - t_off].register_forward_hook(self._keep(("t", j))))
        if self.w_emb and self.first:
            self._hooks.append(gpt_s.embedding.register_forward_hook(self._keep(("s", "emb"))))
            self._hooks.append(teacher.embedding.register_forward_hook(self._keep(("t", "emb"))))
        # the student's set_input_tensor splits [student | teacher] activations (pp > 1)
        if self.pp > 1:
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
        """megatron's ``adjust_tensor_shapes_fn``: stages exchange [s, b, h_s + h_t]."""
        widen = lambda shapes: [(*s[:-1], self.hs + self.ht) for s in shapes]  # noqa: E731
        return widen(recv_shapes), widen(send_shapes)

    def _match(self, s_state, t_state, name):
        """The student state and the teacher state on comparable channels."""
        if self.hidden_index is None:
            return s_state, t_state
        if self.hidden_match == "kept":
            return s_state, t_state.index_select(-1, self.hidden_index.to(t_state.device))
        return self.projections()[name](s_state), t_state

    def projections(self):
        return self.gpt_s.distill_projections

    def _add(self, name, value_sum, count):
        t = torch.stack([value_sum.detach().float(), count.float()])
        self.aux[name] = self.aux.get(name, 0) + t

    def forward_step(self, data_iterator, model):
        tok, msk, doc, pos = next(data_iterator)
        self._states.clear()
        with torch.no_grad():
            t_out = self.teacher(input_ids=tok, position_ids=pos, attention_mask=doc)
        s_out = model(input_ids=tok, position_ids=pos, attention_mask=doc)

        # intermediate terms of the pairs on this stage
        m = msk.t().float()  # [s, b] like the hidden states
        n = msk.sum()
        aux = s_out.new_zeros((), dtype=torch.float32)
        terms = [(f"layer {i}->{j}", ("s", i), ("t", j), self.w_inter) for i, j in self.pairs]
        if self.w_emb and self.first:
            terms.append(("embedding", ("s", "emb"), ("t", "emb"), self.w_emb))
        for name, ks, kt, w in terms:
            s_state, t_state = self._match(self._states[ks], self._states[kt].detach(),
                                           _proj_key(name))
            kind = self.kind if ks[1] != "emb" or self.kind != "none" else "cosine"
            d = (state_distance(s_state, t_state, kind) * m).sum()
            self._add(name, d, n)
            aux = aux + w * self.scales.get(name, 1.0) * d
        self._states.clear()

        if not self.last:  # send [student | teacher] on; the local terms join backward here
            out = torch.cat([s_out, t_out.to(s_out.dtype)], dim=-1)
            return (_AttachLoss.apply(out, aux) if terms else out), _no_loss

        def loss_func(logits):
            from pare_nemo.losses import cross_entropy, kl_divergence

            kd = kl_divergence(logits, t_out, self.vocab, kind=self.kd, beta=self.beta,
                               temperature=self.T, top_k=self.top_k, tp_group=self.tp_group)
            kd_sum = (kd * msk).sum() * self.T**2
            reports = {"kd": torch.stack([kd_sum.detach(), n.float()])}
            loss = (1 - self.alpha) * kd_sum if self.alpha else kd_sum
            if self.alpha or not torch.is_grad_enabled():  # validation reports the LM loss too
                labels = torch.roll(tok, -1, dims=1)
                keep = msk & torch.roll(msk, -1, dims=1)
                keep[:, -1] = False
                ce = (cross_entropy(logits, labels, self.vocab, tp_group=self.tp_group)
                      * keep).sum()
                reports["ce"] = torch.stack([ce.detach(), keep.sum().float()])
                if self.alpha:
                    loss = loss + self.alpha * ce
            return loss + aux, n, reports

        return s_out, loss_func

    def total(self, losses: dict, inter: dict) -> float:
        """The step's loss per token from its reported means: what the gradient was taken of
        (``losses["loss"]`` holds only the terms computed on the last stage)."""
        out = (1 - self.alpha) * losses.get("kd", 0.0) + self.alpha * losses.get("ce", 0.0)
        for n, v in inter.items():
            out += (self.w_emb if n == "embedding" else self.w_inter) * self.scales.get(n, 1.0) * v
        return out

    def reduce_aux(self) -> dict[str, float]:
        """Means over the global batch of this step's intermediate terms (each computed on one
        stage, on every DP replica); resets them."""
        from megatron.core import parallel_state as ps

        from pare_nemo.parallel import device

        names = sorted(_term_names(self))
        total = torch.zeros(len(names), 2, device=device())
        for k, name in enumerate(names):
            if name in self.aux:
                total[k] = self.aux[name].to(total)
        self.aux = {}
        if not names:
            return {}
        dist.all_reduce(total, group=ps.get_data_parallel_group())
        if self.pp > 1:
            dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
        return {n: (t[0] / t[1]).item() for n, t in zip(names, total)}


def _no_loss(output):
    raise RuntimeError("loss_func called on a stage that is not the last")


def _proj_key(name: str) -> str:
    return "embedding" if name == "embedding" else "s" + name.split()[1].split("->")[0]


def _term_names(d: Distiller) -> list[str]:
    """Every intermediate term of the whole model (all stages), the same list on every rank."""
    names = [f"layer {i}->{j}" for i, j in zip(d.p.student_layers, d.p.teacher_layers)]
    return names + (["embedding"] if d.w_emb else [])


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


def check_same_tokenizer(teacher_path, student_path) -> None:
    """Teacher and student must share tokenizer and vocabulary (padded sizes may differ)."""
    from transformers import AutoTokenizer

    from pare_nemo.checkpoint import TOKENIZER_DIR, read_model_config

    (tc, _, _), (sc, _, _) = read_model_config(teacher_path), read_model_config(student_path)
    if tc.vocab_size != sc.vocab_size:
        raise ValueError(f"teacher vocabulary {tc.vocab_size} != student vocabulary "
                         f"{sc.vocab_size}: distillation needs one tokenizer")
    tt = AutoTokenizer.from_pretrained(Path(teacher_path) / TOKENIZER_DIR)
    st = AutoTokenizer.from_pretrained(Path(student_path) / TOKENIZER_DIR)
    if tt.get_vocab() != st.get_vocab() or tt.eos_token_id != st.eos_token_id:
        raise ValueError(f"the tokenizers of {teacher_path} and {student_path} differ: "
                         "distillation needs one tokenizer")


def parse_data(data: str) -> tuple[list[str], list[float] | None]:
    """``prefix``, ``prefix,prefix`` or ``weight:prefix,weight:prefix`` -> (prefixes, weights)."""
    prefixes, weights = [], []
    for item in (x.strip() for x in data.split(",") if x.strip()):
        w, sep, prefix = item.partition(":")
        try:
            weight = float(w) if sep else None
        except ValueError:
            weight, prefix = None, item
        prefixes.append(prefix if weight is not None else item)
        weights.append(weight)
    if not prefixes:
        raise ValueError("data is empty: give a prefix written by `pare prepare-data`")
    if all(w is None for w in weights):
        return prefixes, None
    if any(w is None for w in weights):
        raise ValueError(f"data={data!r}: give a weight to every prefix (weight:prefix) or none")
    return prefixes, weights


def check_data(data: str, checkpoint: str | None = None) -> tuple[list[str], list[float] | None]:
    """The prefixes (and blend weights) of ``data``; each must be a ``pare prepare-data`` output,
    made with ``checkpoint``'s tokenizer when that is given."""
    prefixes, weights = parse_data(data)
    fingerprint = None
    for p in prefixes:
        if not (Path(p + ".bin").exists() and Path(p + ".idx").exists()):
            hint = " (a raw data source? tokenize it first: pare prepare-data data=... " \
                   "tokenizer_path=... output_prefix=...)" if Path(p).exists() else ""
            raise FileNotFoundError(f"data prefix {p} does not exist: no {p}.bin / {p}.idx{hint}")
        meta = Path(p + ".json")
        if checkpoint is not None and meta.exists():
            if fingerprint is None:
                from transformers import AutoTokenizer

                from pare_nemo.checkpoint import TOKENIZER_DIR
                from pare_nemo.data import tokenizer_fingerprint

                fingerprint = tokenizer_fingerprint(
                    AutoTokenizer.from_pretrained(Path(checkpoint) / TOKENIZER_DIR))
            if json.loads(meta.read_text()).get("tokenizer_sha256") != fingerprint:
                raise ValueError(f"data {p} was tokenized with another tokenizer than "
                                 f"{checkpoint}'s; run pare prepare-data with "
                                 f"tokenizer_path={Path(checkpoint) / 'tokenizer'}")
    return prefixes, weights


def _datasets(data: str, checkpoint: str, seq_length: int, num_samples: int, global_batch_size: int,
              eval_samples: int, seed: int, split: str):
    """(train, valid) packed-row datasets; every rank builds them (rank 0 writes the index cache)."""
    from pare_nemo.data import DataError, training_dataset

    prefixes, weights = check_data(data)
    train, valid = training_dataset(prefixes, seq_length, num_samples, global_batch_size, seed,
                                    _eos(checkpoint), split=split, weights=weights,
                                    valid_samples=eval_samples or None)
    if eval_samples and valid is None:
        raise DataError(f"eval_interval needs a validation split; split={split!r} has none")
    return train, valid


def _run_args(args: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in args.items()}


def check_save_path(save_path: Path, args: dict) -> bool:
    """True when ``save_path`` holds this run's checkpoints (resume); False when it is new or
    empty; an error when it holds anything else or a run with other arguments."""
    if not save_path.exists() or (save_path.is_dir() and not any(save_path.iterdir())):
        return False
    f = save_path / ARGS_FILE
    if not f.exists():
        raise FileExistsError(f"save_path {save_path} exists and holds something other than a "
                              f"distillation run's checkpoints (no {ARGS_FILE}); choose another")
    saved = json.loads(f.read_text())
    diff = {k: (saved.get(k), v) for k, v in args.items()
            if k not in RESUMABLE_CHANGES and saved.get(k) != v}
    if diff:
        raise ValueError(f"save_path {save_path} holds a run with other arguments "
                         + ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
                         + "; resume with the same arguments or choose another save_path")
    return True


def distill(teacher_path: str, student_path: str, data: str, save_path: str,
            train_steps: int = 1000, global_batch_size: int = 768, micro_batch_size: int = 1,
            seq_length: int = 8192, lr: float = 1e-4, min_lr: float = 1e-5,
            warmup_steps: int = 100, weight_decay: float = 0.0, clip_grad: float = 1.0,
            kd: str = "forward", temperature: float = 1.0, beta: float = 0.5,
            top_k: int | None = None, alpha: float = 0.0, intermediate_loss: str = "none",
            student_layers: list[int] | None = None, teacher_layers: list[int] | None = None,
            intermediate_weight: float = 1.0, embedding_weight: float = 0.0,
            hidden_match: str = "kept", balance: bool = False, tp: int = 1, pp: int = 1,
            dtype: str = "bfloat16", recompute: str = "none", document_mask: bool = True,
            split: str = "98,2,0", save_interval: int = 500, keep_last: int = 2,
            log_interval: int = 10, eval_interval: int = 0, eval_samples: int = 64,
            seed: int = 1234, on_nan: str = "skip", tensorboard: bool = True) -> str:
    """Distill a pruned student from its teacher (logit KD + optional intermediate losses)."""
    args = _run_args(dict(locals()))
    from pare_nemo.olmo3.bridge import check_parallel_sizes
    from pare_nemo.checkpoint import read_model_config
    from pare_nemo.data import check_seq_length
    from pare_nemo.parallel import world_size
    from pare_nemo.prune import load_plan

    save = Path(save_path)
    # ---- everything checked before any work
    for name, value, allowed in (("kd", kd, KD_KINDS), ("intermediate_loss", intermediate_loss,
                                  INTERMEDIATE), ("hidden_match", hidden_match, HIDDEN_MATCH),
                                 ("recompute", recompute, ("none", "selective", "full")),
                                 ("on_nan", on_nan, ("skip", "stop")),
                                 ("dtype", dtype, ("bfloat16", "float32"))):
        if value not in allowed:
            raise ValueError(f"{name}={value!r}: expected one of {allowed}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}: the CE weight must be in [0, 1]")
    if recompute == "full" and (intermediate_loss != "none" or embedding_weight):
        raise ValueError("recompute=full reruns whole layers in backward, so intermediate states "
                         "have no graph: use recompute=selective with intermediate losses")
    if min(train_steps, global_batch_size, micro_batch_size, seq_length, save_interval,
           log_interval) < 1 or keep_last < 1:
        raise ValueError("train_steps, global_batch_size, micro_batch_size, seq_length, "
                         "save_interval, log_interval and keep_last must be >= 1")
    if not 0 <= warmup_steps < train_steps or not 0 <= min_lr <= lr:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) < train_steps ({train_steps}) "
                         f"and 0 <= min_lr ({min_lr}) <= lr ({lr})")
    tc, _, _ = read_model_config(teacher_path)
    sc, s_padded, _ = read_model_config(student_path)
    check_same_tokenizer(teacher_path, student_path)
    check_seq_length(seq_length, sc)
    check_seq_length(seq_length, tc)
    check_parallel_sizes(tc, tp, pp, uneven_pipeline=True)
    check_parallel_sizes(sc, tp, pp, uneven_pipeline=True)
    world = world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tp*pp = {tp * pp}")
    dp = world // (tp * pp)
    if global_batch_size % (dp * micro_batch_size):
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by data-parallel "
                         f"size {dp} x micro_batch_size {micro_batch_size}")
    plan = load_plan(student_path)
    pairs = pairing(sc, tc, plan, intermediate_loss, student_layers, teacher_layers,
                    embedding=bool(embedding_weight))
    check_pairs_on_stages(pairs, sc.num_hidden_layers, tc.num_hidden_layers, pp,
                          embedding_weight)
    check_data(data, teacher_path)
    resume = check_save_path(save, args)
    return _train(args, save, resume, tc, sc, s_padded, pairs, dp)


def _train(args: dict, save: Path, resume: bool, tc, sc, s_padded, pairs: Pairing,
           dp: int) -> str:
    from megatron.core import parallel_state as ps
    from tqdm import tqdm

    from pare_nemo import checkpoint as ckpt
    from pare_nemo.data import batch_at
    from pare_nemo.olmo3.model import document_ids
    from pare_nemo.parallel import device, distributed
    from pare_nemo.train import REQUEUE_EXIT_CODE, StopSignals, run_step, setup_training

    a = args
    dtype = getattr(torch, a["dtype"])
    gbs, mbs, S = a["global_batch_size"], a["micro_batch_size"], a["seq_length"]
    with distributed(a["tp"], a["pp"]), StopSignals() as signals:
        rank0 = dist.get_rank() == 0
        train_set, valid_set = _datasets(
            a["data"], a["student_path"], S, a["train_steps"] * gbs, gbs,
            a["eval_samples"] if a["eval_interval"] else 0, a["seed"], a["split"])
        torch.manual_seed(a["seed"])
        overrides = dict(calculate_per_token_loss=True)
        if a["document_mask"]:  # per-token RoPE positions: the unfused RoPE
            overrides["apply_rope_fusion"] = False
        if a["recompute"] != "none":
            overrides.update(recompute_granularity=a["recompute"],
                             recompute_method="uniform" if a["recompute"] == "full" else None,
                             recompute_num_layers=1 if a["recompute"] == "full" else None)
        student, _ = ckpt.load_model(a["student_path"], parallel_output=True, dtype=dtype,
                                     uneven_pipeline=True, **overrides)
        teacher, _ = ckpt.load_model(a["teacher_path"], parallel_output=True, dtype=dtype,
                                     uneven_pipeline=True,
                                     **({"apply_rope_fusion": False} if a["document_mask"]
                                        else {}))
        teacher.eval()
        teacher.requires_grad_(False)
        if a["hidden_match"] == "projection":
            add_projections(student, pairs, sc.hidden_size, tc.hidden_size,
                            bool(a["embedding_weight"]))
        chunks, optimizer, scheduler = setup_training(
            student, lr=a["lr"], train_steps=a["train_steps"], warmup_steps=a["warmup_steps"],
            min_lr=a["min_lr"], weight_decay=a["weight_decay"], clip_grad=a["clip_grad"])
        distiller = Distiller(chunks[0], teacher, sc, tc, pairs, sc.vocab_size, kd=a["kd"],
                              beta=a["beta"], temperature=a["temperature"], top_k=a["top_k"],
                              alpha=a["alpha"], intermediate=a["intermediate_loss"],
                              intermediate_weight=a["intermediate_weight"],
                              embedding_weight=a["embedding_weight"],
                              hidden_match=a["hidden_match"], balance=a["balance"])

        if rank0 and not resume:  # the run directory: a Pare checkpoint once the tracker exists
            _start_run_dir(save, a, sc, s_padded, dtype)
        dist.barrier()
        state = ckpt.load_training_checkpoint(save, chunks, optimizer, scheduler) if resume \
            else None
        step = state["iteration"] if state else 0
        consumed = state["consumed_samples"] if state else 0
        distiller.scales = dict(state.get("balance_scales", {})) if state else {}
        history = _History(save, step, rank0, a["tensorboard"])
        if state and rank0:
            print(f"resuming {save} at step {step} ({consumed} samples consumed)", flush=True)

        dev = device()
        eos = _eos(a["student_path"])
        positions = torch.arange(S, device=dev).expand(mbs, S)
        dp_rank = ps.get_data_parallel_rank()

        def micro_batches(dataset, consumed_samples, rows):
            batch = batch_at(dataset, consumed_samples, rows, dp_rank, dp)
            tokens, mask = batch.tokens, batch.mask
            docs = document_ids(tokens, eos) if a["document_mask"] else None
            return [(tokens[i:i + mbs].to(dev), mask[i:i + mbs].to(dev),
                     None if docs is None else docs[i:i + mbs].to(dev), positions)
                    for i in range(0, tokens.shape[0], mbs)]

        flops = _flops_per_token(sc, S) * 3 + _flops_per_token(tc, S)
        bar = tqdm(total=a["train_steps"], initial=step, desc="distill", unit="step",
                   disable=not rank0)
        t_last, tokens_since = time.perf_counter(), 0
        skipped_in_a_row = 0
        exit_code = 0
        while step < a["train_steps"]:
            if device().type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            result = run_step(chunks, optimizer, scheduler, micro_batches(train_set, consumed, gbs),
                              distiller.forward_step, S, mbs,
                              adjust_tensor_shapes_fn=distiller.adjust_tensor_shapes,
                              on_nan=a["on_nan"])
            inter = distiller.reduce_aux()
            step += 1
            consumed += gbs
            tokens_since += gbs * S
            bar.update(1)
            skipped_in_a_row = skipped_in_a_row + 1 if result.skipped else 0
            if skipped_in_a_row >= 10:
                raise FloatingPointError(f"{skipped_in_a_row} steps in a row had a non-finite "
                                         "loss or gradient; stopping (nothing was saved from them)")
            if a["balance"] and not result.skipped:
                kd_mean = result.losses.get("kd", 0.0)
                distiller.scales = {n: (kd_mean / v if v > 0 else 1.0) for n, v in inter.items()}
            row = {"step": step, "consumed_tokens": consumed * S,
                   "loss": distiller.total(result.losses, inter),
                   **{k: v for k, v in result.losses.items() if k != "loss"}, **inter,
                   "lr": result.lr, "grad_norm": result.grad_norm, "skipped": result.skipped}
            if step % a["log_interval"] == 0 or step == a["train_steps"]:
                dt = time.perf_counter() - t_last
                row["tokens_per_s"] = tokens_since / dt
                row["mfu"] = _mfu(flops * tokens_since / dt / dist.get_world_size())
                if dev.type == "cuda":
                    row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
                t_last, tokens_since = time.perf_counter(), 0
                if rank0:
                    bar.write(_log_line(row))
            if a["eval_interval"] and (step % a["eval_interval"] == 0
                                       or step == a["train_steps"]):
                row.update({f"valid {k}": v for k, v in _evaluate(
                    chunks, distiller, micro_batches(valid_set, 0, a["eval_samples"]),
                    S, mbs).items()})
                if rank0:
                    bar.write("  validation: " + ", ".join(
                        f"{k} {v:.4f}" for k, v in row.items() if k.startswith("valid")))
            history.add(row)
            stop = signals.requested()
            if stop or step % a["save_interval"] == 0 or step == a["train_steps"]:
                ckpt.save_training_checkpoint(
                    save, step, chunks, optimizer, scheduler,
                    {"iteration": step, "consumed_samples": consumed,
                     "balance_scales": distiller.scales}, keep_last=a["keep_last"])
                history.flush()
            if stop and step < a["train_steps"]:
                if rank0:
                    bar.write(f"{signals.received or 'stop signal'}: saved step {step}; exiting "
                              f"with {REQUEUE_EXIT_CODE} so the job is requeued and resumes")
                exit_code = REQUEUE_EXIT_CODE
                break
        bar.close()
        distiller.remove_hooks()
        history.close(plot=exit_code == 0)
    if exit_code:
        sys.exit(exit_code)
    return str(save)


def _evaluate(chunks, distiller: Distiller, micro_batches, S, mbs) -> dict:
    """Mean KD (and CE, intermediate terms) of the student on held-out rows, forward only."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from pare_nemo.train import reduce_reports

    for c in chunks:
        c.eval()
    with torch.no_grad():
        reports = get_forward_backward_func()(
            forward_step_func=distiller.forward_step, data_iterator=iter(micro_batches),
            model=chunks, num_microbatches=len(micro_batches), seq_length=S,
            micro_batch_size=mbs, forward_only=True,
            **({"adjust_tensor_shapes_fn": distiller.adjust_tensor_shapes}
               if distiller.pp > 1 else {}))
    out = reduce_reports(reports)
    out.update(distiller.reduce_aux())
    for c in chunks:
        c.train()
    return out


def _start_run_dir(save: Path, args: dict, sc, s_padded, dtype) -> None:
    """What makes the run directory a Pare checkpoint (config, tokenizer, plan) and a resumable
    run (its arguments); checkpoints and the tracker come with each save."""
    import shutil

    from pare_nemo.checkpoint import TOKENIZER_DIR, write_model_config
    from pare_nemo.prune import PLAN_FILE

    save.mkdir(parents=True, exist_ok=True)
    shutil.copytree(Path(args["student_path"]) / TOKENIZER_DIR, save / TOKENIZER_DIR,
                    dirs_exist_ok=True)
    plan = Path(args["student_path"]) / PLAN_FILE
    if plan.exists():
        shutil.copy(plan, save / PLAN_FILE)
    write_model_config(save, sc, s_padded, dtype)
    tmp = save / (ARGS_FILE + ".tmp")
    tmp.write_text(json.dumps(args, indent=2))
    tmp.rename(save / ARGS_FILE)


def _eos(checkpoint) -> int:
    from pare_nemo.checkpoint import read_model_config

    hf, _, _ = read_model_config(checkpoint)
    eos = hf.eos_token_id
    return eos[0] if isinstance(eos, list) else eos


def _flops_per_token(hf, seq_length: int) -> float:
    """Forward FLOPs per token: 2 x (matmul parameters) + attention scores (causal: half)."""
    h, L = hf.hidden_size, hf.num_hidden_layers
    heads, kv = hf.num_attention_heads, hf.num_key_value_heads
    d = getattr(hf, "head_dim", None) or h // heads
    per_layer = h * d * (2 * heads + 2 * kv) + 3 * h * hf.intermediate_size
    attn = 2 * heads * d * seq_length  # q.k and p.v over half the keys on average, x2 FLOPs
    return 2 * (L * per_layer + h * hf.vocab_size) + L * attn


def _mfu(flops_per_s_per_gpu: float) -> float | None:
    """Model FLOPs utilization against the GPU's dense bf16 peak (None off GPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12),
                                ("B200", 2250e12)) if k in name), None)
    return None if peak is None else flops_per_s_per_gpu / peak


def _log_line(row: dict) -> str:
    parts = [f"step {row['step']}", f"tokens {row['consumed_tokens']:.3g}"]
    for k, v in row.items():
        if k in ("step", "consumed_tokens") or v is None or k.startswith("valid"):
            continue
        if k == "skipped":
            if v:
                parts.append("SKIPPED (non-finite)")
        elif k == "lr":
            parts.append(f"lr {v:.2e}")
        elif k == "tokens_per_s":
            parts.append(f"{v:,.0f} tok/s")
        elif k == "mfu":
            parts.append(f"MFU {v:.1%}")
        elif k == "peak_memory_gb":
            parts.append(f"peak {v:.1f} GB")
        else:
            parts.append(f"{k} {v:.4f}")
    return " | ".join(parts)


class _History:
    """Per-step metrics: ``metrics.jsonl`` (rewritten up to the resumed step, so a resumed run's
    file is the uninterrupted run's), TensorBoard events, and ``loss_curve.png`` at the end."""

    def __init__(self, save: Path, step: int, rank0: bool, tensorboard: bool):
        self.rank0, self.file = rank0, save / "metrics.jsonl"
        self.rows, self.pending, self.writer = [], [], None
        if not rank0:
            return
        if self.file.exists():
            self.rows = [r for r in map(json.loads, self.file.read_text().splitlines())
                         if r["step"] <= step]
            self._write(self.rows, "w")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(save / "tensorboard"), purge_step=step + 1)
            except ImportError:
                print("tensorboard is not installed: no TensorBoard events", flush=True)

    def _write(self, rows, mode):
        with open(self.file, mode) as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    def add(self, row: dict):
        if not self.rank0:
            return
        self.rows.append(row)
        self.pending.append(row)
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" \
                        and v is not None and math.isfinite(v):
                    self.writer.add_scalar(k.replace(" ", "_"), v, row["step"])

    def flush(self):
        """Called after each checkpoint: the file never gets ahead of the saved state by more
        than the steps a resume replays (they are cut on resume)."""
        if self.rank0 and self.pending:
            self._write(self.pending, "a")
            self.pending = []
            if self.writer is not None:
                self.writer.flush()

    def close(self, plot: bool):
        self.flush()
        if not self.rank0:
            return
        if self.writer is not None:
            self.writer.close()
        if plot and self.rows:
            plot_losses(self.rows, self.file.parent / "loss_curve.png")


def plot_losses(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = [k for k in rows[-1] if k in ("loss", "kd", "ce") or k.startswith("layer")
            or k == "embedding"]
    for k in keys:
        ax.plot(steps, [r.get(k) for r in rows], label=k)
    valid = [(r["step"], r["valid loss"]) for r in rows if "valid loss" in r]
    if valid:
        ax.plot(*zip(*valid), "o-", label="valid loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per token")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("distillation")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.rename(path)
