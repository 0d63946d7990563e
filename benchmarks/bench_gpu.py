"""Pare vs transformers + SDPA on one GPU: forward and training-step tokens/s and peak memory, on
the same random Olmo-3-shaped model and the same batch.

    python benchmarks/bench_gpu.py                        # 1.23B model, batch 2 x 4096 (a GPU)
    python benchmarks/bench_gpu.py --seq 8192             # sliding layers then run FlexAttention
    python benchmarks/bench_gpu.py --layers 4 --hidden 1024 --ffn 2816 --vocab 32000   # smaller
    PARE_BENCH_SMOKE=1 python benchmarks/bench_gpu.py     # tiny shapes, 1 step: runs on CPU

Default model (issue 8): 16 layers, hidden 2048, FFN 5632, 16 heads (MHA, as Olmo 3 7B), head_dim
128, vocabulary 100278 (Olmo 3's), 3 sliding : 1 full layers with window 4096, YaRN on full layers:
1.23B parameters. At S = 4096 the window covers the whole row, so every layer is plain causal
attention (flash); ``--seq 8192`` exercises the sliding-window path.

What runs:

- forward (no grad, eval): Pare's GPTModel with bf16 params, logits over the padded vocabulary;
  transformers' Olmo3ForCausalLM in bf16 (``attn_implementation="sdpa"``).
- train step: Pare through ``pare_nemo.engine`` (``setup_training`` / ``train_step``): Float16Module
  (bf16 params), megatron DistributedDataParallel (fp32 gradient buffer) and distributed optimizer
  (fp32 main params and Adam state; TP=1, DP=1), gradient clipping 1.0, the vocab-parallel CE.
  transformers: ``--hf-precision autocast`` (default) keeps fp32 params, gradients and AdamW state
  and runs forward/backward under ``torch.autocast(bfloat16)``, the usual mixed precision, the same
  class of numerics as Pare's (bf16 compute, fp32 master weights); ``bf16`` trains bf16 params
  directly (less memory, fewer copies, lower precision). AdamW is torch's fused one, clipping 1.0,
  loss: cross-entropy on fp32 logits.
- peak memory: ``torch.cuda.max_memory_allocated`` over each phase, run alone on the GPU (the other
  framework's model is not on the GPU then): weights, gradients, optimizer state and activations.

Reference (issue 8, one H100): transformers + SDPA train step 33.8k tok/s, forward 110k tok/s;
goal: Pare >= 1.0x.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA)")
    ap.add_argument("--vocab", type=int, default=100278)
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=None, help="Pare's micro-batch (default: --batch)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    ap.add_argument("--hf-precision", choices=["autocast", "bf16"], default="autocast")
    args = ap.parse_args()
    if os.environ.get("PARE_BENCH_SMOKE"):
        args.layers, args.hidden, args.ffn, args.heads, args.vocab = 4, 128, 256, 4, 1024
        args.window, args.batch, args.seq, args.steps, args.warmup = 64, 2, 128, 1, 1
    args.kv_heads = args.kv_heads or args.heads
    args.micro_batch = args.micro_batch or args.batch
    if args.batch % args.micro_batch:
        ap.error(f"--batch {args.batch} is not divisible by --micro-batch {args.micro_batch}")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        ap.error("--hidden must be divisible by --heads, and --heads by --kv-heads")
    return args


def olmo3_config(args):
    from pare_nemo.tiny import tiny_config

    cfg = tiny_config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                      num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                      sliding_window=args.window, dtype="bfloat16")
    cfg.max_position_embeddings = max(65536, args.seq)
    cfg.rope_parameters["full_attention"]["original_max_position_embeddings"] = 8192
    return cfg


class Phase:
    """Times ``steps`` calls of a step function after ``warmup`` calls and records the peak memory
    of the phase (CUDA only)."""

    def __init__(self, dev):
        self.cuda = dev.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def start(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def time(self, fn, warmup, steps):
        out = None
        for _ in range(warmup):
            out = fn()
        self.sync()
        t = time.perf_counter()
        for _ in range(steps):
            out = fn()
        self.sync()
        return (time.perf_counter() - t) / steps, out

    def peak_gib(self):
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else float("nan")


def main():
    args = parse_args()
    from pare_nemo.cli import quiet

    quiet()
    from transformers import Olmo3ForCausalLM

    from pare_nemo.config import Optimizer
    from pare_nemo.engine import setup_training, train_step
    from pare_nemo.olmo3 import bridge
    from pare_nemo.olmo3.model import build_olmo3_model
    from pare_nemo.parallel import device, distributed

    cfg = olmo3_config(args)
    v, b, s = cfg.vocab_size, args.batch, args.seq
    n_tokens = b * s
    with distributed(1, 1):
        dev = device()
        phase = Phase(dev)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, v, (b, s), generator=g).to(dev)
        positions = torch.arange(s, device=dev).expand(b, s)
        mask = torch.ones_like(tokens, dtype=torch.bool)

        torch.manual_seed(0)  # random weights, kept on the CPU between phases
        with torch.device(dev):
            hf = Olmo3ForCausalLM._from_config(cfg, attn_implementation="sdpa",
                                               dtype=torch.float32)
        n_params = sum(p.numel() for p in hf.parameters())
        weights = {k: t.cpu() for k, t in hf.state_dict().items()}
        del hf

        def hf_model(dtype):
            with torch.device(dev):
                m = Olmo3ForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
            m.load_state_dict(weights)
            return m

        def pare_model():
            mcfg = bridge.megatron_config(cfg, dtype=torch.bfloat16, perform_initialization=False,
                                          calculate_per_token_loss=True)
            m = build_olmo3_model(mcfg, bridge.padded_vocab_size(v), parallel_output=True).to(dev)
            msd = m.state_dict()
            for mname, hnames, kind in bridge.expand(cfg.num_hidden_layers):
                msd[mname].copy_(bridge.to_megatron(kind, [weights[h] for h in hnames], cfg))
            return m

        def loss_of(logits):
            return F.cross_entropy(logits[:, :-1, :v].flatten(0, 1).float(),
                                   tokens[:, 1:].flatten()).item()

        res = {}
        # --- forward
        phase.start()
        hf16 = hf_model(torch.bfloat16).eval()
        with torch.no_grad():
            t, logits = phase.time(lambda: hf16(tokens).logits, args.warmup, args.steps)
            res["fwd", "hf"] = t, phase.peak_gib(), loss_of(logits)
        del hf16, logits

        phase.start()
        mg = pare_model().eval()
        with torch.no_grad():
            t, logits = phase.time(
                lambda: mg(input_ids=tokens, position_ids=positions, attention_mask=None),
                args.warmup, args.steps)
            res["fwd", "pare"] = t, phase.peak_gib(), loss_of(logits)
        del logits

        # --- train step
        phase.start()
        # min_lr = lr: a constant LR, as the transformers side runs (the first H200 run decayed
        # Pare's LR to 0 over the 14 steps, and its last loss 10.17 vs 8.43 compared two schedules)
        chunks, optimizer, scheduler = setup_training(
            mg, Optimizer(lr=1e-5, min_lr=1e-5, warmup_steps=0), args.warmup + args.steps + 1)
        t, r = phase.time(lambda: train_step(chunks, optimizer, scheduler, tokens, mask, v,
                                             micro_batch_size=args.micro_batch),
                          args.warmup, args.steps)
        res["train", "pare"] = t, phase.peak_gib(), r.loss
        del mg, chunks, optimizer, scheduler, r

        phase.start()
        autocast = args.hf_precision == "autocast"
        hf = hf_model(torch.float32 if autocast else torch.bfloat16).train()
        opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0,
                                fused=True)

        def hf_step():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                logits = hf(tokens).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        t, loss = phase.time(hf_step, args.warmup, args.steps)
        res["train", "hf"] = t, phase.peak_gib(), loss.item()

    name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    size = f"{n_params / 1e9:.2f}B" if n_params >= 1e8 else f"{n_params / 1e6:.2f}M"
    print(f"Pare vs transformers+SDPA on {name} (torch {torch.__version__}): {size} params "
          f"({args.layers} layers, hidden {args.hidden}, FFN {args.ffn}, {args.heads} heads / "
          f"{args.kv_heads} KV, vocab {v}), batch {b} x {s}, window {args.window}")
    print(f"Pare: bf16 params, megatron DDP + distributed optimizer (fp32 main params), TP=1, "
          f"micro-batch {args.micro_batch}; transformers: "
          + ("bf16 autocast over fp32 params" if autocast else "bf16 params")
          + f", fused AdamW; {args.steps} timed steps after {args.warmup}")
    print(f"{'':11s} {'Pare tok/s':>11s} {'transformers tok/s':>19s} {'ratio':>6s} "
          f"{'Pare GiB':>9s} {'transf. GiB':>11s} {'Pare loss':>10s} {'transf. loss':>12s}")
    for what, label in (("fwd", "forward"), ("train", "train step")):
        (tp, mp, lp), (th, mh, lh) = res[what, "pare"], res[what, "hf"]
        print(f"{label:11s} {n_tokens / tp:11.0f} {n_tokens / th:19.0f} {th / tp:6.2f} "
              f"{mp:9.1f} {mh:11.1f} {lp:10.4f} {lh:12.4f}")
    print("ratio = Pare tok/s / transformers tok/s (goal >= 1.0); losses: forward on the "
          "batch, train: the last timed step (after the same number of updates)")
    print("reference (issue 8, one H100): transformers+SDPA train step 33.8k tok/s, "
          "forward 110k tok/s")


if __name__ == "__main__":
    main()
