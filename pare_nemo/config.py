"""Pare's configuration: typed sections, each with its own ``check()``, composed into one config
per stage. Every default of a stage lives here, once; a recipe (``recipes/olmo3.py``) returns a
whole stage config; a run saves its config (``distill_args.json`` is a ``DistillConfig``).

    ImportanceConfig  megatron_path, scores_path, text, rows, parallel, aggregation, ...
    PruneConfig       megatron_path, scores_path, save_path, targets, depth, parallel, ...
    SearchConfig      megatron_path, scores_path, text, budget(s), rows, parallel, grid, depth,
                      latency, retrain, ...
    SparsifyConfig    megatron_path, save_path, text, method, sparsity, pattern, rows, ...
    QuantizeConfig    output, text, megatron_path | hf_path, format, rows, dtype, ...
    DistillConfig     models, data, run, batch, optimizer, kd, parallel
    EvalConfig        checkpoints, data, output, rows, parallel, downstream, ...

Flat keys: every leaf name is unique within a stage config, so ``lr=1e-4`` finds
``optimizer.lr`` (``optimizer.lr=1e-4`` works too). ``Config.of(base, **flat)`` builds a config
from flat keys on top of ``base`` (a recipe's config) or the defaults; ``flat()`` gives them back.
This module imports nothing heavy (the CLI reads it to answer ``--help`` without torch); checks
that need a model or the data import what they need when they run.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field

DEFAULT_SPLIT = "98,2,0"  # train,valid,test document fractions of a prepare-data prefix
DTYPES = ("bfloat16", "float32")  # training / loading dtypes (eval also reads float16)
RUN_DTYPE = "bfloat16"  # what distillation and teacher-logits run the models in
KD_KINDS = ("forward", "reverse", "jsd")
INTERMEDIATE = ("none", "cosine", "mse")
HIDDEN_MATCH = ("kept", "projection")
RECOMPUTE = ("none", "selective", "full")
LAYER_METRICS = ("layer", "layer_loss", "block")
SPARSITY_METHODS = ("wanda", "sparsegpt", "magnitude")
QUANT_FORMATS = ("fp8", "int8", "int8_wo")
LATENCY_KINDS = ("model", "measured")


def need(condition: bool, message: str) -> None:
    """A check: ValueError(message) unless ``condition``."""
    if not condition:
        raise ValueError(message)


def one_of(name: str, value, allowed: tuple) -> None:
    need(value in allowed, f"{name}={value!r}: expected one of {allowed}")


def check_seq_length(seq_length: int, hf_config) -> None:
    """Refuse rows longer than the model's context (RoPE / YaRN were not made for them)."""
    need(seq_length <= hf_config.max_position_embeddings,
         f"seq_length={seq_length} is longer than the model's context "
         f"(max_position_embeddings={hf_config.max_position_embeddings})")


# ---------------------------------------------------------------- sections


@dataclass(kw_only=True)
class Parallel:
    """Model parallelism; data parallelism is whatever the job's processes leave over."""

    tp: int = 1  # tensor-parallel size
    pp: int = 1  # pipeline-parallel size

    def check(self, *hf_configs, uneven: bool = False, job: bool = True) -> int:
        """The data-parallel size of this job (torchrun's WORLD_SIZE or srun's SLURM_NTASKS over
        tp * pp); TP/PP that do not divide a model or (``job``) the job are refused. ``uneven``: a
        layer count PP does not divide is split unevenly (distillation) instead of refused."""
        from pare_nemo.olmo3.bridge import check_parallel_sizes
        from pare_nemo.parallel import world_size

        need(self.tp >= 1 and self.pp >= 1, f"tp={self.tp} and pp={self.pp} must be >= 1")
        for c in hf_configs:
            check_parallel_sizes(c, self.tp, self.pp, uneven_pipeline=uneven)
        world = world_size()
        need(not job or world % (self.tp * self.pp) == 0,
             f"world size {world} is not divisible by tp*pp = {self.tp * self.pp}")
        return world // (self.tp * self.pp)


