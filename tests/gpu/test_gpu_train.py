"""A short training run on the GPU with pare_nemo.engine (Float16Module, megatron DDP, distributed
optimizer, cosine schedule, vocab-parallel loss; NCCL): a small GQA Olmo 3 (hidden 256, 4 layers,
sliding window 64 < S = 256, so the sliding layers train through compiled FlexAttention, forward
and backward) learns real text (pydoc_data.topics). As tests/test_train.py checks on CPU: bf16
params with fp32 main params, no skipped step, a first loss ~ln(vocab) and the mean of the last 10
losses below 0.8x the first."""

import math

import torch

from tests.gpu import require_cuda

require_cuda()

STEPS, GLOBAL_BATCH, MICRO_BATCH, S = 60, 8, 4, 256


def test_short_training_run(tmp_path, tokenizer):
    from conversion.convert import import_hf
    from pare_nemo.checkpoint import load_model
    from pare_nemo.config import Optimizer
    from pare_nemo.data import load_token_data
    from pare_nemo.engine import setup_training, train_step
    from pare_nemo.parallel import distributed
    from pare_nemo.tiny import make_tiny_olmo3

    hf = make_tiny_olmo3(tmp_path / "hf", tokenizer=tokenizer, hidden_size=256,
                         intermediate_size=1024, num_layers=4, num_heads=8, num_kv_heads=4,
                         sliding_window=64)
    ckpt = import_hf(str(hf), str(tmp_path / "mg"))
    data = load_token_data("pydoc", tokenizer, 128, S)
    with distributed(1, 1):
        model, hf_config = load_model(ckpt, parallel_output=True, dtype=torch.bfloat16,
                                      calculate_per_token_loss=True)
        assert {p.device.type for p in model.parameters()} == {"cuda"}
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        chunks, optimizer, scheduler = setup_training(
            model, Optimizer(lr=3e-3, warmup_steps=5, min_lr=3e-4), STEPS)
        assert {p.dtype for g in optimizer.param_groups for p in g["params"]} == {torch.float32}
        torch.cuda.reset_peak_memory_stats()
        results = []
        for i in range(STEPS):
            rows = (torch.arange(GLOBAL_BATCH) + i * GLOBAL_BATCH) % data.tokens.shape[0]
            results.append(train_step(chunks, optimizer, scheduler, data.tokens[rows],
                                      data.mask[rows], hf_config.vocab_size,
                                      micro_batch_size=MICRO_BATCH))
    loss = [r.loss for r in results]
    first, last = loss[0], sum(loss[-10:]) / 10
    print(f"\nGPU training: first loss {first:.3f}, mean of the last 10 {last:.3f}, "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    assert not any(r.skipped for r in results)
    assert all(math.isfinite(r.grad_norm) for r in results)
    assert abs(first - math.log(len(tokenizer))) < 0.3
    assert last < 0.8 * first
