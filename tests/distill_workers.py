"""Distillation runs in gloo processes (TP=2, PP=2, DP=2) for tests/test_distill.py. Functions live
in a module so that ``torch.multiprocessing.spawn`` can import them in the child processes."""

from __future__ import annotations


def distill_worker(kwargs: dict):
    from pare_nemo.distill import distill

    distill(**kwargs)
