"""Start-up time of the command lines: ``pare --help``, ``pare prune --help``, an argument error and
``nemo llm --help``, each a fresh process from this environment's bin directory (median of 5).
``pare`` answers these from the stages' source without importing torch; goal < 2 s.

    uv run python benchmarks/bench_cli.py
    PARE_BENCH_SMOKE=1 uv run python benchmarks/bench_cli.py   # 1 repeat
"""

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
CASES = [  # (what, argv, expected exit status)
    ("pare --help", ["pare", "--help"], 0),
    ("pare prune --help", ["pare", "prune", "--help"], 0),
    ("pare prune … bogus=1 (argument error)",
     ["pare", "prune", "megatron_path=x", "scores_path=y", "save_path=z", "bogus=1"], 1),
    ("nemo llm --help", ["nemo", "llm", "--help"], 0),
]


def timed(argv: list[str], expected: int) -> float:
    t = time.perf_counter()
    p = subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    dt = time.perf_counter() - t
    if p.returncode != expected:
        raise SystemExit(f"{' '.join(argv)}: exit status {p.returncode}, expected {expected}\n"
                         f"{p.stdout[-2000:]}{p.stderr[-2000:]}")
    return dt


def main():
    repeats = 1 if os.environ.get("PARE_BENCH_SMOKE") else 5
    print(f"{'command':40s} {'median s':>9s}  (of {repeats})")
    pare_times = []
    for what, argv, expected in CASES:
        t = statistics.median(timed(argv, expected) for _ in range(repeats))
        if argv[0] == "pare":
            pare_times.append(t)
        print(f"{what:40s} {t:9.3f}")
    print(f"pare commands under 2 s: {'yes' if max(pare_times) < 2 else 'NO'} "
          f"(slowest {max(pare_times):.3f} s)")


if __name__ == "__main__":
    main()
