"""Strict types for config dataclasses: a value is taken only as the type its field declares.

YAML and Hydra overrides hand over whatever they parsed: ``quant.zero_point=no`` arrives as the
string ``"no"``, which Python would take as true. :func:`check_value` refuses it instead:
booleans accept only booleans, integers only integers (not booleans), floats integers or
floats, strings only strings, and sequences only sequences of the declared element type.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Union


def _matches(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp in (tuple, list) or origin in (tuple, list, Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        element = args[0] if args else Any
        return all(_matches(v, element) for v in value)
    if tp is dict or origin in (dict, Mapping):
        return isinstance(value, Mapping)
    return True  # other declared types are checked by the dataclass itself


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if tp is type(None):
        return "null"
    if tp is bool:
        return "a boolean (true or false)"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp in (tuple, list) or origin in (tuple, list, Sequence):
        return (
            f"a list (each item {_describe(args[0])})" if args and args[0] is not Any else "a list"
        )
    return getattr(tp, "__name__", str(tp))


def check_value(name: str, value: Any, tp: Any) -> None:
    """Refuse ``value`` for field ``name`` unless it has the declared type ``tp``.

    Raises:
        TypeError: naming the field, the value, its type and the type expected.
    """
    if not _matches(value, tp):
        raise TypeError(
            f"{name}={value!r} is a {type(value).__name__}, but it must be {_describe(tp)}"
        )


def field_types(cls: type) -> dict[str, Any]:
    """``{field name: declared type}`` of dataclass ``cls`` (string annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_fields(obj: Any) -> None:
    """:func:`check_value` on every field of dataclass instance ``obj``."""
    for name, tp in field_types(type(obj)).items():
        check_value(name, getattr(obj, name), tp)
