"""``pare <command> key=value …``: the same entrypoints as ``nemo llm <command> key=value …``.

Fast by construction: ``pare --help``, a misspelled key or a bad value are answered without
importing torch or megatron; the stage module is imported only when the command runs. A stage
with a typed config (importance, prune, search, teacher-logits, distill, eval:
:mod:`pare_nemo.config`, which imports nothing heavy) takes its config's fields as flat keys
(``lr=1e-4``, or ``optimizer.lr=1e-4``); the other commands' arguments (names, types, defaults)
are read from their function's source with :mod:`ast`. ``recipe=<name>`` starts from a recipe's
config (``recipes/olmo3.py``).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import os
import sys
import types
import typing
import warnings
from functools import lru_cache
from pathlib import Path

COMMANDS = {
    "import": ("conversion.convert", "import_hf"),
    "export": ("conversion.convert", "export_hf"),
    "importance": ("pare_nemo.importance", "importance"),
    "prune": ("pare_nemo.prune", "prune"),
    "search": ("pare_nemo.search", "search"),
    "prepare-data": ("pare_nemo.data", "prepare_data"),
    "teacher-logits": ("pare_nemo.teacher_logits", "teacher_logits"),
    "sparsify": ("pare_nemo.sparsify", "sparsify"),
    "quantize": ("pare_nemo.quantize", "quantize"),
    "distill": ("pare_nemo.distill", "distill"),
    "eval": ("pare_nemo.eval", "evaluate"),
    "demo": ("pare_nemo.demo", "demo"),
}

REQUIRED = inspect.Parameter.empty
CONFIGS = ("importance", "prune", "search", "teacher-logits", "distill", "eval", "sparsify",
           "quantize")  # typed configs
_NAMES = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None), "list": list}


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    type: object  # int, str, typing.Optional[int], typing.List[int], …
    default: object  # REQUIRED when the argument must be given
    section: str | None = None  # the config section it belongs to


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    module: str
    function: str
    doc: str
    params: tuple[Param, ...]


def _type(node: ast.expr):
    """An annotation's AST -> a typing object both parsers (ours and NeMo-Run's) understand."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return typing.Union[_type(node.left), _type(node.right)]
    if isinstance(node, ast.Subscript) and getattr(node.value, "id", None) == "list":
        return typing.List[_type(node.slice)]
    if isinstance(node, ast.Constant) and node.value is None:
        return type(None)
    if isinstance(node, ast.Name) and node.id in _NAMES:
        return _NAMES[node.id]
    raise TypeError(f"unsupported annotation {ast.unparse(node)!r} in a pare command")


def _typing(tp):
    """A resolved annotation (``int | None``, ``list[int]``) -> the typing objects both parsers
    (ours and NeMo-Run's) understand (``typing.Optional[int]``, ``typing.List[int]``)."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return typing.Union[tuple(_typing(a) for a in args)]
    if typing.get_origin(tp) is list:
        return typing.List[_typing(args[0])]
    return tp


def config_class(name: str):
    """The typed config of a stage (None for the other commands)."""
    from pare_nemo.config import STAGES

    return STAGES.get(name) if name in CONFIGS else None


@lru_cache(maxsize=None)
def command(name: str) -> Command:
    """The command's arguments: its config's fields, or its function's signature read from the
    module's source (nothing heavy is imported either way)."""
    module, function = COMMANDS[name]
    source = Path(importlib.util.find_spec(module).origin).read_text()
    fn = next(n for n in ast.parse(source).body
              if isinstance(n, ast.FunctionDef) and n.name == function)
    doc = (ast.get_docstring(fn) or "").strip().split("\n")[0]
    cls = config_class(name)
    if cls is not None:
        defaults = cls.defaults()
        params = tuple(Param(n, _typing(tp), REQUIRED if defaults[n] is dataclasses.MISSING
                             else defaults[n], section)
                       for n, (section, _, tp) in cls.leaves().items())
        return Command(name, module, function, doc, params)
    args = fn.args.args
    defaults = [REQUIRED] * (len(args) - len(fn.args.defaults)) + [
        eval(compile(ast.Expression(d), "<default>", "eval"), {"__builtins__": {}})
        for d in fn.args.defaults]
    params = tuple(Param(a.arg, _type(a.annotation), d) for a, d in zip(args, defaults))
    return Command(name, module, function, doc, params)


def resolve(name: str):
    """The stage function itself (imports its module)."""
    module, function = COMMANDS[name]
    return getattr(importlib.import_module(module), function)


