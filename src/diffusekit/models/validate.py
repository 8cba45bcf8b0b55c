"""Typed validation of config values: one set of specs for our dataclasses and for JSON read from files.

Every config that comes from a file (a diffusekit ``diffusekit.config`` metadata entry, a diffusers
``config.json``, ``model_index.json``, ``scheduler_config.json``) is checked field by field against a
spec here before it becomes a frozen dataclass, and the dataclasses check themselves again in
``__post_init__``. A failure is a one-line ``ConfigError`` naming the file, the field, the value and
what is valid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_COUNT = 128  # blocks, layers, levels: more would build millions of modules before any shape check
MAX_WIDTH = 1 << 20  # channels, widths, vocabulary: far above any real model, far below an absurd allocation


def _show(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ConfigError(ValueError):
    """A config value is missing, of the wrong type or out of range; the message names file and field."""

    def __init__(self, field: str, problem: str, source: str = "") -> None:
        self.field, self.problem, self.source = field, problem, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}{problem}" if field else f"{where}{problem.lstrip(': ')}")

    def within(self, prefix: str) -> ConfigError:
        """The same error for a field nested under `prefix` (e.g. 'unet')."""
        return ConfigError(f"{prefix}.{self.field}" if self.field else prefix, self.problem, self.source)

    def at(self, source: str) -> ConfigError:
        """The same error attributed to `source` (a file, or a file and its metadata key)."""
        return ConfigError(self.field, self.problem, source if not self.source else self.source)


def invalid(field: str, value: object, valid: str) -> ConfigError:
    """The standard error for `field` holding `value` where `valid` describes what is allowed."""
    return ConfigError(field, f"={_show(value)} is invalid; valid: {valid}")


class Spec:
    """What a field may hold; `check` returns the normalized value or raises ValueError(description)."""

    def describe(self) -> str:
        raise NotImplementedError

    def check(self, value: Any) -> Any:
        raise NotImplementedError


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Int(Spec):
    lo: int = 0
    hi: int = MAX_WIDTH
    also: tuple[int, ...] = ()  # special values outside the range (e.g. -1 for "unused")

    def describe(self) -> str:
        text = f"an integer in {self.lo}..{self.hi}"
        return text + "".join(f" or {a}" for a in self.also)

    def check(self, value: Any) -> int:
        if not _is_int(value) or not (self.lo <= value <= self.hi or value in self.also):
            raise ValueError(self.describe())
        return value


@dataclass(frozen=True)
class Float(Spec):
    lo: float = 0.0
    hi: float = math.inf
    lo_open: bool = True  # lo itself is not allowed

    def describe(self) -> str:
        left = "(" if self.lo_open else "["
        return f"a finite number in {left}{self.lo:g}, {self.hi:g}]"

    def check(self, value: Any) -> float:
        if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
            raise ValueError(self.describe())
        if value < self.lo or (self.lo_open and value == self.lo) or value > self.hi:
            raise ValueError(self.describe())
        return float(value)


@dataclass(frozen=True)
class Bool(Spec):
    def describe(self) -> str:
        return "true or false"

    def check(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(self.describe())
        return value


@dataclass(frozen=True)
class Choice(Spec):
    values: tuple[Any, ...]

    def describe(self) -> str:
        return "one of " + ", ".join(_show(v) for v in self.values)

    def check(self, value: Any) -> Any:
        if not any(type(value) is type(v) and value == v for v in self.values):
            raise ValueError(self.describe())
        return value


@dataclass(frozen=True)
class Text(Spec):
    def describe(self) -> str:
        return "a string"

    def check(self, value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(self.describe())
        return value


@dataclass(frozen=True)
class Items(Spec):
    """A list of values of one spec (a tuple once checked)."""

    item: Spec = Int(1)
    min_len: int = 1
    max_len: int = 16

    def describe(self) -> str:
        return f"a list of {self.min_len}..{self.max_len} entries, each {self.item.describe()}"

    def check(self, value: Any) -> tuple[int, ...]:
        if not isinstance(value, (list, tuple)) or not self.min_len <= len(value) <= self.max_len:
            raise ValueError(self.describe())
        for v in value:
            try:
                self.item.check(v)
            except ValueError:
                raise ValueError(self.describe()) from None
        return tuple(value)


Ints = Items  # a list of integers: Ints(Int(1, 64), 1, 8)


@dataclass(frozen=True)
class Optional(Spec):
    inner: Spec

    def describe(self) -> str:
        return f"null or {self.inner.describe()}"

    def check(self, value: Any) -> Any:
        return None if value is None else self.inner.check(value)


@dataclass(frozen=True)
class PerLevel(Spec):
    """One value for every level, or a list with one per level (diffusers' convention)."""

    item: Spec

    def describe(self) -> str:
        return f"{self.item.describe()}, or a list of them (one per level)"

    def check(self, value: Any) -> Any:
        try:
            if isinstance(value, (list, tuple)):
                if not value:
                    raise ValueError
                return tuple(self.item.check(v) for v in value)
            return self.item.check(value)
        except ValueError:
            raise ValueError(self.describe()) from None


def check_value(field: str, value: Any, spec: Spec) -> Any:
    """`value` normalized by `spec`, or a ConfigError naming `field`."""
    try:
        return spec.check(value)
    except ValueError:
        raise invalid(field, value, spec.describe()) from None


def check_fields(obj: object, specs: Mapping[str, Spec]) -> None:
    """Check (and normalize in place: lists to tuples, ints to floats) the fields of a frozen dataclass."""
    for name, spec in specs.items():
        value = getattr(obj, name)
        checked = check_value(name, value, spec)
        if checked is not value:
            object.__setattr__(obj, name, checked)


class JsonFields:
    """Typed access to a JSON object read from `source`; every failure names the file and the field."""

    def __init__(self, data: object, source: str) -> None:
        if not isinstance(data, dict):
            kind = {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(
                type(data), "null" if data is None else type(data).__name__
            )
            raise ConfigError("", f"is a JSON {kind}, expected an object of fields", source)
        self.data, self.source = data, source

    def __contains__(self, name: str) -> bool:
        return name in self.data

    def get(self, name: str, spec: Spec, default: Any = ...) -> Any:
        """The field checked against `spec`; `default` (unchecked) when absent; missing is an error."""
        if name not in self.data:
            if default is ...:
                raise ConfigError(name, f" is missing; valid: {spec.describe()}", self.source)
            return default
        try:
            return check_value(name, self.data[name], spec)
        except ConfigError as e:
            raise e.at(self.source) from None

    def error(self, field: str, problem: str) -> ConfigError:
        """A ConfigError about `field` of this file (problem starts with '=' or ' ')."""
        return ConfigError(field, problem, self.source)

    def build(self, kind: type, renames: Mapping[str, str] | None = None, **values: Any) -> Any:
        """`kind(**values)`; its own checks fail naming this file and the file's field (via `renames`)."""
        try:
            return kind(**values)
        except ConfigError as e:
            field = (renames or {}).get(e.field, e.field)
            raise ConfigError(field, e.problem, self.source) from None
