"""How strong must the fixed entries be? The naive barrier of W-asymmetric posteriors against
the scale of their fixed entries (an ablation beside ``studies/asymmetric.toml``, issue #26).

The builders fix entries at Lim et al.'s scales: 1, and 1/4 in the output layer (an eighth of
each hidden row, half of each output row). Here every fixed value of the study's W-asymmetric
MLP is multiplied by ``scale``, so the hidden layers' fixed entries have scale ``scale`` and the
output layer's ``scale / 4``; ``scale = 1`` is the study's network and reproduces its rows, and
at width 128 ``scale = 0.25`` is close to the milder entries of this library's first default
(``1 / sqrt(num_fixed)``: 0.25 in the hidden layers, 0.45 in the first). Training, seeds and the
evaluation are the study's (mean-field, the study recipe, 64 draws at 11 points of the
Wasserstein path on the test set). ``--variant sigma`` does the same for the sigma-asymmetric
MLP: FiGLU's ``C`` (default entries of scale ``1 / sqrt(dim)``) multiplied by ``scale``. Rows
are appended to the results table as pairs finish; a rerun skips the pairs already there.

    python benchmarks/study_asymmetric_scale.py [--dataset digits] [--variant w|sigma]
        [--scales 0.25 1 4] [--report]
        [--pairs 3] [--out benchmarks/results/study_asymmetric_scale.csv]
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from bnn_align import BayesianNetwork, fit, guides, interpolate, marginal_loss
from bnn_align.data import digits, mnist1d
from bnn_align.models import AsymLinear, FiGLU, mlp

RECIPE = {"batch_size": 128, "lr": 1e-2, "lr_end": 1e-3}  # studies/asymmetric.toml
EPOCHS = {"digits": 200, "mnist1d": 60}
FIELDS = ["dataset", "width", "variant", "scale", "pair", "nll_barrier", "nll_se", "acc_barrier",
          "acc_se", "acc_t0", "acc_t1", "train_seconds"]


def posterior(split, width: int, variant: str, scale: float, seed: int, epochs: int):
    """A mean-field posterior over the study's W- or sigma-asymmetric MLP (asymmetry seed 0),
    its fixed values (or FiGLU's ``C``) multiplied by ``scale``, trained with the study's recipe
    from ``seed``."""
    torch.manual_seed(seed)
    net = mlp(split.input_shape[0], [width, width], split.num_classes, asymmetry=variant)
    for layer in net.modules():
        if isinstance(layer, AsymLinear):
            layer.fixed_values.mul_(scale)
        elif isinstance(layer, FiGLU):
            layer.C.mul_(scale)
    model = BayesianNetwork(net, input_shape=split.input_shape)
    guide = guides.mean_field(model, 1e-3)
    started = time.perf_counter()
    fit(model, guide, split.train, epochs=epochs, seed=seed, progress=False, **RECIPE)
    return model, guide, time.perf_counter() - started


def report(results: Path) -> Path:
    """``<stem>.md`` beside the results: per dataset, variant and scale the NLL barrier (mean ±
    spread over pairs) and the endpoints' mean test accuracy."""
    import pandas as pd

    frame = pd.read_csv(results)
    frame["test_acc"] = (frame["acc_t0"] + frame["acc_t1"]) / 2
    lines = ["| data | width | variant | scale | pairs | NLL barrier | test acc |",
             "|---|---|---|---|---|---|---|"]
    names = {"w": "W-asym. (fixed entries)", "sigma": "sigma-asym. (FiGLU's C)"}
    for (dataset, width, variant, scale), rows in frame.groupby(
            ["dataset", "width", "variant", "scale"]):
        barrier = rows["nll_barrier"]
        lines.append(f"| {dataset} | {width} | {names[variant]} | {scale:g} | {len(rows)} | "
                     f"{barrier.mean():.3f} ± {barrier.std(ddof=1):.3f} | "
                     f"{rows['test_acc'].mean():.3f} |")
    path = results.with_suffix(".md")
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(EPOCHS), default="digits")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--variant", choices=["w", "sigma"], default="w")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--report", action="store_true",
                        help="only write the results' markdown table")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "study_asymmetric_scale.csv")
    args = parser.parse_args()
    if args.report:
        print("wrote", report(args.out))
        return
    torch.set_num_threads(1)  # as the study's Ray tasks: the same numbers
    split = digits() if args.dataset == "digits" else mnist1d()
    done = set()
    if args.out.exists():
        done = {(r["dataset"], int(r["width"]), r["variant"], float(r["scale"]), int(r["pair"]))
                for r in csv.DictReader(args.out.open())}
    for scale in args.scales:
        for pair in range(args.pairs):
            if (args.dataset, args.width, args.variant, scale, pair) in done:
                continue
            trained = [posterior(split, args.width, args.variant, scale, seed, EPOCHS[args.dataset])
                       for seed in (2 * pair, 2 * pair + 1)]
            (model, q0, s0), (_, q1, s1) = trained
            curve = marginal_loss(model, interpolate(q0, q1, "wasserstein"), split.test,
                                  ts=11, num_samples=64, seed=pair, metrics=["nll", "accuracy"])
            nll, acc = curve.barrier("nll"), curve.barrier("accuracy")
            row = {"dataset": args.dataset, "width": args.width, "variant": args.variant,
                   "scale": scale, "pair": pair, "nll_barrier": nll.value, "nll_se": nll.se,
                   "acc_barrier": acc.value, "acc_se": acc.se,
                   "acc_t0": float(curve.values["accuracy"][0]),
                   "acc_t1": float(curve.values["accuracy"][-1]),
                   "train_seconds": (s0 + s1) / 2}
            new = not args.out.exists()
            with args.out.open("a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=FIELDS)
                if new:
                    writer.writeheader()
                writer.writerow(row)
            print(f"{args.variant} scale {scale:g} pair {pair}: NLL barrier {nll.value:.3f} "
                  f"± {nll.se:.3f}, accuracy {row['acc_t0']:.3f} / {row['acc_t1']:.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
