"""The many-posteriors study (issue #28): resumable, writing result CSVs.

Two parts, each resumable (every trained chain, network or guide is cached under
``--cache``, default ``benchmarks/.cache/study_many``; a rerun trains only what is missing):

* ``hmc``: multi-chain NUTS on a digits MLP 64-W-10 (W = 16, 32), 4 chains, each from its own
  seed. For each width: the fraction of weights with R-hat > 1.01 across the chains before and
  after per-sample alignment (``align_samples`` to the barycenter of the chains), and the
  predictive NLL and accuracy of the pooled chains before and after (alignment must not change
  them). Rows go to ``study_many_hmc.csv``.
* ``ensembles``: 8 deterministic MLPs 40-512-512-10 (Adam) and 8 mean-field posteriors (the
  recipe of DESIGN-NOTES: Normal(0, 1) prior, AutoNormal init scale 1e-3, ClippedAdam 1e-2 ->
  1e-3, batch 128) on MNIST-1D, from seeds 0..7. For K = 2, 4, 8 (the first K): the merged
  posterior (``merge(match_many(...))``; for the point estimates also with ``repair``) against
  the ensemble (the mixture of the K members' predictives) and the members' mean, in test NLL
  and accuracy; and the cycle-consistency error of pairwise ``match`` (the fraction of units
  displaced, in transpositions, between ``P(j,k) o P(i,j)`` and ``P(i,k)`` over all triples)
  against ``match_many`` (zero by construction). Rows go to ``study_many_ensembles.csv``.

``--smoke`` runs a tiny version (short chains, 2 epochs, width 32, K up to 4) into
``*_smoke.csv`` files, to check the script end to end.

    python benchmarks/study_many.py [hmc] [ensembles] [--smoke]
    python benchmarks/study_many.py --plot      # study_many.png from the results
"""

from __future__ import annotations

import argparse
import csv
import itertools
import time
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.infer.autoguide import AutoGuide

import bnn_align as ba
from bnn_align import data, diagnostics, guides, models
from bnn_align.posterior import GaussianView, as_gaussian, from_gaussian
from bnn_align.symmetry.permutation import compose

HERE = Path(__file__).parent
RESULTS = HERE / "results"


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def cached(path: Path, make):
    """``torch.load(path)`` if it exists, else ``make()`` saved there (the resumable step)."""
    if path.exists():
        return torch.load(path, weights_only=False)
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(value, path)
    return value


# ------------------------------------------------------------------------------------ HMC --
def hmc(cache: Path, smoke: bool) -> None:
    split = data.digits()
    x, y = split.x_train, split.y_train
    if smoke:
        x, y = x[:300], y[:300]
    widths = [16] if smoke else [16, 32]
    chains = 2 if smoke else 4
    warmup, draws = (10, 10) if smoke else (200, 200)
    depth = 3 if smoke else 6
    rows = []
    for width in widths:
        model = ba.BayesianNetwork(models.mlp(64, [width], 10), prior=1.0, input_shape=(64,))

        def run(seed):
            def make():
                pyro.set_rng_seed(seed)
                mcmc = ba_mcmc(model, depth, warmup, draws)
                mcmc.run(x, y)
                return {k: v for k, v in mcmc.get_samples().items()}
            tag = "smoke" if smoke else "full"
            return cached(cache / f"hmc_{tag}_w{width}_seed{seed}.pt", make)

        started = time.perf_counter()
        runs = [run(seed) for seed in range(chains)]
        seconds = time.perf_counter() - started
        samples = ba.SamplePosterior({s: torch.cat([r[s] for r in runs]) for s in runs[0]
                                      if s in model.sites}, model=model, num_chains=chains)
        alignment = ba.align_samples(None, samples)
        report = diagnostics.rhat_report(alignment)
        test = (split.x_test, split.y_test)
        before = ba.marginal_loss(model, samples, test, num_samples=samples.num_samples,
                                  metrics=("nll", "accuracy"))
        after = ba.marginal_loss(model, alignment.aligned, test,
                                 num_samples=samples.num_samples, metrics=("nll", "accuracy"))
        rows.append({"width": width, "chains": chains, "warmup": warmup, "draws": draws,
                     "max_tree_depth": depth, "fraction_rhat_above_1.01_before":
                     report.fraction_before, "fraction_rhat_above_1.01_after":
                     report.fraction_after, "median_abs_d_before": report.median_abs_d_before,
                     "median_abs_d_after": report.median_abs_d_after,
                     "nll_before": before.values["nll"][0], "nll_after": after.values["nll"][0],
                     "accuracy_before": before.values["accuracy"][0],
                     "accuracy_after": after.values["accuracy"][0],
                     "align_seconds": alignment.seconds, "sampling_seconds": seconds})
        print(rows[-1])
    write_rows(RESULTS / f"study_many_hmc{'_smoke' if smoke else ''}.csv", rows)


