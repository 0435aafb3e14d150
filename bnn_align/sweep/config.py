"""A study declared in TOML: the grid of cells and the settings of every step.

A study file (see ``studies/barrier.toml``) has top-level settings, a ``[train]`` and an
``[evaluate]`` table, and one or more ``[[grid]]`` blocks; each block is the product of its
``datasets x archs x widths x guides`` (and ``asymmetries``, default ``["none"]``: ``"w"`` and
``"sigma"`` build the networks with reduced symmetry of :mod:`bnn_align.models.asymmetric`) and
runs its own ``methods`` (default: the top-level ``methods``). A cell listed by several blocks runs the union of their methods. Architectures
are ``"mlp"`` (two hidden layers of ``width``), ``"mlp<depth>"`` (``depth`` hidden layers;
``"mlp2"`` is ``"mlp"``) and ``"resnet<depth>"`` (``width`` its width multiplier). The
learned match methods (``"ste"``, ``"sinkhorn"``) take their settings from a ``[learned]``
table. Every key is checked before anything runs: an unknown key, value or an empty grid raises
``ValueError`` naming the key.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # the sweep extra installs tomli there
    import tomli as tomllib

from .._checks import check_int, check_positive_float
from ..marginal import CLASSIFICATION
from ..paths.curves import KINDS as CURVE_KINDS
from ..matching.weights import LEARNED_METHODS
from ..paths.interpolation import KINDS as PATH_KINDS

__all__ = ["Cell", "Study", "load_study", "parse_study", "hidden_layers", "DATASETS", "GUIDES",
           "METHODS", "ASYMMETRIES"]

DATASETS = ("mnist1d", "digits")
GUIDES = ("mean-field", "low-rank")
# the builders' asymmetry= ("none": the standard network)
ASYMMETRIES = ("none", "w", "sigma")
# "naive" evaluates the path to the unaligned second posterior; the others are match methods
METHODS = ("naive", "mean", "wasserstein", "activation", *LEARNED_METHODS)
_RESNET = re.compile(r"resnet(\d+)$")
_MLP = re.compile(r"mlp(\d+)?$")

_TOP_KEYS = {"name", "pairs", "methods", "paths", "metrics", "train", "evaluate", "curve",
             "learned", "grid"}
# asymmetry_seed: the builders' seed of the fixed entries (asymmetric cells only);
# history_samples: posterior draws of the test accuracy and NLL recorded after every epoch
# (0: none recorded)
_TRAIN_DEFAULTS = {"epochs": None, "batch_size": 128, "lr": 1e-2, "lr_end": 1e-3, "rank": 10,
                   "init_scale": 1e-3, "asymmetry_seed": 0, "history_samples": 0}
_EVALUATE_DEFAULTS = {"samples": 64, "points": 11, "activation_points": 1000}
# curves between the endpoints (paths "bezier", "polychain"): fit_curve's settings, and the
# training epochs after which the curve is also evaluated (rows with path "bezier@E")
_CURVE_DEFAULTS = {"epochs": 20, "bends": 1, "lr": 1e-2, "lr_end": 1e-3, "samples": 1,
                   "checkpoints": []}
# match(method="ste" | "sinkhorn", epochs=, batch_size=, num_samples=samples, lr=lr[method]);
# lr: a table method -> float, missing methods at match's default
_LEARNED_DEFAULTS = {"epochs": 5, "batch_size": 512, "samples": 64, "lr": {}}
_GRID_KEYS = {"datasets", "archs", "widths", "guides", "methods", "asymmetries"}


@dataclass(frozen=True, order=True)
class Cell:
    """One network and posterior family of the grid; every cell has ``pairs`` seed pairs.

    Examples
    --------
    >>> from bnn_align import sweep
    >>> cell = sweep.Cell("digits", "mlp", 64, "mean-field")
    >>> cell.key
    'digits-mlp64-mean-field'
    >>> cell == sweep.Cell("digits", "mlp", 64, "mean-field")   # a value: usable as a key
    True
    >>> sweep.Cell("digits", "mlp", 64, "mean-field", asymmetry="w").key
    'digits-mlp64-mean-field-w'
    """

    dataset: str
    arch: str    # "mlp" (two hidden layers of ``width``), "mlp<depth>" or "resnet<depth>"
    width: int
    guide: str
    asymmetry: str = "none"  # one of ASYMMETRIES

    @property
    def key(self) -> str:
        """``dataset-archwidth-guide``, e.g. ``digits-mlp64-mean-field``; an MLP of another
        depth than two is ``mlp<width>x<depth>`` (``mnist1d-mlp512x3-mean-field``); an
        asymmetric network's key ends in ``-w`` or ``-sigma``."""
        suffix = "" if self.asymmetry == "none" else f"-{self.asymmetry}"
        layers = hidden_layers(self.arch)
        if layers is not None and self.arch != "mlp":
            return f"{self.dataset}-mlp{self.width}x{layers}-{self.guide}{suffix}"
        return f"{self.dataset}-{self.arch}{self.width}-{self.guide}{suffix}"


