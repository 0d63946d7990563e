"""``pare eval``: held-out LM loss and perplexity of any number of checkpoints on the same tokens,
for the compression report (teacher vs pruned vs distilled).

Checkpoints are Pare Megatron checkpoints (loaded at the given TP/PP; the loss is the shared
vocab-parallel :func:`pare_nemo.losses.cross_entropy`, through
:func:`pare_nemo.data.next_token_nll`, the one loss definition of every stage) or Hugging Face
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
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

EVAL_FILE = "eval.json"
DEFAULT_SPLIT = "98,2,0"  # pare distill's default
DTYPES = ("float32", "bfloat16", "float16")


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


def _distill_runs(checkpoints: list[Checkpoint]) -> list[tuple[str, dict]]:
    """(checkpoint name, its distill_args.json) of the distillation runs among the checkpoints."""
    from pare_nemo.distill import ARGS_FILE

    out = []
    for c in checkpoints:
        f = c.path / ARGS_FILE
        if c.kind == "megatron" and f.exists():
            out.append((c.name, json.loads(f.read_text())))
    return out


def _same_path(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def prefix_split(prefixes: list[str], split: str | None, runs: list[tuple[str, dict]]) -> str:
    """The train,valid,test split to read the prefixes' validation part with: the one the
    distillation runs that read these prefixes used (another is refused), else ``split`` or
    distill's default."""
    from pare_nemo.distill import parse_data

    used = {}
    for name, args in runs:
        theirs = parse_data(args["data"])[0]
        if any(_same_path(p, q) for p in prefixes for q in theirs):
            used[name] = args.get("split", DEFAULT_SPLIT)
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


def refuse_distillation_text(data: str, runs: list[tuple[str, dict]]) -> None:
    """Raw data that a distillation run among the checkpoints was trained on is refused."""
    from pare_nemo.distill import parse_data

    for name, args in runs:
        for p in parse_data(args["data"])[0]:
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


def _reduce(total: torch.Tensor, groups) -> torch.Tensor:
    if dist.is_initialized():
        for g in groups:
            dist.all_reduce(total, group=g)
    return total


def megatron_loss(ckpt: Checkpoint, tokens, mask, docs, micro_batch_size: int, dtype,
                  document_mask: bool) -> tuple[float, int]:
    """(summed next-token NLL, predicted tokens) of a Megatron checkpoint over all rows, at the
    current TP/PP, rows split over the data-parallel ranks; the same on every rank."""
    from megatron.core import parallel_state as ps

    from pare_nemo.checkpoint import load_model
    from pare_nemo.data import next_token_nll
    from pare_nemo.parallel import device, run_forward

    overrides = {"apply_rope_fusion": False} if document_mask else {}  # per-document positions
    model, cfg = load_model(ckpt.path, parallel_output=True, dtype=dtype, uneven_pipeline=True,
                            **overrides)
    model.eval()
    tp_group = ps.get_tensor_model_parallel_group()
    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()

    def step(tok, msk):
        def loss_func(logits):  # vocab-parallel logits on the last stage
            s, n = next_token_nll(logits, tok, msk, cfg.vocab_size, tp_group)
            return s, {"nll": s.detach().double(), "n": n.double()}
        return loss_func

    outs = run_forward(model, tokens[r::dp], mask[r::dp], micro_batch_size, step,
                       document_ids=None if docs is None else docs[r::dp])
    total = torch.zeros(2, dtype=torch.float64, device=device())
    for o in outs:
        total += torch.stack([o["nll"], o["n"]]).to(total.device)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    _reduce(total, [ps.get_data_parallel_group(), ps.get_pipeline_model_parallel_group()])
    return total[0].item(), int(total[1].item())


def hf_loss(ckpt: Checkpoint, tokens, mask, docs, micro_batch_size: int,
            dtype) -> tuple[float, int, int, int, str]:
    """(summed next-token NLL, predicted tokens, params, non-embedding params, dtype) of an HF
    model with transformers, rows split over all ranks. With ``docs`` each document of a row runs
    alone (exactly what the Megatron model's document mask computes); the logits are then one
    row's again and the loss is :func:`pare_nemo.data.next_token_nll` as for Megatron."""
    from transformers import AutoModelForCausalLM

    from pare_nemo.data import next_token_nll
    from pare_nemo.parallel import device

    dev = device()
    model = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=dtype).to(dev).eval()
    vocab = model.config.vocab_size
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    tok, msk = tokens[rank::world], mask[rank::world]
    d = None if docs is None else docs[rank::world]
    total = torch.zeros(2, dtype=torch.float64, device=dev)
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
            s, n = next_token_nll(logits, t, m, vocab)
            total += torch.stack([s.double(), n.double()])
    params, non_emb = model.num_parameters(), model.num_parameters(exclude_embeddings=True)
    used = str(model.dtype).removeprefix("torch.")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    _reduce(total, [None])
    return total[0].item(), int(total[1].item()), params, non_emb, used