def ba_mcmc(model, depth, warmup, draws):
    from pyro.infer import MCMC, NUTS

    return MCMC(NUTS(model, max_tree_depth=depth), num_samples=draws, warmup_steps=warmup,
                num_chains=1, disable_progbar=True)


# ------------------------------------------------------------------------------ ensembles --
def predictive(model, posterior, x, num_samples, gen) -> torch.Tensor:
    """The model average's class probabilities ``(N, classes)``."""
    if isinstance(posterior, torch.nn.Module) and not isinstance(posterior, AutoGuide):
        with torch.no_grad():
            return torch.softmax(posterior(x), -1).double()
    view = posterior if isinstance(posterior, GaussianView) else as_gaussian(posterior)
    draws = view.sample(num_samples, gen)
    probs = 0
    with torch.no_grad():
        for s in range(num_samples):
            probs = probs + torch.softmax(model.evaluate({k: v[s] for k, v in draws.items()},
                                                         x), -1).double()
    return probs / num_samples


def scores(probs: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    nll = -probs[torch.arange(len(y)), y].clamp_min(1e-300).log().mean()
    return float(nll), float((probs.argmax(-1) == y).double().mean())


def cycle_error(perms: dict, count: int, units: int) -> float:
    """Mean over triples i < j < k of the transpositions between P(j,k) o P(i,j) and P(i,k),
    per unit."""
    errors = []
    for i, j, k in itertools.combinations(range(count), 3):
        through = compose(perms[(j, k)], perms[(i, j)])
        errors.append(diagnostics.transposition_distance(through, perms[(i, k)]) / units)
    return float(np.mean(errors)) if errors else 0.0


def ensembles(cache: Path, smoke: bool) -> None:
    split = data.mnist1d()
    width = 32 if smoke else 512
    epochs = 2 if smoke else 60
    members = 4 if smoke else 8
    sizes = [2, 4] if smoke else [2, 4, 8]
    tag = "smoke" if smoke else "full"
    model = ba.BayesianNetwork(models.mlp(40, [width, width], 10), prior=1.0,
                               input_shape=(40,))
    spec = model.spec
    x_test, y_test = split.x_test, split.y_test

    def point(seed):
        def make():
            torch.manual_seed(seed)
            net = models.mlp(40, [width, width], 10)
            opt = torch.optim.Adam(net.parameters(), lr=1e-3)
            train = torch.utils.data.TensorDataset(split.x_train, split.y_train)
            loader = torch.utils.data.DataLoader(train, batch_size=128, shuffle=True,
                                                 generator=torch.Generator().manual_seed(seed))
            for _ in range(epochs):
                for xb, yb in loader:
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(net(xb), yb).backward()
                    opt.step()
            return net.state_dict()
        net = models.mlp(40, [width, width], 10)
        net.load_state_dict(cached(cache / f"point_{tag}_w{width}_seed{seed}.pt", make))
        return net

    def mean_field(seed):
        def make():
            torch.manual_seed(seed)
            pyro.clear_param_store()
            m = ba.BayesianNetwork(models.mlp(40, [width, width], 10), prior=1.0,
                                   input_shape=(40,))
            guide = guides.mean_field(m, init_scale=1e-3)
            ba.fit(m, guide, split.train, epochs=epochs, seed=seed, progress=False)
            view = as_gaussian(guide)
            return {"loc": view.loc, "scale": view.scale}
        state = cached(cache / f"meanfield_{tag}_w{width}_seed{seed}.pt", make)
        torch.manual_seed(seed)
        template = guides.mean_field(model, init_scale=1e-3)
        return from_gaussian(template, GaussianView("diagonal", state["loc"], state["scale"]))

    rows = []
    gen = torch.Generator().manual_seed(0)
    samples = 8 if smoke else 32
    for family, build in (("point", point), ("mean_field", mean_field)):
        posteriors = [build(seed) for seed in range(members)]
        probs = [predictive(model, p, x_test, samples, gen) for p in posteriors]
        pairwise = {}
        for i, j in itertools.combinations(range(members), 2):
            pairwise[(i, j)] = ba.match(posteriors[i], posteriors[j], spec=spec).perms
        for count in sizes:
            started = time.perf_counter()
            result = ba.match_many(posteriors[:count], spec=spec)
            merged = ba.merge(result)
            merged_probs = predictive(model, merged, x_test, samples, gen)
            ensemble = sum(probs[:count]) / count
            member_scores = [scores(p, y_test) for p in probs[:count]]
            many_pairs = {(i, j): result.pairwise(i, j)
                          for i, j in itertools.combinations(range(count), 2)}
            row = {"family": family, "K": count, "width": width, "epochs": epochs,
                   "merged_nll": scores(merged_probs, y_test)[0],
                   "merged_accuracy": scores(merged_probs, y_test)[1],
                   "ensemble_nll": scores(ensemble, y_test)[0],
                   "ensemble_accuracy": scores(ensemble, y_test)[1],
                   "member_nll_mean": float(np.mean([s[0] for s in member_scores])),
                   "member_accuracy_mean": float(np.mean([s[1] for s in member_scores])),
                   "repaired_nll": float("nan"), "repaired_accuracy": float("nan"),
                   "cycle_error_pairwise": cycle_error(pairwise, count, 2 * width),
                   "cycle_error_many": cycle_error(many_pairs, count, 2 * width),
                   "rounds": result.rounds, "objective": result.history[-1],
                   "seconds": time.perf_counter() - started}
            if family == "point":
                repaired = ba.repair(merged, result.aligned, split.x_train)
                row["repaired_nll"], row["repaired_accuracy"] = scores(
                    predictive(model, repaired, x_test, samples, gen), y_test)
            rows.append(row)
            print(row)
    write_rows(RESULTS / f"study_many_ensembles{'_smoke' if smoke else ''}.csv", rows)


def plot() -> Path:
    """``study_many.png`` from the two results CSVs: test accuracy of the merged posterior (and
    REPAIR), the ensemble and the members against K, per family; and the HMC chains' R-hat
    fraction and median standardized difference before and after alignment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    ens = pd.read_csv(RESULTS / "study_many_ensembles.csv")
    chains = pd.read_csv(RESULTS / "study_many_hmc.csv")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, family in zip(axes[:2], ("point", "mean_field")):
        rows = ens[ens.family == family].sort_values("K")
        for column, label in (("member_accuracy_mean", "members (mean)"),
                              ("ensemble_accuracy", "ensemble"),
                              ("merged_accuracy", "merged (match_many)"),
                              ("repaired_accuracy", "merged + REPAIR")):
            if rows[column].notna().any():
                ax.plot(rows.K, rows[column], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(rows.K), [str(k) for k in rows.K])
        ax.set_xlabel("K posteriors")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"MNIST-1D MLP 512, {family.replace('_', '-')}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[2]
    xs = range(len(chains))
    ax.bar([x - 0.2 for x in xs], chains["median_abs_d_before"], 0.4, label="before")
    ax.bar([x + 0.2 for x in xs], chains["median_abs_d_after"], 0.4, label="after alignment")
    ax.set_xticks(list(xs), [f"width {w}" for w in chains.width])
    ax.set_ylabel("median |d| of the chains' means")
    ax.set_title("NUTS, 4 chains, digits MLP\nweights with R-hat > 1.01: "
                 + ", ".join(f"{b:.0%} -> {a:.1%}" for b, a in
                             zip(chains["fraction_rhat_above_1.01_before"],
                                 chains["fraction_rhat_above_1.01_after"])), fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = RESULTS / "study_many.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", default=["hmc", "ensembles"],
                        help="hmc, ensembles or both (the default)")
    parser.add_argument("--smoke", action="store_true", help="a tiny end-to-end run")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache" / "study_many")
    parser.add_argument("--plot", action="store_true",
                        help="plot the committed results (study_many.png) instead of running")
    args = parser.parse_args()
    if args.plot:
        print("wrote", plot())
        return
    unknown = [p for p in args.parts if p not in ("hmc", "ensembles")]
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from hmc, ensembles")
    torch.set_num_threads(1)
    if "hmc" in args.parts:
        hmc(args.cache, args.smoke)
    if "ensembles" in args.parts:
        ensembles(args.cache, args.smoke)


if __name__ == "__main__":
    main()
