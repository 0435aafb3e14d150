"""The results table of a study: one row per evaluated path, streamed to CSV and Parquet.

Rows are appended to the CSV as they finish, each row once (a row whose key is already in the
table is not written again); after every new row the Parquet copy is rewritten whole, through a
temporary file, so it always holds a complete table. A row remembers the evaluate step that
computed it (column ``step``): when a setting changes, :meth:`ResultsTable.retain` drops the
rows of the old settings before the new ones are written.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from .steps import ASYMMETRY, ROW_KEY, row_key

__all__ = ["ResultsTable", "read_results", "compare_results", "RESULT_FIELDS"]

# the columns that hold results; the rest of a row names it or times it
RESULT_FIELDS = ("nll_barrier", "nll_se", "acc_barrier", "acc_se", "nll_t0", "nll_t1",
                 "acc_t0", "acc_t1", "w2_cost", "mean_cost")


class ResultsTable:
    """The CSV (and its Parquet copy) of one study; ``fields`` are the CSV's columns."""

    def __init__(self, csv_path: str | os.PathLike, fields: Sequence[str]):
        self.csv_path = Path(csv_path)
        self.parquet_path = self.csv_path.with_suffix(".parquet")
        self.fields = list(fields)
        self._rows: list[dict[str, str]] = []
        if self.csv_path.exists() and self.csv_path.stat().st_size > 0:
            with self.csv_path.open(newline="") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames != self.fields:
                    raise ValueError(f"{self.csv_path} has columns {reader.fieldnames}, this "
                                     f"study writes {self.fields}: choose another --out")
                self._rows = list(reader)
        self._keys = {_key(r) for r in self._rows}

    def __contains__(self, row_key: tuple) -> bool:
        return tuple(str(v) for v in row_key) in self._keys

    def __len__(self) -> int:
        return len(self._rows)

    def step_keys(self) -> set[str]:
        """The keys of the evaluate steps that computed the rows (rows without one: none)."""
        return {r["step"] for r in self._rows if r.get("step")}

    def retain(self, current: Mapping[tuple, str]) -> int:
        """Drop the rows whose key is in ``current`` (row key -> step key) with another step
        key: rows of settings that have changed since. Returns how many were dropped."""
        current = {tuple(str(v) for v in k): step for k, step in current.items()}
        keep = [r for r in self._rows if current.get(_key(r), r["step"]) == r["step"]]
        dropped = len(self._rows) - len(keep)
        if dropped:
            temporary = self.csv_path.with_name(f".tmp-{self.csv_path.name}")
            with temporary.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.fields)
                writer.writeheader()
                writer.writerows(keep)
            os.replace(temporary, self.csv_path)
            self._rows, self._keys = keep, {_key(r) for r in keep}
            self._write_parquet()
        return dropped

    def add(self, row: Mapping[str, Any]) -> bool:
        """Append the row unless its key is in the table; True if it was written."""
        # str(float) round-trips exactly; the rows of standard networks have no asymmetry
        text = {k: str(row.get(k, "none") if k == ASYMMETRY else row[k]) for k in self.fields}
        if _key(text) in self._keys:
            return False
        new = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        with self.csv_path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields)
            if new:
                writer.writeheader()
            writer.writerow(text)
            f.flush()
            os.fsync(f.fileno())
        self._rows.append(text)
        self._keys.add(_key(text))
        self._write_parquet()
        return True

    def _write_parquet(self) -> None:
        temporary = self.parquet_path.with_name(f".tmp-{self.parquet_path.name}")
        if self._rows:
            read_results(self.csv_path).to_parquet(temporary, index=False)
            os.replace(temporary, self.parquet_path)
        else:
            self.parquet_path.unlink(missing_ok=True)


def _key(row: Mapping[str, str]) -> tuple:
    return row_key(row)


