"""Typed, validated configs at the boundary between `ml_collections` and the library.

Recipes in `configs/` return an `ml_collections.ConfigDict` (so every knob can be
overridden from the command line); the code below the boundary only sees frozen
dataclasses. `to_dataclass` converts and validates, naming the full dotted key and what
would be valid on every error; `to_config_dict` goes the other way, so a recipe can start
from the dataclass defaults; `describe` lists every knob for `--help`-like output.

Documentation convention: every dataclass field is documented by a trailing comment on
the line that declares it (as in `jaxpost/models/config.py`)::

    @dataclasses.dataclass(frozen=True)
    class OptimizerConfig:
        lr: float = 1e-5  # peak learning rate after warm-up
        warmup_steps: int = 100  # linear warm-up from 0 to `lr`

`describe` reads those comments from the source; `dataclasses.field(metadata={"help":
...})` takes precedence when given (useful for classes built without source).

Supported field types: nested dataclasses, `bool`, `int`, `float` (an int is accepted
and converted), `str`, `Literal[...]`, `X | None` / `Optional[X]`, other unions (first
match wins), `tuple[X, ...]` and `tuple[X, Y]` (a list is accepted and made a tuple),
`dict[K, V]` and `Any`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import numbers
import textwrap
import tokenize
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

import ml_collections
import numpy as np
from ml_collections import config_dict as mlc_config_dict

T = TypeVar("T")

_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A config value is unknown, missing, of the wrong type or not an allowed choice."""


# --------------------------------------------------------------------------------------
# ConfigDict / dict -> dataclass
# --------------------------------------------------------------------------------------


def _is_mapping(x: Any) -> bool:
    return isinstance(x, (Mapping, ml_collections.ConfigDict, ml_collections.FrozenConfigDict))


def _items(x: Any) -> list[tuple[str, Any]]:
    """Key/value pairs of a dict or (Frozen)ConfigDict, field references resolved."""
    return list(x.items())