@dataclass(kw_only=True)
class Rows:
    """The rows of a forward-only pass: ``num_samples`` rows of ``seq_length`` tokens, run
    ``micro_batch_size`` at a time, split over the data-parallel ranks."""

    num_samples: int
    seq_length: int = 4096
    micro_batch_size: int = 1

    def check(self, *hf_configs, dp: int = 1, whole: bool = True) -> None:
        """``whole``: every DP rank gets the same number of whole micro-batches (else each rank
        drops what does not fill a micro-batch, and only needs one)."""
        need(self.num_samples >= 1 and self.micro_batch_size >= 1 and self.seq_length >= 2,
             f"num_samples={self.num_samples} and micro_batch_size={self.micro_batch_size} must "
             f"be >= 1, seq_length={self.seq_length} >= 2")
        for c in hf_configs:
            check_seq_length(self.seq_length, c)
        per_step = dp * self.micro_batch_size
        if whole:
            need(self.num_samples % per_step == 0,
                 f"num_samples={self.num_samples} is not a multiple of data-parallel size {dp} x "
                 f"micro_batch_size {self.micro_batch_size}")
        need(self.num_samples >= per_step,
             f"num_samples={self.num_samples} < data-parallel size {dp} x micro_batch_size "
             f"{self.micro_batch_size}")


@dataclass(kw_only=True)
class Text:
    """Raw text read as importance reads it: an HF dataset id (``split`` of it), a local .jsonl /
    .json / .parquet / .txt file or folder, or ``pydoc``; packed into full rows (``pack``) or one
    document per row, truncated and padded."""

    data: str
    split: str = "train"
    pack: bool = True

    def check(self) -> None:
        from pathlib import Path

        from pare_nemo.data import PYDOC, _looks_like_path

        need(bool(self.data), "data is empty: give a dataset id, a local file or pydoc")
        if self.data != PYDOC and _looks_like_path(self.data) and not Path(
                self.data).expanduser().exists():
            raise FileNotFoundError(f"data {self.data} does not exist")


@dataclass(kw_only=True)
class Aggregation:
    """How importance aggregates activations: per sample over its real tokens (``seq``: mean of
    |a| or L2 norm), then over samples (``batch``: L2 norm or mean). The papers' best: mean, l2."""

    seq: str = "mean"
    batch: str = "l2"

    def check(self) -> None:
        need(self.seq in ("mean", "l2") and self.batch in ("l2", "mean"),
             f"aggregation seq={self.seq!r} batch={self.batch!r}: seq must be one of "
             f"('mean', 'l2'), batch one of ('l2', 'mean')")


@dataclass(kw_only=True)
class Depth:
    """How depth pruning picks the layers to drop: the lowest ``layer_loss`` (LM loss increase
    when skipped; the papers' choice), ``layer`` (Block Influence) or the contiguous ``block`` of
    lowest summed layer_loss; ``protect_full_attention`` never drops a full-attention layer."""

    layer_metric: str = "layer_loss"
    protect_full_attention: bool = False

    def check(self) -> None:
        need(self.layer_metric in LAYER_METRICS, f"layer_metric must be one of {LAYER_METRICS}")


@dataclass(kw_only=True)
class Targets:
    """The pruned architecture, in NeMo's PruningConfig names (None: keep the original's)."""

    target_ffn_hidden_size: int | None = None
    target_num_attention_heads: int | None = None
    target_num_query_groups: int | None = None
    target_hidden_size: int | None = None
    target_num_layers: int | None = None
    drop_layers: list[int] | None = None

    def check(self) -> None:
        given = dataclasses.asdict(self)
        need(any(v not in (None, []) for v in given.values()),
             f"no pruning target given: pass at least one of {', '.join(given)} (or "
             "recipe=<name>); without one the output would be a copy")


@dataclass(kw_only=True)
class Grid:
    """Candidate values per axis for ``pare search`` (None: 100/87.5/75/62.5/50% of the
    original, rounded to multiples of 128, or of 8 below 1024)."""

    ffn: list[int] | None = None
    heads: list[int] | None = None
    hidden: list[int] | None = None
    layers: list[int] | None = None


