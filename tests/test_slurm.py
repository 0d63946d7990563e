"""The slurm/*.sh scripts under a real one-node Slurm 22.05 (tests/slurm_cluster.py), run the way
users run them: `sbatch slurm/<stage>.sh` from the repository root, settings in the environment,
resource flags overriding the GPU defaults (`--gpus-per-node=0`), 2 tasks where a stage is parallel.

- the pipeline: import -> importance (DP=2) -> prune -> distill (DP=2) -> export -> eval (DP=2),
  each job COMPLETED, the exported model loads in transformers and evaluates as its checkpoint;
- preemption: `scancel --signal=USR1` mid-run -> the tasks save and exit 75 -> the script requeues
  the job -> it runs again with SLURM_RESTART_COUNT=1, resumes and ends on the uninterrupted run's
  losses (bitwise: CPU, fp32);
- no warning: the tasks are SIGKILLed and the job requeued (`scontrol requeue`) -> it resumes from
  the last complete checkpoint and ends on the same losses.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from slurm_cluster import FINAL, SlurmCluster, ensure_slurm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARE = str(Path(sys.executable).parent / "pare")
CPU_FLAGS = ("--gpus-per-node=0", "--cpus-per-task=1", "--mem=0")
TWO_TASKS = ("--nodes=1", "--ntasks-per-node=2")
ONE_TASK = ("--nodes=1", "--ntasks=1")
# the tiny student's distillation: long enough to be signalled mid-run, checkpoints every 4 steps
STEPS = 40
DISTILL_ARGS = (f"train_steps={STEPS}", "global_batch_size=8", "micro_batch_size=2",
                "seq_length=64",
                "lr=3e-3", "min_lr=3e-4", "warmup_steps=2", "save_interval=4", "keep_last=2",
                "log_interval=1", "eval_interval=0", "dtype=float32", "recompute=none",
                "tensorboard=false")


@pytest.fixture(scope="module")
def cluster():
    reason = ensure_slurm()
    if reason:
        pytest.skip(reason)
    c = SlurmCluster().start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny Olmo 3 (HF directory) and pydoc text, on a path every task can read."""
    from pare_nemo.tiny import make_tiny_olmo3, make_tokenizer, pydoc_text

    root = tmp_path_factory.mktemp("slurm")
    make_tiny_olmo3(root / "hf", tokenizer=make_tokenizer(512), num_layers=4, hidden_size=64,
                    intermediate_size=256, num_heads=4, num_kv_heads=2, sliding_window=16)
    # documents separated by blank lines (pare prepare-data reads a .txt that way)
    (root / "text.txt").write_text("\n\n\n".join(pydoc_text().split("\n\n\n")[:300]))
    return root


def submit(cluster, script: str, flags: tuple, env: dict, args: tuple = (), out: Path = None):
    env = dict(env, PARE=PARE, OMP_NUM_THREADS="1")
    return cluster.sbatch(f"slurm/{script}", *flags, "-o", str(out), args=args, env=env,
                          cwd=str(REPO))


def completed(cluster, job_id: int, timeout: float = 600) -> dict:
    j = cluster.wait(job_id, timeout=timeout)
    assert j["JobState"] == "COMPLETED", f"{j['JobState']} {j.get('ExitCode')}\n{cluster.output(j)}"
    return j


