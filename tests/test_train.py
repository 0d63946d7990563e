"""Pare's Megatron Olmo 3 trains with megatron-core's own machinery (pare_nemo.engine: DDP,
Float16Module, the distributed optimizer, OptimizerParamScheduler, the training schedule and
finalize_model_grads) on CPU/gloo: bf16 params with fp32 main params, LM loss on real text goes
down, and TP=2 and DP=2 (optimizer state sharded over DP, overlapped gradient reduce) follow
TP=1's loss curve on the same global batches.

Tolerances. All runs start from the same bf16 weights and see the same batches; they differ only in
the order of sums: TP=2 splits the bf16 matmuls and all-reduces partial sums, DP=2 sums the fp32
gradients of its micro-batches across ranks. So:

- step 0's gradient norm (same weights): DP=2 within 1e-4 relative (fp32 sums of the same
  micro-batch gradients in another order; measured ~1e-7), TP=2 within 1% (its bf16 forward
  rounds differently, bf16 has 2**-8 relative precision; measured 0.2%). A gradient normalized per
  rank instead of by the global token count, or scaled by the TP or DP size, is off by more.
- the first 30 steps' losses within 0.01 (the weights are still within a few bf16 roundings of each
  other; measured <= 0.001).
- afterwards bf16 rounding differences in the updated weights compound (training is chaotic), so
  single steps drift apart by up to ~0.17 (measured); the curves are compared as 10-step means,
  within 0.25 (measured 0.04-0.11 across micro-batch sizes, while the loss falls by ~1.6).
"""

import math

import pytest
import torch

from tests.dist_workers import spawn
from tests.train_workers import train_worker

STEPS, GLOBAL_BATCH, S = 150, 8, 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    """A tiny random GQA Olmo 3 (hidden 64, 4 layers) as a Megatron checkpoint, and real text."""
    from conversion.convert import import_hf
    from pare_nemo.data import load_token_data
    from pare_nemo.tiny import make_tiny_olmo3

    root = tmp_path_factory.mktemp("train")
    hf = make_tiny_olmo3(root / "hf", tokenizer=tokenizer, num_kv_heads=2, num_layers=4,
                         sliding_window=16)
    ckpt = import_hf(str(hf), str(root / "mg"))
    data = load_token_data("pydoc", tokenizer, 400, S)
    mask = data.mask.clone()
    # padding: only the first 24 tokens of every 8th row count in the loss. These rows all fall in
    # DP rank 0's share, so the DP ranks count different numbers of loss tokens (204 and 252): the
    # gradient must be normalized by the global count (finalize_model_grads), not per rank.
    mask[::GLOBAL_BATCH, 24:] = False
    return ckpt, data.tokens, mask, root


def run(setup, tp, world, name, **kw):
    ckpt, tokens, mask, root = setup
    out = root / f"{name}.pt"
    if not out.exists():
        spawn(train_worker, world, tp, ckpt, tokens, mask, STEPS, GLOBAL_BATCH, str(out),
              *kw.values(), tmp=root / name)
    return torch.load(out)


def test_tp1_loss_goes_down(setup):
    r = run(setup, 1, 1, "tp1")
    loss = torch.tensor(r["loss"])
    first, last = loss[0].item(), loss[-10:].mean().item()
    print(f"TP=1: first loss {first:.3f}, mean of the last 10 {last:.3f}")
    assert r["model_dtypes"] == {torch.bfloat16} and r["main_dtypes"] == {torch.float32}
    assert r["main_numel"] == [r["model_numel"]]
    assert not any(r["skipped"])
    assert abs(first - math.log(512)) < 0.2  # random init: ~ln(vocab)
    assert last < 0.8 * first
    # warmup then cosine decay to min_lr
    assert r["lr"][0] == 0.0 and r["lr"][10] == pytest.approx(3e-3)
    assert r["lr"][-1] == pytest.approx(3e-4, rel=0.01)


def check_follows(r, ref, grad_norm_tol, name):
    """``r``'s loss curve follows ``ref``'s (see the module docstring for the tolerances)."""
    loss, ref_loss = torch.tensor(r["loss"]), torch.tensor(ref["loss"])
    d = (loss - ref_loss).abs()
    windows = (loss - ref_loss).view(-1, 10).mean(1).abs()
    g0, ref_g0 = r["grad_norm"][0], ref["grad_norm"][0]
    print(f"{name}: first loss {loss[0]:.3f}, mean of the last 10 {loss[-10:].mean():.3f}; "
          f"|loss - TP=1| max {d.max():.4f}, over the first 30 steps {d[:30].max():.4f}, "
          f"10-step means {windows.max():.4f}; step-0 grad norm {g0:.4f} vs {ref_g0:.4f}")
    assert not any(r["skipped"])
    assert abs(g0 - ref_g0) <= grad_norm_tol * ref_g0
    assert d[:30].max() < 0.01
    assert windows.max() < 0.25


def test_tp2_follows_tp1(setup):
    ref, r = run(setup, 1, 1, "tp1"), run(setup, 2, 2, "tp2")
    assert r["main_numel"] == [r["model_numel"]] * 2  # DP=1: each rank's optimizer holds its model
    check_follows(r, ref, 0.01, "TP=2")


def test_dp2_follows_tp1(setup):
    ref, r = run(setup, 1, 1, "tp1"), run(setup, 1, 2, "dp2", overlap_grad_reduce=True)
    # the distributed optimizer shards the fp32 main params (and Adam state) over DP
    assert sum(r["main_numel"]) == r["model_numel"] and max(r["main_numel"]) < r["model_numel"]
    check_follows(r, ref, 1e-4, "DP=2")


def test_finished_training_frees_its_model(setup):
    """A process that trains run after run (the demo, the search's retraining, the benchmarks)
    gets back each run's model, DDP buffers, optimizer and process groups once the run's objects
    are dropped: nothing that megatron or Pare keeps (in the model config, say) closes a cycle
    through autograd's C++ graph, where gc cannot see it. fp32 params, as on CPU: megatron's
    optimizer then keeps views of the params whose grad_fn reaches DDP's hooks."""
    import gc
    import weakref

    from pare_nemo.checkpoint import load_model
    from pare_nemo.config import Optimizer
    from pare_nemo.engine import setup_training, train_step
    from pare_nemo.parallel import distributed

    ckpt, tokens, mask, _ = setup

    def threads():
        return int(next(l for l in open("/proc/self/status") if l.startswith("Threads"))
                   .split()[1])

    def one_run():
        with distributed(1, 1):
            model, hf_config = load_model(ckpt, parallel_output=True, dtype=torch.float32,
                                          calculate_per_token_loss=True)
            chunks, optimizer, scheduler = setup_training(
                model, Optimizer(lr=1e-3, warmup_steps=0), 2)
            for _ in range(2):
                r = train_step(chunks, optimizer, scheduler, tokens[:4], mask[:4],
                               hf_config.vocab_size, micro_batch_size=2)
            assert not r.skipped
            return weakref.ref(model), weakref.ref(chunks[0]), weakref.ref(optimizer)

    refs = one_run()  # the first run starts the process's lasting threads (OpenMP, ...)
    gc.collect()
    assert [r() for r in refs] == [None] * 3
    before = threads()
    refs = one_run()
    gc.collect()
    assert [r() for r in refs] == [None] * 3
    assert threads() <= before  # the run's gloo threads are gone with its groups
