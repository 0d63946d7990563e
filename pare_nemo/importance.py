"""Importance analysis (Minitron step 1): one forward-only pass over calibration data that ranks every
FFN neuron, attention head, embedding channel and layer, with Pare's own hooks on the Megatron model
(Olmo 3 is post-norm: the pre-norm LayerNorm outputs other tools hook do not exist).

| key          | shape                  | definition |
|--------------|------------------------|------------|
| `mlp`        | [n_layers, ffn]        | input of `linear_fc2` (after SwiGLU) |
| `attention`  | [n_layers, n_heads]    | input of `linear_proj` per channel, then L2 over each head's channels |
| `attn_ln`    | [hidden]               | output of each layer's post-attention RMSNorm, summed over layers |
| `ffn_ln`     | [hidden]               | output of each layer's post-feedforward RMSNorm, summed over layers |
| `layer`      | [n_layers]             | Block Influence: 1 - cos(layer input, layer output) per real token, averaged |
| `layer_loss` | [n_layers]             | LM loss increase when only that layer is skipped, on held-out samples |

Activations are aggregated per sample over its real tokens (``seq=mean``: mean of |a|; ``seq=l2``:
L2 norm), then over samples (``batch=l2``: L2 norm; ``batch=mean``: mean). The papers' best, and the
default, is seq=mean then batch=l2. Exact at any TP/PP/DP: every rank accumulates sums (of squares
for L2) that are summed across data-parallel ranks before the final root, and TP / PP pieces are
gathered, never averaged.
"""

import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pare_nemo.config import ImportanceConfig, need
from pare_nemo.engine import run_forward

KEYS = ("mlp", "attention", "attn_ln", "ffn_ln", "layer", "layer_loss")


