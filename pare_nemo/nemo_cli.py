"""NeMo-Run entrypoints: ``nemo llm <command> …`` for every ``pare`` command (import, export,
importance, prune, search, prepare-data, distill, eval, demo), registered through the
``nemo_run.cli`` entry-point group in pyproject.toml. They call the very functions ``pare
<command>`` calls, with the same typed arguments (read from the source by :mod:`pare_nemo.cli`, so
registering them imports no stage module): a stage with a typed config takes its flat keys.
Recipes of ``recipes/olmo3.py`` are factories (their config's flat keys):
``nemo llm prune --factory olmo3_7b_width_4p5b …``."""

import inspect
import sys

import nemo_run as run

from pare_nemo.cli import COMMANDS, REQUIRED, command, quiet, recipes_for, resolve

quiet()


def _entrypoint(name: str):
    """A function with the command's signature that imports and runs the stage when called."""
    cmd = command(name)

    def fn(**kwargs):
        return resolve(name)(**kwargs)

    params = [inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, annotation=p.type,
                                default=p.default if p.default is not REQUIRED else
                                inspect.Parameter.empty) for p in cmd.params]
    fn.__signature__ = inspect.Signature(params)
    fn.__annotations__ = {p.name: p.type for p in cmd.params}
    fn.__name__ = fn.__qualname__ = name
    fn.__module__ = __name__
    fn.__doc__ = cmd.doc
    fn.pare_command = name
    return fn


def _factory(target, recipe):
    def factory() -> run.Partial:
        return run.Partial(target, **recipe().flat())

    factory.__name__ = factory.__qualname__ = recipe.__name__
    factory.__doc__ = recipe.__doc__
    return factory


def _refuse_prompt_without_terminal(argv: list[str]) -> None:
    """NeMo-Run asks ``Continue? [y/N]`` before running; with no terminal that prompt fails with an
    empty 'Unexpected error:'. Say what to do instead, before anything runs."""
    if len(argv) < 3 or argv[1] != "llm" or argv[2] not in COMMANDS:
        return
    flags = {"-y", "--yes", "--no-confirm", "-h", "--help", "--dryrun"}
    if not flags & set(argv) and not sys.stdin.isatty():
        raise SystemExit(f"nemo llm {argv[2]}: no terminal to confirm on; add -y (or --yes) to run "
                         "without the confirmation prompt")


_refuse_prompt_without_terminal(sys.argv)

for _name in COMMANDS:
    globals()[_name] = _fn = _entrypoint(_name)
    run.cli.entrypoint(name=_name, namespace="llm", skip_confirmation=True)(_fn)
    for _recipe in recipes_for(command(_name)).values():
        run.cli.factory(target=_fn, name=_recipe.__name__)(_factory(_fn, _recipe))
