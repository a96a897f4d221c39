"""A small explicit checker for the JSON our files carry (policy headers, token-exit policies,
draft plans). A ground floor: imports nothing from adainfer.

A header edited by hand (a field missing, a number as a string, a null where a model size was)
must be an error that names the file and the field, not a KeyError or TypeError from deep
inside the code that trusted it. Specs are plain values:

- a type: `str`, `bool`, `int` (a whole number, not a bool), `float` (any finite number);
- `Number(finite=False, nan=True)`, `Int(low=1)`: numbers with bounds;
- `Optional(spec)`, `OneOf(*values)`, `ListOf(spec)`, `DictOf(spec, key=...)`;
- `Record({field: spec}, optional=(...), extra=True)`: a JSON object with these fields.

`int_at_least` checks command-line numbers the same way, for the CLI and the bench scripts.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass


class SchemaError(ValueError):
    """A value that does not fit its spec; the message names where and what was expected."""


@dataclass(frozen=True)
class Number:
    finite: bool = True  # False: +-inf allowed (a threshold no token reaches)
    low: float | None = None
    high: float | None = None
    nan: bool = False  # NaN allowed: a file records "not measured"

    def describe(self) -> str:
        text = "a finite number" if self.finite else "a number"
        text += " or NaN" if self.nan else ""
        if self.low is not None:
            text += f" >= {self.low}"
        return text + ("" if self.high is None else f" <= {self.high}")


@dataclass(frozen=True)
class Int:
    low: int | None = None

    def describe(self) -> str:
        return "a whole number" + ("" if self.low is None else f" >= {self.low}")


@dataclass(frozen=True)
class Optional:
    spec: object

    def describe(self) -> str:
        return f"null or {describe(self.spec)}"


@dataclass(frozen=True)
class OneOf:
    values: tuple

    def __init__(self, *values):
        object.__setattr__(self, "values", tuple(values))

    def describe(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)


@dataclass(frozen=True)
class ListOf:
    spec: object

    def describe(self) -> str:
        return f"a list of {describe(self.spec)}s"


@dataclass(frozen=True)
class DictOf:
    spec: object
    key: Callable[[str], object] | None = None  # e.g. int: keys that must read as numbers

    def describe(self) -> str:
        return "an object"


@dataclass(frozen=True)
class Record:
    fields: dict
    optional: tuple = ()
    extra: bool = True  # fields beyond these are kept (a writer may add its own)

    def describe(self) -> str:
        return "an object"


@dataclass(frozen=True)
class Check:
    """Any other rule: `test(value)` true, else `description` says what was expected."""

    test: Callable[[object], bool]
    description: str

    def describe(self) -> str:
        return self.description


_NAMES = {str: "a string", bool: "true or false", int: "a whole number", float: "a finite number"}


def describe(spec) -> str:
    return _NAMES[spec] if isinstance(spec, type) else spec.describe()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fits(value, spec) -> bool:
    """Whether `value` itself (not its items) fits `spec`."""
    if spec is int:
        return _is_int(value)
    if spec is float:
        return _is_number(value) and math.isfinite(value)
    if spec in (str, bool):
        return isinstance(value, spec)
    if isinstance(spec, Int):
        return _is_int(value) and (spec.low is None or value >= spec.low)
    if isinstance(spec, Number):
        if not _is_number(value) or math.isnan(value):
            return _is_number(value) and spec.nan
        return (
            (math.isfinite(value) or not spec.finite)
            and (spec.low is None or value >= spec.low)
            and (spec.high is None or value <= spec.high)
        )
    if isinstance(spec, OneOf):
        return any(value == v and type(value) is type(v) for v in spec.values)
    if isinstance(spec, ListOf):
        return isinstance(value, list)
    if isinstance(spec, (DictOf, Record)):
        return isinstance(value, dict)
    if isinstance(spec, Check):
        return spec.test(value)
    raise TypeError(f"not a spec: {spec!r}")


def check(value, spec, where: str) -> None:
    """Raise SchemaError for the first part of `value` that does not fit `spec`, naming `where`
    (the file, say) and the field's path in it, and what was expected."""
    _check(value, spec, where, "")


def _check(value, spec, where: str, path: str) -> None:
    if isinstance(spec, Optional) and value is None:
        return
    inner = spec.spec if isinstance(spec, Optional) else spec
    if not _fits(value, inner):  # the message says "null or ..." where null would do
        shown = repr(value) if len(repr(value)) < 60 else type(value).__name__
        raise SchemaError(f"{_name(where, path)} must be {describe(spec)}, got {shown}")
    _check_items(value, inner, where, path)


def _check_items(value, spec, where: str, path: str) -> None:
    """The items of a list, a dict or a record that fits as a whole."""
    if isinstance(spec, ListOf):
        for i, item in enumerate(value):
            _check(item, spec.spec, where, f"{path}[{i}]")
    elif isinstance(spec, DictOf):
        for k, item in value.items():
            if spec.key is not None:
                try:
                    spec.key(k)
                except ValueError:
                    raise SchemaError(
                        f"{_name(where, path)} has a key {k!r} that is not a number"
                    ) from None
            _check(item, spec.spec, where, _join(path, k))
    elif isinstance(spec, Record):
        _check_record(value, spec, where, path)


def _check_record(value: dict, spec: Record, where: str, path: str) -> None:
    missing = [k for k in spec.fields if k not in value and k not in spec.optional]
    if missing:
        raise SchemaError(f"{_name(where, path)} lacks the field(s) {', '.join(missing)}")
    unknown = [k for k in value if k not in spec.fields]
    if unknown and not spec.extra:
        raise SchemaError(
            f"{_name(where, path)} has unknown field(s) {', '.join(unknown)}; "
            f"known: {', '.join(spec.fields)}"
        )
    for k, sub in spec.fields.items():
        if k in value:
            _check(value[k], sub, where, _join(path, k))


def _name(where: str, path: str) -> str:
    """ "the header field model.num_layers", or "the header" itself."""
    return f"{where} field {path}" if path else where


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse `type` for a whole number of at least `low`, with an error that says so
    (the CLI's and the bench scripts' options alike)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(
                f"expected a whole number of at least {low}, got {text!r}"
            )
        return value

    return parse
