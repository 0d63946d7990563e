"""Unstructured and N:M sparsity (seeds 003 and 004): zero a fraction of the weights of every
decoder linear layer (``linear_qkv``, ``linear_proj``, ``linear_fc1``, ``linear_fc2``; not the
embeddings, the output layer or the norms) of a Megatron checkpoint, at any TP/PP/DP.

| method      | score of weight (i, j)           | calibration                   |
|-------------|----------------------------------|-------------------------------|
| `magnitude` | abs(W_ij)                        | none                          |
| `wanda`     | abs(W_ij) * norm of input j      | sum of squares per input      |
| `sparsegpt` | W_ij^2 / [H^-1]_jj, then the OBS | H = sum x x^T over the inputs |
|             | update of the row's other weights|                               |

Which weights go: ``pattern=unstructured`` zeroes the lowest-scoring ``sparsity`` fraction of each
output row (``wanda``, the comparison group Wanda found best), of the whole matrix
(``magnitude``, the papers' baseline) or of each 128-column block (``sparsegpt``, its adaptive
mask); ``pattern=2:4`` (any ``N:M``) zeroes the N lowest of every M consecutive weights along
the input dimension, the layout sparse tensor cores run (``sparsity`` is then N/M).

The statistics come from one forward-only pass of the dense model over calibration rows, read as
``pare importance`` reads them (Wanda's way; SparseGPT's layer-by-layer variant, which feeds each
layer the already-sparse layers' outputs, is not done). Exact at any TP/PP: each linear's inputs are
gathered to their full width (a row-parallel layer's input is split over TP), its statistics are
summed over the data-parallel ranks, and the first TP rank computes the mask on the full (TP=1)
weight and sends it to the others, each keeping its shard, so the masks do not depend on the
layout. SparseGPT holds every layer's
``H`` (input width squared, fp32) of its pipeline stage from the calibration pass on: ~22 GB for
Olmo 3 7B at PP=1 (PP=2 halves it).

Output: the sparse checkpoint (same architecture; a copy of a pruned source's ``prune_plan.json``
so distillation pairs its layers as before), ``sparsity_mask.safetensors`` (the kept weights,
bit-packed, in TP=1 layout, keyed by the Megatron parameter name with the global layer number) and
``sparsity.json`` (method, pattern, measured sparsity per layer, held-out loss before and after).
``pare distill mask=<checkpoint>`` keeps the zeros (:class:`Mask`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pare_nemo.config import SparsifyConfig, need

LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
           "mlp.linear_fc2")
ROW_PARALLEL = ("self_attention.linear_proj", "mlp.linear_fc2")  # input split over TP
MASK_FILE = "sparsity_mask.safetensors"
REPORT_FILE = "sparsity.json"
BLOCK = 128  # SparseGPT's column block (its lazy batched updates and adaptive mask)


def full_shapes(hf_config) -> dict[str, tuple[int, int]]:
    """Each decoder linear's full (TP=1) Megatron weight shape, by parameter name."""
    c = hf_config
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_layer = {
        "self_attention.linear_qkv": ((c.num_attention_heads + 2 * c.num_key_value_heads) * d,
                                      c.hidden_size),
        "self_attention.linear_proj": (c.hidden_size, c.num_attention_heads * d),
        "mlp.linear_fc1": (2 * c.intermediate_size, c.hidden_size),
        "mlp.linear_fc2": (c.hidden_size, c.intermediate_size),
    }
    return {key(i, n): s for i in range(c.num_hidden_layers) for n, s in per_layer.items()}


def key(layer: int, linear: str) -> str:
    return f"decoder.layers.{layer}.{linear}.weight"


# ---------------------------------------------------------------- the masks (full tensors)


def lowest(score: torch.Tensor, fraction: float, dim: int | None) -> torch.Tensor:
    """Bool mask of the ``fraction`` lowest scores: of each slice along ``dim`` (None: all)."""
    out = torch.zeros_like(score, dtype=torch.bool)
    if dim is None:
        k = int(score.numel() * fraction)
        if k:
            out.view(-1)[score.flatten().topk(k, largest=False).indices] = True
        return out
    k = int(score.shape[dim] * fraction)
    if k:
        out.scatter_(dim, score.topk(k, dim=dim, largest=False).indices, True)
    return out


