"""Shared by the benchmarks: the median wall time of a function after one warm-up call."""

from __future__ import annotations

import statistics
import time

import torch


def median_seconds(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after a warm-up call (CUDA synchronized)."""
    cuda = torch.cuda.is_available()
    fn()
    out = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out)
