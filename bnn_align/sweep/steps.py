"""A study as a graph of steps: train a posterior -> match a pair -> (learn a curve) ->
evaluate a path.

Every step has a cache key: a hash of its kind, its settings, its inputs' keys and the package
version. A step's result depends on nothing else, so a step whose key is cached is done, and a
changed setting changes the keys of exactly the steps that depend on it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from ..paths.curves import KINDS as CURVE_KINDS
from ..matching.weights import LEARNED_METHODS
from .config import Cell, Study
from .select import RowFilter

__all__ = ["Step", "expand", "ROW_KEY", "KINDS"]

KINDS = ("train", "match", "curve", "evaluate")
# the fields that name one result row (one evaluated path)
ROW_KEY = ("dataset", "arch", "width", "guide", "pair", "method", "path")
# and of the asymmetric networks' rows: a column (and a key field) only in studies that have
# them, so the tables and cache keys of other studies stay as they were
ASYMMETRY = "asymmetry"


@dataclass(frozen=True, eq=False)
class Step:
    """One unit of work of a study.

    Attributes
    ----------
    kind : {"train", "match", "curve", "evaluate"}
    settings : mapping
        Everything the step's result depends on besides its inputs (JSON-serialisable).
    inputs : tuple of Step
        Train: none; match: the two trained posteriors; curve: the two trained posteriors
        and, unless the method is ``"naive"``, the match; evaluate: the same, and the curve
        for a curve path.
    label : str
        Readable name, e.g. ``train digits-mlp64-mean-field seed 0``.
    key : str
        Hex digest of kind, settings, the inputs' keys and ``bnn_align.__version__``.

    Examples
    --------
    Steps are equal when their keys are, and a key changes with anything upstream:

    >>> from bnn_align import sweep
    >>> seed0 = sweep.Step("train", {"seed": 0}, label="train seed 0")
    >>> seed0 == sweep.Step("train", {"seed": 0}), seed0 == sweep.Step("train", {"seed": 1})
    (True, False)
    >>> len(seed0.key)
    24
    >>> paired = sweep.Step("match", {"method": "mean"}, (seed0,))
    >>> paired == sweep.Step("match", {"method": "mean"}, (sweep.Step("train", {"seed": 1}),))
    False
    """

    kind: str
    settings: Mapping[str, Any]
    inputs: tuple["Step", ...] = ()
    label: str = ""
    key: str = field(init=False)

    def __post_init__(self) -> None:
        from .. import __version__

        blob = json.dumps({"kind": self.kind, "settings": dict(self.settings),
                           "inputs": [step.key for step in self.inputs],
                           "version": __version__}, sort_keys=True)
        object.__setattr__(self, "key", hashlib.sha256(blob.encode()).hexdigest()[:24])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Step) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    def row_key(self) -> tuple:
        """The result row's key (evaluate steps only): the ``ROW_KEY`` fields, and an
        asymmetric network's asymmetry after them."""
        return row_key(self.settings)


def row_key(row: Mapping[str, Any]) -> tuple:
    """The key of a results row or an evaluate step's settings: the ``ROW_KEY`` fields (a
    missing ``path`` is the Wasserstein path of tables older than path kinds), and the
    asymmetry if it is not ``"none"``, so the standard networks' keys are as they always were."""
    key = tuple(row.get(k, "wasserstein" if k == "path" else None) for k in ROW_KEY)
    asymmetry = row.get(ASYMMETRY, "none")
    return key if asymmetry == "none" else (*key, asymmetry)


