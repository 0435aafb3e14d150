"""Argument checks shared by the public functions (clear errors naming the argument)."""

from __future__ import annotations

import numbers
from typing import Any


def check_int(name: str, value: Any, *, low: int = 1, high: int | None = None) -> int:
    """``value`` as an ``int`` in ``[low, high]``, else ``ValueError`` naming ``name``.

    ``bool`` is refused although it is an ``Integral``: ``num_samples=True`` is a mistake.
    """
    if low == 1 and high is None:
        expected = "a positive integer"
    else:
        expected = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low
            or (high is not None and value > high)):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def positive_int(**values: Any) -> None:
    """Raise ``ValueError`` naming the first argument that is not a positive integer.

    Example: ``positive_int(num_samples=num_samples, batch_size=batch_size)``.
    """
    for name, value in values.items():
        check_int(name, value)