def _coerce(value: str, tp):
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union:
        if value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is not type(None):
                try:
                    return _coerce(value, a)
                except ValueError as e:
                    errors.append(str(e))
        raise ValueError("; ".join(errors))
    if tp is bool:
        if value.lower() in ("1", "true", "yes", "y"):
            return True
        if value.lower() in ("0", "false", "no", "n"):
            return False
        raise ValueError(f"expected true/false, got {value!r}")
    if tp is int:
        try:
            return int(value)
        except ValueError:
            f = float(value)  # 4.5e9, 1e3
            if not f.is_integer():
                raise ValueError(f"expected an integer, got {value!r}") from None
            return int(f)
    if tp is float:
        return float(value)
    if typing.get_origin(tp) is list:  # [1,2], [1, 2], 1,2, [] or a single value
        inner = value.strip().removeprefix("[").removesuffix("]")
        return [_coerce(v.strip(), args[0]) for v in inner.split(",") if v.strip()]
    return value


def _type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Union:
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return "None" if tp is type(None) else tp.__name__


def parse_kwargs(cmd: Command, argv: list[str], given: set[str] = frozenset()) -> dict:
    params = {p.name: p for p in cmd.params}
    kwargs = {}
    for arg in argv:
        if "=" not in arg:
            raise SystemExit(f"pare {cmd.name}: arguments are key=value, got {arg!r}")
        key, value = arg.split("=", 1)
        key = key.lstrip("-").replace("-", "_")
        section, _, leaf = key.rpartition(".")  # optimizer.lr=… names the section too
        if section and leaf in params and params[leaf].section == section:
            key = leaf
        if key not in params:
            raise SystemExit(f"pare {cmd.name}: unknown argument {key!r}; expected one of "
                             f"{', '.join(params)}")
        try:
            kwargs[key] = _coerce(value, params[key].type)
        except ValueError as e:
            raise SystemExit(f"pare {cmd.name}: bad value for {key} "
                             f"({_type_name(params[key].type)}): {e}") from None
    missing = [p.name for p in cmd.params
               if p.default is REQUIRED and p.name not in kwargs and p.name not in given]
    if missing:
        raise SystemExit(f"pare {cmd.name}: missing required argument(s): "
                         f"{' '.join(f'{m}=…' for m in missing)}")
    return kwargs


def recipes_for(cmd: Command) -> dict:
    """Named recipes of ``recipes/olmo3.py`` that return this stage's config."""
    from recipes import olmo3

    cls = config_class(cmd.name)
    out = {}
    for name in getattr(olmo3, "__all__", dir(olmo3)):
        fn = getattr(olmo3, name)
        hints = typing.get_type_hints(fn) if inspect.isfunction(fn) else {}
        if cls is not None and hints.get("return") is cls and not name.startswith("_"):
            out[name] = fn
    return out


def recipe_config(cmd: Command, name: str):
    """``recipe=<name>``: the config a named recipe returns."""
    valid = recipes_for(cmd)
    if name not in valid:
        raise SystemExit(f"pare {cmd.name}: unknown recipe {name!r}; recipes for this command: "
                         f"{', '.join(valid) or 'none'}")
    return valid[name]()


def usage() -> str:
    lines = ["usage: pare <command> [recipe=<name>] key=value …", "", "commands:"]
    for name in COMMANDS:
        cmd = command(name)
        lines.append(f"  {name:12s} {cmd.doc}")
        params = [p.name + ("" if p.default is REQUIRED else f"={p.default}") for p in cmd.params]
        lines.append(f"  {'':12s} {' '.join(params)}")
    lines += ["", "Values: true/false, numbers (4.5e9), lists as [1,2] or 1,2, none.",
              "`pare <command> --help` shows one command with types and recipes."]
    return "\n".join(lines)


def command_usage(cmd: Command) -> str:
    lines = [f"usage: pare {cmd.name} [recipe=<name>] key=value …", "", cmd.doc, ""]
    section = None
    for p in cmd.params:
        if p.section != section and p.section is not None:
            lines.append(f" {p.section}:")
        section = p.section
        default = "(required)" if p.default is REQUIRED else f"= {p.default!r}"
        lines.append(f"  {p.name:28s} {_type_name(p.type):22s} {default}")
    rec = recipes_for(cmd)
    if rec:
        lines += ["", f"recipes: {', '.join(rec)}"]
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
        print(usage())
        return
    if argv[0] not in COMMANDS:
        raise SystemExit(f"pare: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}\n"
                         "(`pare --help` lists them with their arguments)")
    cmd = command(argv[0])
    rest = argv[1:]
    if any(a in ("-h", "--help", "help") for a in rest):
        print(command_usage(cmd))
        return
    recipe = [a.split("=", 1)[1] for a in rest if a.startswith("recipe=")]
    base = recipe_config(cmd, recipe[-1]) if recipe else None
    kwargs = parse_kwargs(cmd, [a for a in rest if not a.startswith("recipe=")],
                          given=set(base.flat()) if base is not None else set())
    fn = resolve(cmd.name)
    try:
        result = fn(base, **kwargs) if config_class(cmd.name) else fn(**kwargs)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise SystemExit(f"pare {cmd.name}: error: {e}") from None
    if result is not None:
        print(result)


if __name__ == "__main__":
    main()
