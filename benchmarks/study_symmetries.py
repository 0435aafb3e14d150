"""Study (issue #27): does removing the scale symmetry lower the barrier further, and are flatter
endpoints better connected (Pittorino et al., ICML 2022)?

For MNIST-1D MLPs (40-w-w-10, ReLU) of each width, and for MAP point estimates (``AutoDelta``)
and mean-field posteriors (``AutoNormal``), several independently trained pairs are aligned with
permutations only and with permutations and scale (``match(..., symmetries=...)``); the NLL and
accuracy barriers of the model average are measured along the linear (Wasserstein) and the
geodesic path, next to the unaligned baseline. The local energy (training error under
multiplicative weight noise) is measured at both endpoints and at the midpoints of the aligned
paths, and for mean-field posteriors the mean standard deviation per layer.

Results go to a long-format CSV (one value per row: cell, quantity, alignment, path, sigma,
value, se). The study is resumable: cells (width, family, pair) already in the CSV are skipped,
and each finished cell is appended at once.

``--report`` prints the markdown tables of a results CSV (``study_symmetries.md``) and plots it
beside the CSV (``study_symmetries.png``, ``study_symmetries_energy.png``).

Usage (the full study trains 2 x 2 x 3 x 2 = 24 networks, an hour or more on 2 busy cores)::

    python benchmarks/study_symmetries.py                       # widths 128 512, 3 pairs
    python benchmarks/study_symmetries.py --widths 16 --pairs 1 --epochs 1 --samples 4 \\
        --out benchmarks/results/study_symmetries_smoke.csv     # a smoke test, seconds
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import bnn_align as ba
from bnn_align import data, guides, models

FIELDS = ["width", "family", "pair", "quantity", "alignment", "path", "point", "sigma", "value",
          "se"]
FAMILIES = {"map": lambda model: guides.delta(model),
            "mean_field": lambda model: guides.mean_field(model, init_scale=1e-3)}


def done_cells(out: Path) -> set[tuple[str, str, str]]:
    if not out.exists():
        return set()
    with out.open() as handle:
        return {(r["width"], r["family"], r["pair"]) for r in csv.DictReader(handle)}


def train(width: int, family: str, seed: int, split, epochs: int):
    torch.manual_seed(seed)
    model = ba.BayesianNetwork(models.mlp(40, [width, width], 10), prior=1.0,
                               input_shape=(40,))
    guide = FAMILIES[family](model)
    ba.fit(model, guide, split.train, epochs=epochs, seed=seed, progress=False)
    return model, guide


def run_cell(width: int, family: str, pair: int, split, args) -> list[dict]:
    key = {"width": width, "family": family, "pair": pair}
    rows: list[dict] = []

    def add(quantity, value, se=float("nan"), alignment="", path="", point="", sigma=""):
        rows.append({**key, "quantity": quantity, "alignment": alignment, "path": path,
                     "point": point, "sigma": sigma, "value": float(value), "se": float(se)})

    started = time.perf_counter()
    model, guide_a = train(width, family, 2 * pair, split, args.epochs)
    _, guide_b = train(width, family, 2 * pair + 1, split, args.epochs)
    add("train_seconds", time.perf_counter() - started)
    samples = 1 if family == "map" else args.samples
    perm_only = ba.match(guide_a, guide_b)
    both = ba.match(guide_a, guide_b, symmetries=("permutation", "scale"))
    pairs = {"none": (guide_a, guide_b), "permutation": (guide_a, perm_only.aligned),
             "permutation+scale": (both.canonical[0], both.aligned)}
    add("match_cost_after", perm_only.cost_after, alignment="permutation")
    add("match_cost_after", both.cost_after, alignment="permutation+scale")
    agree = sum(int((perm_only.perms[g] == both.perms[g]).sum()) for g in perm_only.perms)
    add("units_matched_alike", agree / sum(len(p) for p in perm_only.perms.values()))
    for alignment, (q0, q1) in pairs.items():
        for kind in ("wasserstein", "geodesic"):
            curve = ba.marginal_loss(model, ba.interpolate(q0, q1, kind=kind), split.test,
                                     ts=args.points, num_samples=samples, seed=pair)
            for metric in ("nll", "accuracy"):
                barrier = curve.barrier(metric)
                add(f"barrier_{metric}", barrier.value, barrier.se, alignment, kind)
    points = {"a": guide_a, "b": guide_b,
              "mid_permutation_linear": ba.interpolate(*pairs["permutation"]).at(0.5),
              "mid_scale_geodesic": ba.interpolate(*pairs["permutation+scale"],
                                                   kind="geodesic").at(0.5)}
    for name, q in points.items():
        energy = ba.local_energy(model, q, split.train, args.sigmas, num_draws=args.draws,
                                 seed=pair)
        for sigma, mean, se in zip(energy.sigmas, energy.mean, energy.se):
            add("local_energy", mean, se, point=name, sigma=sigma)
    if family == "mean_field":
        for name, q in (("a", guide_a), ("b", guide_b)):
            for site, std in ba.as_gaussian(q).stddev().items():
                add("mean_stddev", std.mean(), point=f"{name}:{site}")
    add("cell_seconds", time.perf_counter() - started)
    return rows


def report(path: Path) -> str:
    """Markdown tables of a results CSV: barriers per alignment and path, the local energy of
    endpoints and midpoints, and posterior width against flatness (mean over pairs)."""
    import pandas as pd

    frame = pd.read_csv(path)
    lines = ["NLL barrier (nats) and accuracy barrier, mean ± spread over pairs. Alignment "
             "`none`: the endpoints as trained; `permutation`: `match`; `permutation+scale`: "
             "`match(..., symmetries=(\"permutation\", \"scale\"))`.", "",
             "| width | family | alignment | NLL: linear | NLL: geodesic | acc.: linear "
             "| acc.: geodesic |", "|---|---|---|---|---|---|---|"]
    barriers = frame[frame.quantity.isin(["barrier_nll", "barrier_accuracy"])]
    stats = barriers.groupby(["width", "family", "alignment", "path", "quantity"]).value.agg(
        ["mean", "std"])
    for width, family, alignment in sorted({k[:3] for k in stats.index},
                                           key=lambda k: (k[0], k[1], ALIGNMENTS.index(k[2]))):
        cells = [stats.loc[(width, family, alignment, path, quantity)]
                 for quantity in ("barrier_nll", "barrier_accuracy")
                 for path in ("wasserstein", "geodesic")]
        lines.append(f"| {width} | {family} | {alignment} | "
                     + " | ".join(f"{c['mean']:.3f} ± {c['std']:.3f}" for c in cells) + " |")
    energy = frame[frame.quantity == "local_energy"].groupby(
        ["width", "family", "point", "sigma"]).value.mean().unstack("sigma")
    sigmas = list(energy.columns)
    lines += ["", "Local energy (training error under multiplicative weight noise of relative "
              "size sigma, at the means), mean over pairs.", "",
              "| width | family | point | " + " | ".join(f"σ={s:g}" for s in sigmas) + " |",
              "|---|---|---|" + "---|" * len(sigmas)]
    for (width, family, point), row in energy.iterrows():
        lines.append(f"| {width} | {family} | {point} | "
                     + " | ".join(f"{v:.3f}" for v in row) + " |")
    stddev = frame[frame.quantity == "mean_stddev"].groupby(["width", "family"]).value.mean()
    if len(stddev):
        lines += ["", "Posterior width (mean standard deviation over the layers of both "
                  "endpoints) against flatness (endpoints' local energy at σ=0.3) and the "
                  "aligned barrier (permutation, linear), mean over pairs.", "",
                  "| width | family | mean std | local energy σ=0.3 | NLL barrier |",
                  "|---|---|---|---|---|"]
        for (width, family), value in stddev.items():
            le = energy.loc[[(width, family, "a"), (width, family, "b")], 0.3].mean()
            nll = stats.loc[(width, family, "permutation", "wasserstein", "barrier_nll")]
            lines.append(f"| {width} | {family} | {value:.3f} | {le:.3f} | {nll['mean']:.3f} |")
    return "\n".join(lines)


ALIGNMENTS = ["none", "permutation", "permutation+scale"]


def plot(path: Path, out: Path) -> list[Path]:
    """``<stem>.png``: the NLL barrier per alignment and path (bars: mean, error bars: spread
    over pairs), one panel per width and family; ``<stem>_energy.png``: the local energy against
    sigma of the endpoints and the aligned midpoints."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    frame = pd.read_csv(path)
    cells = sorted({(int(w), f) for w, f in zip(frame.width, frame.family)})
    nll = frame[frame.quantity == "barrier_nll"].groupby(
        ["width", "family", "alignment", "path"]).value.agg(["mean", "std"])
    fig, axes = plt.subplots(1, len(cells), figsize=(3.6 * len(cells), 3.2), squeeze=False)
    for ax, (width, family) in zip(axes[0], cells):
        for i, path_kind in enumerate(("wasserstein", "geodesic")):
            rows = [nll.loc[(width, family, a, path_kind)] for a in ALIGNMENTS[1:]]
            xs = [j + 0.38 * i for j in range(len(rows))]
            ax.bar(xs, [r["mean"] for r in rows], 0.36, yerr=[r["std"] for r in rows],
                   capsize=2, label="linear" if path_kind == "wasserstein" else "geodesic")
        ax.set_xticks([j + 0.19 for j in range(2)], ["permutation", "perm. + scale"])
        ax.set_title(f"width {width}, {family.replace('_', '-')}", fontsize=10)
        ax.set_ylabel("NLL barrier (nats)")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Aligned barrier: permutations only or with the scale symmetry removed",
                 fontsize=11)
    fig.tight_layout()
    written = [out / f"{path.stem}.png", out / f"{path.stem}_energy.png"]
    fig.savefig(written[0], dpi=110)
    plt.close(fig)
    energy = frame[frame.quantity == "local_energy"].groupby(
        ["width", "family", "point", "sigma"]).value.mean()
    fig, axes = plt.subplots(1, len(cells), figsize=(3.6 * len(cells), 3.2), squeeze=False,
                             sharey=True)
    labels = {"a": "endpoint a", "b": "endpoint b",
              "mid_permutation_linear": "midpoint: permutation, linear",
              "mid_scale_geodesic": "midpoint: perm. + scale, geodesic"}
    for ax, (width, family) in zip(axes[0], cells):
        for point, label in labels.items():
            series = energy.loc[(width, family, point)]
            ax.plot(series.index, series.values, marker="o", ms=3, label=label)
        ax.set_title(f"width {width}, {family.replace('_', '-')}", fontsize=10)
        ax.set_xlabel("relative weight noise sigma")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training error (local energy)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(written[1], dpi=110)
    plt.close(fig)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--samples", type=int, default=64, help="posterior draws per t")
    parser.add_argument("--points", type=int, default=11, help="points along each path")
    parser.add_argument("--draws", type=int, default=32, help="noise draws of local_energy")
    parser.add_argument("--sigmas", type=float, nargs="+",
                        default=[0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0])
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "study_symmetries.csv")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--report", action="store_true",
                        help="print the markdown tables of --out and plot it, instead of "
                             "running")
    args = parser.parse_args()
    if args.report:
        print(report(args.out))
        for written in plot(args.out, args.out.parent):
            print("wrote", written)
        return
    split = data.mnist1d()
    done = done_cells(args.out)
    cells = [(w, f, p) for w in args.widths for f in args.families for p in range(args.pairs)
             if (str(w), f, str(p)) not in done]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for width, family, pair in tqdm(cells, desc="cells", disable=args.quiet):
        rows = run_cell(width, family, pair, split, args)
        new = not args.out.exists()
        with args.out.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)
        if not args.quiet:
            for r in rows:
                if r["quantity"].startswith("barrier_nll"):
                    print(f"w={width} {family} pair {pair} {r['alignment']:18s} {r['path']:12s} "
                          f"NLL barrier {r['value']:.4f} +- {r['se']:.4f}")
    print("results in", args.out)


if __name__ == "__main__":
    main()
