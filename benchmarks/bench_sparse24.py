"""2:4 sparsity's speed-up on a GPU: a 7B-shaped linear layer (Olmo 3 7B's FFN: 4096 -> 11008
and back, and the attention projections 4096 -> 4096), dense bf16 vs the same weight pruned 2:4
(``pare sparsify pattern=2:4``'s layout) through torch's semi-structured sparse tensors
(cuSPARSELt, else CUTLASS), as a ratio of time per call.

    python benchmarks/bench_sparse24.py                  # tokens 4096 (a GPU, Ampere or newer)
    python benchmarks/bench_sparse24.py --tokens 16384
    PARE_BENCH_SMOKE=1 python benchmarks/bench_sparse24.py   # without a GPU: checks the 2:4
                                                          # layout on CPU and says it skipped timing

Only sparse tensor cores speed 2:4 up: there is no CPU figure. Numbers: benchmarks/GPU.md once a
GPU has run it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled

SHAPES = {"fc1 (gate+up)": (2 * 11008, 4096), "fc2 (down)": (4096, 11008),
          "qkv": (3 * 4096, 4096), "proj": (4096, 4096)}


def two_four(w: torch.Tensor) -> torch.Tensor:
    """``w`` with the 2 smallest of every 4 consecutive input weights zeroed (magnitude: the
    layout matters here, not the choice)."""
    from pare_nemo.sparsify import lowest_n_of_m

    return w.masked_fill(lowest_n_of_m(w.float().abs(), 2, 4), 0)


def time_ms(fn, steps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="rows of the input (batch x seq)")
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        w = two_four(torch.randn(64, 128))
        assert ((w == 0).reshape(64, -1, 4).sum(-1) >= 2).all()
        print("bench_sparse24: no GPU; the 2:4 layout checked on CPU, timing skipped (sparse "
              "tensor cores only)")
        if not os.environ.get("PARE_BENCH_SMOKE"):
            sys.exit(1)
        return
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = False
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; x: {args.tokens} tokens, "
          "bf16")
    print(f"{'layer':<16}{'shape':>16}{'dense ms':>10}{'2:4 ms':>10}{'speed-up':>10}")
    for name, (out_f, in_f) in SHAPES.items():
        w = two_four(torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16))
        x = torch.randn(args.tokens, in_f, device="cuda", dtype=torch.bfloat16)
        sparse = to_sparse_semi_structured(w)
        dense_ms = time_ms(lambda: torch.nn.functional.linear(x, w), args.steps)
        sparse_ms = time_ms(lambda: torch.nn.functional.linear(x, sparse), args.steps)
        err = (torch.nn.functional.linear(x, sparse) - torch.nn.functional.linear(x, w)).abs()
        print(f"{name:<16}{f'{out_f}x{in_f}':>16}{dense_ms:>10.3f}{sparse_ms:>10.3f}"
              f"{dense_ms / sparse_ms:>9.2f}x   (max |diff| {err.max().item():.3g})")


if __name__ == "__main__":
    main()