@dataclass(kw_only=True)
class Models:
    """Distillation's student and its teacher, which shares its tokenizer: a Pare Megatron
    checkpoint run beside the student (``teacher_path``: online), or the teacher's top-k
    log-probs ``pare teacher-logits`` stored (``teacher_logits``: offline, no teacher loaded), or
    none (``alpha=1``: CE alone, as teacher correction trains); the dtype both run in and the
    student's activation recompute. ``mask``: a ``pare sparsify`` checkpoint (or its mask file)
    whose zeros the student keeps: pruned weights get no gradient and stay exactly zero."""

    student_path: str
    teacher_path: str | None = None
    teacher_logits: str | None = None
    mask: str | None = None
    dtype: str = RUN_DTYPE
    recompute: str = "none"  # none | selective | full

    def teacher(self, kd: KD) -> str | None:
        """The teacher checkpoint to run beside the student, if the losses need one."""
        return self.teacher_path if kd.alpha < 1 or kd.states else None

    def check(self, kd: KD):
        """(the teacher's HF config or None, the student's HF config, its padded vocab)."""
        from pare_nemo.checkpoint import check_same_tokenizer, read_model_config

        one_of("dtype", self.dtype, DTYPES)
        one_of("recompute", self.recompute, RECOMPUTE)
        need(not (self.teacher_path and self.teacher_logits),
             "give teacher_path (the teacher runs beside the student) or teacher_logits (its "
             "stored top k), not both")
        if self.teacher_logits:
            need(not kd.states, "intermediate and embedding losses compare hidden states: they "
                                "need the teacher itself (teacher_path=), not its stored logits")
        else:
            need(self.teacher_path or kd.alpha == 1,
                 "no teacher: give teacher_path= (or teacher_logits= from pare teacher-logits); "
                 "only alpha=1 (CE alone) trains without one")
        sc, padded, _ = read_model_config(self.student_path)
        if self.mask:
            from pare_nemo.sparsify import check_mask_fits

            check_mask_fits(self.mask, sc)
        tc = None
        if self.teacher_path:
            tc, _, _ = read_model_config(self.teacher_path)
            check_same_tokenizer(self.teacher_path, self.student_path)
        return tc, sc, padded


@dataclass(kw_only=True)
class Data:
    """Training rows: ``pare prepare-data`` prefixes (``prefix``, ``a,b`` or a blend
    ``0.7:a,0.3:b``) read by megatron's GPTDataset: train/valid/test document ``split``, an order
    set by ``seed``, each token attending only to its own document (``document_mask``)."""

    data: str
    split: str = DEFAULT_SPLIT
    seed: int = 1234
    document_mask: bool = True

    def check(self, tokenizer_checkpoint: str | None = None):
        """(prefixes, blend weights); each prefix must exist and, when a checkpoint is given, be
        tokenized with its tokenizer."""
        from pare_nemo.data import check_data

        return check_data(self.data, tokenizer_checkpoint)


@dataclass(kw_only=True)
class Batch:
    """The rows a training run reads: ``train_steps`` steps of ``global_batch_size`` rows of
    ``seq_length`` tokens over all DP ranks, ``micro_batch_size`` rows per forward/backward
    (``train_steps`` also sets the learning-rate schedule and, with the global batch, the data
    order)."""

    train_steps: int = 1000
    global_batch_size: int = 768
    micro_batch_size: int = 1
    seq_length: int = 8192

    @property
    def rows(self) -> int:
        return self.train_steps * self.global_batch_size

    def check(self, *hf_configs, dp: int = 1) -> None:
        need(min(self.train_steps, self.global_batch_size, self.micro_batch_size,
                 self.seq_length) >= 1,
             "train_steps, global_batch_size, micro_batch_size and seq_length must be >= 1")
        for c in hf_configs:
            check_seq_length(self.seq_length, c)
        need(self.global_batch_size % (dp * self.micro_batch_size) == 0,
             f"global_batch_size={self.global_batch_size} is not divisible by data-parallel size "
             f"{dp} x micro_batch_size {self.micro_batch_size}")


