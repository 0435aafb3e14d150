"""Reproduction study: marginalized loss barriers before and after alignment.

For every cell of the grid below it trains three independent pairs of Bayesian networks (seeds
2p and 2p + 1), aligns the second posterior of each pair to the first, and measures the
marginalized loss barrier (predictive NLL of the model average and accuracy drop, with Monte-Carlo
standard errors) along the Wasserstein path:

* MLPs with two hidden layers of width 64, 128, 256, 512 and 1024 on MNIST-1D and on digits;
* a 1-D ResNet-8 on MNIST-1D at width multipliers 1 and 2;
* mean-field and low-rank (rank 10) guides;
* naive path (no alignment), ``"mean"`` matching and ``"wasserstein"`` matching, and
  ``"activation"`` matching for MNIST-1D, MLP width 256, mean-field.

Low-rank MLPs of width 1024 are the most expensive cells by far: Pyro's low-rank guide's
log-density runs over a 1.1M x 10 factor several times per step, so one guide took 27 minutes
(MNIST-1D) and 34 minutes (digits) single-threaded, 6.1 of the study's 9.4 training core-hours.

The study is resumable: trained guides are cached under ``--cache`` and every finished
(cell, pair, method) row is appended to ``benchmarks/results/study_barrier.csv`` at once; a
rerun skips what is done. Progress bars show items, training epochs and path points (``--quiet``
turns them off). ``--quick`` runs a tiny version for smoke testing; ``--only`` splits the
grid between processes (one thread each: two multi-threaded BLAS processes on 2 cores slow each
other down many times over). At the end it
writes ``study_barrier.md`` (the summary tables), ``study_barrier.png`` (NLL barriers) and
``study_barrier_accuracy.png`` (accuracy barriers).

Training follows the recipe in the design notes: Normal(0, 1) prior, full ELBO, AutoNormal /
AutoLowRankMultivariateNormal with init scale 1e-3 and He-initialised means, Adam 1e-2 decayed
to 1e-3, batch 128, 60 epochs on MNIST-1D and 200 on digits.
"""

from __future__ import annotations

import argparse
import csv
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import torch
from tqdm.auto import tqdm

from bnn_align import (BayesianNetwork, alignment_cost, fit, guides, interpolate, marginal_loss,
                       match, models)
from bnn_align.data import digits, mnist1d

RESULTS = Path(__file__).parent / "results"
FIELDS = ["dataset", "arch", "width", "guide", "pair", "method", "nll_barrier", "nll_se",
          "acc_barrier", "acc_se", "nll_t0", "nll_t1", "acc_t0", "acc_t1", "w2_cost",
          "mean_cost", "match_seconds", "train_seconds", "eval_seconds"]
METHODS = ("naive", "mean", "wasserstein")


@dataclass(frozen=True)
class Cell:
    dataset: str
    arch: str       # "mlp" or "resnet8"
    width: int      # hidden width (MLP) or width multiplier (ResNet)
    guide: str      # "mean-field" or "low-rank"

    @property
    def key(self) -> str:
        return f"{self.dataset}-{self.arch}{self.width}-{self.guide}"

    def methods(self) -> tuple[str, ...]:
        extra = ("activation",) if (self.dataset, self.arch, self.width, self.guide) == (
            "mnist1d", "mlp", 256, "mean-field") else ()
        return METHODS + extra


def grid(quick: bool) -> list[Cell]:
    if quick:
        return [Cell("digits", "mlp", 16, "mean-field"), Cell("digits", "mlp", 16, "low-rank")]
    cells = []
    for dataset in ("mnist1d", "digits"):
        for guide in ("mean-field", "low-rank"):
            for width in (64, 128, 256, 512, 1024):
                cells.append(Cell(dataset, "mlp", width, guide))
    for guide in ("mean-field", "low-rank"):
        for width in (1, 2):
            cells.append(Cell("mnist1d", "resnet8", width, guide))
    return cells


def load_data(cell: Cell):
    if cell.dataset == "digits":
        return digits()
    return mnist1d(channel_axis=cell.arch == "resnet8")


def build_model(cell: Cell, split, seed: int) -> BayesianNetwork:
    torch.manual_seed(seed)
    if cell.arch == "mlp":
        net = models.mlp(split.input_shape[0], [cell.width, cell.width], split.num_classes)
    else:
        net = models.resnet(8, width=cell.width, dim=1, in_channels=1,
                            num_classes=split.num_classes)
    return BayesianNetwork(net, input_shape=split.input_shape)


