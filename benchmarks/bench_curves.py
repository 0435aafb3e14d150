"""Cost of one epoch of curve training against one epoch of ``fit`` on a single guide.

For each network (MNIST-1D: an MLP 40-512-512-10 and a 1-D ResNet-8 x1), with mean-field
guides, it times in the same process, interleaved round by round,

* ``fit(model, guide, data, epochs=1)``: one epoch of SVI on one ``AutoNormal`` (Pyro's
  ``Trace_ELBO``), and
* ``fit_curve(model, q0, q1, data, epochs=1)``: one epoch of training the bend of a Bezier
  curve between two ``AutoNormal`` guides (one ``t`` and one draw per minibatch),

both with their set-up (a guide's first call; the curve's views and bends), batch 128, on the
full 4000 training points. The goal is a ratio of at most 1.5. Each contender's time is the
best of ``--rounds`` rounds after a warm-up; the machine's load average is recorded before and
after, since other processes share its two cores. Results go to
``benchmarks/results/curves.json``. Run ``python benchmarks/bench_curves.py`` (a few minutes).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from _record import write_record
from bnn_align import BayesianNetwork, fit, fit_curve, guides, models
from bnn_align.data import mnist1d

RESULTS = Path(__file__).parent / "results" / "curves.json"

# name -> (network builder, channel axis)
CASES = {
    "mlp512_mean_field": (lambda: models.mlp(40, [512, 512], 10), False),
    "resnet8_mean_field": (lambda: models.resnet(8, width=1, dim=1, in_channels=1), True),
}


def setting(case):
    build, channels = CASES[case]
    data = mnist1d(channel_axis=channels)
    ends = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = BayesianNetwork(build(), input_shape=data.input_shape)
        ends.append(guides.mean_field(model))
    return model, ends, data.train


def one_fit(model, ends, train):
    guide = guides.mean_field(model)  # a fresh guide: fit trains in place
    started = time.perf_counter()
    fit(model, guide, train, epochs=1, progress=False)
    return time.perf_counter() - started


def one_curve(model, ends, train):
    started = time.perf_counter()
    fit_curve(model, *ends, train, epochs=1, progress=False)
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    header = f"{'case':<20} {'fit epoch s':>12} {'curve epoch s':>14} {'ratio':>7}  load before/after"
    print(header)
    print("-" * len(header))
    for case in args.cases:
        model, ends, train = setting(case)
        load_before = os.getloadavg()
        for fn in (one_fit, one_curve):  # warm-up
            fn(model, ends, train)
        fits, curves = [], []
        for _ in range(args.rounds):
            fits.append(one_fit(model, ends, train))
            curves.append(one_curve(model, ends, train))
        load_after = os.getloadavg()
        row = {"case": case, "num_train": len(train[0]), "batch_size": 128,
               "fit_seconds": min(fits), "curve_seconds": min(curves),
               "ratio": min(curves) / min(fits), "fit_rounds": fits, "curve_rounds": curves,
               "load_average_before": load_before, "load_average_after": load_after}
        rows.append(row)
        print(f"{case:<20} {row['fit_seconds']:>12.2f} {row['curve_seconds']:>14.2f} "
              f"{row['ratio']:>7.2f}  {load_before[0]:.1f} / {load_after[0]:.1f}", flush=True)
    write_record(args.out, "one epoch of fit_curve (Bezier, one bend, mean-field endpoints) "
                 "vs one epoch of fit on one mean-field guide, MNIST-1D, batch 128", rows)


if __name__ == "__main__":
    main()
