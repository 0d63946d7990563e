"""``pare`` and ``nemo llm`` reach the same entrypoints, with typed key=value arguments, and answer
help and argument errors without importing the heavy stage modules."""

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pare_nemo.cli import COMMANDS, command, config_class, main, parse_kwargs, resolve

BIN = Path(sys.executable).parent
ENV = os.environ | {"PYTHONWARNINGS": "ignore"}


def _run(*args, timeout=600, stdin=subprocess.DEVNULL):
    return subprocess.run([*args], capture_output=True, text=True, timeout=timeout, env=ENV,
                          stdin=stdin)


def real_parameters(name: str) -> dict:
    """What the stage takes: its config's flat keys and defaults, or its function's parameters."""
    import dataclasses

    cls = config_class(name)
    if cls is None:
        return {k: p.default for k, p in inspect.signature(resolve(name)).parameters.items()}
    return {k: inspect.Parameter.empty if v is dataclasses.MISSING else v
            for k, v in cls.defaults().items()}


def test_signatures_read_from_source_match_the_functions():
    """The arguments the CLI reads without importing the stage are the real ones (names,
    defaults), for every command; a config-backed stage builds its config from them."""
    for name in COMMANDS:
        real = real_parameters(name)
        params = command(name).params
        assert [p.name for p in params] == list(real), name
        for p in params:
            want = real[p.name]
            assert p.default == want or (p.default is want), (name, p.name)
        if config_class(name):
            required = {p.name: "x" for p in params if p.default is inspect.Parameter.empty}
            assert config_class(name).of(**required).flat() == \
                {p.name: required.get(p.name, p.default) for p in params}


def test_parse_kwargs_types():
    imp = command("import")
    kw = parse_kwargs(imp, ["hf_path=/a", "megatron_path=/b", "overwrite=true", "dtype=none"])
    assert kw == {"hf_path": "/a", "megatron_path": "/b", "overwrite": True, "dtype": None}
    with pytest.raises(SystemExit, match="missing required.*megatron_path"):
        parse_kwargs(imp, ["hf_path=/a"])
    with pytest.raises(SystemExit, match="unknown argument 'tp'"):
        parse_kwargs(imp, ["hf_path=/a", "megatron_path=/b", "tp=2"])
    with pytest.raises(SystemExit, match=r"bad value for overwrite \(bool\)"):
        parse_kwargs(imp, ["hf_path=/a", "megatron_path=/b", "overwrite=maybe"])
    prune = command("prune")
    base = ["megatron_path=a", "scores_path=b", "save_path=c"]
    for text in ("[1,2]", "1,2", "[1, 2]"):
        assert parse_kwargs(prune, base + [f"drop_layers={text}"])["drop_layers"] == [1, 2]
    assert parse_kwargs(prune, base + ["drop_layers=3"])["drop_layers"] == [3]
    assert parse_kwargs(prune, base + ["target_ffn_hidden_size=9.216e3"])[
        "target_ffn_hidden_size"] == 9216
    with pytest.raises(SystemExit, match="bad value for drop_layers"):
        parse_kwargs(prune, base + ["drop_layers=[1,x]"])