def lowest_n_of_m(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask of the n lowest scores of every m consecutive columns."""
    rows, cols = score.shape
    need(cols % m == 0, f"a weight's {cols} input columns do not split into groups of {m}")
    groups = score.reshape(rows, cols // m, m)
    out = torch.zeros_like(groups, dtype=torch.bool)
    out.scatter_(2, groups.topk(n, dim=2, largest=False).indices, True)
    return out.reshape(rows, cols)


def prune_by_score(w: torch.Tensor, score: torch.Tensor, sparsity: float, nm, per_row: bool):
    """(w with its lowest-scoring weights zeroed, the kept mask)."""
    pruned = (lowest_n_of_m(score, *nm) if nm else
              lowest(score, sparsity, 1 if per_row else None))
    return w.masked_fill(pruned, 0), ~pruned


def sparsegpt(w: torch.Tensor, hessian: torch.Tensor, sparsity: float, nm=None,
              damp: float = 0.01, block: int = BLOCK):
    """SparseGPT (Frantar & Alistarh 2023): prune columns left to right by the OBS saliency
    ``w^2 / [H^-1]_jj`` and spread each pruned weight's error over the row's later columns through
    the upper Cholesky factor of ``H^-1``. ``hessian`` = sum of x x^T over the calibration inputs.
    Returns (the sparse weight in ``w``'s dtype, the kept mask)."""
    W = w.detach().float().clone()
    H = hessian.detach().float().clone()
    cols = W.shape[1]
    dead = H.diagonal() == 0  # inputs that never fired: their weights cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(damp * H.diagonal().mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for a in range(0, cols, block):
        b = min(a + block, cols)
        W1, H1 = W[:, a:b].clone(), hinv[a:b, a:b]
        d = H1.diagonal()
        err = torch.zeros_like(W1)
        p1 = pruned[:, a:b]
        if nm is None:
            p1 |= lowest(W1.square() / d.square(), sparsity, None)
        for i in range(b - a):
            if nm is not None and i % nm[1] == 0:
                p1[:, i:i + nm[1]] = lowest_n_of_m(
                    W1[:, i:i + nm[1]].square() / d[i:i + nm[1]].square(), *nm)
            col = W1[:, i]
            q = col.masked_fill(p1[:, i], 0)
            e = (col - q) / d[i]
            W1[:, i:] -= e[:, None] * H1[i, i:][None, :]
            W1[:, i] = q
            err[:, i] = e
        W[:, a:b] = W1
        W[:, b:] -= err @ hinv[a:b, b:]
    W.masked_fill_(pruned, 0)
    return W.to(w.dtype), ~pruned


# ---------------------------------------------------------------- calibration statistics


class Statistics:
    """Forward pre-hooks on this rank's decoder linears: per input channel sums of squares
    (``wanda``) or ``sum x x^T`` (``sparsegpt``) over real tokens, at the input's full width."""

    def __init__(self, model, method: str):
        from megatron.core import parallel_state as ps

        if model.config.sequence_parallel:
            raise NotImplementedError("sparsify reads whole sequences on every TP rank: load the "
                                      "model with sequence_parallel=False")
        self.method, self.mask, self.handles, self.stats = method, None, [], {}
        self.tp_group = ps.get_tensor_model_parallel_group() if dist.is_initialized() else None
        self.tp = ps.get_tensor_model_parallel_world_size() if dist.is_initialized() else 1
        for layer in model.decoder.layers:
            for name in LINEARS:
                module = layer.get_submodule(name)
                k = key(layer.layer_number - 1, name)
                self.handles.append(module.register_forward_pre_hook(
                    self._hook(k, name in ROW_PARALLEL)))

    def set_mask(self, mask: torch.Tensor) -> None:
        self.mask = mask.t().reshape(-1)  # [s * b]: the [s, b, h] activations' rows

    def _hook(self, k: str, split: bool):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])[self.mask.to(args[0].device)].float()
            if split and self.tp > 1:  # this rank holds a slice of the input channels
                parts = [torch.empty_like(x) for _ in range(self.tp)]
                dist.all_gather(parts, x.contiguous(), group=self.tp_group)
                x = torch.cat(parts, dim=1)
            s = x.square().sum(0) if self.method == "wanda" else x.t() @ x
            self.stats[k] = s if k not in self.stats else self.stats[k] + s
        return hook

    def finish(self) -> dict[str, torch.Tensor]:
        """The statistics summed over the data-parallel ranks."""
        from megatron.core import parallel_state as ps

        for h in self.handles:
            h.remove()
        if dist.is_initialized():
            for k in sorted(self.stats):
                dist.all_reduce(self.stats[k], group=ps.get_data_parallel_group())
        return self.stats


