"""Argument checks shared by the public functions (clear errors naming the argument)."""

from __future__ import annotations

import numbers
from pathlib import Path
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


def load_saved(path: str | Path, name: str, fmt: str) -> dict:
    """The dict a ``save`` method wrote with ``torch.save`` (plain tensors and numbers, so it is
    read with ``weights_only=True`` and no code runs), checked to carry ``format == fmt``.

    ``name`` is what was saved (``"Alignment"``); a foreign file gets a ValueError saying what
    was expected. Errors of the operating system (missing file, permissions) propagate.
    """
    import torch

    expected = f"a file written by {name}.save (format {fmt!r})"
    try:
        state = torch.load(Path(path), weights_only=True)
    except OSError:
        raise
    except Exception as err:  # torch's unpickler raises many kinds for a foreign file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not a saved bnn_align {name}; expected {expected}. "
                         f"torch.load could not read it: {reason[:200]}") from None
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise ValueError(f"{path} does not hold a saved bnn_align {name}; expected {expected}")
    return state
