"""A results table as the study's markdown tables and plots.

Every (cell, method, path) is summarised over its pairs: the mean of each barrier, its spread
(the standard deviation over pairs) and the mean Monte-Carlo standard error; the endpoints'
mean test accuracy; the mean matching objectives at the method's permutations. A study with
learned curves is reported as the straight path against the curves (``bezier`` after the full
training budget) and as the barrier against the curve's training epochs (``bezier@E``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..matching.weights import LEARNED_METHODS
from ..paths.curves import KINDS as CURVE_KINDS
from .config import DATASETS, METHODS, hidden_layers

__all__ = ["summarise", "markdown", "plot", "plot_curve_epochs", "write_report",
           "history_markdown", "plot_history"]

LABELS = {"naive": "naive", "mean": "mean", "wasserstein": "W2", "activation": "activation",
          "ste": "STE", "sinkhorn": "Sinkhorn"}
COLORS = {"naive": "tab:red", "mean": "tab:orange", "wasserstein": "tab:blue",
          "activation": "tab:green", "ste": "tab:purple", "sinkhorn": "tab:brown"}
_STYLES = {"mean-field": "-", "low-rank": "--"}


def summarise(frame) -> list[dict[str, Any]]:
    """One entry per (dataset, arch, width, guide, method, path) of a results DataFrame (see
    :func:`~bnn_align.sweep.read_results`): ``pairs``, ``test_acc``, ``train_seconds`` (per
    guide), ``<metric>_mean``, ``<metric>_spread``, ``<metric>_mc_se`` for every barrier column
    ``<metric>_barrier``, and ``w2_cost``, ``mean_cost``, ``match_seconds``; for a learned
    method ``changed``, the number of pairs whose permutations it changed (its W2 objective
    differs from the ``"wasserstein"`` row's: a learned matching keeps its start unless it
    lowers the validation barrier). Ordered by dataset, arch, guide, width, method."""
    metrics = _metrics(frame)
    groups: dict[tuple, list[dict]] = {}
    w2_costs: dict[tuple, float] = {}
    for r in frame.to_dict("records"):
        groups.setdefault((r["dataset"], _variant(r), int(r["width"]), r["guide"], r["method"],
                           r["path"]), []).append(r)
        if r["method"] == "wasserstein":
            w2_costs[_pair_of(r)] = r["w2_cost"]
    out = []
    for (dataset, arch, width, guide, method, path), rs in sorted(groups.items(), key=_order):
        entry = {"dataset": dataset, "arch": arch, "width": width, "guide": guide,
                 "method": method, "path": path, "pairs": len(rs),
                 "train_seconds": float(np.mean([r["train_seconds"] for r in rs])) / 2}
        if "acc_t0" in frame.columns:
            entry["test_acc"] = float(np.mean([(r["acc_t0"] + r["acc_t1"]) / 2 for r in rs]))
        for key in metrics:
            values = np.array([r[f"{key}_barrier"] for r in rs])
            entry[f"{key}_mean"] = float(values.mean())
            entry[f"{key}_spread"] = float(values.std(ddof=1)) if len(rs) > 1 else 0.0
            entry[f"{key}_mc_se"] = float(np.mean([r[f"{key}_se"] for r in rs]))
        for key in ("w2_cost", "mean_cost", "match_seconds"):
            entry[key] = float(np.mean([r[key] for r in rs]))
        if method in LEARNED_METHODS:
            entry["changed"] = sum(r["w2_cost"] != w2_costs.get(_pair_of(r), r["w2_cost"])
                                   for r in rs)
        out.append(entry)
    return out


def _pair_of(row: dict) -> tuple:
    return (row["dataset"], _variant(row), int(row["width"]), row["guide"], row["path"],
            int(row["pair"]))


def _variant(row: dict) -> str:
    """The row's architecture, with ``+w`` or ``+sigma`` for an asymmetric network (tables of
    studies with an ``asymmetry`` column), so the variants of one cell are reported apart."""
    asymmetry = row.get("asymmetry", "none")
    if not isinstance(asymmetry, str) or asymmetry == "none":
        return row["arch"]
    return f"{row['arch']}+{asymmetry}"


def _layers(arch: str) -> int | None:
    return hidden_layers(arch.partition("+")[0])


def _metrics(frame) -> list[str]:
    found = [c[:-len("_barrier")] for c in frame.columns if c.endswith("_barrier")]
    return sorted(found, key=lambda m: (m != "nll", m != "acc", m))


def _order(item):
    (dataset, arch, width, guide, method, path), _ = item
    return (dataset, arch, guide, width, METHODS.index(method), path)


def _network(arch: str, width: int) -> str:
    arch, _, asymmetry = arch.partition("+")
    layers = hidden_layers(arch)
    name = f"MLP {width}x{layers}" if layers else f"ResNet-{arch[len('resnet'):]} x{width}"
    return f"{name}, {asymmetry}-asym." if asymmetry else name


def markdown(summary: list[dict[str, Any]]) -> str:
    """The NLL barriers (with test accuracy and the W2 rows' Monte-Carlo s.e.), one table per
    other metric (accuracy: the largest drop below the line between the endpoints), the
    matching objectives, and with learned methods the seconds per match; with asymmetric
    networks first a table of each cell's variants side by side; a set of tables per path kind
    when there are several."""
    paths = sorted({s["path"] for s in summary})
    parts = []
    if any(_curve_epochs(p) is not None for p in paths):
        parts.append(_curve_tables(summary))
        paths = [p for p in paths if _curve_epochs(p) is None]
    for path in paths:
        rows = [s for s in summary if s["path"] == path]
        text = _tables(rows)
        if _has_variants(rows):
            text = _variants_table(rows) + "\n\n" + text
        parts.append(text if len(paths) == 1 and not parts else f"### Path: {path}\n\n{text}")
    return "\n\n".join(parts)


def _variants_table(summary: list[dict[str, Any]]) -> str:
    """A study with asymmetric networks in one table: per standard cell its naive and W2
    barriers beside its asymmetric variants' naive barriers, and each variant's test accuracy."""
    cells = _by_variant(summary)
    variants = [a for a in _VARIANTS if any(a in {v for v, _ in by} for by in cells.values())]
    columns = [c for c in _VARIANT_SERIES if c[0] == "none" or c[0] in variants]
    head = " | ".join(f"{_VARIANTS[a]}: {LABELS[m]}" for a, m in columns)
    accuracy = " / ".join(_VARIANTS[a] for a in variants)
    lines = ["Variants: NLL barrier (nats, mean ± spread over pairs) of the standard network, "
             "naive and W2-aligned, and of the asymmetric networks, naive (nothing to align); "
             "test accuracy of the endpoints.", "",
             f"| data | network | guide | {head} | test acc ({accuracy}) |",
             _rule(4 + len(columns))]
    for (dataset, arch, width, guide), by in cells.items():
        accuracies = [next((s["test_acc"] for (v, _), s in by.items() if v == a), None)
                      for a in variants]
        lines.append(f"| {dataset} | {_network(arch, width)} | {guide} | "
                     + " | ".join(_cell(by.get(c), "nll") for c in columns) + " | "
                     + " / ".join("" if a is None else f"{a:.3f}" for a in accuracies) + " |")
    return "\n".join(lines)


def _curve_epochs(path: str) -> tuple[str, int | None] | None:
    """``("bezier", 5)`` for ``bezier@5``, ``("bezier", None)`` (the full budget) for
    ``bezier``; None for a path that is not a learned curve."""
    kind, _, epochs = path.partition("@")
    if kind not in CURVE_KINDS:
        return None
    return kind, int(epochs) if epochs else None


def _curve_tables(summary: list[dict[str, Any]]) -> str:
    """Straight against learned paths per method, then the barrier against training epochs."""
    straight = sorted({s["path"] for s in summary if _curve_epochs(s["path"]) is None})
    kinds = [k for k in CURVE_KINDS if any(_curve_epochs(s["path"]) == (k, None)
                                           for s in summary)]
    methods = [m for m in METHODS if any(s["method"] == m for s in summary)]
    cells: dict[tuple, dict] = {}
    for s in summary:
        cells.setdefault((s["dataset"], s["arch"], s["width"], s["guide"]), {})[
            (s["method"], s["path"])] = s
    columns = [(m, p) for m in methods for p in straight + kinds]
    head = " | ".join(f"{LABELS[m]}: {'line' if p in straight and len(straight) == 1 else p}"
                      for m, p in columns)
    lines = []
    for metric in _summary_metrics(summary):
        lines += [f"{_describe(metric)} along the straight path and the learned curve (full training "
                  "budget): mean ± spread over pairs.", "",
                  f"| data | network | guide | {head} |", _rule(3 + len(columns))]
        for (dataset, arch, width, guide), by in cells.items():
            lines.append(f"| {dataset} | {_network(arch, width)} | {guide} | " + " | ".join(
                _cell(by.get(c), metric) for c in columns) + " |")
        lines.append("")
    for kind in kinds:
        checkpoints = sorted({e for s in summary
                              for k, e in [_curve_epochs(s["path"]) or (None, None)]
                              if k == kind and e is not None})
        labels = [f"{kind}@{e}" for e in checkpoints] + [kind]
        lines += [f"NLL barrier against the {kind} curve's training epochs (0: the straight "
                  "W2 path; last column: the full budget), mean ± spread over pairs.", "",
                  "| data | network | guide | method | 0 | "
                  + " | ".join(str(e) for e in checkpoints) + " | all |",
                  _rule(5 + len(labels))]
        for (dataset, arch, width, guide), by in cells.items():
            for m in methods:
                start = by.get((m, "wasserstein"))
                lines.append(f"| {dataset} | {_network(arch, width)} | {guide} | {LABELS[m]} | "
                             + " | ".join(_cell(e, "nll") for e in
                                          [start] + [by.get((m, label)) for label in labels])
                             + " |")
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def _summary_metrics(summary: list[dict[str, Any]]) -> list[str]:
    """The barrier metrics of a summary (``"nll"`` first), as :func:`summarise` names them."""
    return [k[:-len("_mean")] for k in summary[0] if k.endswith("_mean")]


def _describe(metric: str) -> str:
    return {"nll": "NLL barrier (nats)",
            "acc": "Accuracy barrier (largest drop below the line between the endpoints)"
            }.get(metric, f"{metric} barrier")


def _cell(entry: dict | None, key: str) -> str:
    if entry is None:
        return ""
    return f"{entry[key + '_mean']:.3f} ± {entry[key + '_spread']:.3f}"


def _tables(summary: list[dict[str, Any]]) -> str:
    cells: dict[tuple, dict] = {}
    for s in summary:
        cells.setdefault((s["dataset"], s["arch"], s["width"], s["guide"]), {})[s["method"]] = s
    methods = [m for m in METHODS if any(m in by for by in cells.values())]
    head = " | ".join(LABELS[m] for m in methods)
    metrics = _summary_metrics(summary)
    acc = "test_acc" in summary[0]
    lines = ["NLL barrier (nats): mean ± spread (standard deviation) over independent pairs; "
             "MC s.e.: the typical Monte-Carlo standard error of one aligned (W2) barrier.", "",
             f"| data | network | guide | {'test acc | ' if acc else ''}{head} | MC s.e. |",
             _rule(4 + acc + len(methods))]
    for (dataset, arch, width, guide), by_method in cells.items():
        test = np.mean([s["test_acc"] for s in by_method.values()]) if acc else None
        # a cell without a W2 row (an asymmetric network: nothing to align) has no such s.e.
        se = by_method.get("wasserstein", {}).get("nll_mc_se")
        lines.append(f"| {dataset} | {_network(arch, width)} | {guide} | "
                     + (f"{test:.3f} | " if acc else "") + _row(by_method, methods, "nll")
                     + (f" | {se:.3f} |" if se is not None else " |  |"))
    for metric in metrics[1:]:
        lines += ["", f"{_describe(metric)}: mean ± spread over pairs.", "",
                  f"| data | network | guide | {head} |", _rule(3 + len(methods))]
        for (dataset, arch, width, guide), by_method in cells.items():
            lines.append(f"| {dataset} | {_network(arch, width)} | {guide} | "
                         + _row(by_method, methods, metric) + " |")
    compared = {k: by for k, by in cells.items() if "mean" in by and "wasserstein" in by}
    if compared:
        lines += ["", "Matching objectives at each method's permutations (mean over pairs): the "
                  "W2 objective (coupled squared distance) and the squared distance of the "
                  "means.", "", "| data | network | guide | W2 obj.: mean | W2 obj.: W2 | "
                  "mean obj.: mean | mean obj.: W2 |", _rule(7)]
    for (dataset, arch, width, guide), by_method in compared.items():
        m, w = by_method["mean"], by_method["wasserstein"]
        lines.append(f"| {dataset} | {_network(arch, width)} | {guide} | {m['w2_cost']:.1f} | "
                     f"{w['w2_cost']:.1f} | {m['mean_cost']:.1f} | {w['mean_cost']:.1f} |")
    if any(m in LEARNED_METHODS for m in methods):
        matched = [m for m in methods if m != "naive"]
        lines += ["", "Seconds per match (mean over pairs; the learned methods include the "
                  "W2 match they start from and their validation barriers), and for the "
                  "learned methods in how many pairs they changed W2's permutations.", "",
                  f"| data | network | guide | {' | '.join(LABELS[m] for m in matched)} |",
                  _rule(3 + len(matched))]
        for (dataset, arch, width, guide), by_method in cells.items():
            lines.append(f"| {dataset} | {_network(arch, width)} | {guide} | " + " | ".join(
                "" if m not in by_method else f"{by_method[m]['match_seconds']:.1f}" + (
                    f" ({by_method[m]['changed']}/{by_method[m]['pairs']} changed)"
                    if "changed" in by_method[m] else "")
                for m in matched) + " |")
    return "\n".join(lines)


def _rule(columns: int) -> str:
    return "|" + "---|" * columns


def _row(by_method: dict, methods: list[str], key: str) -> str:
    return " | ".join(_cell(by_method.get(m), key) for m in methods)


def _save(fig, path: str | os.PathLike) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _error_bars(means: np.ndarray, spreads: np.ndarray, floor: float) -> tuple:
    """Means floored at ``floor`` for a log axis, and (lower, upper) error bars that stay on
    the axis."""
    shown = np.maximum(means, floor)
    return shown, (np.minimum(spreads, shown - floor), spreads)


def plot(summary: list[dict[str, Any]], path: str | os.PathLike, key: str = "nll") -> None:
    """Barriers against width, one row of panels per dataset: an MLP panel per guide, one
    panel per ResNet with both guides (solid mean-field, dashed low-rank). Error bars are the
    spread over pairs; the log axis is floored at 1e-3 (barriers are >= 0). A study with
    asymmetric networks is plotted by variant instead (see :func:`_plot_variants`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = [s for s in summary if s["path"] == min(s["path"] for s in summary)]
    if _has_variants(summary):
        _plot_variants(summary, path, key)
        return
    rows = []
    for dataset in [d for d in DATASETS if any(s["dataset"] == d for s in summary)]:
        here = [s for s in summary if s["dataset"] == dataset]
        panels = []
        for arch in sorted({s["arch"] for s in here},
                           key=lambda a: (_layers(a) is None, _layers(a) or 0, a)):
            guides = [g for g in _STYLES if any((s["arch"], s["guide"]) == (arch, g)
                                                 for s in here)]
            panels += [(dataset, arch, g) for g in guides] if _layers(arch) else \
                [(dataset, arch, None)]
        rows.append(panels)
    ncols = max(len(r) for r in rows)
    if all(len(r) == ncols for r in rows):
        ncols += 1  # a free panel for the legend
    floor = 1e-3
    ylabel = "NLL barrier (nats)" if key == "nll" else f"{'accuracy' if key == 'acc' else key} barrier"
    fig, axes = plt.subplots(len(rows), ncols, figsize=(4 * ncols, 3.3 * len(rows)),
                             squeeze=False)
    for ax_row, panels in zip(axes, rows):
        for ax in ax_row[len(panels):]:
            ax.axis("off")
        for ax, (dataset, arch, guide) in zip(ax_row, panels):
            _panel(ax, summary, dataset, arch, guide, key, floor, ylabel)
    handles = [plt.Line2D([], [], color=c, marker="o", label=LABELS[m])
               for m, c in COLORS.items() if any(s["method"] == m for s in summary)]
    handles += [plt.Line2D([], [], color="gray", linestyle=style, label=g)
                for g, style in _STYLES.items()]
    free = max((i for i, r in enumerate(rows) if len(r) < ncols))
    axes[free][-1].legend(handles=handles, loc="center", title="matching; guide")
    pairs = max(s["pairs"] for s in summary)
    fig.suptitle(f"{ylabel} after alignment; error bars: spread over {pairs} pairs of seeds",
                 fontsize=11)
    _save(fig, path)


def plot_curve_epochs(summary: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """The NLL barrier against the learned curves' training epochs, one panel per cell and
    curve kind, one line per method (0: the straight W2 path; error bars: spread over pairs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(s["dataset"], s["arch"], s["width"], s["guide"], kind) for s in summary
                     for kind, _ in [_curve_epochs(s["path"]) or (None, None)] if kind})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.3), squeeze=False)
    for ax, (dataset, arch, width, guide, kind) in zip(axes[0], panels):
        here = [s for s in summary if (s["dataset"], s["arch"], s["width"], s["guide"]) ==
                (dataset, arch, width, guide)]
        epochs = sorted({e for s in here for k, e in [_curve_epochs(s["path"]) or (None, None)]
                         if k == kind and e is not None})
        labels = ["wasserstein"] + [f"{kind}@{e}" for e in epochs] + [kind]
        for method, color in COLORS.items():
            by_path = {s["path"]: s for s in here if s["method"] == method}
            xs = [i for i, label in enumerate(labels) if label in by_path]
            if len(xs) < 2:
                continue
            ax.errorbar(xs, [by_path[labels[i]]["nll_mean"] for i in xs],
                        yerr=[by_path[labels[i]]["nll_spread"] for i in xs], marker="o", ms=4,
                        capsize=2, color=color, label=LABELS[method])
        ax.set_xticks(range(len(labels)), ["0"] + [str(e) for e in epochs] + ["all"])
        ax.set_xlabel(f"{kind} training epochs (0: straight path)")
        ax.set_ylabel("NLL barrier (nats)")
        ax.set_yscale("log")
        ax.set_title(f"{dataset}, {_network(arch, width)}, {guide}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    _save(fig, path)


def _panel(ax, summary, dataset, arch, guide, key, floor, ylabel) -> None:
    widths = set()
    for method, color in COLORS.items():
        for g, style in _STYLES.items():
            if guide is not None and g != guide:
                continue
            pts = sorted((s["width"], s[f"{key}_mean"], s[f"{key}_spread"]) for s in summary
                         if (s["dataset"], s["arch"], s["guide"], s["method"]) ==
                         (dataset, arch, g, method))
            if not pts:
                continue
            w, m, e = map(np.array, zip(*pts))
            widths.update(w.tolist())
            shown, bars = _error_bars(m, e, floor)
            ax.errorbar(w, shown, yerr=bars, marker="o", ms=4, capsize=2,
                        color=color, linestyle=style, label=f"{LABELS[method]} ({g})")
    ax.set_xscale("log", base=2)
    layers = _layers(arch)
    arch, _, asymmetry = arch.partition("+")
    if layers is None:
        ax.set_xlim(min(widths) * 0.8, max(widths) * 1.25)
        ax.set_xticks(sorted(widths), [f"x{w}" for w in sorted(widths)])
    ax.set_yscale("log")
    ax.set_ylim(floor, 5)
    ax.set_xlabel(f"hidden width ({layers} layers)" if layers else "width multiplier")
    ax.set_ylabel(ylabel)
    network = "MLP" if arch == "mlp" else (
        f"MLP, {layers} layers" if layers else f"ResNet-{arch[len('resnet'):]}")
    if dataset == "mnist1d" and not layers:
        network += " (1-D)"
    if asymmetry:
        network += f", {asymmetry}-asym."
    ax.set_title(f"{dataset}, {network}" + (f", {guide}" if guide else ", both guides"),
                 fontsize=10)
    ax.grid(alpha=0.3, which="both")


_VARIANTS = {"none": "standard", "w": "W-asym.", "sigma": "sigma-asym."}
_VARIANT_COLORS = {"none": "tab:blue", "w": "tab:red", "sigma": "tab:green"}
# the columns of the variants table and series of the variants plot: (variant, method) -> colour
_VARIANT_SERIES = {("none", "naive"): "tab:red", ("none", "wasserstein"): "tab:blue",
                   ("w", "naive"): "tab:purple", ("sigma", "naive"): "tab:green"}


def _has_variants(summary: list[dict[str, Any]]) -> bool:
    return any("+" in s["arch"] for s in summary)


def _by_variant(summary: list[dict[str, Any]]) -> dict[tuple, dict]:
    """(dataset, arch, width, guide) -> (variant, method) -> summary entry: the asymmetric
    variants of a cell (arch ``mlp+w``, ``mlp+sigma``) under the standard cell's key."""
    cells: dict[tuple, dict] = {}
    for s in summary:
        arch, _, asymmetry = s["arch"].partition("+")
        cells.setdefault((s["dataset"], arch, s["width"], s["guide"]), {})[
            (asymmetry or "none", s["method"])] = s
    return cells


def _plot_variants(summary: list[dict[str, Any]], path: str | os.PathLike, key: str) -> None:
    """One panel per dataset, a column of points per cell (network and guide): the standard
    network's naive and W2 barriers beside the asymmetric variants' naive barriers, with the
    spread over pairs as error bars, on a log axis floored at 1e-3."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-3
    by = _by_variant(summary)
    datasets = [d for d in DATASETS if any(s["dataset"] == d for s in summary)]
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 3.6),
                             squeeze=False, sharey=True)
    for ax, dataset in zip(axes[0], datasets):
        # MLPs before ResNets, then by name, width and guide
        cells = sorted((c for c in by if c[0] == dataset),
                       key=lambda c: (_layers(c[1]) is None, c[1], c[2], c[3]))
        offsets = np.linspace(-0.24, 0.24, len(_VARIANT_SERIES))
        for offset, (series, color) in zip(offsets, _VARIANT_SERIES.items()):
            xs = [i for i, cell in enumerate(cells) if series in by[cell]]
            if not xs:
                continue
            m = np.array([by[cells[i]][series][f"{key}_mean"] for i in xs])
            e = np.array([by[cells[i]][series][f"{key}_spread"] for i in xs])
            shown, bars = _error_bars(m, e, floor)
            variant, method = series
            ax.errorbar(np.array(xs) + offset, shown, yerr=bars, fmt="o", ms=5, capsize=2,
                        color=color, label=f"{_VARIANTS[variant]}, {LABELS[method]}")
        ax.set_xticks(range(len(cells)), [f"{_network(arch, width)}\n{guide}"
                                          for _, arch, width, guide in cells], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylim(floor, 5)
        ax.set_title(dataset, fontsize=10)
        ax.grid(alpha=0.3, which="both", axis="y")
    axes[0][0].set_ylabel("NLL barrier (nats)" if key == "nll" else f"{key} barrier")
    axes[0][-1].legend(fontsize=8)
    pairs = max(s["pairs"] for s in summary)
    fig.suptitle(f"Standard and asymmetric networks; error bars: spread over {pairs} pairs",
                 fontsize=11)
    _save(fig, path)


def _history_groups(history) -> dict[tuple, Any]:
    """(dataset, arch, width, guide) -> asymmetry -> DataFrame of the mean over seeds by epoch."""
    groups: dict[tuple, Any] = {}
    columns = ["neg_elbo", "test_accuracy", "test_nll"]
    for key, frame in history.groupby(["dataset", "arch", "width", "guide", "asymmetry"],
                                      sort=False):
        *cell, asymmetry = key
        means = frame.groupby("epoch")[columns].mean()
        means["seeds"] = frame.groupby("epoch")["seed"].nunique()
        groups.setdefault(tuple(cell), {})[asymmetry] = means
    return groups


def history_markdown(history) -> str:
    """The training histories (``<name>_history.csv`` as a DataFrame) as a table: per cell and
    variant, the test accuracy of the model average after a tenth, half and all of the epochs,
    and the final negative ELBO and test NLL, means over the seeds."""
    lines = ["Training: test accuracy of the model average after 10 %, 50 % and 100 % of the "
             "epochs, final negative ELBO and test NLL (means over the trained seeds; the "
             "W-asymmetric networks have fewer latent weights, hence a smaller KL term).", "",
             "| data | network | guide | variant | seeds | acc 10 % | acc 50 % | acc 100 % | "
             "neg. ELBO | test NLL |", _rule(10)]
    for (dataset, arch, width, guide), variants in _history_groups(history).items():
        for asymmetry in [a for a in _VARIANTS if a in variants]:
            m = variants[asymmetry]
            epochs = len(m)
            at = [m["test_accuracy"].iloc[max(round(f * epochs), 1) - 1] for f in (0.1, 0.5, 1)]
            lines.append(f"| {dataset} | {_network(arch, int(width))} | {guide} | "
                         f"{_VARIANTS[asymmetry]} | {int(m['seeds'].min())} | "
                         + " | ".join(f"{a:.3f}" for a in at)
                         + f" | {m['neg_elbo'].iloc[-1]:.4g} | {m['test_nll'].iloc[-1]:.3f} |")
    return "\n".join(lines)


def plot_history(history, path: str | os.PathLike) -> None:
    """Negative ELBO and test accuracy against the epoch, one row of two panels per cell, a
    line per variant (the mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _history_groups(history)
    fig, axes = plt.subplots(len(groups), 2, figsize=(9, 2.8 * len(groups)), squeeze=False)
    for (left, right), ((dataset, arch, width, guide), variants) in zip(axes, groups.items()):
        for asymmetry in [a for a in _VARIANTS if a in variants]:
            m = variants[asymmetry]
            style = dict(color=_VARIANT_COLORS[asymmetry], label=_VARIANTS[asymmetry])
            left.plot(m.index, m["neg_elbo"], **style)
            right.plot(m.index, m["test_accuracy"], **style)
        title = f"{dataset}, {_network(arch, int(width))}, {guide}"
        left.set(yscale="log", xlabel="epoch", ylabel="negative ELBO", title=title)
        right.set(xlabel="epoch", ylabel="test accuracy", title=title)
        for ax in (left, right):
            ax.title.set_fontsize(9)
            ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=8)
    _save(fig, path)


def write_report(results: str | os.PathLike, out: str | os.PathLike | None = None
                 ) -> list[Path]:
    """Write ``<stem>.md`` (the tables), ``<stem>.png`` (NLL barriers), with accuracy
    ``<stem>_accuracy.png`` and with learned curves ``<stem>_curve_epochs.png`` (the barrier
    against the curves' training epochs) for the results table ``<stem>.csv`` (or
    ``.parquet``) into ``out`` (default: the table's folder); returns the paths written. Where
    the training histories ``<stem>_history.csv`` lie beside the table
    (``train.history_samples``), their table is added to the markdown and ``<stem>_history.png``
    plotted (see :func:`plot_history`).

    Parameters
    ----------
    results : str or os.PathLike
        A results table written by :func:`run`.
    out : str or os.PathLike, optional
        Folder for the report (created if needed).

    Returns
    -------
    list of Path
        The markdown file, then the plots.

    Raises
    ------
    ValueError
        A table without rows (and what :func:`read_results` raises).

    Examples
    --------
    >>> import tempfile
    >>> from bnn_align import sweep
    >>> study = sweep.parse_study({
    ...     "name": "tiny", "pairs": 1, "methods": ["naive", "wasserstein"],
    ...     "train": {"epochs": 1}, "evaluate": {"samples": 4, "points": 3},
    ...     "grid": [{"datasets": ["digits"], "archs": ["mlp"], "widths": [8],
    ...               "guides": ["mean-field"]}]})
    >>> folder = tempfile.TemporaryDirectory()
    >>> _ = sweep.run(study, folder.name, serial=True, progress=False)
    >>> written = sweep.write_report(f"{folder.name}/tiny.csv")
    >>> [path.name for path in written]
    ['tiny.md', 'tiny.png', 'tiny_accuracy.png']
    >>> print(written[0].read_text().splitlines()[2])
    | data | network | guide | test acc | naive | W2 | MC s.e. |
    >>> folder.cleanup()
    """
    from .results import read_results

    results = Path(results)
    frame = read_results(results)
    if frame.empty:
        raise ValueError(f"{results} has no rows to report")
    out = Path(out) if out is not None else results.parent
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(frame)
    written = [out / f"{results.stem}.md", out / f"{results.stem}.png"]
    text = markdown(summary)
    history_path = results.with_name(f"{results.stem}_history.csv")
    if history_path.exists():
        import pandas as pd

        history = pd.read_csv(history_path, keep_default_na=False)
        text += "\n\n" + history_markdown(history)
    written[0].write_text(text + "\n")
    plot(summary, written[1], "nll")
    if "acc_barrier" in frame.columns:
        written.append(out / f"{results.stem}_accuracy.png")
        plot(summary, written[-1], "acc")
    if any(_curve_epochs(s["path"]) for s in summary):
        written.append(out / f"{results.stem}_curve_epochs.png")
        plot_curve_epochs(summary, written[-1])
    if history_path.exists():
        written.append(out / f"{results.stem}_history.png")
        plot_history(history, written[-1])
    return written
