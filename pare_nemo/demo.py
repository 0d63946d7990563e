"""``pare demo``: the pipeline end to end on a tiny Olmo 3, on CPU, in a few minutes.

Today: build a tiny Olmo 3 (GQA, 3 sliding : 1 full layers, YaRN on the full layers) and train it
briefly on real text, import it to Megatron, check the Megatron model's logits against transformers,
export it back to HF and check the round trip, run importance analysis and show what removing
the 10% least vs most important FFN neurons costs, then width-prune the model (FFN 384 -> 256,
hidden 128 -> 96), tokenize real text into a megatron indexed dataset, distill the pruned student from
the trained model (the ``tiny_distill`` recipe) and export it, printing the teacher's, the pruned
and the distilled model's loss on held-out text.
"""

import json
import shutil
import time
from pathlib import Path

import torch


def _real_tokens(tokenizer, batch: int, seq: int) -> torch.Tensor:
    """Held-out text: the end of pydoc_data.topics (training and importance read its beginning)."""
    from pare_nemo.tiny import pydoc_text

    ids = tokenizer(pydoc_text()[-200_000:]).input_ids
    return torch.tensor(ids[-batch * seq:]).reshape(batch, seq)


def _lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    from pare_nemo.losses import next_token_nll

    s, n = next_token_nll(logits, tokens, torch.ones_like(tokens, dtype=torch.bool),
                          logits.shape[-1])
    return (s / n).item()


