"""Type and range checks for the open dictionaries of the job file (base_config, lora_config), whose keys are the
fields of transformers.TrainingArguments and peft.LoraConfig: a value is checked against the field's annotation
before it reaches those classes, so the error names the key instead of failing later, or not at all."""
from __future__ import annotations

import enum
import types
import typing
from typing import Any, Callable, Optional

from .errors import UserError

_UNION_TYPES = (typing.Union, types.UnionType)


def _enum_values(cls: type) -> list[Any]:
    return [member.value for member in cls]


def _is_enum(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, enum.Enum)


def accepts(annotation: Any, value: Any) -> bool:
    """Whether `value` (as read from YAML) fits `annotation`. Unknown or complex annotations accept anything: the
    class that owns the field judges those."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in _UNION_TYPES:
        enums = [a for a in args if _is_enum(a)]
        if enums and isinstance(value, str):  # `IntervalStrategy | str`: the string must name a member
            return any(value in _enum_values(e) for e in enums)
        return any(accepts(a, value) for a in args)
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if _is_enum(annotation):
        return isinstance(value, annotation) or value in _enum_values(annotation)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation is list or origin is list:
        return isinstance(value, list) and (not args or all(accepts(args[0], v) for v in value))
    if annotation is dict or origin is dict:
        return isinstance(value, dict)
    return True


def describe(annotation: Any) -> str:
    """`annotation` in the words of the job file: 'a whole number', 'one of: no, steps, epoch', ..."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in _UNION_TYPES:
        enums = [a for a in args if _is_enum(a)]
        parts = []
        for arg in args:
            if arg is type(None):
                continue
            if enums and arg is str:
                continue  # the enum already says which strings
            parts.append(describe(arg))
        text = " or ".join(dict.fromkeys(parts))
        return text + (" (or null)" if type(None) in args else "")
    if origin is typing.Literal:
        return "one of: " + ", ".join(str(a) for a in args)
    if _is_enum(annotation):
        return "one of: " + ", ".join(str(v) for v in _enum_values(annotation))
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "a whole number"
    if annotation is float:
        return "a number"
    if annotation is str:
        return "a string"
    if annotation is list or origin is list:
        return "a list" + (f" of {describe(args[0])}" if args and describe(args[0]) != "a value" else "")
    if annotation is dict or origin is dict:
        return "a mapping"
    return "a value"


def check_type(key: str, value: Any, annotation: Any) -> None:
    if not accepts(annotation, value):
        raise UserError(f"{key}: expected {describe(annotation)}, got {value!r}.")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def at_least(low: float, whole: bool = False, strict: bool = False) -> Callable[[Any], Optional[str]]:
    def check(value):
        if value is None:
            return None
        if whole and not (isinstance(value, int) and not isinstance(value, bool)):
            return f"must be a whole number {'above' if strict else 'of at least'} {low:g}"
        if not _number(value) or (value <= low if strict else value < low):
            return f"must be a number {'above' if strict else 'of at least'} {low:g}"
        return None
    return check


def between(low: float, high: float, high_open: bool = False, low_open: bool = False) -> Callable[[Any], Optional[str]]:
    def check(value):
        if value is None:
            return None
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if not _number(value) or below or above:
            return (f"must be a number from {low:g}{' (excluded)' if low_open else ''} to {high:g}"
                    f"{' (excluded)' if high_open else ''}")
        return None
    return check


def check_range(key: str, value: Any, rule: Callable[[Any], Optional[str]]) -> None:
    problem = rule(value)
    if problem:
        raise UserError(f"{key}: {problem}, got {value!r}.")
