"""How far ``pare search``'s roofline (``latency=model``) is from measured decode time
(``latency=measured``): shapes of Olmo 3 7B and its 4.5B family (the recipes' width, depth and
combined students), each priced by the roofline of this machine's figures and timed (transformers'
Olmo 3 with its KV cache, random weights, medians after warm-up), as measured / model ratios per
shape, and whether both order the shapes alike.

    python benchmarks/bench_latency.py                      # a GPU: bf16, batch 1, context 8192
    python benchmarks/bench_latency.py --batch 8 --context 4096
    PARE_BENCH_SMOKE=1 python benchmarks/bench_latency.py   # CPU: tiny shapes, fp32, context 64

A ratio above 1 is time the roofline does not see (kernel launches, attention kernels below peak);
the search ranks candidates, so the order matters more than the ratio. Numbers: benchmarks/GPU.md
once a GPU has run it.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled

# (name, FFN, heads, hidden, layers kept): recipes/olmo3.py's students of Olmo 3 7B
SHAPES_7B = [("olmo3-7b", 11008, 32, 4096, 32), ("width 4.5B", 9216, 24, 3072, 32),
             ("depth 4.5B", 11008, 32, 4096, 18), ("combined 4.5B", 9216, 32, 3584, 24)]
SHAPES_SMOKE = [("h64 x2", 256, 4, 64, 2), ("h256 x4", 1024, 4, 256, 4),
                ("h512 x8", 2048, 4, 512, 8)]


def shape(base, ffn: int, heads: int, hidden: int, layers: int, head_dim: int):
    """``base`` cut to a shape (the layers kept: every full-attention layer, then the first
    sliding ones, as protect_full_attention keeps them)."""
    c = copy.deepcopy(base)
    c.intermediate_size, c.num_attention_heads, c.hidden_size = ffn, heads, hidden
    c.head_dim = head_dim
    c.num_key_value_heads = heads if base.num_key_value_heads == base.num_attention_heads \
        else base.num_key_value_heads
    full = [i for i, t in enumerate(base.layer_types) if t == "full_attention"]
    rest = [i for i in range(base.num_hidden_layers) if i not in full]
    keep = sorted(full[:layers] + rest[:max(0, layers - len(full))])
    c.layer_types = [base.layer_types[i] for i in keep]
    c.num_hidden_layers = layers
    return c


def main() -> None:
    from pare_nemo.search import hardware_figures, measure, roofline, shape_cost
    from pare_nemo.tiny import tiny_config

    smoke = os.environ.get("PARE_BENCH_SMOKE") == "1" or not torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=64 if smoke else 8192)
    ap.add_argument("--hardware", default=None, help="h100 | h200 | a100 | cpu (default: this "
                                                     "machine's)")
    args = ap.parse_args()
    dtype = torch.float32 if smoke else torch.bfloat16
    if smoke:
        base = tiny_config(vocab_size=1024, hidden_size=512, intermediate_size=2048,
                           num_layers=8, num_heads=4, num_kv_heads=4, sliding_window=16)
        shapes = SHAPES_SMOKE
    else:
        base = tiny_config(vocab_size=100278, hidden_size=4096, intermediate_size=11008,
                           num_layers=32, num_heads=32, head_dim=128, sliding_window=4096)
        shapes = SHAPES_7B
    name, flops, bw = hardware_figures(args.hardware)
    nbytes = torch.empty((), dtype=dtype).element_size()
    print(f"roofline on {name}: {flops / 1e12:.3g} TFLOP/s, {bw / 1e9:.4g} GB/s; batch "
          f"{args.batch}, context {args.context}, {str(dtype).removeprefix('torch.')}")
    print(f"{'shape':>14} {'model ms':>9} {'measured ms':>12} {'ratio':>6}   (decode step)"
          f"   {'model ms':>9} {'measured ms':>12} {'ratio':>6}   (prefill)")
    rows = []
    for label, *dims in shapes:
        c = shape(base, *dims, head_dim=dims[2] // dims[1] if smoke else 128)
        model = roofline(shape_cost(c, args.batch, args.context, nbytes), flops, bw)
        timed = measure(c, args.batch, args.context, dtype)
        rows.append((model, timed))
        print(f"{label:>14} {model[0] * 1e3:9.3f} {timed[0] * 1e3:12.3f} "
              f"{timed[0] / model[0]:6.2f}   {'':13} {model[1] * 1e3:9.3f} "
              f"{timed[1] * 1e3:12.3f} {timed[1] / model[1]:6.2f}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for i, what in enumerate(("decode", "prefill")):
        by_model = sorted(range(len(rows)), key=lambda j: rows[j][0][i])
        by_time = sorted(range(len(rows)), key=lambda j: rows[j][1][i])
        print(f"{what}: the roofline orders the shapes "
              f"{'as' if by_model == by_time else 'NOT as'} measuring does")


if __name__ == "__main__":
    main()