def hidden_layers(arch: str) -> int | None:
    """The number of hidden layers of an MLP architecture (``"mlp"``: 2), None for others."""
    found = _MLP.match(arch)
    if found is None:
        return None
    return 2 if found[1] is None else int(found[1])


@dataclass(frozen=True)
class Study:
    """A validated study: its cells with their methods and the settings of every step kind.

    Attributes
    ----------
    name : str
        Stem of the results files (``<name>.csv``, ``<name>.parquet``, ``<name>.md``).
    pairs : int
        Independent pairs of posteriors per cell; pair ``p`` trains seeds ``2p`` and ``2p + 1``.
    cells : dict of Cell to tuple of str
        Every cell and the methods it runs, in the order of ``METHODS``.
    paths, metrics : tuple of str
        Path kinds (``bnn_align.paths.KINDS`` and the learned curves of
        ``bnn_align.paths.curves.KINDS``) and metrics of ``marginal_loss``.
    train : dict
        ``epochs`` (dataset -> int), ``batch_size``, ``lr``, ``lr_end``, ``rank`` (of low-rank
        guides), ``init_scale``, ``asymmetry_seed`` (of the fixed entries of asymmetric cells;
        both posteriors of a pair share them), ``history_samples`` (posterior draws of the
        test accuracy and NLL recorded after every training epoch; 0 records none).
    evaluate : dict
        ``samples`` (posterior draws per point), ``points`` (along the path),
        ``activation_points`` (training inputs of ``"activation"`` matching).
    curve : dict
        For curve paths: ``epochs``, ``bends``, ``lr``, ``lr_end``, ``samples`` (weight draws
        per step) of :func:`~bnn_align.fit_curve`, and ``checkpoints``: earlier epochs after
        which the curve is also evaluated, as path ``"<kind>@<epochs>"``.
    learned : dict
        Settings of the learned match methods: ``epochs``, ``batch_size``, ``samples``
        (posterior draws of the validation barrier), ``lr`` (method -> learning rate; a
        missing method uses :func:`~bnn_align.match`'s default).

    Examples
    --------
    Made by :func:`parse_study` or :func:`load_study`, with every default filled in:

    >>> from bnn_align import sweep
    >>> study = sweep.parse_study({"pairs": 2, "train": {"epochs": 5},
    ...                            "grid": [{"datasets": ["digits"], "archs": ["mlp"],
    ...                                      "widths": [8, 16], "guides": ["mean-field"]}]})
    >>> study.name, study.pairs, study.paths, study.metrics
    ('study', 2, ('wasserstein',), ('nll', 'accuracy'))
    >>> study.train["epochs"], study.evaluate["samples"]
    ({'digits': 5}, 64)
    """

    name: str
    pairs: int
    cells: dict[Cell, tuple[str, ...]]
    paths: tuple[str, ...]
    metrics: tuple[str, ...]
    train: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)
    curve: dict[str, Any] = field(default_factory=lambda: dict(_CURVE_DEFAULTS))
    learned: dict[str, Any] = field(default_factory=dict)


