"""Argument checks shared by the algorithms and runtimes, worded as BlazeFL words them.

BlazeFL's users match on "<name> must be positive"; the messages start that way and
add the exact rule. A value of the wrong type raises ``TypeError``, one out of range
``ValueError``.
"""

from __future__ import annotations

import math

__all__ = ["check_nonnegative_int", "check_positive_int", "check_positive_number"]


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
