"""Argument checks shared by the public functions (clear errors naming the argument)."""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any, Mapping

import torch


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


def check_positive_float(name: str, value: Any) -> float:
    """``value`` as a ``float`` if it is a positive finite real number (not a bool), else
    ``ValueError`` naming ``name``."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not 0 < value < math.inf):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def positive_int(**values: Any) -> None:
    """Raise ``ValueError`` naming the first argument that is not a positive integer.

    Example: ``positive_int(num_samples=num_samples, batch_size=batch_size)``.
    """
    for name, value in values.items():
        check_int(name, value)


def device_of(obj: Any) -> torch.device | None:
    """The device a posterior, model or tensor lives on, or None if it holds no tensor yet.

    A tensor's own; a module's (a guide, a network, a BayesianNetwork) first parameter's, or
    its first buffer's without parameters; a mapping's (a state dict) first tensor's; any other
    object's ``device`` attribute (a :class:`~bnn_align.posterior.GaussianView`).
    """
    if isinstance(obj, torch.Tensor):
        return obj.device
    if isinstance(obj, torch.nn.Module):
        first = next(obj.parameters(), None)
        if first is None:
            first = next(obj.buffers(), None)
        return None if first is None else first.device
    if isinstance(obj, Mapping):
        return next((v.device for v in obj.values() if isinstance(v, torch.Tensor)), None)
    device = getattr(obj, "device", None)
    return device if isinstance(device, torch.device) else None


def same_device(named: Mapping[str, Any]) -> torch.device | None:
    """The one device of the named objects (see :func:`device_of`; those holding no tensor are
    left out), or None if none holds a tensor.

    Raises
    ------
    ValueError
        Naming the first two objects on different devices and both devices.
    """
    found: tuple[str, torch.device] | None = None
    for label, obj in named.items():
        device = device_of(obj)
        if device is None:
            continue
        if found is None:
            found = (label, device)
        elif device != found[1]:
            raise ValueError(
                f"{found[0]} is on {found[1]}, {label} on {device}: put them on one device with "
                f".to(device) (a guide's model moves separately from the guide)")
    return None if found is None else found[1]


def load_saved(path: str | Path, name: str, fmt: str) -> dict:
    """The dict a ``save`` method wrote with ``torch.save`` (plain tensors and numbers, so it is
    read with ``weights_only=True`` and no code runs), checked to carry ``format == fmt``.

    ``name`` is what was saved (``"Alignment"``); a foreign file gets a ValueError saying what
    was expected. Errors of the operating system (missing file, permissions) propagate.
    """
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
