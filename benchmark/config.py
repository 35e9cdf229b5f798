"""Learner configs: declaring fields, checking a Config class, ``-o key=value`` overrides, typed values.

A learner's ``Config`` is a frozen dataclass. Each field has a default and a help line, and may declare a
range; ``option()`` writes that in one call::

    @dataclass(frozen=True)
    class Config:
        inner_lr: float = option(0.4, "SGD step size of the inner loop", min=0, min_inclusive=False)
        inner_steps: int = option(1, "inner SGD steps", min=1, max=1000)

Supported field types: ``int``, ``float``, ``bool``, ``str``, ``Literal[...]``, an ``enum.Enum`` subclass,
``Optional``/unions of those, ``tuple[T, ...]``, ``tuple[T1, T2]`` and ``list[T]``. ``check_config_class``
rejects anything else when a plugin registers its learner, so that ``-o`` can set every field.

Overrides are strings coerced to the field's annotated type (annotations may be strings under
``from __future__ import annotations``, so they are resolved with ``typing.get_type_hints``). Values set
from Python (paper presets) go through ``replace_fields``, which checks types and ranges the same way.
Non-finite floats are always refused: a NaN learning rate only ever trains on NaN. Unknown keys and bad
values raise ``ConfigError`` naming the key, what was expected and what was given.

No torch here: ``bench learners`` and ``--help`` use this module.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from typing import Any, Literal, Mapping, Sequence, Union

from benchmark.errors import ConfigError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}


class _Hint(ValueError):
    """A coercion failure whose text is worth showing to the user."""


# -- declaring fields -----------------------------------------------------------------------------------------
def option(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    min_inclusive: bool = True,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A config field with a help line and an optional numeric range (checked for every value it takes).

    Args:
        default: the default value (pass ``default_factory`` instead for lists).
        help: one line for ``bench learners NAME``.
        min, max: bounds for int/float fields (``max`` is inclusive; ``min`` too unless ``min_inclusive``).
    """
    metadata = {"help": help, "min": min, "max": max, "min_inclusive": min_inclusive}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# -- checking a Config class (at registration) ----------------------------------------------------------------
def check_config_class(cls: Any, owner: str) -> None:
    """Raise ConfigError if ``cls`` is not a usable learner Config: a frozen dataclass whose every field has a
    default, a help line and a supported type.

    Args:
        owner: names the learner in the message, e.g. "learner 'nearest' (plugin file x.py)".
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ConfigError(f"{owner}: Config is not a dataclass; decorate it with @dataclass(frozen=True)")
    if not cls.__dataclass_params__.frozen:
        raise ConfigError(f"{owner}: Config must be frozen so a run's config cannot change under it; "
                          "use @dataclass(frozen=True)")
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        where = f"{owner}: Config field {f.name!r}"
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where} has no default; every field needs one (the paper's value)")
        if not str(f.metadata.get("help", "")).strip():
            raise ConfigError(f"{where} has no help line; declare it with benchmark.config.option(default, "
                              "'what it does') or field(metadata={'help': ...})")
        problem = _unsupported(hints.get(f.name, f.type))
        if problem:
            raise ConfigError(f"{where}: {problem}")


def _unsupported(tp: Any) -> str | None:
    """Why ``tp`` cannot be set from the command line, or None."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in (int, float, bool, str) or tp is type(None) or origin is Literal:
        return None
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return None
    if origin in (Union, types.UnionType):
        return next((p for p in map(_unsupported, args) if p), None)
    if tp is tuple or tp is list or (origin in (tuple, list) and not args):
        return (f"a bare {getattr(tp, '__name__', tp)} cannot be parsed from -o; annotate the item type, "
                "e.g. tuple[int, ...] or list[int]")
    if origin in (tuple, list):
        items = [a for a in args if a is not Ellipsis]
        return next((p for p in map(_unsupported, items) if p), None)
    return (f"type {tp!r} is not supported; use int, float, bool, str, Literal, an Enum, Optional, "
            "tuple[T, ...] or list[T]")


