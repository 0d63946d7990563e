"""The Transformer Engine layer spec (TE linears) computes the same function as the local spec
(megatron-core's linears), when ``transformer_engine`` imports: same weights, bf16 logits and
parameter gradients, each compared with the local spec in fp32.

Tolerances: both bf16 runs round differently, so the TE run's error against the fp32 reference
may be at most 1.5x the local bf16 run's (mean |diff| of logits; relative norm of each gradient
difference), 2x for the max |diff| of logits (+1e-3 on each).
"""

import pytest
import torch
import torch.nn.functional as F

from tests.gpu import olmo3_config, randomize_norms, require_cuda

require_cuda()

from pare_nemo.olmo3.model import have_te  # noqa: E402

if not have_te():
    pytest.skip("transformer_engine does not import (or megatron.core.extensions."
                "transformer_engine does not): nothing to compare", allow_module_level=True)

SEQ = 2048


def test_te_spec_equals_local_spec():
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear

    from pare_nemo.olmo3 import bridge
    from pare_nemo.olmo3.model import build_olmo3_model
    from pare_nemo.parallel import distributed

    cfg = olmo3_config(num_layers=4, hidden_size=1024, num_heads=8, num_kv_heads=4,
                       intermediate_size=2816, vocab_size=32000, sliding_window=1024)
    padded = bridge.padded_vocab_size(cfg.vocab_size)
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (1, SEQ), device="cuda", generator=g)
    positions = torch.arange(SEQ, device="cuda")[None]
    with distributed(1, 1):
        models = {}
        for name, dtype, te in (("local fp32", torch.float32, False),
                                ("local bf16", torch.bfloat16, False),
                                ("TE bf16", torch.bfloat16, True)):
            # unwrapped models backprop here: no fused accumulation into DDP's main_grad
            mcfg = bridge.megatron_config(cfg, dtype=dtype, gradient_accumulation_fusion=False)
            models[name] = build_olmo3_model(mcfg, padded, use_te=te).cuda()
        randomize_norms(models["local bf16"])
        state = models["local bf16"].state_dict()
        assert isinstance(models["TE bf16"].decoder.layers[0].self_attention.linear_qkv,
                          TEColumnParallelLinear)
        missing, unexpected = models["TE bf16"].load_state_dict(state, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing)
        # the fp32 reference: the same (bf16) weights upcast
        models["local fp32"].load_state_dict({k: v.float() if v.is_floating_point() else v
                                              for k, v in state.items()})
        out = {}
        for name, m in models.items():
            logits = m(input_ids=tokens, position_ids=positions, attention_mask=None)
            F.cross_entropy(logits[0, :-1, :cfg.vocab_size].float(), tokens[0, 1:]).backward()
            out[name] = (logits.detach().float(), {n: p.grad.float() for n, p in
                                                   m.named_parameters()})
    ref_logits, ref_grads = out["local fp32"]
    err = {}
    for name in ("local bf16", "TE bf16"):
        logits, grads = out[name]
        d = (logits - ref_logits).abs()
        rel = max(((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm().clamp_min(1e-12)).item()
                  for n in ref_grads)
        err[name] = d.max().item(), d.mean().item(), rel
        print(f"\n{name} vs local fp32: logits max |diff| {err[name][0]:.3e}, mean "
              f"{err[name][1]:.3e}; worst relative gradient error {rel:.3e}")
    te, local = err["TE bf16"], err["local bf16"]
    assert te[0] <= 2 * local[0] + 1e-3
    assert te[1] <= 1.5 * local[1] + 1e-3
    assert te[2] <= 1.5 * local[2] + 1e-3
