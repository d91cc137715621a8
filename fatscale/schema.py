"""The schema engine behind recipes (fatscale.config) and shard manifests (fatscale.data.manifest).

A schema is a tree of dataclasses deriving from ``Section``. Each field is a ``setting``: its
default (none: required) and the check its value must pass, side by side; a section's checks
across fields are its ``_check_together``. Every section checks itself when it is made, so a
section in hand is a valid one. ``build`` makes one from plain data (YAML, JSON): unknown keys,
wrong types and failed checks raise one ``SchemaError`` line naming the key, e.g.
``data.img_size: must be at least 32, got 8``.

Types: dataclasses, ``X | None``, ``Literal``, ``tuple[X, Y]``, ``tuple[X, ...]``,
``list[X]``, ``dict[str, X]``, bool, int, float, str, Any. Imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Callable, Literal


class SchemaError(ValueError):
    """A value that does not fit its schema (one line naming the key). ``whole``: a problem of the
    section itself rather than of one of its keys (then it is said after the section's path)."""

    def __init__(self, message: str, whole: bool = False):
        super().__init__(message)
        self.whole = whole


# A check: what is wrong with a value (the message after "key: "), or None when it is fine.
Check = Callable[[Any], "str | None"]


def must(test: Callable[[Any], bool], what: str) -> Check:
    return lambda value: None if test(value) else f"must be {what}, got {value!r}"


def at_least(low: int) -> Check:
    return must(lambda v: v >= low, f"at least {low}")


POSITIVE = must(lambda v: v > 0, "positive")
NON_NEGATIVE = must(lambda v: v >= 0, "non-negative")
PROBABILITY = must(lambda v: 0 <= v <= 1, "a probability")
BELOW_ONE = must(lambda v: 0 <= v < 1, "in [0, 1)")


def setting(default: Any = dataclasses.MISSING, check: Check | None = None, *, factory: Any = dataclasses.MISSING):
    """A key: its default (none given: required) and the check its value must pass once its type is
    right. None, where the type allows it, means "not set" and is not checked."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"check": check} if check else {})


class Section:
    """Checks each key against its ``setting`` check when made, then ``_check_together``. Messages
    name the key within the section; ``build`` adds the section's path."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check, value = f.metadata.get("check"), getattr(self, f.name)
            if check is not None and value is not None:
                problem = check(value)
                if problem:
                    raise SchemaError(f"{f.name}: {problem}")
        self._check_together()

    def _check_together(self) -> None:
        """Checks across the section's keys (SchemaError)."""


def type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_EXPONENT_NUMBER = re.compile(r"[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """``value`` as type ``tp``, or SchemaError."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SchemaError(f"{where}: expected a mapping, got {value!r}")
        return build(tp, value, where)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except SchemaError as e:
                errors.append(str(e))
        raise SchemaError(errors[0]) if len(errors) == 1 else SchemaError(f"{where}: expected {type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool) != any(isinstance(a, bool) for a in typing.get_args(tp)):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise SchemaError(f"{where}: expected one of {choices}, got {value!r}")
        return value
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise SchemaError(f"{where}: expected a list, got {value!r}")
        if origin is list or args[1:] == (Ellipsis,):
            return origin(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise SchemaError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise SchemaError(f"{where}: expected a mapping, got {value!r}")
        return {_convert(k, key_type, f"{where} key"): _convert(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise SchemaError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value):
            return float(value)  # YAML 1.1 (PyYAML) reads 5e-4, without a dot, as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SchemaError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"schema: unsupported type {tp} at {where}")


def build(cls: type, values: dict, where: str = "") -> Any:
    """A ``cls`` section from a mapping, fully checked; ``where``: its path, for messages."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise SchemaError(f"{prefix}{unknown[0]}: unknown key (allowed: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name in values:
            kwargs[name] = _convert(values[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = _convert({}, hints[name], key)
            else:
                raise SchemaError(f"{key}: required")
    try:
        return cls(**kwargs)
    except SchemaError as e:  # the section's own checks name the key within it
        if not where:
            raise
        raise SchemaError(f"{where}: {e}" if e.whole else f"{where}.{e}") from None
