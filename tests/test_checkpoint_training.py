"""Training checkpoints (pare_nemo.checkpoint.save_training_checkpoint / load_training_checkpoint):
a run that resumes from one continues exactly as if it had not stopped.

Run A trains the tiny model at DP=2 (2 gloo processes) for 7 iterations on fixed random batches,
saving after iterations 2 and 3 and, asynchronously, 4, keeping the last 2. Then:

- run B resumes from iteration 4 at DP=2, with everything rebuilt (model, DDP, optimizer,
  scheduler, parallel state) and the global RNGs reseeded, in A's two processes (a fresh spawn
  would cost another ~25 s of imports): the same weights, optimizer state (fp32 main params, Adam
  moments), RNG draws (python, numpy, torch, megatron's RNG tracker) and loop state as A had right
  after saving, and A's losses bitwise (CPU, same reduction order);
- a DP=1 run resumes from A's checkpoint (the distributed optimizer's state resharded from 2 to 1
  DP ranks): the same weights and optimizer state bitwise (loading copies them), and losses within
  1e-4 of A's (measured 4.8e-7, about one fp32 ulp of 6.1: DP=1 sums the micro-batch gradients
  and losses in another order than DP=2's reduce-scatter, which may round a bf16 weight the other
  way now and then; 1e-4 leaves room for other CPUs' summation orders, while a wrong optimizer
  state moves it by far more: a stale Adam step count, a bug met on the way, by 7e-2);
- an iteration directory the tracker does not point at (a save cut off half-way) is ignored;
- the checkpoint directory loads with load_model (weights only).
"""

import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.checkpoint_workers import run_and_resume, train_run
from tests.dist_workers import spawn

STEPS = 7


@pytest.fixture(scope="module")
def runs(megatron_gqa, tmp_path_factory):
    from pare_nemo.checkpoint import CONFIG_FILE

    root = tmp_path_factory.mktemp("ckpt_train")
    tokens = torch.randint(0, 512, (16, 32), generator=torch.Generator().manual_seed(0))
    train_dir = root / "train"
    train_dir.mkdir()
    shutil.copy(Path(megatron_gqa) / CONFIG_FILE, train_dir)  # the training loop writes it
    spawn(run_and_resume, 2, megatron_gqa, tokens, STEPS, train_dir, root / "runs.pt",
          tmp=root)
    return {"ckpt": megatron_gqa, "tokens": tokens, "dir": train_dir, "root": root,
            **torch.load(root / "runs.pt", weights_only=False)}


def assert_same_state(got, ref):
    for part in ("model", "optimizer"):
        assert got[part].keys() == ref[part].keys()
        for k in ref[part]:
            assert torch.equal(got[part][k], ref[part][k]), f"{part} {k}"


def test_saves_tracker_keep_last(runs):
    from pare_nemo.checkpoint import latest_iteration

    # the asynchronous save of iteration 4 moved the tracker only once finalized
    assert runs["a"]["tracker_when_scheduled"] == {4: 3}
    assert latest_iteration(runs["dir"]) == 4
    assert sorted(d.name for d in runs["dir"].glob("iter_*")) == ["iter_0000003", "iter_0000004"]


def test_resume_is_exact(runs):
    a, b = runs["a"], runs["b"]
    assert b["resumed"]["state"] == {"iteration": 4, "consumed_samples": 16}
    assert_same_state(b["resumed"], a["saved"][4])
    for got, ref in zip(b["resumed"]["rng"], a["saved"][4]["rng"]):
        assert (torch.as_tensor(got) == torch.as_tensor(ref)).all()
    print("losses after the resume:", b["loss"], "uninterrupted:", a["loss"])
    assert b["loss"] == {it: a["loss"][it] for it in range(4, STEPS)}


def test_resume_at_another_dp_size(runs):
    from pare_nemo.parallel import distributed

    a = runs["a"]
    # a save of iteration 5 cut off before the tracker moved: ignored
    half = runs["dir"] / "iter_0000005"
    half.mkdir()
    (half / "__0_0.distcp").write_bytes(b"partial")
    threads = len(os.listdir("/proc/self/task"))
    with distributed():
        c = train_run(runs["ckpt"], runs["tokens"], STEPS, runs["dir"], resume=True)
    # the process groups went with the run (each gloo group holds threads: before destroy_distributed
    # collected the run's reference cycles, ~30 groups and 126 threads stayed alive here)
    assert len(os.listdir("/proc/self/task")) < threads + 30
    assert c["resumed"]["state"]["iteration"] == 4
    assert_same_state(c["resumed"], a["saved"][4])
    d = max(abs(c["loss"][it] - a["loss"][it]) for it in range(4, STEPS))
    print(f"DP=1 after DP=2: max |loss - uninterrupted DP=2 loss| = {d:.2e}")
    assert d < 1e-4


def test_load_model_reads_the_weights(runs):
    from pare_nemo.checkpoint import load_model
    from pare_nemo.parallel import distributed

    with distributed():
        model, _ = load_model(runs["dir"], dtype=torch.bfloat16)
        got = {k: v for k, v in model.state_dict().items() if v is not None}
    ref = runs["a"]["saved"][4]["model"]
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_refused_or_nothing_to_resume(runs, tmp_path):
    from pare_nemo.checkpoint import load_training_checkpoint, save_training_checkpoint

    assert load_training_checkpoint(tmp_path, None, None, None) is None  # no checkpoint yet
    with pytest.raises(ValueError, match="already holds iteration 4"):
        save_training_checkpoint(runs["dir"], 4, None, None, None, {})
    with pytest.raises(ValueError, match="model weights only"):
        load_training_checkpoint(runs["ckpt"], None, None, None)