def make_guide(cell: Cell, model: BayesianNetwork):
    return guides.mean_field(model) if cell.guide == "mean-field" else guides.low_rank(model, 10)


def epochs_for(cell: Cell, quick: bool) -> int:
    return 2 if quick else (200 if cell.dataset == "digits" else 60)


def cache_path(cell: Cell, seed: int, cache: Path, epochs: int) -> Path:
    return cache / f"{cell.key}-seed{seed}-e{epochs}.pt"


def trained(cell: Cell, split, seed: int, cache: Path, epochs: int, progress: bool = True):
    """A trained (model, guide, seconds), from the cache when it is there."""
    model = build_model(cell, split, seed)
    guide = make_guide(cell, model)
    path = cache_path(cell, seed, cache, epochs)
    if path.exists():
        state = torch.load(path, weights_only=False)
        guide.load_state_dict(state["guide"])
        return model, guide, state["seconds"]
    started = time.perf_counter()
    fit(model, guide, split.train, epochs=epochs, seed=seed, progress=progress)
    seconds = time.perf_counter() - started
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"guide": guide.state_dict(), "seconds": seconds}, path)
    return model, guide, seconds


def done_rows(csv_path: Path) -> set[tuple]:
    if not csv_path.exists():
        return set()
    with csv_path.open() as f:
        return {(r["dataset"], r["arch"], r["width"], r["guide"], r["pair"], r["method"])
                for r in csv.DictReader(f)}


def append_row(csv_path: Path, row: dict) -> None:
    new = not csv_path.exists()
    with csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def run(cells: list[Cell], pairs: int, csv_path: Path, cache: Path, quick: bool,
        progress: bool = True) -> None:
    """Train, align and evaluate every missing (cell, pair, method) row; ``progress`` shows bars
    for the items and, nested, for training epochs and path points."""
    done = done_rows(csv_path)
    todo = [(c, p) for c in cells for p in range(pairs)
            if any((c.dataset, c.arch, str(c.width), c.guide, str(p), m) not in done
                   for m in c.methods())]
    samples = 8 if quick else 64
    ts = 5 if quick else 11
    for cell, pair in tqdm(todo, desc="study", disable=not progress):
        done = done_rows(csv_path)  # another process may have finished rows meanwhile
        methods = [m for m in cell.methods()
                   if (cell.dataset, cell.arch, str(cell.width), cell.guide, str(pair), m)
                   not in done]
        if not methods:
            continue
        split = load_data(cell)
        epochs = epochs_for(cell, quick)
        model, q0, s0 = trained(cell, split, 2 * pair, cache, epochs, progress)
        _, q1, s1 = trained(cell, split, 2 * pair + 1, cache, epochs, progress)
        x_act = split.x_train[:1000]
        for method in methods:
            match_seconds = 0.0
            other, perms = q1, None
            if method != "naive":
                alignment = match(q0, q1, method=method, seed=pair,
                                  data=x_act if method == "activation" else None)
                other, perms = alignment.aligned, alignment.perms
                match_seconds = alignment.seconds
            started = time.perf_counter()
            curve = marginal_loss(model, interpolate(q0, other), split.test, ts=ts,
                                  num_samples=samples, seed=pair, metrics=["nll", "accuracy"],
                                  progress=progress)
            nll, acc = curve.barrier("nll"), curve.barrier("accuracy")
            append_row(csv_path, {
                "dataset": cell.dataset, "arch": cell.arch, "width": cell.width,
                "guide": cell.guide, "pair": pair, "method": method,
                "nll_barrier": nll.value, "nll_se": nll.se, "acc_barrier": acc.value,
                "acc_se": acc.se, "nll_t0": curve.values["nll"][0],
                "nll_t1": curve.values["nll"][-1], "acc_t0": curve.values["accuracy"][0],
                "acc_t1": curve.values["accuracy"][-1],
                # every method's permutations on both objectives: tells a poor optimum of the
                # W2 objective from an objective that prefers a worse alignment
                "w2_cost": alignment_cost(q0, q1, perms),
                "mean_cost": alignment_cost(q0, q1, perms, method="mean"),
                "match_seconds": match_seconds,
                "train_seconds": s0 + s1, "eval_seconds": time.perf_counter() - started,
            })
        pyro.clear_param_store()