def demo(workdir: str = "pare_demo", seq_length: int = 128) -> None:
    """Run the whole pipeline on a tiny Olmo 3 on CPU and print what it measured."""
    from rich.console import Console
    from rich.table import Table
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conversion.convert import export_hf, import_hf
    from pare_nemo.checkpoint import load_model
    from pare_nemo.data import prepare_data
    from pare_nemo.distill import distill
    from pare_nemo.engine import forward_logits
    from pare_nemo.eval import evaluate
    from pare_nemo.importance import importance, load_scores
    from pare_nemo.parallel import distributed
    from pare_nemo.prune import num_params, prune
    from pare_nemo.tiny import make_tiny_olmo3, pydoc_text
    from recipes.olmo3 import tiny_distill, tiny_importance, tiny_width

    console = Console()
    work = Path(workdir)
    hf_dir, mg_dir, out_dir = work / "hf", work / "megatron", work / "hf_export"
    for d in (hf_dir, mg_dir, out_dir):
        shutil.rmtree(d, ignore_errors=True)
    rows = []

    def step(name, fn):
        t = time.perf_counter()
        with console.status(name):
            result = fn()
        rows.append((name, f"{time.perf_counter() - t:.1f} s"))
        return result

    def build_and_train():
        from pare_nemo.data import load_token_data
        from pare_nemo.tiny import make_tokenizer, train_briefly

        tok = make_tokenizer(1024)
        make_tiny_olmo3(hf_dir, tokenizer=tok, num_layers=4, hidden_size=128,
                        intermediate_size=384, num_heads=8, num_kv_heads=2, sliding_window=32)
        model = AutoModelForCausalLM.from_pretrained(hf_dir)
        data = load_token_data("pydoc", tok, 800, 64)
        train_briefly(model, data.tokens, steps=300).save_pretrained(hf_dir)

    step("build a tiny Olmo 3 (HF), train it briefly", build_and_train)
    step("import HF -> Megatron", lambda: import_hf(str(hf_dir), str(mg_dir)))
    tokenizer = AutoTokenizer.from_pretrained(mg_dir / "tokenizer")
    tokens = _real_tokens(tokenizer, 16, seq_length)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        ref = hf(tokens).logits

    def megatron_forward():
        with distributed(1, 1):
            model, cfg = load_model(mg_dir)
            return forward_logits(model, tokens)[..., : cfg.vocab_size]

    out = step("Megatron forward (TP=1)", megatron_forward)
    step("export Megatron -> HF", lambda: export_hf(str(mg_dir), str(out_dir)))
    scores_path = work / "scores" / "importance.pt"
    shutil.rmtree(scores_path.parent, ignore_errors=True)
    step(f"importance (64 samples x {seq_length} tokens)",
         lambda: importance(tiny_importance(workdir), seq_length=seq_length))
    scores = load_scores(scores_path)
    pruned_dir, pruned_hf = work / "pruned", work / "pruned_hf"
    for d in (pruned_dir, pruned_hf):
        shutil.rmtree(d, ignore_errors=True)
    step("width prune (FFN 384 -> 256, hidden 128 -> 96) + export",
         lambda: export_hf(prune(tiny_width(workdir)), str(pruned_hf)))
    data_prefix, distilled_dir, distilled_hf = work / "data" / "pydoc", work / "distilled", \
        work / "distilled_hf"
    for d in (data_prefix.parent, distilled_dir, distilled_hf):
        shutil.rmtree(d, ignore_errors=True)
    # the first 200 of pydoc's 223 documents: the held-out tokens come from its last ones
    step("prepare-data (pydoc_data.topics -> megatron indexed dataset)", lambda: prepare_data(
        "pydoc", str(mg_dir / "tokenizer"), str(data_prefix), limit_docs=200))
    recipe = tiny_distill(workdir)
    step(f"distill the pruned student ({recipe.batch.train_steps} steps x "
         f"{recipe.batch.global_batch_size} x {recipe.batch.seq_length} tokens) + export",
         lambda: export_hf(distill(recipe, tensorboard=False), str(distilled_hf)))
    eval_dir, held_out = work / "eval", work / "held_out.txt"
    shutil.rmtree(eval_dir, ignore_errors=True)
    # held-out text: the last 23 of pydoc's 223 documents, which no stage read (training and
    # importance read its beginning, prepare-data the first 200 documents)
    held_out.write_text("\n\n\n".join(pydoc_text().split("\n\n\n")[200:]))
    # the tiny models learnt plain text: no chat template for the task and the generations
    step("eval teacher / pruned / distilled: held-out loss, pare_pydoc (lm-eval), generation "
         "speed, report", lambda: evaluate(
             checkpoints=f"teacher:{mg_dir},pruned:{pruned_dir},distilled:{distilled_dir}",
             data=str(held_out), output=str(eval_dir), num_samples=64, seq_length=seq_length,
             tasks="pare_pydoc", task_limit=100, chat_template=False, max_new_tokens=16,
             batch_sizes=[1, 8]))
    a, b = load_file(hf_dir / "model.safetensors"), load_file(out_dir / "model.safetensors")
    identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    exported = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    with torch.no_grad():
        exp_logits = exported(tokens).logits

    t = Table(title="Pare demo: a tiny Olmo 3 trained briefly on real text (pydoc_data.topics)")
    t.add_column("step")
    t.add_column("time", justify="right")
    for r in rows:
        t.add_row(*r)
    console.print(t)
    m = Table(title="what it measured")
    m.add_column("check")
    m.add_column("value", justify="right")
    m.add_row("max |logits(Megatron) - logits(transformers)|", f"{(out - ref).abs().max():.2e}")
    m.add_row("LM loss transformers / Megatron",
              f"{_lm_loss(ref, tokens):.4f} / {_lm_loss(out, tokens):.4f}")
    m.add_row("HF -> Megatron -> HF tensors bit-identical", str(identical))
    m.add_row("exported model's logits == original's",
              str(torch.equal(exp_logits, ref)))
    mlp = scores["mlp"]
    k = mlp.shape[1] // 10
    order = mlp.argsort(dim=1)

    def loss_without(cols):
        model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
        with torch.no_grad():
            for i, layer in enumerate(model.model.layers):
                layer.mlp.down_proj.weight[:, cols[i]] = 0
            return model(tokens, labels=tokens).loss.item()

    m.add_row("LM loss of the trained model", f"{_lm_loss(ref, tokens):.4f}")
    m.add_row("  without its 10% least important FFN neurons", f"{loss_without(order[:, :k]):.4f}")
    m.add_row("  without its 10% most important FFN neurons", f"{loss_without(order[:, -k:]):.4f}")
    pruned_model = AutoModelForCausalLM.from_pretrained(pruned_hf).eval()
    with torch.no_grad():
        pruned_loss = pruned_model(tokens, labels=tokens).loss.item()
    m.add_row(f"width prune {num_params(hf.config) / 1e6:.2f}M -> "
              f"{num_params(pruned_model.config) / 1e6:.2f}M params: loss",
              f"{_lm_loss(ref, tokens):.4f} / {pruned_loss:.4f}")
    ev = json.loads((eval_dir / "eval.json").read_text())
    m.add_row("LM loss teacher / pruned / distilled (pare eval)",
              " / ".join(f"{r['loss']:.4f}" for r in ev))
    m.add_row("pare_pydoc accuracy teacher / pruned / distilled",
              " / ".join(f"{r['tasks']['pare_pydoc/acc']:.2f}" for r in ev))
    m.add_row("tokens/s at batch 1 / 8: teacher -> distilled",
              f"{ev[0]['speed']['runs'][0]['tokens_per_s']:.0f} / "
              f"{ev[0]['speed']['runs'][1]['tokens_per_s']:.0f} -> "
              f"{ev[2]['speed']['runs'][0]['tokens_per_s']:.0f} / "
              f"{ev[2]['speed']['runs'][1]['tokens_per_s']:.0f}")
    m.add_row("least important layers (Block Influence)", str(scores["layer"].argsort().tolist()))
    m.add_row("least important layers (loss when skipped)",
              str(scores["layer_loss"].argsort().tolist()))
    console.print(m)
    console.print(f"outputs in {work.resolve()} (importance report: {scores_path.with_suffix('.png')}"
                  f"; compression report: {eval_dir / 'report' / 'report.md'})")
    if not identical or (out - ref).abs().max() > 1e-4:
        raise SystemExit("demo: parity check failed")
