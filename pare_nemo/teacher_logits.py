"""``pare teacher-logits``: the teacher's top-k log-probabilities over the rows a distillation reads,
stored once, so that distillation can run without the teacher (the seeds' offline path:
generate_logprobs -> distill_off_policy; ``pare distill teacher_logits=<output>``).

The rows are exactly the distillation's: the same megatron GPTDataset (prefixes, split, seed,
``train_steps x global_batch_size`` training rows and ``valid_samples`` validation rows), in the
same order. For every token the teacher runs on (document-masked like distillation), at any TP/PP,
``losses.teacher_top_k`` gives the k most probable token ids under softmax(logits / T), their
log-probabilities and the log of the rest of the mass. Stored, per row range ("shard"):

    <output>/index.json                     what was stored, its fingerprint, the shards, size
    <output>/train-000000000-000000256.safetensors
        tokens    int32 [rows, S]           the rows' tokens (distillation checks them)
        ids       int32 [rows, S, k]        the top-k token ids, most probable first
        logprobs  fp16 or fp32 [rows, S, k] their log-probabilities (``logprob_dtype``)
        log_rest  fp32 [rows, S]            log of the teacher's remaining mass (-inf: none)
    <output>/valid-….safetensors            the same for the validation rows

Bytes per token: ``4 + k * (4 + 2) + 4`` in fp16 (392 for k = 64). The fingerprint records the
teacher (its config and checkpoint files), the tokenizer, the data (each prefix's index file and
size), split, seed, sequence length, document masking, row counts, k and T; distillation refuses
stored logits whose fingerprint does not fit its own config.

Work goes into ``<output>.partial/`` and is renamed to ``<output>`` when every shard and the index
are written. Shards go round-robin to the data-parallel replicas, each written to a temporary
name and renamed, so a run killed at any moment and started again with the same config redoes
only the shards that were not finished; finished shards are left untouched (and the rerun writes
byte-identical ones: the same arithmetic).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pare_nemo.config import TeacherLogitsConfig, need

INDEX_FILE = "index.json"
RUN_FILE = "run.json"  # the config and fingerprint of a run in progress (in <output>.partial)
PARTS = ("train", "valid")


def shard_name(part: str, start: int, end: int) -> str:
    return f"{part}-{start:09d}-{end:09d}.safetensors"


def bytes_per_token(top_k: int, logprob_dtype: str) -> int:
    return 4 + top_k * (4 + torch.finfo(getattr(torch, logprob_dtype)).bits // 8) + 4


def teacher_fingerprint(checkpoint) -> str:
    """The teacher's identity without reading its weights: its model config and the names and
    sizes of its latest checkpoint's files."""
    from pare_nemo.checkpoint import CONFIG_FILE, iteration_dir, latest_iteration

    path = Path(checkpoint)
    h = hashlib.sha256((path / CONFIG_FILE).read_bytes())
    it = iteration_dir(path, latest_iteration(path))
    for f in sorted(p for p in it.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(it)}:{f.stat().st_size}".encode())
    return h.hexdigest()


def data_fingerprint(data: str) -> list[dict]:
    """Each prefix of ``data`` (a blend keeps its weights): its index file's sha256 and sizes."""
    from pare_nemo.data import parse_data

    prefixes, weights = parse_data(data)
    out = []
    for i, p in enumerate(prefixes):
        idx = Path(p + ".idx").expanduser()
        out.append({"weight": None if weights is None else weights[i],
                    "idx_sha256": hashlib.sha256(idx.read_bytes()).hexdigest(),
                    "bin_bytes": Path(p + ".bin").expanduser().stat().st_size})
    return out


def rows_fingerprint(data, batch, valid_samples: int, tokenizer_sha256: str) -> dict:
    """What fixes the rows and their tokens: the same for teacher-logits and a distillation that
    reads them."""
    return {"tokenizer_sha256": tokenizer_sha256, "data": data_fingerprint(data.data),
            "split": data.split, "seed": data.seed, "document_mask": data.document_mask,
            "seq_length": batch.seq_length, "train_rows": batch.rows,
            "valid_rows": valid_samples}


def _tokenizer_sha256(checkpoint) -> str:
    from transformers import AutoTokenizer

    from pare_nemo.checkpoint import TOKENIZER_DIR
    from pare_nemo.data import tokenizer_fingerprint

    return tokenizer_fingerprint(AutoTokenizer.from_pretrained(Path(checkpoint) / TOKENIZER_DIR))


def fingerprint(cfg: TeacherLogitsConfig) -> dict:
    return {"teacher": teacher_fingerprint(cfg.teacher_path),
            **rows_fingerprint(cfg.data, cfg.batch, cfg.valid_samples,
                               _tokenizer_sha256(cfg.teacher_path)),
            "top_k": cfg.top_k, "temperature": cfg.temperature,
            "logprob_dtype": cfg.logprob_dtype}


