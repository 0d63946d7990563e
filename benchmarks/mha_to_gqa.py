"""Zero-shot loss cost of MHA -> GQA (mean-pooled K/V) vs keeping MHA, on a small Olmo 3 (8 MHA
heads) trained briefly on pydoc text. Answers the seed's open question at toy scale; rerun on the
7B with its own checkpoint and scores through ``pare search heads=[…]`` or ``pare prune``.

    uv run python benchmarks/mha_to_gqa.py
    PARE_BENCH_SMOKE=1 uv run python benchmarks/mha_to_gqa.py   # 5 training steps: a smoke run
"""

import os
import shutil
import tempfile
from pathlib import Path

import torch


def main():
    from pare_nemo.cli import quiet

    quiet()
    from conversion.convert import import_hf
    from pare_nemo.checkpoint import load_model, read_model_config
    from pare_nemo.config import Targets
    from pare_nemo.data import load_token_data
    from pare_nemo.engine import forward_loss
    from pare_nemo.importance import importance, load_scores
    from pare_nemo.olmo3 import bridge
    from pare_nemo.olmo3.model import build_olmo3_model
    from pare_nemo.parallel import distributed
    from pare_nemo.prune import apply_plan, num_params, plan
    from pare_nemo.tiny import make_tokenizer, random_olmo3, tiny_config, train_briefly

    # rows of pydoc text (the last `held` held out), training steps, importance samples
    rows, held, steps, samples = (1000, 100, 400, 64)
    if os.environ.get("PARE_BENCH_SMOKE"):
        rows, held, steps, samples = 24, 8, 5, 8
    work = Path(tempfile.mkdtemp())
    try:
        tok = make_tokenizer(1024)
        data = load_token_data("pydoc", tok, rows, 64)
        cfg = tiny_config(vocab_size=len(tok), hidden_size=128, intermediate_size=384,
                          num_layers=4, num_heads=8, num_kv_heads=8, sliding_window=32)
        cfg.pad_token_id, cfg.eos_token_id = tok.pad_token_id, tok.eos_token_id
        model = train_briefly(random_olmo3(cfg), data.tokens[:rows - held], steps=steps)
        model.save_pretrained(work / "hf")
        tok.save_pretrained(work / "hf")
        import_hf(str(work / "hf"), str(work / "mg"))
        scores_path = importance(megatron_path=str(work / "mg"), data="pydoc",
                                 scores_path=str(work / "s.pt"), num_samples=samples, seq_length=64,
                                 layer_loss_samples=0, report=False)
        scores = load_scores(scores_path)
        c, padded, dtype = read_model_config(work / "mg")
        print(f"{'heads':>5s} {'kv heads':>8s} {'params':>9s} {'loss':>7s}")
        with distributed(1, 1):  # pruned in memory as `pare search` does
            model, _ = load_model(work / "mg")
            for heads, groups in ((8, 8), (8, 4), (8, 2), (8, 1), (4, 4), (4, 2), (4, 1)):
                p = plan(c, scores, Targets(target_num_attention_heads=heads,
                                            target_num_query_groups=groups))
                cfg = bridge.megatron_config(p.config, dtype=dtype, perform_initialization=False)
                pruned = build_olmo3_model(cfg, padded, parallel_output=True)
                with torch.no_grad():
                    apply_plan(model, pruned, p, c)
                rest = data[rows - held:]
                nll, n = forward_loss(pruned, rest.tokens, rest.mask, 1, c.vocab_size)
                loss = nll / n
                print(f"{heads:5d} {groups:8d} {num_params(p.config):9d} {loss:7.4f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
