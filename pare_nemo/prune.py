"""Structured pruning (Minitron step 2): cut a Megatron Olmo 3 checkpoint down to a target
architecture using importance scores, at any TP/PP, into a checkpoint of the same layout.

Targets use NeMo's PruningConfig names: ``target_ffn_hidden_size``, ``target_num_attention_heads``
(+ ``target_num_query_groups``), ``target_hidden_size``, ``target_num_layers`` or ``drop_layers``.

- FFN: each layer keeps its top-k neurons by ``mlp`` score (gate/up rows, down columns).
- Heads: whole heads (q/k/v rows, o columns, the q/k RMSNorm slices). GQA keeps the same number of
  heads in every group. MHA -> GQA (``target_num_query_groups`` below the head count of an MHA model):
  the kept heads, in their original order, form consecutive groups whose K/V projections and k-norm
  weights are mean-pooled into the group's single KV head.
- Hidden: embedding columns, every projection's hidden dimension, all norms and the output layer,
  by the ``attn_ln + ffn_ln`` ranking.
- Depth: drop the lowest ``layer_loss`` (default; Minitron found LM loss better than BI) or
  ``layer`` (BI) scores, or the contiguous block whose ``layer_loss`` sums lowest
  (``layer_metric=block``), or an explicit ``drop_layers`` list. Remaining layers
  keep their attention type and RoPE; ``protect_full_attention=true`` never drops a full layer.

Pruning works on one layer's full (TP=1 view) tensors at a time in HF layout, so the result does not
depend on the TP/PP it ran at.
"""

import copy
import dataclasses
from dataclasses import dataclass

import torch

from pare_nemo.config import LAYER_METRICS, Depth, PruneConfig, Targets
from pare_nemo.olmo3 import bridge


@dataclass
class Plan:
    """What is kept, in original indices (sorted), and the pruned HF config."""

    layers: list[int]
    ffn: torch.Tensor  # [n_kept_layers, new_ffn] per kept layer
    heads: torch.Tensor  # [n_kept_layers, new_heads] per kept layer
    groups: list[list[int]] | None  # MHA -> GQA: positions (into heads rows) pooled per KV head
    hidden: torch.Tensor  # [new_hidden]
    config: object  # the pruned transformers Olmo3Config


def _check(cond, msg):
    if not cond:
        raise ValueError(msg)


def validate_scores(scores: dict, hf_config) -> None:
    """Scores must come from this model: same config hash and the right shapes."""
    from pare_nemo.importance import config_hash

    meta = scores.get("metadata", {})
    if meta.get("config_hash") != config_hash(hf_config):
        raise ValueError("scores were computed on another model (config hash "
                         f"{meta.get('config_hash')} != {config_hash(hf_config)})")
    c = hf_config
    want = {"mlp": (c.num_hidden_layers, c.intermediate_size),
            "attention": (c.num_hidden_layers, c.num_attention_heads),
            "attn_ln": (c.hidden_size,), "ffn_ln": (c.hidden_size,),
            "layer": (c.num_hidden_layers,), "layer_loss": (c.num_hidden_layers,)}
    for k, shape in want.items():
        got = tuple(scores[k].shape) if k in scores else None
        _check(got == shape, f"scores[{k!r}] has shape {got}, expected {shape} for this model")


def depth_scores(scores: dict, layer_metric: str) -> torch.Tensor:
    """The per-layer scores depth pruning ranks by (``block`` sums ``layer_loss``); a clear error
    where importance did not compute them (``layer_loss`` is NaN after layer_loss_samples=0)."""
    _check(layer_metric in LAYER_METRICS, f"layer_metric must be one of {LAYER_METRICS}")
    key = "layer_loss" if layer_metric == "block" else layer_metric
    _check(not scores[key].isnan().any(),
           f"layer_metric={layer_metric} ranks layers by the scores' {key!r}, which are NaN "
           "(importance ran with layer_loss_samples=0): pass layer_metric=layer, or rerun "
           "importance with layer_loss_samples>0")
    return scores[key]