def _segment_lengths(doc_ids: torch.Tensor) -> list[int]:
    return torch.unique_consecutive(doc_ids, return_counts=True)[1].tolist()


# ---------------------------------------------------------------- the stage


def evaluate(checkpoints: str, data: str, output: str = "eval.json", num_samples: int = 128,
             seq_length: int = 4096, micro_batch_size: int = 1, tp: int = 1, pp: int = 1,
             split: str | None = None, pack: bool = True, document_mask: bool = True,
             dtype: str | None = None, seed: int = 1234, overwrite: bool = False,
             tasks: str | None = None, num_fewshot: int | None = None,
             task_limit: int | None = None, chat_template: bool | None = None,
             report: bool = True, max_new_tokens: int = 64,
             batch_sizes: list[int] | None = None) -> str:
    """Held-out loss/perplexity of checkpoints on the same tokens; tasks, speed and the report."""
    # checkpoints: "name:path,name:path" (str, so that pare and nemo llm parse it alike)
    from rich.console import Console
    from transformers import AutoTokenizer

    from pare_nemo.olmo3.bridge import check_parallel_sizes
    from pare_nemo.checkpoint import read_model_config
    from pare_nemo.data import (
        PYDOC,
        DataError,
        _looks_like_path,
        check_seq_length,
        load_token_data,
        tokenizer_fingerprint,
    )
    from pare_nemo.distill import check_data, parse_data
    from pare_nemo.olmo3.model import document_ids
    from pare_nemo.parallel import distributed, world_size

    # ---- everything checked before any work
    named = parse_checkpoints(checkpoints)
    if min(num_samples, micro_batch_size) < 1 or seq_length < 2:
        raise ValueError(f"num_samples={num_samples} and micro_batch_size={micro_batch_size} must "
                         f"be >= 1, seq_length={seq_length} >= 2")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {DTYPES} (or none: the checkpoint's)")
    out = Path(output).expanduser()
    out = out if out.suffix == ".json" else out / EVAL_FILE
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {out} already exists; pass overwrite=true to replace it")
    report_dir = out.parent / REPORT_DIR
    if report and report_dir.exists() and not overwrite:
        raise FileExistsError(f"report {report_dir} already exists; pass overwrite=true to "
                              "replace it")
    batch_sizes = list(batch_sizes or (1, 8))
    if report and (max_new_tokens < 1 or min(batch_sizes) < 1):
        raise ValueError(f"max_new_tokens={max_new_tokens} and batch_sizes={batch_sizes} must be "
                         ">= 1")
    task_names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    if task_names:
        from pare_nemo.report import check_tasks, task_manager

        check_tasks(task_names, task_manager(task_names))  # unknown names: before any work
    ckpts = [find_checkpoint(n, p) for n, p in named]
    world = world_size()
    megatron = [c for c in ckpts if c.kind == "megatron"]
    for c in megatron:
        try:
            check_parallel_sizes(c.config, tp, pp, uneven_pipeline=True)
        except ValueError as e:
            raise ValueError(f"checkpoint {c.name!r}: {e}") from None
    if tp < 1 or pp < 1:
        raise ValueError(f"tp={tp} and pp={pp} must be >= 1")
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tp*pp = {tp * pp}")
    dp = world // (tp * pp)
    if megatron and num_samples % (dp * micro_batch_size):
        raise ValueError(f"num_samples={num_samples} is not a multiple of data-parallel size {dp} "
                         f"x micro_batch_size {micro_batch_size}")
    for c in ckpts:
        if c.kind == "megatron":
            check_seq_length(seq_length, c.config)
        elif seq_length > getattr(c.config, "max_position_embeddings", seq_length):
            raise ValueError(f"seq_length={seq_length} is longer than checkpoint {c.name!r}'s "
                             f"context ({c.config.max_position_embeddings})")
    fingerprints = {}
    for c in ckpts:
        try:
            tok = AutoTokenizer.from_pretrained(c.tokenizer_dir)
        except Exception as e:  # OSError / ValueError: no tokenizer there
            raise FileNotFoundError(f"checkpoint {c.name!r} has no tokenizer in {c.tokenizer_dir}"
                                    f": {e}") from None
        fingerprints[c.name] = (tokenizer_fingerprint(tok), tok.eos_token_id)
        if len(fingerprints) == 1:
            tokenizer = tok
    first = ckpts[0].name
    differ = [n for n, f in fingerprints.items() if f != fingerprints[first]]
    if differ:
        raise ValueError(f"the tokenizers of {differ} differ from {first!r}'s (vocabulary or EOS): "
                         "losses on different tokens are not comparable; evaluate them separately")
    eos = tokenizer.eos_token_id
    if document_mask and eos is None:
        raise ValueError(f"the tokenizer of {first!r} has no EOS token, so packed rows have no "
                         "document boundaries: pass document_mask=false")
    runs = _distill_runs(ckpts)
    prefixes, weights = parse_data(data)
    is_prefix = any(Path(p + ".bin").expanduser().exists() for p in prefixes)
    notes = []
    if is_prefix:
        prefixes, weights = check_data(data)
        for p in prefixes:
            meta = Path(p + ".json").expanduser()
            if meta.exists() and json.loads(meta.read_text()).get("tokenizer_sha256") \
                    != fingerprints[first][0]:
                raise ValueError(f"data {p} was tokenized with another tokenizer than the "
                                 "checkpoints'; run pare prepare-data with their tokenizer")
        split = prefix_split(prefixes, split, runs)
        check_prefix_rows(prefixes, weights, split, num_samples, seq_length)
    else:
        if data != PYDOC and _looks_like_path(data) and not Path(data).expanduser().exists():
            raise FileNotFoundError(f"data {data} does not exist (neither a prepare-data prefix "
                                    f"{data}.bin / .idx nor a file)")
        split = split or "train"
        refuse_distillation_text(data, runs)
        start, notes = raw_start_row(data, seq_length, pack, split, ckpts)

    results = []
    with distributed(tp, pp):
        rank0 = dist.get_rank() == 0
        say = Console().print if rank0 else (lambda *a, **k: None)
        # ---- the rows, the same for every checkpoint
        if is_prefix:
            from pare_nemo.data import batch_at, training_dataset

            _, valid = training_dataset(prefixes, seq_length, 1, 1, seed, eos, split=split,
                                        weights=weights, valid_samples=num_samples)
            if valid is None or len(valid) < num_samples:
                raise DataError(f"the validation split ({split}) of {data} gives "
                                f"{0 if valid is None else len(valid)} rows; {num_samples} "
                                "were asked for")
            rows = batch_at(valid, 0, num_samples)
            where = {"split": split, "part": "valid", "seed": seed}
        else:
            rows = load_token_data(data, tokenizer, start + num_samples, seq_length, pack=pack,
                                   split=split)[start:]
            where = {"split": split, "rows": [start, start + num_samples], "pack": pack}
        docs = document_ids(rows.tokens, eos) if document_mask else None
        data_info = {"data": data, **where, "num_samples": num_samples, "seq_length": seq_length,
                     "document_mask": document_mask, "sha256": rows.sha256()}
        for n in notes:
            say(n)
        # ---- each checkpoint in turn
        for c in ckpts:
            say(f"evaluating {c.name} ({c.kind}: {c.path})")
            if c.kind == "megatron":
                dt = getattr(torch, dtype) if dtype else None
                nll, n = megatron_loss(c, rows.tokens, rows.mask, docs, micro_batch_size, dt,
                                       document_mask)
                params, non_emb = param_counts(c)
                used = str(dt or read_model_config(c.path)[2]).removeprefix("torch.")
                par = {"tp": tp, "pp": pp, "dp": dp}
            else:
                dt = getattr(torch, dtype) if dtype else (
                    "auto" if torch.cuda.is_available() else torch.float32)
                nll, n, params, non_emb, used = hf_loss(c, rows.tokens, rows.mask, docs,
                                                        micro_batch_size, dt)
                par = {"dp": world}
            loss = nll / n
            results.append({"name": c.name, "path": str(c.path), "kind": c.kind,
                            "params": params, "non_embedding_params": non_emb, "loss": loss,
                            "ppl": math.exp(loss), "tokens": n, "dtype": used,
                            "parallel": par, **data_info})
        if rank0:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_results(out, results)
            print_table(results)
            print(f"results: {out}")
        dist.barrier()
    if report and rank0:  # on exported HF models, in this process alone
        compression_report(results, out, task_names, num_fewshot, task_limit, chat_template,
                           max_new_tokens, batch_sizes, overwrite)
    return str(out)


def compression_report(results: list[dict], out: Path, tasks: list[str],
                       num_fewshot: int | None, task_limit: int | None,
                       chat_template: bool | None, max_new_tokens: int, batch_sizes: list[int],
                       overwrite: bool) -> Path:
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
                                       apply_chat_template=chat_template)
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
    for col in ("name", "kind", "params", "non-emb.", "loss", "ppl", "Δ loss", "tokens"):
        t.add_column(col, justify="left" if col in ("name", "kind") else "right")
    for r in results:
        t.add_row(r["name"], r["kind"], _fmt(r["params"]), _fmt(r["non_embedding_params"]),
                  f"{r['loss']:.4f}", f"{r['ppl']:.2f}", f"{r['loss'] - r0['loss']:+.4f}",
                  str(r["tokens"]))
    Console().print(t)
