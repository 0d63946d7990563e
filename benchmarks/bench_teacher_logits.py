"""What storing the teacher's top k costs (``pare teacher-logits``): the stage's work on a shard of
rows (teacher forward, vocab-parallel top k + log-softmax + rest mass, copy to the host, one
safetensors file) against the teacher's plain forward on the same rows, and the bytes per token.

    uv run python benchmarks/bench_teacher_logits.py          # CPU: a small teacher
    PARE_BENCH_SMOKE=1 uv run python benchmarks/bench_teacher_logits.py

Both through megatron-core's forward-only schedule at TP=1, the same micro-batches, the median of
several repeats after warm-up. Prints the ratio (stored / plain forward) for each k.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from timing import median_seconds

SMOKE = bool(os.environ.get("PARE_BENCH_SMOKE"))


def main():
    from safetensors.torch import save_file

    from pare_nemo.engine import run_forward
    from pare_nemo.losses import teacher_top_k
    from pare_nemo.olmo3.bridge import megatron_config, padded_vocab_size
    from pare_nemo.olmo3.model import build_olmo3_model
    from pare_nemo.parallel import device, distributed
    from pare_nemo.teacher_logits import bytes_per_token
    from pare_nemo.tiny import tiny_config

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    if SMOKE:
        shape, vocab, seq, rows, mbs, repeats, ks = (64, 128, 2, 4), 512, 64, 4, 2, 2, (8,)
    elif cuda:
        shape, vocab, seq, rows, mbs, repeats, ks = (2048, 5632, 16, 16), 100278, 4096, 8, 1, 5, \
            (8, 32, 64)
    else:
        shape, vocab, seq, rows, mbs, repeats, ks = (512, 1536, 4, 8), 32000, 256, 16, 4, 5, \
            (8, 32, 64)
    h, f, layers, heads = shape
    hf = tiny_config(vocab_size=vocab, hidden_size=h, intermediate_size=f, num_layers=layers,
                     num_heads=heads, num_kv_heads=heads, sliding_window=seq // 2)
    hf.max_position_embeddings = max(seq, 4096)
    out_dir = Path(tempfile.mkdtemp())
    with distributed(1, 1):
        torch.manual_seed(0)
        model = build_olmo3_model(megatron_config(hf, dtype=dtype), padded_vocab_size(vocab),
                                  parallel_output=True).to(device()).eval()
        tokens = torch.randint(0, vocab, (rows, seq))

        def plain():
            run_forward(model, tokens, None, mbs,
                        lambda mb: (lambda logits: (logits.new_zeros(()), {})))

        def stored(k):
            def step(mb):
                def loss_func(logits):
                    ids, lps, rest = teacher_top_k(logits, vocab, k)
                    return logits.new_zeros(()), {"ids": ids.int().cpu(), "rest": rest.cpu(),
                                                  "logprobs": lps.half().cpu()}
                return loss_func

            outs = run_forward(model, tokens, None, mbs, step)
            save_file({"tokens": tokens.int(), **{n: torch.cat([o[n] for o in outs])
                                                  for n in ("ids", "logprobs", "rest")}},
                      str(out_dir / f"shard-{k}.safetensors"))

        def timed(fn):
            return median_seconds(fn, repeats)

        t_plain = timed(plain)
        print(f"teacher {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, vocab "
              f"{vocab}, {rows} x {seq} tokens, {dtype}, {'GPU' if cuda else 'CPU'}")
        print(f"plain forward            {t_plain * 1e3:8.1f} ms "
              f"({rows * seq / t_plain:,.0f} tokens/s)")
        for k in ks:
            t = timed(lambda: stored(k))
            size = (out_dir / f"shard-{k}.safetensors").stat().st_size
            print(f"forward + top {k:<3d} stored {t * 1e3:8.1f} ms  ratio {t / t_plain:.3f}  "
                  f"{bytes_per_token(k, 'float16')} bytes/token (file: "
                  f"{size / (rows * seq):.1f})")


if __name__ == "__main__":
    main()
