"""Does a change to ``match`` change the study's results? Re-match every cached study pair.

The reproduction study (``study_barrier.py``) evaluates barriers of guides aligned by
``match``; evaluating takes hours, matching two minutes. If a change to the solver leaves every
permutation of the study's 144 matches (mean and W2, three pairs per cell) as it was, the
study's aligned rows stand; otherwise those rows must be recomputed. Run it before and after
the change, single-threaded (thread count changes float rounding):

    OMP_NUM_THREADS=1 python benchmarks/check_study_matches.py --save before.pt
    # ... change the solver ...
    OMP_NUM_THREADS=1 python benchmarks/check_study_matches.py --compare before.pt

It needs the trained guides in ``benchmarks/results/study_cache`` (made by the study) and
reports the pairs whose permutations or objective differ, and the total matching time.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyro
import torch

import study_barrier as study
from bnn_align import match

CACHE = Path(__file__).parent / "results" / "study_cache"


def match_all(cache: Path) -> dict[tuple, dict]:
    """(cell, pair, method) -> permutations, final objective and seconds of every study match."""
    out = {}
    for cell in study.grid(quick=False):
        split = study.load_data(cell)
        epochs = study.epochs_for(cell, quick=False)
        for pair in range(3):
            paths = [study.cache_path(cell, s, cache, epochs) for s in (2 * pair, 2 * pair + 1)]
            if not all(p.exists() for p in paths):
                raise FileNotFoundError(f"{paths[0].parent} lacks the guides of {cell.key}: "
                                        f"run study_barrier.py first")
            _, q0, _ = study.trained(cell, split, 2 * pair, cache, epochs, False)
            _, q1, _ = study.trained(cell, split, 2 * pair + 1, cache, epochs, False)
            for method in ("mean", "wasserstein"):
                result = match(q0, q1, method=method, seed=pair)
                out[cell.key, pair, method] = {"perms": result.perms,
                                               "cost": result.cost_after,
                                               "seconds": result.seconds}
            pyro.clear_param_store()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--save", type=Path, help="write this run's matches here")
    parser.add_argument("--compare", type=Path, help="compare with matches saved earlier")
    parser.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args()
    now = match_all(args.cache)
    print(f"{len(now)} matches, {sum(r['seconds'] for r in now.values()):.1f} s of matching")
    if args.save:
        torch.save(now, args.save)
    if args.compare:
        before = torch.load(args.compare, weights_only=False)
        moved = [k for k in now if any(not torch.equal(now[k]["perms"][g], p)
                                       for g, p in before[k]["perms"].items())]
        costs = [k for k in now if now[k]["cost"] != before[k]["cost"]]
        print(f"permutations differ in {len(moved)}, objective in {len(costs)} of {len(now)}")
        for k in moved:
            print(f"  {k}: objective {before[k]['cost']:.6g} -> {now[k]['cost']:.6g}")
        print(f"matching time {sum(r['seconds'] for r in before.values()):.1f} s -> "
              f"{sum(r['seconds'] for r in now.values()):.1f} s")


if __name__ == "__main__":
    main()
