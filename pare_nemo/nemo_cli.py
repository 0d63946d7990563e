"""NeMo-Run entrypoints: ``nemo llm import|export|importance|prune|demo …`` (registered through the
``nemo_run.cli`` entry-point group in pyproject.toml). They are the very functions ``pare <command>``
calls. The prune recipes of ``recipes/olmo3.py`` are factories: ``nemo llm prune --factory <name>``."""

import dataclasses

import nemo_run as run

from pare_nemo.cli import COMMANDS, resolve
from recipes.olmo3 import PRUNE_RECIPES

for _name in COMMANDS:
    run.cli.entrypoint(name=_name, namespace="llm", skip_confirmation=True)(resolve(_name))


def _prune_factory(recipe):
    def factory() -> run.Partial:
        return run.Partial(resolve("prune"), **dataclasses.asdict(recipe()))

    factory.__name__ = factory.__qualname__ = recipe.__name__
    factory.__doc__ = recipe.__doc__
    return factory


for _recipe in PRUNE_RECIPES:
    run.cli.factory(target=resolve("prune"), name=_recipe.__name__)(_prune_factory(_recipe))