def expand(study: Study, only: Iterable[RowFilter] = ()) -> list[Step]:
    """Every step of the study whose row passes one of the filters ``only`` (all rows when
    there are none), with the steps those rows need; inputs come before the steps using them.

    Parameters
    ----------
    study : Study
        From :func:`load_study` or :func:`parse_study`.
    only : iterable of RowFilter
        From :func:`parse_filter`; a row is kept when any of them matches it.

    Returns
    -------
    list of Step
        The train steps, then the matches, then the evaluations (one per result row); each
        step once, however many rows need it.

    Examples
    --------
    Two cells, two pairs, three methods: 8 trainings, 8 matches (not for ``"naive"``) and
    12 evaluations.

    >>> import collections
    >>> from bnn_align import sweep
    >>> study = sweep.parse_study({"pairs": 2, "train": {"epochs": 1},
    ...                            "grid": [{"datasets": ["digits"], "archs": ["mlp"],
    ...                                      "widths": [8, 16], "guides": ["mean-field"]}]})
    >>> collections.Counter(step.kind for step in sweep.expand(study))
    Counter({'evaluate': 12, 'train': 8, 'match': 8})
    >>> only = [sweep.parse_filter("width=8,pair=0,method!=mean")]
    >>> for step in sweep.expand(study, only):
    ...     print(step.label)
    train digits-mlp8-mean-field seed 0
    train digits-mlp8-mean-field seed 1
    match digits-mlp8-mean-field pair 0 wasserstein
    evaluate digits-mlp8-mean-field pair 0 naive wasserstein-path
    evaluate digits-mlp8-mean-field pair 0 wasserstein wasserstein-path
    """
    only = list(only)
    trains: dict[tuple[Cell, int], Step] = {}
    matches: dict[tuple[Cell, int, str], Step] = {}
    curves: dict[tuple, Step] = {}
    evaluates: list[Step] = []
    for cell, methods in sorted(study.cells.items()):
        for pair in range(study.pairs):
            for method in methods:
                for path in study.paths:
                    for label, curve_epochs in _path_labels(study, path):
                        row = {"dataset": cell.dataset, "arch": cell.arch, "width": cell.width,
                               "guide": cell.guide, "pair": pair, "method": method,
                               "path": label}
                        if cell.asymmetry != "none":
                            row[ASYMMETRY] = cell.asymmetry
                        if only and not any(f.matches({ASYMMETRY: "none", **row}, cell.key)
                                            for f in only):
                            continue
                        a = _train(study, cell, 2 * pair, trains)
                        b = _train(study, cell, 2 * pair + 1, trains)
                        inputs: tuple[Step, ...] = (a, b)
                        if method != "naive":
                            inputs += (_match(study, cell, pair, method, a, b, matches),)
                        settings = {**row, "samples": study.evaluate["samples"],
                                    "points": study.evaluate["points"],
                                    "metrics": list(study.metrics)}
                        if curve_epochs is not None:
                            inputs += (_curve(study, cell, pair, method, path, inputs,
                                              curves),)
                            settings["curve_epochs"] = curve_epochs
                        evaluates.append(Step(
                            "evaluate", settings, inputs,
                            f"evaluate {cell.key} pair {pair} {method} {label}-path"))
    return [*trains.values(), *matches.values(), *curves.values(), *evaluates]


def _path_labels(study: Study, path: str) -> list[tuple[str, int | None]]:
    """The rows' path labels of a path kind, with the curve's training epochs (None for the
    paths that are not learned): ``bezier@5`` after 5 epochs, ``bezier`` after all of them."""
    if path not in CURVE_KINDS:
        return [(path, None)]
    epochs = study.curve["epochs"]
    return [*((f"{path}@{e}", e) for e in study.curve["checkpoints"]), (path, epochs)]


def _curve(study: Study, cell: Cell, pair: int, method: str, kind: str,
           endpoints: tuple[Step, ...], curves: dict) -> Step:
    if (cell, pair, method, kind) not in curves:
        settings = {"kind": kind, "seed": pair, **study.curve}
        curves[cell, pair, method, kind] = Step(
            "curve", settings, endpoints, f"curve {cell.key} pair {pair} {method} {kind}")
    return curves[cell, pair, method, kind]


def _train(study: Study, cell: Cell, seed: int, trains: dict) -> Step:
    if (cell, seed) not in trains:
        t = study.train
        settings = {"dataset": cell.dataset, "arch": cell.arch, "width": cell.width,
                    "guide": cell.guide, "seed": seed, "epochs": t["epochs"][cell.dataset],
                    "batch_size": t["batch_size"], "lr": t["lr"], "lr_end": t["lr_end"],
                    "init_scale": t["init_scale"]}
        if cell.guide == "low-rank":
            settings["rank"] = t["rank"]
        # only where used, so the keys of the studies without them stay as they were
        if cell.asymmetry != "none":
            settings.update(asymmetry=cell.asymmetry, asymmetry_seed=t["asymmetry_seed"])
        if t["history_samples"]:
            settings["history_samples"] = t["history_samples"]
        trains[cell, seed] = Step("train", settings, (), f"train {cell.key} seed {seed}")
    return trains[cell, seed]


def _match(study: Study, cell: Cell, pair: int, method: str, a: Step, b: Step,
           matches: dict) -> Step:
    if (cell, pair, method) not in matches:
        settings: dict[str, Any] = {"method": method, "seed": pair}
        if method == "activation":
            settings["activation_points"] = study.evaluate["activation_points"]
        if method in LEARNED_METHODS:  # trained on the training data (a fifth held out)
            learned = study.learned
            settings.update(epochs=learned["epochs"], batch_size=learned["batch_size"],
                            samples=learned["samples"], lr=learned["lr"].get(method))
        matches[cell, pair, method] = Step("match", settings, (a, b),
                                           f"match {cell.key} pair {pair} {method}")
    return matches[cell, pair, method]
