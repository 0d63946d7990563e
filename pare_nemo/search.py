"""``pare search``: candidate architectures under a budget (parameters, decode latency, memory),
each pruned in memory exactly as ``pare prune`` does and ranked by zero-shot LM loss on held-out
tokens (the seeds' "zero-shot perplexity as a filter" step); then, with ``retrain_top=K``, the K
best distilled briefly and ranked again (zero-shot rankings are unstable: the best zero-shot model
is often not the best after distillation).

The original Megatron model is loaded once at the user's TP/PP; each candidate is built
target-shaped at the same TP/PP, filled by ``prune.apply_plan`` (the function ``pare prune`` uses),
scored with ``engine.forward_loss`` (the loss of importance's ``layer_loss``) and freed. Held-out
rows come after the rows importance used (calibration + layer_loss) when the data are the same.
Each ranked row carries the exact ``pare prune`` command that builds it.

Speed and memory of a shape (``latency`` section): ``model``, a roofline from the shape (decode:
the bytes of the weights and KV cache over memory bandwidth, or its FLOPs over peak if more;
prefill: its FLOPs over peak) with ``HARDWARE``'s figures or the CPU's probed ones; ``measured``,
prefill and decode steps of the shape (transformers' Olmo 3 with its KV cache) timed on this
machine. Sliding-window layers keep at most ``sliding_window`` keys, so dropping full-attention
layers shrinks the cache. The table marks the accuracy-latency Pareto front.

Retraining (``retrain`` section) calls the stages themselves, one candidate after another, in
``retrain_dir``: ``<candidate>/pruned`` (``prune.prune``), ``<candidate>/distilled``
(``distill.distill``, which resumes a killed run) and ``<candidate>/eval.json``
(``eval.evaluate``: the pruned and the distilled model on the same validation rows of
``distill_data``), the last written when the candidate is done. A search run again skips what is
done (the zero-shot pass too, kept in ``zero_shot.json``).
"""

import dataclasses
import gc
import itertools
import json
import math
import os
import shlex
import statistics
import time
from pathlib import Path

import torch

from pare_nemo.config import (
    Batch,
    Data,
    Depth,
    DistillConfig,
    Downstream,
    EvalConfig,
    Models,
    Optimizer,
    PruneConfig,
    Rows,
    Run,
    SearchConfig,
    Targets,
    need,
)
from pare_nemo.olmo3 import bridge
from pare_nemo.prune import depth_scores, num_params, plan, validate_scores
from pare_nemo.rundir import write_json

FRACTIONS = (1.0, 0.875, 0.75, 0.625, 0.5)
TARGETS = ("target_ffn_hidden_size", "target_num_attention_heads", "target_hidden_size",
           "target_num_layers")
# dense BF16 tensor-core FLOP/s and memory bytes/s of the SXM parts (NVIDIA's datasheets); the
# CPU's are probed (:func:`probe_cpu`)
HARDWARE = {"h100": (989e12, 3.35e12), "h200": (989e12, 4.8e12), "a100": (312e12, 2.039e12)}
ZERO_SHOT = "zero_shot.json"  # the zero-shot pass, kept in retrain_dir for a search run again


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


def name_of(targets: dict) -> str:
    f, h, d, n = (targets[k] for k in TARGETS)
    return f"ffn{f}-heads{h}-hidden{d}-layers{n}"


def command(stage: str, cfg) -> str:
    """The ``pare <stage>`` command line that runs ``cfg``: its fields that differ from the
    stage's defaults."""
    defaults = type(cfg).defaults()
    show = lambda v: str(v).lower() if isinstance(v, bool) else (  # noqa: E731
        "[" + ",".join(map(str, v)) + "]" if isinstance(v, list) else str(v))
    return f"pare {stage} " + " ".join(f"{k}={shlex.quote(show(v))}"
                                       for k, v in cfg.flat().items() if v != defaults[k])


# ---------------------------------------------------------------- speed and memory of a shape


