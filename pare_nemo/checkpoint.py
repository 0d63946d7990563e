"""Pare's Megatron checkpoint: Megatron-LM layout, torch_dist format, config and tokenizer beside it.

    <path>/latest_checkpointed_iteration.txt
    <path>/iter_0000000/            megatron.core.dist_checkpointing (torch_dist), loadable at any TP/PP
    <path>/model_config.json        the HF Olmo3Config (source of truth for the architecture,
                                    layer types and rope parameters) + padded vocab + dtype
    <path>/tokenizer/               tokenizer, chat template and generation config files

A training checkpoint (:func:`save_training_checkpoint`) has the same layout; its iteration
directories hold, besides the model (same keys, so :func:`load_model` and export read its weights),
the distributed optimizer state, the LR scheduler, the RNG states and the training loop's own
state, as Megatron-LM's ``save_checkpoint`` writes them. Saves and loads are fully parallel: the
data replicated over DP is split between the DP ranks, each writing (reading) its part.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

CONFIG_FILE = "model_config.json"
TOKENIZER_DIR = "tokenizer"
TRACKER = "latest_checkpointed_iteration.txt"
# How the distributed optimizer's state is sharded in a training checkpoint (megatron's
# `distrib_optim_sharding_type`, Megatron-LM's default): in the optimizer's own bucket layout,
# each DP rank writing and reading its own shard without communication. Loadable at another DP
# size (same TP/PP and same DDP buckets), not at another TP/PP.
OPTIMIZER_SHARDING = "dp_reshardable"


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


def check_same_tokenizer(teacher_path, student_path) -> None:
    """Teacher and student must share tokenizer and vocabulary (padded sizes may differ)."""
    from transformers import AutoTokenizer


    (tc, _, _), (sc, _, _) = read_model_config(teacher_path), read_model_config(student_path)
    if tc.vocab_size != sc.vocab_size:
        raise ValueError(f"teacher vocabulary {tc.vocab_size} != student vocabulary "
                         f"{sc.vocab_size}: distillation needs one tokenizer")
    tt = AutoTokenizer.from_pretrained(Path(teacher_path) / TOKENIZER_DIR)
    st = AutoTokenizer.from_pretrained(Path(student_path) / TOKENIZER_DIR)
    if tt.get_vocab() != st.get_vocab() or tt.eos_token_id != st.eos_token_id:
        raise ValueError(f"the tokenizers of {teacher_path} and {student_path} differ: "
                         "distillation needs one tokenizer")


def eos_token_id(path) -> int:
    """The EOS id of a Pare checkpoint's model (the first, where the config lists several)."""
    hf, _, _ = read_model_config(path)
    eos = hf.eos_token_id
    return eos[0] if isinstance(eos, list) else eos