def read_results(path: str | os.PathLike):
    """A results table (CSV or Parquet) as a pandas DataFrame.

    Tables written before studies had several path kinds have no ``path`` column: their rows
    are of the Wasserstein path, and get ``path = "wasserstein"``.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.parquet`` file, or a CSV (any other suffix), as :func:`run` writes them.

    Returns
    -------
    pandas.DataFrame
        One row per evaluated path; floats exactly as written.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        A table without the columns that name a row.
    ImportError
        pandas (or, for Parquet, pyarrow) is not installed.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> import pandas as pd
    >>> from bnn_align import sweep
    >>> folder = tempfile.TemporaryDirectory()
    >>> old = pd.DataFrame({"dataset": ["digits"], "arch": ["mlp"], "width": [8],
    ...                     "guide": ["mean-field"], "pair": [0], "method": ["mean"],
    ...                     "nll_barrier": [0.25]})
    >>> old.to_csv(Path(folder.name) / "old.csv", index=False)    # no path column yet
    >>> sweep.read_results(Path(folder.name) / "old.csv")[["method", "path", "nll_barrier"]]
      method         path  nll_barrier
    0   mean  wasserstein         0.25
    >>> sweep.read_results(Path(folder.name) / "missing.csv")
    Traceback (most recent call last):
        ...
    FileNotFoundError: no results table at .../missing.csv
    >>> folder.cleanup()
    """
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("study results tables need pandas and pyarrow: pip install "
                          "'bnn_align[sweep]'") from None

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no results table at {path}")
    # pandas 3 parses floats exactly by default; before, only when asked to
    exact = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}
    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, **exact)
    missing = [k for k in ROW_KEY if k not in frame.columns and k != "path"]
    if missing:
        raise ValueError(f"{path} is not a study results table: no column {missing[0]!r}")
    if "path" not in frame.columns:
        frame.insert(ROW_KEY.index("path"), "path", "wasserstein")
    return frame


def compare_results(new: Any, reference: Any, *, rtol: float = 1e-9, atol: float = 1e-12):
    """Compare every row of ``new`` with the row of the same key in ``reference``.

    Parameters
    ----------
    new, reference : path or DataFrame
        Results tables (see :func:`read_results`).
    rtol, atol : float
        A result column agrees when ``|new - ref| <= atol + rtol * |ref|``.

    Returns
    -------
    DataFrame
        One row per row of ``new``: its key, ``max_abs_diff`` and ``max_rel_diff`` over the
        result columns (``RESULT_FIELDS`` present in both), the column that differs most,
        ``in_reference`` and ``agrees`` (False for a row the reference lacks).

    Raises
    ------
    FileNotFoundError, ValueError
        As :func:`read_results`, for paths.

    Examples
    --------
    >>> import pandas as pd
    >>> from bnn_align import sweep
    >>> cell = {"dataset": "digits", "arch": "mlp", "width": 8, "guide": "mean-field",
    ...         "pair": 0, "path": "wasserstein"}
    >>> reference = pd.DataFrame([{**cell, "method": "naive", "nll_barrier": 0.5},
    ...                           {**cell, "method": "wasserstein", "nll_barrier": 0.1}])
    >>> new = reference.assign(nll_barrier=[0.5, 0.1 + 1e-6])
    >>> sweep.compare_results(new, reference)[["method", "worst_column", "agrees"]]
            method worst_column  agrees
    0        naive  nll_barrier    True
    1  wasserstein  nll_barrier   False
    >>> sweep.compare_results(new, reference, rtol=1e-4)["agrees"].tolist()
    [True, True]
    """
    import pandas as pd

    new = new if isinstance(new, pd.DataFrame) else read_results(new)
    reference = reference if isinstance(reference, pd.DataFrame) else read_results(reference)
    columns = [c for c in RESULT_FIELDS if c in new.columns and c in reference.columns]
    by_key = {row_key(r): r for r in reference.to_dict("records")}
    out = []
    for r in new.to_dict("records"):
        key = row_key(r)
        ref = by_key.get(key)
        entry = dict(zip(ROW_KEY, key), in_reference=ref is not None, max_abs_diff=math.nan,
                     max_rel_diff=math.nan, worst_column="", agrees=False)
        if len(key) > len(ROW_KEY):  # an asymmetric network's row
            entry[ASYMMETRY] = key[-1]
        if ref is not None:
            diffs = {c: abs(float(r[c]) - float(ref[c])) for c in columns}
            rel = {c: d / abs(float(ref[c])) if ref[c] else (0.0 if d == 0 else math.inf)
                   for c, d in diffs.items()}
            worst = max(rel, key=rel.get)
            entry.update(max_abs_diff=max(diffs.values()), max_rel_diff=rel[worst],
                         worst_column=worst,
                         agrees=all(d <= atol + rtol * abs(float(ref[c]))
                                    for c, d in diffs.items()))
        out.append(entry)
    return pd.DataFrame(out)