def config_hash(hf_config) -> str:
    d = hf_config.to_dict()
    for k in ("transformers_version", "dtype", "torch_dtype", "architectures", "_name_or_path"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ImportanceHooks:
    """Forward hooks on this rank's layers; call ``set_mask`` before each micro-batch."""

    def __init__(self, model, seq: str = "mean", batch: str = "l2"):
        if model.config.sequence_parallel:
            raise NotImplementedError(
                "importance hooks need whole sequences on every TP rank; under sequence "
                "parallelism the norms' outputs are [s/tp, b, h] shards. Load the model with "
                "sequence_parallel=False for importance (its results do not depend on it)")
        self.seq, self.batch = seq, batch
        self.layers = list(model.decoder.layers)
        n = len(self.layers)
        first = self.layers[0]
        dev = first.post_attention_layernorm.weight.device
        zeros = lambda *s: torch.zeros(*s, dtype=torch.float64, device=dev)  # noqa: E731
        self.mlp = zeros(n, first.mlp.linear_fc2.weight.shape[1])
        self.attn = zeros(n, first.self_attention.linear_proj.weight.shape[1])
        self.attn_ln = zeros(n, first.post_attention_layernorm.weight.shape[0])
        self.ffn_ln = zeros(n, first.post_feedforward_layernorm.weight.shape[0])
        self.bi_sum = zeros(n)
        self.samples = zeros(())
        self.tokens = zeros(())
        self.mask = None
        self.handles = []
        for i, layer in enumerate(self.layers):
            self.handles += [
                layer.mlp.linear_fc2.register_forward_pre_hook(self._input_hook(self.mlp, i)),
                layer.self_attention.linear_proj.register_forward_pre_hook(
                    self._input_hook(self.attn, i)),
                layer.post_attention_layernorm.register_forward_hook(
                    self._output_hook(self.attn_ln, i)),
                layer.post_feedforward_layernorm.register_forward_hook(
                    self._output_hook(self.ffn_ln, i)),
                layer.register_forward_hook(self._bi_hook(i), with_kwargs=True),
            ]

    def set_mask(self, mask: torch.Tensor):
        """mask: [b, s] bool of real tokens for the micro-batch about to run on this stage."""
        self.mask = mask.to(self.bi_sum.device)
        self.m = self.mask.t().unsqueeze(-1).to(torch.float32)  # [s, b, 1]
        self.n = self.mask.sum(1, keepdim=True).to(torch.float32)  # [b, 1]
        self.all_real = bool(self.mask.all())
        self.samples += mask.shape[0]
        self.tokens += self.mask.sum()

    def _aggregate(self, buf, i, a):
        # a: [s, b, C]; per sample over its real tokens: mean |a| (seq=mean) or L2 norm (seq=l2)
        order = 1 if self.seq == "mean" else 2
        if self.all_real:  # packed data: one fused pass, no |a| or mask product materialized
            per_sample = torch.linalg.vector_norm(a, ord=order, dim=0, dtype=torch.float32)
        else:
            per_sample = torch.linalg.vector_norm(a * self.m.to(a.dtype), ord=order, dim=0,
                                                  dtype=torch.float32)
        if self.seq == "mean":
            per_sample = per_sample / self.n  # [b, C]
        buf[i] += (per_sample.square() if self.batch == "l2" else per_sample).sum(0).double()

    def _input_hook(self, buf, i):
        def hook(module, args):
            self._aggregate(buf, i, args[0])
        return hook

    def _output_hook(self, buf, i):
        def hook(module, args, output):
            self._aggregate(buf, i, output)
        return hook

    def _bi_hook(self, i):
        def hook(module, args, kwargs, output):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos = F.cosine_similarity(x.float(), output[0].float(), dim=-1)  # [s, b]
            self.bi_sum[i] += ((1 - cos) * self.m[..., 0]).sum().double()
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()

    def finish(self, num_heads_local: int) -> dict[str, torch.Tensor]:
        """Reduce across DP, take the final roots/means, gather TP and PP pieces."""
        from megatron.core import parallel_state as ps

        bufs = [self.mlp, self.attn, self.attn_ln, self.ffn_ln, self.bi_sum, self.samples,
                self.tokens]
        if dist.is_initialized():
            for b in bufs:
                dist.all_reduce(b, group=ps.get_data_parallel_group())
        final = (lambda b: b.sqrt()) if self.batch == "l2" else (lambda b: b / self.samples)
        mlp = final(self.mlp)
        attn = final(self.attn).view(len(self.layers), num_heads_local, -1).norm(dim=-1)
        tp = ps.get_tensor_model_parallel_group() if dist.is_initialized() else None
        pp = ps.get_pipeline_model_parallel_group() if dist.is_initialized() else None
        out = {
            "mlp": _gather(_gather(mlp, tp, 1), pp, 0),
            "attention": _gather(_gather(attn, tp, 1), pp, 0),
            "attn_ln": _gather(final(self.attn_ln), pp, 0).sum(0),
            "ffn_ln": _gather(final(self.ffn_ln), pp, 0).sum(0),
            "layer": _gather(self.bi_sum / self.tokens, pp, 0),
        }
        out = {k: v.float().cpu() for k, v in out.items()}
        return out | {"_samples": int(self.samples.item()), "_tokens": int(self.tokens.item())}


def _gather(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def set_skip(model, global_layer: int | None) -> None:
    """Skip exactly one layer (by global index) on whichever stage holds it; None skips none."""
    for layer in model.decoder.layers:
        layer.skip = layer.layer_number - 1 == global_layer


def importance(cfg: ImportanceConfig | None = None, **flat) -> str:
    """Score every FFN neuron, head, hidden channel and layer of a Megatron checkpoint."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from pare_nemo.checkpoint import TOKENIZER_DIR, check_output_dir, load_model, read_model_config
    from pare_nemo.data import NotEnoughData, load_token_data
    from pare_nemo.engine import data_parallel_share, forward_loss
    from pare_nemo.parallel import distributed

    cfg = ImportanceConfig.of(cfg, **flat)
    rows, text, agg = cfg.rows, cfg.text, cfg.aggregation
    # ---- everything checked before any work
    agg.check()
    need(cfg.layer_loss_samples >= 0, "layer_loss_samples must be >= 0")
    hf_config, _, _ = read_model_config(cfg.megatron_path)
    dp = cfg.parallel.check(hf_config)
    rows.check(hf_config, dp=dp, whole=False)
    text.check()
    scores_path = check_output_dir(cfg.scores_path, cfg.overwrite)
    tokenizer = AutoTokenizer.from_pretrained(Path(cfg.megatron_path) / TOKENIZER_DIR)
    try:
        all_data = load_token_data(text.data, tokenizer, rows.num_samples + cfg.layer_loss_samples,
                                   rows.seq_length, pack=text.pack, split=text.split)
    except NotEnoughData as e:
        raise NotEnoughData(f"{e} (num_samples={rows.num_samples} for the scores + "
                            f"layer_loss_samples={cfg.layer_loss_samples} held out for "
                            "layer_loss)") from None
    calib, held_out = all_data[:rows.num_samples], all_data[rows.num_samples:]
    mbs = rows.micro_batch_size

    def whole_micro_batches(data):  # this DP rank's rows that fill micro-batches
        mine = data_parallel_share(data)
        return mine[: len(mine) // mbs * mbs]

    with distributed(cfg.parallel.tp, cfg.parallel.pp):
        model, _ = load_model(cfg.megatron_path, parallel_output=True)
        model.eval()
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        mine = whole_micro_batches(calib)

        hooks = ImportanceHooks(model, agg.seq, agg.batch)
        t0 = time.perf_counter()
        with tqdm(total=len(mine) * dp, desc="importance", unit="sample", disable=not rank0) as bar:
            bar.update(0)
            progress = _Scaled(bar, dp)

            def step(mb):  # the hooks record; the logits are dropped at once
                hooks.set_mask(mb.mask)
                return lambda logits: (logits.new_zeros(()), {})

            run_forward(model, mine.tokens, mine.mask, mbs, step, progress)
        hooks.remove()
        heads_local = hf_config.num_attention_heads // cfg.parallel.tp
        scores = hooks.finish(heads_local)
        pass_s = time.perf_counter() - t0

        base_loss = float("nan")
        layer_loss = torch.full((hf_config.num_hidden_layers,), float("nan"))
        if cfg.layer_loss_samples:
            held = whole_micro_batches(held_out)
            need(len(held) > 0, f"layer_loss_samples={cfg.layer_loss_samples} leaves no held-out "
                                f"micro-batch for each of {dp} data-parallel ranks")

            def loss() -> float:
                s, n = forward_loss(model, held.tokens, held.mask, mbs, hf_config.vocab_size)
                return s / n

            base_loss = loss()
            for i in tqdm(range(hf_config.num_hidden_layers), desc="layer_loss",
                          disable=not rank0):
                set_skip(model, i)
                layer_loss[i] = loss() - base_loss
            set_skip(model, None)
        scores["layer_loss"] = layer_loss

        if rank0:
            meta = metadata(cfg, hf_config, scores, calib, base_loss, dp, pass_s)
            out = {k: scores[k] for k in KEYS} | {"metadata": meta}
            scores_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = scores_path.with_name(f".{scores_path.name}.partial")
            torch.save(out, tmp)
            os.replace(tmp, scores_path)
            if cfg.report:
                write_report(out, scores_path)
        if dist.is_initialized():
            dist.barrier()
    return str(scores_path)


def metadata(cfg: ImportanceConfig, hf_config, scores: dict, calib, base_loss: float, dp: int,
             seconds: float) -> dict:
    """What the scores file records besides the scores (``scores``' sample and token counts are
    taken out of it)."""
    rows, text = cfg.rows, cfg.text
    return {
        "model_config": json.loads(json.dumps(hf_config.to_dict(), default=str)),
        "config_hash": config_hash(hf_config),
        "layer_types": list(hf_config.layer_types),
        "num_samples": scores.pop("_samples"),
        "num_tokens": scores.pop("_tokens"),
        "seq_length": rows.seq_length,
        "data": text.data,
        "data_sha256": calib.sha256(),
        "pack": text.pack,
        "split": text.split,
        # rows 0..num_samples calibrated the scores, the next layer_loss_samples scored
        # layer_loss: held-out evaluation (pare search) starts after rows_used
        "rows_used": rows.num_samples + cfg.layer_loss_samples,
        "aggregation": {"seq": cfg.aggregation.seq, "batch": cfg.aggregation.batch},
        "layer_loss_samples": cfg.layer_loss_samples,
        "base_loss": base_loss,
        "parallel": {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "dp": dp},
        "importance_pass_seconds": seconds,
    }


class _Scaled:
    """A progress bar advanced by samples of all data-parallel ranks (rank 0 counts its own x dp)."""

    def __init__(self, bar, dp):
        self.bar, self.dp = bar, dp

    def update(self, n):
        self.bar.update(n * self.dp)


# ---------------------------------------------------------------- what the user sees


def load_scores(path: str | os.PathLike) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"scores file {path} does not exist (run `pare importance` first)")
    return torch.load(path, weights_only=True)


def keep_counts(mlp: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Neurons each layer keeps if the top ``keep_fraction`` of all neurons are kept by a global
    ranking of per-layer-normalized scores (each layer's scores divided by its mean)."""
    norm = mlp / mlp.mean(dim=1, keepdim=True).clamp_min(1e-30)
    k = max(1, int(round(keep_fraction * norm.numel())))
    threshold = norm.flatten().topk(k).values[-1]
    return (norm >= threshold).sum(dim=1)


def write_report(scores: dict, scores_path: Path, keep_fraction: float = 0.7) -> None:
    """``<scores>.png`` (layer BI and layer_loss by layer, sliding vs full marked; neuron score
    distributions per layer; head heatmap) and ``<scores>.md`` (a short summary)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = scores["metadata"]
    types = meta["layer_types"]
    n = len(types)
    x = list(range(n))
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    colors = ["tab:red" if t == "full_attention" else "tab:blue" for t in types]

    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    ax = axes[0, 0]
    ax.bar(x, scores["layer"].numpy(), color=colors)
    ax.set(title="Block Influence (1 - cos) per layer  [red = full attention, blue = sliding]",
           xlabel="layer", ylabel="BI")
    ax = axes[0, 1]
    ll = scores["layer_loss"].numpy()
    ax.bar(x, ll, color=colors)
    ax.set(title=f"LM loss increase when the layer is skipped (base {meta['base_loss']:.3f})",
           xlabel="layer", ylabel="Δ loss")
    ax = axes[1, 0]
    mlp = scores["mlp"].float()
    ax.boxplot([row.numpy() for row in mlp], positions=x, showfliers=False)
    ax.set_yscale("log")
    ax.set(title="FFN neuron scores per layer", xlabel="layer", ylabel="score")
    ax = axes[1, 1]
    att = scores["attention"].float()
    att = att / att.max(dim=1, keepdim=True).values.clamp_min(1e-30)  # per layer: scales differ a lot
    im = ax.imshow(att.numpy().T, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set(title="attention head scores (each layer divided by its largest)", xlabel="layer",
           ylabel="head")
    fig.colorbar(im, ax=ax, label="score / layer max")
    step = max(1, n // 16)
    for ax in (axes[0, 0], axes[0, 1], axes[1, 1]):
        ax.set_xticks(x[::step])
    axes[1, 0].set_xticks(x[::step], [str(i) for i in x[::step]])
    fig.tight_layout()
    fig.savefig(scores_path.with_suffix(".png"), dpi=90)
    plt.close(fig)

    order_bi = scores["layer"].argsort().tolist()
    lines = [
        f"# Importance summary: {meta['num_samples']} samples x {meta['seq_length']} tokens "
        f"({meta['num_tokens']} real tokens), aggregation seq={meta['aggregation']['seq']}, "
        f"batch={meta['aggregation']['batch']}",
        "",
        f"- data: `{meta['data']}` (sha256 {meta['data_sha256'][:12]}…)",
        f"- full-attention layers: {full}",
        f"- least important layers by Block Influence: {order_bi[:8]}",
    ]
    if not math.isnan(meta["base_loss"]):
        order_ll = scores["layer_loss"].argsort().tolist()
        lines.append(f"- least important layers by layer_loss (base loss {meta['base_loss']:.4f}): "
                     f"{order_ll[:8]}")
    counts = keep_counts(mlp, keep_fraction).tolist()
    lines += ["", f"FFN neurons each layer keeps under a global ranking at {keep_fraction:.0%} of all "
              f"neurons (of {mlp.shape[1]} per layer):", "",
              "| layer | type | BI | Δ loss | neurons kept |", "|---|---|---|---|---|"]
    for i in range(n):
        lines.append(f"| {i} | {types[i].split('_')[0]} | {scores['layer'][i]:.4f} | "
                     f"{scores['layer_loss'][i]:.4f} | {counts[i]} |")
    scores_path.with_suffix(".md").write_text("\n".join(lines) + "\n")
