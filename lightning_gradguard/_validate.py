"""Argument checks shared by every public constructor.

Errors follow one pattern: ``Expected `name` to be <what>, but got <value>.`` A value of the
wrong type raises :class:`TypeError`; a value of the right type but out of range raises
:class:`ValueError`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

_FLOAT32_MAX = 3.4028234663852886e38


def _fail(name: str, expected: str, value: Any, exc: type[Exception] = ValueError) -> Exception:
    return exc(f"Expected `{name}` to be {expected}, but got {value!r}.")


def check_number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    strict: bool = True,
    allow_inf: bool = False,
    allow_none: bool = False,
    maximum: float | None = None,
    strict_max: bool = False,
) -> float | None:
    """Check a real number against bounds and return it as ``float`` (or None)."""
    bound = ""
    if minimum is not None and maximum is not None:
        lo, hi = "(" if strict else "[", ")" if strict_max else "]"
        bound = f" in {lo}{minimum:g}, {maximum:g}{hi}"
    elif minimum is not None:
        bound = f" {'>' if strict else '>='} {minimum:g}"
    elif maximum is not None:
        bound = f" {'<' if strict_max else '<='} {maximum:g}"
    expected = f"a number{bound}{' (inf allowed)' if allow_inf else ''}{' or None' if allow_none else ''}"
    if value is None:
        if allow_none:
            return None
        raise _fail(name, expected, value, TypeError)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(name, expected, value, TypeError)
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range
        raise _fail(name, expected, value) from None
    if math.isnan(number) or (math.isinf(number) and not (allow_inf and number > 0)):
        raise _fail(name, expected, value)
    if math.isfinite(number) and abs(number) > _FLOAT32_MAX:  # thresholds live in float32 tensors
        raise _fail(name, expected + f" (at most {_FLOAT32_MAX:.4g} in magnitude)", value)
    if minimum is not None and (number <= minimum if strict else number < minimum):
        raise _fail(name, expected, value)
    if maximum is not None and (number >= maximum if strict_max else number > maximum):
        raise _fail(name, expected, value)
    return number


def check_int(name: str, value: Any, *, minimum: int, allow_none: bool = False) -> int | None:
    """Check an integer ``>= minimum`` (bools are refused) and return it."""
    expected = f"an int >= {minimum}{' or None' if allow_none else ''}"
    if value is None:
        if allow_none:
            return None
        raise _fail(name, expected, value, TypeError)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(name, expected, value, TypeError)
    if value < minimum:
        raise _fail(name, expected, value)
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """Check that ``value`` is one of the given strings and return it."""
    options = tuple(choices)
    expected = "one of " + ", ".join(repr(c) for c in options)
    if not isinstance(value, str):
        raise _fail(name, expected, value, TypeError)
    if value not in options:
        raise _fail(name, expected, value)
    return value


def check_handlers(handlers: Any) -> list[Any]:
    """A list of callables or notifiers (objects with ``on_alert``) (``alert_handlers``); None is an empty list."""
    if handlers is None:
        return []
    if isinstance(handlers, (str, bytes)) or not isinstance(handlers, Sequence):
        raise TypeError(f"Expected `alert_handlers` to be a list of callables or None, but got {handlers!r}.")
    for h in handlers:
        if not callable(h) and not callable(getattr(h, "on_alert", None)):
            raise ValueError(
                "Expected every entry of `alert_handlers` to be callable or a notifier (with `on_alert`), "
                f"but got {h!r}."
            )
    return list(handlers)


def check_ratio(name: str, value: Any) -> float:
    """A number in (0, 1)."""
    ratio = check_number(name, value, minimum=0.0)
    out = float(ratio) if ratio is not None else 1e-4
    if out >= 1:
        raise ValueError(f"Expected `{name}` to be a number in (0, 1), but got {value!r}.")
    return out