def keys_per_layer(c, context: int) -> list[int]:
    """How many keys each layer attends to (and caches) at ``context`` tokens: sliding-window
    layers at most ``sliding_window``."""
    types = getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers
    w = getattr(c, "sliding_window", None)
    return [min(context, w) if t == "sliding_attention" and w else context for t in types]


def shape_cost(c, batch: int, context: int, dtype_bytes: int) -> dict:
    """FLOPs and bytes moved of one decode step (``batch`` sequences at ``context`` tokens) and of
    the prefill of ``context`` tokens, and the memory the shape holds (weights + KV cache)."""
    total = num_params(c)
    matmul = total - c.vocab_size * c.hidden_size  # the input embedding is a lookup
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q = c.num_attention_heads * hd
    keys = keys_per_layer(c, context)
    # a layer that keeps k keys: position t attends to min(t, k) of them
    pairs = [k * (k + 1) // 2 + (context - k) * k for k in keys]
    kv = batch * 2 * c.num_key_value_heads * hd * dtype_bytes * sum(keys)
    return {"weights_bytes": total * dtype_bytes, "kv_cache_bytes": kv,
            "memory_bytes": total * dtype_bytes + kv,
            "decode_flops": batch * (2 * matmul + 4 * q * sum(keys)),
            "decode_bytes": matmul * dtype_bytes + kv,
            "prefill_flops": batch * (2 * matmul * context + 4 * q * sum(pairs)),
            "prefill_bytes": total * dtype_bytes + kv}


def roofline(cost: dict, flops: float, bandwidth: float) -> tuple[float, float]:
    """(decode step, prefill) seconds: the slower of compute at ``flops`` and memory traffic at
    ``bandwidth``."""
    return (max(cost["decode_flops"] / flops, cost["decode_bytes"] / bandwidth),
            max(cost["prefill_flops"] / flops, cost["prefill_bytes"] / bandwidth))


def _median_time(fn, repeats: int, warmup: int = 1) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []
    for i in range(warmup + repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[warmup:])


def probe_cpu() -> tuple[float, float]:
    """(FLOP/s, bytes/s) this CPU reaches: a 1024 x 1024 fp32 matmul, a 256 MiB copy (medians)."""
    a = torch.randn(1024, 1024)
    flops = 2 * 1024 ** 3 / _median_time(lambda: a @ a, 5)
    x = torch.ones(64 * 2 ** 20)
    y = torch.empty_like(x)
    return flops, 2 * x.nbytes / _median_time(lambda: y.copy_(x), 5)  # read + write


def hardware_figures(name: str | None) -> tuple[str, float, float]:
    """(name, FLOP/s, bytes/s) of ``name`` (``HARDWARE`` or ``cpu``) or of this machine."""
    if name is None:
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name().lower()
            name = next((k for k in HARDWARE if k in gpu), None)
            need(name is not None, f"no figures for this GPU ({gpu}): pass hardware= one of "
                                   f"{tuple(HARDWARE)}, or latency=measured")
        else:
            name = "cpu"
    if name == "cpu":
        return ("cpu (probed)", *probe_cpu())
    return (name, *HARDWARE[name])


def measure(c, batch: int, context: int, dtype: torch.dtype, repeats: int = 10,
            warmup: int = 3) -> tuple[float, float]:
    """(decode step, prefill) seconds of the shape ``c`` on this machine: transformers' Olmo 3 at
    random weights, prefill of ``batch`` x ``context`` tokens, then decode steps on its KV cache
    (medians of ``repeats`` after ``warmup``; the prefill a third as often)."""
    import copy

    from transformers import Olmo3ForCausalLM

    from pare_nemo.parallel import device

    dev = device()
    c = copy.deepcopy(c)
    c.use_cache = True
    with torch.device(dev):
        model = Olmo3ForCausalLM._from_config(c, dtype=dtype).eval()
    tokens = torch.randint(0, c.vocab_size, (batch, context),
                           generator=torch.Generator().manual_seed(0)).to(dev)
    state = {}

    def prefill():
        state["out"] = model(tokens, use_cache=True)

    def decode():
        out = state["out"]
        state["out"] = model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values,
                             use_cache=True)

    with torch.inference_mode():
        prefill_s = _median_time(prefill, max(1, repeats // 3))
        decode_s = _median_time(decode, repeats, warmup)
    state.clear()
    return decode_s, prefill_s


def price(configs: list, cfg: SearchConfig) -> tuple[str, list[dict]]:
    """(where the figures come from, per HF config: decode and prefill seconds, memory bytes)."""
    lat = cfg.latency
    dt = getattr(torch, lat.latency_dtype)
    nbytes = torch.empty((), dtype=dt).element_size()
    b, ctx = lat.latency_batch_size, lat.latency_context
    if lat.latency == "model":
        source, flops, bw = hardware_figures(lat.hardware)
        source = f"roofline on {source}: {flops / 1e12:.3g} TFLOP/s, {bw / 1e9:.4g} GB/s"
    else:
        source = "measured on " + (torch.cuda.get_device_name() if torch.cuda.is_available()
                                   else "this CPU") + " (transformers, KV cache)"
    out = []
    for c in configs:
        cost = shape_cost(c, b, ctx, nbytes)
        if lat.latency == "model":
            decode_s, prefill_s = roofline(cost, flops, bw)
        else:
            decode_s, prefill_s = measure(c, b, ctx, dt)
            gc.collect()  # the timed model, before the next one is built
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        out.append({"decode_s": decode_s, "prefill_s": prefill_s,
                    "memory_bytes": cost["memory_bytes"],
                    "kv_cache_bytes": cost["kv_cache_bytes"]})
    return source, out


def pareto(rows: list[dict], loss: str = "loss") -> None:
    """Mark (``pareto``) the rows no other row beats on both ``loss`` and decode time."""
    for r in rows:
        r["pareto"] = not any(o[loss] <= r[loss] and o["decode_s"] <= r["decode_s"]
                              and (o[loss], o["decode_s"]) != (r[loss], r["decode_s"])
                              for o in rows)


def rank_correlation(a: list[float], b: list[float]) -> float | None:
    """Spearman's rho of two score lists (ranks by value; None for fewer than 2)."""
    n = len(a)
    if n < 2:
        return None
    rank = lambda v: {i: r for r, i in enumerate(sorted(range(n), key=v.__getitem__))}  # noqa: E731
    ra, rb = rank(a), rank(b)
    return 1 - 6 * sum((ra[i] - rb[i]) ** 2 for i in range(n)) / (n * (n * n - 1))


# ---------------------------------------------------------------- the candidates


def candidates_in_budget(c, scores: dict, cfg: SearchConfig):
    """(the grid, [(targets, parameters, plan)] of the candidates within the parameter and memory
    budgets, the skipped ones with their reasons); an error when no candidate fits."""
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
    lo, hi = (cfg.budget * (1 - cfg.tolerance), cfg.budget * (1 + cfg.tolerance)) \
        if cfg.budget else (0, math.inf)
    lat = cfg.latency
    nbytes = torch.empty((), dtype=getattr(torch, lat.latency_dtype)).element_size()
    candidates, skipped, memories = [], [], []
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
        if cfg.budget_memory:
            memory = shape_cost(p.config, lat.latency_batch_size, lat.latency_context,
                                nbytes)["memory_bytes"]
            memories.append(memory)
            if memory > cfg.budget_memory:
                continue
        try:
            bridge.check_parallel_sizes(p.config, tp, pp)
        except ValueError as e:
            skipped.append(targets | {"params": params, "reason": str(e)})
            continue
        candidates.append((targets, params, p))
    if not candidates:
        why = sorted({s["reason"] for s in skipped})
        wanted = f"{lo:.4g}..{hi:.4g} parameters" if cfg.budget else "a shape"
        if memories:
            wanted += (f" within budget_memory={cfg.budget_memory:.4g} bytes (the least: "
                       f"{min(memories):.4g})")
        raise ValueError(f"no candidate in the grid {grid} has {wanted}"
                         + (f" (skipped: {'; '.join(why)})" if why else ""))
    return grid, candidates, skipped


def _search_key(cfg: SearchConfig) -> dict:
    """What the zero-shot pass depends on (a kept pass is reused only for the same)."""
    d = cfg.to_dict()
    for k in ("retrain", "out_path", "top"):
        d.pop(k)
    return d


def search(cfg: SearchConfig | None = None, **flat) -> str:
    """Rank candidate architectures within ``budget`` parameters (± ``tolerance``),
    ``budget_latency`` seconds a decode step and ``budget_memory`` bytes by held-out loss on
    ``num_samples`` rows of ``data`` after those importance used, at ``tp`` x ``pp``; with
    ``retrain_top=K`` distill the K best briefly and rank them again."""
    import torch.distributed as dist

    from pare_nemo.importance import load_scores
    from pare_nemo.parallel import distributed

    cfg = SearchConfig.of(cfg, **flat)
    rows, text, depth, r = cfg.rows, cfg.text, cfg.depth, cfg.retrain
    # ---- everything checked before any work
    from pare_nemo.checkpoint import read_model_config

    c, _, _ = read_model_config(cfg.megatron_path)
    dp = cfg.parallel.check(c)
    rows.check(c, dp=dp)
    scores = load_scores(cfg.scores_path)
    validate_scores(scores, c)
    need(any(b is not None for b in (cfg.budget, cfg.budget_latency, cfg.budget_memory)),
         "no budget: give budget= (parameters), budget_latency= (seconds a decode step) or "
         "budget_memory= (bytes of weights + KV cache)")
    need(all(b is None or b > 0 for b in (cfg.budget, cfg.budget_latency, cfg.budget_memory))
         and 0 <= cfg.tolerance < 1,
         f"budgets must be > 0 and tolerance={cfg.tolerance} in [0, 1)")
    depth.check()
    text.check()
    cfg.latency.check()
    r.check(dp, rows.micro_batch_size)
    out_path = Path(cfg.out_path or Path(cfg.scores_path).with_name("search.json"))
    retrain_dir = Path(r.retrain_dir or out_path.with_name(out_path.stem + "_retrain"))
    if r.retrain_top:
        check_retrain(cfg, c)
    grid, candidates, skipped = candidates_in_budget(c, scores, cfg)

    with distributed(cfg.parallel.tp, cfg.parallel.pp):
        rank0 = dist.get_rank() == 0
        say = print if rank0 else (lambda *a, **k: None)
        kept = retrain_dir / ZERO_SHOT
        result = None
        if r.retrain_top and kept.exists():
            saved = json.loads(kept.read_text())
            if saved["key"] == _search_key(cfg):
                result = saved["result"]
                say(f"the zero-shot pass is done already ({kept})")
        if result is None:
            result = zero_shot(cfg, c, scores, grid, candidates, skipped, say)
            if r.retrain_top and rank0:
                retrain_dir.mkdir(parents=True, exist_ok=True)
                write_json(kept, {"key": _search_key(cfg), "result": result})
        if r.retrain_top:
            retrain(cfg, result, retrain_dir, say)
        ranked = result["candidates"]
        best = min((x for x in ranked if "retrained" in x),
                   key=lambda x: x["retrained"]["loss_after"], default=ranked[0])
        result["chosen"] = best["name"]
        if rank0:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            write_json(out_path, result)
            plot(result, out_path.with_suffix(".png"))
            _print(result, cfg.top, out_path)
        dist.barrier()
    return str(out_path)


def check_retrain(cfg: SearchConfig, c) -> None:
    """What the short distillations and their scoring need, checked before any work."""
    from pare_nemo.checkpoint import check_same_tokenizer
    from pare_nemo.config import DEFAULT_SPLIT
    from pare_nemo.data import check_data
    from pare_nemo.eval import check_prefix_rows

    r = cfg.retrain
    teacher = r.teacher_path or cfg.megatron_path
    if r.teacher_path:
        from pare_nemo.checkpoint import read_model_config

        read_model_config(teacher)
        check_same_tokenizer(teacher, cfg.megatron_path)
    prefixes, weights = check_data(r.distill_data, cfg.megatron_path)
    check_prefix_rows(prefixes, weights, DEFAULT_SPLIT, r.score_samples, cfg.rows.seq_length)
    probe = distill_config(cfg, Path("candidate"))
    probe.optimizer.check(probe.batch.train_steps)
    probe.batch.check(c, dp=cfg.parallel.check(c))


def zero_shot(cfg: SearchConfig, c, scores, grid, candidates, skipped, say) -> dict:
    """Every candidate priced (latency, memory), those within ``budget_latency`` pruned in memory
    and scored on the held-out rows: the search's result, ranked by zero-shot loss."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from transformers import AutoTokenizer

    from pare_nemo.checkpoint import TOKENIZER_DIR, load_model, read_model_config
    from pare_nemo.data import NotEnoughData, load_token_data
    from pare_nemo.engine import data_parallel_share, forward_loss
    from pare_nemo.olmo3.model import build_olmo3_model
    from pare_nemo.parallel import device
    from pare_nemo.prune import apply_plan

    rows, text, depth = cfg.rows, cfg.text, cfg.depth
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    _, padded, dtype = read_model_config(cfg.megatron_path)
    # one rank prices (a probe or a timing per rank could differ): every rank gets its figures
    priced = [price([p.config for _, _, p in candidates], cfg) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(priced, src=0)
    source, costs = priced[0]
    if cfg.budget_latency:
        fast = [(x, cost) for x, cost in zip(candidates, costs)
                if cost["decode_s"] <= cfg.budget_latency]
        need(bool(fast), f"no candidate decodes within budget_latency={cfg.budget_latency:.4g} s "
                         f"({source}; the fastest: {min(x['decode_s'] for x in costs):.4g} s)")
        candidates, costs = map(list, zip(*fast))
    start = first_held_out_row(scores["metadata"], text.data, rows.seq_length, text.pack,
                               text.split)
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
    for (targets, params, p), cost in zip(candidates, costs):
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
        save = f"{str(cfg.megatron_path).rstrip('/')}-{name_of(targets)}"
        ranked.append(targets | {
            "name": name_of(targets), "params": params, "loss": loss, "ppl": math.exp(loss),
            "layers_kept": p.layers, **cost,
            "prune_command": prune_command(str(cfg.megatron_path), str(cfg.scores_path), save,
                                           targets, depth)})
    del model
    ranked.sort(key=lambda x: x["loss"])
    pareto(ranked)
    lat = cfg.latency
    return {"budget": cfg.budget, "tolerance": cfg.tolerance,
            "budget_latency": cfg.budget_latency, "budget_memory": cfg.budget_memory,
            "latency": {"source": source, "batch_size": lat.latency_batch_size,
                        "context": lat.latency_context, "dtype": lat.latency_dtype},
            "grid": grid, "data": text.data, "split": text.split, "pack": text.pack,
            "seq_length": rows.seq_length, "num_samples": rows.num_samples,
            "held_out_rows": [start, start + rows.num_samples], "held_out_sha256": held.sha256(),
            "importance_rows_used": scores["metadata"].get("rows_used"),
            "layer_metric": depth.layer_metric,
            "protect_full_attention": depth.protect_full_attention,
            "parallel": {"tp": tp, "pp": pp, "dp": cfg.parallel.check(c)},
            "original_params": num_params(c), "candidates": ranked, "skipped": skipped}


# ---------------------------------------------------------------- retraining the best


def prune_config(cfg: SearchConfig, targets: dict, save: Path) -> PruneConfig:
    return PruneConfig(megatron_path=cfg.megatron_path, scores_path=cfg.scores_path,
                       save_path=str(save), targets=Targets(**targets), depth=cfg.depth,
                       parallel=cfg.parallel)


def distill_config(cfg: SearchConfig, where: Path) -> DistillConfig:
    """The short distillation of the candidate pruned into ``where/pruned``: the same for every
    candidate but the student."""
    r, rows = cfg.retrain, cfg.rows
    return DistillConfig(
        models=Models(student_path=str(where / "pruned"),
                      teacher_path=r.teacher_path or cfg.megatron_path, dtype=r.retrain_dtype),
        data=Data(data=r.distill_data),
        run=Run(save_path=str(where / "distilled")),
        batch=Batch(train_steps=r.retrain_steps, global_batch_size=r.retrain_batch_size,
                    micro_batch_size=rows.micro_batch_size, seq_length=rows.seq_length),
        optimizer=Optimizer(lr=r.retrain_lr, min_lr=r.retrain_lr / 10,
                            warmup_steps=r.retrain_warmup),
        parallel=cfg.parallel)


def eval_config(cfg: SearchConfig, where: Path) -> EvalConfig:
    """The pruned and the distilled candidate on the same rows of the distillation data's
    validation split (held out from its training documents), both in the distillation's dtype."""
    rows = cfg.rows
    return EvalConfig(checkpoints=f"pruned:{where / 'pruned'},distilled:{where / 'distilled'}",
                      data=cfg.retrain.distill_data, output=str(where / "eval.json"),
                      rows=Rows(num_samples=cfg.retrain.score_samples,
                                seq_length=rows.seq_length,
                                micro_batch_size=rows.micro_batch_size),
                      parallel=cfg.parallel, downstream=Downstream(report=False),
                      dtype=cfg.retrain.retrain_dtype, position_bucket=0, overwrite=True)


def retrain(cfg: SearchConfig, result: dict, retrain_dir: Path, say) -> None:
    """Distill the ``retrain_top`` best zero-shot candidates with the stages' own functions, one
    after another (a candidate with its eval.json is done), and rank them again."""
    from pare_nemo import rundir
    from pare_nemo.checkpoint import CONFIG_FILE
    from pare_nemo.distill import distill
    from pare_nemo.eval import evaluate
    from pare_nemo.prune import prune

    r = cfg.retrain
    top = result["candidates"][:r.retrain_top]
    for i, row in enumerate(top):
        where = retrain_dir / row["name"]
        targets = {k: row[k] for k in TARGETS}
        dcfg = distill_config(cfg, where)
        scored = where / "eval.json"
        if scored.exists():
            saved = rundir.read_config(dcfg.run.save_path)
            need(saved is not None and saved.flat() == dcfg.flat(),
                 f"{where} holds a candidate retrained with other settings than these: give "
                 "another retrain_dir (or remove it) to retrain with these")
            say(f"candidate {i + 1}/{len(top)} {row['name']}: retrained already ({scored})")
        else:
            say(f"candidate {i + 1}/{len(top)} {row['name']}: prune, distill {r.retrain_steps} "
                f"steps, score")
            if not (where / "pruned" / CONFIG_FILE).exists():  # pare prune writes it whole
                prune(prune_config(cfg, targets, where / "pruned"))
            distill(dcfg)  # resumes a run that was killed
            evaluate(eval_config(cfg, where))
        before, after = json.loads(scored.read_text())
        row["retrained"] = {"loss_before": before["loss"], "loss_after": after["loss"],
                            "tokens": after["tokens"], "run": dcfg.run.save_path,
                            "eval": str(scored), "distill_command": command("distill", dcfg)}
    after = sorted(top, key=lambda x: x["retrained"]["loss_after"])
    for rank, row in enumerate(after):
        row["retrained"]["rank"] = rank + 1
    result["retrain"] = {
        **dataclasses.asdict(r), "retrain_dir": str(retrain_dir),
        "rank_correlation": rank_correlation([x["loss"] for x in top],
                                             [x["retrained"]["loss_after"] for x in top])}


# ---------------------------------------------------------------- output


def plot(result: dict, path: Path) -> None:
    """Zero-shot loss against decode time (the Pareto front joined); with retraining, each
    retrained candidate's loss before and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["candidates"]
    top = [x for x in rows if "retrained" in x]
    fig, axes = plt.subplots(1, 2 if top else 1, figsize=(12 if top else 6.5, 4.5), squeeze=False)
    ax = axes[0][0]
    ax.scatter([x["decode_s"] * 1e3 for x in rows], [x["loss"] for x in rows], s=18,
               c=["C3" if x["pareto"] else "C0" for x in rows])
    front = sorted((x for x in rows if x["pareto"]), key=lambda x: x["decode_s"])
    ax.plot([x["decode_s"] * 1e3 for x in front], [x["loss"] for x in front], "C3--",
            label="Pareto front")
    lat = result["latency"]
    ax.set_xlabel(f"ms per decode step (batch {lat['batch_size']}, context {lat['context']})")
    ax.set_ylabel("zero-shot held-out loss")
    ax.set_title(lat["source"], fontsize=8)
    ax.legend()
    if top:
        ax = axes[0][1]
        i = range(len(top))
        ax.plot(i, [x["retrained"]["loss_before"] for x in top], "o-", label="pruned")
        ax.plot(i, [x["retrained"]["loss_after"] for x in top], "s-",
                label=f"after {result['retrain']['retrain_steps']} distillation steps")
        ax.set_xticks(list(i), [x["name"] for x in top], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("validation loss (distill_data)")
        rho = result["retrain"]["rank_correlation"]
        ax.set_title("by zero-shot rank" + (f"; rank correlation {rho:.2f}" if rho is not None
                                            else ""))
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.partial.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _print(result: dict, top: int, out_path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    rows, budget = result["candidates"][:top], result["budget"]
    within = [f"{_fmt(budget)} ± {result['tolerance']:.0%}"] if budget else []
    within += [f"{result['budget_latency'] * 1e3:.3g} ms/step"] if result["budget_latency"] else []
    within += [f"{result['budget_memory'] / 2 ** 30:.3g} GiB"] if result["budget_memory"] else []
    lo, hi = result["held_out_rows"]
    t = Table(title=f"candidates within {', '.join(within)} (from "
                    f"{_fmt(result['original_params'])}), by zero-shot loss on rows {lo}..{hi} "
                    f"of {result['data']} ({result['seq_length']} tokens each); latency: "
                    f"{result['latency']['source']}")
    retrained = "retrain" in result
    cols = ["rank", "ffn", "heads", "hidden", "layers", "params", "ms/step", "GiB", "pareto",
            "loss", "ppl"] + (["loss before", "loss after", "rank after"] if retrained else [])
    for col in cols:
        t.add_column(col, justify="right")
    for i, x in enumerate(rows):
        after = x.get("retrained")
        t.add_row(str(i + 1), *(str(x[k]) for k in TARGETS), _fmt(x["params"]),
                  f"{x['decode_s'] * 1e3:.3g}", f"{x['memory_bytes'] / 2 ** 30:.3g}",
                  "*" if x["pareto"] else "", f"{x['loss']:.4f}", f"{x['ppl']:.2f}",
                  *([f"{after['loss_before']:.4f}", f"{after['loss_after']:.4f}",
                     str(after["rank"])] if after else ["", "", ""])[:3 * retrained])
    Console(width=200).print(t)
    for i, x in enumerate(rows):  # plain print: exact, copyable lines
        print(f"{i + 1}: {x['prune_command']}")
    for reason in sorted({s["reason"] for s in result["skipped"]}):
        print(f"skipped {sum(s['reason'] == reason for s in result['skipped'])} grid point(s): "
              f"{reason}")
    if retrained:
        rt = result["retrain"]
        rho = rt["rank_correlation"]
        print(f"retrained the best {rt['retrain_top']} for {rt['retrain_steps']} steps each "
              f"({rt['retrain_dir']}); rank correlation zero-shot vs after: "
              + ("n/a" if rho is None else f"{rho:.2f}"))
    chosen = next(x for x in result["candidates"] if x["name"] == result["chosen"])
    print(f"chosen: {chosen['name']} ({_fmt(chosen['params'])}, "
          + (f"loss {chosen['retrained']['loss_after']:.4f} after retraining)"
             if "retrained" in chosen else f"zero-shot loss {chosen['loss']:.4f})"))
    print(f"all candidates: {out_path} (plot: {out_path.with_suffix('.png')})")
