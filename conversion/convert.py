"""HF Olmo 3 directory <-> Pare Megatron checkpoint, streaming one tensor at a time.

Import builds the Megatron model once (TP=1, PP=1, no random init), fills each parameter from the
HF safetensors as it is read, and saves with megatron.core.dist_checkpointing: the checkpoint then
loads at any TP/PP. Export loads at TP=1/PP=1 and writes HF safetensors shard by shard. Neither holds
two copies of the model. Everything is validated before work starts, and written to a temporary
directory renamed at the end.
"""

import json
import os
import shutil
import struct
from pathlib import Path

import torch

from pare_nemo.olmo3 import bridge
from pare_nemo.checkpoint import (
    TOKENIZER_DIR,
    atomic_output_dir,
    check_output_dir,
    load_model,
    read_model_config,
    save_model,
)

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class CheckpointError(ValueError):
    """A checkpoint that Pare cannot convert; the message says why."""


# ---------------------------------------------------------------- validation (headers only)


def _read_safetensors_header(file: Path) -> dict:
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupted safetensors file {file}: {e}") from None
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    base = 8 + n
    for name, info in header.items():
        start, end = info["data_offsets"]
        numel = 1
        for s in info["shape"]:
            numel *= s
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None or end > data_size or end - start != numel * dtype.itemsize:
            raise CheckpointError(
                f"corrupted or truncated safetensors file {file}: tensor {name} does not fit")
        info["offset"] = base + start
    return header


def _read_rows_into(f, info: dict, row_start: int, row_end: int, out: torch.Tensor) -> None:
    """Read rows [row_start, row_end) of a safetensors tensor straight into ``out`` (contiguous,
    same dtype) with plain file I/O: no mmap pages left resident, no intermediate copy. A block
    stored in another dtype (``dtype=`` on import) is read into a buffer of its own and converted."""
    stored = _ST_DTYPES[info["dtype"]]
    dst = out if stored == out.dtype else torch.empty(out.shape, dtype=stored)  # converted below
    row_bytes = dst.nbytes // max(dst.shape[0], 1) if dst.dim() > 1 else dst.element_size()
    f.seek(info["offset"] + row_start * row_bytes)
    view = memoryview(dst.view(-1).view(torch.uint8).numpy())
    if f.readinto(view) != (row_end - row_start) * row_bytes:
        raise CheckpointError(f"short read from {f.name}")
    if dst is not out:
        out.copy_(dst)


HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*"]


