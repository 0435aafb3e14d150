"""Argument checks shared by the public functions (clear errors naming the argument)."""

from __future__ import annotations

import numbers
from typing import Any


def positive_int(**values: Any) -> None:
    """Raise ``ValueError`` naming the first argument that is not a positive integer.

    Example: ``positive_int(num_samples=num_samples, batch_size=batch_size)``.
    """
    for label, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
