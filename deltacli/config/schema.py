"""Typed dataclasses from untyped YAML: validation with messages that name the fix.

Recipes and delta configs are plain dataclasses whose fields carry a default and a one-line
help (`option`). `build` turns a parsed YAML mapping into such a dataclass, rejecting unknown
keys (suggesting the closest) and values of the wrong type; `to_dict` is its inverse, used to
save the resolved recipe.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, TypeVar, Union

from deltacli.errors import DeltacliError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Range:
    """Where a number may lie: `low` and `high` are bounds (None: unbounded), each inclusive
    unless marked open. Written as the error message reads: "in [0, 1)", "at least 1"."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            if self.low == 0 and self.low_open:
                return "positive"
            return f"{'more than' if self.low_open else 'at least'} {self.low:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


POSITIVE = Range(0, low_open=True)
AT_LEAST_ONE = Range(1)
NOT_NEGATIVE = Range(0)
FRACTION = Range(0, 1, high_open=True)  # [0, 1)
DENSITY = Range(0, 1, low_open=True)  # (0, 1]


def option(default: Any, help: str, within: Range | None = None, kw_only: bool = False) -> Any:
    """A dataclass field with a default, the one line of help `deltacli recipes` shows, and
    optionally the range its number must lie in (checked by `check_ranges`). `kw_only`: a
    base class's field that its subclasses' own fields may precede."""
    metadata = {"help": help, "within": within}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return dataclasses.field(
            default_factory=lambda: copy.deepcopy(default), metadata=metadata, kw_only=kw_only
        )
    return dataclasses.field(default=default, metadata=metadata, kw_only=kw_only)


def check_ranges(obj: Any, path: str) -> None:
    """Every numeric field of dataclass `obj` within the range its `option` gives; `path`
    names it in the message (`train.lr must be positive, got 0.0`)."""
    for field in dataclasses.fields(obj):
        within, value = field.metadata.get("within"), getattr(obj, field.name)
        if within is not None and value is not None and value not in within:
            raise DeltacliError(f"{path}{field.name} must be {within}, got {value}")


@dataclasses.dataclass(frozen=True)
class KeyHelp:
    """One recipe key as `deltacli recipes --keys` lists it."""

    key: str  # dotted, as an override spells it (`train.lr`, `deltas.0.r`)
    type: str
    default: str
    within: str  # the range a number must lie in, or ""
    help: str


def describe(cls: type, prefix: str = "", skip: tuple[str, ...] = ()) -> list[KeyHelp]:
    """Every key of dataclass `cls` (nested sections flattened under `prefix`), read from
    the fields' own `option`s: what a user can set, of what type, within what range, and
    why. `skip` leaves out fields listed elsewhere (the `deltas` list)."""
    hints = typing.get_type_hints(cls)
    keys = []
    for field in dataclasses.fields(cls):
        if not field.init or field.name in skip:
            continue
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            keys += describe(hint, f"{prefix}{field.name}.")
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        else:
            default = field.default_factory()  # type: ignore[misc]
        within = field.metadata.get("within")
        keys.append(
            KeyHelp(
                key=prefix + field.name,
                type=_type_text(hint),
                default=_default_text(default),
                within=str(within) if within else "",
                help=field.metadata.get("help", ""),
            )
        )
    return keys


def _default_text(value: Any) -> str:
    """A default as YAML spells it."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _type_text(hint: Any) -> str:
    """A type as a recipe author reads it: `integer`, `number or null`, `nf4 | int8`."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        parts = [_type_text(h) for h in typing.get_args(hint) if h is not type(None)]
        optional = type(None) in typing.get_args(hint)
        return " or ".join(parts) + (" or null" if optional else "")
    if origin is Literal:
        return " | ".join(map(str, typing.get_args(hint)))
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return f"list of {_type_text(item)}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(hint):
        return "{" + ", ".join(f.name for f in dataclasses.fields(hint)) + "}"
    names = {int: "integer", float: "number", str: "text", bool: "true/false", Any: "any"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def build(cls: type[T], data: Any, path: str = "", prebuilt: dict[str, Any] | None = None) -> T:
    """An instance of dataclass `cls` from a mapping, checking every key and type.

    `path` is the dotted location of `data` in the recipe, so errors read
    `unknown key 'train.lrr' (did you mean 'train.lr'?)`. `prebuilt` fields are passed as
    they are: values the caller validated itself (a list of delta configs of several kinds).
    """
    if not isinstance(data, dict):
        raise DeltacliError(f"{path or 'recipe'} must be a mapping, got {_type_name(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    values = dict(prebuilt or {})
    for key, value in data.items():
        if key in values:
            continue
        if key not in fields:
            raise DeltacliError(_unknown_key(str(key), list(fields), path))
        values[key] = coerce(value, hints[key], _join(path, key))
    return cls(**values)


def coerce(value: Any, hint: Any, path: str) -> Any:
    """`value` checked against the type `hint`; numbers written as strings become numbers.

    PyYAML reads `1e-4` as a string (YAML 1.1 wants `1.0e-4`), and `key=value` overrides
    arrive as strings, so numeric fields accept any string that parses as that number.
    """
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        hints = [o for o in options if o is not type(None)]
        exact = [h for h in hints if h in (int, float, str, bool) and type(value) is h]
        errors = []
        for option_hint in exact or hints:
            try:
                return coerce(value, option_hint, path)
            except DeltacliError as error:
                errors.append(error)
        raise errors[-1]
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise DeltacliError(
                f"{path} must be one of {', '.join(map(str, choices))}; got {value!r}"
            )
        return value
    if origin is list:
        (item_hint,) = typing.get_args(hint) or (Any,)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise DeltacliError(f"{path} must be a list, got {_type_name(value)}")
        return [coerce(v, item_hint, f"{path}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        key_hint, value_hint = typing.get_args(hint)
        if not isinstance(value, dict):
            raise DeltacliError(f"{path} must be a mapping, got {_type_name(value)}")
        return {
            coerce(k, key_hint, path): coerce(v, value_hint, f"{path}.{k}")
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path)
    return _scalar(value, hint, path)


def _scalar(value: Any, hint: Any, path: str) -> Any:
    if hint is Any:
        return value
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    if hint is int and is_number and float(value).is_integer():
        return int(value)
    if hint is float and is_number:
        return _finite(float(value), path)
    if hint in (int, float) and isinstance(value, str):
        with contextlib.suppress(ValueError):
            return _finite(hint(value), path)
    raise DeltacliError(f"{path} must be {_hint_name(hint)}, got {value!r}")


def _finite(value: float, path: str) -> float:
    if not math.isfinite(value):
        raise DeltacliError(f"{path} must be a finite number, got {value}")
    return value


def to_dict(obj: Any) -> Any:
    """A dataclass (and anything inside it) as plain YAML-ready data; delta configs keep
    their `kind` first."""
    if dataclasses.is_dataclass(obj):
        out = {"kind": obj.kind} if hasattr(type(obj), "kind") else {}
        out.update({f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
        return out
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj


def _unknown_key(key: str, known: list[str], path: str) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {_join(path, close[0])!r}?)" if close else ""
    return f"unknown key {_join(path, key)!r}{hint}; known keys: {', '.join(known)}"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(value: Any) -> str:
    return type(value).__name__


def _hint_name(hint: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        hint, str(hint)
    )
