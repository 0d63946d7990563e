"""Bad input gets a clear error before any work starts, and nothing half-written is left behind."""

import json
import shutil

import pytest

from pare_nemo.olmo3 import bridge
from conversion.convert import CheckpointError, export_hf, import_hf


@pytest.fixture
def hf_copy(tmp_path, hf_gqa):
    d = tmp_path / "hf"
    shutil.copytree(hf_gqa, d)
    return d


def _no_output(tmp_path, name="out"):
    return not (tmp_path / name).exists() and not list(tmp_path.glob(f".{name}.partial"))


def test_not_olmo3(tmp_path, hf_copy):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="LlamaForCausalLM.*Olmo3ForCausalLM"):
        import_hf(str(hf_copy), str(tmp_path / "out"))
    assert _no_output(tmp_path)


def test_missing_dir_and_config(tmp_path, hf_copy):
    with pytest.raises(CheckpointError, match="does not exist"):
        import_hf(str(tmp_path / "nope"), str(tmp_path / "out"))
    (hf_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        import_hf(str(hf_copy), str(tmp_path / "out"))
    assert _no_output(tmp_path)


def test_missing_weights(tmp_path, hf_copy):
    (hf_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        import_hf(str(hf_copy), str(tmp_path / "out"))


def test_missing_shard_listed_in_index(tmp_path, hf_copy):
    (hf_copy / "model.safetensors").rename(hf_copy / "model-00001-of-00002.safetensors")
    (hf_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.norm.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="missing weight file.*00002"):
        import_hf(str(hf_copy), str(tmp_path / "out"))


def test_missing_tensor_and_wrong_shape(tmp_path, hf_copy):
    from safetensors.torch import load_file, save_file

    tensors = load_file(hf_copy / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if k != "lm_head.weight"},
              hf_copy / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing.*lm_head.weight"):
        import_hf(str(hf_copy), str(tmp_path / "out"))
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:-1]
    save_file(tensors, hf_copy / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected shapes.*lm_head.weight"):
        import_hf(str(hf_copy), str(tmp_path / "out"))
    assert _no_output(tmp_path)


@pytest.mark.parametrize("damage", ["garbage_header", "truncated"])
def test_corrupted_safetensors(tmp_path, hf_copy, damage):
    f = hf_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(b"\xff" * 16 + data[16:] if damage == "garbage_header" else data[:-1000])
    with pytest.raises(CheckpointError, match="corrupted"):
        import_hf(str(hf_copy), str(tmp_path / "out"))
    assert _no_output(tmp_path)


def test_existing_output_refused_unless_overwrite(tmp_path, hf_gqa, megatron_gqa):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=true"):
        import_hf(str(hf_gqa), str(out))
    assert (out / "keep.txt").exists()
    with pytest.raises(FileExistsError, match="overwrite=true"):
        export_hf(str(megatron_gqa), str(out))
    import_hf(str(hf_gqa), str(out), overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "iter_0000000").is_dir()


def test_crash_leaves_nothing(tmp_path, hf_gqa, monkeypatch):
    import conversion.convert as convert

    def boom(*a, **k):
        raise RuntimeError("simulated crash while saving")

    monkeypatch.setattr(convert, "save_model", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        import_hf(str(hf_gqa), str(tmp_path / "out"))
    assert _no_output(tmp_path)


def test_export_of_non_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Pare checkpoint"):
        export_hf(str(tmp_path), str(tmp_path / "out"))


def test_parallel_sizes_that_do_not_divide(hf_gqa):
    from transformers import Olmo3Config

    cfg = Olmo3Config.from_pretrained(hf_gqa)  # 4 heads, 2 KV heads, 4 layers
    bridge.check_parallel_sizes(cfg, 2, 2)
    with pytest.raises(ValueError, match="tp=4 does not divide num_key_value_heads=2"):
        bridge.check_parallel_sizes(cfg, 4, 1)
    with pytest.raises(ValueError, match="pp=3 does not divide num_hidden_layers=4"):
        bridge.check_parallel_sizes(cfg, 1, 3)
    with pytest.raises(ValueError, match="tp=3 does not divide num_attention_heads=4"):
        bridge.check_parallel_sizes(cfg, 3, 1)


def test_world_size_must_fit_parallel_sizes():
    from pare_nemo.parallel import distributed

    with pytest.raises(ValueError, match="world size 1 is not divisible by tp\\*pp = 2"):
        with distributed(2, 1):
            pass
