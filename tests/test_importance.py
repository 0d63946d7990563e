"""Importance scores: equal to a plain reference on transformers, equal at TP/PP/DP, and useful."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from pare_nemo.data import DataError, load_token_data
from pare_nemo.importance import KEYS, importance, load_scores
from tests.dist_workers import spawn

N, HELD, S = 12, 6, 48


def reference_scores(hf_path, data, held, seq="mean", batch="l2"):
    """The seeds' definitions computed directly on transformers' Olmo3ForCausalLM with hooks."""
    model = AutoModelForCausalLM.from_pretrained(hf_path).eval()
    layers = model.model.layers
    L = len(layers)
    acts = {k: [[] for _ in range(L)] for k in ("mlp", "attn", "attn_ln", "ffn_ln")}
    bi = [[] for _ in range(L)]
    hooks = []
    for i, layer in enumerate(layers):
        hooks += [
            layer.mlp.down_proj.register_forward_pre_hook(
                lambda m, a, i=i: acts["mlp"][i].append(a[0])),
            layer.self_attn.o_proj.register_forward_pre_hook(
                lambda m, a, i=i: acts["attn"][i].append(a[0])),
            layer.post_attention_layernorm.register_forward_hook(
                lambda m, a, o, i=i: acts["attn_ln"][i].append(o)),
            layer.post_feedforward_layernorm.register_forward_hook(
                lambda m, a, o, i=i: acts["ffn_ln"][i].append(o)),
            layer.register_forward_hook(
                lambda m, a, k, o, i=i: bi[i].append(1 - F.cosine_similarity(
                    k.get("hidden_states", a[0] if a else None), o, dim=-1)), with_kwargs=True),
        ]
    with torch.no_grad():
        model(data.tokens)
    for h in hooks:
        h.remove()
    mask = data.mask.double()  # [N, S]

    def agg(a):  # a: [N, S, C]
        a = a.double()
        per = ((a.abs() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True) if seq == "mean"
               else ((a.square() * mask[..., None]).sum(1)).sqrt())
        return per.norm(dim=0) if batch == "l2" else per.mean(0)

    d = model.config.head_dim
    out = {
        "mlp": torch.stack([agg(acts["mlp"][i][0]) for i in range(L)]),
        "attention": torch.stack([agg(acts["attn"][i][0]).view(-1, d).norm(dim=-1) for i in range(L)]),
        "attn_ln": sum(agg(acts["attn_ln"][i][0]) for i in range(L)),
        "ffn_ln": sum(agg(acts["ffn_ln"][i][0]) for i in range(L)),
        "layer": torch.stack([(bi[i][0].double() * mask).sum() / mask.sum() for i in range(L)]),
    }

    def loss():
        with torch.no_grad():
            logits = model(held.tokens).logits.double()
        m = (held.mask[:, 1:] & held.mask[:, :-1]).double()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), held.tokens[:, 1:].flatten(),
                              reduction="none").view_as(m)
        return ((nll * m).sum() / m.sum()).item()

    base, skipped = loss(), []
    for i in range(L):
        original = layers[i].forward
        layers[i].forward = lambda hidden_states, *a, **k: hidden_states
        skipped.append(loss() - base)
        layers[i].forward = original
    out["layer_loss"] = torch.tensor(skipped)
    return out


@pytest.fixture(scope="module")
def calib(hf_gqa):
    tok = AutoTokenizer.from_pretrained(hf_gqa)
    data = load_token_data("pydoc", tok, N + HELD, S, pack=False)  # with padding
    assert (~data.mask).any() and data.mask.any(dim=1).all()
    return data


def _check(scores, ref, rtol=1e-5):
    for k in KEYS:
        got, want = scores[k].double(), ref[k].double()
        assert got.shape == want.shape, k
        if k == "layer_loss":  # a difference of losses: absolute tolerance
            assert (got - want).abs().max() <= 1e-5, (k, got, want)
        else:
            rel = ((got - want).abs() / want.abs().clamp_min(1e-12)).max()
            assert rel <= rtol, (k, rel)


@pytest.mark.parametrize("seq,batch", [("mean", "l2"), ("l2", "mean")])
def test_scores_equal_reference(tmp_path, hf_gqa, megatron_gqa, calib, seq, batch):
    path = importance(megatron_path=str(megatron_gqa), data="pydoc",
                      scores_path=str(tmp_path / "s.pt"), num_samples=N, seq_length=S,
                      micro_batch_size=2, seq=seq, batch=batch, layer_loss_samples=HELD, pack=False,
                      report=False)
    scores = load_scores(path)  # weights_only=True
    ref = reference_scores(hf_gqa, calib[:N], calib[N:], seq, batch)
    _check(scores, ref)
    meta = scores["metadata"]
    assert meta["num_samples"] == N and meta["num_tokens"] == int(calib[:N].mask.sum())
    assert meta["aggregation"] == {"seq": seq, "batch": batch}
    assert meta["layer_types"] == ["sliding_attention"] * 3 + ["full_attention"]
    assert meta["data_sha256"] == calib[:N].sha256() and meta["seq_length"] == S


def _importance_worker(tp, pp, ckpt, out):
    importance(megatron_path=ckpt, data="pydoc", scores_path=out, num_samples=N, seq_length=S,
               micro_batch_size=1, tp=tp, pp=pp, layer_loss_samples=HELD, pack=False, report=False)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (1, 1)])  # (1, 1) on 2 processes: DP=2
def test_parallel_scores_equal_tp1(tmp_path, megatron_gqa, tp, pp):
    ref = load_scores(importance(megatron_path=str(megatron_gqa), data="pydoc",
                                 scores_path=str(tmp_path / "ref.pt"), num_samples=N, seq_length=S,
                                 layer_loss_samples=HELD, pack=False, report=False))
    spawn(_importance_worker, 2, tp, pp, str(megatron_gqa), str(tmp_path / "par.pt"), tmp=tmp_path)
    scores = load_scores(tmp_path / "par.pt")
    assert scores["metadata"]["parallel"] == {"tp": tp, "pp": pp, "dp": 2 // (tp * pp)}
    _check(scores, ref)


def _loss_with_ffn_removed(hf_path, held, remove: torch.Tensor):
    """LM loss of the HF model with the given FFN neurons (bool [L, ffn]) removed."""
    model = AutoModelForCausalLM.from_pretrained(hf_path).eval()
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.mlp.down_proj.weight[:, remove[i]] = 0
        return model(held, labels=held).loss.item()


def test_importance_beats_reverse_and_random_on_trained_model(tmp_path, trained):
    scores = load_scores(importance(megatron_path=str(trained["mg"]), data="pydoc",
                                    scores_path=str(tmp_path / "s.pt"), num_samples=64,
                                    seq_length=64, layer_loss_samples=16))
    mlp = scores["mlp"]
    k = int(0.1 * mlp.shape[1])
    order = mlp.argsort(dim=1)
    least = torch.zeros_like(mlp, dtype=torch.bool).scatter(1, order[:, :k], True)
    most = torch.zeros_like(mlp, dtype=torch.bool).scatter(1, order[:, -k:], True)
    rand = torch.zeros_like(mlp, dtype=torch.bool).scatter(
        1, torch.rand(mlp.shape, generator=torch.Generator().manual_seed(0)).argsort(1)[:, :k], True)
    held = trained["held"]
    base = _loss_with_ffn_removed(trained["hf"], held, torch.zeros_like(least))
    inc = {name: _loss_with_ffn_removed(trained["hf"], held, m) - base
           for name, m in (("least", least), ("most", most), ("random", rand))}
    assert inc["least"] < 0.25 * inc["most"], inc
    assert inc["least"] < inc["random"], inc
    assert (tmp_path / "s.png").stat().st_size > 10_000 and (tmp_path / "s.md").exists()


def test_bad_input(tmp_path, megatron_gqa):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    ck = str(megatron_gqa)
    with pytest.raises(DataError):
        importance(megatron_path=ck, data=str(empty), scores_path=str(tmp_path / "a.pt"),
                   num_samples=4, seq_length=16)
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": "some words here"}\n{"text": ""}\n')
    with pytest.raises(DataError, match="sample 1 .* all padding"):
        importance(megatron_path=ck, data=str(blank), scores_path=str(tmp_path / "a.pt"),
                   num_samples=2, seq_length=16, pack=False, layer_loss_samples=0)
    with pytest.raises(DataError, match="gives only .* samples .* 100064 were asked.*num_samples=100000.*layer_loss_samples=64"):
        importance(megatron_path=ck, data="pydoc", scores_path=str(tmp_path / "a.pt"),
                   num_samples=100000, seq_length=512)
    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text('{"text": "fine"}\n{"prompt": "no text here"}\n')
    with pytest.raises(DataError, match=r"record 1: a record has neither 'text' nor 'messages' "
                                        r"\(its keys: \[.*'prompt'.*\]\); records need one of them$"):
        importance(megatron_path=ck, data=str(nokey), scores_path=str(tmp_path / "a.pt"),
                   num_samples=2, seq_length=16)
    with pytest.raises(ValueError, match=r"seq_length=4096 is longer than the model's context "
                                         r"\(max_position_embeddings=1024\)"):
        importance(megatron_path=ck, data="pydoc", scores_path=str(tmp_path / "a.pt"),
                   seq_length=4096)
    with pytest.raises(FileNotFoundError, match="Megatron checkpoint .*nope does not exist"):
        importance(megatron_path=str(tmp_path / "nope"), data="pydoc",
                   scores_path=str(tmp_path / "a.pt"))
    with pytest.raises(ValueError, match="aggregation"):
        importance(megatron_path=ck, data="pydoc", scores_path=str(tmp_path / "a.pt"), seq="max")
    with pytest.raises(FileNotFoundError, match="not a Pare checkpoint"):
        importance(megatron_path=str(tmp_path), data="pydoc", scores_path=str(tmp_path / "a.pt"))
    (tmp_path / "a.pt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=true"):
        importance(megatron_path=ck, data="pydoc", scores_path=str(tmp_path / "a.pt"),
                   seq_length=64)
    with pytest.raises(ValueError, match="tp=3 does not divide"):
        importance(megatron_path=ck, data="pydoc", scores_path=str(tmp_path / "b.pt"), tp=3,
                   seq_length=64)
    assert not (tmp_path / "b.pt").exists()


def test_chat_data_uses_chat_template(tmp_path, hf_gqa):
    tok = AutoTokenizer.from_pretrained(hf_gqa)
    f = tmp_path / "chat.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "hi"}, '
                 '{"role": "assistant", "content": "hello there"}]}\n')
    data = load_token_data(str(f), tok, 1, 64, pack=False)
    text = tok.decode(data.tokens[0][data.mask[0]])
    assert text.startswith("<|im_start|>user\nhi<|im_end|>")


def test_hooks_refuse_sequence_parallel():
    """Under sequence parallelism the hooks would see [s/tp, b, h] shards: refused, clearly."""
    from types import SimpleNamespace

    from pare_nemo.importance import ImportanceHooks

    model = SimpleNamespace(config=SimpleNamespace(sequence_parallel=True))
    with pytest.raises(NotImplementedError, match="sequence_parallel=False"):
        ImportanceHooks(model)
