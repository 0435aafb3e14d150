"""Cost of ``match_many`` per round against pairwise ``match`` calls to the first posterior.

For K = 8 mean-field posteriors over an MLP 40-512-512-10 (MNIST-1D's shape), in one process:

* ``random``: eight independent ``AutoNormal`` guides (He-normal means, scales 1e-3 to 1e-1),
  the situation of independently trained posteriors (many rounds);
* ``planted``: one such guide under eight random relabellings, means perturbed by 1e-3
  (every posterior aligned exactly; the rounds after the first confirm it).

It times ``match_many(posteriors)`` (its seconds divided by its rounds is the time per round)
and the baseline, seven ``match(posteriors[0], posteriors[k])`` calls, and reports the ratio
per round (goal: at most 2) and the objectives. Each time is the best of ``--repeats``; the
load average is recorded, since other processes share the two cores. Results go to
``benchmarks/results/many.json``. Run ``python benchmarks/bench_many.py`` (about a minute).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pyro
import torch

from _record import write_record
from bnn_align import BayesianNetwork, guides, match, match_many, models, permute
from bnn_align.posterior import as_gaussian, from_gaussian
from bnn_align.symmetry.permutation import random_perms

RESULTS = Path(__file__).parent / "results" / "many.json"
K = 8


def random_guide(seed: int):
    torch.manual_seed(seed)
    pyro.clear_param_store()
    model = BayesianNetwork(models.mlp(40, [512, 512], 10), input_shape=(40,))
    guide = guides.mean_field(model, init_scale=1e-3)
    view = as_gaussian(guide)
    gen = torch.Generator().manual_seed(seed + 1000)
    scales = {s: torch.exp(torch.empty(v.shape).uniform_(-6.9, -2.3, generator=gen))
              for s, v in view.scale.items()}
    return from_gaussian(guide, view.map(lambda part, s, t: scales[s] if part == "scale" else t))


def posteriors(kind: str) -> list:
    if kind == "random":
        return [random_guide(k) for k in range(K)]
    base = random_guide(0)
    spec = BayesianNetwork(models.mlp(40, [512, 512], 10), input_shape=(40,)).spec
    sizes = {"P_0": 512, "P_2": 512}
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(K):
        moved = permute(base, random_perms(sizes, gen), spec)
        view = as_gaussian(moved)
        noisy = view.map(lambda part, s, t: t + 1e-3 * torch.randn(t.shape, generator=gen)
                         if part == "loc" else t)
        out.append(from_gaussian(moved, noisy))
    return out


def best_of(repeats: int, fn):
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-iter", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    rows = []
    print(f"{'posteriors':<10}{'pairwise s':>12}{'many s':>9}{'rounds':>8}{'s/round':>9}"
          f"{'ratio/round':>13}{'obj pairwise':>15}{'obj many':>12}")
    for kind in ("random", "planted"):
        qs = posteriors(kind)
        pairwise_s, results = best_of(args.repeats,
                                      lambda: [match(qs[0], q) for q in qs[1:]])
        many_s, many = best_of(args.repeats, lambda: match_many(qs, max_iter=args.max_iter))
        baseline = match_many(qs, reference=0)  # the pairwise objective, to the barycenter
        per_round = many_s / many.rounds
        row = {"posteriors": kind, "K": K, "network": "MLP 40-512-512-10 mean-field",
               "pairwise_seconds": pairwise_s, "many_seconds": many_s, "rounds": many.rounds,
               "converged": many.converged, "seconds_per_round": per_round,
               "ratio_per_round": per_round / pairwise_s,
               "objective_pairwise_to_barycenter": baseline.history[-1],
               "objective_many": many.history[-1], "history": many.history,
               "pairwise_cost_after": [r.cost_after for r in results]}
        rows.append(row)
        print(f"{kind:<10}{pairwise_s:>12.2f}{many_s:>9.2f}{many.rounds:>8}{per_round:>9.2f}"
              f"{row['ratio_per_round']:>13.2f}{baseline.history[-1]:>15.5g}"
              f"{many.history[-1]:>12.5g}")
    write_record(args.out, "match_many vs pairwise match, K=8 mean-field MLP 2x512", rows,
                 load_average=[load_before, os.getloadavg()[0]])


if __name__ == "__main__":
    main()
