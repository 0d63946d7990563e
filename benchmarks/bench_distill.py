"""Distillation step time vs its parts: teacher forward + student forward-backward, each timed alone
on the same batch. Goal: ratio <= 1.10 (the distillation step adds only the KL loss).

    uv run python benchmarks/bench_distill.py          # CPU: a small teacher -> student pair
    PARE_BENCH_SMOKE=1 uv run python benchmarks/bench_distill.py

All three use megatron-core's schedule at TP=1 with Pare's DDP + distributed optimizer, the same
micro-batches, and the median of several steps after warm-up. The student step without a teacher
is an LM (cross-entropy) step, which costs about what the KL costs on the same logits.
"""

from __future__ import annotations

import os

import torch
from timing import median_seconds

SMOKE = bool(os.environ.get("PARE_BENCH_SMOKE"))


def build(hf_config, dtype):
    from pare_nemo.olmo3.bridge import megatron_config, padded_vocab_size
    from pare_nemo.olmo3.model import build_olmo3_model
    from pare_nemo.parallel import device

    cfg = megatron_config(hf_config, dtype=dtype, calculate_per_token_loss=True)
    return build_olmo3_model(cfg, padded_vocab_size(hf_config.vocab_size)).to(device())


def main():
    from pare_nemo.config import KD, Optimizer
    from pare_nemo.distill import Distiller, Pairing
    from pare_nemo.engine import micro_batches, run_step, schedule, setup_training
    from pare_nemo.losses import next_token_nll
    from pare_nemo.parallel import device, distributed
    from pare_nemo.tiny import tiny_config

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    if SMOKE:
        t_shape, s_shape, vocab, seq, batch, mbs, steps = (64, 128, 2, 4), (48, 96, 2, 4), 512, \
            64, 4, 2, 3
    elif cuda:
        t_shape, s_shape, vocab, seq, batch, mbs, steps = (2048, 5632, 16, 16), \
            (1536, 4096, 16, 12), 100278, 4096, 2, 1, 10
    else:
        t_shape, s_shape, vocab, seq, batch, mbs, steps = (512, 1536, 4, 8), (384, 1024, 4, 8), \
            32000, 256, 8, 4, 5

    def hf(shape):
        h, f, layers, heads = shape
        c = tiny_config(vocab_size=vocab, hidden_size=h, intermediate_size=f, num_layers=layers,
                        num_heads=heads, num_kv_heads=heads, sliding_window=seq // 2)
        c.max_position_embeddings = max(seq, 4096)
        return c

    with distributed(1, 1):
        torch.manual_seed(0)
        tc, sc = hf(t_shape), hf(s_shape)
        teacher = build(tc, dtype).eval().requires_grad_(False)
        student = build(sc, dtype)
        chunks, opt, sched = setup_training(student, Optimizer(lr=1e-4, min_lr=0.0,
                                                               warmup_steps=0), 1000)
        tokens = torch.randint(0, vocab, (batch, seq), device=device())
        mbatches = micro_batches(tokens, micro_batch_size=mbs)
        distiller = Distiller(chunks[0], teacher, sc, tc, Pairing([], [], None), vocab, KD())

        def teacher_forward():
            def fwd(it, model):
                return next(it).run(model), (lambda out: (out.new_zeros(()), {}))
            with torch.no_grad():
                schedule([teacher], fwd, mbatches, forward_only=True)

        def student_step():
            def fwd(it, model):
                mb = next(it)
                return mb.run(model), \
                    lambda logits: (*next_token_nll(logits, mb.tokens, mb.mask, vocab), {})
            run_step(chunks, opt, sched, mbatches, fwd)

        def distill_step():
            run_step(chunks, opt, sched, mbatches, distiller.forward_step)

        def timed(fn):
            return median_seconds(fn, steps)

        t_teacher, t_student, t_distill = timed(teacher_forward), timed(student_step), \
            timed(distill_step)
    n = lambda c: sum(p.numel() for p in c.parameters()) / 1e6  # noqa: E731
    print(f"teacher {n(teacher):.1f}M -> student {n(student):.1f}M params, batch {batch} x {seq}, "
          f"{dtype}, {'GPU' if cuda else 'CPU'}")
    print(f"teacher forward      {t_teacher * 1e3:8.1f} ms")
    print(f"student fwd+bwd+step {t_student * 1e3:8.1f} ms")
    print(f"distillation step    {t_distill * 1e3:8.1f} ms")
    print(f"ratio distill / (teacher + student) = {t_distill / (t_teacher + t_student):.3f} "
          "(goal <= 1.10)")


if __name__ == "__main__":
    main()
