"""``pare eval``: held-out LM loss and perplexity of any number of checkpoints on the same tokens,
for the compression report (teacher vs pruned vs distilled).

Checkpoints are Pare Megatron checkpoints (loaded at the given TP/PP; the loss is the shared
vocab-parallel :func:`pare_nemo.losses.cross_entropy`, through
:func:`pare_nemo.losses.next_token_nll`, the one loss definition of every stage) or Hugging Face
model directories / Hub ids (transformers; fp32 on CPU). Every checkpoint sees the same rows:

- a ``pare prepare-data`` prefix (or a blend ``w:prefix,w:prefix``): rows of its **validation
  split**, built exactly as distillation builds its validation rows (megatron's GPTDataset, same
  ``split`` and ``seed``), so the documents were never trained on by ``pare distill``. When a
  distillation run among the checkpoints (its ``distill_args.json``) read one of these prefixes, its
  ``split`` is used, and another one is refused;
- raw text as importance reads it (``pydoc``, a .txt / .jsonl / .parquet file, an HF dataset id):
  rows from the start, after the rows importance consumed when a pruned checkpoint's
  ``prune_plan.json`` names scores computed on the same data. Raw data a distillation run was
  trained on (the source its prefix was prepared from) is refused: evaluate on the prefix instead.

Rows are packed documents; with ``document_mask=True`` (the default, as distillation trains) each
token sees only its own document, with positions restarting per document: the Megatron model gets
document ids, transformers runs each document of a row on its own.

The result, one dict per checkpoint ``{name, path, kind, params, non_embedding_params, loss, ppl,
tokens, …}``, is written as a JSON list (``eval.json``, written to a temporary file and renamed)
and printed as a table. ``params`` counts every weight (untied embedding and output layer);
``non_embedding_params`` leaves out the input embedding only, as transformers'
``num_parameters(exclude_embeddings=True)`` does.

Long context: ``by_position`` holds the loss by a token's position in its document, in buckets
of ``position_bucket`` tokens (default: the smallest sliding window), over documents longer than
one bucket. Past the window only full-attention layers see earlier tokens: a model that dropped
them (depth pruning) can look fine on the mean loss and still show no gain past the window.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from pare_nemo.config import DEFAULT_SPLIT, Data, EvalConfig, need

EVAL_FILE = "eval.json"
DTYPES = ("float32", "bfloat16", "float16")  # what checkpoints are evaluated in


@dataclass
class Checkpoint:
    name: str
    path: Path
    kind: str  # "megatron" | "hf"
    config: object  # the HF config (Olmo3Config for Megatron checkpoints)
    tokenizer_dir: Path


def parse_checkpoints(checkpoints: str | list[str]) -> list[tuple[str, str]]:
    """``name:path,name:path`` (a name is optional: a path alone is named after its last folder; a
    list of such items also does) -> [(name, path)], names unique."""
    items = checkpoints.split(",") if isinstance(checkpoints, str) else list(checkpoints)
    out = []
    for item in (s.strip() for s in items):
        if not item:
            continue
        name, sep, path = item.partition(":")
        if not sep or "/" in name or not name or not path:  # no name (a path, a Hub id)
            name, path = Path(item.rstrip("/")).name or item, item
        out.append((name, path))
    if not out:
        raise ValueError("no checkpoints given: checkpoints=name:path,name:path (name optional)")
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"checkpoint names {dup} are given more than once; name them apart: "
                         "checkpoints=teacher:/a,student:/b")
    return out


def find_checkpoint(name: str, path: str) -> Checkpoint:
    """A Pare Megatron checkpoint (model_config.json) or an HF model directory (config.json) or
    Hub id; a clear error naming the checkpoint otherwise."""
    from pare_nemo.checkpoint import CONFIG_FILE, TOKENIZER_DIR, read_model_config

    local = Path(path).expanduser()
    if local.is_dir() and (local / CONFIG_FILE).exists():
        cfg, _, _ = read_model_config(local)
        return Checkpoint(name, local, "megatron", cfg, local / TOKENIZER_DIR)
    if local.is_dir() and (local / "config.json").exists():
        hf_dir = local
    elif local.exists():
        raise FileNotFoundError(f"checkpoint {name!r} ({path}) is neither a Pare Megatron "
                                f"checkpoint ({CONFIG_FILE}) nor a Hugging Face model directory "
                                "(config.json)")
    else:
        from conversion.convert import CheckpointError, resolve_hf_path

        try:
            hf_dir = resolve_hf_path(path)
        except CheckpointError as e:
            raise FileNotFoundError(f"checkpoint {name!r} ({path}) does not exist: {e}") from None
        if not (hf_dir / "config.json").exists():
            raise FileNotFoundError(f"checkpoint {name!r} ({path}) has no config.json")
    from transformers import AutoConfig

    return Checkpoint(name, hf_dir, "hf", AutoConfig.from_pretrained(hf_dir), hf_dir)


def param_counts(ckpt: Checkpoint) -> tuple[int, int]:
    """(all parameters, all but the input embedding) of a Megatron checkpoint, from its config
    (the HF shapes: no vocabulary padding), as transformers counts the exported model."""
    from pare_nemo.prune import num_params

    c = ckpt.config
    total = num_params(c)
    return total, total - c.vocab_size * c.hidden_size


# ---------------------------------------------------------------- which rows are held out


def _distill_runs(checkpoints: list[Checkpoint]) -> list[tuple[str, Data]]:
    """(checkpoint name, the data its run trained on) of the distillation runs among the
    checkpoints."""
    from pare_nemo import rundir

    runs = [(c.name, rundir.read_data(c.path)) for c in checkpoints if c.kind == "megatron"]
    return [(name, data) for name, data in runs if data is not None]


def _same_path(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def prefix_split(prefixes: list[str], split: str | None, runs: list[tuple[str, Data]]) -> str:
    """The train,valid,test split to read the prefixes' validation part with: the one the
    distillation runs that read these prefixes used (another is refused), else ``split`` or
    distill's default."""
    from pare_nemo.data import parse_data

    used = {}
    for name, run in runs:
        theirs = parse_data(run.data)[0]
        if any(_same_path(p, q) for p in prefixes for q in theirs):
            used[name] = run.split
    if len(set(used.values())) > 1:
        raise ValueError(f"the distillation runs {sorted(used)} read this data with different "
                         f"splits {used}: no one validation split is held out for all of them")
    if used:
        theirs = next(iter(used.values()))
        if split is not None and split != theirs:
            raise ValueError(f"split={split!r}, but distillation run {next(iter(used))!r} trained "
                             f"on this data with split={theirs!r}: another split would evaluate "
                             f"documents it trained on; use split={theirs!r} (the default)")
        return theirs
    return split or DEFAULT_SPLIT