# -- values --------------------------------------------------------------------------------------------------
def apply_overrides(config: Any, overrides: Sequence[str]) -> Any:
    """A copy of ``config`` with ``key=value`` overrides applied (the original is not changed).

    Args:
        config: a dataclass instance (usually frozen).
        overrides: strings such as ``"inner_lr=0.4"``; a later override of the same key wins.

    Raises:
        ConfigError: missing ``=``, an unknown key (the message lists the valid ones) or a value that does
            not fit the field's type or range.
    """
    if not overrides:
        return config
    fields = _fields(config)
    hints = _type_hints(type(config))
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            example = next(iter(fields), "key")
            raise ConfigError(f"override {item!r} is not of the form KEY=VALUE; write e.g. -o {example}=VALUE")
        _known(config, fields, key)
        changes[key] = coerce(raw.strip(), hints.get(key, str), key=key)
    for key, value in changes.items():
        check_value(fields[key], value)
    return dataclasses.replace(config, **changes)


def replace_fields(config: Any, values: Mapping[str, Any], source: str) -> Any:
    """``dataclasses.replace`` for values set in Python (a paper preset), with the same checks as ``-o``.

    Args:
        source: names where the values come from, for messages (e.g. "preset finn2017").
    """
    if not values:
        return config
    fields = _fields(config)
    hints = _type_hints(type(config))
    for key, value in values.items():
        _known(config, fields, key, source)
        if not _fits(value, hints.get(key, Any)):
            raise ConfigError(f"{source} sets {key}={value!r}, which is not {type_name(hints.get(key, Any))}")
        check_value(fields[key], value)
    return dataclasses.replace(config, **values)


def check_value(f: dataclasses.Field, value: Any) -> None:
    """Refuse non-finite floats and values outside the field's declared range (``option(min=, max=)``)."""
    numbers = value if isinstance(value, (tuple, list)) else (value,)
    for number in numbers:
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            continue
        if isinstance(number, float) and not math.isfinite(number):
            raise ConfigError(f"option {f.name!r} must be a finite number, got {number}")
        low, high = f.metadata.get("min"), f.metadata.get("max")
        inclusive = f.metadata.get("min_inclusive", True)
        if low is not None and (number < low or (number == low and not inclusive)):
            bound = f">= {low}" if inclusive else f"> {low}"
            raise ConfigError(f"option {f.name!r} must be {bound}, got {number}; pass e.g. -o {f.name}={f.default}")
        if high is not None and number > high:
            raise ConfigError(f"option {f.name!r} must be <= {high}, got {number}; pass e.g. -o {f.name}={f.default}")


def check_config(config: Any) -> None:
    """Check every field value of a built config (defaults included) against its range."""
    for f in dataclasses.fields(config):
        if f.init:
            check_value(f, getattr(config, f.name))


def _fields(config: Any) -> dict[str, dataclasses.Field]:
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise ConfigError(f"cannot apply overrides to {config!r}: the learner's Config is not a dataclass")
    return {f.name: f for f in dataclasses.fields(config) if f.init}


def _known(config: Any, fields: Mapping[str, Any], key: str, source: str = "") -> None:
    if key not in fields:
        valid = ", ".join(fields) or "(this learner has no options)"
        origin = f" (set by {source})" if source else ""
        raise ConfigError(f"unknown option {key!r}{origin} for {type(config).__qualname__}; valid options: {valid}")


