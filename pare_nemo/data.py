"""Calibration / evaluation data: any HF dataset id or local JSONL / JSON / parquet / text file,
tokenized into ``[N, seq_length]`` tokens with a mask of real (non-padding) tokens.

Records with ``messages`` (chat) go through the tokenizer's chat template; records with ``text``
are used as they are. ``pack=True`` concatenates documents (EOS between them) into full rows with no
padding; ``pack=False`` truncates each document to ``seq_length`` and pads it (the mask excludes the
padding from every statistic).
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

PYDOC = "pydoc"  # built-in source: CPython's pydoc_data.topics (English prose on every machine)


class DataError(ValueError):
    """Data that cannot give what was asked; the message says why."""


class NotEnoughData(DataError):
    """The data holds fewer samples than asked for."""


@dataclass
class TokenData:
    tokens: torch.Tensor  # [N, S] int64
    mask: torch.Tensor  # [N, S] bool, True for real tokens

    def __len__(self):
        return self.tokens.shape[0]

    def __getitem__(self, idx):
        return TokenData(self.tokens[idx], self.mask[idx])

    def sha256(self) -> str:
        h = hashlib.sha256(self.tokens.numpy().tobytes())
        h.update(self.mask.numpy().tobytes())
        return h.hexdigest()


def _records(data: str, split: str, limit_docs: int | None):
    """Yield dict records (``text`` or ``messages``) from a local file or an HF dataset id."""
    if data == PYDOC:
        from pare_nemo.tiny import pydoc_text

        for doc in pydoc_text().split("\n\n\n"):
            yield {"text": doc}
        return
    path = Path(data).expanduser()
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{data} is empty: it holds no documents")
    if path.exists() and path.is_file() and path.suffix in (".txt", ".md"):
        text = path.read_text()
        for doc in text.split("\n\n\n") if text.strip() else []:
            yield {"text": doc}
        return
    import datasets

    if path.exists():
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix)
        if path.is_file() and kind is None:
            raise DataError(f"unsupported data file {path} (use .jsonl, .json, .parquet or .txt)")
        files = str(path) if path.is_file() else [str(p) for p in sorted(path.glob("*.parquet"))
                                                   + sorted(path.glob("*.jsonl"))]
        if not files:
            raise DataError(f"no .parquet or .jsonl files in {path}")
        if isinstance(files, list):
            kind = "parquet" if files[0].endswith(".parquet") else "json"
        ds = datasets.load_dataset(kind, data_files=files, split="train", streaming=True)
    else:
        ds = datasets.load_dataset(data, split=split, streaming=True)
    for i, rec in enumerate(ds):
        if limit_docs is not None and i >= limit_docs:
            return
        yield rec


def _to_text(rec, tokenizer) -> str:
    if rec.get("messages") is not None:
        if not tokenizer.chat_template:
            raise DataError("chat data (messages) but the tokenizer has no chat template")
        msgs = [{"role": m["role"], "content": m["content"] or ""} for m in rec["messages"]]
        return tokenizer.apply_chat_template(msgs, tokenize=False)
    if rec.get("text") is not None:
        return rec["text"]
    raise DataError(f"a record has neither 'text' nor 'messages' (its keys: {sorted(rec)}); "
                    "records need one of them")


def load_token_data(data: str, tokenizer, num_samples: int, seq_length: int, pack: bool = True,
                    split: str = "train") -> TokenData:
    """Exactly ``num_samples`` rows of ``seq_length`` tokens, or a DataError saying why not."""
    if num_samples < 1 or seq_length < 2:
        raise DataError(f"num_samples={num_samples} and seq_length={seq_length} must be >= 1 and 2")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows, masks, buf, docs = [], [], [], 0
    # enough documents for num_samples rows; streaming datasets are read only that far
    for rec in _records(data, split, None if pack else num_samples):
        try:
            text = _to_text(rec, tokenizer)
        except DataError as e:
            raise DataError(f"{data}, record {docs}: {e}") from None
        ids = tokenizer(text, add_special_tokens=False).input_ids
        docs += 1
        if pack:
            buf.extend(ids + [eos])
            while len(buf) >= seq_length and len(rows) < num_samples:
                rows.append(buf[:seq_length])
                masks.append([True] * seq_length)
                buf = buf[seq_length:]
        else:
            ids = ids[:seq_length]
            if not ids:
                raise DataError(f"sample {len(rows)} of {data} is empty: it would be all padding")
            rows.append(ids + [pad] * (seq_length - len(ids)))
            masks.append([True] * len(ids) + [False] * (seq_length - len(ids)))
        if len(rows) >= num_samples:
            break
    if docs == 0:
        raise DataError(f"{data} holds no documents")
    if len(rows) < num_samples:
        raise NotEnoughData(f"{data} gives only {len(rows)} samples of {seq_length} tokens "
                        f"({'packed' if pack else 'one per document'}); {num_samples} were asked for")
    return TokenData(torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# Training data (distillation): tokenize once into megatron-core indexed datasets, then read
# packed rows through megatron's GPTDataset / BlendedDataset (shuffled, blended, train/valid split).
# ---------------------------------------------------------------------------------------------

_CHUNK = 256  # records per tokenization task
_tok = None  # the tokenizer of a prepare_data worker process


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary (token -> id, added tokens included)."""
    import json

    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(vocab.encode()).hexdigest()


