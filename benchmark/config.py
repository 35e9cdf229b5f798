"""Learner configs from the command line: ``-o key=value`` overrides and field descriptions.

A learner's ``Config`` is a frozen dataclass. Overrides are strings; each is coerced to the field's
annotated type (annotations may be strings under ``from __future__ import annotations``, so they are
resolved with ``typing.get_type_hints``). Unknown keys and bad values raise ``ConfigError`` naming the key,
what was expected and what was given.

No torch here: ``bench learners`` and ``--help`` use this module.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Sequence, Union

from benchmark.errors import ConfigError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}


class _Hint(ValueError):
    """A coercion failure whose text is worth showing to the user."""


def apply_overrides(config: Any, overrides: Sequence[str]) -> Any:
    """A copy of ``config`` with ``key=value`` overrides applied (the original is not changed).

    Args:
        config: a dataclass instance (usually frozen).
        overrides: strings such as ``"inner_lr=0.4"``; a later override of the same key wins.

    Raises:
        ConfigError: missing ``=``, an unknown key (the message lists the valid ones) or a value that does
            not fit the field's type.
    """
    if not overrides:
        return config
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise ConfigError(f"cannot apply overrides to {config!r}: the learner's Config is not a dataclass")
    hints = _type_hints(type(config))
    names = [f.name for f in dataclasses.fields(config) if f.init]
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            example = names[0] if names else "key"
            raise ConfigError(f"override {item!r} is not of the form KEY=VALUE; write e.g. -o {example}=VALUE")
        if key not in names:
            valid = ", ".join(names) or "(this learner has no options)"
            raise ConfigError(f"unknown option {key!r} for {type(config).__qualname__}; valid options: {valid}")
        changes[key] = coerce(raw.strip(), hints.get(key, str), key=key)
    return dataclasses.replace(config, **changes)


def coerce(raw: str, tp: Any, *, key: str = "value") -> Any:
    """Convert the string ``raw`` to type ``tp`` (int, float, bool, str, Optional, Literal, Union, tuple)."""
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
    if origin is tuple:
        args = typing.get_args(tp)
        parts = [p.strip() for p in raw.strip("()[] ").split(",") if p.strip()]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(p, args[0]) for p in parts)
        if args and len(parts) != len(args):
            raise _Hint(f"needs {len(args)} comma-separated items")
        return tuple(_coerce(p, a) for p, a in zip(parts, args)) if args else tuple(parts)
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
    if isinstance(tp, type):
        return tp(raw)
    raise _Hint(f"unsupported field type {tp!r}; use int, float, bool, str, Literal, Optional or tuple")


def type_name(tp: Any) -> str:
    """A readable name for a type: ``int``, ``float | None``, ``one of: first, second``, ``tuple of int``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of: " + ", ".join(str(c) for c in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"tuple of {type_name(args[0])} (comma-separated)"
        return "tuple (" + ", ".join(type_name(a) for a in args) + ")"
    if tp is type(None):
        return "none"
    if tp is bool:
        return "bool (true/false)"
    return getattr(tp, "__name__", str(tp))


def describe_fields(config_cls_or_instance: Any) -> list[dict[str, Any]]:
    """One dict per config field: ``{"name", "type", "default", "help"}``.

    Given a class, ``default`` is the field's declared default (``None`` when it has none); given an
    instance (e.g. ``Learner.default_config(way, shot)``), it is that instance's value. ``help`` comes from
    ``field(metadata={"help": ...})``.
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
        rows.append(
            {
                "name": f.name,
                "type": type_name(hints.get(f.name, f.type)),
                "default": default,
                "help": str(f.metadata.get("help", "")),
            }
        )
    return rows


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception as exc:  # noqa: BLE001 - e.g. a name only imported under TYPE_CHECKING
        raise ConfigError(
            f"cannot resolve the field types of {cls.__qualname__} ({type(exc).__name__}: {exc}); "
            "import every type used in its annotations at module level"
        ) from exc
