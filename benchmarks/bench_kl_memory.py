"""Peak memory and time of one forward + backward of a per-token KL loss on Olmo-3-sized logits:
pare_nemo.losses.kl_divergence (chunked fp32, gradient stored in the logits' dtype) against the
plain full-vocabulary fp32 PyTorch KL (log_softmax of both, kl_div).

    uv run python benchmarks/bench_kl_memory.py                    # 8192 tokens on GPU, 2048 on CPU
    uv run python benchmarks/bench_kl_memory.py --tokens 1024 --kind jsd --top-k 64
    PARE_BENCH_SMOKE=1 uv run python benchmarks/bench_kl_memory.py   # smoke sizes (64 x 1024)

Time: the fastest of --steps steps (wall and process CPU time). Peak memory is the extra above
the inputs (bf16 student and teacher logits [tokens, 100352]), including the student's gradient;
each variant runs in a fresh process. GPU: torch.cuda's peak allocated bytes. CPU: the process's
peak RSS (VmHWM, reset through /proc/self/clear_refs): tensors this large are mmapped by malloc and
returned on free, so RSS follows the live tensors.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

GiB = 2**30


def naive_kl(student, teacher, vocab_size, kind, beta, temperature):
    lq = torch.log_softmax(student[..., :vocab_size].float() / temperature, -1)
    lp = torch.log_softmax(teacher[..., :vocab_size].float() / temperature, -1)

    def kl(la, lb):  # KL(a || b)
        return torch.nn.functional.kl_div(lb, la, log_target=True, reduction="none").sum(-1)

    if kind == "forward":
        return kl(lp, lq)
    if kind == "reverse":
        return kl(lq, lp)
    lm = torch.logsumexp(torch.stack([lp + math.log(beta), lq + math.log(1 - beta)]), 0)
    return beta * kl(lp, lm) + (1 - beta) * kl(lq, lm)


def rss():
    status = Path("/proc/self/status").read_text().split("\n")
    return {line.split(":")[0]: int(line.split()[1]) * 1024
            for line in status if line.startswith("Vm")}


def child(args):
    """Run one variant; print {peak_gib, seconds} as JSON."""
    from pare_nemo.losses import kl_divergence

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    g = torch.Generator(device=dev).manual_seed(0)
    shape = (args.tokens, args.padded)
    student = (3 * torch.randn(shape, generator=g, device=dev)).bfloat16().requires_grad_()
    teacher = (student.detach().float() + torch.randn(shape, generator=g, device=dev)).bfloat16()
    if args.variant == "naive":
        if args.top_k is not None:
            raise SystemExit("the naive variant has no top-k")

        def loss_fn():
            return naive_kl(student, teacher, args.vocab, args.kind, args.beta, args.temperature)
    else:
        def loss_fn():
            return kl_divergence(student, teacher, args.vocab, kind=args.kind, beta=args.beta,
                                 temperature=args.temperature, top_k=args.top_k, chunk=args.chunk)

    def step():
        student.grad = None
        loss_fn().sum().backward()

    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")
        base = rss()["VmRSS"]
    step()
    sync()
    peak = (torch.cuda.max_memory_allocated() if cuda else rss()["VmHWM"]) - base
    times = []  # the fastest of `steps` (robust to other processes on a shared machine)
    for _ in range(args.steps):
        t, c = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append((time.perf_counter() - t, time.process_time() - c))
    print(json.dumps({"peak_gib": peak / GiB, "seconds": min(t for t, _ in times),
                      "cpu_seconds": min(c for _, c in times),
                      "device": torch.cuda.get_device_name() if cuda else "cpu"}))


def main():
    smoke = bool(os.environ.get("PARE_BENCH_SMOKE"))  # smoke-run sizes for tests/test_readme.py
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64 if smoke else None,
                    help="default: 8192 on GPU, 2048 on CPU")
    ap.add_argument("--vocab", type=int, default=1000 if smoke else 100278)
    ap.add_argument("--padded", type=int, default=1024 if smoke else 100352)
    ap.add_argument("--kind", default="forward", choices=["forward", "reverse", "jsd"])
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--chunk", type=int, default=None, help="tokens per chunk (default: auto)")
    ap.add_argument("--steps", type=int, default=1 if smoke else 3)
    ap.add_argument("--variant", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tokens is None:
        args.tokens = 8192 if torch.cuda.is_available() else 2048
    if args.variant:
        return child(args)
    logits = args.tokens * args.padded * 2 / GiB
    print(f"{args.tokens} tokens x vocab {args.vocab} (padded {args.padded}), kind={args.kind}, "
          f"T={args.temperature}, top_k={args.top_k}; bf16 logits {logits:.2f} GiB each")
    res = {}
    for variant in ("naive", "chunked"):
        if variant == "naive" and args.top_k is not None:
            continue
        cmd = [sys.executable, __file__, "--variant", variant] + [
            a for a in sys.argv[1:] if a != "--variant"]
        out = subprocess.run(cmd + ["--tokens", str(args.tokens)], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr)
        res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        r = res[variant]
        print(f"{variant:8s} peak {r['peak_gib']:.2f} GiB  {r['seconds']:.3f} s/step  "
              f"(process CPU time {r['cpu_seconds']:.3f} s; {r['device']})")
    if len(res) == 2:
        n, c = res["naive"], res["chunked"]
        print(f"chunked / naive: peak memory {c['peak_gib'] / n['peak_gib']:.3f}, time "
              f"{c['seconds'] / n['seconds']:.2f} (process CPU time "
              f"{c['cpu_seconds'] / n['cpu_seconds']:.2f})")


if __name__ == "__main__":
    main()
