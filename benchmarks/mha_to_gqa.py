"""Zero-shot loss cost of MHA -> GQA (mean-pooled K/V) vs keeping MHA, on a small Olmo 3 (8 MHA
heads) trained briefly on pydoc text. Answers the seed's open question at toy scale; rerun on the
7B with its own checkpoint and scores through ``pare search heads=[…]`` or ``pare prune``.

    uv run python benchmarks/mha_to_gqa.py
"""

import shutil
import tempfile
from pathlib import Path

import torch


def main():
    from pare_nemo.cli import quiet

    quiet()
    from conversion.convert import import_hf
    from pare_nemo.data import load_token_data
    from pare_nemo.importance import importance, load_scores
    from pare_nemo.prune import num_params, plan
    from pare_nemo.search import hf_state_dict, lm_loss, pruned_model
    from pare_nemo.tiny import make_tokenizer, random_olmo3, tiny_config, train_briefly

    work = Path(tempfile.mkdtemp())
    try:
        tok = make_tokenizer(1024)
        data = load_token_data("pydoc", tok, 1000, 64)
        cfg = tiny_config(vocab_size=len(tok), hidden_size=128, intermediate_size=384,
                          num_layers=4, num_heads=8, num_kv_heads=8, sliding_window=32)
        cfg.pad_token_id, cfg.eos_token_id = tok.pad_token_id, tok.eos_token_id
        model = train_briefly(random_olmo3(cfg), data.tokens[:900], steps=400)
        model.save_pretrained(work / "hf")
        tok.save_pretrained(work / "hf")
        import_hf(str(work / "hf"), str(work / "mg"))
        scores_path = importance(str(work / "mg"), "pydoc", str(work / "s.pt"), num_samples=64,
                                 seq_length=64, layer_loss_samples=0, report=False)
        scores = load_scores(scores_path)
        hf, c = hf_state_dict(str(work / "mg"))
        held = data[900:]
        print(f"{'heads':>5s} {'kv heads':>8s} {'params':>9s} {'loss':>7s}")
        for heads, groups in ((8, 8), (8, 4), (8, 2), (8, 1), (4, 4), (4, 2), (4, 1)):
            p = plan(c, scores, target_num_attention_heads=heads, target_num_query_groups=groups)
            loss = lm_loss(pruned_model(hf, c, p), held.tokens, held.mask)
            print(f"{heads:5d} {groups:8d} {num_params(p.config):9d} {loss:7.4f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