@dataclass(kw_only=True)
class Optimizer:
    """Adam (megatron's distributed optimizer: bf16 params, fp32 main params and state), linear
    warmup then cosine decay from ``lr`` to ``min_lr`` over the run, gradient clipping."""

    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    BETAS: typing.ClassVar[tuple[float, float]] = (0.9, 0.95)  # Adam's, as the papers train

    def check(self, train_steps: int) -> None:
        need(0 <= self.warmup_steps < train_steps and 0 <= self.min_lr <= self.lr,
             f"need 0 <= warmup_steps ({self.warmup_steps}) < train_steps ({train_steps}) and "
             f"0 <= min_lr ({self.min_lr}) <= lr ({self.lr})")


@dataclass(kw_only=True)
class KD:
    """The distillation loss (see pare_nemo/distill.py):
    ``alpha CE + (1 - alpha) T^2 KD(teacher || student)`` on the logits, plus
    ``intermediate_weight x d(h_student[i], h_teacher[j])`` on layer outputs and
    ``embedding_weight x d(e_student, e_teacher)``."""

    kd: str = "forward"  # forward | reverse | jsd
    temperature: float = 1.0
    beta: float = 0.5  # jsd's teacher weight
    top_k: int | None = None  # KD on the teacher's top k tokens + one bucket for the rest
    alpha: float = 0.0  # CE weight
    intermediate_loss: str = "none"  # none | cosine | mse
    student_layers: list[int] | None = None  # default: every student layer
    teacher_layers: list[int] | None = None  # default: those the prune plan says they came from
    intermediate_weight: float = 1.0
    embedding_weight: float = 0.0
    hidden_match: str = "kept"  # kept | projection
    balance: bool = False  # scale each intermediate term to the KD term's magnitude

    def check(self) -> None:
        one_of("kd", self.kd, KD_KINDS)
        one_of("intermediate_loss", self.intermediate_loss, INTERMEDIATE)
        one_of("hidden_match", self.hidden_match, HIDDEN_MATCH)
        need(0.0 <= self.alpha <= 1.0, f"alpha={self.alpha}: the CE weight must be in [0, 1]")

    @property
    def states(self) -> bool:
        """Whether any hidden-state term is on."""
        return self.intermediate_loss != "none" or bool(self.embedding_weight)


@dataclass(kw_only=True)
class Run:
    """The run directory (``save_path``) and the loop's cadence. Running the same config again
    resumes; only the fields in ``RESUMABLE`` may differ on resume."""

    save_path: str
    save_interval: int = 500
    keep_last: int = 2
    log_interval: int = 10
    eval_interval: int = 0  # 0: no validation
    eval_samples: int = 64
    on_nan: str = "skip"  # skip | stop
    tensorboard: bool = True
    wandb: str | None = None  # a Weights & Biases project (WANDB_MODE=offline: local files only)

    # what may change when a run is resumed (every other field of the config sets the curve)
    RESUMABLE: typing.ClassVar[tuple[str, ...]] = (
        "save_interval", "keep_last", "log_interval", "eval_interval", "eval_samples", "on_nan",
        "tensorboard", "wandb")

    def check(self) -> None:
        one_of("on_nan", self.on_nan, ("skip", "stop"))
        need(min(self.save_interval, self.log_interval, self.keep_last) >= 1
             and self.eval_interval >= 0 and self.eval_samples >= 0,
             "save_interval, log_interval and keep_last must be >= 1")


@dataclass(kw_only=True)
class Downstream:
    """What ``pare eval`` adds to the losses (``report=false``: nothing): lm-eval ``tasks`` on
    each model's HF form, generation speed at ``batch_sizes``, samples, the side-by-side report."""

    report: bool = True
    tasks: str | None = None  # lm-eval task names, comma-separated
    num_fewshot: int | None = None
    task_limit: int | None = None
    chat_template: bool | None = None  # None: when the tokenizer has one
    max_new_tokens: int = 64
    batch_sizes: list[int] | None = None  # None: [1, 8]
    max_seq_lengths: list[int] | None = None  # long-context tasks (RULER): None: theirs (4096)

    def check(self) -> list[str]:
        """The task names (unknown ones are refused, by lm-eval's task index)."""
        sizes = self.batch_sizes or [1, 8]
        need(not self.report or (self.max_new_tokens >= 1 and min(sizes) >= 1),
             f"max_new_tokens={self.max_new_tokens} and batch_sizes={sizes} must be >= 1")
        names = [t.strip() for t in (self.tasks or "").split(",") if t.strip()]
        if names:
            from pare_nemo.report import check_tasks, task_manager

            check_tasks(names, task_manager(names))
        return names


