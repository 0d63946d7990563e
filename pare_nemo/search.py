"""``pare search``: candidate architectures under a parameter budget, each pruned in memory exactly as
``pare prune`` does and ranked by zero-shot LM loss on held-out tokens (the seeds' "zero-shot
perplexity as a filter" step before any distillation).

The original Megatron model is loaded once at the user's TP/PP; each candidate is built
target-shaped at the same TP/PP, filled by ``prune.apply_plan`` (the function ``pare prune`` uses),
scored with ``engine.forward_loss`` (the loss of importance's ``layer_loss``) and freed. Held-out
rows come after the rows importance used (calibration + layer_loss) when the data are the same.
Each ranked row carries the exact ``pare prune`` command that builds it.
"""

import gc
import itertools
import json
import math
import shlex
from pathlib import Path

import torch

from pare_nemo.config import Depth, SearchConfig, Targets, need
from pare_nemo.olmo3 import bridge
from pare_nemo.prune import depth_scores, num_params, plan, validate_scores

FRACTIONS = (1.0, 0.875, 0.75, 0.625, 0.5)
TARGETS = ("target_ffn_hidden_size", "target_num_attention_heads", "target_hidden_size",
           "target_num_layers")


def _fmt(n: float) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.3f}M"


def _grid(full: int, multiple: int) -> list[int]:
    vals = {max(multiple, int(round(full * f / multiple)) * multiple) for f in FRACTIONS}
    return sorted(v for v in vals if v <= full)


def first_held_out_row(meta: dict, data: str, seq_length: int, pack: bool, split: str) -> int:
    """The first row of ``data`` that importance did not use: ``rows_used`` when the scores were
    computed on the same rows (same data, split, seq_length and packing), else 0."""
    same = (meta.get("data"), meta.get("seq_length"), meta.get("pack"), meta.get("split", split)) \
        == (data, seq_length, pack, split)
    if not same:
        return 0
    if "rows_used" not in meta:
        raise ValueError("the scores do not record which rows importance used (older `pare "
                         "importance`): rerun importance, or search on other data")
    return meta["rows_used"]


def prune_command(megatron_path: str, scores_path: str, save_path: str, targets: dict,
                  depth: Depth) -> str:
    """The ``pare prune`` command line that builds a candidate."""
    args = {"megatron_path": megatron_path, "scores_path": scores_path, "save_path": save_path,
            **targets, "layer_metric": depth.layer_metric,
            "protect_full_attention": str(depth.protect_full_attention).lower()}
    return "pare prune " + " ".join(f"{k}={shlex.quote(str(v))}" for k, v in args.items())


def candidates_in_budget(c, scores: dict, cfg: SearchConfig):
    """(the grid, [(targets, parameters, plan)] of the candidates within the budget, the skipped
    ones with their reasons); an error when no candidate fits."""
    tp, pp, depth, g = cfg.parallel.tp, cfg.parallel.pp, cfg.depth, cfg.grid
    mult = lambda n: 128 if n >= 1024 else 8  # noqa: E731
    ng, nh = c.num_key_value_heads, c.num_attention_heads
    grid = {
        "ffn": g.ffn or _grid(c.intermediate_size, mult(c.intermediate_size)),
        "heads": g.heads or [h for h in _grid(nh, 1) if h % ng == 0 or ng == nh],
        "hidden": g.hidden or _grid(c.hidden_size, mult(c.hidden_size)),
        "layers": g.layers or sorted({max(1, int(round(c.num_hidden_layers * f)))
                                      for f in FRACTIONS}),
    }
    if any(n != c.num_hidden_layers for n in grid["layers"]):
        depth_scores(scores, depth.layer_metric)  # NaN layer_loss: say so now, not "no candidate"
    lo, hi = cfg.budget * (1 - cfg.tolerance), cfg.budget * (1 + cfg.tolerance)
    candidates, skipped = [], []
    for values in itertools.product(*grid.values()):
        targets = dict(zip(TARGETS, values))
        try:
            p = plan(c, scores, Targets(**targets), depth, tp)
        except ValueError as e:
            skipped.append(targets | {"reason": str(e)})
            continue
        params = num_params(p.config)
        if not lo <= params <= hi:
            continue
        try:
            bridge.check_parallel_sizes(p.config, tp, pp)
        except ValueError as e:
            skipped.append(targets | {"params": params, "reason": str(e)})
            continue
        candidates.append((targets, params, p))
    if not candidates:
        why = sorted({s["reason"] for s in skipped})
        raise ValueError(f"no candidate in the grid {grid} has {lo:.4g}..{hi:.4g} parameters"
                         + (f" (skipped: {'; '.join(why)})" if why else ""))
    return grid, candidates, skipped


