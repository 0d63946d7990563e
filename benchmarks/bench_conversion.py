"""Conversion benchmark: HF -> Megatron import of a random Olmo 3 of about 1.5 GB (bf16).

Reports import time relative to copying the same safetensors bytes (goal <= 3x) and peak RSS of the
import process relative to the checkpoint size (goal <= 1.3x), plus the same for export.

    uv run python benchmarks/bench_conversion.py [--workdir /tmp/pare_bench] [--layers 8]

PARE_BENCH_SMOKE=1: a 1-layer, hidden-256 model in a fresh temporary workdir (a few seconds).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CHILD = """
import resource, sys, time, psutil
from pare_nemo.cli import quiet; quiet()
import conversion.convert as c
import transformers, pare_nemo.olmo3.model  # imports are not conversion: measured before the clock
from transformers import Olmo3Config
base = psutil.Process().memory_info().rss
t = time.perf_counter()
getattr(c, sys.argv[1])(sys.argv[2], sys.argv[3])
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("RESULT", dt, base, peak)
"""


def make_checkpoint(path: Path, layers: int, shard_bytes: int = 2**30, hidden: int = 2048,
                    vocab: int = 50304) -> int:
    from safetensors.torch import save_file

    from pare_nemo.olmo3.bridge import hf_shapes
    from pare_nemo.tiny import make_tokenizer, tiny_config

    cfg = tiny_config(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                      num_layers=layers, num_heads=hidden // 128, dtype="bfloat16")
    path.mkdir(parents=True)
    cfg.architectures = ["Olmo3ForCausalLM"]
    cfg.save_pretrained(path)
    make_tokenizer(1024).save_pretrained(path)  # import checks that a tokenizer loads
    shards, cur, size, gen = [], {}, 0, torch.Generator().manual_seed(0)
    for name, shape in hf_shapes(cfg).items():
        t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        if cur and size + t.numel() * 2 > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += t.numel() * 2
    shards.append(cur)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / fname, metadata={"format": "pt"})
        weight_map |= {k: fname for k in shard}
        total += (path / fname).stat().st_size
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def run_child(fn: str, src: Path, dst: Path):
    p = subprocess.run([sys.executable, "-c", CHILD, fn, str(src), str(dst)],
                       capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{fn} failed:\n{p.stderr[-3000:]}")
    out = p.stdout
    line = next(l for l in out.splitlines() if l.startswith("RESULT"))
    dt, base, peak = map(float, line.split()[1:])
    return dt, base, peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/pare_bench")
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    size_kw = {}
    if os.environ.get("PARE_BENCH_SMOKE"):  # smoke run: tiny model, private workdir
        args.layers, args.workdir = 1, tempfile.mkdtemp(prefix="pare_bench_")
        size_kw = dict(hidden=256, vocab=1024)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    hf, mg, hf2, cp = work / "hf", work / "megatron", work / "hf_export", work / "copy"
    size = make_checkpoint(hf, args.layers, **size_kw)
    cp.mkdir()
    t = time.perf_counter()
    for f in hf.glob("*.safetensors"):
        shutil.copyfile(f, cp / f.name)
    copy_s = time.perf_counter() - t
    rows = []
    for fn, src, dst in (("import_hf", hf, mg), ("export_hf", mg, hf2)):
        dt, base, peak = run_child(fn, src, dst)
        rows.append((fn, dt, dt / copy_s, peak / size, (peak - base) / size))
    print(f"checkpoint: {size / 2**30:.2f} GiB in {len(list(hf.glob('*.safetensors')))} shards; "
          f"copying its bytes took {copy_s:.2f} s")
    print(f"{'step':10s} {'time s':>7s} {'x copy':>7s} {'peak RSS/ckpt':>14s} {'(minus imports)':>16s}")
    for fn, dt, ratio, rss, rss_net in rows:
        print(f"{fn:10s} {dt:7.2f} {ratio:7.2f} {rss:14.2f} {rss_net:16.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