def start_checkpoint_writer() -> None:
    """Start the process through which megatron's torch_dist writer reports its results (a
    multiprocessing Manager queue, one per process, made on the first save). megatron starts it
    with 'spawn' by default: a fresh interpreter that re-imports ``__main__`` (14 s measured here
    for a ``__main__`` importing torch, megatron and transformers; and a script without an
    ``if __name__ == "__main__"`` guard runs again in it). Pare starts it with 'fork' (0.04 s), as
    Megatron-LM's ``init_persistent_async_worker`` does. The forked process holds on,
    copy-on-write, to the memory pages its parent frees or rewrites afterwards (until the process
    ends): a process that goes on with large models in CPU memory after its first save should call
    this early, before building them. The saves call it (it starts once per process)."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        get_write_results_queue,
    )

    get_write_results_queue(mp_mode="fork")


def _dp_group():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group(with_context_parallel=True)


def _save_strategy():
    """megatron's torch_dist writer; what is replicated over DP is written by one DP rank or
    another, evenly (each DP rank writes its part)."""
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )

    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), _dp_group())


def _load_strategy():
    """megatron's torch_dist reader; each DP rank reads a part of what is replicated over DP and
    the DP ranks exchange them."""
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper,
    )

    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(), _dp_group())


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

    it_dir = iteration_dir(path, iteration)
    if _rank0():
        it_dir.mkdir(parents=True, exist_ok=True)
    _barrier()
    sd = _sharded_state_dict_releasing_views(model) if release_model else model.sharded_state_dict()
    start_checkpoint_writer()  # after the views are released: their memory really goes back
    dist_checkpointing.save(sd, str(it_dir), _save_strategy())
    del sd
    if _rank0():
        (Path(path) / TRACKER).write_text(str(iteration))
        write_model_config(path, hf_config, padded_vocab_size, dtype)
    _barrier()


def load_model(path: str | os.PathLike, parallel_output: bool = False, dtype=None,
               uneven_pipeline: bool = False, **config_overrides):
    """Build this rank's part of the model at the current TP/PP and load the checkpoint into it.
    Returns (model, hf_config). ``uneven_pipeline``: a layer count PP does not divide is split
    unevenly (``pare_nemo.olmo3.bridge.pipeline_split``) instead of refused."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from pare_nemo.olmo3.bridge import check_parallel_sizes, megatron_config
    from pare_nemo.olmo3.model import build_olmo3_model
    from pare_nemo.parallel import device

    hf_config, padded_vocab, saved_dtype = read_model_config(path)
    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    check_parallel_sizes(hf_config, tp, pp, uneven_pipeline=uneven_pipeline)
    cfg = megatron_config(hf_config, tp=tp, pp=pp, dtype=dtype or saved_dtype,
                          perform_initialization=False, **config_overrides)
    model = build_olmo3_model(
        cfg, padded_vocab,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        parallel_output=parallel_output,
    ).to(device())
    it_dir = iteration_dir(Path(path), latest_iteration(path))
    sd = model.sharded_state_dict()
    state = dist_checkpointing.load(sd, str(it_dir), _load_strategy())
    # a training checkpoint holds more (optimizer, scheduler, ...): take the model's entries
    model.load_state_dict({k: state[k] for k in sd})
    return model, hf_config


# ---------------------------------------------------------------------------------------------
# Training checkpoints (resume after preemption), as megatron/training/checkpointing.py writes them


def _tracked_iteration(path: Path) -> int | None:
    """The iteration of the last complete checkpoint under ``path``, None if there is none."""
    tracker = Path(path) / TRACKER
    return latest_iteration(path) if tracker.exists() else None


def _saved_iterations(path: Path) -> list[int]:
    return sorted(int(d.name.removeprefix("iter_")) for d in Path(path).glob("iter_*")
                  if d.is_dir() and d.name.removeprefix("iter_").isdigit())


def _sharding_metadata(optimizer_sharding: str) -> dict:
    """The ``metadata`` megatron's ``sharded_state_dict`` methods take (Megatron-LM's
    ``_build_sharded_state_dict_metadata``); stored in the checkpoint without the process group."""
    return {"distrib_optim_sharding_type": optimizer_sharding, "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True}


def _parallel_sizes() -> dict:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(with_context_parallel=True)}


