"""The typed configs (pare_nemo/config.py): flat keys, recipes, round trips, one home per default;
and the README's Python example, run as it stands."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import sys
from pathlib import Path

import pytest

from pare_nemo.config import (
    DEFAULT_SPLIT,
    STAGES,
    DistillConfig,
    EvalConfig,
    ImportanceConfig,
    Optimizer,
)

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = dict(teacher_path="t", student_path="s", data="d", save_path="x")


def test_flat_and_dotted_keys_reach_their_section():
    cfg = DistillConfig.of(**REQUIRED, lr=3e-3, **{"parallel.tp": 2, "kd.top_k": 8})
    assert cfg.optimizer.lr == 3e-3 and cfg.parallel.tp == 2 and cfg.kd.top_k == 8
    assert cfg.optimizer.min_lr == Optimizer().min_lr  # the rest: the section's defaults
    again = DistillConfig.of(cfg, train_steps=7)  # on top of a config: it stays, the key changes
    assert again.batch.train_steps == 7 and again.optimizer.lr == 3e-3
    assert cfg.batch.train_steps != 7
    with pytest.raises(TypeError, match="unknown argument 'lrr'"):
        DistillConfig.of(**REQUIRED, lrr=1)
    with pytest.raises(TypeError, match="unknown argument 'kd.lr'"):  # a section it is not in
        DistillConfig.of(**REQUIRED, **{"kd.lr": 1})
    with pytest.raises(TypeError, match="missing required argument.*save_path"):
        DistillConfig.of(teacher_path="t", student_path="s", data="d")


def test_saved_config_round_trips_and_old_flat_runs_still_read():
    cfg = DistillConfig.of(**REQUIRED, student_layers=[0, 2], top_k=4, tp=2)
    saved = json.loads(json.dumps(cfg.to_dict()))
    assert DistillConfig.from_dict(saved) == cfg
    # a run saved before the config had sections: its flat arguments
    assert DistillConfig.from_dict(json.loads(json.dumps(cfg.flat()))) == cfg


def test_leaf_names_are_unique_and_every_stage_has_a_config():
    for name, cls in STAGES.items():
        leaves = cls.leaves()  # raises on a name in two sections
        assert leaves and all(isinstance(k, str) for k in leaves), name


def test_recipes_return_whole_configs_that_check():
    """Every recipe builds its stage's config; the config's own checks pass (those that need no
    model or data); their values differ from the defaults only where the recipe decides."""
    from pare_nemo.cli import command, recipes_for

    seen = 0
    for name, cls in STAGES.items():
        for recipe_name, recipe in recipes_for(command(name)).items():
            cfg = recipe()
            assert isinstance(cfg, cls), recipe_name
            for section in ("kd", "run", "aggregation", "depth", "targets", "latency"):
                part = getattr(cfg, section, None)
                if part is not None:
                    part.check()
            seen += 1
    assert seen >= 12


def test_every_default_lives_in_config_py():
    """No stage function keeps defaults of its own for config fields, the distillation blend is in
    the recipes only, and the validation split has one default."""
    from pare_nemo import distill, importance, prune, search
    from pare_nemo import eval as ev

    for module, fn in ((distill, "distill"), (ev, "evaluate"), (importance, "importance"),
                       (prune, "prune"), (search, "search")):
        params = inspect.signature(getattr(module, fn)).parameters
        assert list(params) == ["cfg", "flat"], (fn, list(params))
    assert EvalConfig.of(checkpoints="a", data="b").split is None  # -> the run's or DEFAULT_SPLIT
    assert DistillConfig.of(**REQUIRED).data.split == DEFAULT_SPLIT
    from recipes.olmo3 import OLMO3_DISTILL_DATA as blend

    where = [p for p in ROOT.glob("*/*.*") if p.suffix in (".py", ".sh") and blend in
             p.read_text()]
    assert [p.relative_to(ROOT).as_posix() for p in where] == ["recipes/olmo3.py"]
    # the slurm scripts pass a recipe and paths, no hyper-parameters
    for script in (ROOT / "slurm").glob("*.sh"):
        launch = re.findall(r"^launch .*", script.read_text(), re.M)
        assert all("seq_length" not in line and "num_samples" not in line for line in launch)


def test_importance_config_reads_like_its_recipe():
    from recipes.olmo3 import olmo3_7b_importance, tiny_importance

    assert olmo3_7b_importance().rows.num_samples == ImportanceConfig.defaults()["num_samples"]
    tiny = tiny_importance("w")
    assert tiny.megatron_path == "w/megatron" and tiny.text.data == "pydoc"


def test_readme_python_example(monkeypatch):
    """README's ```python block runs as written (distill itself stubbed: its arguments kept)."""
    import pare_nemo.distill

    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)
    assert blocks
    calls = []
    monkeypatch.setattr(pare_nemo.distill, "distill",
                        lambda cfg=None, **flat: calls.append(DistillConfig.of(cfg, **flat)))
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    (cfg,) = calls
    assert cfg.optimizer.lr == 1e-3 and cfg.batch.train_steps == 30
    assert cfg.models.teacher_path == "pare_demo/megatron"


def test_config_module_imports_nothing_heavy():
    import subprocess

    code = ("import sys, pare_nemo.config, recipes.olmo3\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert dataclasses.is_dataclass(DistillConfig)