def plan(hf_config, scores: dict, targets: Targets, depth: Depth | None = None,
         tp: int = 1) -> Plan:
    """Validate targets and decide what to keep. Raises ValueError with the reason."""
    c = hf_config
    depth = depth or Depth()
    t = targets
    layer_metric, protect_full_attention = depth.layer_metric, depth.protect_full_attention
    drop_layers, target_num_layers = t.drop_layers, t.target_num_layers
    L, F, H, nh, ng = (c.num_hidden_layers, c.intermediate_size, c.hidden_size,
                       c.num_attention_heads, c.num_key_value_heads)
    pick = lambda target, default: default if target is None else target  # noqa: E731  (0 is an error)
    ffn = pick(t.target_ffn_hidden_size, F)
    heads = pick(t.target_num_attention_heads, nh)
    groups = pick(t.target_num_query_groups, ng if ng < nh else heads)
    hidden = pick(t.target_hidden_size, H)
    for name, v, full in (("target_ffn_hidden_size", ffn, F), ("target_hidden_size", hidden, H),
                          ("target_num_attention_heads", heads, nh),
                          ("target_num_query_groups", groups, ng)):
        _check(0 < v <= full, f"{name}={v} must be in [1, {full}]")
    for name, v in (("target_ffn_hidden_size", ffn), ("target_hidden_size", hidden),
                    ("target_num_attention_heads", heads), ("target_num_query_groups", groups)):
        _check(v % tp == 0, f"{name}={v} is not divisible by tp={tp}")
    _check(heads % groups == 0, f"target_num_attention_heads={heads} is not a multiple of "
                                f"target_num_query_groups={groups}")
    if ng < nh:  # GQA model: keep the groups, the same number of heads in each
        _check(groups == ng, f"reducing the query groups of a GQA model ({ng}) is not supported")
    depth.check()
    _check(not (drop_layers and target_num_layers is not None),
           "give target_num_layers or drop_layers, not both")

    # depth
    if drop_layers:
        bad = [i for i in drop_layers if not 0 <= i < L]
        _check(not bad, f"drop_layers {bad} out of range [0, {L})")
        dropped = sorted(set(drop_layers))
    elif target_num_layers is not None and target_num_layers != L:
        _check(0 < target_num_layers <= L, f"target_num_layers={target_num_layers} must be in [1, {L}]")
        n_drop = L - target_num_layers
        candidates = [i for i in range(L) if not (protect_full_attention
                                                  and c.layer_types[i] == "full_attention")]
        _check(len(candidates) >= n_drop, f"only {len(candidates)} layers may be dropped "
                                          "(full-attention layers are protected)")
        s = depth_scores(scores, layer_metric)
        if layer_metric == "block":  # the paper's contiguous block, lowest summed layer_loss
            blocks = [list(range(a, a + n_drop)) for a in range(L - n_drop + 1)
                      if all(i in candidates for i in range(a, a + n_drop))]
            _check(blocks, "no contiguous block of droppable layers")
            dropped = min(blocks, key=lambda b: float(s[b].sum()))
        else:
            dropped = sorted(sorted(candidates, key=lambda i: float(s[i]))[:n_drop])
    else:
        dropped = []
    layers = [i for i in range(L) if i not in dropped]
    _check(layers, "pruning would drop every layer")

    def top(score: torch.Tensor, k: int) -> torch.Tensor:
        return score.topk(k).indices.sort().values

    keep_ffn = torch.stack([top(scores["mlp"][i], ffn) for i in layers])
    att = scores["attention"]
    if ng < nh:  # GQA: top heads within each group
        per_old, per_new = nh // ng, heads // ng
        keep_heads = torch.stack([torch.cat([g * per_old + top(att[i, g * per_old:(g + 1) * per_old],
                                                               per_new) for g in range(ng)])
                                  for i in layers])
        pooled = None
    else:
        keep_heads = torch.stack([top(att[i], heads) for i in layers])
        per = heads // groups
        pooled = [list(range(g * per, (g + 1) * per)) for g in range(groups)] if groups < heads \
            else None
    keep_hidden = top(scores["attn_ln"] + scores["ffn_ln"], hidden)

    new = copy.deepcopy(c)
    d = getattr(c, "head_dim", None) or H // nh
    new.head_dim = d
    new.intermediate_size = ffn
    new.num_attention_heads = heads
    new.num_key_value_heads = groups
    new.hidden_size = hidden
    new.num_hidden_layers = len(layers)
    new.layer_types = [c.layer_types[i] for i in layers]
    return Plan(layers, keep_ffn, keep_heads, pooled, keep_hidden, new)


