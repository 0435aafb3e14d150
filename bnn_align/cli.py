"""The ``bnn-align`` command line: ``bnn-align demo`` (also ``python -m bnn_align demo``).

The demo is the library's main job end to end: train two mean-field (or low-rank) Bayesian MLPs
from different seeds, align the second to the first with :func:`bnn_align.match`, and compare the
marginalized loss barrier along the naive path and the aligned path.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from . import data as datasets
from . import guides
from .bayesian import BayesianNetwork, fit
from .marginal import LossCurve, marginal_loss
from .matching.weights import match
from .models import mlp
from .paths.interpolation import interpolate

__all__ = ["main", "demo"]


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    # argparse prints help text as it is: plain words here, not the module's reST markup
    parser = argparse.ArgumentParser(
        prog="bnn-align",
        description="Align Bayesian neural network posteriors over permutation symmetries and "
                    "measure marginalized loss barriers.",
        epilog="Run 'bnn-align COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"bnn-align {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser(
        "demo", help="train two BNNs, align them and compare their loss barriers",
        description="Train two Bayesian MLPs from different seeds, align them with "
                    "bnn_align.match and measure the marginalized loss barrier along the naive "
                    "and the aligned path.")
    demo_parser.add_argument("--dataset", choices=["mnist1d", "digits"], default="mnist1d")
    demo_parser.add_argument("--width", type=int, default=512, help="hidden width (512)")
    demo_parser.add_argument("--depth", type=int, default=2, help="hidden layers (2)")
    demo_parser.add_argument("--epochs", type=int, default=None,
                             help="training epochs (60 on mnist1d, 200 on digits)")
    demo_parser.add_argument("--guide", choices=["mean-field", "low-rank"], default="mean-field")
    demo_parser.add_argument("--rank", type=int, default=10, help="rank of low-rank guides")
    demo_parser.add_argument("--samples", type=int, default=64,
                             help="posterior samples per point of the path (64)")
    demo_parser.add_argument("--points", type=int, default=11, help="points along the path")
    demo_parser.add_argument("--seed", type=int, default=0,
                             help="seed of the first network; the second uses seed + 1")
    demo_parser.add_argument("--out", type=Path, default=Path("demo-output"),
                             help="folder for the plot and the JSON record")
    demo_parser.add_argument("--quiet", action="store_true", help="no progress bars or table")

    study_parser = commands.add_parser(
        "study", help="run a study declared in a TOML file (resumable; local or on Ray)",
        description="Expand a study (TOML) into train -> match -> evaluate steps and run those "
                    "not in the cache as Ray tasks, one core each (a local Ray on this "
                    "machine's cores unless --address is given); rows stream into "
                    "OUT/<name>.csv and .parquet. See bnn_align.sweep.")
    study_parser.add_argument("config", type=Path, help="the study file, e.g. studies/barrier.toml")
    study_parser.add_argument("--address", default=None,
                              help="Ray cluster to use: 'auto' or ray://host:port")
    study_parser.add_argument("--out", type=Path, default=Path("study-output"),
                              help="folder of the results table and the step cache "
                                   "(study-output)")
    study_parser.add_argument("--only", action="append", default=[], metavar="FILTER",
                              help="run only matching rows, e.g. 'width<=256' or "
                                   "'digits-mlp64-*,pair=0' (conditions FIELD OP VALUE or a "
                                   "cell-key glob, comma = and; repeat the flag for or)")
    study_parser.add_argument("--dry-run", action="store_true",
                              help="list the steps and which are cached; run nothing")
    study_parser.add_argument("--serial", action="store_true",
                              help="run the steps in this process, one at a time, without Ray")
    study_parser.add_argument("--quiet", action="store_true", help="no progress bar")

    report_parser = commands.add_parser(
        "report", help="markdown tables and plots of a study's results table",
        description="Summarise a results table (CSV or Parquet) over seed pairs: write "
                    "<stem>.md and the barrier plots.")
    report_parser.add_argument("results", type=Path, help="the results table")
    report_parser.add_argument("--out", type=Path, default=None,
                               help="folder to write to (default: the table's folder)")
    report_parser.add_argument("--compare", type=Path, default=None, metavar="REFERENCE",
                               help="also compare every row with the same row of REFERENCE "
                                    "(exit 1 if any differs beyond float rounding)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bnn-align`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        for label in ("width", "depth", "rank", "samples"):
            if getattr(args, label) < 1:
                raise SystemExit(f"bnn-align demo: --{label} must be at least 1")
        if args.points < 2:
            raise SystemExit("bnn-align demo: --points must be at least 2")
        if args.epochs is not None and args.epochs < 1:
            raise SystemExit("bnn-align demo: --epochs must be at least 1")
        if args.out.exists() and not args.out.is_dir():
            raise SystemExit(f"bnn-align demo: --out {args.out} exists and is not a folder")
        demo(dataset=args.dataset, width=args.width, depth=args.depth, epochs=args.epochs,
             guide=args.guide, rank=args.rank, samples=args.samples, points=args.points,
             seed=args.seed, out=args.out, quiet=args.quiet)
    elif args.command == "study":
        return _study(args)
    elif args.command == "report":
        return _report(args)
    return 0


def _study(args: argparse.Namespace) -> int:
    from . import sweep

    if args.serial and args.address is not None:
        raise SystemExit("bnn-align study: --serial runs without Ray; drop --address")
    try:
        study = sweep.load_study(args.config)
        only = [sweep.parse_filter(text) for text in args.only]
    except (OSError, ValueError) as error:
        raise SystemExit(f"bnn-align study: {error}")
    try:
        summary = sweep.run(study, args.out, only=only, address=args.address,
                            serial=args.serial, dry_run=args.dry_run, progress=not args.quiet)
    except KeyboardInterrupt:
        print("bnn-align study: interrupted; run the same command again to resume",
              file=sys.stderr)
        return 130
    except (ImportError, ValueError) as error:  # a filter matching nothing, a foreign table
        raise SystemExit(f"bnn-align study: {error}")
    if not args.dry_run:
        print(summary)
    return 1 if summary.failed else 0


def _report(args: argparse.Namespace) -> int:
    from . import sweep

    try:
        written = sweep.write_report(args.results, args.out)
        differ = 0
        if args.compare is not None:
            rows = sweep.compare_results(args.results, args.compare)
            differ = int((~rows["agrees"]).sum())
            print(f"{len(rows)} rows compared with {args.compare}: {len(rows) - differ} agree "
                  f"(largest relative difference {rows['max_rel_diff'].max():.3g}), "
                  f"{differ} differ or are missing there")
            for r in rows[~rows["agrees"]].to_dict("records"):
                print("  " + " ".join(str(r[k]) for k in sweep.steps.ROW_KEY)
                      + f": {r['worst_column']} rel. diff {r['max_rel_diff']:.3g}")
    except (OSError, ValueError) as error:
        raise SystemExit(f"bnn-align report: {error}")
    print("wrote " + ", ".join(str(p) for p in written))
    return 1 if differ else 0


def demo(*, dataset: str = "mnist1d", width: int = 512, depth: int = 2,
         epochs: int | None = None, guide: str = "mean-field", rank: int = 10,
         samples: int = 64, points: int = 11, seed: int = 0, out: Path = Path("demo-output"),
         quiet: bool = False) -> dict:
    """Run the demo and return its JSON record (also written to ``out/demo.json``)."""
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    started = time.perf_counter()
    split = datasets.mnist1d() if dataset == "mnist1d" else datasets.digits()
    epochs = epochs if epochs is not None else (60 if dataset == "mnist1d" else 200)
    in_features = split.input_shape[0]
    say(f"bnn-align demo: {dataset} ({len(split.x_train)} train / {len(split.x_test)} test), "
        f"MLP {in_features}-{'-'.join([str(width)] * depth)}-{split.num_classes}, {guide} "
        f"guides, {epochs} epochs")

    trained, train_seconds = [], []
    for k in range(2):
        torch.manual_seed(seed + k)  # different initial networks
        model = BayesianNetwork(mlp(in_features, [width] * depth, split.num_classes),
                                input_shape=split.input_shape)
        q = guides.mean_field(model) if guide == "mean-field" else guides.low_rank(model, rank)
        t0 = time.perf_counter()
        fit(model, q, split.train, epochs=epochs, seed=seed + k, progress=not quiet)
        train_seconds.append(time.perf_counter() - t0)
        say(f"  trained posterior {k + 1} in {train_seconds[-1]:.1f} s")
        trained.append((model, q))
    (model, q0), (_, q1) = trained

    alignment = match(q0, q1, seed=seed, progress=not quiet)
    say(f"  matched in {alignment.seconds:.2f} s ({alignment.iterations} sweeps): W2^2 "
        f"{alignment.cost_before:.4g} -> {alignment.cost_after:.4g}")
    curves: dict[str, LossCurve] = {}
    for name, other in (("naive", q1), ("aligned", alignment.aligned)):
        curves[name] = marginal_loss(model, interpolate(q0, other), split.test, ts=points,
                                     num_samples=samples, seed=seed, progress=not quiet)
    record = _record(curves, alignment, dict(
        dataset=dataset, width=width, depth=depth, epochs=epochs, guide=guide, rank=rank,
        samples=samples, points=points, seed=seed), train_seconds)
    record["seconds_total"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(record, indent=2))
    _plot(curves, out / "demo.png")
    say(_table(record))
    say(f"  wrote {out / 'demo.json'} and {out / 'demo.png'} "
        f"({record['seconds_total']:.0f} s in all)")
    return record


def _record(curves: dict[str, LossCurve], alignment, config: dict,
            train_seconds: list[float]) -> dict:
    naive = curves["naive"]
    return {
        "config": config,
        "train_seconds": train_seconds,
        "match": {"seconds": alignment.seconds, "iterations": alignment.iterations,
                  "cost_before": alignment.cost_before, "cost_after": alignment.cost_after},
        "endpoints": {
            "posterior_1": {m: float(naive.values[m][0]) for m in ("accuracy", "nll")},
            "posterior_2": {m: float(naive.values[m][-1]) for m in ("accuracy", "nll")},
        },
        "barriers": {name: {m: vars(c.barrier(m)) for m in ("nll", "accuracy")}
                     for name, c in curves.items()},
        "curves": {name: c.to_dict() for name, c in curves.items()},
    }


def _table(record: dict) -> str:
    e, b = record["endpoints"], record["barriers"]
    lines = [
        "",
        f"{'':<22}{'accuracy':>12}{'NLL':>12}",
        f"{'posterior 1':<22}{e['posterior_1']['accuracy']:>12.4f}{e['posterior_1']['nll']:>12.4f}",
        f"{'posterior 2':<22}{e['posterior_2']['accuracy']:>12.4f}{e['posterior_2']['nll']:>12.4f}",
        "",
        f"{'barrier (+- s.e.)':<22}{'NLL':>20}{'accuracy drop':>22}",
    ]
    for name in ("naive", "aligned"):
        nll, acc = b[name]["nll"], b[name]["accuracy"]
        lines.append(f"{name:<22}{nll['value']:>11.4f} +- {nll['se']:<6.4f}"
                     f"{acc['value']:>13.4f} +- {acc['se']:<6.4f}")
    m = record["match"]
    lines.append(f"\nmatch: {m['seconds']:.2f} s, {m['iterations']} sweeps; training: "
                 + ", ".join(f"{s:.1f} s" for s in record["train_seconds"]))
    return "\n".join(lines)


def _plot(curves: dict[str, LossCurve], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for (name, curve), color in zip(curves.items(), ("tab:red", "tab:blue")):
        curve.plot(["nll", "accuracy"], ax=axes, label=name, color=color)
    axes[0].set_title("predictive NLL of the model average")
    axes[1].set_title("accuracy of the model average")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
