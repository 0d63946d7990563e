"""Pare's Megatron Olmo 3 is ready to train: RoPE stays fp32 under megatron's bf16 wrapper, and one
backward step gives transformers' gradients (fp32, <= 1e-5 relative) with and without activation
recompute, at TP=1 and at TP=2 / PP=2 / TP=2 + sequence parallelism.

Relative difference of a gradient = max |g - g_ref| / max |g_ref|, per tensor. fp32 sums in another
order differ by ~1e-7 relative; 1e-5 leaves room for that and still catches any real mistake
(a dropped or doubled term, a TP-scaled backward, a wrong norm gradient are all >= 1e-2).
"""

import pytest
import torch

from pare_nemo.olmo3 import bridge
from pare_nemo.parallel import distributed
from tests.dist_workers import spawn
from tests.training_workers import grads_worker, megatron_grads

S, N = 24, 2  # 3x the sliding window of the tiny model (8), 2 micro-batches
TOL = 1e-5


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 500, (N, S), generator=g)
    mask = torch.ones(N, S, dtype=torch.bool)
    mask[1, -5:] = False  # padding at the end of the second row: excluded from the loss
    return tokens, mask


@pytest.fixture(scope="module")
def hf_grads(hf_gqa, batch):
    """transformers' gradients of the summed next-token NLL."""
    from transformers import Olmo3ForCausalLM

    from pare_nemo.losses import next_token_nll

    tokens, mask = batch
    hf = Olmo3ForCausalLM.from_pretrained(hf_gqa, dtype=torch.float32)
    nll, _ = next_token_nll(hf(tokens).logits, tokens, mask, hf.config.vocab_size)
    nll.backward()
    return hf.config, {n: p.grad for n, p in hf.named_parameters()}


@pytest.fixture(scope="module")
def tp1_grads(megatron_gqa, batch):
    with distributed(1, 1):
        return megatron_grads(megatron_gqa, *batch)


def compare_to_hf(mg, hf_config, hf):
    """Largest relative difference over every HF tensor; Megatron's vocab padding rows get zero."""
    worst = 0.0
    for mname, hnames, kind in bridge.expand(hf_config.num_hidden_layers):
        if kind == "vocab":
            assert mg[mname][hf_config.vocab_size:].abs().max() == 0, mname
        for h, g in zip(hnames, bridge.to_hf(kind, mg[mname], hf_config)):
            d = rel(g, hf[h])
            assert d <= TOL, f"{mname} -> {h}: relative difference {d:.2e}"
            worst = max(worst, d)
    return worst


# ---------------------------------------------------------------- RoPE in bf16


