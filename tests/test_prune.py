"""Structured pruning: every axis gives an HF export equal to the pruned Megatron model, the result
does not depend on TP/PP, and pruning by importance beats random pruning on a trained model."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from conversion.convert import export_hf
from pare_nemo.checkpoint import load_model
from pare_nemo.config import Depth, Targets
from pare_nemo.engine import forward_logits
from pare_nemo.importance import importance, load_scores
from pare_nemo.parallel import distributed
from pare_nemo.prune import num_params, prune
from tests.dist_workers import spawn

AXES = {
    "ffn": dict(target_ffn_hidden_size=160),
    "heads": dict(target_num_attention_heads=2),
    "mha_to_gqa": dict(target_num_attention_heads=4, target_num_query_groups=2),
    "hidden": dict(target_hidden_size=48),
    "depth": dict(target_num_layers=3),
    "drop_list": dict(drop_layers=[0, 2]),
    "combined": dict(target_ffn_hidden_size=128, target_num_attention_heads=2,
                     target_num_query_groups=1, target_hidden_size=48, target_num_layers=3),
}


@pytest.fixture(scope="module")
def trained_scores(tmp_path_factory, trained):
    path = tmp_path_factory.mktemp("scores") / "s.pt"
    return importance(megatron_path=str(trained["mg"]), data="pydoc", scores_path=str(path),
                      num_samples=64, seq_length=64, layer_loss_samples=16, report=False)


def _hf_loss(hf_dir, held):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(hf_dir).eval()(held, labels=held).loss.item()


@pytest.mark.parametrize("axis", list(AXES))
def test_axis_export_matches_megatron(tmp_path, trained, trained_scores, axis):
    out = prune(megatron_path=str(trained["mg"]), scores_path=trained_scores,
                save_path=str(tmp_path / "p"), **AXES[axis])
    hf_dir = export_hf(out, str(tmp_path / "hf"))
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokens = trained["held"][:2]
    with distributed(1, 1):
        mg, cfg = load_model(out)
        logits = forward_logits(mg, tokens)[..., : cfg.vocab_size]
    with torch.no_grad():
        ref = model(tokens).logits
    assert (logits - ref).abs().max() <= 1e-5
    c, kw = model.config, AXES[axis]
    assert c.intermediate_size == kw.get("target_ffn_hidden_size", 256)
    assert c.num_attention_heads == kw.get("target_num_attention_heads", 4)
    assert c.num_key_value_heads == kw.get("target_num_query_groups", c.num_attention_heads)
    assert c.hidden_size == kw.get("target_hidden_size", 64) and c.head_dim == 16
    assert sum(p.numel() for p in model.parameters()) == num_params(c)
    orig_types = ["sliding_attention"] * 3 + ["full_attention"]
    if "drop_layers" in kw:
        assert c.layer_types == [t for i, t in enumerate(orig_types) if i not in kw["drop_layers"]]
    assert c.num_hidden_layers == len(c.layer_types) == kw.get("target_num_layers",
                                                               4 - len(kw.get("drop_layers", [])))


def test_depth_keeps_types_and_protects_full_layers(tmp_path, trained, trained_scores):
    scores = load_scores(trained_scores)
    s = copy.deepcopy(scores)
    s["layer"] = torch.tensor([0.9, 0.8, 0.7, 0.1])  # the full layer (3) scores lowest
    torch.save(s, tmp_path / "s.pt")
    a = export_hf(prune(megatron_path=str(trained["mg"]), scores_path=str(tmp_path / "s.pt"),
                        save_path=str(tmp_path / "a"), target_num_layers=3,
                        layer_metric="layer"), str(tmp_path / "a_hf"))
    b = export_hf(prune(megatron_path=str(trained["mg"]), scores_path=str(tmp_path / "s.pt"),
                        save_path=str(tmp_path / "b"), target_num_layers=3, layer_metric="layer",
                        protect_full_attention=True),
                  str(tmp_path / "b_hf"))
    from transformers import Olmo3Config

    assert Olmo3Config.from_pretrained(a).layer_types == ["sliding_attention"] * 3
    assert Olmo3Config.from_pretrained(b).layer_types == ["sliding_attention"] * 2 + ["full_attention"]


def _prune_worker(tp, pp, ckpt, scores, out, kw):
    prune(megatron_path=ckpt, scores_path=scores, save_path=out, tp=tp, pp=pp, **kw)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_parallel_prune_equals_tp1(tmp_path, trained, trained_scores, tp, pp):
    kw = dict(target_ffn_hidden_size=128, target_num_attention_heads=2, target_hidden_size=48,
              target_num_layers=2)
    ref = export_hf(prune(megatron_path=str(trained["mg"]), scores_path=trained_scores,
                          save_path=str(tmp_path / "ref"), **kw),
                    str(tmp_path / "ref_hf"))
    spawn(_prune_worker, 2, tp, pp, str(trained["mg"]), trained_scores, str(tmp_path / "par"), kw,
          tmp=tmp_path)
    par = export_hf(str(tmp_path / "par"), str(tmp_path / "par_hf"))
    from safetensors.torch import load_file

    a, b = load_file(ref / "model.safetensors"), load_file(par / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_depth_by_importance_is_the_best_single_drop(tmp_path, trained, trained_scores):
    """With 4 layers a random draw often hits the same layer, so compare with every alternative:
    dropping the layer chosen by ``layer_loss`` costs least, clearly below the average drop."""
    held = trained["held"]
    imp = _hf_loss(export_hf(prune(megatron_path=str(trained["mg"]), scores_path=trained_scores,
                                   save_path=str(tmp_path / "imp"), target_num_layers=3,
                                   layer_metric="layer_loss"),
                             str(tmp_path / "imp_hf")), held)
    each = [_hf_loss(export_hf(prune(megatron_path=str(trained["mg"]), scores_path=trained_scores,
                                     save_path=str(tmp_path / f"d{i}"),
                                     drop_layers=[i]), str(tmp_path / f"d{i}_hf")), held)
            for i in range(4)]
    assert imp == pytest.approx(min(each)) and imp + 0.1 < sum(each) / 4, (imp, each)


def test_bad_input(tmp_path, trained, trained_scores, megatron_gqa):
    ck, sc = str(trained["mg"]), trained_scores
    cases = [
        (dict(target_ffn_hidden_size=1000), "target_ffn_hidden_size=1000 must be in"),
        (dict(target_hidden_size=0), "target_hidden_size=0 must be in"),
        (dict(target_num_layers=0), "target_num_layers=0 must be in"),
        (dict(target_num_attention_heads=3, tp=2), "not divisible by tp=2"),
        (dict(target_num_attention_heads=4, target_num_query_groups=3), "not a multiple"),
        (dict(drop_layers=[5]), r"drop_layers \[5\] out of range"),
        (dict(target_num_layers=3, layer_metric="random"), "layer_metric"),
        (dict(target_ffn_hidden_size=100, tp=2, target_num_layers=3, pp=2), "does not divide"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            prune(megatron_path=ck, scores_path=sc, save_path=str(tmp_path / "out"), **kw)
    with pytest.raises(ValueError, match="another model"):
        prune(megatron_path=str(megatron_gqa), scores_path=sc, save_path=str(tmp_path / "out"),
              target_ffn_hidden_size=64)
    scores = load_scores(sc)
    scores["mlp"] = scores["mlp"][:, :10]
    torch.save(scores, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"scores\['mlp'\] has shape"):
        prune(megatron_path=ck, scores_path=str(tmp_path / "bad.pt"),
              save_path=str(tmp_path / "out"), target_ffn_hidden_size=64)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=true"):
        prune(megatron_path=ck, scores_path=sc, save_path=str(tmp_path / "exists"),
              target_ffn_hidden_size=64)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*partial"))


def test_block_metric_drops_the_cheapest_contiguous_block(hf_gqa):
    from transformers import Olmo3Config

    from pare_nemo.prune import plan

    cfg = Olmo3Config.from_pretrained(hf_gqa)  # 4 layers, layer 3 is full attention
    scores = {"mlp": torch.rand(4, cfg.intermediate_size), "attention": torch.rand(4, 4),
              "attn_ln": torch.rand(cfg.hidden_size), "ffn_ln": torch.rand(cfg.hidden_size),
              "layer": torch.rand(4), "layer_loss": torch.tensor([0.5, 0.1, 0.2, 0.05])}
    assert plan(cfg, scores, Targets(target_num_layers=2),
                Depth(layer_metric="block")).layers == [0, 1]
    assert plan(cfg, scores, Targets(target_num_layers=2),
                Depth(layer_metric="layer_loss")).layers == [0, 2]
    protected = plan(cfg, scores, Targets(target_num_layers=2),
                     Depth(layer_metric="block", protect_full_attention=True))
    assert protected.layers == [0, 3] and protected.config.layer_types[-1] == "full_attention"
    with pytest.raises(ValueError, match="give target_num_layers or drop_layers"):
        plan(cfg, scores, Targets(target_num_layers=2, drop_layers=[1]))


def test_default_metric_is_layer_loss_and_nan_is_refused(hf_gqa):
    """layer_loss ranks depth by default (as in search); when importance ran with
    layer_loss_samples=0 (NaN) depth pruning by it is refused, width pruning and BI still work."""
    from transformers import Olmo3Config

    from pare_nemo.prune import plan

    cfg = Olmo3Config.from_pretrained(hf_gqa)
    scores = {"mlp": torch.rand(4, cfg.intermediate_size), "attention": torch.rand(4, 4),
              "attn_ln": torch.rand(cfg.hidden_size), "ffn_ln": torch.rand(cfg.hidden_size),
              "layer": torch.tensor([0.1, 0.9, 0.8, 0.7]),
              "layer_loss": torch.tensor([0.5, 0.1, 0.2, 0.3])}
    assert plan(cfg, scores, Targets(target_num_layers=3)).layers == [0, 2, 3]
    scores["layer_loss"] = torch.full((4,), float("nan"))
    for metric in ("layer_loss", "block"):
        with pytest.raises(ValueError, match="layer_loss_samples=0.*layer_metric=layer"):
            plan(cfg, scores, Targets(target_num_layers=3), Depth(layer_metric=metric))
    assert plan(cfg, scores, Targets(target_num_layers=3),
                Depth(layer_metric="layer")).layers == [1, 2, 3]
    assert plan(cfg, scores, Targets(target_ffn_hidden_size=64)).layers == [0, 1, 2, 3]
    assert plan(cfg, scores, Targets(target_num_layers=4)).layers == [0, 1, 2, 3]