# ---------------------------------------------------------------- stage configs


class Config:
    """A stage's config: a dataclass of plain fields and sections (dataclasses above)."""

    @classmethod
    def sections(cls) -> dict[str, type]:
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)
                if dataclasses.is_dataclass(hints[f.name])}

    @classmethod
    def leaves(cls) -> dict[str, tuple[str | None, dataclasses.Field, object]]:
        """Flat name -> (section or None, field, type), in declaration order."""
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            kind = hints[f.name]
            if dataclasses.is_dataclass(kind):
                sub = typing.get_type_hints(kind)
                out += [(g.name, (f.name, g, sub[g.name])) for g in dataclasses.fields(kind)]
            else:
                out.append((f.name, (None, f, kind)))
        names = [n for n, _ in out]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:  # flat keys must name one field
            raise TypeError(f"{cls.__name__}: field names {twice} appear in two sections")
        return dict(out)

    @classmethod
    def defaults(cls) -> dict:
        """Flat name -> default (``dataclasses.MISSING`` for a required one): the field's own, or
        what the stage's default section sets."""
        out = {}
        for name, (section, f, _) in cls.leaves().items():
            default = _default(f)
            if section is not None:
                owner = next(g for g in dataclasses.fields(cls) if g.name == section)
                made = _default(owner)
                if made is not dataclasses.MISSING:
                    default = getattr(made, name)
            out[name] = default
        return out

    @classmethod
    def of(cls, base: Config | None = None, **flat):
        """The config ``base`` (or the defaults) with the flat keys ``flat`` set; a TypeError for
        an unknown key or a missing required one (as a call with such arguments gets)."""
        if base is not None and not isinstance(base, cls):
            raise TypeError(f"expected a {cls.__name__}, got {type(base).__name__}")
        leaves = cls.leaves()
        values = base.flat() if base is not None else {}
        for key, value in flat.items():
            value = os.fspath(value) if isinstance(value, os.PathLike) else value
            name = key.split(".")[-1]
            if name not in leaves or ("." in key and key.split(".")[0] != leaves[name][0]):
                raise TypeError(f"{cls.__name__}: unknown argument {key!r}; expected one of "
                                 f"{', '.join(leaves)}")
            values[name] = value
        missing = [n for n, d in cls.defaults().items()
                   if d is dataclasses.MISSING and n not in values]
        if missing:
            raise TypeError(f"{cls.__name__}: missing required argument(s): "
                             f"{' '.join(f'{m}=…' for m in missing)}")
        top, parts = {}, {}
        for name, value in values.items():
            section = leaves[name][0]
            (top if section is None else parts.setdefault(section, {}))[name] = value
        for section, kind in cls.sections().items():
            owner = next(g for g in dataclasses.fields(cls) if g.name == section)
            made = _default(owner)
            start = {} if made is dataclasses.MISSING else dataclasses.asdict(made)
            top[section] = kind(**(start | parts.get(section, {})))
        return cls(**top)

    def flat(self) -> dict:
        """Flat name -> value (sections' leaves in place)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                out |= {g.name: getattr(value, g.name) for g in dataclasses.fields(value)}
            else:
                out[f.name] = value
        return out

    def to_dict(self) -> dict:
        """Nested plain data (JSON-ready): the form a run saves."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """Back from ``to_dict`` (or a flat dict, as older runs saved their arguments)."""
        flat = {}
        for k, v in d.items():
            flat |= v if isinstance(v, dict) and k in cls.sections() else {k: v}
        return cls.of(**flat)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


@dataclass(kw_only=True)
class ImportanceConfig(Config):
    """pare importance: score every FFN neuron, head, hidden channel and layer of a checkpoint."""

    megatron_path: str
    scores_path: str
    text: Text
    rows: Rows = field(default_factory=lambda: Rows(num_samples=1024))
    parallel: Parallel = field(default_factory=Parallel)
    aggregation: Aggregation = field(default_factory=Aggregation)
    layer_loss_samples: int = 64  # rows held out after the calibration rows, for layer_loss
    overwrite: bool = False
    report: bool = True  # <scores>.png and <scores>.md


@dataclass(kw_only=True)
class PruneConfig(Config):
    """pare prune: cut a checkpoint down to the target architecture using importance scores."""

    megatron_path: str
    scores_path: str
    save_path: str
    overwrite: bool = False
    targets: Targets = field(default_factory=Targets)
    depth: Depth = field(default_factory=Depth)
    parallel: Parallel = field(default_factory=Parallel)


@dataclass(kw_only=True)
class Latency:
    """How ``pare search`` prices a candidate's speed and memory, at ``latency_batch_size``
    sequences of ``latency_context`` tokens in ``latency_dtype``: ``latency=model`` is a roofline
    estimate from the shape and a hardware's figures (``hardware``: h100 | h200 | a100 | cpu, the
    CPU probed; None: this machine), ``measured`` times prefill and decode steps of the shape on
    this machine (median of repeats after warm-up)."""

    latency: str = "model"  # model | measured
    hardware: str | None = None
    latency_batch_size: int = 1
    latency_context: int = 4096
    latency_dtype: str = "bfloat16"

    def check(self) -> None:
        from pare_nemo.search import HARDWARE

        one_of("latency", self.latency, LATENCY_KINDS)
        need(self.hardware is None or self.hardware in (*HARDWARE, "cpu"),
             f"hardware={self.hardware!r}: expected one of {(*HARDWARE, 'cpu')} (or none: this "
             "machine's)")
        need(self.latency == "model" or self.hardware is None,
             f"latency=measured times this machine; hardware={self.hardware!r} is for "
             "latency=model")
        one_of("latency_dtype", self.latency_dtype, DTYPES)
        need(self.latency_batch_size >= 1 and self.latency_context >= 1,
             "latency_batch_size and latency_context must be >= 1")


@dataclass(kw_only=True)
class Retrain:
    """The short distillation of the ``retrain_top`` best zero-shot candidates (the Minitron papers'
    practice: zero-shot rankings are unstable): each is built by ``pare prune``'s function and
    distilled ``retrain_steps`` steps of ``retrain_batch_size`` rows (the search's seq_length and
    micro_batch_size) by ``pare distill``'s loop from ``teacher_path`` (None: the searched
    checkpoint) on ``distill_data`` (prepare-data prefixes; the same rows and seed for every
    candidate), then scored by ``pare eval``'s function on ``score_samples`` rows of the data's
    validation split. Each candidate's files are under ``retrain_dir`` (None: beside out_path);
    a search run again redoes only unfinished candidates."""

    retrain_top: int = 0
    retrain_steps: int = 100
    teacher_path: str | None = None
    distill_data: str | None = None
    retrain_batch_size: int = 32
    retrain_lr: float = 1e-4  # cosine to a tenth of it
    retrain_warmup: int = 0
    retrain_dtype: str = RUN_DTYPE
    score_samples: int = 64
    retrain_dir: str | None = None

    def check(self, dp: int, micro_batch_size: int) -> None:
        need(self.retrain_top >= 0, f"retrain_top={self.retrain_top} must be >= 0")
        if not self.retrain_top:
            return
        need(bool(self.distill_data), "retrain_top needs distill_data= (pare prepare-data "
                                      "prefixes the candidates are distilled on)")
        one_of("retrain_dtype", self.retrain_dtype, DTYPES)
        need(self.retrain_steps >= 1 and self.score_samples >= 1 and self.retrain_lr > 0
             and 0 <= self.retrain_warmup < self.retrain_steps,
             f"retrain_steps={self.retrain_steps} and score_samples={self.score_samples} must be "
             f">= 1, retrain_lr > 0, 0 <= retrain_warmup < retrain_steps")
        need(self.retrain_batch_size % (dp * micro_batch_size) == 0,
             f"retrain_batch_size={self.retrain_batch_size} is not divisible by data-parallel "
             f"size {dp} x micro_batch_size {micro_batch_size}")


@dataclass(kw_only=True)
class SearchConfig(Config):
    """pare search: rank candidate architectures under a parameter, latency or memory budget by
    zero-shot loss, then (``retrain_top``) by the loss after a short distillation."""

    megatron_path: str
    scores_path: str
    text: Text
    budget: float | None = None  # parameters
    tolerance: float = 0.05  # candidates within budget x (1 +- tolerance)
    budget_latency: float | None = None  # seconds per decode step (latency section's shape)
    budget_memory: float | None = None  # bytes: weights + KV cache (latency section's shape)
    rows: Rows = field(default_factory=lambda: Rows(num_samples=64))
    parallel: Parallel = field(default_factory=Parallel)
    grid: Grid = field(default_factory=Grid)
    depth: Depth = field(default_factory=Depth)
    latency: Latency = field(default_factory=Latency)
    retrain: Retrain = field(default_factory=Retrain)
    out_path: str | None = None  # default: search.json beside the scores
    top: int = 10  # rows printed


@dataclass(kw_only=True)
class DistillConfig(Config):
    """pare distill: distill a pruned student from its teacher (logit KD + optional intermediate
    losses)."""

    models: Models
    data: Data
    run: Run
    batch: Batch = field(default_factory=Batch)
    optimizer: Optimizer = field(default_factory=Optimizer)
    kd: KD = field(default_factory=KD)
    parallel: Parallel = field(default_factory=Parallel)


@dataclass(kw_only=True)
class EvalConfig(Config):
    """pare eval: held-out loss/PPL of checkpoints on the same tokens; tasks, speed and the
    report."""

    checkpoints: str  # name:path,name:path (a name is optional)
    data: str  # a prepare-data prefix or blend (its validation split), or raw text
    output: str = "eval.json"  # a folder or a .json file
    rows: Rows = field(default_factory=lambda: Rows(num_samples=128))
    parallel: Parallel = field(default_factory=Parallel)
    downstream: Downstream = field(default_factory=Downstream)
    split: str | None = None  # None: a distillation run's, else DEFAULT_SPLIT (prefix) / train
    pack: bool = True
    document_mask: bool = True
    dtype: str | None = None  # None: each checkpoint's own
    seed: int = 1234
    # the loss by position in the document, in buckets of this many tokens, on documents longer
    # than one bucket; None: the checkpoints' smallest sliding window; 0: not measured
    position_bucket: int | None = None
    overwrite: bool = False


@dataclass(kw_only=True)
class TeacherLogitsConfig(Config):
    """pare teacher-logits: the teacher's top-k log-probs over the rows a distillation reads."""

    teacher_path: str
    output: str
    data: Data  # the distillation's: the same prefixes, split, seed, document mask
    batch: Batch = field(default_factory=Batch)  # the distillation's: train_steps x global batch
    valid_samples: int = 0  # validation rows too: the distillation's eval_samples (eval_interval)
    top_k: int = 64
    temperature: float = 1.0  # of softmax(logits / T); distillation must use the same
    logprob_dtype: str = "float16"  # float16 | float32: how the log-probs are stored
    shard_rows: int = 256  # rows per file: a killed run redoes at most one file per DP rank
    dtype: str = RUN_DTYPE
    parallel: Parallel = field(default_factory=Parallel)
    overwrite: bool = False

    def check(self) -> None:
        one_of("dtype", self.dtype, DTYPES)
        one_of("logprob_dtype", self.logprob_dtype, ("float16", "float32"))
        need(self.top_k >= 1 and self.temperature > 0 and self.valid_samples >= 0,
             f"top_k={self.top_k} must be >= 1, temperature={self.temperature} > 0, "
             f"valid_samples={self.valid_samples} >= 0")
        mbs = self.batch.micro_batch_size
        need(self.shard_rows >= 1 and self.shard_rows % mbs == 0 and self.valid_samples % mbs == 0,
             f"shard_rows={self.shard_rows} and valid_samples={self.valid_samples} must be "
             f"multiples of micro_batch_size={mbs}")