def _fits(value: Any, tp: Any) -> bool:
    """Whether a Python value is of type ``tp`` (ints count as floats)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if origin in (Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin in (tuple, list):
        if not isinstance(value, origin):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(args) == len(value) and all(_fits(v, a) for v, a in zip(value, args))
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else True


def coerce(raw: str, tp: Any, *, key: str = "value") -> Any:
    """Convert the string ``raw`` to type ``tp`` (see the module docstring for the supported types)."""
    try:
        return _coerce(raw, tp)
    except (ValueError, TypeError) as exc:
        # Our own hints ("needs 2 comma-separated items") help; Python's "invalid literal for int()" repeats us.
        detail = f" ({exc})" if isinstance(exc, _Hint) else ""
        raise ConfigError(f"option {key!r} expects {type_name(tp)}, got {raw!r}{detail}") from None


def _coerce(raw: str, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any or tp is str:
        return raw
    if origin is Literal:
        for choice in typing.get_args(tp):
            if str(choice) == raw or (isinstance(choice, bool) and raw.lower() in (_TRUE if choice else _FALSE)):
                return choice
        raise ValueError("")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if raw in (member.name, str(member.value)):
                return member
        raise ValueError("")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and raw.lower() in _NONE:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(raw, arg)
            except (ValueError, TypeError):
                continue
        raise ValueError("")
    if origin in (tuple, list):
        args = typing.get_args(tp)
        parts = [p.strip() for p in raw.strip("()[] ").split(",") if p.strip()]
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            return origin(_coerce(p, args[0]) for p in parts)
        if len(parts) != len(args):
            raise _Hint(f"needs {len(args)} comma-separated items")
        return tuple(_coerce(p, a) for p, a in zip(parts, args))
    if tp is bool:
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError("")
    if tp is int:
        return int(raw)  # "1.5" and "1e3" are rejected on purpose: an int field is a count
    if tp is float:
        return float(raw)
    raise _Hint(f"unsupported field type {tp!r}; use int, float, bool, str, Literal, an Enum, Optional, tuple or list")


def type_name(tp: Any) -> str:
    """A readable name for a type: ``int``, ``float | None``, ``one of: first, second``, ``tuple of int``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of: " + ", ".join(str(c) for c in typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of: " + ", ".join(m.name for m in tp)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            return f"{origin.__name__} of {type_name(args[0])} (comma-separated)"
        return "tuple (" + ", ".join(type_name(a) for a in args) + ")"
    if tp is type(None):
        return "none"
    if tp is bool:
        return "bool (true/false)"
    return getattr(tp, "__name__", str(tp))


def json_value(value: Any) -> Any:
    """A config value as plain JSON (Enum members by value, tuples as lists)."""
    if isinstance(value, enum.Enum):
        return json_value(value.value)
    if isinstance(value, (tuple, list)):
        return [json_value(v) for v in value]
    return value


def describe_fields(config_cls_or_instance: Any) -> list[dict[str, Any]]:
    """One dict per config field: ``{"name", "type", "default", "help"}`` (plus ``"range"`` when declared).

    Given a class, ``default`` is the field's declared default (``None`` when it has none); given an
    instance (e.g. ``Learner.default_config(way, shot)``), it is that instance's value.
    """
    is_instance = not isinstance(config_cls_or_instance, type)
    cls = type(config_cls_or_instance) if is_instance else config_cls_or_instance
    if not dataclasses.is_dataclass(cls):
        return []
    hints = _type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if is_instance:
            default = getattr(config_cls_or_instance, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        row = {"name": f.name, "type": type_name(hints.get(f.name, f.type)), "default": json_value(default),
               "help": str(f.metadata.get("help", ""))}
        if f.metadata.get("min") is not None or f.metadata.get("max") is not None:
            row["range"] = _range_text(f)
        rows.append(row)
    return rows


def _range_text(f: dataclasses.Field) -> str:
    low, high = f.metadata.get("min"), f.metadata.get("max")
    left = "" if low is None else (f"{low} <= " if f.metadata.get("min_inclusive", True) else f"{low} < ")
    right = "" if high is None else f" <= {high}"
    return f"{left}x{right}"


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception as exc:  # noqa: BLE001 - e.g. a name only imported under TYPE_CHECKING
        raise ConfigError(
            f"cannot resolve the field types of {cls.__qualname__} ({type(exc).__name__}: {exc}); "
            "import every type used in its annotations at module level"
        ) from exc
