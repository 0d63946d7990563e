"""Pare's Megatron checkpoint: Megatron-LM layout, torch_dist format, config and tokenizer beside it.

    <path>/latest_checkpointed_iteration.txt
    <path>/iter_0000000/            megatron.core.dist_checkpointing (torch_dist), loadable at any TP/PP
    <path>/model_config.json        the HF Olmo3Config (source of truth for the architecture,
                                    layer types and rope parameters) + padded vocab + dtype
    <path>/tokenizer/               tokenizer, chat template and generation config files
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

CONFIG_FILE = "model_config.json"
TOKENIZER_DIR = "tokenizer"
TRACKER = "latest_checkpointed_iteration.txt"


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def check_output_dir(path: str | os.PathLike, overwrite: bool, inputs=()) -> Path:
    """Refuse an existing output unless ``overwrite``, and always an output that is one of the
    ``inputs`` or contains one (``overwrite=true`` would delete the source)."""
    path = Path(path)
    out = path.expanduser().resolve()
    for i in inputs:
        src = Path(i).expanduser().resolve()
        if out == src or out in src.parents:
            raise ValueError(f"output {path} is {'the input' if out == src else 'a parent of the input'}"
                             f" {i}: choose another output path")
    if path.exists() and not overwrite:
        raise FileExistsError(f"output {path} already exists; pass overwrite=true to replace it")
    return path


@contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False, inputs=()):
    """Yield a temporary sibling directory; rename it to ``path`` only when the body succeeds.
    Works with several ranks: all write into the same temporary directory, rank 0 renames."""
    path = check_output_dir(path, overwrite, inputs)
    tmp = path.parent / f".{path.name}.partial"
    if _rank0():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    try:
        yield tmp
        _barrier()
    except BaseException:
        if _rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if _rank0():
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    _barrier()


def iteration_dir(path: Path, iteration: int) -> Path:
    return Path(path) / f"iter_{iteration:07d}"


def latest_iteration(path: str | os.PathLike) -> int:
    tracker = Path(path) / TRACKER
    if not tracker.exists():
        raise FileNotFoundError(f"{path} is not a Pare/Megatron checkpoint (no {TRACKER})")
    text = tracker.read_text().strip()
    return 0 if text == "release" else int(text)


def write_model_config(path: Path, hf_config, padded_vocab_size: int, dtype: torch.dtype) -> None:
    meta = {
        "hf_config": hf_config.to_dict(),
        "padded_vocab_size": padded_vocab_size,
        "dtype": str(dtype).removeprefix("torch."),
    }
    (Path(path) / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=str))


def read_model_config(path: str | os.PathLike):
    """(HF Olmo3Config, padded vocab size, dtype) of a Pare checkpoint."""
    from transformers import Olmo3Config

    f = Path(path) / CONFIG_FILE
    if not Path(path).is_dir():
        raise FileNotFoundError(f"Megatron checkpoint {path} does not exist")
    if not f.exists():
        raise FileNotFoundError(f"{path} is not a Pare checkpoint (no {CONFIG_FILE})")
    meta = json.loads(f.read_text())
    return Olmo3Config.from_dict(meta["hf_config"]), meta["padded_vocab_size"], getattr(
        torch, meta["dtype"])


def _in_process_write_queue() -> None:
    """megatron's torch_dist writer hands results back through a multiprocessing Manager queue made
    with 'spawn' (for async saves in another process). Pare saves synchronously, in this process,
    where a plain thread-safe queue does the same job without starting a Manager (which re-imports
    ``__main__`` and costs ~10 s per process)."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def _sharded_state_dict_releasing_views(model):
    """``model.sharded_state_dict()`` with its factories (the SwiGLU fc1 gate/up split) applied now,
    one at a time: the halves become tensors of their own and the parameter they were views of is
    released. megatron's writer would otherwise clone every view at once (about 0.4x of an Olmo
    checkpoint). Leaves ``model`` unusable: for saves that end a process's use of it (import)."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    def own_storage(t):
        if isinstance(t, ShardedTensor) and t.data.untyped_storage().nbytes() != t.data.nbytes:
            t.data = t.data.clone()
        return t

    def apply(x):
        if isinstance(x, ShardedTensorFactory):
            source = x.data
            x = dict_list_map_inplace(own_storage, x.build())
            source.data = torch.empty(0, dtype=source.dtype)
        return x

    sd = model.sharded_state_dict()
    dict_list_map_inplace(apply, sd)
    return sd


def save_model(model, path: Path, hf_config, padded_vocab_size: int, dtype: torch.dtype,
               iteration: int = 0, release_model: bool = False) -> None:
    """Save this rank's part of ``model`` (all ranks call it) into ``path`` (already existing).
    ``release_model=True`` frees the model's memory while saving (the model is unusable after)."""
    from megatron.core import dist_checkpointing

    _in_process_write_queue()
    it_dir = iteration_dir(path, iteration)
    if _rank0():
        it_dir.mkdir(parents=True, exist_ok=True)
    _barrier()
    sd = _sharded_state_dict_releasing_views(model) if release_model else model.sharded_state_dict()
    dist_checkpointing.save(sd, str(it_dir))
    del sd
    if _rank0():
        (Path(path) / TRACKER).write_text(str(iteration))
        write_model_config(path, hf_config, padded_vocab_size, dtype)
    _barrier()


def load_model(path: str | os.PathLike, parallel_output: bool = False, dtype=None,
               **config_overrides):
    """Build this rank's part of the model at the current TP/PP and load the checkpoint into it.
    Returns (model, hf_config)."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from conversion.olmo3 import check_parallel_sizes, megatron_config
    from pare_nemo.model import build_olmo3_model
    from pare_nemo.parallel import device

    hf_config, padded_vocab, saved_dtype = read_model_config(path)
    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    check_parallel_sizes(hf_config, tp, pp)
    cfg = megatron_config(hf_config, tp=tp, pp=pp, dtype=dtype or saved_dtype,
                          perform_initialization=False, **config_overrides)
    model = build_olmo3_model(
        cfg, padded_vocab,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        parallel_output=parallel_output,
    ).to(device())
    it_dir = iteration_dir(Path(path), latest_iteration(path))
    state = dist_checkpointing.load(model.sharded_state_dict(), str(it_dir))
    model.load_state_dict(state)
    return model, hf_config