def test_rope_stays_fp32_under_float16module(megatron_gqa):
    """megatron's Float16Module casts the model to bf16; RoPE frequencies must stay fp32 (in bf16
    the angle at position 4096 is off by up to 1.7 rad), and bf16 logits stay near fp32 ones far
    into the sequence."""
    from megatron.core.transformer.module import Float16Module

    from pare_nemo.checkpoint import load_model
    from pare_nemo.olmo3.model import rope_for_layer_type

    s = 1000
    tokens = torch.randint(0, 500, (1, s), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(s)[None]
    with distributed(1, 1), torch.no_grad():
        fp32, hf_config = load_model(megatron_gqa, dtype=torch.float32)
        model, _ = load_model(megatron_gqa, dtype=torch.float32)
        bf16 = Float16Module(bridge.megatron_config(hf_config, dtype=torch.bfloat16), model)
        assert next(model.parameters()).dtype == torch.bfloat16
        for layer in model.decoder.layers:
            inv_freq, _ = rope_for_layer_type(model.config, layer.layer_type)
            angles = torch.outer(torch.arange(s, dtype=torch.float32), inv_freq)
            freqs = layer.rotary_freqs(s, "cpu")
            assert layer.inv_freq.dtype == freqs.dtype == torch.float32
            assert torch.equal(freqs[:, 0, 0], torch.cat([angles, angles], -1))

        v = hf_config.vocab_size
        ref = fp32(input_ids=tokens, position_ids=pos, attention_mask=None)[..., :v].log_softmax(-1)
        out = bf16(input_ids=tokens, position_ids=pos, attention_mask=None)
        diff = (out[..., :v].float().log_softmax(-1) - ref).abs().amax(-1)[0]
    # bf16 keeps 8 mantissa bits: ~0.03 on these log-probs at every position (measured); a
    # position-dependent error (RoPE in low precision) would grow along the sequence.
    early, late = diff[:128].max().item(), diff[-128:].max().item()
    assert early <= 0.1 and late <= 0.1, (early, late)


# ---------------------------------------------------------------- gradients at TP=1


# config overrides; forward runs per micro-batch of layers 0 and 3, their MLPs and core attentions
RUNS = ("decoder.layers.0", "decoder.layers.3", "decoder.layers.0.mlp", "decoder.layers.3.mlp",
        "decoder.layers.0.self_attention.core_attention",
        "decoder.layers.3.self_attention.core_attention")
RECOMPUTE = {
    "full_uniform": (dict(recompute_granularity="full", recompute_method="uniform",
                          recompute_num_layers=1), (2, 2, 2, 2, 2, 2)),
    "full_block": (dict(recompute_granularity="full", recompute_method="block",
                        recompute_num_layers=2), (2, 1, 2, 1, 2, 1)),  # layers 0-1 only
    "selective": (dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp"]),
                  (1, 1, 2, 2, 2, 2)),
}


def test_grads_match_transformers(tp1_grads, hf_grads):
    worst = compare_to_hf(tp1_grads, *hf_grads)
    print(f"TP=1 vs transformers: max relative gradient difference {worst:.2e}")


@pytest.mark.parametrize("recompute", list(RECOMPUTE))
def test_grads_with_activation_recompute(recompute, megatron_gqa, batch, tp1_grads, hf_grads):
    """megatron's full recompute (TransformerBlock reruns Olmo3TransformerLayers in backward) and
    selective recompute (SelfAttention's core attention, the layer's MLP) give the same gradients,
    and really recompute (forward runs counted)."""
    overrides, runs = RECOMPUTE[recompute]
    counts = {}
    with distributed(1, 1):
        grads = megatron_grads(megatron_gqa, *batch, counts=counts, **overrides)
    assert [counts[k] for k in RUNS] == [N * r for r in runs]
    worst = compare_to_hf(grads, *hf_grads)
    same = max(rel(grads[n], tp1_grads[n]) for n in grads)
    print(f"{recompute}: vs transformers {worst:.2e}, vs no recompute {same:.2e}")
    assert same <= TOL


def test_unsupported_selective_recompute_is_refused(megatron_gqa):
    from pare_nemo.checkpoint import load_model

    with distributed(1, 1), pytest.raises(ValueError, match="do not apply"):
        load_model(megatron_gqa, recompute_granularity="selective",
                   recompute_modules=["layernorm"])


# ---------------------------------------------------------------- gradients across TP / PP


PARALLEL = {
    "tp2": (2, 1, {}),
    "pp2": (1, 2, {}),
    "tp2_sequence_parallel": (2, 1, dict(sequence_parallel=True)),
}


_RUNS = {}


def parallel_grads(case, ckpt, batch, tmp_path_factory):
    """{"grads": ..., "megatron_finalize": ...} of one run of 2 processes, once per case."""
    if case not in _RUNS:
        tp, pp, overrides = PARALLEL[case]
        out = tmp_path_factory.mktemp(case)
        spawn(grads_worker, 2, tp, pp, str(ckpt), *batch, str(out), overrides, tmp=out)
        _RUNS[case] = {}
        for kind in ("grads", "megatron_finalize"):
            if (out / f"{kind}0.pt").exists():
                _RUNS[case][kind] = {}
                for stage in range(pp):
                    _RUNS[case][kind] |= torch.load(out / f"{kind}{stage}.pt")
    return _RUNS[case]


def relative_diffs(grads, ref):
    assert grads.keys() == ref.keys()
    return {n: rel(grads[n], ref[n]) for n in grads}


@pytest.mark.parametrize("case", list(PARALLEL))
def test_grads_across_parallelism(case, megatron_gqa, batch, tp1_grads, tmp_path_factory):
    """Each TP rank computes the loss once on the full logits and backprops it: the gradients must
    not come out scaled by TP. The QK norm's all-reduced sum of squares must backprop exactly into
    its weight (replicated; each rank's gradient covers its heads' slice, summed over TP as
    finalize_model_grads does). Under sequence parallelism the norms' gradients are summed over TP
    too, see training_workers.megatron_grads."""
    diffs = relative_diffs(parallel_grads(case, megatron_gqa, batch, tmp_path_factory)["grads"],
                           tp1_grads)
    worst = max(diffs, key=diffs.get)
    print(f"{case}: max relative gradient difference vs TP=1 {diffs[worst]:.2e} ({worst})")
    assert diffs[worst] <= TOL, f"{case}: {worst} differs by {diffs[worst]:.2e}"


def test_megatron_finalize_sums_sequence_parallel_norm_grads(megatron_gqa, batch, tp1_grads,
                                                             tmp_path_factory):
    """megatron's own TP all-reduce (finalize_model_grads) completes the sequence-parallel RMS norm
    gradients and the QK norms' gradients."""
    run = parallel_grads("tp2_sequence_parallel", megatron_gqa, batch, tmp_path_factory)
    diffs = relative_diffs(run["megatron_finalize"], tp1_grads)
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= TOL, f"{worst} differs by {diffs[worst]:.2e}"


def test_megatron_finalize_keeps_qk_norm_grads(megatron_gqa, batch, tp1_grads, tmp_path_factory):
    """megatron's finalize_model_grads sums every '*q_layernorm*'/'*k_layernorm*' gradient over TP
    (config.qk_layernorm, which SelfAttention needs to build the spec's QK norms). Olmo3QKNorm's
    weight is replicated full-size and each rank's gradient covers only its heads' slice, so that
    sum is the exact gradient, the same on every TP rank (checked in the worker). (With TP-sharded
    weights, different heads' gradients were added: 0.4-1.2 relative error.)"""
    run = parallel_grads("tp2", megatron_gqa, batch, tmp_path_factory)
    diffs = relative_diffs(run["megatron_finalize"], tp1_grads)
    worst = max(diffs, key=diffs.get)
    qk = max(d for n, d in diffs.items() if "q_layernorm" in n or "k_layernorm" in n)
    print(f"tp2 + finalize_model_grads: QK norms {qk:.2e}, all {diffs[worst]:.2e} ({worst})")
    assert diffs[worst] <= TOL, f"{worst} differs by {diffs[worst]:.2e}"
