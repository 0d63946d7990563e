"""``pare eval`` in gloo processes (TP=2, PP=2, DP=2) for tests/test_eval.py. Functions live in a
module so that ``torch.multiprocessing.spawn`` can import them in the child processes."""

from __future__ import annotations


def eval_worker(runs: list[dict]):
    """Each run's ``evaluate(**kwargs)`` in turn, in one process group (each sets its TP/PP)."""
    from pare_nemo.eval import evaluate
    from pare_nemo.parallel import init_distributed

    init_distributed()
    for kwargs in runs:
        evaluate(**{"report": False, **kwargs})
