"""Throughput of ``bnn_align.marginal_loss`` against the way a user would do it today.

For a path of mean-field posteriors on MNIST-1D it times, in the same process,

* ``marginal_loss`` (all weight samples of a ``t`` drawn at once, the network evaluated for all
  of them in batched ``vmap`` calls, metrics with bootstrap standard errors),
* the baseline: at every ``t`` build the guide ``path.at(t)``, run ``pyro.infer.Predictive``
  (``num_samples`` forward passes of model and guide) and compute the same metrics from the
  returned logits,
* the compute floor: only the batched forward pass of the network with the same weights.

Throughput is posterior samples x test points x path points per second. Results go to
``benchmarks/results/marginal.json``. Run ``python benchmarks/bench_marginal.py`` (about two
minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.infer import Predictive

from _record import write_record
from bnn_align import BayesianNetwork, guides, interpolate, marginal_loss, models
from bnn_align.data import mnist1d
from bnn_align.marginal import _bootstrap_weights, _classification_metrics, _Evaluator

RESULTS = Path(__file__).parent / "results" / "marginal.json"

# name -> (network builder, channel axis, test points, samples, points on the path)
CASES = {
    "mlp64": (lambda: models.mlp(40, [64, 64], 10), False, 1000, 64, 11),
    "mlp512": (lambda: models.mlp(40, [512, 512], 10), False, 1000, 64, 11),
    "resnet20_1d": (lambda: models.resnet(20, width=1, dim=1, in_channels=1), True, 250, 32, 5),
}


def make_path(case):
    build, channels, points, samples, num_ts = CASES[case]
    data = mnist1d(channel_axis=channels).subset(num_test=points)
    posteriors = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = BayesianNetwork(build(), input_shape=data.input_shape)
        posteriors.append((model, guides.mean_field(model, init_scale=0.05)))
    (model, q0), (_, q1) = posteriors
    return model, interpolate(q0, q1), data.test, samples, np.linspace(0, 1, num_ts)


def ours(model, path, test, samples, ts):
    return marginal_loss(model, path, test, ts=ts, num_samples=samples)


def predictive_baseline(model, path, test, samples, ts):
    x, y = test
    weights = _bootstrap_weights(samples, 200, torch.Generator().manual_seed(0))
    values = []
    for t in ts:
        guide = path.at(float(t))
        # a private param store: several AutoNormals in one process would otherwise collide
        with pyro.get_param_store().scope(), torch.no_grad():
            logits = Predictive(model, guide=guide, num_samples=samples,
                                return_sites=["_RETURN"])(x)["_RETURN"]
        values.append(_classification_metrics(logits, y, weights, ("nll", "gibbs", "accuracy",
                                                                    "ece", "brier")))
    return values


def bare_forward(model, path, test, samples, ts):
    x, _ = test
    evaluator = _Evaluator(model, samples, 1024)
    noise = path.noise(samples, torch.Generator().manual_seed(0))
    for t in ts:
        evaluator.outputs(path.draw(float(t), noise), x, None)


def timed(fn, *args, repeats=2):
    """Best of ``repeats`` runs after a warm-up (the same for every contender)."""
    fn(*args)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    header = (f"{'case':<12} {'S x N x T':>14} {'ours s':>8} {'Predictive s':>13} "
              f"{'bare s':>8} {'speed-up':>9} {'ours/bare':>10} {'S*N*T per s':>17}")
    print(header)
    print("-" * len(header))
    for case in args.cases:
        model, path, test, samples, ts = make_path(case)
        work = samples * len(test[0]) * len(ts)
        t_ours = timed(ours, model, path, test, samples, ts)
        t_pred = timed(predictive_baseline, model, path, test, samples, ts)
        t_bare = timed(bare_forward, model, path, test, samples, ts)
        row = {"case": case, "num_samples": samples, "num_points": len(test[0]),
               "num_ts": len(ts), "ours_seconds": t_ours, "predictive_seconds": t_pred,
               "bare_forward_seconds": t_bare, "speedup_vs_predictive": t_pred / t_ours,
               "ratio_to_bare_forward": t_ours / t_bare,
               "ours_throughput": work / t_ours, "predictive_throughput": work / t_pred,
               "bare_throughput": work / t_bare}
        rows.append(row)
        print(f"{case:<12} {f'{samples}x{len(test[0])}x{len(ts)}':>14} {t_ours:>8.2f} "
              f"{t_pred:>13.2f} {t_bare:>8.2f} {row['speedup_vs_predictive']:>9.1f} "
              f"{row['ratio_to_bare_forward']:>10.2f} {row['ours_throughput']:>17.3g}",
              flush=True)
    write_record(args.out, "marginal_loss vs pyro.infer.Predictive + the same metrics, and "
                 "the bare batched forward pass (compute floor)", rows)

if __name__ == "__main__":
    main()