def check_prefix_rows(prefixes: list[str], weights: list[float] | None, split: str,
                      num_samples: int, seq_length: int) -> None:
    """The validation split must hold ``num_samples`` distinct rows (megatron would repeat an epoch
    rather than fail): per prefix, what the blend asks of it."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from pare_nemo.data import DataError, NotEnoughData, _split_ranges

    try:
        valid_range = _split_ranges(1, split)[1]
    except (AssertionError, ValueError, ZeroDivisionError):
        raise DataError(f"split={split!r} must be 'train,valid,test' weights, e.g. '98,2,0'") \
            from None
    if valid_range is None:
        raise DataError(f"split={split!r} has no validation part: evaluation reads the held-out "
                        "validation documents of a prepared prefix")
    rows = []
    for p in prefixes:
        index = IndexedDataset(str(Path(p).expanduser()))
        lengths = index.sequence_lengths.astype("int64")
        del index
        b, e = _split_ranges(len(lengths), split)[1]
        rows.append(int(lengths[b:e].sum()) // seq_length)
    if weights is None:
        need = [num_samples] if len(prefixes) == 1 else None
        if need is None and sum(rows) < num_samples:
            raise NotEnoughData(f"the validation split ({split}) of {prefixes} holds {sum(rows)} "
                                f"rows of {seq_length} tokens; num_samples={num_samples} were "
                                "asked for")
    else:
        total = sum(weights)
        need = [math.ceil(math.ceil(num_samples * w / total) * 1.005) for w in weights]
    for p, have, want in zip(prefixes, rows, need or []):
        if have < want:
            raise NotEnoughData(f"the validation split ({split}) of {p} holds {have} rows of "
                                f"{seq_length} tokens; {want} are needed for num_samples="
                                f"{num_samples}: ask for fewer samples or shorter rows")


def raw_start_row(data: str, seq_length: int, pack: bool, split: str,
                  checkpoints: list[Checkpoint]) -> tuple[int, list[str]]:
    """(first row to evaluate, notes): the rows importance consumed on ``data`` (recorded in the
    scores a pruned checkpoint's prune_plan.json names) are skipped."""
    from pare_nemo.prune import load_plan

    start, notes = 0, []
    for c in checkpoints:
        plan = load_plan(c.path) if c.kind == "megatron" else None
        if not plan or not plan.get("scores"):
            continue
        scores = Path(plan["scores"])
        if not scores.is_file():
            notes.append(f"{c.name}: its importance scores {scores} are not here, so the rows "
                         "importance used cannot be skipped")
            continue
        meta = torch.load(scores, weights_only=True).get("metadata", {})
        if meta.get("data") != data or bool(meta.get("pack", True)) != pack \
                or meta.get("split", "train") != split or "rows_used" not in meta:
            continue
        used = meta["rows_used"]
        # packed rows are consecutive tokens: skip the importance tokens at this row length
        skip = -(-used * meta["seq_length"] // seq_length) if pack else used
        if skip > start:
            start = skip
            notes.append(f"rows 0..{skip} skipped: importance of {c.name} used them ({scores})")
    return start, notes


def refuse_distillation_text(data: str, runs: list[tuple[str, Data]]) -> None:
    """Raw data that a distillation run among the checkpoints was trained on is refused."""
    from pare_nemo.data import parse_data

    for name, run in runs:
        for p in parse_data(run.data)[0]:
            meta_file = Path(p + ".json").expanduser()
            if not meta_file.exists():
                continue
            source = str(json.loads(meta_file.read_text()).get("source"))
            if source == data or (Path(source).exists() and Path(data).exists()
                                  and _same_path(source, data)):
                raise ValueError(
                    f"distillation run {name!r} was trained on {data} (prepared as {p}): its "
                    f"rows here would not be held out; evaluate on data={p} (its validation "
                    "split is held out) or on other data")


# ---------------------------------------------------------------- losses


def megatron_loss(ckpt: Checkpoint, tokens, mask, docs, micro_batch_size: int, dtype,
                  document_mask: bool, buckets=None, num_buckets: int = 0):
    """([1 + num_buckets, 2] (summed next-token NLL, predicted tokens) of a Megatron checkpoint
    over all rows, then per position bucket (:func:`position_buckets`), at the current TP/PP, rows
    split over the data-parallel ranks; the same on every rank, the fraction of its decoder linear
    weights that are zero)."""
    from pare_nemo.checkpoint import load_model
    from pare_nemo.engine import data_parallel_share, forward_loss_sums

    overrides = {"apply_rope_fusion": False} if document_mask else {}  # per-document positions
    model, cfg = load_model(ckpt.path, parallel_output=True, dtype=dtype, uneven_pipeline=True,
                            **overrides)
    model.eval()
    share = data_parallel_share
    out = forward_loss_sums(model, share(tokens), share(mask), micro_batch_size, cfg.vocab_size,
                            None if docs is None else share(docs),
                            None if buckets is None else share(buckets), num_buckets)
    from pare_nemo.sparsify import zero_fraction

    sparsity = zero_fraction(model)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out, sparsity


def hf_loss(ckpt: Checkpoint, tokens, mask, docs, micro_batch_size: int, dtype, buckets=None,
            num_buckets: int = 0) -> tuple[torch.Tensor, int, int, str, float]:
    """(the sums of :func:`megatron_loss`, params, non-embedding params, dtype, the zero fraction of
    its decoder linear weights) of an HF model with transformers (a ModelOpt export dequantized by
    :func:`pare_nemo.quantize.load_causal_lm`), rows split over all ranks. With ``docs`` each
    document of a row runs alone (exactly what the Megatron model's document mask computes); the
    logits are then one row's again and the loss is :func:`pare_nemo.losses.next_token_losses` as
    for Megatron."""
    from pare_nemo.losses import grouped_sums, next_token_losses
    from pare_nemo.parallel import device
    from pare_nemo.quantize import load_causal_lm

    dev = device()
    model = load_causal_lm(ckpt.path, dtype=dtype).to(dev).eval()
    vocab = model.config.vocab_size
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    tok, msk = tokens[rank::world], mask[rank::world]
    d = None if docs is None else docs[rank::world]
    g = None if buckets is None else buckets[rank::world]
    total = torch.zeros(1 + num_buckets, 2, dtype=torch.float64, device=dev)
    with torch.no_grad():
        for i in range(0, len(tok), micro_batch_size):
            t, m = tok[i:i + micro_batch_size].to(dev), msk[i:i + micro_batch_size].to(dev)
            if d is None:
                logits = model(input_ids=t).logits
            else:
                logits = torch.stack([
                    torch.cat([model(input_ids=seg[None]).logits[0]
                               for seg in row.split(_segment_lengths(ids))])
                    for row, ids in zip(t, d[i:i + micro_batch_size])])
            per_token, keep = next_token_losses(logits, t, m, vocab)
            total += grouped_sums(per_token, keep, None if g is None else
                                  g[i:i + micro_batch_size].to(dev), num_buckets)
    params, non_emb = model.num_parameters(), model.num_parameters(exclude_embeddings=True)
    used = str(model.dtype).removeprefix("torch.")
    linears = [m.weight for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n]
    sparsity = (sum(int((w == 0).sum()) for w in linears) / max(1, sum(w.numel() for w in linears)))
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if dist.is_initialized():
        dist.all_reduce(total)
    return total, params, non_emb, used, sparsity


def position_buckets(tokens: torch.Tensor, docs: torch.Tensor | None,
                     width: int) -> tuple[torch.Tensor, int]:
    """(bucket [N, S] of the loss at each position, number of buckets): the loss at position ``i``
    predicts token ``i + 1``; its bucket is that token's position in its document // ``width``
    (0: positions 1..width-1, 1: width..2·width-1, …), counted only in documents longer than
    ``width`` tokens (in this row) and -1 elsewhere (a document's first token, which the previous
    document's end predicts; short documents). Without ``docs`` a row is one document."""
    from pare_nemo.olmo3.model import segments

    n, s = tokens.shape
    docs = torch.zeros_like(tokens) if docs is None else docs
    seg, pos = segments(docs)
    ids = seg + (torch.arange(n) * (s + 1))[:, None]  # unique over rows
    _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    length = counts[inverse]
    def nxt(t):  # the predicted token's
        return torch.roll(t, -1, dims=1)

    buckets = torch.where((nxt(seg) == seg) & (nxt(length) > width), nxt(pos) // width, -1)
    buckets[:, -1] = -1
    return buckets, -(-s // width)


def _segment_lengths(doc_ids: torch.Tensor) -> list[int]:
    return torch.unique_consecutive(doc_ids, return_counts=True)[1].tolist()


# ---------------------------------------------------------------- the stage


@dataclass
class Checked:
    """What ``check`` learned before any work: the checkpoints, the rows to read, the DP size."""

    checkpoints: list[Checkpoint]
    output: Path  # eval.json
    tasks: list[str]
    dp: int
    eos: int | None
    prefixes: list[str] | None  # a prepare-data prefix (blend): its validation split is read
    weights: list[float] | None
    split: str
    start: int  # raw text: the first row no stage used
    tokenizer: object
    notes: list[str]


def check(cfg: EvalConfig) -> Checked:
    """Everything checked before any work starts: a clear error for bad input, nothing written."""
    from pare_nemo.data import PYDOC, _looks_like_path, check_data, parse_data

    rows, par = cfg.rows, cfg.parallel
    named = parse_checkpoints(cfg.checkpoints)
    rows.check()
    need(cfg.position_bucket is None or cfg.position_bucket >= 0,
         f"position_bucket={cfg.position_bucket} must be >= 0 (0: no loss by position)")
    need(cfg.dtype is None or cfg.dtype in DTYPES,
         f"dtype={cfg.dtype!r}: expected one of {DTYPES} (or none: the checkpoint's)")
    out = Path(cfg.output).expanduser()
    out = out if out.suffix == ".json" else out / EVAL_FILE
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"output {out} already exists; pass overwrite=true to replace it")
    report_dir = out.parent / REPORT_DIR
    if cfg.downstream.report and report_dir.exists() and not cfg.overwrite:
        raise FileExistsError(f"report {report_dir} already exists; pass overwrite=true to "
                              "replace it")
    tasks = cfg.downstream.check()  # unknown task names: before any work
    ckpts = [find_checkpoint(n, p) for n, p in named]
    megatron = [c for c in ckpts if c.kind == "megatron"]
    for c in megatron:
        try:
            par.check(c.config, uneven=True)
        except ValueError as e:
            raise ValueError(f"checkpoint {c.name!r}: {e}") from None
    dp = par.check()
    if megatron:  # (transformers runs its rows one micro-batch at a time, any count)
        rows.check(*[c.config for c in megatron], dp=dp)
    for c in ckpts:
        need(c.kind == "megatron"
             or rows.seq_length <= getattr(c.config, "max_position_embeddings", rows.seq_length),
             f"seq_length={rows.seq_length} is longer than checkpoint {c.name!r}'s context "
             f"({getattr(c.config, 'max_position_embeddings', None)})")
    tokenizer, fingerprint = same_tokenizer(ckpts)
    eos = tokenizer.eos_token_id
    need(not cfg.document_mask or eos is not None,
         f"the tokenizer of {ckpts[0].name!r} has no EOS token, so packed rows have no document "
         "boundaries: pass document_mask=false")
    runs = _distill_runs(ckpts)
    prefixes, weights = parse_data(cfg.data)
    start, notes = 0, []
    if any(Path(p + ".bin").expanduser().exists() for p in prefixes):
        prefixes, weights = check_data(cfg.data)
        for p in prefixes:
            meta = Path(p + ".json").expanduser()
            need(not meta.exists() or json.loads(meta.read_text()).get("tokenizer_sha256")
                 == fingerprint, f"data {p} was tokenized with another tokenizer than the "
                                 "checkpoints'; run pare prepare-data with their tokenizer")
        split = prefix_split(prefixes, cfg.split, runs)
        check_prefix_rows(prefixes, weights, split, rows.num_samples, rows.seq_length)
    else:
        if cfg.data != PYDOC and _looks_like_path(cfg.data) and not Path(
                cfg.data).expanduser().exists():
            raise FileNotFoundError(f"data {cfg.data} does not exist (neither a prepare-data "
                                    f"prefix {cfg.data}.bin / .idx nor a file)")
        prefixes = weights = None
        split = cfg.split or "train"
        refuse_distillation_text(cfg.data, runs)
        start, notes = raw_start_row(cfg.data, rows.seq_length, cfg.pack, split, ckpts)
    return Checked(ckpts, out, tasks, dp, eos, prefixes, weights, split, start, tokenizer, notes)


def same_tokenizer(ckpts: list[Checkpoint]):
    """(the first checkpoint's tokenizer, its fingerprint); every checkpoint must have the same."""
    from transformers import AutoTokenizer

    from pare_nemo.data import tokenizer_fingerprint

    fingerprints, tokenizer = {}, None
    for c in ckpts:
        try:
            tok = AutoTokenizer.from_pretrained(c.tokenizer_dir)
        except Exception as e:  # OSError / ValueError: no tokenizer there
            raise FileNotFoundError(f"checkpoint {c.name!r} has no tokenizer in {c.tokenizer_dir}"
                                    f": {e}") from None
        fingerprints[c.name] = (tokenizer_fingerprint(tok), tok.eos_token_id)
        tokenizer = tokenizer or tok
    first = ckpts[0].name
    differ = [n for n, f in fingerprints.items() if f != fingerprints[first]]
    need(not differ, f"the tokenizers of {differ} differ from {first!r}'s (vocabulary or EOS): "
                     "losses on different tokens are not comparable; evaluate them separately")
    return tokenizer, fingerprints[first][0]


def held_out_rows(cfg: EvalConfig, checked: Checked):
    """(rows, where they came from): the same rows for every checkpoint."""
    from pare_nemo.data import DataError, batch_at, load_token_data, training_dataset

    n, S, split = cfg.rows.num_samples, cfg.rows.seq_length, checked.split
    if checked.prefixes is None:  # raw text, after the rows other stages used
        rows = load_token_data(cfg.data, checked.tokenizer, checked.start + n, S, pack=cfg.pack,
                               split=split)[checked.start:]
        return rows, {"split": split, "rows": [checked.start, checked.start + n],
                      "pack": cfg.pack}
    _, valid = training_dataset(checked.prefixes, S, 1, 1, cfg.seed, checked.eos, split=split,
                                weights=checked.weights, valid_samples=n)
    if valid is None or len(valid) < n:
        raise DataError(f"the validation split ({split}) of {cfg.data} gives "
                        f"{0 if valid is None else len(valid)} rows; {n} were asked for")
    return batch_at(valid, 0, n), {"split": split, "part": "valid", "seed": cfg.seed}


def bucket_width(cfg: EvalConfig, checkpoints: list[Checkpoint]) -> int:
    """The position buckets' width: ``position_bucket``, else the checkpoints' smallest sliding
    window; 0 (no loss by position) where that leaves a single bucket."""
    width = cfg.position_bucket
    if width is None:
        windows = [c.config.sliding_window for c in checkpoints
                   if getattr(c.config, "sliding_window", None)
                   and "sliding_attention" in (getattr(c.config, "layer_types", None) or [])]
        width = min(windows, default=0)
    return width if 0 < width < cfg.rows.seq_length else 0


def loss_of(c: Checkpoint, cfg: EvalConfig, rows, docs, dp: int, buckets=None,
            width: int = 0) -> dict:
    """One checkpoint's row of eval.json (without the data's description); with ``buckets``
    (:func:`position_buckets` of ``width``) its loss by position, ``by_position``."""
    from pare_nemo.checkpoint import read_model_config
    from pare_nemo.parallel import world_size
    from pare_nemo.quantize import bits

    mbs = cfg.rows.micro_batch_size
    nb = 0 if buckets is None else -(-cfg.rows.seq_length // width)
    if c.kind == "megatron":
        dt = getattr(torch, cfg.dtype) if cfg.dtype else None
        sums, sparsity = megatron_loss(c, rows.tokens, rows.mask, docs, mbs, dt,
                                       cfg.document_mask, buckets, nb)
        params, non_emb = param_counts(c)
        used = str(dt or read_model_config(c.path)[2]).removeprefix("torch.")
        par = {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "dp": dp}
    else:
        dt = getattr(torch, cfg.dtype) if cfg.dtype else (
            "auto" if torch.cuda.is_available() else torch.float32)
        sums, params, non_emb, used, sparsity = hf_loss(c, rows.tokens, rows.mask, docs, mbs,
                                                        dt, buckets, nb)
        par = {"dp": world_size()}
    sums = sums.cpu().tolist()
    n, loss = sums[0][1], sums[0][0] / sums[0][1]
    out = {"name": c.name, "path": str(c.path), "kind": c.kind, "params": params,
           "non_embedding_params": non_emb, "loss": loss, "ppl": math.exp(loss), "tokens": int(n),
           "dtype": used, "sparsity": sparsity, "bits": bits(c.path, used), "parallel": par}
    if nb:
        out["by_position"] = {
            "bucket": width,
            "start": [k * width for k in range(nb)],
            "loss": [s / m if m else None for s, m in sums[1:]],
            "tokens": [int(m) for _, m in sums[1:]]}
    return out


def evaluate(cfg: EvalConfig | None = None, **flat) -> str:
    """Held-out loss/perplexity of checkpoints on the same tokens; tasks, speed and the report."""
    from rich.console import Console

    from pare_nemo.olmo3.model import document_ids
    from pare_nemo.parallel import distributed

    cfg = EvalConfig.of(cfg, **flat)
    checked = check(cfg)
    out, down = checked.output, cfg.downstream
    results = []
    with distributed(cfg.parallel.tp, cfg.parallel.pp):
        rank0 = dist.get_rank() == 0
        say = Console().print if rank0 else (lambda *a, **k: None)
        rows, where = held_out_rows(cfg, checked)
        docs = document_ids(rows.tokens, checked.eos) if cfg.document_mask else None
        data_info = {"data": cfg.data, **where, "num_samples": cfg.rows.num_samples,
                     "seq_length": cfg.rows.seq_length, "document_mask": cfg.document_mask,
                     "sha256": rows.sha256()}
        width = bucket_width(cfg, checked.checkpoints)
        buckets = position_buckets(rows.tokens, docs, width)[0] if width else None
        if buckets is not None and not (buckets >= 0).any():
            say(f"no document is longer than {width} tokens: no loss by position")
            buckets = None
        for n in checked.notes:
            say(n)
        for c in checked.checkpoints:
            say(f"evaluating {c.name} ({c.kind}: {c.path})")
            results.append(loss_of(c, cfg, rows, docs, checked.dp, buckets, width) | data_info)
        if rank0:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_results(out, results)
            print_table(results)
            print(f"results: {out}")
        dist.barrier()
    if down.report and rank0:  # on exported HF models, in this process alone
        compression_report(results, out, checked.tasks, down.num_fewshot, down.task_limit,
                           down.chat_template, down.max_new_tokens,
                           list(down.batch_sizes or (1, 8)), cfg.overwrite, down.max_seq_lengths)
    return str(out)


def compression_report(results: list[dict], out: Path, tasks: list[str],
                       num_fewshot: int | None, task_limit: int | None,
                       chat_template: bool | None, max_new_tokens: int, batch_sizes: list[int],
                       overwrite: bool, max_seq_lengths: list[int] | None = None) -> Path:
    """Downstream tasks (lm-eval), generation speed and sample generations of every checkpoint's
    HF form (a Megatron checkpoint is exported first, to ``<output dir>/hf/<name>``), added to
    ``results`` and eval.json, and the side-by-side report in ``<output dir>/report``."""
    from conversion.convert import export_hf
    from pare_nemo import report as rep
    from pare_nemo.parallel import this_process_alone

    for r in results:
        hf_dir = r["path"]
        if r["kind"] == "megatron":  # rank 0 alone: the other ranks have left the job's group
            with this_process_alone():
                hf_dir = export_hf(r["path"], str(out.parent / "hf" / r["name"]), overwrite=True)
            r["hf_path"] = str(hf_dir)
        print(f"report: {r['name']}: generation speed, samples"
              + (f", tasks {','.join(tasks)}" if tasks else ""), flush=True)
        if tasks:
            r["tasks"] = rep.run_tasks(hf_dir, tasks, num_fewshot=num_fewshot, limit=task_limit,
                                       apply_chat_template=chat_template,
                                       max_seq_lengths=max_seq_lengths)
        r["speed"] = rep.generation_speed(hf_dir, rep.PROMPTS, max_new_tokens=max_new_tokens,
                                          batch_sizes=tuple(batch_sizes),
                                          chat_template=chat_template)
        r["samples"] = rep.sample_generations(hf_dir, rep.PROMPTS[:rep.SAMPLES],
                                              max_new_tokens=max_new_tokens,
                                              chat_template=chat_template)
    write_results(out, results)  # the losses were written before; now with tasks and speed
    md = rep.write_report(results, str(out.parent / REPORT_DIR), prompts=rep.PROMPTS[:rep.SAMPLES],
                          overwrite=overwrite)
    print(f"report: {md} (+ {md.with_suffix('.png').name})", flush=True)
    return md


REPORT_DIR = "report"


def write_results(out: Path, results: list[dict]) -> None:
    """eval.json, atomically (a temporary file renamed)."""
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out)


def _fmt(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def print_table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    r0 = results[0]
    t = Table(title=f"held-out loss on {r0['num_samples']} x {r0['seq_length']} tokens of "
                    f"{r0['data']}")
    for col in ("name", "kind", "params", "non-emb.", "sparsity", "bits", "loss", "ppl", "Δ loss",
                "tokens"):
        t.add_column(col, justify="left" if col in ("name", "kind") else "right")
    for r in results:
        t.add_row(r["name"], r["kind"], _fmt(r["params"]), _fmt(r["non_embedding_params"]),
                  f"{r.get('sparsity', 0):.0%}", str(r.get("bits", "")),
                  f"{r['loss']:.4f}", f"{r['ppl']:.2f}", f"{r['loss'] - r0['loss']:+.4f}",
                  str(r["tokens"]))
    Console().print(t)
    pos = [r for r in results if r.get("by_position")]
    if pos:
        b = pos[0]["by_position"]
        t = Table(title=f"held-out loss by position in documents longer than {b['bucket']} tokens")
        t.add_column("name")
        for start in b["start"]:
            t.add_column(f"{start}-{start + b['bucket'] - 1}", justify="right")
        for r in pos:
            t.add_row(r["name"], *("–" if v is None else f"{v:.4f}"
                                   for v in r["by_position"]["loss"]))
        Console().print(t)