def _type_name(tp: Any) -> str:
    """Human-readable name of a type annotation, e.g. `tuple[str, ...] | None`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return "any"
    if tp is type(None):
        return "None"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is tuple:
        if not args:
            return "tuple"
        if len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{_type_name(args[0])}, ...]"
        return "tuple[" + ", ".join(_type_name(a) for a in args) + "]"
    if origin is dict:
        return f"dict[{', '.join(_type_name(a) for a in args)}]" if args else "dict"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp)


def _describe_value(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _wrong_type(where: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"{where}: expected {_type_name(tp)}, got {_describe_value(value)}")


def _suggestion(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_key(where: str, key: str, valid: list[str]) -> str:
    return (f"{where}.{key} is not a known key; valid keys: {', '.join(valid)}"
            f"{_suggestion(key, valid)}")


def override_error(cfg: Any, path: str, *, where: str = "config") -> str | None:
    """Why the dotted override `path` (as in `--config.grpo.loss_type=dapo`) does not
    name an entry of `cfg`, or None when it does.

    ml_collections refuses such an override with a bare `AttributeError`/`KeyError`
    (`"'lossz'"`); this names the full dotted key, the valid keys of the section it
    would go into and the closest one. Paths with an index (`a.b[0]`) are not checked.

    Args:
        cfg: the recipe's ConfigDict (or dict) before overrides.
        path: the override's key without the flag name, e.g. `"grpo.lossz"`.
        where: the flag name the path hangs from.
    """
    if "[" in path:
        return None
    node, parents = cfg, [where]
    for part in path.split("."):
        if not _is_mapping(node):
            kind = type(node).__name__
            return (f"{'.'.join(parents)} is {'an' if kind[0] in 'aeiou' else 'a'} {kind}, "
                    f"not a section: {where}.{path} names no key")
        keys = [str(k) for k in node.keys()]
        if part not in keys:
            return _unknown_key(".".join(parents), part, sorted(keys))
        node = node[part]
        parents.append(part)
    return None


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Validates `value` against the annotation `tp` and converts it; raises ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any or tp is object:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        return to_dataclass(tp, value, where=where)
    if tp is type(None):
        if value is None:
            return None
        raise _wrong_type(where, tp, value)
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _wrong_type(where, tp, value)
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            try:
                return _convert(options[0], value, where)
            except ConfigError:
                if options[0] in (bool, int, float, str):
                    raise _wrong_type(where, tp, value) from None  # "expected int | None"
                raise  # keeps the inner key / the valid choices
        for option in options:  # first matching alternative wins
            try:
                return _convert(option, value, where)
            except ConfigError:
                continue
        raise _wrong_type(where, tp, value)
    if origin is Literal:
        for choice in args:  # compare type too: True == 1 but is not the choice 1
            if type(value) is type(choice) and value == choice:
                return choice
        valid = ", ".join(repr(a) for a in args)
        hint = ""
        if isinstance(value, str):
            hint = _suggestion(value, [a for a in args if isinstance(a, str)])
        raise ConfigError(f"{where}: {value!r} is not a valid choice; valid: {valid}{hint}")
    if origin is tuple or tp is tuple:
        if not isinstance(value, (tuple, list)):
            raise _wrong_type(where, tp, value)
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(
                f"{where}: expected {_type_name(tp)} ({len(args)} items), got "
                f"{len(value)} items {tuple(value)!r}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict or tp is dict:
        if not _is_mapping(value):
            raise _wrong_type(where, tp, value)
        key_tp, val_tp = args if args else (Any, Any)
        return {_convert(key_tp, k, f"{where}[{k!r}]"): _convert(val_tp, v, f"{where}.{k}")
                for k, v in _items(value)}
    if tp is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise _wrong_type(where, tp, value)
    if tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
            return int(value)
        raise _wrong_type(where, tp, value)
    if tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
            return float(value)
        raise _wrong_type(where, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _wrong_type(where, tp, value)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _wrong_type(where, tp, value)
    raise TypeError(f"{where}: jaxpost.config cannot validate the annotation {tp!r}")


def _init_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def to_dataclass(cls: type[T], cfg: ml_collections.ConfigDict | Mapping[str, Any], *,
                 where: str = "config") -> T:
    """Converts a ConfigDict or dict into an instance of the dataclass `cls`, validating it.

    Nested dataclass fields are converted recursively from nested ConfigDicts/dicts;
    missing keys take the field defaults.

    Args:
        cls: The (usually frozen) dataclass to build.
        cfg: The values, e.g. the `ml_collections.ConfigDict` of a recipe or a plain dict.
        where: Dotted name of `cfg` used in error messages, e.g. `"config.optimizer"`.

    Returns:
        An instance of `cls`.

    Raises:
        ConfigError: naming the full dotted key, on an unknown key (with the valid keys
            and the closest match), a missing required field, a value of the wrong type or
            a value outside a `Literal[...]`; a `ValueError` raised by the dataclass'
            `__post_init__` is re-raised as a ConfigError prefixed with `where`.
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"to_dataclass needs a dataclass type, got {cls!r}")
    if isinstance(cfg, cls):
        return cfg
    if not _is_mapping(cfg):
        raise ConfigError(
            f"{where}: expected a ConfigDict or dict of {cls.__name__} fields, got "
            f"{_describe_value(cfg)}")
    fields = _init_fields(cls)
    names = [f.name for f in fields]
    hints = typing.get_type_hints(cls)
    values = dict(_items(cfg))
    for key in values:
        if key not in names:
            raise ConfigError(_unknown_key(where, str(key), names))
    kwargs = {}
    for f in fields:
        if f.name not in values:
            if f.default is _MISSING and f.default_factory is _MISSING:
                raise ConfigError(
                    f"{where}.{f.name} is required ({_type_name(hints[f.name])}) but missing")
            continue
        kwargs[f.name] = _convert(hints[f.name], values[f.name], f"{where}.{f.name}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from e


# --------------------------------------------------------------------------------------
# dataclass -> ConfigDict
# --------------------------------------------------------------------------------------


def _placeholder_type(tp: Any) -> type | None:
    """For `X | None` with a scalar or tuple X: the type a None placeholder should carry."""
    if typing.get_origin(tp) not in (Union, types.UnionType):
        return None
    options = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(options) != 1:
        return None
    (option,) = options
    if typing.get_origin(option) is Literal:
        kinds = {type(a) for a in typing.get_args(option)}
        return kinds.pop() if len(kinds) == 1 else None
    if typing.get_origin(option) is tuple or option is tuple:
        return tuple
    if option in (bool, int, float, str):
        return option
    return None


def _to_config_value(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_config_dict(value)
    if isinstance(value, (tuple, list)):
        return tuple(_to_config_value(v) for v in value)
    if isinstance(value, Mapping):
        return ml_collections.ConfigDict({k: _to_config_value(v) for k, v in value.items()})
    return value


def to_config_dict(instance: Any) -> ml_collections.ConfigDict:
    """The ConfigDict of a dataclass instance: the inverse of `to_dataclass`.

    Nested dataclasses become nested ConfigDicts, sequences become tuples (overridable
    from the command line). A None value of an `X | None` field with a scalar or tuple X
    becomes `ml_collections.config_dict.placeholder(X)`, so `--config.key=VALUE` still
    parses VALUE with the right type.

    Args:
        instance: A dataclass instance.

    Returns:
        An unlocked `ml_collections.ConfigDict` with one entry per init field.
    """
    if not dataclasses.is_dataclass(instance) or isinstance(instance, type):
        raise TypeError(f"to_config_dict needs a dataclass instance, got {instance!r}")
    hints = typing.get_type_hints(type(instance))
    out = ml_collections.ConfigDict()
    for f in _init_fields(type(instance)):
        value = getattr(instance, f.name)
        placeholder = _placeholder_type(hints[f.name])
        if value is None and placeholder is not None:
            out[f.name] = mlc_config_dict.placeholder(placeholder)
        else:
            out[f.name] = _to_config_value(value)
    return out


# --------------------------------------------------------------------------------------
# describe
# --------------------------------------------------------------------------------------


def _field_comments(cls: type) -> dict[str, str]:
    """Trailing comments of the annotated assignments in the body of `cls` (own fields)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    try:
        tree = ast.parse(source)
        comments: dict[int, str] = {}
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
    except (SyntaxError, tokenize.TokenError):
        return {}
    class_defs = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    if not class_defs:
        return {}
    out = {}
    for node in class_defs[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            lines = range(node.lineno, (node.end_lineno or node.lineno) + 1)
            text = " ".join(comments[i] for i in lines if i in comments)
            if text:
                out[node.target.id] = text
    return out


def field_help(cls: type) -> dict[str, str]:
    """Help text of every init field of the dataclass `cls` ('' where undocumented).

    `metadata={"help": ...}` wins over the trailing comment; inherited fields are looked
    up in the class that declares them.
    """
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            comments.update(_field_comments(klass))
    return {f.name: str(f.metadata.get("help", comments.get(f.name, "")))
            for f in _init_fields(cls)}


def _default_repr(f: dataclasses.Field) -> str:
    if f.default is not _MISSING:
        value = f.default
    elif f.default_factory is not _MISSING:
        value = f.default_factory()
    else:
        return "<required>"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return "(see below)"  # its fields are listed on the following lines
    return repr(value)


def _nested_dataclass(tp: Any) -> type | None:
    """The dataclass inside `tp` if `tp` is a dataclass or `Dataclass | None`."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) == 1 and dataclasses.is_dataclass(options[0]):
            return options[0]
    return None


def _describe_rows(cls: type, prefix: str, rows: list[tuple[str, str, str, str]]) -> None:
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    for f in _init_fields(cls):
        name = prefix + f.name
        tp = hints[f.name]
        nested = _nested_dataclass(tp)
        if nested is not None:
            doc = helps[f.name] or (inspect.getdoc(nested) or "").split("\n")[0]
            rows.append((name, _type_name(tp), _default_repr(f), doc))
            _describe_rows(nested, name + ".", rows)
        else:
            rows.append((name, _type_name(tp), _default_repr(f), helps[f.name]))


def describe(cls: type, *, prefix: str = "") -> str:
    """Every knob of the dataclass `cls` (recursively), one per line: name, type, default, help.

    Args:
        cls: A dataclass type.
        prefix: Prepended to every name, e.g. `"config."`.

    Returns:
        An aligned, human-readable table; nested dataclass fields are listed under their
        parent with dotted names.
    """
    rows: list[tuple[str, str, str, str]] = []
    _describe_rows(cls, prefix, rows)
    if not rows:
        return ""
    widths = [min(max(len(r[i]) for r in rows), limit) for i, limit in enumerate((48, 40, 24))]
    lines = []
    for name, tp, default, text in rows:
        line = f"{name:<{widths[0]}}  {tp:<{widths[1]}}  = {default:<{widths[2]}}"
        lines.append((line + ("  # " + text if text else "")).rstrip())
    return "\n".join(lines)