def _rows(idx: torch.Tensor, d: int) -> torch.Tensor:
    """Row indices of whole heads ``idx`` in a [heads * d, ...] projection."""
    return (idx[:, None] * d + torch.arange(d)).flatten()


def prune_layer(hf: dict[str, torch.Tensor], p: Plan, j: int, hf_config) -> dict[str, torch.Tensor]:
    """One layer's HF-layout tensors (names without the ``model.layers.{i}.`` prefix) -> pruned,
    for the ``j``-th kept layer."""
    d = p.config.head_dim
    h, f, heads = p.hidden, p.ffn[j], p.heads[j]
    out = {}
    for n in ("post_attention_layernorm.weight", "post_feedforward_layernorm.weight"):
        out[n] = hf[n][h]
    out["mlp.gate_proj.weight"] = hf["mlp.gate_proj.weight"][f][:, h]
    out["mlp.up_proj.weight"] = hf["mlp.up_proj.weight"][f][:, h]
    out["mlp.down_proj.weight"] = hf["mlp.down_proj.weight"][h][:, f]
    q_rows = _rows(heads, d)
    out["self_attn.q_proj.weight"] = hf["self_attn.q_proj.weight"][q_rows][:, h]
    out["self_attn.q_norm.weight"] = hf["self_attn.q_norm.weight"][q_rows]
    out["self_attn.o_proj.weight"] = hf["self_attn.o_proj.weight"][h][:, q_rows]
    nh, ng = hf_config.num_attention_heads, hf_config.num_key_value_heads
    if ng < nh:  # GQA: the KV heads (groups) all stay
        kv_rows = slice(None)
        k, v = hf["self_attn.k_proj.weight"], hf["self_attn.v_proj.weight"]
        out["self_attn.k_norm.weight"] = hf["self_attn.k_norm.weight"]
    else:  # MHA: the kept heads' K/V
        kv_rows = _rows(heads, d)
        k, v = hf["self_attn.k_proj.weight"][kv_rows], hf["self_attn.v_proj.weight"][kv_rows]
        out["self_attn.k_norm.weight"] = hf["self_attn.k_norm.weight"][kv_rows]
        if p.groups is not None:  # MHA -> GQA: mean-pool each group's K/V heads and k-norm
            def pool(t):
                t = t.reshape(len(heads), d, *t.shape[1:])
                return torch.stack([t[g].mean(0) for g in p.groups]).flatten(0, 1)
            k, v = pool(k), pool(v)
            out["self_attn.k_norm.weight"] = pool(out["self_attn.k_norm.weight"])
    out["self_attn.k_proj.weight"] = k[:, h]
    out["self_attn.v_proj.weight"] = v[:, h]
    return {n: t.contiguous() for n, t in out.items()}


def prune_global(hf: dict[str, torch.Tensor], p: Plan) -> dict[str, torch.Tensor]:
    """Whichever of embedding, final norm and output layer (HF names) this stage holds: their
    hidden dimension (columns; the final norm's elements) keeps ``p.hidden``."""
    return {n: (t[p.hidden] if t.dim() == 1 else t[:, p.hidden]).contiguous() for n, t in hf.items()}


def num_params(hf_config) -> int:
    """Parameters of an Olmo 3 with this config (untied embeddings), from the HF shapes."""
    total = 0
    for shape in bridge.hf_shapes(hf_config).values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