# ---------------------------------------------------------------- the stage


def sparsify(cfg: SparsifyConfig | None = None, **flat) -> str:
    """Zero a fraction of every decoder linear's weights (Wanda, SparseGPT or magnitude)."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from pare_nemo import checkpoint as ck
    from pare_nemo.data import NotEnoughData, load_token_data
    from pare_nemo.engine import data_parallel_share, forward_loss, run_forward
    from pare_nemo.parallel import distributed
    from pare_nemo.prune import PLAN_FILE, full_tensor, local_shard

    cfg = SparsifyConfig.of(cfg, **flat)
    # ---- everything checked before any work
    nm = cfg.check()
    rows = cfg.rows
    inputs = [cfg.megatron_path]
    ck.check_output_dir(cfg.save_path, cfg.overwrite, inputs)
    hf_config, padded, dtype = ck.read_model_config(cfg.megatron_path)
    dp = cfg.parallel.check(hf_config)
    rows.check(hf_config, dp=dp, whole=False)
    cfg.text.check()
    if nm:
        bad = {k: s for k, s in full_shapes(hf_config).items() if s[1] % nm[1]}
        need(not bad, f"pattern={cfg.pattern}: input widths not divisible by {nm[1]}: "
                      f"{sorted({s[1] for s in bad.values()})}")
    calibrate = cfg.method != "magnitude"
    tokenizer = AutoTokenizer.from_pretrained(Path(cfg.megatron_path) / ck.TOKENIZER_DIR)
    n_calib = rows.num_samples  # held-out rows come after them whatever the method
    try:
        data = load_token_data(cfg.text.data, tokenizer, n_calib + cfg.held_out_samples,
                               rows.seq_length, pack=cfg.text.pack, split=cfg.text.split)
    except NotEnoughData as e:
        raise NotEnoughData(f"{e} (num_samples={n_calib} to calibrate + held_out_samples="
                            f"{cfg.held_out_samples} for the loss before and after)") from None
    calib, held = data[:n_calib], data[n_calib:]
    mbs = rows.micro_batch_size

    def mine(d):  # this DP rank's rows that fill micro-batches
        share = data_parallel_share(d)
        return share[: len(share) // mbs * mbs]

    with distributed(cfg.parallel.tp, cfg.parallel.pp), \
            ck.atomic_output_dir(cfg.save_path, cfg.overwrite, inputs) as tmp:
        rank0 = dist.get_rank() == 0
        model, _ = ck.load_model(cfg.megatron_path, parallel_output=True)
        model.eval()
        held_rows = mine(held)

        def loss() -> float:
            if not cfg.held_out_samples:
                return float("nan")
            s, n = forward_loss(model, held_rows.tokens, held_rows.mask, mbs,
                                hf_config.vocab_size)
            return s / n

        before = loss()
        t0 = time.perf_counter()
        stats = {}
        if calibrate:
            hooks = Statistics(model, cfg.method)
            calib_rows = mine(calib)

            def step(mb):
                hooks.set_mask(mb.mask)
                return lambda logits: (logits.new_zeros(()), {})

            run_forward(model, calib_rows.tokens, calib_rows.mask, mbs, step)
            stats = hooks.finish()
        masks, per_layer = {}, {}
        layers = list(model.decoder.layers)
        with torch.no_grad():
            for layer in tqdm(layers, desc=f"sparsify ({cfg.method})", disable=not rank0):
                i = layer.layer_number - 1
                for name in LINEARS:
                    k = key(i, name)
                    param = layer.get_submodule(name).weight
                    w = full_tensor(param, k)
                    new, kept = _on_first_tp_rank(
                        w, lambda: sparsify_weight(w, stats.get(k), cfg.method, cfg.sparsity, nm,
                                                   cfg.damp))
                    param.copy_(local_shard(new.to(param.dtype), param, k))
                    masks[k] = pack(kept)  # 1 bit a weight from here on
                    per_layer[k] = 1 - kept.float().mean().item()
        seconds = time.perf_counter() - t0
        after = loss()
        ck.save_model(model, tmp, hf_config, padded, dtype)
        masks = _gather_stages(masks)
        per_layer = _gather_stages(per_layer)
        if rank0:
            shutil.copytree(Path(cfg.megatron_path) / ck.TOKENIZER_DIR, tmp / ck.TOKENIZER_DIR)
            if (Path(cfg.megatron_path) / PLAN_FILE).exists():
                shutil.copy(Path(cfg.megatron_path) / PLAN_FILE, tmp / PLAN_FILE)
            meta = {"method": cfg.method, "sparsity": cfg.sparsity, "pattern": cfg.pattern,
                    "source": str(cfg.megatron_path)}
            save_masks(masks, tmp / MASK_FILE, meta)
            total = sum(math.prod(shape) for _, shape in masks.values())
            zeros = sum(per_layer[k] * math.prod(shape) for k, (_, shape) in masks.items())
            report = meta | {
                "measured_sparsity": zeros / total, "weights": total,
                "loss_before": before, "loss_after": after,
                "held_out_samples": cfg.held_out_samples, "calibration_samples": n_calib,
                "seq_length": rows.seq_length, "data": cfg.text.data, "seconds": seconds,
                "parallel": {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "dp": dp},
                "per_linear": per_layer}
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1))
            print(f"sparsify {cfg.method} {cfg.pattern}: {zeros / total:.1%} of {total:,} decoder "
                  f"linear weights are zero; held-out loss {before:.4f} -> {after:.4f} (PPL "
                  f"{math.exp(before):.2f} -> {math.exp(after):.2f}) on "
                  f"{cfg.held_out_samples} rows x {rows.seq_length}")
    return str(cfg.save_path)


def sparsify_weight(w: torch.Tensor, stat, method: str, sparsity: float, nm, damp: float = 0.01):
    """(the sparse full weight, its kept mask) by one method."""
    if method == "sparsegpt":
        return sparsegpt(w, stat, sparsity, nm, damp)
    wf = w.float()
    score = wf.abs() if method == "magnitude" else wf.abs() * stat.sqrt()[None, :]
    return prune_by_score(w, score, sparsity, nm, per_row=method == "wanda")


def _on_first_tp_rank(w: torch.Tensor, compute):
    """``compute()`` -> (sparse weight, kept mask) on the first rank of the TP group, sent to
    the others: every rank keeps its shard of the very same tensors."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized() or ps.get_tensor_model_parallel_world_size() == 1:
        return compute()
    group = ps.get_tensor_model_parallel_group()
    if ps.get_tensor_model_parallel_rank() == 0:
        new, kept = compute()
        kept = kept.to(torch.uint8)
    else:
        new, kept = torch.empty_like(w), torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    src = dist.get_process_group_ranks(group)[0]
    dist.broadcast(new, src=src, group=group)
    dist.broadcast(kept, src=src, group=group)
    return new, kept.bool()


