"""What a training run shows and keeps: a progress bar, a log line every ``log_interval`` steps,
throughput and MFU, ``metrics.jsonl``, TensorBoard events, Weights & Biases (optional) and
``loss_curve.png``."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from pare_nemo.rundir import LOSS_CURVE, METRICS_FILE, TENSORBOARD_DIR

PEAK_BF16_FLOPS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("B200", 2250e12))


def flops_per_token(hf, seq_length: int) -> float:
    """Forward FLOPs per token: 2 x (matmul parameters) + attention scores (causal: half)."""
    h, L = hf.hidden_size, hf.num_hidden_layers
    heads, kv = hf.num_attention_heads, hf.num_key_value_heads
    d = getattr(hf, "head_dim", None) or h // heads
    per_layer = h * d * (2 * heads + 2 * kv) + 3 * h * hf.intermediate_size
    attn = 2 * heads * d * seq_length  # q.k and p.v over half the keys on average, x2 FLOPs
    return 2 * (L * per_layer + h * hf.vocab_size) + L * attn


def mfu(flops_per_s_per_gpu: float) -> float | None:
    """Model FLOPs utilization against the GPU's dense bf16 peak (None off GPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_FLOPS if k in name), None)
    return None if peak is None else flops_per_s_per_gpu / peak


def log_line(row: dict) -> str:
    parts = [f"step {row['step']}", f"tokens {row['consumed_tokens']:.3g}"]
    for k, v in row.items():
        if k in ("step", "consumed_tokens") or v is None or k.startswith("valid"):
            continue
        if k == "skipped":
            if v:
                parts.append("SKIPPED (non-finite)")
        elif k == "lr":
            parts.append(f"lr {v:.2e}")
        elif k == "tokens_per_s":
            parts.append(f"{v:,.0f} tok/s")
        elif k == "mfu":
            parts.append(f"MFU {v:.1%}")
        elif k == "peak_memory_gb":
            parts.append(f"peak {v:.1f} GB")
        else:
            parts.append(f"{k} {v:.4f}")
    return " | ".join(parts)


class Metrics:
    """Per-step rows of a run in ``save``: ``metrics.jsonl`` (rewritten up to the resumed step, so
    a resumed run's file is the uninterrupted run's), TensorBoard events, the progress bar and log
    lines (rank 0), throughput and MFU on log steps (``flops_per_token`` of the whole step, per
    token), ``loss_curve.png`` at the end."""

    def __init__(self, save: Path, step: int, total_steps: int, rank0: bool, tensorboard: bool,
                 flops_per_token: float, world_size: int, name: str = "distill",
                 wandb: str | None = None, config: dict | None = None):
        from tqdm import tqdm

        self.rank0, self.file = rank0, Path(save) / METRICS_FILE
        self.rows, self.pending, self.writer, self.wandb = [], [], None, None
        self.flops, self.world = flops_per_token, world_size
        self.t_last, self.tokens_since = time.perf_counter(), 0
        self.bar = tqdm(total=total_steps, initial=step, desc=name, unit="step",
                        disable=not rank0)
        if not rank0:
            return
        if self.file.exists():
            self.rows = [r for r in map(json.loads, self.file.read_text().splitlines())
                         if r["step"] <= step]
            self._write(self.rows, "w")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(save) / TENSORBOARD_DIR),
                                            purge_step=step + 1)
            except ImportError:
                print("tensorboard is not installed: no TensorBoard events", flush=True)
        if wandb:
            self.wandb = _wandb_run(Path(save), wandb, config)

    def step_started(self):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def count(self, tokens: int):
        """A step's tokens, towards the next throughput."""
        self.tokens_since += tokens

    def throughput(self) -> dict:
        """tokens/s and MFU over the steps since the last call, peak memory of this step."""
        dt = time.perf_counter() - self.t_last
        out = {"tokens_per_s": self.tokens_since / dt,
               "mfu": mfu(self.flops * self.tokens_since / dt / self.world)}
        if torch.cuda.is_available():
            out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.t_last, self.tokens_since = time.perf_counter(), 0
        return out

    def say(self, text: str):
        if self.rank0:
            self.bar.write(text)

    def add(self, row: dict, log: bool = False):
        self.bar.update(1)
        if log:
            self.say(log_line(row))
        if "valid loss" in row:
            self.say("  validation: " + ", ".join(
                f"{k} {v:.4f}" for k, v in row.items() if k.startswith("valid")))
        if not self.rank0:
            return
        self.rows.append(row)
        self.pending.append(row)
        scalars = {k.replace(" ", "_"): v for k, v in row.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
                   and math.isfinite(v)}
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, row["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["step"])

    def _write(self, rows, mode):
        with open(self.file, mode) as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    def flush(self):
        """Called after each checkpoint: the file never gets ahead of the saved state by more
        than the steps a resume replays (they are cut on resume)."""
        if self.rank0 and self.pending:
            self._write(self.pending, "a")
            self.pending = []
            if self.writer is not None:
                self.writer.flush()

    def close(self, plot: bool):
        self.bar.close()
        self.flush()
        if not self.rank0:
            return
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
        if plot and self.rows:
            plot_losses(self.rows, self.file.parent / LOSS_CURVE)


def _wandb_run(save: Path, project: str, config: dict | None):
    """The run's Weights & Biases run, files in ``<save>/wandb``; a resumed run continues the
    same W&B run (its id comes from the run directory). ``WANDB_MODE=offline`` keeps it local
    (``wandb sync`` uploads it later)."""
    import hashlib

    import wandb

    run_id = hashlib.sha256(str(save.resolve()).encode()).hexdigest()[:16]
    (save / "wandb").mkdir(parents=True, exist_ok=True)
    return wandb.init(project=project, name=save.name, id=run_id, resume="allow",
                      dir=str(save), config=config)


def plot_losses(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = [k for k in rows[-1] if k in ("loss", "kd", "ce") or k.startswith("layer")
            or k == "embedding"]
    for k in keys:
        ax.plot(steps, [r.get(k) for r in rows], label=k)
    valid = [(r["step"], r["valid loss"]) for r in rows if "valid loss" in r]
    if valid:
        ax.plot(*zip(*valid), "o-", label="valid loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per token")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("distillation")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.rename(path)