# ---------------------------------------------------------------- the stage


def check(cfg: TeacherLogitsConfig):
    """Everything checked before any work: (teacher HF config, DP size, fingerprint, whether the
    run resumes a partial one)."""
    from pare_nemo.checkpoint import check_output_dir, read_model_config

    cfg.check()
    tc, _, _ = read_model_config(cfg.teacher_path)
    dp = cfg.parallel.check(tc, uneven=True)
    cfg.batch.check(tc, dp=1)
    cfg.data.check(cfg.teacher_path)
    need(cfg.top_k <= tc.vocab_size, f"top_k={cfg.top_k} > the vocabulary ({tc.vocab_size})")
    out = check_output_dir(cfg.output, cfg.overwrite, [cfg.teacher_path])
    fp = fingerprint(cfg)
    partial = _partial(out)
    resume = (partial / RUN_FILE).exists()
    if resume and not cfg.overwrite:
        theirs = json.loads((partial / RUN_FILE).read_text())["fingerprint"]
        diff = sorted(k for k in fp if fp[k] != theirs.get(k))
        need(not diff, f"{partial} holds an unfinished run for other settings ({', '.join(diff)} "
                       "differ): run it with the same ones to finish it, or pass overwrite=true")
    return tc, dp, fp, resume and not cfg.overwrite


def _partial(out: Path) -> Path:
    return out.parent / f"{out.name}.partial"


def teacher_logits(cfg: TeacherLogitsConfig | None = None, **flat) -> str:
    """Store the teacher's top-k log-probs over the rows a distillation reads (offline KD)."""
    from megatron.core import parallel_state as ps

    from pare_nemo.checkpoint import eos_token_id, load_model
    from pare_nemo.data import training_dataset
    from pare_nemo.parallel import distributed

    cfg = TeacherLogitsConfig.of(cfg, **flat)
    tc, dp, fp, resume = check(cfg)
    out = Path(cfg.output)
    partial = _partial(out)
    with distributed(cfg.parallel.tp, cfg.parallel.pp):
        rank0 = dist.get_rank() == 0
        if rank0:
            if cfg.overwrite or not resume:
                shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True, exist_ok=True)
            _write_json(partial / RUN_FILE, {"config": cfg.to_dict(), "fingerprint": fp})
        dist.barrier()
        eos = eos_token_id(cfg.teacher_path)
        prefixes, weights = cfg.data.check()
        train, valid = training_dataset(
            prefixes, cfg.batch.seq_length, cfg.batch.rows, cfg.batch.global_batch_size,
            cfg.data.seed, eos, split=cfg.data.split, weights=weights,
            valid_samples=cfg.valid_samples or None)
        need(not cfg.valid_samples or valid is not None,
             f"valid_samples needs a validation split; split={cfg.data.split!r} has none")
        model, _ = load_model(cfg.teacher_path, parallel_output=True,
                              dtype=getattr(torch, cfg.dtype), uneven_pipeline=True,
                              **({"apply_rope_fusion": False} if cfg.data.document_mask else {}))
        model.eval()
        shards = [(part, a, min(a + cfg.shard_rows, n))
                  for part, n in (("train", cfg.batch.rows), ("valid", cfg.valid_samples))
                  for a in range(0, n, cfg.shard_rows)]
        t0, done = time.perf_counter(), 0
        for part, a, b in shards[ps.get_data_parallel_rank()::dp]:
            if _all_ranks_agree(not (partial / shard_name(part, a, b)).exists()):
                _write_shard(model, train if part == "train" else valid, part, a, b, cfg, eos,
                             partial, tc.vocab_size)
                done += b - a
        dist.barrier()
        if rank0:
            seconds = time.perf_counter() - t0
            _write_json(partial / INDEX_FILE, _index(cfg, fp, shards, seconds))
            if out.exists():  # overwrite=true (checked before any work)
                shutil.rmtree(out)
            partial.rename(out)
            print(f"teacher logits: {out} ({sum(b - a for _, a, b in shards)} rows, "
                  f"{bytes_per_token(cfg.top_k, cfg.logprob_dtype)} bytes per token)")
        dist.barrier()
    return str(out)


def _all_ranks_agree(flag: bool) -> bool:
    """``flag`` on every rank of this model replica (TP x PP) at once: they run shards together."""
    from megatron.core import parallel_state as ps

    t = torch.tensor([1.0 if flag else 0.0])
    if torch.cuda.is_available():
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=ps.get_model_parallel_group())
    return bool(t.item())