def _gather_stages(d: dict) -> dict:
    """The union of every pipeline stage's dict, on every rank of the pipeline group."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized() or ps.get_pipeline_model_parallel_world_size() == 1:
        return d
    parts = [None] * ps.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(parts, d, group=ps.get_pipeline_model_parallel_group())
    return {k: v for p in parts for k, v in p.items()}


def zero_fraction(model) -> float:
    """The fraction of a Megatron model's decoder linear weights that are exactly zero (all
    ranks' shards; the same on every rank)."""
    from pare_nemo.parallel import device

    t = torch.zeros(2, dtype=torch.float64, device=device())
    for layer in model.decoder.layers:
        for name in LINEARS:
            w = layer.get_submodule(name).weight
            t += torch.tensor([float((w == 0).sum()), float(w.numel())], dtype=torch.float64,
                              device=t.device)
    if dist.is_initialized():
        from megatron.core import parallel_state as ps

        dist.all_reduce(t, group=ps.get_model_parallel_group())
    return float(t[0] / t[1]) if t[1] else 0.0


# ---------------------------------------------------------------- the mask file


def pack(kept: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """(a bool mask bit-packed into uint8, its shape)."""
    return torch.from_numpy(np.packbits(kept.cpu().numpy().reshape(-1))), list(kept.shape)


def save_masks(masks: dict[str, tuple[torch.Tensor, list[int]]], path: Path, meta: dict) -> None:
    """The packed kept masks (:func:`pack`), their shapes in the file's metadata."""
    from safetensors.torch import save_file

    shapes = {k: shape for k, (_, shape) in masks.items()}
    save_file({k: bits for k, (bits, _) in masks.items()}, str(path),
              metadata={"pare": json.dumps(meta | {"shapes": shapes})})


def mask_file(path: str | Path) -> Path:
    """The mask file itself, or the one in a sparse checkpoint's folder."""
    p = Path(path)
    f = p / MASK_FILE if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"mask={path}: no {MASK_FILE} there (pare sparsify writes one "
                                "into its output checkpoint)")
    return f


