"""``-o key=value`` overrides and config field descriptions.

The annotations below are strings (``from __future__ import annotations``), as in most learner modules, so
these tests also check that field types are resolved with ``typing.get_type_hints``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from benchmark.config import apply_overrides, describe_fields
from benchmark.errors import ConfigError


@dataclass(frozen=True)
class Config:
    inner_steps: int = field(default=1, metadata={"help": "SGD steps per task"})
    inner_lr: float = field(default=0.4, metadata={"help": "inner-loop learning rate"})
    first_order: bool = False
    order_name: Literal["first", "second"] = "second"
    label: str = "x"
    clip: Optional[float] = None
    max_norm: float | None = 10.0
    hidden: tuple[int, ...] = (64, 64)
    seeds: list[int] = field(default_factory=lambda: [0, 1])


def test_no_overrides_returns_the_same_config():
    config = Config()
    assert apply_overrides(config, []) is config


def test_values_are_coerced_to_the_field_types():
    config = apply_overrides(
        Config(),
        ["inner_steps=5", "inner_lr=1e-3", "first_order=yes", "order_name=first", "label=a=b",
         "clip=0.5", "max_norm=none", "hidden=32,16, 8"],
    )
    assert config.inner_steps == 5 and type(config.inner_steps) is int
    assert config.inner_lr == pytest.approx(1e-3) and type(config.inner_lr) is float
    assert config.first_order is True
    assert config.order_name == "first"
    assert config.label == "a=b"  # only the first '=' separates key and value
    assert config.clip == 0.5
    assert config.max_norm is None
    assert config.hidden == (32, 16, 8)
    assert Config().inner_steps == 1  # the original is untouched (frozen, and a new object is returned)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.inner_steps = 3  # type: ignore[misc]


@pytest.mark.parametrize(("raw", "expected"), [("true", True), ("False", False), ("1", True), ("0", False),
                                               ("YES", True), ("no", False)])
def test_bool_spellings(raw, expected):
    assert apply_overrides(Config(), [f"first_order={raw}"]).first_order is expected


def test_float_field_accepts_an_integer_and_last_override_wins():
    config = apply_overrides(Config(), ["inner_lr=1", "inner_lr=2"])
    assert config.inner_lr == 2.0 and type(config.inner_lr) is float


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), ["inner_step=5"])
    message = str(info.value)
    assert "unknown option 'inner_step'" in message
    assert "valid options: inner_steps, inner_lr, first_order, order_name, label, clip, max_norm, hidden, seeds" in message


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("inner_steps=1.5", r"option 'inner_steps' expects int, got '1.5'"),
        ("inner_steps=", r"option 'inner_steps' expects int, got ''"),
        ("inner_lr=fast", r"option 'inner_lr' expects float, got 'fast'"),
        ("first_order=maybe", r"option 'first_order' expects bool \(true/false\), got 'maybe'"),
        ("order_name=third", r"option 'order_name' expects one of: first, second, got 'third'"),
        ("clip=big", r"option 'clip' expects float \| none, got 'big'"),
        ("hidden=3,x", r"option 'hidden' expects tuple of int \(comma-separated\), got '3,x'"),
    ],
)
def test_bad_values_name_key_type_and_value(override, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(Config(), [override])


@pytest.mark.parametrize("override", ["inner_steps", "=5", ""])
def test_missing_equals_sign_is_a_clear_error(override):
    with pytest.raises(ConfigError, match=r"is not of the form KEY=VALUE"):
        apply_overrides(Config(), [override])


def test_config_without_fields_says_so():
    @dataclass(frozen=True)
    class Empty:
        pass

    with pytest.raises(ConfigError, match=r"valid options: \(this learner has no options\)"):
        apply_overrides(Empty(), ["x=1"])


def test_describe_fields_of_class_and_instance():
    rows = describe_fields(Config)
    assert [r["name"] for r in rows] == [f.name for f in dataclasses.fields(Config)]
    first = rows[0]
    assert first == {"name": "inner_steps", "type": "int", "default": 1, "help": "SGD steps per task"}
    by_name = {r["name"]: r for r in rows}
    assert by_name["order_name"]["type"] == "one of: first, second"
    assert by_name["clip"]["type"] == "float | none" and by_name["clip"]["default"] is None
    assert by_name["max_norm"]["type"] == "float | none"
    assert by_name["seeds"]["default"] == [0, 1]  # default_factory is called
    assert by_name["label"]["help"] == ""
    # Given an instance (e.g. default_config(way, shot)), the defaults are that instance's values.
    tuned = describe_fields(Config(inner_steps=10))
    assert tuned[0]["default"] == 10


def test_unresolvable_annotation_is_a_config_error():
    @dataclass(frozen=True)
    class Broken:
        x: NotDefinedAnywhere = 1  # type: ignore[name-defined]  # noqa: F821

    with pytest.raises(ConfigError, match=r"cannot resolve the field types of .*Broken"):
        apply_overrides(Broken(), ["x=2"])
