"""Constructor argument checks: fail at construction with a message naming the argument and its allowed range."""

import math
import numbers
from typing import Any

import numpy as np


def _describe_range(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    return " and ".join(parts)


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """
    Check that ``value`` is an integer (not a bool) within ``[low, high]``.

    :param name: Argument name used in the error message
    :param value: Value to check
    :param low: Inclusive lower bound (``None``: unbounded)
    :param high: Inclusive upper bound (``None``: unbounded)
    :return: The value as a Python ``int``
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer, got {value!r} of type {type(value).__name__}")
    integer = int(value)
    if (low is not None and integer < low) or (high is not None and integer > high):
        raise ValueError(f"`{name}` must be an integer {_describe_range(low, high, False, False)}, got {value!r}")
    return integer


def check_float(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """
    Check that ``value`` is a finite real number (not a bool) within the given bounds.

    :param name: Argument name used in the error message
    :param value: Value to check
    :param low: Lower bound (``None``: unbounded)
    :param high: Upper bound (``None``: unbounded)
    :param low_open: Exclude ``low`` itself
    :param high_open: Exclude ``high`` itself
    :return: The value as a Python ``float``
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {value!r} of type {type(value).__name__}")
    value = float(value)
    allowed = _describe_range(low, high, low_open, high_open)
    out_of_range = (
        not math.isfinite(value)
        or (low is not None and (value <= low if low_open else value < low))
        or (high is not None and (value >= high if high_open else value > high))
    )
    if out_of_range:
        raise ValueError(f"`{name}` must be a finite number{' ' + allowed if allowed else ''}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """
    Check that ``value`` is a bool (NumPy bools included).

    :param name: Argument name used in the error message
    :param value: Value to check
    :return: The value as a Python ``bool``
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be True or False, got {value!r} of type {type(value).__name__}")
    return bool(value)


def check_schedule(name: str, value: Any) -> None:
    """
    Check a learning-rate-like argument: a positive finite number or a callable of the remaining progress.

    :param name: Argument name used in the error message
    :param value: Value to check
    """
    if callable(value):
        return
    check_float(name, value, low=0.0, low_open=True)
