"""Parsers of model.json values: each returns the typed value or raises ValueError (the caller names the field)."""

from __future__ import annotations

import math
from typing import Any, Callable


def real(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError
    return float(value)


def checked(convert: Callable[[Any], Any], ok: Callable[[Any], bool]) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        converted = convert(value)
        if not ok(converted):
            raise ValueError
        return converted

    return parse


def integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError
    return value


def text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError
    return value


def texts(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError
    return tuple(text(v) for v in value)


def reals(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list):
        raise ValueError
    return tuple(real(v) for v in value)


def mapping(value: Any) -> dict:
    if not isinstance(value, dict):
        raise ValueError
    return value
