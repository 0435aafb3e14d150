"""Study: marginalized barriers between Bayesian transformers on MNIST-1D, naive, aligned with
the head step, and aligned within heads only (heads kept in place).

For each pair ``p`` two mean-field posteriors of ``models.transformer(40, 10, dim, heads,
layers)`` are trained from seeds ``2p`` and ``2p + 1`` with the design notes' recipe (Normal(0, 1)
prior, full ELBO, initial scales 1e-3, Adam lr 1e-2 decayed to 1e-3, batch 128), then three
paths are evaluated along the W2 geodesic (``points`` points, ``samples`` draws with common
random numbers, on the test set):

* ``naive``: guide_b as trained;
* ``wasserstein``: ``match(a, b)``, heads moved by the hierarchical head step;
* ``wasserstein-within-heads``: ``match(a, b, move_heads=False)``, heads kept in place.

One row per pair and method goes to ``--out`` (CSV; default
``benchmarks/results/study_transformer.csv``): the NLL and accuracy barriers with their
standard errors, the endpoints' NLL, the W2^2 before and after matching and the seconds of the
match. Trained guides are cached in ``--cache`` so a rerun only evaluates.

Run ``python studies/transformer.py`` (3 pairs, 60 epochs each: about an hour on 2 cores;
``--epochs 10 --pairs 1`` for a quick look).
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import pyro
import torch
from tqdm.auto import tqdm

import bnn_align as ba
from bnn_align import data, guides, models

ROOT = Path(__file__).resolve().parents[1]


def trained(seed: int, args, split) -> tuple[ba.BayesianNetwork, object]:
    path = Path(args.cache) / (f"transformer-d{args.dim}h{args.heads}l{args.layers}"
                               f"-e{args.epochs}-s{seed}.pt")
    torch.manual_seed(seed)
    model = ba.BayesianNetwork(models.transformer(40, 10, dim=args.dim, heads=args.heads,
                                                  layers=args.layers), input_shape=(40,))
    with pyro.get_param_store().scope():
        guide = guides.mean_field(model)
        if path.exists():
            guide.load_state_dict(torch.load(path))
        else:
            ba.fit(model, guide, split.train, epochs=args.epochs, seed=seed,
                   progress=not args.quiet)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(guide.state_dict(), path)
    return model, guide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--points", type=int, default=11)
    parser.add_argument("--cache", default=str(ROOT / "studies" / "cache"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                             "study_transformer.csv"))
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    split = data.mnist1d()
    rows = []
    for pair in tqdm(range(args.pairs), desc="pairs", disable=args.quiet):
        model, guide_a = trained(2 * pair, args, split)
        _, guide_b = trained(2 * pair + 1, args, split)
        candidates = {"naive": (guide_b, None)}
        for method, move in (("wasserstein", True), ("wasserstein-within-heads", False)):
            started = time.perf_counter()
            result = ba.match(guide_a, guide_b, move_heads=move)
            candidates[method] = (result.aligned, (result, time.perf_counter() - started))
        for method, (other, info) in candidates.items():
            curve = ba.marginal_loss(model, ba.interpolate(guide_a, other), split.test,
                                     num_samples=args.samples, ts=args.points)
            nll, acc = curve.barrier("nll"), curve.barrier("accuracy")
            rows.append({
                "pair": pair, "method": method, "dim": args.dim, "heads": args.heads,
                "layers": args.layers, "epochs": args.epochs, "samples": args.samples,
                "nll_barrier": nll.value, "nll_barrier_se": nll.se,
                "accuracy_barrier": acc.value, "accuracy_barrier_se": acc.se,
                "nll_start": float(curve.values["nll"][0]),
                "nll_end": float(curve.values["nll"][-1]),
                "w2_before": info[0].cost_before if info else None,
                "w2_after": info[0].cost_after if info else None,
                "match_seconds": info[1] if info else None,
            })
            print(rows[-1], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("wrote", out)


if __name__ == "__main__":
    main()
