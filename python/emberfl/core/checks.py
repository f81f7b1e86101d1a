"""Argument checks shared by the algorithms and runtimes, worded as BlazeFL words them.

BlazeFL's users match on "<name> must be positive"; the messages start that way and
add the exact rule. A value of the wrong type raises ``TypeError``, one out of range
``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = [
    "at_least",
    "check_fraction",
    "check_nonnegative_int",
    "check_nonnegative_number",
    "check_positive_int",
    "check_positive_number",
    "check_unit_interval",
]


def check_positive_int(value: object, what: str) -> int:
    """``value`` after checking it is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be positive (an int >= 1), got {value!r}")
    if value < 1:
        raise ValueError(f"{what} must be positive (an int >= 1), got {value!r}")
    return value


def check_nonnegative_int(value: object, what: str) -> int:
    """``value`` after checking it is an int >= 0."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be non-negative (an int >= 0), got {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be non-negative (an int >= 0), got {value!r}")
    return value


def check_positive_number(value: object, what: str) -> float:
    """``value`` as a float after checking it is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a finite number > 0, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


def check_nonnegative_number(value: object, what: str) -> float:
    """``value`` as a float after checking it is a finite number >= 0."""
    number = _number(value, what, "a finite number >= 0")
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return number


def check_unit_interval(value: object, what: str) -> float:
    """``value`` as a float after checking it lies in [0, 1) (a decay rate)."""
    number = _number(value, what, "a number in [0, 1)")
    if not (math.isfinite(number) and 0 <= number < 1):
        raise ValueError(f"{what} must lie in [0, 1), got {value!r}")
    return number


def check_fraction(value: object, what: str) -> float:
    """``value`` as a float after checking it lies in (0, 1) (a share of something)."""
    number = _number(value, what, "a number in (0, 1)")
    if not (math.isfinite(number) and 0 < number < 1):
        raise ValueError(f"{what} must lie in (0, 1), got {value!r}")
    return number


def at_least(minimum: int) -> Callable[[object, str], int]:
    """A check that an int is ``>= minimum`` (as settings word it)."""

    def check(value: object, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{what} must be an integer >= {minimum}, got {value!r}")
        if value < minimum:
            raise ValueError(f"{what} must be >= {minimum}, got {value}")
        return value

    check.__name__ = f"at_least_{minimum}"
    return check


def _number(value: object, what: str, rule: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be {rule}, got {value!r}")
    return float(value)
