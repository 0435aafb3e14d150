"""Does a change to ``match`` change the study's results? Re-match every cached study pair.

The reproduction study (``studies/barrier.toml``) evaluates barriers of guides aligned by
``match``; evaluating takes hours, matching two minutes. If a change to the solver leaves every
permutation of the study's 144 matches (mean and W2, three pairs per cell) as it was, the
study's aligned rows stand; otherwise those rows must be recomputed. Run it before and after
the change (each match on one thread, as in the study: the thread count changes float rounding):

    python benchmarks/check_study_matches.py --save before.pt
    # ... change the solver ...
    python benchmarks/check_study_matches.py --compare before.pt

It needs the trained guides in the step cache of the study's output folder (``--out``, the
folder given to ``bnn-align study studies/barrier.toml --out ...``) and reports the pairs whose
permutations or objective differ, and the total matching time.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bnn_align import match
from bnn_align.sweep import Cache, expand, load_study
from bnn_align.sweep.execute import load_trained, one_thread

STUDY = Path(__file__).resolve().parents[1] / "studies" / "barrier.toml"


def match_all(out: Path) -> dict[str, dict]:
    """match label -> permutations, final objective and seconds of every mean and W2 match."""
    cache = Cache(out / "cache")
    found = {}
    for step in expand(load_study(STUDY)):
        if step.kind != "match" or step.settings["method"] not in ("mean", "wasserstein"):
            continue
        missing = [s.label for s in step.inputs if not cache.valid(s)]
        if missing:
            raise FileNotFoundError(f"{cache.root} lacks {missing[0]}: run "
                                    f"bnn-align study {STUDY} --out {out} first")
        with one_thread():
            _, q0, _, _ = load_trained(step.inputs[0], cache)
            _, q1, _, _ = load_trained(step.inputs[1], cache)
            result = match(q0, q1, method=step.settings["method"], seed=step.settings["seed"])
        found[step.label] = {"perms": result.perms, "cost": result.cost_after,
                             "seconds": result.seconds}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--save", type=Path, help="write this run's matches here")
    parser.add_argument("--compare", type=Path, help="compare with matches saved earlier")
    parser.add_argument("--out", type=Path, default=Path("study-output"),
                        help="the study's output folder (study-output)")
    args = parser.parse_args()
    now = match_all(args.out)
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
