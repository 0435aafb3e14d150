"""``--only`` filters: which result rows of a study to run.

A filter is one or more conditions separated by commas, all of which must hold:

* ``FIELD OP VALUE`` with ``OP`` one of ``= != < <= > >=`` and ``FIELD`` one of ``dataset``,
  ``arch``, ``width``, ``guide``, ``pair``, ``method``, ``path``, ``asymmetry`` (``none``,
  ``w`` or ``sigma``). ``width`` and ``pair`` compare
  as numbers; the others compare as text, and with ``=`` / ``!=`` the value may be a glob
  (``guide=low*``);
* a bare glob, matched against the cell key ``dataset-archwidth-guide``
  (``digits-mlp64-mean-field``, ``mnist1d-resnet8*``, ``*-mean-field``; an asymmetric
  network's key ends in ``-w`` or ``-sigma``).

Examples: ``width<=256``; ``digits-mlp64-mean-field,pair=0,method!=mean``. Given several
filters, a row runs when any of them matches it. The steps a chosen row needs run with it.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Callable, Mapping

__all__ = ["RowFilter", "parse_filter"]

_FIELDS = ("dataset", "arch", "width", "guide", "pair", "method", "path", "asymmetry")
_NUMERIC = ("width", "pair")
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<=": operator.le, ">=": operator.ge, "!=": operator.ne, "<": operator.lt,
    ">": operator.gt, "=": operator.eq}
_CONDITION = re.compile(r"\s*([a-z_]+)\s*(<=|>=|!=|<|>|=)\s*(.+?)\s*$")


@dataclass(frozen=True)
class RowFilter:
    """A parsed filter (see the module docstring); ``str(f)`` is its text.

    Examples
    --------
    >>> from bnn_align import sweep
    >>> only = sweep.parse_filter("digits-mlp*,width<=64,method!=mean")
    >>> row = {"dataset": "digits", "arch": "mlp", "width": 64, "guide": "mean-field",
    ...        "pair": 0, "method": "wasserstein", "path": "wasserstein"}
    >>> only.matches(row, "digits-mlp64-mean-field")
    True
    >>> only.matches({**row, "width": 128}, "digits-mlp128-mean-field")   # 128 > 64
    False
    >>> only.matches({**row, "method": "mean"}, "digits-mlp64-mean-field")
    False
    >>> str(only)
    'digits-mlp*,width<=64,method!=mean'
    """

    text: str
    conditions: tuple[tuple[str, str, Any], ...]   # (field or "key", op, value)

    def matches(self, row: Mapping[str, Any], cell_key: str) -> bool:
        """Whether the row (its ``ROW_KEY`` fields) of the cell ``cell_key`` passes."""
        for name, op, value in self.conditions:
            actual = cell_key if name == "key" else row[name]
            if name in _NUMERIC:
                if not _OPS[op](actual, value):
                    return False
            elif op in ("=", "!="):
                if fnmatchcase(str(actual), value) != (op == "="):
                    return False
            elif not _OPS[op](str(actual), value):
                return False
        return True

    def __str__(self) -> str:
        return self.text


def parse_filter(text: str) -> RowFilter:
    """Parse one ``--only`` filter (the syntax is in the module docstring).

    Parameters
    ----------
    text : str
        Conditions separated by commas, all of which must hold: ``FIELD OP VALUE`` or a glob
        of the cell key.

    Returns
    -------
    RowFilter

    Raises
    ------
    ValueError
        Naming the part it cannot read: an empty filter, an unknown field, a malformed
        condition, a non-integer value for ``width`` or ``pair``.

    Examples
    --------
    >>> from bnn_align import sweep
    >>> sweep.parse_filter("*-low-rank,pair<2").conditions
    (('key', '=', '*-low-rank'), ('pair', '<', 2))
    >>> sweep.parse_filter("depth=3")
    Traceback (most recent call last):
        ...
    ValueError: --only 'depth=3': unknown field 'depth'; choose from ['dataset', 'arch', ...]
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"--only: empty filter {text!r}")
    conditions = []
    for part in text.split(","):
        found = _CONDITION.match(part)
        if found is None:
            if not part.strip() or any(c in part for c in "<>=!"):
                raise ValueError(f"--only {text!r}: cannot read {part!r}; expected FIELD OP "
                                 f"VALUE (OP one of = != < <= > >=) or a cell-key glob")
            conditions.append(("key", "=", part.strip()))
            continue
        name, op, value = found.groups()
        if name not in _FIELDS:
            raise ValueError(f"--only {text!r}: unknown field {name!r}; choose from "
                             f"{list(_FIELDS)}")
        if name in _NUMERIC:
            try:
                value = int(value)
            except ValueError:
                raise ValueError(f"--only {text!r}: {name} compares with an integer, "
                                 f"got {value!r}") from None
        conditions.append((name, op, value))
    return RowFilter(text, tuple(conditions))