@dataclass(kw_only=True)
class SparsifyConfig(Config):
    """pare sparsify: zero a fraction of every decoder linear's weights (Wanda, SparseGPT or
    magnitude), unstructured or N:M, keeping the architecture."""

    megatron_path: str
    save_path: str
    method: str = "wanda"  # wanda | sparsegpt | magnitude
    sparsity: float | None = None  # None: 0.5, or N/M for pattern=N:M
    pattern: str = "unstructured"  # or N:M: N of every M consecutive input weights are zero
    damp: float = 0.01  # sparsegpt: added to H's diagonal, as a fraction of its mean
    held_out_samples: int = 16  # rows after the calibration rows: the loss before and after
    overwrite: bool = False
    text: Text  # calibration text, read as importance reads it
    rows: Rows = field(default_factory=lambda: Rows(num_samples=128))
    parallel: Parallel = field(default_factory=Parallel)

    def check(self) -> tuple[int, int] | None:
        """(N, M) of an N:M pattern, or None; sets ``sparsity`` when it was left to the pattern."""
        import re

        one_of("method", self.method, SPARSITY_METHODS)
        nm = None
        if self.pattern != "unstructured":
            m = re.fullmatch(r"(\d+):(\d+)", self.pattern)
            need(m is not None and 0 < int(m[1]) < int(m[2]),
                 f"pattern={self.pattern!r}: expected unstructured or N:M with 0 < N < M (2:4)")
            nm = int(m[1]), int(m[2])
            need(self.sparsity in (None, nm[0] / nm[1]),
                 f"sparsity={self.sparsity} disagrees with pattern={self.pattern} (which zeroes "
                 f"{nm[0] / nm[1]:g} of the weights): leave sparsity out")
            self.sparsity = nm[0] / nm[1]
        elif self.sparsity is None:
            self.sparsity = 0.5
        need(0 < self.sparsity < 1, f"sparsity={self.sparsity} must be in (0, 1)")
        need(self.damp > 0 and self.held_out_samples >= 0,
             f"damp={self.damp} must be > 0 and held_out_samples={self.held_out_samples} >= 0")
        return nm


