"""Overhead of the importance hooks: (importance pass time) / (plain forward time) over the same
data, same model, same schedule. Goal <= 1.10.

    uv run python benchmarks/bench_importance.py            # GPU if present (bf16), else CPU
    uv run python benchmarks/bench_importance.py --layers 8 --hidden 1024 --seq 1024 --samples 32
    PARE_BENCH_SMOKE=1 uv run python benchmarks/bench_importance.py   # a few-second smoke run
"""

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if os.environ.get("PARE_BENCH_SMOKE"):
        args.layers, args.hidden, args.seq, args.samples, args.repeats = 2, 128, 64, 2, 1

    from pare_nemo.cli import quiet

    quiet()
    from conversion.convert import import_hf
    from pare_nemo.checkpoint import load_model
    from pare_nemo.data import load_token_data
    from pare_nemo.engine import run_forward
    from pare_nemo.importance import ImportanceHooks
    from pare_nemo.parallel import distributed
    from pare_nemo.tiny import make_tiny_olmo3, make_tokenizer

    cuda = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp())
    try:
        tok = make_tokenizer(1024)
        make_tiny_olmo3(work / "hf", tokenizer=tok, num_layers=args.layers,
                        hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                        num_heads=args.hidden // 64, sliding_window=args.seq // 4,
                        dtype="bfloat16" if cuda else "float32")
        import_hf(str(work / "hf"), str(work / "mg"))
        data = load_token_data("pydoc", tok, args.samples, args.seq)
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        with distributed(1, 1):
            model, _ = load_model(work / "mg", parallel_output=False)
            model.eval()

            def plain():
                run_forward(model, data.tokens, data.mask, 1)

            def hooked():
                hooks = ImportanceHooks(model)
                run_forward(model, data.tokens, data.mask, 1, lambda mb: hooks.set_mask(mb.mask))
                hooks.remove()
                hooks.finish(model.config.num_attention_heads)

            plain(), hooked()  # warm-up
            times = {"plain": [], "hooked": []}
            for _ in range(args.repeats):
                for name, fn in (("plain", plain), ("hooked", hooked)):
                    sync()
                    t = time.perf_counter()
                    fn()
                    sync()
                    times[name].append(time.perf_counter() - t)
        p, h = min(times["plain"]), min(times["hooked"])
        dev = torch.cuda.get_device_name() if cuda else "CPU"
        print(f"{dev}: {args.layers} layers, hidden {args.hidden}, {args.samples} x {args.seq} tokens")
        print(f"plain forward {p:.3f} s, importance pass {h:.3f} s, ratio {h / p:.3f} (goal <= 1.10)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