def load_study(path: str | Path) -> Study:
    """Read and validate a study file (TOML).

    Parameters
    ----------
    path : str or Path
        The study file (see ``studies/barrier.toml``); its stem is the study's default name.

    Returns
    -------
    Study

    Raises
    ------
    ValueError
        For TOML that does not parse, or any key or value :func:`parse_study` rejects; the
        message names the file and the key.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from bnn_align import sweep
    >>> folder = tempfile.TemporaryDirectory()
    >>> path = Path(folder.name) / "tiny.toml"
    >>> _ = path.write_text('''
    ... pairs = 1
    ... [train]
    ... epochs = 1
    ... [[grid]]
    ... datasets = ["digits"]
    ... archs = ["mlp"]
    ... widths = [8, 16]
    ... guides = ["mean-field"]
    ... ''')
    >>> study = sweep.load_study(path)
    >>> study.name, [cell.key for cell in study.cells]
    ('tiny', ['digits-mlp8-mean-field', 'digits-mlp16-mean-field'])
    >>> _ = path.write_text(path.read_text().replace("pairs = 1", "pairs = 0"))
    >>> sweep.load_study(path)
    Traceback (most recent call last):
        ...
    ValueError: ...tiny.toml: pairs must be a positive integer, got 0
    >>> folder.cleanup()
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: not valid TOML: {error}") from None
    try:
        return parse_study(raw, default_name=path.stem)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def parse_study(raw: Mapping[str, Any], *, default_name: str = "study") -> Study:
    """Validate the parsed TOML of a study (a mapping, not modified) and return the Study.

    Parameters
    ----------
    raw : mapping
        The study's settings as :func:`load_study` reads them from TOML: top-level ``name``,
        ``pairs``, ``methods``, ``paths``, ``metrics``, the tables ``train`` and ``evaluate``
        and a list ``grid`` of blocks (see the module docstring).
    default_name : str
        The name when ``raw`` has none.

    Returns
    -------
    Study
        Every default filled in; cells in the order of the grid.

    Raises
    ------
    ValueError
        Naming the key: an unknown key, a value of the wrong type or out of range, an unknown
        dataset, architecture, guide, method, path kind or metric, an empty grid, metrics
        without ``"nll"``.

    Examples
    --------
    >>> from bnn_align import sweep
    >>> study = sweep.parse_study({"name": "tiny", "pairs": 2, "train": {"epochs": 1},
    ...                            "grid": [{"datasets": ["digits"], "archs": ["mlp"],
    ...                                      "widths": [8, 16], "guides": ["mean-field"]}]})
    >>> [cell.key for cell in study.cells]
    ['digits-mlp8-mean-field', 'digits-mlp16-mean-field']
    >>> study.cells[sweep.Cell("digits", "mlp", 8, "mean-field")]      # the default methods
    ('naive', 'mean', 'wasserstein')
    >>> sweep.parse_study({"samples": 3, "grid": [{"datasets": ["digits"], "archs": ["mlp"],
    ...                    "widths": [8, 16], "guides": ["mean-field"]}]})
    Traceback (most recent call last):
        ...
    ValueError: unknown key samples; expected one of ['curve', 'evaluate', 'grid', ...]
    """
    _known(raw, _TOP_KEYS, "")
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
        raise ValueError(f"name must be a file-name stem (letters, digits, _ . -), got {name!r}")
    pairs = check_int("pairs", raw.get("pairs", 3))
    methods = _choices(raw.get("methods", ["naive", "mean", "wasserstein"]), METHODS, "methods")
    paths = _choices(raw.get("paths", ["wasserstein"]), PATH_KINDS + CURVE_KINDS, "paths")
    metrics = _choices(raw.get("metrics", ["nll", "accuracy"]), CLASSIFICATION, "metrics")
    if "nll" not in metrics:
        raise ValueError(f"metrics must include 'nll' (the study's barrier), got {list(metrics)}")
    cells = _cells(raw.get("grid"), methods)
    datasets = sorted({c.dataset for c in cells})
    train = _section(raw, "train", _TRAIN_DEFAULTS)
    train["epochs"] = _epochs(train["epochs"], datasets)
    for key in ("batch_size", "rank"):
        check_int(f"train.{key}", train[key])
    for key in ("asymmetry_seed", "history_samples"):
        check_int(f"train.{key}", train[key], low=0)
    for key in ("lr", "lr_end", "init_scale"):
        train[key] = check_positive_float(f"train.{key}", train[key])
    evaluate = _section(raw, "evaluate", _EVALUATE_DEFAULTS)
    for key in ("samples", "points", "activation_points"):
        check_int(f"evaluate.{key}", evaluate[key])
    if evaluate["points"] < 2:
        raise ValueError(f"evaluate.points must be at least 2 (the two endpoints), "
                         f"got {evaluate['points']}")
    curve = _section(raw, "curve", _CURVE_DEFAULTS)
    for key in ("epochs", "bends", "samples"):
        check_int(f"curve.{key}", curve[key])
    for key in ("lr", "lr_end"):
        curve[key] = check_positive_float(f"curve.{key}", curve[key])
    checkpoints = curve["checkpoints"]
    if not isinstance(checkpoints, list) or any(
            isinstance(e, bool) or not isinstance(e, int) or not 1 <= e < curve["epochs"]
            for e in checkpoints):
        raise ValueError(f"curve.checkpoints must be a list of epochs in 1..{curve['epochs'] - 1} "
                         f"(the last, curve.epochs, is always evaluated), got {checkpoints!r}")
    curve["checkpoints"] = sorted(set(checkpoints))
    learned = _section(raw, "learned", _LEARNED_DEFAULTS)
    for key in ("epochs", "batch_size", "samples"):
        check_int(f"learned.{key}", learned[key])
    _known(learned["lr"], set(LEARNED_METHODS), "learned.lr")
    learned["lr"] = {m: check_positive_float(f"learned.lr.{m}", v)
                     for m, v in learned["lr"].items()}
    return Study(name=name, pairs=pairs, cells=cells, paths=paths, metrics=metrics,
                 train=train, evaluate=evaluate, curve=curve, learned=learned)


def _known(table: Any, allowed: set[str], where: str) -> None:
    if not isinstance(table, Mapping):
        raise ValueError(f"{where or 'the study'} must be a table, got {type(table).__name__}")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ValueError(f"unknown key {where + '.' if where else ''}{unknown[0]!s}; "
                         f"expected one of {sorted(allowed)}")


def _choices(values: Any, allowed: tuple[str, ...], key: str) -> tuple[str, ...]:
    if not isinstance(values, list) or not values:
        raise ValueError(f"{key} must be a non-empty list, got {values!r}")
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ValueError(f"{key}: unknown {unknown[0]!r}; choose from {list(allowed)}")
    return tuple(v for v in allowed if v in values)  # canonical order, no repeats


def _section(raw: Mapping[str, Any], name: str, defaults: dict[str, Any]) -> dict[str, Any]:
    table = raw.get(name, {})
    _known(table, set(defaults), name)
    return {**defaults, **table}


def _arch(value: Any, key: str) -> str:
    """The canonical name of an architecture (``"mlp2"`` is ``"mlp"``: one network, one name,
    so its steps' cache keys are the same whichever is written)."""
    match = _RESNET.match(value) if isinstance(value, str) else None
    if match and int(match[1]) >= 8 and (int(match[1]) - 2) % 6 == 0:
        return value
    mlp = _MLP.match(value) if isinstance(value, str) else None
    if mlp and (mlp[1] is None or (int(mlp[1]) >= 1 and not mlp[1].startswith("0"))):
        return "mlp" if hidden_layers(value) == 2 else value
    raise ValueError(f"{key}: unknown architecture {value!r}; expected 'mlp' (two hidden "
                     f"layers), 'mlp<depth>' (depth >= 1 hidden layers) or 'resnet<depth>' "
                     f"with depth 6n + 2 (8, 14, 20, ...)")


def _cells(grid: Any, methods: tuple[str, ...]) -> dict[Cell, tuple[str, ...]]:
    if grid is None or (isinstance(grid, list) and not grid):
        raise ValueError("grid is empty: add at least one [[grid]] block")
    if not isinstance(grid, list):
        raise ValueError(f"grid must be an array of tables ([[grid]]), got {type(grid).__name__}")
    found: dict[Cell, set[str]] = {}
    for i, block in enumerate(grid):
        where = f"grid[{i}]"
        _known(block, _GRID_KEYS, where)
        for key in ("datasets", "archs", "widths", "guides"):
            if key not in block:
                raise ValueError(f"{where}.{key} is missing")
            if not isinstance(block[key], list) or not block[key]:
                raise ValueError(f"{where}.{key} must be a non-empty list, got {block[key]!r}")
        datasets = _choices(block["datasets"], DATASETS, f"{where}.datasets")
        guides = _choices(block["guides"], GUIDES, f"{where}.guides")
        archs = [_arch(a, f"{where}.archs") for a in block["archs"]]
        widths = [check_int(f"{where}.widths", w) for w in block["widths"]]
        block_methods = _choices(block.get("methods", list(methods)), METHODS,
                                 f"{where}.methods")
        asymmetries = _choices(block.get("asymmetries", ["none"]), ASYMMETRIES,
                               f"{where}.asymmetries")
        for d in datasets:
            for a in archs:
                for w in widths:
                    for g in guides:
                        for asym in asymmetries:
                            found.setdefault(Cell(d, a, w, g, asym), set()).update(block_methods)
    return {cell: tuple(m for m in METHODS if m in ms) for cell, ms in found.items()}


def _epochs(value: Any, datasets: list[str]) -> dict[str, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return {d: check_int("train.epochs", value) for d in datasets}
    if isinstance(value, Mapping):
        _known(value, set(DATASETS), "train.epochs")
        missing = [d for d in datasets if d not in value]
        if missing:
            raise ValueError(f"train.epochs has no entry for dataset {missing[0]!r}")
        return {d: check_int(f"train.epochs.{d}", value[d]) for d in datasets}
    raise ValueError(f"train.epochs must be an integer or a table dataset -> integer, "
                     f"got {value!r}")