# ------------------------------------------------------------------------------- reporting --
def load_rows(csv_path: Path) -> list[dict]:
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in FIELDS[6:]:
            r[k] = float(r[k])
        r["width"] = int(r["width"])
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and spread (standard deviation over pairs) of every (cell, method)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["arch"], r["width"], r["guide"], r["method"]),
                          []).append(r)
    out = []
    for (dataset, arch, width, guide, method), rs in sorted(groups.items(), key=_order):
        entry = {"dataset": dataset, "arch": arch, "width": width, "guide": guide,
                 "method": method, "pairs": len(rs),
                 "test_acc": float(np.mean([(r["acc_t0"] + r["acc_t1"]) / 2 for r in rs])),
                 "train_seconds": float(np.mean([r["train_seconds"] for r in rs])) / 2}
        for key in ("nll", "acc"):
            values = np.array([r[f"{key}_barrier"] for r in rs])
            entry[f"{key}_mean"] = float(values.mean())
            entry[f"{key}_spread"] = float(values.std(ddof=1)) if len(rs) > 1 else 0.0
            entry[f"{key}_mc_se"] = float(np.mean([r[f"{key}_se"] for r in rs]))
        for key in ("w2_cost", "mean_cost"):
            entry[key] = float(np.mean([r[key] for r in rs]))
        out.append(entry)
    return out


def _order(item):
    (dataset, arch, width, guide, method), _ = item
    return (dataset, arch, guide, width, METHODS_ALL.index(method))


METHODS_ALL = ["naive", "mean", "wasserstein", "activation"]
LABELS = {"naive": "naive", "mean": "mean", "wasserstein": "W2", "activation": "activation"}


def _by_cell(summary: list[dict]) -> dict[tuple, dict]:
    cells: dict[tuple, dict] = {}
    for s in summary:
        cells.setdefault((s["dataset"], s["arch"], s["width"], s["guide"]), {})[s["method"]] = s
    return cells


def _network(arch: str, width: int) -> str:
    return f"MLP {width}x2" if arch == "mlp" else f"ResNet-8 x{width}"