def _write_shard(model, dataset, part: str, a: int, b: int, cfg: TeacherLogitsConfig, eos: int,
                 partial: Path, vocab_size: int) -> None:
    """Rows [a, b) of ``dataset``: the teacher's top k, written by the last pipeline stage's first
    tensor-parallel rank to a temporary name, then renamed."""
    from megatron.core import parallel_state as ps
    from safetensors.torch import save_file

    from pare_nemo.engine import run_forward
    from pare_nemo.losses import teacher_top_k
    from pare_nemo.olmo3.model import document_ids

    tokens = torch.stack([dataset[i]["tokens"] for i in range(a, b)]).long()
    docs = document_ids(tokens, eos) if cfg.data.document_mask else None
    tp_group = ps.get_tensor_model_parallel_group()

    def step(mb):
        def loss_func(logits):  # vocab-parallel logits [b, s, V_local] on the last stage
            ids, lps, rest = teacher_top_k(logits, vocab_size, cfg.top_k, cfg.temperature,
                                           tp_group=tp_group)
            return logits.new_zeros(()), {"ids": ids.int().cpu(), "rest": rest.cpu(),
                                          "logprobs": lps.to(getattr(torch, cfg.logprob_dtype))
                                          .cpu()}
        return loss_func

    outs = run_forward(model, tokens, None, cfg.batch.micro_batch_size, step, document_ids=docs)
    if not (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0):
        return
    tensors = {"tokens": tokens.int().contiguous(),
               "ids": torch.cat([o["ids"] for o in outs]).contiguous(),
               "logprobs": torch.cat([o["logprobs"] for o in outs]).contiguous(),
               "log_rest": torch.cat([o["rest"] for o in outs]).contiguous()}
    name = shard_name(part, a, b)
    tmp = partial / f".{name}.{os.getpid()}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, partial / name)


def _index(cfg: TeacherLogitsConfig, fp: dict, shards: list, seconds: float) -> dict:
    rows = sum(b - a for _, a, b in shards)
    per_token = bytes_per_token(cfg.top_k, cfg.logprob_dtype)
    return {"fingerprint": fp, "top_k": cfg.top_k, "temperature": cfg.temperature,
            "logprob_dtype": cfg.logprob_dtype, "seq_length": cfg.batch.seq_length,
            "parts": {part: {"rows": n, "shards": [{"file": shard_name(p, a, b), "rows": [a, b]}
                                                   for p, a, b in shards if p == part]}
                      for part, n in (("train", cfg.batch.rows), ("valid", cfg.valid_samples))},
            "tokens": rows * cfg.batch.seq_length, "bytes_per_token": per_token,
            "bytes": rows * cfg.batch.seq_length * per_token,
            "seconds_this_run": round(seconds, 3)}


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


# ---------------------------------------------------------------- reading them back (distill)


class StoredLogits:
    """The stored top k of a ``pare teacher-logits`` output, by row (what distillation reads)."""

    def __init__(self, path):
        self.path = Path(path)
        f = self.path / INDEX_FILE
        if not f.exists():
            partial = _partial(self.path)
            raise FileNotFoundError(
                f"teacher_logits={path} holds no finished pare teacher-logits output (no "
                f"{INDEX_FILE})" + (f"; {partial} is an unfinished run: run it again to finish"
                                    if partial.exists() else ""))
        self.index = json.loads(f.read_text())
        self.top_k, self.temperature = self.index["top_k"], self.index["temperature"]

    def check(self, data, batch, eval_samples: int, tokenizer_sha256: str) -> None:
        """Refuse stored logits made for other rows (data, split, seed, sequence length, document
        masking, row counts) or another tokenizer."""
        ours = rows_fingerprint(data, batch, eval_samples, tokenizer_sha256)
        theirs = dict(self.index["fingerprint"])
        if not eval_samples:  # no validation here: the stored validation rows are not read
            ours.pop("valid_rows"), theirs.pop("valid_rows")
        diff = sorted(k for k in ours if ours[k] != theirs.get(k))
        need(not diff, f"teacher_logits={self.path} were stored for other rows or another "
                       f"tokenizer ({', '.join(diff)} differ from this distillation's): make them "
                       "with pare teacher-logits and this run's data, split, seed, seq_length, "
                       "train_steps, global_batch_size (and valid_samples=eval_samples)")

    def rows(self, part: str, start: int, count: int) -> dict[str, torch.Tensor]:
        """tokens, ids, logprobs, log_rest of rows [start, start + count) of ``part``."""
        from safetensors import safe_open

        out: dict[str, list] = {k: [] for k in ("tokens", "ids", "logprobs", "log_rest")}
        end = start + count
        for shard in self.index["parts"][part]["shards"]:
            a, b = shard["rows"]
            lo, hi = max(a, start), min(b, end)
            if lo >= hi:
                continue
            with safe_open(str(self.path / shard["file"]), "pt") as f:
                for k in out:
                    out[k].append(f.get_slice(k)[lo - a:hi - a])
        got = {k: torch.cat(v) for k, v in out.items()}
        need(len(got["tokens"]) == count, f"{self.path} has no rows {start}..{end} of {part}")
        return got