@dataclass(kw_only=True)
class QuantizeConfig(Config):
    """pare quantize: post-training quantization (fp8 / int8) with NVIDIA ModelOpt into an HF
    checkpoint vLLM / TensorRT-LLM load, with the held-out loss before and after."""

    output: str
    megatron_path: str | None = None  # a Pare checkpoint (exported to HF first), or:
    hf_path: str | None = None  # an HF model directory
    format: str = "fp8"  # fp8 | int8 (SmoothQuant W8A8) | int8_wo (weight-only)
    held_out_samples: int = 16  # rows after the calibration rows: the loss before and after
    dtype: str = "bfloat16"  # calibration, and the tensors left unquantized
    overwrite: bool = False
    text: Text  # calibration text, read as importance reads it
    rows: Rows = field(default_factory=lambda: Rows(num_samples=128, seq_length=2048))

    def check(self) -> str:
        """The source checkpoint's path."""
        from pathlib import Path

        one_of("format", self.format, QUANT_FORMATS)
        one_of("dtype", self.dtype, DTYPES)
        need(bool(self.megatron_path) != bool(self.hf_path),
             "give megatron_path= (a Pare checkpoint) or hf_path= (an HF model directory), "
             "exactly one")
        need(self.held_out_samples >= 0 and self.rows.num_samples >= 1
             and self.rows.micro_batch_size >= 1,
             "num_samples and micro_batch_size must be >= 1, held_out_samples >= 0")
        if self.megatron_path:
            from pare_nemo.checkpoint import read_model_config

            read_model_config(self.megatron_path)  # a clear error if it is not one
            return self.megatron_path
        if not (Path(self.hf_path) / "config.json").is_file():
            raise FileNotFoundError(f"hf_path={self.hf_path} has no config.json (an HF model "
                                    "directory, e.g. pare export's output)")
        return self.hf_path


STAGES = {"importance": ImportanceConfig, "prune": PruneConfig, "search": SearchConfig,
          "distill": DistillConfig, "eval": EvalConfig, "teacher-logits": TeacherLogitsConfig,
          "sparsify": SparsifyConfig, "quantize": QuantizeConfig}