def markdown(summary: list[dict]) -> str:
    """Three tables: NLL barriers, accuracy drops, and the matching objectives."""
    cells = _by_cell(summary)
    methods = " | ".join(LABELS[m] for m in METHODS_ALL)
    lines = ["NLL barrier (nats): mean ± spread (standard deviation) over independent pairs; "
             "MC s.e.: the typical Monte-Carlo standard error of one aligned (W2) barrier.", "",
             f"| data | network | guide | test acc | {methods} | MC s.e. |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (dataset, arch, width, guide), by_method in cells.items():
        acc = np.mean([s["test_acc"] for s in by_method.values()])
        se = by_method.get("wasserstein", {}).get("nll_mc_se", float("nan"))
        lines.append(f"| {dataset} | {_network(arch, width)} | {guide} | {acc:.3f} | "
                     + _row(by_method, "nll", 3) + f" | {se:.3f} |")
    lines += ["", "Accuracy barrier (largest drop below the line between the endpoints): mean ± "
              "spread over pairs.", "",
              f"| data | network | guide | {methods} |", "|---|---|---|---|---|---|---|"]
    for (dataset, arch, width, guide), by_method in cells.items():
        lines.append(f"| {dataset} | {_network(arch, width)} | {guide} | "
                     + _row(by_method, "acc", 3) + " |")
    lines += ["", "Matching objectives at each method's permutations (mean over pairs): the "
              "W2 objective (coupled squared distance) and the squared distance of the means.",
              "", "| data | network | guide | W2 obj.: mean | W2 obj.: W2 | "
              "mean obj.: mean | mean obj.: W2 |", "|---|---|---|---|---|---|---|"]
    for (dataset, arch, width, guide), by_method in cells.items():
        if "mean" not in by_method or "wasserstein" not in by_method:
            continue
        m, w = by_method["mean"], by_method["wasserstein"]
        lines.append(f"| {dataset} | {_network(arch, width)} | {guide} | {m['w2_cost']:.1f} | "
                     f"{w['w2_cost']:.1f} | {m['mean_cost']:.1f} | {w['mean_cost']:.1f} |")
    return "\n".join(lines)


def _row(by_method: dict, key: str, digits: int) -> str:
    cells = []
    for m in METHODS_ALL:
        s = by_method.get(m)
        cells.append("" if s is None else
                     f"{s[key + '_mean']:.{digits}f} ± {s[key + '_spread']:.{digits}f}")
    return " | ".join(cells)


COLORS = {"naive": "tab:red", "mean": "tab:orange", "wasserstein": "tab:blue",
          "activation": "tab:green"}


def plot(summary: list[dict], path: Path, key: str = "nll") -> None:
    """Barriers against width: MLPs per (dataset, guide), ResNets per guide (2 x 3 panels).

    Error bars are the spread over pairs; the log axis is floored at 1e-3 (barriers are >= 0).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-3
    ylabel = "NLL barrier (nats)" if key == "nll" else "accuracy barrier"
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.6))
    panels = [("mnist1d", "mlp", "mean-field"), ("mnist1d", "mlp", "low-rank"),
              ("mnist1d", "resnet8", None), ("digits", "mlp", "mean-field"),
              ("digits", "mlp", "low-rank"), None]
    for ax, panel in zip(axes.flat, panels):
        if panel is None:
            ax.axis("off")
            continue
        dataset, arch, guide = panel
        for method, color in COLORS.items():
            for g, style in (("mean-field", "-"), ("low-rank", "--")):
                if guide is not None and g != guide:
                    continue
                pts = sorted((s["width"], s[f"{key}_mean"], s[f"{key}_spread"]) for s in summary
                             if (s["dataset"], s["arch"], s["guide"], s["method"]) ==
                             (dataset, arch, g, method))
                if not pts:
                    continue
                w, m, e = map(np.array, zip(*pts))
                lower = np.minimum(e, np.maximum(m, floor) - floor)  # keep bars on the axis
                ax.errorbar(w, np.maximum(m, floor), yerr=(lower, e), marker="o", ms=4,
                            capsize=2, color=color, linestyle=style,
                            label=f"{LABELS[method]} ({g})")
        ax.set_xscale("log", base=2)
        if arch == "resnet8":
            ax.set_xlim(0.8, 2.5)
            ax.set_xticks([1, 2], ["x1", "x2"])
        ax.set_yscale("log")
        ax.set_ylim(floor, 5)
        ax.set_xlabel("width multiplier" if arch == "resnet8" else "hidden width (2 layers)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{dataset}, {'ResNet-8 (1-D)' if arch == 'resnet8' else 'MLP'}"
                     + (f", {guide}" if guide else ", both guides"), fontsize=10)
        ax.grid(alpha=0.3, which="both")
    handles = [plt.Line2D([], [], color=c, marker="o", label=LABELS[m])
               for m, c in COLORS.items()]
    handles += [plt.Line2D([], [], color="gray", linestyle=style, label=g)
                for g, style in (("mean-field", "-"), ("low-rank", "--"))]
    axes[1][2].legend(handles=handles, loc="center", title="matching; guide")
    fig.suptitle(f"{ylabel} after alignment; error bars: spread over 3 pairs of seeds",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny smoke-test version")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--only", nargs="+", default=None, metavar="KEY",
                        help="run only cells whose key (e.g. mnist1d-mlp256-mean-field) "
                             "contains one of these strings; lets several processes share the "
                             "grid (each with OMP_NUM_THREADS=1 on its own core)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--cache", type=Path, default=None,
                        help="where trained guides are kept (default: OUT/study_cache)")
    args = parser.parse_args()
    stem = "study_barrier_quick" if args.quick else "study_barrier"
    csv_path = args.out / f"{stem}.csv"
    cache = args.cache or args.out / "study_cache"
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cells = [c for c in grid(args.quick)
             if args.only is None or any(k in c.key for k in args.only)]
    run(cells, args.pairs, csv_path, cache, args.quick, progress=not args.quiet)
    summary = summarise(load_rows(csv_path))
    table = markdown(summary)
    (args.out / f"{stem}.md").write_text(table + "\n")
    plot(summary, args.out / f"{stem}.png", "nll")
    plot(summary, args.out / f"{stem}_accuracy.png", "acc")
    print(table)
    print(f"\n{time.perf_counter() - started:.0f} s this run; wrote {csv_path}")


if __name__ == "__main__":
    main()