# ---------------------------------------------------------------- on the Megatron model, any TP/PP


def _tp():
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
            ps.get_tensor_model_parallel_group())


def _is_glu(name: str) -> bool:
    return name.endswith("linear_fc1.weight")


def full_tensor(param: torch.Tensor, name: str) -> torch.Tensor:
    """This parameter's full (TP=1 layout) tensor, gathered over the TP group."""
    import torch.distributed as dist

    tp, _, group = _tp()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return param.detach().clone()
    parts = [torch.empty_like(param) for _ in range(tp)]
    dist.all_gather(parts, param.detach().contiguous(), group=group)
    if _is_glu(name):  # each rank holds [gate_r; up_r]
        halves = [p.chunk(2) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(parts, dim=param.partition_dim)


def local_shard(full: torch.Tensor, param: torch.Tensor, name: str) -> torch.Tensor:
    """This rank's shard of a full (TP=1 layout) tensor, laid out like ``param``."""
    tp, r, _ = _tp()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    if _is_glu(name):
        g, u = full.chunk(2)
        return torch.cat([g.chunk(tp)[r], u.chunk(tp)[r]])
    return full.chunk(tp, dim=param.partition_dim)[r]


LAYER_MAPPINGS = [(m.megatron.removeprefix("decoder.layers.{i}."),
                   [h.removeprefix("model.layers.{i}.") for h in m.hf], m.kind)
                  for m in bridge.MAPPINGS if "{i}" in m.megatron]
GLOBAL_MAPPINGS = [(m.megatron, list(m.hf), m.kind) for m in bridge.MAPPINGS if "{i}" not in m.megatron]


def _share_across_stages(tensors: dict | None, owner_stage: int) -> dict:
    """Broadcast one layer's full tensors from the pipeline stage that holds it to the others."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return tensors
    group = ps.get_pipeline_model_parallel_group()
    box = [{k: v.cpu() for k, v in tensors.items()} if tensors is not None else None]
    dist.broadcast_object_list(box, src=dist.get_process_group_ranks(group)[owner_stage],
                               group=group)
    return box[0]


def apply_plan(model, new_model, p: Plan, hf_config) -> None:
    """Fill ``new_model`` (built for ``p.config`` at the same TP/PP) from ``model``."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    pp_group = ps.get_pipeline_model_parallel_group()
    mine = {layer.layer_number - 1: layer for layer in model.decoder.layers}
    owners = [None] * ps.get_pipeline_model_parallel_world_size()
    if len(owners) > 1:
        dist.all_gather_object(owners, sorted(mine), group=pp_group)
    else:
        owners = [sorted(mine)]
    owner_of = {i: s for s, layers in enumerate(owners) for i in layers}
    targets = {layer.layer_number - 1: layer for layer in new_model.decoder.layers}
    for j, i in enumerate(p.layers):  # same order on every rank: the collectives line up
        full = None
        if i in mine:
            params = dict(mine[i].named_parameters())
            full = {name: full_tensor(params[name], name) for name, _, _ in LAYER_MAPPINGS}
        full = _share_across_stages(full, owner_of[i])
        if j not in targets:
            continue
        hf = {}
        for name, hnames, kind in LAYER_MAPPINGS:
            hf |= dict(zip(hnames, bridge.to_hf(kind, full[name], hf_config)))
        pruned = prune_layer(hf, p, j, hf_config)
        dst = dict(targets[j].named_parameters())
        for name, hnames, kind in LAYER_MAPPINGS:
            new_full = bridge.to_megatron(kind, [pruned[h] for h in hnames], p.config)
            dst[name].data.copy_(local_shard(new_full, dst[name], name))
    src, dst = dict(model.named_parameters()), dict(new_model.named_parameters())
    present = [(n, h, k) for n, h, k in GLOBAL_MAPPINGS if n in src]
    hf = {}
    for name, hnames, kind in present:
        hf |= dict(zip(hnames, bridge.to_hf(kind, full_tensor(src[name], name), hf_config)))
    pruned = prune_global(hf, p)
    for name, hnames, kind in present:
        new_full = bridge.to_megatron(kind, [pruned[h] for h in hnames], p.config)
        dst[name].data.copy_(local_shard(new_full, dst[name], name))


def prune(cfg: PruneConfig | None = None, **flat) -> str:
    """Prune a Megatron checkpoint to the target architecture using importance scores."""
    import shutil
    from pathlib import Path

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from pare_nemo import checkpoint as ck
    from pare_nemo.importance import load_scores
    from pare_nemo.olmo3.model import build_olmo3_model
    from pare_nemo.parallel import device, distributed

    cfg = PruneConfig.of(cfg, **flat)
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    # ---- everything checked before any work
    cfg.targets.check()
    inputs = [cfg.megatron_path, cfg.scores_path]
    ck.check_output_dir(cfg.save_path, cfg.overwrite, inputs)
    hf_config, padded, dtype = ck.read_model_config(cfg.megatron_path)
    cfg.parallel.check(hf_config, job=False)
    scores = load_scores(cfg.scores_path)
    validate_scores(scores, hf_config)
    p = plan(hf_config, scores, cfg.targets, cfg.depth, tp)
    cfg.parallel.check(p.config)

    with distributed(tp, pp), ck.atomic_output_dir(cfg.save_path, cfg.overwrite, inputs) as tmp:
        model, _ = ck.load_model(cfg.megatron_path)
        megatron_cfg = bridge.megatron_config(p.config, tp=tp, pp=pp, dtype=dtype,
                                              perform_initialization=False)
        new_model = build_olmo3_model(megatron_cfg, padded,
                                      pre_process=ps.is_pipeline_first_stage(),
                                      post_process=ps.is_pipeline_last_stage()).to(device())
        with torch.no_grad():
            apply_plan(model, new_model, p, hf_config)
        del model
        ck.save_model(new_model, tmp, p.config, padded, dtype)
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if rank0:
            shutil.copytree(Path(cfg.megatron_path) / ck.TOKENIZER_DIR, tmp / ck.TOKENIZER_DIR)
            save_plan(p, tmp / PLAN_FILE, source=cfg.megatron_path, scores=cfg.scores_path,
                      targets={**dataclasses.asdict(cfg.targets),
                               "drop_layers": cfg.targets.drop_layers or None,
                               **dataclasses.asdict(cfg.depth)})
    if rank0:
        print(describe(hf_config, p.config))
    return str(cfg.save_path)


PLAN_FILE = "prune_plan.json"


def save_plan(p: Plan, path, source: str, scores: str, targets: dict) -> None:
    """What was kept, in the original model's indices, beside the pruned checkpoint: distillation
    pairs student layer j with teacher layer ``layers[j]`` and compares hidden states on
    ``hidden`` channels."""
    import json

    path.write_text(json.dumps({
        "source": str(source), "scores": str(scores), "targets": targets,
        "layers": p.layers, "hidden": p.hidden.tolist(), "ffn": p.ffn.tolist(),
        "heads": p.heads.tolist(), "query_groups_pooled": p.groups,
    }))


def load_plan(checkpoint) -> dict | None:
    """The plan ``pare prune`` saved beside a checkpoint (None for an unpruned one)."""
    import json
    from pathlib import Path

    f = Path(checkpoint) / PLAN_FILE
    return json.loads(f.read_text()) if f.exists() else None


def describe(old, new) -> str:
    """``layers 32 -> 24, hidden 4096 -> 3584, …; parameters 7.30B -> 4.51B``."""
    def fmt(n):
        return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"

    fields = [("layers", "num_hidden_layers"), ("hidden", "hidden_size"),
              ("ffn", "intermediate_size"), ("heads", "num_attention_heads"),
              ("query groups", "num_key_value_heads")]
    parts = [f"{label} {getattr(old, f)} -> {getattr(new, f)}" for label, f in fields]
    return (f"pruned: {', '.join(parts)}; parameters {fmt(num_params(old))} -> "
            f"{fmt(num_params(new))}")
