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


def check_seq_length(seq_length: int, hf_config) -> None:
    """Refuse rows longer than the model's context (RoPE / YaRN were not made for them)."""
    if seq_length > hf_config.max_position_embeddings:
        raise ValueError(f"seq_length={seq_length} is longer than the model's context "
                         f"(max_position_embeddings={hf_config.max_position_embeddings})")


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


def next_token_nll(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                   vocab_size: int, tp_group=None):
    """(sum, count) of next-token NLL over positions where both tokens are real: the one loss
    definition of every stage. logits: [b, s, V_local], vocab-parallel over ``tp_group`` (megatron's
    output with ``parallel_output=True``) or the whole (padded) vocabulary when it is None; columns
    from ``vocab_size`` on are padding and excluded. tokens and mask: [b, s]. Computed by
    :func:`pare_nemo.losses.cross_entropy` (no vocabulary gather, fp32, chunked)."""
    from pare_nemo.losses import cross_entropy

    keep = mask[:, 1:] & mask[:, :-1]
    nll = cross_entropy(logits[:, :-1], tokens[:, 1:], vocab_size, tp_group=tp_group)
    return (nll * keep).sum(), keep.sum()


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
