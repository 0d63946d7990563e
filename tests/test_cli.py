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