def losses(save: Path) -> list[tuple[int, float]]:
    rows = [json.loads(r) for r in (save / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def wait_for_step(save: Path, step: int, cluster, job_id: int, timeout: float = 300,
                  after: str | None = None, out: Path | None = None):
    """Until metrics.jsonl shows ``step`` (and a checkpoint exists) while the job still runs
    (and, given ``after``, once the job's output shows it)."""
    def ready():
        j = cluster.job(job_id)
        assert j["JobState"] not in FINAL, cluster.output(j)  # still running, or requeued
        if after and after not in out.read_text(errors="replace"):
            return False
        f = save / "metrics.jsonl"
        return f.exists() and (save / "latest_checkpointed_iteration.txt").exists() and \
            len(f.read_text().splitlines()) >= step
    end = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < end, \
            f"step {step} not reached\n{cluster.output(cluster.job(job_id))}"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def pipeline(cluster, work):
    """Every stage as its own sbatch job, one after the other (the first test)."""
    w = work
    env = {"HF_PATH": str(w / "hf"), "MEGATRON_PATH": str(w / "mg"), "HF_HOME": str(w / "hf_home")}
    jobs = {}
    jobs["import"] = completed(cluster, submit(cluster, "import.sh", CPU_FLAGS + ONE_TASK, env,
                                               out=w / "import.out"))
    env.update(DATA=str(w / "text.txt"), SCORES_PATH=str(w / "scores.pt"))
    jobs["importance"] = completed(cluster, submit(
        cluster, "importance.sh", CPU_FLAGS + TWO_TASKS, env,
        args=("num_samples=32", "seq_length=64", "layer_loss_samples=8"),
        out=w / "importance.out"))
    env.update(SAVE_PATH=str(w / "pruned"), RECIPE="")
    jobs["prune"] = completed(cluster, submit(
        cluster, "prune.sh", CPU_FLAGS + ONE_TASK, env,
        args=("target_ffn_hidden_size=128", "target_hidden_size=48"),
        out=w / "prune.out"))
    from pare_nemo.data import prepare_data

    prepare_data(str(w / "text.txt"), str(w / "mg" / "tokenizer"), str(w / "data"))
    denv = {"TEACHER_PATH": str(w / "mg"), "STUDENT_PATH": str(w / "pruned"),
            "DATA": str(w / "data"), "SAVE_PATH": str(w / "distilled"), "RECIPE": "tiny_distill",
            "HF_HOME": str(w / "hf_home")}
    jobs["distill"] = completed(cluster, submit(cluster, "distill.sh", CPU_FLAGS + TWO_TASKS, denv,
                                                args=DISTILL_ARGS, out=w / "distill.out"))
    eenv = {"MEGATRON_PATH": str(w / "distilled"), "HF_PATH": str(w / "export"),
            "HF_HOME": str(w / "hf_home")}
    jobs["export"] = completed(cluster, submit(cluster, "export.sh", CPU_FLAGS + ONE_TASK, eenv,
                                               out=w / "export.out"))
    venv = {"RECIPE": "", "OUTPUT": str(w / "eval"), "HF_HOME": str(w / "hf_home")}
    jobs["eval"] = completed(cluster, submit(
        cluster, "eval.sh", CPU_FLAGS + TWO_TASKS, venv, out=w / "eval.out",
        args=(f"checkpoints=teacher:{w / 'mg'},distilled:{w / 'distilled'},{w / 'export'}",
              f"data={w / 'data'}", "num_samples=8", "seq_length=64", "report=false")))
    return {"jobs": jobs, "denv": denv}


def test_pipeline_stages_complete_and_export_loads(pipeline, work):
    import torch
    from transformers import AutoModelForCausalLM

    jobs = pipeline["jobs"]
    assert all(j["JobState"] == "COMPLETED" for j in jobs.values())
    assert jobs["importance"]["NumTasks"] == jobs["distill"]["NumTasks"] == "2"
    assert jobs["eval"]["NumTasks"] == "2"
    out = (work / "distill.out").read_text(errors="replace")
    assert "restart 0" in out and "--kill-on-bad-exit=0" in out, out[-3000:]
    rows = losses(work / "distilled")
    assert [s for s, _ in rows] == list(range(1, STEPS + 1))
    model = AutoModelForCausalLM.from_pretrained(work / "export")
    assert model.config.hidden_size == 48 and model.config.intermediate_size == 128
    ids = torch.arange(20).unsqueeze(0)
    assert torch.isfinite(model(ids).logits).all()
    ev = {r["name"]: r for r in json.loads((work / "eval" / "eval.json").read_text())}
    assert ev["distilled"]["parallel"]["dp"] == 2  # the Megatron checkpoints ran at DP=2
    assert abs(ev["distilled"]["loss"] - ev["export"]["loss"]) < 1e-4  # its export: the same


def test_preempted_then_killed_job_resumes_on_the_same_curve(cluster, pipeline, work):
    """One distillation job, interrupted twice (one job: each restart costs two process starts).

    1. USR1 mid-run (what --signal=USR1@120 sends before the time limit): the tasks save and exit
       75, the script requeues the job, it comes back with SLURM_RESTART_COUNT=1 and resumes at the
       step it saved.
    2. No warning: the tasks are SIGKILLed and the job is requeued (`scontrol requeue`, what a
       node failure does): it comes back with SLURM_RESTART_COUNT=2 and resumes from the last
       checkpoint that completed.
    It ends on the uninterrupted run's losses, bit for bit."""
    save, out_file = work / "interrupted", work / "interrupted.out"
    env = dict(pipeline["denv"], SAVE_PATH=str(save))
    job = submit(cluster, "distill.sh", CPU_FLAGS + TWO_TASKS, env, args=DISTILL_ARGS,
                 out=out_file)
    wait_for_step(save, 8, cluster, job)
    cluster.run("scancel", "--signal=USR1", str(job))
    cluster.wait(job, until=lambda j: j["Restarts"] == "1", timeout=300)
    wait_for_step(save, 24, cluster, job, after="restart 1", out=out_file)
    saved = int((save / "latest_checkpointed_iteration.txt").read_text())
    procs = [p for p in _pids_with_env(f"SLURM_JOB_ID={job}") if _is_task(p)]
    tasks = [p for p in procs if _parent(p) not in procs]
    assert len(tasks) == 2, procs  # the two srun tasks (+ any process they forked)
    for p in procs:
        os.kill(p, signal.SIGKILL)
    cluster.run("scontrol", "requeue", str(job))
    j = completed(cluster, job)
    out = out_file.read_text(errors="replace")
    assert j["Restarts"] == "2", out[-3000:]
    assert "SIGUSR1: saved step" in out and "requeueing job" in out, out[-3000:]
    assert "restart 1" in out and "restart 2" in out, out[-3000:]
    first, second = (int(m) for m in re.findall(r"resuming \S+ at step (\d+)", out))
    assert 8 <= first < 24, out[-3000:]  # where the signal found it (saved there)
    # the last complete checkpoint when the tasks died (every save_interval=4 steps)
    assert second >= saved >= 20 and second % 4 == 0 and second < STEPS, out[-3000:]
    assert losses(save) == losses(work / "distilled")


def _pids_with_env(mark: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if mark.encode() in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _is_task(pid: int) -> bool:
    """A `pare distill` process (a task or a child it forked; not the batch shell, srun or
    slurmstepd)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(c.endswith(b"/pare") for c in cmd) and b"distill" in cmd and b"srun" not in cmd[0]