def _rng_state():
    """This rank's RNG states (python, numpy, torch, CUDA, megatron's tensor-parallel RNG tracker)
    as Megatron-LM's ``get_rng_state`` stores them: one per (PP, TP) rank, from DP rank 0 (the DP
    ranks' generators are seeded alike), restored on every DP rank."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    return ShardedObject(
        "rng_state", [state],
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True))


def _set_rng_state(saved: list) -> None:
    from megatron.core import tensor_parallel

    state = saved[0]
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if torch.cuda.is_available() and state["cuda_rng_state"] is not None:
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tracker = tensor_parallel.get_cuda_rng_tracker()
    graph_safe = tensor_parallel.is_graph_safe_cuda_rng_tracker(tracker)
    tracker.set_states({k: tensor_parallel.convert_cuda_rng_state(v, to_graphable=graph_safe)
                        for k, v in state["rng_tracker_states"].items()})


def _inner_optimizers(optimizer):
    return [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]


def _allocate_optimizer_state(optimizer) -> None:
    """torch's Adam (megatron's optimizer without TE or apex, e.g. on the CPU) creates its state on
    its first step, and the distributed optimizer needs it to describe the state to load: take a
    zero-gradient step of each inner optimizer still without state (as megatron's
    ``_init_optimizer_states_with_dummy_values`` does). Only the fp32 main params and the Adam
    state change, and the load overwrites both."""
    for opt in _inner_optimizers(optimizer):
        if opt.state:
            continue
        params = [p for g in opt.param_groups for p in g["params"] if p.numel()]
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        for p in params:
            p.grad = None


def _load_optimizer(optimizer, state) -> None:
    """``optimizer.load_state_dict``. With torch's Adam, which counts steps per parameter (TE's and
    apex's count per group), megatron 0.19 puts the checkpoint's count in the param groups, then
    copies the pre-load count back into the per-parameter state (``dp_reshardable`` keeps ``step``
    as a local object): set it from the groups again."""
    optimizer.load_state_dict(state)
    for opt in _inner_optimizers(optimizer):
        for g in opt.param_groups:
            for p in g["params"]:
                per_param = opt.state.get(p, {})
                if "step" in g and isinstance(per_param.get("step"), torch.Tensor):
                    per_param["step"] = torch.full_like(per_param["step"], g["step"])


def _training_state_dict(model_chunks, optimizer, optimizer_sharding: str, is_loading: bool):
    """The sharded state dict of a training run: the model chunks (unwrapped from DDP and
    Float16Module: the keys of a plain model), the optimizer state, the RNG states."""
    from megatron.core.utils import unwrap_model

    models = unwrap_model(list(model_chunks))
    metadata = {**_sharding_metadata(optimizer_sharding), "dp_cp_group": _dp_group()}
    sd = {}
    for i, m in enumerate(models):
        sd["model" if len(models) == 1 else f"model{i}"] = m.sharded_state_dict(metadata=metadata)
    sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=is_loading, metadata=metadata)
    sd["rng_state"] = _rng_state()
    return sd


def _finish_save(path: Path, iteration: int, keep_last: int | None) -> None:
    """After every rank wrote ``iteration``: point the tracker at it (atomically), then delete all
    but the ``keep_last`` newest iterations up to it (newer ones may still be being written)."""
    if _rank0():
        tmp = Path(path) / f".{TRACKER}.tmp"
        tmp.write_text(str(iteration))
        os.replace(tmp, Path(path) / TRACKER)
        if keep_last is not None:
            done = [i for i in _saved_iterations(path) if i <= iteration]
            for i in done[:-keep_last]:
                shutil.rmtree(iteration_dir(path, i), ignore_errors=True)


def save_training_checkpoint(path: str | os.PathLike, iteration: int, model_chunks, optimizer,
                             scheduler, state: dict, keep_last: int | None = None,
                             async_queue=None) -> None:
    """Save a training run's state (all ranks call it) to ``<path>/iter_<iteration>/``: the model
    chunks (as from :func:`pare_nemo.engine.setup_training`), the distributed optimizer (sharded as
    :data:`OPTIMIZER_SHARDING`), ``scheduler.state_dict()``, the RNG states and ``state`` (the
    loop's own: iteration, consumed samples, ...; picklable, the same on every rank). The tracker
    file moves to ``iteration`` only once every rank has written it, then all but the
    ``keep_last`` newest iterations are deleted.

    With ``async_queue`` (megatron's ``AsyncCallsQueue``) the files are written in the background
    (megatron's async save) and the tracker moves when :func:`finalize_async_saves` finds the save
    done on every rank. The default ``AsyncCallsQueue()`` forks a writer per save, which writes the
    state as it was when this returned; ``AsyncCallsQueue(persistent=True)`` hands the tensors to a
    long-lived worker, which on a GPU copies them to the host before this returns, but on the CPU
    reads the live tensors while training goes on: use it only on GPUs."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (or None to keep all), got {keep_last}")
    latest = _tracked_iteration(path)
    if latest is not None and iteration <= latest:
        raise ValueError(f"{path} already holds iteration {latest}; cannot save iteration "
                         f"{iteration} (not after it)")
    it_dir = iteration_dir(path, iteration)
    if _rank0():
        shutil.rmtree(it_dir, ignore_errors=True)  # an earlier, unfinished save of it
        it_dir.mkdir(parents=True)
    _barrier()
    sd = _training_state_dict(model_chunks, optimizer, OPTIMIZER_SHARDING, is_loading=False)
    sd["opt_param_scheduler"] = scheduler.state_dict()
    sd["iteration"] = iteration
    sd["parallel"] = _parallel_sizes()
    sd["state"] = state
    # the nvidia-resiliency-ext queue takes its own requests; megatron-core's needs "mcore"
    async_strategy = "nvrx" if type(async_queue).__module__.startswith("nvidia_resiliency_ext") \
        else "mcore"
    start_checkpoint_writer()
    if async_strategy == "nvrx":  # nvidia-resiliency-ext's writer reports through its own queue
        from megatron.core.dist_checkpointing.strategies.torch import get_async_strategy

        get_async_strategy("nvrx")[1]["get_write_results_queue"](mp_mode="fork")
    request = dist_checkpointing.save(
        sd, str(it_dir), _save_strategy(), async_sharded_save=async_queue is not None,
        content_metadata=_sharding_metadata(OPTIMIZER_SHARDING), async_strategy=async_strategy)
    if async_queue is None:
        _finish_save(path, iteration, keep_last)
        _barrier()
    else:
        request.add_finalize_fn(lambda: _finish_save(path, iteration, keep_last))
        async_queue.schedule_async_request(request)


def finalize_async_saves(async_queue, blocking: bool = False) -> list[int]:
    """Finish the asynchronous saves that are done on every rank (all of them, waiting, with
    ``blocking``): their tracker moves. Call it on all ranks, every step (cheap: one all-reduce)
    and with ``blocking=True`` before exiting. Returns the finished calls' indices."""
    return async_queue.maybe_finalize_async_calls(blocking=blocking)


def load_training_checkpoint(path: str | os.PathLike, model_chunks, optimizer, scheduler):
    """Load the last complete training checkpoint under ``path`` (all ranks call it) into
    ``model_chunks``, ``optimizer``, ``scheduler`` and the RNG states, at the current DP size (TP
    and PP must be those it was saved at). Returns the ``state`` passed to
    :func:`save_training_checkpoint`, or None if ``path`` holds no complete checkpoint (iteration
    directories the tracker does not point at yet are ignored)."""
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model

    path = Path(path)
    iteration = _tracked_iteration(path)
    if iteration is None:
        return None
    it_dir = iteration_dir(path, iteration)
    common = dist_checkpointing.load_common_state_dict(str(it_dir))
    if "opt_param_scheduler" not in common:
        raise ValueError(f"{it_dir} holds model weights only, not a training checkpoint")
    saved, now = common["parallel"], _parallel_sizes()
    if (saved["tp"], saved["pp"]) != (now["tp"], now["pp"]):
        raise ValueError(f"{it_dir} was saved at TP={saved['tp']} PP={saved['pp']}; resume it at "
                         f"the same TP/PP (now TP={now['tp']} PP={now['pp']}); DP may differ")
    sharding = dist_checkpointing.load_content_metadata(preloaded_state_dict=common)[
        "distrib_optim_sharding_type"]
    _allocate_optimizer_state(optimizer)
    sd = _training_state_dict(model_chunks, optimizer, sharding, is_loading=True)
    loaded = dist_checkpointing.load(sd, str(it_dir), _load_strategy())
    models = unwrap_model(list(model_chunks))
    for i, m in enumerate(models):
        m.load_state_dict(loaded["model" if len(models) == 1 else f"model{i}"])
    with torch.no_grad():  # fp32 training: the main params are the model's own leaves
        _load_optimizer(optimizer, loaded["optimizer"])
    scheduler.load_state_dict(loaded["opt_param_scheduler"])
    _set_rng_state(loaded["rng_state"])
    _barrier()
    return loaded["state"]
