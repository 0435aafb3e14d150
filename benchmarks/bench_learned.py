"""Cost of the learned matchings (``"ste"``, ``"sinkhorn"``) per epoch, against the
``"wasserstein"`` match they start from and one epoch of ``fit``.

For each network (MNIST-1D: an MLP 40-512-512-10 and a 1-D ResNet-8 x1), with mean-field
guides, it times in one process:

* ``fit(model, guide, data, epochs=1)``: one epoch of SVI on one ``AutoNormal``, batch 128,
  for each of the two guides (which then take ``--fit-epochs`` epochs in all, so the pair is
  a little trained);
* ``match(q0, q1)``: the ``"wasserstein"`` match;
* ``match(q0, q1, method=m, data=train, epochs=E)`` (``E`` = ``--epochs``, batch 512, match's
  default; 64 draws for the validation barrier), and what it costs besides its epochs: the
  W2 match it starts from and one validation barrier (``marginal_loss`` on the held-out 800
  points, timed on its own), two when the learned permutations differ from the start's. Its
  time less those, divided by ``E``, is the seconds per epoch.

Each time is the best of ``--rounds`` rounds; the machine's load average is recorded before
and after, since other processes share its two cores. Results go to
``benchmarks/results/learned.json``. Run ``python benchmarks/bench_learned.py`` (about ten
minutes on an idle machine).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pyro
import torch

from _record import write_record
from bnn_align import BayesianNetwork, fit, guides, interpolate, marginal_loss, match, models
from bnn_align.data import mnist1d
from bnn_align.matching.learned import _split
from bnn_align.posterior import model_of

RESULTS = Path(__file__).parent / "results" / "learned.json"

# name -> (network builder, channel axis)
CASES = {
    "mlp512_mean_field": (lambda: models.mlp(40, [512, 512], 10), False),
    "resnet8_mean_field": (lambda: models.resnet(8, 1, dim=1, in_channels=1), True),
}
METHODS = ("ste", "sinkhorn")


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def trained_pair(case: str, fit_epochs: int):
    """Two guides trained ``fit_epochs`` epochs from seeds 0 and 1, and the seconds of every
    epoch of ``fit``."""
    build, channels = CASES[case]
    data = mnist1d(channel_axis=channels)
    pair, fit_seconds = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = BayesianNetwork(build(), input_shape=data.input_shape)
        guide = guides.mean_field(model)
        with pyro.get_param_store().scope():
            for epoch in range(fit_epochs):
                # one epoch per call: the learning rate decays within each, as in one-epoch runs
                fit_seconds.append(timed(lambda: fit(model, guide, data.train, epochs=1,
                                                     seed=seed * 100 + epoch,
                                                     progress=False)))
        pair.append(guide)
    return pair, data, fit_seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--fit-epochs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5, help="of the learned matchings")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    header = (f"{'case':<20} {'method':<9} {'fit epoch s':>11} {'W2 match s':>10} "
              f"{'barrier s':>9} {'match s':>8} {'epoch s':>8} {'epoch / fit':>11}  "
              f"load before/after")
    print(header)
    print("-" * len(header))
    for case in args.cases:
        load_before = os.getloadavg()
        (q0, q1), data, fit_seconds = trained_pair(case, args.fit_epochs)
        w2 = min(timed(lambda: match(q0, q1)) for _ in range(args.rounds))
        model = model_of(q0)
        _, validation = _split(model, q0, data.train, "ste", 0)
        aligned = match(q0, q1).aligned
        barrier = min(timed(lambda: marginal_loss(
            model, interpolate(q0, aligned), validation, ts=11, num_samples=64,
            metrics=["nll"])) for _ in range(args.rounds))
        for method in METHODS:
            results = []

            def call() -> float:
                return timed(lambda: results.append(match(
                    q0, q1, method=method, data=data.train, epochs=args.epochs,
                    num_samples=64)))

            total = min(call() for _ in range(args.rounds))
            result = results[-1]
            barriers = 1 + (result.validation_barrier != result.validation_barrier_start)
            rest = w2 + barriers * barrier
            per_epoch = (total - rest) / args.epochs
            load_after = os.getloadavg()
            row = {"case": case, "method": method, "epochs": args.epochs,
                   "fit_epoch_seconds": min(fit_seconds), "fit_epoch_seconds_all": fit_seconds,
                   "w2_match_seconds": w2, "validation_barrier_seconds": barrier,
                   "validation_barriers": barriers, "match_seconds": total,
                   "seconds_per_epoch": per_epoch,
                   "epoch_over_fit_epoch": per_epoch / min(fit_seconds),
                   "kept": result.kept, "load_before": load_before, "load_after": load_after}
            rows.append(row)
            print(f"{case:<20} {method:<9} {min(fit_seconds):>11.2f} {w2:>10.2f} "
                  f"{barrier:>9.2f} {total:>8.2f} {per_epoch:>8.2f} "
                  f"{row['epoch_over_fit_epoch']:>11.2f}  {load_before[0]:.1f}/{load_after[0]:.1f}")
    write_record(args.out, "learned matching: seconds per epoch against the W2 match and one "
                 "fit epoch", rows, rounds=args.rounds, fit_epochs=args.fit_epochs,
                 epochs=args.epochs, batch_size=512, validation_samples=64)


if __name__ == "__main__":
    main()