def mask_metadata(path: str | Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(mask_file(path)), "pt") as f:
        return json.loads(f.metadata()["pare"])


def check_mask_fits(path: str | Path, hf_config) -> dict:
    """The mask's metadata; a ValueError unless it covers exactly this model's decoder linears."""
    meta = mask_metadata(path)
    want = {k: list(s) for k, s in full_shapes(hf_config).items()}
    got = meta["shapes"]
    wrong = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
    need(not wrong, f"mask={path} does not fit this student: {len(wrong)} weight(s) differ, e.g. "
                    f"{wrong[0] if wrong else ''}: mask {got.get(wrong[0]) if wrong else ''} vs "
                    f"model {want.get(wrong[0]) if wrong else ''}")
    return meta


def load_masks(path: str | Path, keys) -> dict[str, torch.Tensor]:
    """Full (TP=1) bool kept masks of ``keys``."""
    from safetensors import safe_open

    shapes = mask_metadata(path)["shapes"]
    out = {}
    with safe_open(str(mask_file(path)), "pt") as f:
        for k in keys:
            n = math.prod(shapes[k])
            bits = np.unpackbits(f.get_tensor(k).numpy())[:n]
            out[k] = torch.from_numpy(bits.astype(bool)).reshape(shapes[k])
    return out


class Mask:
    """The kept masks of this rank's shards of a model being trained (megatron's DDP chunks):
    gradients are zeroed where weights were pruned before each update and the weights re-zeroed
    after it, so a pruned weight stays exactly zero (Adam's moments of a weight whose gradient is
    always zero stay zero: no update reaches it)."""

    def __init__(self, path: str | Path, chunks):
        from pare_nemo.prune import local_shard

        self.path, self.params = str(path), []
        found = []
        for module in chunks:
            while hasattr(module, "module"):
                module = module.module
            for layer in module.decoder.layers:
                found += [(key(layer.layer_number - 1, name), layer.get_submodule(name).weight)
                          for name in LINEARS]
        full = load_masks(path, [k for k, _ in found])
        self.params = [(k, p, local_shard(full[k], p, k).to(p.device)) for k, p in found]
        self.weights()

    def grads(self) -> None:
        for _, p, kept in self.params:
            grad = getattr(p, "main_grad", None)
            if grad is not None:
                grad.masked_fill_(~kept, 0)
            if p.grad is not None:
                p.grad.masked_fill_(~kept, 0)

    def weights(self) -> None:
        with torch.no_grad():
            for _, p, kept in self.params:
                p.masked_fill_(~kept, 0)

    def integrity(self) -> dict:
        """Pruned weights that are not zero (all ranks' shards; the same on every rank)."""
        from pare_nemo.parallel import device

        counts = torch.zeros(2, dtype=torch.float64, device=device())
        largest = torch.zeros(1, dtype=torch.float64, device=device())
        for _, p, kept in self.params:
            off = p.detach()[~kept].double()
            counts += torch.stack([torch.tensor(off.numel(), device=counts.device),
                                   (off != 0).sum().to(counts.device)]).double()
            if off.numel():
                largest = torch.maximum(largest, off.abs().max().reshape(1).to(largest.device))
        if dist.is_initialized():  # every shard once: over the model-parallel (TP x PP) group
            from megatron.core import parallel_state as ps

            dist.all_reduce(counts, group=ps.get_model_parallel_group())
            dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=ps.get_model_parallel_group())
        t = counts.tolist() + largest.tolist()
        return {"mask": self.path, "pruned_weights": int(t[0]), "nonzero_pruned": int(t[1]),
                "max_abs_pruned": float(t[2]), "ok": int(t[1]) == 0}
