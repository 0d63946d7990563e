"""Megatron Olmo 3 vs transformers Olmo3ForCausalLM (SDPA) on the same config and input:
bf16 logits parity, forward tokens/s and training-step tokens/s (forward + backward + AdamW).

    uv run python benchmarks/bench_model.py              # ~1.2B Olmo-3-shaped, needs a GPU
    uv run python benchmarks/bench_model.py --tiny       # smoke run on CPU
    PARE_BENCH_SMOKE=1 uv run python benchmarks/bench_model.py   # = --tiny --steps 1

Default config (from the foundation issue): 16 layers, hidden 2048, vocab 100k, batch 2 x 4096.
"""

import argparse
import os
import time

import torch


def timed(fn, steps, sync):
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - t) / steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    if os.environ.get("PARE_BENCH_SMOKE"):
        args.tiny, args.steps = True, 1

    from pare_nemo.cli import quiet

    quiet()
    from transformers import Olmo3ForCausalLM

    from pare_nemo.olmo3 import bridge
    from pare_nemo.olmo3.model import build_olmo3_model
    from pare_nemo.parallel import device, distributed
    from pare_nemo.tiny import tiny_config

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.tiny:
        cfg = tiny_config(vocab_size=1024, hidden_size=128, intermediate_size=384, num_layers=4,
                          num_heads=8, sliding_window=64, dtype=str(dtype).split(".")[1])
        batch, seq = 2, 256
    else:
        cfg = tiny_config(vocab_size=100278, hidden_size=2048, intermediate_size=8192,
                          num_layers=16, num_heads=16, sliding_window=4096,
                          dtype=str(dtype).split(".")[1])
        cfg.max_position_embeddings = 65536
        batch, seq = 2, 4096
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dev = device() if cuda else torch.device("cpu")
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), device=dev)
    positions = torch.arange(seq, device=dev).expand(batch, seq)

    hf = Olmo3ForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=dtype).to(dev)
    with distributed(1, 1):
        mcfg = bridge.megatron_config(cfg, dtype=dtype, perform_initialization=False)
        mg = build_olmo3_model(mcfg, bridge.padded_vocab_size(cfg.vocab_size),
                               parallel_output=True).to(dev)  # TP=1: full logits
        hsd, msd = hf.state_dict(), mg.state_dict()
        for mname, hnames, kind in bridge.expand(cfg.num_hidden_layers):
            msd[mname].copy_(bridge.to_megatron(kind, [hsd[h] for h in hnames], cfg))

        def mg_fwd():
            return mg(input_ids=tokens, position_ids=positions, attention_mask=None)

        def hf_fwd():
            return hf(tokens).logits

        with torch.no_grad():
            hf.eval(), mg.eval()
            diff = (mg_fwd()[..., : cfg.vocab_size].float() - hf_fwd().float()).abs()
            print(f"{dtype} parity: max |diff| {diff.max():.3e}, mean {diff.mean():.3e}")
            fwd = {"megatron": timed(mg_fwd, args.steps, sync), "transformers": timed(hf_fwd, args.steps, sync)}

        hf.train(), mg.train()
        labels = torch.roll(tokens, -1, 1)
        opt_mg = torch.optim.AdamW(mg.parameters(), lr=1e-5)
        opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-5)

        def mg_train():
            loss = mg(input_ids=tokens, position_ids=positions, attention_mask=None,
                      labels=labels).float().mean()
            loss.backward()
            opt_mg.step()
            opt_mg.zero_grad(set_to_none=True)

        def hf_train():
            logits = hf(tokens).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
            loss.backward()
            opt_hf.step()
            opt_hf.zero_grad(set_to_none=True)

        try:
            train = {"megatron": timed(mg_train, args.steps, sync)}
        except torch.OutOfMemoryError:
            train = {"megatron": float("inf")}
        train["transformers"] = timed(hf_train, args.steps, sync)
    n = batch * seq
    print(f"{'':14s} {'megatron tok/s':>15s} {'transformers tok/s':>19s} {'ratio':>7s}")
    for name, d in (("forward", fwd), ("train step", train)):
        print(f"{name:14s} {n / d['megatron']:15.0f} {n / d['transformers']:19.0f} "
              f"{d['transformers'] / d['megatron']:7.2f}")


if __name__ == "__main__":
    main()