def test_help_and_argument_errors_import_nothing_heavy():
    """`pare --help`, per-command help and argument errors never import torch (they answer in a
    fraction of a second; README: benchmarks)."""
    code = ("import sys; from pare_nemo.cli import main\n"
            "for argv in (['--help'], ['prune', '--help'], ['prune', 'x=1'], ['nope'],"
            " ['prune', 'recipe=olmo3_7b_widht', 'megatron_path=a', 'scores_path=b', 'save_path=c']):\n"
            "    try: main(argv)\n"
            "    except SystemExit as e: print(e)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    r = _run(sys.executable, "-c", code)
    assert r.returncode == 0, r.stderr
    assert "commands:" in r.stdout and "drop_layers" in r.stdout
    assert "unknown argument 'x'" in r.stdout
    assert "unknown command 'nope'" in r.stdout
    assert ("unknown recipe 'olmo3_7b_widht'; recipes for this command: olmo3_7b_combined_4p5b, "
            "olmo3_7b_depth_4p5b, olmo3_7b_width_4p5b") in r.stdout


def test_pare_import_export(tmp_path, hf_gqa):
    main(["import", f"hf_path={hf_gqa}", f"megatron_path={tmp_path / 'mg'}"])
    main(["export", f"megatron_path={tmp_path / 'mg'}", f"hf_path={tmp_path / 'hf'}"])
    assert (tmp_path / "hf" / "model.safetensors").exists()
    with pytest.raises(SystemExit, match="pare export: error: .*already exists"):
        main(["export", f"megatron_path={tmp_path / 'mg'}", f"hf_path={tmp_path / 'hf'}"])


def test_output_that_is_or_contains_the_input_is_refused(tmp_path, hf_gqa):
    src = tmp_path / "models" / "hf"
    shutil.copytree(hf_gqa, src)
    for out in (src, src.parent):
        with pytest.raises(SystemExit, match="output .* (is the input|a parent of the input)"):
            main(["import", f"hf_path={src}", f"megatron_path={out}", "overwrite=true"])
    assert (src / "model.safetensors").exists()
    main(["import", f"hf_path={src}", f"megatron_path={tmp_path / 'mg'}"])
    with pytest.raises(SystemExit, match="is the input"):
        main(["export", f"megatron_path={tmp_path / 'mg'}", f"hf_path={tmp_path / 'mg'}",
              "overwrite=true"])
    with pytest.raises(SystemExit, match="is the input"):
        main(["prune", f"megatron_path={tmp_path / 'mg'}", f"scores_path={tmp_path / 's.pt'}",
              f"save_path={tmp_path / 'mg'}", "target_ffn_hidden_size=64", "overwrite=true"])
    assert (tmp_path / "mg" / "iter_0000000").is_dir()


def test_import_without_tokenizer(tmp_path, hf_gqa):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(hf_gqa / f, bare / f)
    with pytest.raises(SystemExit, match="has no tokenizer files.*tokenizer_path="):
        main(["import", f"hf_path={bare}", f"megatron_path={tmp_path / 'mg'}"])
    assert not (tmp_path / "mg").exists()
    main(["import", f"hf_path={bare}", f"megatron_path={tmp_path / 'mg'}",
          f"tokenizer_path={hf_gqa}"])
    assert (tmp_path / "mg" / "tokenizer" / "tokenizer.json").exists()


def test_mistyped_local_path_is_not_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "my_models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="HF checkpoint directory my_models/olmo3 does not exist"):
        main(["import", "hf_path=my_models/olmo3", "megatron_path=out"])
    with pytest.raises(SystemExit, match="Megatron checkpoint nothing/here does not exist"):
        main(["export", "megatron_path=nothing/here", "hf_path=out"])


def test_import_converts_dtype(tmp_path, hf_gqa, megatron_gqa):
    import torch

    from pare_nemo.checkpoint import read_model_config

    main(["import", f"hf_path={hf_gqa}", f"megatron_path={tmp_path / 'bf16'}", "dtype=bfloat16"])
    assert read_model_config(tmp_path / "bf16")[2] == torch.bfloat16
    main(["export", f"megatron_path={tmp_path / 'bf16'}", f"hf_path={tmp_path / 'hf'}"])
    from safetensors.torch import load_file

    a, b = load_file(hf_gqa / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(b[k], a[k].bfloat16()) for k in a)
    with pytest.raises(SystemExit, match="dtype='fp8'"):
        main(["import", f"hf_path={hf_gqa}", f"megatron_path={tmp_path / 'x'}", "dtype=fp8"])


def test_prune_needs_a_target_and_prints_the_new_shape(tmp_path, trained, capsys):
    from pare_nemo.importance import importance

    args = [f"megatron_path={trained['mg']}", f"scores_path={tmp_path / 's.pt'}"]
    importance(megatron_path=str(trained["mg"]), data="pydoc", scores_path=str(tmp_path / "s.pt"),
               num_samples=8, seq_length=32, layer_loss_samples=4, report=False)
    with pytest.raises(SystemExit, match="no pruning target given"):
        main(["prune", *args, f"save_path={tmp_path / 'p'}"])
    main(["prune", *args, f"save_path={tmp_path / 'p'}", "drop_layers=[1,2]",
          "target_ffn_hidden_size=128"])
    out = capsys.readouterr().out
    assert "layers 4 -> 2" in out and "ffn 256 -> 128" in out and "parameters 0.33M -> " in out
    plan = json.loads((tmp_path / "p" / "prune_plan.json").read_text())
    assert plan["layers"] == [0, 3] and len(plan["hidden"]) == 64


def test_nemo_run_entrypoints_registered():
    """The ``nemo_run.cli`` entry point registers every command under ``nemo llm``, with the
    command's own signature, and calls the stage function."""
    from importlib import metadata

    (ep,) = [e for e in metadata.entry_points(group="nemo_run.cli") if e.name == "llm"]
    ep.load()
    from nemo_run.cli.api import list_entrypoints

    llm = {e.name: e for e in list_entrypoints()["llm"].values()}
    for name in COMMANDS:
        assert llm[name].fn.pare_command == name
        assert list(inspect.signature(llm[name].fn).parameters) == list(real_parameters(name))


def _nemo():
    return shutil.which("nemo", path=str(BIN))


# `nemo llm import … -y` running for real, and `nemo llm prune --factory <7B recipe>` reaching
# prune's target check, are README lines: tests/test_readme.py runs them.


def test_nemo_llm_lists_and_no_terminal(tmp_path):
    """List values parse under nemo too, and without a terminal and without -y the message says
    what to do (instead of an empty 'Unexpected error')."""
    r = _run(_nemo(), "llm", "prune", f"megatron_path={tmp_path / 'nope'}", "scores_path=s",
             f"save_path={tmp_path / 'o'}", "drop_layers=[1,2]")
    assert r.returncode != 0 and "add -y" in r.stdout + r.stderr
    r = _run(_nemo(), "llm", "prune", f"megatron_path={tmp_path / 'nope'}", "scores_path=s",
             f"save_path={tmp_path / 'o'}", "drop_layers=[1,2]", "-y")
    assert r.returncode != 0 and "does not exist" in r.stdout + r.stderr, r.stdout + r.stderr
    assert "Failed to parse" not in r.stdout + r.stderr


def test_prune_recipes_state_their_parameter_counts():
    """Each 7B recipe's docstring states its parameter count; it must be what the targets give."""
    import copy
    import re

    from pare_nemo.prune import num_params
    from pare_nemo.tiny import tiny_config
    from recipes.olmo3 import PRUNE_RECIPES

    base = tiny_config(vocab_size=100278, hidden_size=4096, intermediate_size=11008,
                       num_layers=32, num_heads=32, head_dim=128)
    assert round(num_params(base) / 1e9, 2) == 7.30
    for recipe in PRUNE_RECIPES:
        t = recipe().flat()
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
    """``recipe=`` hands the recipe's targets to prune: on the tiny model the 7B targets are too
    large, and the error names them. (``--factory`` under nemo llm: the README's
    ``nemo llm prune --factory olmo3_7b_depth_4p5b`` line, which tests/test_readme.py runs.)"""
    args = [f"megatron_path={trained['mg']}", f"scores_path={tmp_path / 's.pt'}",
            f"save_path={tmp_path / 'out'}"]
    with pytest.raises(SystemExit, match="scores file .* does not exist"):  # clear error first
        main(["prune", "recipe=olmo3_7b_width_4p5b", *args])
    from pare_nemo.importance import importance

    importance(megatron_path=str(trained["mg"]), data="pydoc", scores_path=str(tmp_path / "s.pt"),
               num_samples=8, seq_length=32, layer_loss_samples=0, report=False)
    with pytest.raises(SystemExit, match="target_ffn_hidden_size=9216 must be in"):
        main(["prune", "recipe=olmo3_7b_width_4p5b", *args])