def search(cfg: SearchConfig | None = None, **flat) -> str:
    """Rank candidate architectures within ``budget`` parameters (± ``tolerance``) by held-out loss
    on ``num_samples`` rows of ``data`` after those importance used, at ``tp`` x ``pp``."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from transformers import AutoTokenizer

    from pare_nemo.checkpoint import TOKENIZER_DIR, load_model, read_model_config
    from pare_nemo.data import NotEnoughData, load_token_data
    from pare_nemo.engine import data_parallel_share, forward_loss
    from pare_nemo.importance import load_scores
    from pare_nemo.olmo3.model import build_olmo3_model
    from pare_nemo.parallel import device, distributed
    from pare_nemo.prune import apply_plan

    cfg = SearchConfig.of(cfg, **flat)
    rows, text, depth, tp, pp = cfg.rows, cfg.text, cfg.depth, cfg.parallel.tp, cfg.parallel.pp
    # ---- everything checked before any work
    c, padded, dtype = read_model_config(cfg.megatron_path)
    dp = cfg.parallel.check(c)
    rows.check(c, dp=dp)
    scores = load_scores(cfg.scores_path)
    validate_scores(scores, c)
    need(0 < cfg.budget and 0 <= cfg.tolerance < 1,
         f"budget={cfg.budget} must be > 0 and tolerance={cfg.tolerance} in [0, 1)")
    depth.check()
    text.check()
    out_path = Path(cfg.out_path or Path(cfg.scores_path).with_name("search.json"))
    grid, candidates, skipped = candidates_in_budget(c, scores, cfg)
    start = first_held_out_row(scores["metadata"], text.data, rows.seq_length, text.pack,
                               text.split)
    rows_range = [start, start + rows.num_samples]  # held-out rows [start, end) of data

    with distributed(tp, pp):
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        tok = AutoTokenizer.from_pretrained(Path(cfg.megatron_path) / TOKENIZER_DIR)
        try:
            held = load_token_data(text.data, tok, start + rows.num_samples, rows.seq_length,
                                   pack=text.pack, split=text.split)[start:]
        except NotEnoughData as e:
            raise NotEnoughData(f"{e} (rows {start}..{start + rows.num_samples}: the first "
                                f"{start} rows were used by importance)") from None
        mine = data_parallel_share(held)
        model, _ = load_model(cfg.megatron_path)
        model.eval()
        ranked = []
        for targets, params, p in candidates:
            megatron_cfg = bridge.megatron_config(p.config, tp=tp, pp=pp, dtype=dtype,
                                                  perform_initialization=False)
            new_model = build_olmo3_model(megatron_cfg, padded,
                                          pre_process=ps.is_pipeline_first_stage(),
                                          post_process=ps.is_pipeline_last_stage(),
                                          parallel_output=True).to(device())
            with torch.no_grad():
                apply_plan(model, new_model, p, c)
            nll, n = forward_loss(new_model, mine.tokens, mine.mask, rows.micro_batch_size,
                                  c.vocab_size)
            loss = nll / n
            del new_model  # one candidate in memory at a time
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            f, h, d, n_layers = targets.values()
            save = (f"{str(cfg.megatron_path).rstrip('/')}-ffn{f}-heads{h}-hidden{d}"
                    f"-layers{n_layers}")
            ranked.append(targets | {
                "params": params, "loss": loss, "ppl": math.exp(loss), "layers_kept": p.layers,
                "prune_command": prune_command(str(cfg.megatron_path), str(cfg.scores_path), save,
                                               targets, depth)})
        del model
        ranked.sort(key=lambda r: r["loss"])
        if rank0:
            result = {"budget": cfg.budget, "tolerance": cfg.tolerance, "grid": grid,
                      "data": text.data, "split": text.split, "pack": text.pack,
                      "seq_length": rows.seq_length, "num_samples": rows.num_samples,
                      "held_out_rows": rows_range, "held_out_sha256": held.sha256(),
                      "importance_rows_used": scores["metadata"].get("rows_used"),
                      "layer_metric": depth.layer_metric,
                      "protect_full_attention": depth.protect_full_attention,
                      "parallel": {"tp": tp, "pp": pp, "dp": dp},
                      "original_params": num_params(c), "candidates": ranked, "skipped": skipped}
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(result, indent=2))
            _print(ranked[:cfg.top], skipped, cfg.budget, cfg.tolerance, num_params(c), text.data,
                   rows_range, rows.seq_length, out_path)
        if dist.is_initialized():
            dist.barrier()
    return str(out_path)


def _print(rows, skipped, budget, tolerance, original, data, rows_range, seq_length, out_path):
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"candidates within {_fmt(budget)} ± {tolerance:.0%} (from {_fmt(original)}), "
                    f"by zero-shot loss on rows {rows_range[0]}..{rows_range[1]} of {data} "
                    f"({seq_length} tokens each)")
    for col in ("rank", "ffn", "heads", "hidden", "layers", "params", "loss", "ppl"):
        t.add_column(col, justify="right")
    for i, r in enumerate(rows):
        t.add_row(str(i + 1), *(str(r[k]) for k in TARGETS), _fmt(r["params"]),
                  f"{r['loss']:.4f}", f"{r['ppl']:.2f}")
    Console().print(t)
    for i, r in enumerate(rows):  # plain print: exact, copyable lines
        print(f"{i + 1}: {r['prune_command']}")
    for reason in sorted({s["reason"] for s in skipped}):
        print(f"skipped {sum(s['reason'] == reason for s in skipped)} grid point(s): {reason}")
    print(f"all candidates: {out_path}")
