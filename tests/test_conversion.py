"""HF -> Megatron -> HF is bit-identical, loads in transformers, and the checkpoint loads at any TP/PP."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conversion.convert import CheckpointError, export_hf, import_hf
from tests.dist_workers import logits_worker, spawn


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out |= load_file(f)
    return out


def _config(path):
    c = json.loads((path / "config.json").read_text())
    c.pop("transformers_version", None)
    return c


def test_layout(megatron_gqa):
    names = {p.name for p in megatron_gqa.iterdir()}
    assert {"iter_0000000", "latest_checkpointed_iteration.txt", "model_config.json",
            "tokenizer"} <= names
    assert (megatron_gqa / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    assert (megatron_gqa / "tokenizer" / "tokenizer.json").exists()
    assert (megatron_gqa / "iter_0000000" / "metadata.json").exists()
    assert not list(megatron_gqa.parent.glob(".*partial"))


def test_roundtrip_bit_identical(tmp_path, hf_gqa, megatron_gqa):
    out = export_hf(str(megatron_gqa), str(tmp_path / "hf"))
    a, b = _tensors(hf_gqa), _tensors(out)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert _config(hf_gqa) == _config(out)


def test_export_loads_in_transformers(tmp_path, hf_gqa, megatron_gqa, tokens):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_hf(str(megatron_gqa), str(tmp_path / "hf"))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ref = AutoModelForCausalLM.from_pretrained(hf_gqa).eval()
    assert type(model).__name__ == "Olmo3ForCausalLM"
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, ref(tokens).logits)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("def f(x): return x").input_ids == AutoTokenizer.from_pretrained(hf_gqa)(
        "def f(x): return x").input_ids
    assert tok.chat_template


def test_sharded_export(tmp_path, hf_gqa, megatron_gqa):
    out = export_hf(str(megatron_gqa), str(tmp_path / "hf"), max_shard_size=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    a, b = _tensors(hf_gqa), _tensors(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _hf_logits(hf_path, tokens):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(hf_path).eval()(tokens).logits


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_parallel_logits_and_reload(tmp_path, hf_gqa, megatron_gqa, tokens, tp, pp):
    """TP=2 / PP=2 (2 gloo processes) give TP=1's logits; a checkpoint saved there reloads at TP=1
    into exactly the original tensors."""
    saved = tmp_path / f"tp{tp}pp{pp}"
    spawn(logits_worker, 2, tp, pp, str(megatron_gqa), tokens, str(tmp_path / "logits.pt"),
          str(saved), tmp=tmp_path)
    ref = _hf_logits(hf_gqa, tokens)
    out = torch.load(tmp_path / "logits.pt")
    assert (out[..., : ref.shape[-1]] - ref).abs().max() <= 1e-5
    back = export_hf(str(saved), str(tmp_path / "hf"))
    a, b = _tensors(hf_gqa), _tensors(back)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hub_ids_go_through_snapshot_download(tmp_path, hf_gqa, monkeypatch):
    """Local paths are used as they are; ``org/name[@rev]`` is fetched with huggingface_hub (here
    served from a local directory, since no machine of this project reaches the hub)."""
    import huggingface_hub

    from conversion.convert import resolve_hf_path

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, tuple(allow_patterns)))
        return str(hf_gqa)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_hf_path(str(hf_gqa)) == hf_gqa and not calls
    with pytest.raises(CheckpointError, match="./relative/dir does not exist"):
        resolve_hf_path("./relative/dir")  # looks like a path: never sent to the Hub
    import_hf("allenai/Olmo-3-7B-Instruct@main", str(tmp_path / "mg"))
    assert calls[0][:2] == ("allenai/Olmo-3-7B-Instruct", "main")
    assert "*.safetensors" in calls[0][2]
    assert (tmp_path / "mg" / "iter_0000000").is_dir()

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="allenai/nope is not a local directory, and "
                                              "downloading it from the Hugging Face Hub failed"):
        resolve_hf_path("allenai/nope")