def resolve_hf_path(hf_path: str) -> Path:
    """A local directory as is; otherwise a Hugging Face Hub id (``allenai/Olmo-3-7B-Instruct``,
    optionally ``@revision``), downloaded (safetensors, config, tokenizer) into the HF cache."""
    local = Path(hf_path).expanduser()
    looks_local = (hf_path.startswith((".", "/", "~")) or hf_path.count("/") != 1
                   or Path(hf_path.split("/")[0]).expanduser().is_dir())  # my_models/olmo3
    if local.exists() or looks_local:
        if not local.is_dir():
            raise CheckpointError(f"HF checkpoint directory {hf_path} does not exist")
        return local
    from huggingface_hub import snapshot_download

    repo, _, revision = hf_path.partition("@")
    try:
        return Path(snapshot_download(repo, revision=revision or None,
                                      allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated model, …
        raise CheckpointError(f"{hf_path} is not a local directory, and downloading it from the "
                              f"Hugging Face Hub failed: {type(e).__name__}: {e}") from None


def load_hf_config(hf_path: str | os.PathLike):
    """The HF config of an Olmo 3 checkpoint directory, or a clear error saying what was found."""
    from transformers import Olmo3Config

    hf_path = Path(hf_path)
    if not hf_path.is_dir():
        raise CheckpointError(f"HF checkpoint directory {hf_path} does not exist")
    cfg_file = hf_path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{hf_path} has no config.json: not a Hugging Face model directory")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"corrupted {cfg_file}: {e}") from None
    archs = raw.get("architectures") or []
    if raw.get("model_type") != "olmo3" or (archs and archs[0] not in bridge.SUPPORTED_ARCHITECTURES):
        found = archs[0] if archs else raw.get("model_type", "unknown")
        raise CheckpointError(
            f"{hf_path} holds a {found} model (model_type={raw.get('model_type')!r}); Pare supports "
            f"Olmo 3 checkpoints ({', '.join(bridge.SUPPORTED_ARCHITECTURES)}, model_type 'olmo3')")
    cfg = Olmo3Config.from_pretrained(hf_path)
    if cfg.tie_word_embeddings:
        raise CheckpointError("tied word embeddings are not supported (Olmo 3 does not tie them)")
    return cfg


def index_hf_weights(hf_path: Path, hf_config) -> dict[str, tuple[Path, dict]]:
    """Map every expected HF tensor name to (safetensors file, header entry), checking names and
    shapes, from the headers alone."""
    index = hf_path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"corrupted {index}: {e}") from None
        files = sorted(set(weight_map.values()))
    elif (hf_path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(
            f"{hf_path} has no model.safetensors or model.safetensors.index.json "
            "(only safetensors checkpoints are supported)")
    where: dict[str, tuple[Path, dict]] = {}
    shapes: dict[str, tuple] = {}
    for name in files:
        f = hf_path / name
        if not f.exists():
            raise CheckpointError(f"missing weight file {f} (listed in the index)")
        for t, info in _read_safetensors_header(f).items():
            where[t] = (f, info)
            shapes[t] = tuple(info["shape"])
    expected = bridge.hf_shapes(hf_config)
    missing = [n for n in expected if n not in where]
    if missing:
        raise CheckpointError(f"{len(missing)} tensors missing from {hf_path}, e.g. {missing[:3]}")
    wrong = [(n, shapes[n], s) for n, s in expected.items() if shapes[n] != s]
    if wrong:
        n, got, want = wrong[0]
        raise CheckpointError(f"{len(wrong)} tensors have unexpected shapes, e.g. {n}: {got} != {want}")
    return where


# ---------------------------------------------------------------- import


DTYPES = ("float32", "bfloat16", "float16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "merges.txt", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


def check_tokenizer(tok_dir: Path, hf_config, given: bool) -> list[Path]:
    """The tokenizer files to keep with the checkpoint; a clear error if there is no tokenizer
    that loads, or if it has more tokens than the model's vocabulary."""
    files = [tok_dir / n for n in TOKENIZER_FILES if (tok_dir / n).is_file()]
    hint = "" if given else "; pass tokenizer_path=<directory with the tokenizer files>"
    if not any(f.name != "generation_config.json" for f in files):
        raise CheckpointError(f"{tok_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}"
                              f", …){hint}")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(tok_dir)
    except Exception as e:
        raise CheckpointError(f"the tokenizer in {tok_dir} does not load: {type(e).__name__}: "
                              f"{e}{hint}") from None
    if len(tok) > hf_config.vocab_size:
        raise CheckpointError(f"the tokenizer in {tok_dir} has {len(tok)} tokens, more than the "
                              f"model's vocab_size={hf_config.vocab_size}{hint}")
    return files


def import_hf(hf_path: str, megatron_path: str, overwrite: bool = False,
              dtype: str | None = None, tokenizer_path: str | None = None) -> Path:
    """HF Olmo 3 directory or Hub id -> Pare Megatron checkpoint (loadable at any TP/PP)."""
    from pare_nemo.olmo3.model import build_olmo3_model
    from pare_nemo.parallel import distributed

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    hf_path = resolve_hf_path(hf_path)
    hf_config = load_hf_config(hf_path)
    where = index_hf_weights(hf_path, hf_config)
    tok_dir = resolve_hf_path(tokenizer_path) if tokenizer_path else hf_path
    tokenizer_files = check_tokenizer(tok_dir, hf_config, given=tokenizer_path is not None)
    check_output_dir(megatron_path, overwrite, inputs=[hf_path, tok_dir])
    torch_dtype = getattr(torch, dtype) if dtype else bridge.hf_dtype(hf_config)
    padded = bridge.padded_vocab_size(hf_config.vocab_size)

    with distributed(tp=1, pp=1), atomic_output_dir(megatron_path, overwrite,
                                                    inputs=[hf_path, tok_dir]) as tmp:
        cfg = bridge.megatron_config(hf_config, dtype=torch_dtype, use_cpu_initialization=True,
                                     perform_initialization=False)
        model = build_olmo3_model(cfg, padded)
        params = model.state_dict(keep_vars=True)
        handles = {}
        try:
            for mname, hnames, kind in bridge.expand(hf_config.num_hidden_layers):
                param = params[mname].data
                rows, blocks = bridge.row_blocks(kind, hf_config, param.shape[0])
                param[max(d + e - s for _, s, e, d in blocks):].zero_()  # vocab padding rows
                for i, s, e, d in blocks:
                    f, info = where[hnames[i]]
                    if f not in handles:
                        handles[f] = open(f, "rb")
                    _read_rows_into(handles[f], info, s, e, param[d:d + e - s])
        finally:
            for fh in handles.values():
                fh.close()
        hf_config.dtype = torch_dtype
        save_model(model, tmp, hf_config, padded, torch_dtype, release_model=True)
        del model, params
        tok = tmp / TOKENIZER_DIR
        tok.mkdir()
        for f in tokenizer_files:
            shutil.copy2(f, tok / f.name)
    return Path(megatron_path)


# ---------------------------------------------------------------- export


def export_hf(megatron_path: str, hf_path: str, overwrite: bool = False,
              max_shard_size: int = 5 * 2**30) -> Path:
    """Pare Megatron checkpoint -> HF directory that AutoModelForCausalLM / AutoTokenizer load."""
    from safetensors.torch import save_file

    from pare_nemo.parallel import distributed

    megatron_path = Path(megatron_path)
    hf_config, _, dtype = read_model_config(megatron_path)  # clear error if not a checkpoint
    check_output_dir(hf_path, overwrite, inputs=[megatron_path])

    with distributed(tp=1, pp=1), atomic_output_dir(hf_path, overwrite,
                                                    inputs=[megatron_path]) as tmp:
        model, hf_config = load_model(megatron_path, use_cpu_initialization=True)
        params = model.state_dict()
        shard: dict[str, torch.Tensor] = {}
        shard_bytes, files, weight_map = 0, [], {}

        def flush():
            nonlocal shard, shard_bytes
            if shard:
                name = f"model-{len(files) + 1:05d}.safetensors"
                save_file(shard, tmp / name, metadata={"format": "pt"})
                files.append(name)
                weight_map.update({k: name for k in shard})
                shard, shard_bytes = {}, 0

        for mname, hnames, kind in bridge.expand(hf_config.num_hidden_layers):
            for h, t in zip(hnames, bridge.to_hf(kind, params[mname], hf_config)):
                nbytes = t.numel() * t.element_size()
                if shard and shard_bytes + nbytes > max_shard_size:
                    flush()
                shard[h] = t.contiguous()
                shard_bytes += nbytes
        flush()
        del model, params
        if len(files) == 1:
            (tmp / files[0]).rename(tmp / "model.safetensors")
        else:
            total = sum((tmp / f).stat().st_size for f in files)
            n = len(files)
            renames = {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, f in enumerate(files)}
            for old, new in renames.items():
                (tmp / old).rename(tmp / new)
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total},
                 "weight_map": {k: renames[v] for k, v in weight_map.items()}}, indent=2))
        hf_config.architectures = list(bridge.SUPPORTED_ARCHITECTURES)
        hf_config.dtype = dtype
        hf_config.save_pretrained(tmp)
        tok = megatron_path / TOKENIZER_DIR
        if tok.is_dir():
            for f in tok.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
    return Path(hf_path)
