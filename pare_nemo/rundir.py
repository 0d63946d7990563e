"""A distillation run directory (``save_path``): the files it holds, who writes them, their readers.

    <save_path>/distill_args.json      the run's DistillConfig (its sections, as pare_nemo.config)
    <save_path>/metrics.jsonl          one row per step: losses, lr, grad norm, throughput, valid
    <save_path>/loss_curve.png         at the end of the run
    <save_path>/tensorboard/           TensorBoard events of the same rows
    <save_path>/model_config.json      \\
    <save_path>/tokenizer/              | a Pare checkpoint (pare_nemo.checkpoint): export, eval
    <save_path>/prune_plan.json         | and a later distillation read the run as the student
    <save_path>/iter_*/ + tracker      /  (training checkpoints: weights, optimizer, RNG, loop)

Running the same config again resumes the run (:func:`check_save_path`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from pare_nemo.config import Data, DistillConfig, Run

ARGS_FILE = "distill_args.json"
METRICS_FILE = "metrics.jsonl"
LOSS_CURVE = "loss_curve.png"
TENSORBOARD_DIR = "tensorboard"
SPARSITY_CHECK = "sparse_integrity.json"  # distill mask=: pruned weights stayed zero


def write_json(path: Path, data) -> None:
    """``path`` holds ``data`` as JSON, or is untouched (a temporary file renamed)."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def read_config(path) -> DistillConfig | None:
    """The config of the distillation run in ``path`` (None when it is not one). Runs saved
    before the config had sections (flat arguments) read the same."""
    f = Path(path) / ARGS_FILE
    return DistillConfig.from_dict(json.loads(f.read_text())) if f.exists() else None


def read_data(path) -> Data | None:
    """The data section of the distillation run in ``path`` (which prefixes, which split): what
    evaluation needs to hold out its validation rows. None when ``path`` is not a run."""
    f = Path(path) / ARGS_FILE
    if not f.exists():
        return None
    saved = json.loads(f.read_text())
    part = saved["data"] if isinstance(saved.get("data"), dict) else saved  # older runs: flat
    names = {f.name for f in dataclasses.fields(Data)}
    return Data(**{k: v for k, v in part.items() if k in names})


def read_metrics(path) -> list[dict]:
    f = Path(path) / METRICS_FILE
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def check_save_path(cfg: DistillConfig) -> bool:
    """True when ``save_path`` holds this run's checkpoints (resume); False when it is new or
    empty; an error when it holds anything else or a run with another config."""
    save = Path(cfg.run.save_path)
    if not save.exists() or (save.is_dir() and not any(save.iterdir())):
        return False
    if not (save / ARGS_FILE).exists():
        raise FileExistsError(f"save_path {save} exists and holds something other than a "
                              f"distillation run's checkpoints (no {ARGS_FILE}); choose another")
    saved, now = read_config(save).flat(), cfg.flat()
    diff = {k: (saved[k], v) for k, v in now.items()
            if k not in Run.RESUMABLE and saved[k] != v}
    if diff:
        raise ValueError(f"save_path {save} holds a run with other arguments "
                         + ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
                         + "; resume with the same arguments or choose another save_path")
    return True


def start(cfg: DistillConfig, student_config, padded_vocab_size: int, dtype) -> None:
    """What makes a new run directory a Pare checkpoint (config, tokenizer, plan) and a resumable
    run (its config); checkpoints and the tracker come with each save. Rank 0 calls it."""
    from pare_nemo.checkpoint import TOKENIZER_DIR, write_model_config
    from pare_nemo.prune import PLAN_FILE

    save, student = Path(cfg.run.save_path), Path(cfg.models.student_path)
    save.mkdir(parents=True, exist_ok=True)
    shutil.copytree(student / TOKENIZER_DIR, save / TOKENIZER_DIR, dirs_exist_ok=True)
    if (student / PLAN_FILE).exists():
        shutil.copy(student / PLAN_FILE, save / PLAN_FILE)
    if cfg.models.mask:  # the distilled model keeps its zeros: it carries their mask on
        from pare_nemo.sparsify import MASK_FILE, mask_file

        shutil.copy(mask_file(cfg.models.mask), save / MASK_FILE)
    write_model_config(save, student_config, padded_vocab_size, dtype)
    write_json(save / ARGS_FILE, cfg.to_dict())
