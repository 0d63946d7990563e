"""``pare <command> key=value …``: the same entrypoints as ``nemo llm <command> key=value …``."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import types
import typing
import warnings

COMMANDS = {
    "import": ("conversion.convert", "import_hf"),
    "export": ("conversion.convert", "export_hf"),
    "importance": ("pare_nemo.importance", "importance"),
    "prune": ("pare_nemo.prune", "prune"),
    "search": ("pare_nemo.search", "search"),
    "demo": ("pare_nemo.demo", "demo"),
}


def resolve(name: str):
    module, fn = COMMANDS[name]
    return getattr(importlib.import_module(module), fn)


def _coerce(value: str, annotation):
    if isinstance(annotation, str):
        annotation = {"bool": bool, "int": int, "float": float, "str": str}.get(
            annotation.split("|")[0].strip(), str)
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        if value.lower() in ("none", "null"):
            return None
        annotation = next(a for a in args if a is not type(None))
    if annotation is bool:
        if value.lower() in ("1", "true", "yes", "y"):
            return True
        if value.lower() in ("0", "false", "no", "n"):
            return False
        raise ValueError(f"expected true/false, got {value!r}")
    if annotation in (int, float):
        return annotation(value)
    if typing.get_origin(annotation) is list:
        return [_coerce(v, args[0]) for v in value.strip("[]").split(",") if v]
    return value


def recipe_defaults(name: str) -> dict:
    """``recipe=<name>``: the arguments a named recipe of ``recipes/olmo3.py`` sets."""
    import dataclasses

    from recipes import olmo3

    fn = getattr(olmo3, name, None)
    if not callable(fn) or not dataclasses.is_dataclass(r := fn()):
        raise SystemExit(f"unknown recipe {name!r}")
    return dataclasses.asdict(r)


def parse_kwargs(fn, argv: list[str], given: set[str] = frozenset()) -> dict:
    sig = inspect.signature(fn)
    kwargs = {}
    for arg in argv:
        if "=" not in arg:
            raise SystemExit(f"arguments are key=value, got {arg!r}")
        key, value = arg.split("=", 1)
        key = key.lstrip("-").replace("-", "_")
        if key not in sig.parameters:
            raise SystemExit(f"unknown argument {key!r}; expected one of {list(sig.parameters)}")
        try:
            kwargs[key] = _coerce(value, sig.parameters[key].annotation)
        except ValueError as e:
            raise SystemExit(f"bad value for {key}: {e}") from None
    missing = [n for n, p in sig.parameters.items()
               if p.default is inspect.Parameter.empty and n not in kwargs and n not in given]
    if missing:
        raise SystemExit(f"missing required argument(s): {', '.join(f'{m}=…' for m in missing)}")
    return kwargs


def _usage() -> str:
    lines = ["usage: pare <command> [recipe=<name>] key=value …", "", "commands:"]
    for name in COMMANDS:
        fn = resolve(name)
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        lines.append(f"  {name:10s} {doc}")
        params = [f"{n}" + ("" if p.default is inspect.Parameter.empty else f"={p.default}")
                  for n, p in inspect.signature(fn).parameters.items()]
        lines.append(f"  {'':10s} {' '.join(params)}")
    return "\n".join(lines)


def quiet() -> None:
    """Keep the console readable: megatron/torch deprecation chatter off unless PARE_VERBOSE=1."""
    if os.environ.get("PARE_VERBOSE"):
        return
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("megatron").setLevel(logging.ERROR)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    quiet()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    if argv[0] not in COMMANDS:
        raise SystemExit(f"unknown command {argv[0]!r}\n\n{_usage()}")
    fn = resolve(argv[0])
    recipe = [a for a in argv[1:] if a.startswith("recipe=")]
    kwargs = recipe_defaults(recipe[-1].split("=", 1)[1]) if recipe else {}
    kwargs |= parse_kwargs(fn, [a for a in argv[1:] if not a.startswith("recipe=")],
                           given=set(kwargs))
    try:
        result = fn(**kwargs)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise SystemExit(f"pare {argv[0]}: error: {e}") from None
    if result is not None:
        print(result)


if __name__ == "__main__":
    main()
