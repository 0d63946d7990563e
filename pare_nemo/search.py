"""``pare search``: candidate architectures under a parameter budget, each pruned in memory with the
same functions as ``pare prune`` and ranked by zero-shot LM loss on held-out tokens (the seeds'
"zero-shot perplexity as a filter" step before any distillation).
"""

import itertools
import json
import math
from pathlib import Path

import torch

from conversion import olmo3 as bridge
from pare_nemo.data import next_token_nll
from pare_nemo.prune import num_params, plan, prune_global, prune_layer, validate_scores

FRACTIONS = (1.0, 0.875, 0.75, 0.625, 0.5)


def _fmt(n: float) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.3f}M"


def _grid(full: int, multiple: int) -> list[int]:
    vals = {max(multiple, int(round(full * f / multiple)) * multiple) for f in FRACTIONS}
    return sorted(v for v in vals if v <= full)


def hf_state_dict(megatron_path: str) -> tuple[dict[str, torch.Tensor], object]:
    """The whole model as HF-named tensors (loaded once at TP=1)."""
    from pare_nemo.checkpoint import load_model
    from pare_nemo.parallel import distributed

    with distributed(1, 1):
        model, hf_config = load_model(megatron_path)
        params = model.state_dict()
        out = {}
        for mname, hnames, kind in bridge.expand(hf_config.num_hidden_layers):
            out |= {h: t.clone() for h, t in zip(hnames, bridge.to_hf(kind, params[mname], hf_config))}
    return out, hf_config


def pruned_model(hf: dict, hf_config, p):
    """An HF Olmo3ForCausalLM for plan ``p``, built in memory."""
    from transformers import Olmo3ForCausalLM
    from transformers.models.olmo3.modeling_olmo3 import Olmo3RotaryEmbedding

    sd = prune_global({k: hf[k] for k in ("model.embed_tokens.weight", "model.norm.weight",
                                          "lm_head.weight")}, p)
    for j, i in enumerate(p.layers):
        pre = f"model.layers.{i}."
        layer = {k.removeprefix(pre): v for k, v in hf.items() if k.startswith(pre)}
        sd |= {f"model.layers.{j}.{k}": v for k, v in prune_layer(layer, p, j, hf_config).items()}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device("meta"):  # no random init of weights that are overwritten anyway
        model = Olmo3ForCausalLM(p.config)
    model.to_empty(device=dev).load_state_dict(sd)
    model.model.rotary_emb = Olmo3RotaryEmbedding(p.config, device=dev)  # buffers, not weights
    return model.eval()


@torch.no_grad()
def lm_loss(model, tokens: torch.Tensor, mask: torch.Tensor, batch: int = 4) -> float:
    dev = next(model.parameters()).device
    nll, n = 0.0, 0
    for s in range(0, len(tokens), batch):
        t, m = tokens[s:s + batch].to(dev), mask[s:s + batch].to(dev)
        s_, n_ = next_token_nll(model(t).logits, t, m)
        nll += float(s_)
        n += int(n_)
    return nll / n


def search(megatron_path: str, scores_path: str, budget: float, tolerance: float = 0.05,
           data: str = "pydoc", num_samples: int = 64, seq_length: int = 4096,
           ffn: list[int] | None = None, heads: list[int] | None = None,
           hidden: list[int] | None = None, layers: list[int] | None = None,
           layer_metric: str = "layer_loss", protect_full_attention: bool = False,
           out_path: str | None = None, top: int = 10) -> str:
    """Rank candidate architectures within ``budget`` parameters (± ``tolerance``) by held-out loss."""
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoTokenizer

    from pare_nemo.checkpoint import TOKENIZER_DIR, check_output_dir, read_model_config
    from pare_nemo.data import load_token_data
    from pare_nemo.importance import load_scores

    c, _, _ = read_model_config(megatron_path)
    scores = load_scores(scores_path)
    validate_scores(scores, c)
    if not 0 < budget or not 0 <= tolerance < 1:
        raise ValueError(f"budget={budget} must be > 0 and tolerance={tolerance} in [0, 1)")
    out_path = Path(out_path or Path(scores_path).with_name("search.json"))
    check_output_dir(out_path, overwrite=True)
    mult = lambda n: 128 if n >= 1024 else 8  # noqa: E731
    ng, nh = c.num_key_value_heads, c.num_attention_heads
    grid = {
        "ffn": ffn or _grid(c.intermediate_size, mult(c.intermediate_size)),
        "heads": heads or [h for h in _grid(nh, 1) if h % ng == 0 or ng == nh],
        "hidden": hidden or _grid(c.hidden_size, mult(c.hidden_size)),
        "layers": layers or sorted({max(1, int(round(c.num_hidden_layers * f))) for f in FRACTIONS}),
    }
    lo, hi = budget * (1 - tolerance), budget * (1 + tolerance)
    candidates = []
    for f, h, d, n in itertools.product(*grid.values()):
        try:
            p = plan(c, scores, target_ffn_hidden_size=f, target_num_attention_heads=h,
                     target_hidden_size=d, target_num_layers=n, layer_metric=layer_metric,
                     protect_full_attention=protect_full_attention)
        except ValueError:
            continue
        params = num_params(p.config)
        if lo <= params <= hi:
            candidates.append(((f, h, d, n), params, p))
    if not candidates:
        raise ValueError(f"no candidate in the grid {grid} has {lo:.4g}..{hi:.4g} parameters")

    tok = AutoTokenizer.from_pretrained(Path(megatron_path) / TOKENIZER_DIR)
    held = load_token_data(data, tok, num_samples, seq_length)
    hf, _ = hf_state_dict(megatron_path)
    rows = []
    for (f, h, d, n), params, p in candidates:
        loss = lm_loss(pruned_model(hf, c, p), held.tokens, held.mask)
        rows.append({"target_ffn_hidden_size": f, "target_num_attention_heads": h,
                     "target_hidden_size": d, "target_num_layers": n, "params": params,
                     "loss": loss, "ppl": math.exp(loss), "layers_kept": p.layers})
    rows.sort(key=lambda r: r["loss"])
    result = {"budget": budget, "tolerance": tolerance, "grid": grid, "data": data,
              "num_samples": num_samples, "seq_length": seq_length, "layer_metric": layer_metric,
              "protect_full_attention": protect_full_attention, "original_params": num_params(c),
              "candidates": rows}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))

    t = Table(title=f"{len(rows)} candidates within {_fmt(budget)} ± {tolerance:.0%} "
                    f"(from {_fmt(num_params(c))}), by zero-shot loss on {num_samples} x "
                    f"{seq_length} held-out tokens")
    for col in ("rank", "ffn", "heads", "hidden", "layers", "params", "loss", "ppl"):
        t.add_column(col, justify="right")
    for i, r in enumerate(rows[:top]):
        t.add_row(str(i + 1), str(r["target_ffn_hidden_size"]), str(r["target_num_attention_heads"]),
                  str(r["target_hidden_size"]), str(r["target_num_layers"]),
                  _fmt(r["params"]), f"{r['loss']:.4f}", f"{r['ppl']:.2f}")
    Console().print(t)
    return str(out_path)
