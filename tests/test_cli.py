"""``pare`` and ``nemo llm`` reach the same entrypoints, with key=value arguments."""

import subprocess
import sys

import pytest

from pare_nemo.cli import COMMANDS, main, parse_kwargs, resolve


def test_parse_kwargs_types():
    from conversion.convert import import_hf

    kw = parse_kwargs(import_hf, ["hf_path=/a", "megatron_path=/b", "overwrite=true", "dtype=none"])
    assert kw == {"hf_path": "/a", "megatron_path": "/b", "overwrite": True, "dtype": None}
    with pytest.raises(SystemExit, match="missing required.*megatron_path"):
        parse_kwargs(import_hf, ["hf_path=/a"])
    with pytest.raises(SystemExit, match="unknown argument 'tp'"):
        parse_kwargs(import_hf, ["hf_path=/a", "megatron_path=/b", "tp=2"])
    with pytest.raises(SystemExit, match="bad value for overwrite"):
        parse_kwargs(import_hf, ["hf_path=/a", "megatron_path=/b", "overwrite=maybe"])


def test_pare_import_export(tmp_path, hf_gqa, capsys):
    main(["import", f"hf_path={hf_gqa}", f"megatron_path={tmp_path / 'mg'}"])
    main(["export", f"megatron_path={tmp_path / 'mg'}", f"hf_path={tmp_path / 'hf'}"])
    assert (tmp_path / "hf" / "model.safetensors").exists()
    with pytest.raises(SystemExit, match="pare export: error: .*already exists"):
        main(["export", f"megatron_path={tmp_path / 'mg'}", f"hf_path={tmp_path / 'hf'}"])


def test_nemo_run_entrypoints_registered():
    """The ``nemo_run.cli`` entry point registers the same functions under ``nemo llm``."""
    from importlib import metadata

    (ep,) = [e for e in metadata.entry_points(group="nemo_run.cli") if e.name == "llm"]
    ep.load()
    from nemo_run.cli.api import list_entrypoints

    llm = {e.name: e for e in list_entrypoints()["llm"].values()}
    for name in COMMANDS:
        assert llm[name].fn is resolve(name)


def test_nemo_llm_import_runs(tmp_path, hf_gqa):
    nemo = __import__("shutil").which("nemo", path=str(__import__("pathlib").Path(sys.executable).parent))
    r = subprocess.run([nemo, "llm", "import", f"hf_path={hf_gqa}",
                        f"megatron_path={tmp_path / 'mg'}", "-y"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "mg" / "iter_0000000").is_dir()


def test_prune_recipes_state_their_parameter_counts():
    """Each 7B recipe's docstring states its parameter count; it must be what the targets give."""
    import copy
    import dataclasses
    import re

    from pare_nemo.prune import num_params
    from pare_nemo.tiny import tiny_config
    from recipes.olmo3 import PRUNE_RECIPES

    base = tiny_config(vocab_size=100278, hidden_size=4096, intermediate_size=11008,
                       num_layers=32, num_heads=32, head_dim=128)
    assert round(num_params(base) / 1e9, 2) == 7.30
    for recipe in PRUNE_RECIPES:
        t = dataclasses.asdict(recipe())
        c = copy.deepcopy(base)
        c.intermediate_size = t["target_ffn_hidden_size"] or 11008
        c.hidden_size = t["target_hidden_size"] or 4096
        c.num_attention_heads = c.num_key_value_heads = t["target_num_attention_heads"] or 32
        c.num_hidden_layers = t["target_num_layers"] or 32
        c.layer_types = c.layer_types[: c.num_hidden_layers]
        stated = float(re.search(r"(\d+\.\d+)B parameters", recipe.__doc__).group(1))
        assert round(num_params(c) / 1e9, 2) == stated, recipe.__name__
        assert abs(stated - 4.5) <= 0.05 * 4.5


def test_prune_recipe_reaches_prune(tmp_path, trained):
    """``recipe=`` (pare) and ``--factory`` (nemo llm) hand the recipe's targets to prune: on the
    tiny model the 7B targets are too large, and the error names them."""
    args = [f"megatron_path={trained['mg']}", f"scores_path={tmp_path / 's.pt'}",
            f"save_path={tmp_path / 'out'}"]
    with pytest.raises(SystemExit, match="scores file .* does not exist"):  # clear error first
        main(["prune", "recipe=olmo3_7b_width_4p5b", *args])
    from pare_nemo.importance import importance

    importance(str(trained["mg"]), "pydoc", str(tmp_path / "s.pt"), num_samples=8, seq_length=32,
               layer_loss_samples=0, report=False)
    with pytest.raises(SystemExit, match="target_ffn_hidden_size=9216 must be in"):
        main(["prune", "recipe=olmo3_7b_width_4p5b", *args])
    nemo = __import__("shutil").which("nemo", path=str(__import__("pathlib").Path(sys.executable).parent))
    r = subprocess.run([nemo, "llm", "prune", "--factory", "olmo3_7b_width_4p5b", *args, "-y"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "target_ffn_hidden_size=9216 must be in" in r.stdout + r.stderr