def _load_tokenizer(tokenizer_path: str):
    from transformers import AutoTokenizer

    if not Path(tokenizer_path).expanduser().exists() and _looks_like_path(tokenizer_path):
        raise DataError(f"tokenizer {tokenizer_path} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_path)
    except Exception as e:  # OSError / ValueError / HF hub errors: all mean "no tokenizer there"
        raise DataError(f"cannot load a tokenizer from {tokenizer_path}: {e}") from None
    if tok.eos_token_id is None:
        raise DataError(f"the tokenizer of {tokenizer_path} has no EOS token (documents need one)")
    return tok


def _init_worker(tokenizer_path: str):
    import os

    global _tok
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _tok = _load_tokenizer(tokenizer_path)


def _tokenize_chunk(start: int, recs: list, text_key: str, dtype, tokenizer=None) -> list:
    """Token arrays (EOS appended) of records ``start, start+1, ...``; the same in any process."""
    import numpy as np

    tok = tokenizer if tokenizer is not None else _tok
    texts = []
    for i, rec in enumerate(recs):
        try:
            if rec.get("messages") is None and text_key != "text":
                if rec.get(text_key) is None:
                    raise DataError(f"a record has neither '{text_key}' nor 'messages' (its keys: "
                                    f"{sorted(rec)}); records need one of them")
                texts.append(rec[text_key])
            else:
                texts.append(_to_text(rec, tok))
        except DataError as e:
            raise DataError(f"record {start + i}: {e}") from None
    ids = tok(texts, add_special_tokens=False).input_ids
    return [np.array(x + [tok.eos_token_id], dtype=dtype) for x in ids]


def _chunks(records):
    """(index of the first record, list of up to _CHUNK records), in order."""
    from itertools import islice

    it, start = iter(records), 0
    while chunk := list(islice(it, _CHUNK)):
        yield start, chunk
        start += len(chunk)


def _looks_like_path(data: str) -> bool:
    return data.startswith(("/", ".", "~")) or Path(data).suffix in (
        ".jsonl", ".json", ".parquet", ".txt", ".md")


def prepare_data(data: str, tokenizer_path: str, output_prefix: str, split: str = "train",
                 text_key: str = "text", num_workers: int = 1, overwrite: bool = False,
                 limit_docs: int | None = None) -> dict:
    """Tokenize ``data`` once into a megatron-core indexed dataset ``<output_prefix>.bin/.idx``.

    ``data``: an HF dataset id (``split`` of it), a local .jsonl / .json / .parquet / .txt file or a
    folder of .parquet / .jsonl files, or ``"pydoc"``. One document per record: ``messages`` records
    through the tokenizer's chat template, the others' ``text_key`` field as it is; EOS is appended
    to every document, so packed rows keep document boundaries (``model.document_ids``).
    ``num_workers > 1`` tokenizes chunks of records in that many processes; the output is
    byte-identical for any ``num_workers``. Files are written under temporary names and renamed
    when complete (``.bin``, then ``.idx``, then ``<output_prefix>.json`` with the source, the
    tokenizer's vocab size, EOS id and fingerprint, and the document and token counts, which it
    returns). An existing output is refused unless ``overwrite``.
    """
    import json
    import os
    import time
    from collections import deque
    from itertools import islice

    import numpy as np
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    # -- everything checked before any work --
    if num_workers < 1:
        raise DataError(f"num_workers={num_workers} must be >= 1")
    if limit_docs is not None and limit_docs < 1:
        raise DataError(f"limit_docs={limit_docs} must be >= 1 (or None for all documents)")
    if data != PYDOC:
        path = Path(data).expanduser()
        if not path.exists() and _looks_like_path(data):
            raise DataError(f"data {data} does not exist")
        if path.is_file() and path.suffix not in (".jsonl", ".json", ".parquet", ".txt", ".md"):
            raise DataError(f"unsupported data file {path} (use .jsonl, .json, .parquet or .txt)")
        if path.is_file() and path.stat().st_size == 0:
            raise DataError(f"{data} is empty: it holds no documents")
        if path.is_file() and path.suffix in (".txt", ".md"):
            text_key = "text"  # plain text: the records are {"text": ...}
    else:
        text_key = "text"
    prefix = Path(output_prefix).expanduser()
    outputs = [Path(f"{prefix}{ext}") for ext in (".bin", ".idx", ".json")]
    if prefix.is_dir():
        raise DataError(f"output_prefix {prefix} is a folder; give a file prefix inside it, "
                        f"e.g. {prefix / 'data'}")
    existing = [str(p) for p in outputs if p.exists()]
    if existing and not overwrite:
        raise DataError(f"{', '.join(existing)} already exist; pass overwrite=True to replace them")
    tokenizer = _load_tokenizer(tokenizer_path)
    dtype = DType.optimal_dtype(len(tokenizer))  # uint16 below 65500 tokens, int32 above
    prefix.parent.mkdir(parents=True, exist_ok=True)

    # -- tokenize, in order, into temporary files beside the outputs --
    tmp = {ext: str(prefix.parent / f".{prefix.name}.{os.getpid()}.partial{ext}")
           for ext in (".bin", ".idx", ".json")}
    builder = IndexedDatasetBuilder(tmp[".bin"], dtype=dtype)
    docs = tokens = 0
    t0 = time.time()

    def write(arrays):
        nonlocal docs, tokens
        for a in arrays:
            builder.add_document(a, [a.size])
            docs += 1
            tokens += a.size

    chunks = _chunks(islice(_records(data, split, limit_docs), limit_docs))
    try:
        if num_workers == 1:
            for start, recs in chunks:
                write(_tokenize_chunk(start, recs, text_key, dtype, tokenizer))
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            # fork: workers start at once (spawn re-imports torch in each, seconds); they run
            # only the tokenizer (Rust) and numpy, never torch's thread pools
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            pool = ProcessPoolExecutor(num_workers, mp.get_context(method), _init_worker,
                                       (tokenizer_path,))
            try:
                pending = deque()  # a bounded window of chunks in flight, written in order
                for start, recs in chunks:
                    pending.append(pool.submit(_tokenize_chunk, start, recs, text_key, dtype))
                    if len(pending) >= 2 * num_workers:
                        write(pending.popleft().result())
                while pending:
                    write(pending.popleft().result())
            finally:
                pool.shutdown(cancel_futures=True)
        builder.finalize(tmp[".idx"])
        if docs == 0:
            raise DataError("it holds no documents")
        seconds = time.time() - t0
        meta = {
            "source": data, "split": split, "text_key": text_key, "limit_docs": limit_docs,
            "tokenizer": str(tokenizer_path), "vocab_size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
            "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
            "dtype": np.dtype(dtype).name, "documents": docs, "tokens": tokens,
            "seconds": round(seconds, 3),
        }
        Path(tmp[".json"]).write_text(json.dumps(meta, indent=2) + "\n")
        for ext, out in zip((".bin", ".idx", ".json"), outputs):
            os.replace(tmp[ext], out)
    except BaseException as e:
        builder.data_file.close()
        for name in tmp.values():
            Path(name).unlink(missing_ok=True)
        if isinstance(e, DataError):
            raise DataError(f"{data}: {e}") from None
        raise
    return meta


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
    import json

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

                fingerprint = tokenizer_fingerprint(
                    AutoTokenizer.from_pretrained(Path(checkpoint) / TOKENIZER_DIR))
            if json.loads(meta.read_text()).get("tokenizer_sha256") != fingerprint:
                raise ValueError(f"data {p} was tokenized with another tokenizer than "
                                 f"{checkpoint}'s; run pare prepare-data with "
                                 f"tokenizer_path={Path(checkpoint) / 'tokenizer'}")
    return prefixes, weights


class _EodTokenizer:
    """All megatron's GPTDataset needs of a tokenizer for pre-tokenized data: the EOD id (no pad
    token: rows are never padded; no vocab size: the .idx holds the token dtype)."""

    def __init__(self, eod: int):
        self.eod, self.vocab_size = eod, None
        self.unique_identifiers = {"class": "pare_nemo.data._EodTokenizer", "eod": eod}


def _split_ranges(n: int, split: str) -> list:
    """Document ranges [begin, end) of train / valid / test, exactly as megatron-core splits."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    return [None if m is None else (int(round(m[0] * n)), int(round(m[1] * n))) for m in matrix]


def training_dataset(prefixes: str | list, seq_length: int, num_samples: int,
                     global_batch_size: int, seed: int, eos_token_id: int, split: str,
                     weights: list | None = None,
                     valid_samples: int | None = None, cache_dir: str | None = None):
    """(train, valid) megatron-core datasets of packed rows from ``prepare_data`` outputs.

    ``prefixes``: one prefix or several (blended by ``weights``, default: by size). ``split``:
    train,valid,test document fractions of each prefix (test is not built). ``train`` holds at
    least ``num_samples`` rows (megatron repeats epochs as needed); ``valid`` one epoch of the valid
    documents (or ``valid_samples`` rows; required with ``weights``), None when the split has none.
    Item ``i`` is a dict whose ``"tokens"`` are ``seq_length`` consecutive tokens of the document
    stream (documents end with EOS); rows do not overlap (``add_extra_token_to_sequence=False``), as
    ``load_token_data(pack=True)`` packs them; Pare's losses shift inside the row (megatron's
    ``labels`` are not used). The order depends only on ``seed``, ``num_samples``, ``split``,
    ``weights`` and the data: keep them fixed to resume a run (see :func:`batch_at`).
    Indices are cached in ``cache_dir`` (default: ``index-cache`` beside the first prefix); under
    torch.distributed every rank must call this (rank 0 builds, the others load after a barrier),
    so ``cache_dir`` must be on a filesystem all ranks share.
    """
    import json
    import os

    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefixes = [prefixes] if isinstance(prefixes, (str, Path)) else list(prefixes)
    prefixes = [str(Path(p).expanduser()) for p in prefixes]
    if not prefixes:
        raise DataError("no data prefixes given")
    if seq_length < 2 or num_samples < 1 or global_batch_size < 1:
        raise DataError(f"seq_length={seq_length}, num_samples={num_samples} and global_batch_size="
                        f"{global_batch_size} must be >= 2, 1 and 1")
    if weights is not None:
        if len(weights) != len(prefixes) or any(w <= 0 for w in weights):
            raise DataError(f"weights {weights} must be one positive number per prefix "
                            f"({len(prefixes)} prefixes)")
        weights = [float(w) for w in weights]
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        raise RuntimeError("megatron-core's compiled dataset helpers (helpers_cpp) are missing: "
                           "a source / editable install needs `make -C megatron/core/datasets` "
                           "(pybind11); the PyPI wheel ships them") from None
    try:
        ranges = _split_ranges(1, split)
    except (AssertionError, ValueError, ZeroDivisionError):
        ranges = [None]
    if ranges[0] is None:
        raise DataError(f"split={split!r} must be 'train,valid,test' weights with train > 0, "
                        "e.g. '98,2,0'")
    has_valid = ranges[1] is not None
    if has_valid and weights is not None and valid_samples is None:
        raise DataError("blend weights need valid_samples (megatron sizes weighted splits)")
    # each prefix must give at least one train (and valid) row; all of them one global batch
    train_rows = 0
    for p in prefixes:
        if not IndexedDataset.exists(p):
            raise DataError(f"no {p}.bin / {p}.idx (make them with prepare_data)")
        meta = json.loads(Path(p + ".json").read_text()) if Path(p + ".json").exists() else {}
        if meta.get("eos_token_id", eos_token_id) != eos_token_id:
            raise DataError(f"{p} was tokenized with EOS id {meta['eos_token_id']}, not "
                            f"{eos_token_id}: another tokenizer")
        index = IndexedDataset(p)  # (its lengths are a view of the index's mmap: copy them)
        lengths = index.sequence_lengths.astype("int64")
        del index
        for name, r in zip(("train", "valid"), _split_ranges(len(lengths), split)[:2]):
            if r is None:
                continue
            rows = int(lengths[r[0]:r[1]].sum()) // seq_length
            if rows < 1:
                raise DataError(f"the {name} split ({split}) of {p} holds {r[1] - r[0]} documents, "
                                f"{int(lengths[r[0]:r[1]].sum())} tokens: not one row of "
                                f"{seq_length} tokens")
            if name == "train":
                train_rows += rows
    if train_rows < global_batch_size:
        raise DataError(f"the train data holds {train_rows} rows of {seq_length} tokens, fewer "
                        f"than one global batch ({global_batch_size})")

    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights), split=split,
        path_to_cache=cache_dir or os.path.join(os.path.dirname(prefixes[0]), "index-cache"),
        tokenizer=_EodTokenizer(eos_token_id), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
        add_extra_token_to_sequence=False,
    )
    # sizes: 0 (not None) for the splits not built, which megatron requires with weights
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_samples, valid_samples if has_valid else 0, 0], lambda: True,
        config).build()
    return train, valid


def batch_at(dataset, consumed_samples: int, global_batch_size: int, dp_rank: int = 0,
             dp_size: int = 1) -> TokenData:
    """This DP rank's rows of the global batch that starts at row ``consumed_samples`` of
    ``dataset`` (from :func:`training_dataset`): rank r gets rows ``consumed_samples + r * b`` to
    ``consumed_samples + (r + 1) * b``, ``b = global_batch_size // dp_size``, so a run resumed at
    ``consumed_samples`` continues exactly where it stopped. Tokens [b, s] int64, mask all True."""
    if global_batch_size % dp_size or not 0 <= dp_rank < dp_size:
        raise DataError(f"global_batch_size={global_batch_size} must be a multiple of dp_size="
                        f"{dp_size}, and 0 <= dp_rank={dp_rank} < dp_size")
    if consumed_samples < 0 or consumed_samples + global_batch_size > len(dataset):
        raise DataError(f"rows {consumed_samples}..{consumed_samples + global_batch_size} are "
                        f"past the {len(dataset)} rows of the dataset (ask training_dataset for "
                        f"num_samples >= steps * global_batch_size)")
    b = global_batch_size // dp_size
    start = consumed_samples + dp_rank * b
    tokens = torch.stack([dataset[i]["tokens"] for i in range(start, start + b)]).long()
    return TokenData(tokens, torch.ones_like(tokens, dtype=torch.bool))
