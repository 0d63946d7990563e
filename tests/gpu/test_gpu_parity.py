"""Pare's Megatron Olmo 3 vs transformers (SDPA) on a GPU, on a random 1.17B Olmo-3-shaped model
(16 layers, hidden 2048, 16 heads / 8 KV heads, FFN 5632, vocabulary 100278; 3 sliding : 1 full,
window 4096, YaRN on full layers), at S = 4096 and S = 8192 (where the sliding window matters and
Pare's sliding layers run FlexAttention). The weights go through Pare's own path: the HF model is
saved, imported with ``conversion.convert.import_hf`` and loaded with ``load_model``.

Tolerances. The bf16 weights are the same in every run; the fp32 runs use them upcast. (Both
transformers models are loaded with ``from_pretrained(dtype=...)``: a model cast with ``.to(bf16)``
also rounds its RoPE ``inv_freq`` buffers to bf16, and then differs from fp32 by ~0.3 in the logits
even after ``.float()``.)

- fp32, Pare vs transformers: the same function with different summation orders (fused QKV, flash /
  Flex kernels vs SDPA's); fp32 rounding (6e-8 relative) summed over ~10^4-term dot products and 16
  layers stays ~1e-5..1e-4 on logits of std ~1. Bounds: max |diff| <= 1e-2, loss within 1e-4.
- bf16: each implementation rounds differently (bf16 keeps 8 bits: 4e-3 relative per rounding), so
  neither equals the other; each is compared with the fp32 reference instead. Pare's error may be
  at most 1.5x transformers' own mean error and 2x its max error (+1e-3). Directly, the LM losses
  of the two bf16 models (mean over the S - 1 next-token predictions, ~12 here) differ by <= 0.01
  (~0.1%): per-logit errors of ~1e-2 of either sign average out over thousands of tokens (expected
  ~1e-3).
"""

import pytest
import torch
import torch.nn.functional as F

from tests.gpu import olmo3_config, randomize_norms, require_cuda

require_cuda()

SEQS = (4096, 8192)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    from transformers import Olmo3ForCausalLM

    from conversion.convert import import_hf
    from pare_nemo.checkpoint import load_model
    from pare_nemo.parallel import distributed

    root = tmp_path_factory.mktemp("gpu_parity")
    cfg = olmo3_config()
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = Olmo3ForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    randomize_norms(hf).to(torch.bfloat16).save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    del hf
    ckpt = import_hf(str(root / "hf"), str(root / "mg"))

    def load_hf(dtype):  # as users load it: RoPE buffers stay fp32 (``.to(bf16)`` rounds them)
        return Olmo3ForCausalLM.from_pretrained(root / "hf", dtype=dtype,
                                                attn_implementation="sdpa").cuda().eval()

    with distributed(1, 1):
        mg16, _ = load_model(ckpt, dtype=torch.bfloat16)
        mg32, _ = load_model(ckpt, dtype=torch.float32)
        yield dict(cfg=cfg, hf16=load_hf(torch.bfloat16), hf32=load_hf(torch.float32),
                   mg16=mg16, mg32=mg32)


def lm_loss(logits, tokens):
    return F.cross_entropy(logits[0, :-1].float(), tokens[0, 1:]).item()


@pytest.mark.parametrize("seq", SEQS)
def test_logits_match_transformers(models, seq):
    from pare_nemo.engine import forward_logits

    v = models["cfg"].vocab_size
    g = torch.Generator(device="cuda").manual_seed(seq)
    tokens = torch.randint(0, v, (1, seq), device="cuda", generator=g)
    with torch.no_grad():
        ref = models["hf32"](tokens).logits.float()
        ref_loss = lm_loss(ref, tokens)

        def vs_ref(logits):
            d = (logits.float() - ref).abs()
            return d.max().item(), d.mean().item(), lm_loss(logits, tokens) - ref_loss

        hf16 = models["hf16"](tokens).logits
        hf_err = vs_ref(hf16)
        mg16 = forward_logits(models["mg16"], tokens)[..., :v]
        mg_err = vs_ref(mg16)
        d = (mg16.float() - hf16.float()).abs()
        direct = d.max().item(), d.mean().item(), lm_loss(mg16, tokens) - lm_loss(hf16, tokens)
        del hf16, mg16, d
        mg32_err = vs_ref(forward_logits(models["mg32"], tokens)[..., :v])
    print(f"\nS={seq}: loss (fp32 transformers) {ref_loss:.4f}")
    print(f"  {'':34s} {'max |dlogits|':>14s} {'mean |dlogits|':>15s} {'d loss':>10s}")
    for name, (mx, mean, dl) in (("Pare bf16 vs transformers bf16", direct),
                                 ("transformers bf16 vs fp32 ref", hf_err),
                                 ("Pare bf16 vs fp32 ref", mg_err),
                                 ("Pare fp32 vs fp32 ref", mg32_err)):
        print(f"  {name:34s} {mx:14.3e} {mean:15.3e} {dl:10.2e}")
    assert mg32_err[0] <= 1e-2 and abs(mg32_err[2]) <= 1e-4
    assert mg_err[1] <= 1.5 * hf_err[1] + 1e-3
    assert mg_err[0] <= 2 * hf_err[0] + 1e-3
    assert abs(direct[2]) <= 0.01
