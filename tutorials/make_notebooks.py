"""Build the tutorial notebooks from the cells below, and optionally execute them.

    python tutorials/make_notebooks.py            # write the .ipynb files (no outputs)
    python tutorials/make_notebooks.py --execute  # ... and run them with the full budget

The committed notebooks carry the outputs of a full-budget run. The test suite executes every
notebook with ``BNN_ALIGN_TUTORIAL_BUDGET=small``, which every notebook reads to shrink its
training and Monte-Carlo budgets.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

BUDGET = '''import os
SMALL = os.environ.get("BNN_ALIGN_TUTORIAL_BUDGET", "full") == "small"'''


def md(text: str):
    return new_markdown_cell(text.strip())


def code(text: str):
    return new_code_cell(text.strip())


QUICKSTART = [
    md("""
# 1. Quick start: two Bayesian networks, one basin

Two Bayesian neural networks trained from different random initialisations usually end up in
*different copies* of the same basin: their hidden units solve the same problem in a different
order. Interpolating between the two posteriors then crosses a region of high loss. Once the
second posterior is permuted to match the first, most of that barrier disappears.

This notebook does the whole loop on MNIST-1D (generated offline): train two mean-field BNNs,
align them with `bnn_align.match`, and compare the *marginalized* loss barrier, the predictive
loss of the Bayesian model average along the path between the posteriors, before and after
alignment.
"""),
    code(BUDGET + '''
import torch
import bnn_align as ba
from bnn_align import data, guides, models

WIDTH = 32 if SMALL else 256
EPOCHS = 2 if SMALL else 60
SAMPLES = 8 if SMALL else 64
split = data.mnist1d()
split.x_train.shape, split.x_test.shape'''),
    md("""
## Two posteriors

`BayesianNetwork` turns a plain `nn.Module` into a Pyro model whose sample sites are the module's
parameter names. `guides.mean_field` builds an `AutoNormal` whose means start at the network's
initial weights and whose standard deviations start at 1e-3. The two networks differ only in
their random initialisation.
"""),
    code('''
posteriors = []
for seed in (0, 1):
    torch.manual_seed(seed)
    model = ba.BayesianNetwork(models.mlp(40, [WIDTH, WIDTH], 10), input_shape=(40,))
    guide = guides.mean_field(model)
    history = ba.fit(model, guide, split.train, epochs=EPOCHS, seed=seed, progress=False)
    posteriors.append(guide)
    print(f"seed {seed}: final negative ELBO {history[-1]:.0f}")
guide_a, guide_b = posteriors'''),
    md("""
## Align

`match` finds the permutation of every hidden layer of `guide_b` that minimises the
2-Wasserstein distance to `guide_a`. For mean-field Gaussians that distance is
`||mu_a - P mu_b||^2 + ||sigma_a - P sigma_b||^2`; the permutation spec (which axes share a
permutation) is derived automatically from the network's graph.
"""),
    code('''
alignment = ba.match(guide_a, guide_b)
print(alignment)
print("W2^2 before:", round(alignment.cost_before, 2), " after:", round(alignment.cost_after, 2))'''),
    md("""
`alignment.aligned` is a new `AutoNormal`: `guide_b` with its units reordered. It computes
exactly the same predictive distribution as `guide_b`, so its accuracy is the same, but it now
sits next to `guide_a` in weight space.

## The marginalized barrier

`interpolate` builds the Wasserstein geodesic between two posteriors (means and standard
deviations move linearly), and `marginal_loss` estimates the predictive NLL and accuracy of the
model average at 11 points along it, with the same Monte-Carlo noise at every point (common
random numbers) and bootstrap standard errors.
"""),
    code('''
curves = {}
for name, other in (("naive", guide_b), ("aligned", alignment.aligned)):
    curves[name] = ba.marginal_loss(model, ba.interpolate(guide_a, other), split.test,
                                    num_samples=SAMPLES)
    print(f"{name:8s} NLL barrier {curves[name].barrier('nll')}   "
          f"accuracy drop {curves[name].barrier('accuracy')}")'''),
    code('''
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
for (name, curve), color in zip(curves.items(), ("tab:red", "tab:blue")):
    curve.plot(["nll", "accuracy"], ax=axes, label=name, color=color)
plt.show()'''),
    md("""
Along the naive path the model average's loss climbs far above the straight line between the
endpoints (and the accuracy collapses towards chance in the middle); along the aligned path it
stays much closer to the line. Most of the barrier was only a relabelling of hidden units. Not
all of it: on MNIST-1D more than a tenth of a nat remains after alignment, many
standard errors above zero (the reproduction study in `studies/barrier.toml` finds the
same over many pairs and widths, while on scikit-learn's digits it falls to about 0.01).

`curve.to_json()` gives the numbers for the record; `bnn-align demo` runs the same loop from the
command line (with width 512 by default).
"""),
]


LOW_RANK = [
    md("""
# 2. Low-rank posteriors: what the covariance factor adds

A low-rank Gaussian guide (`AutoLowRankMultivariateNormal`) has covariance
`diag(s^2) + W W^T`: a diagonal part plus a factor `W` of rank `r` that couples weights across
layers. Aligning such posteriors has one more symmetry to handle: the columns of `W` are only
defined up to a rotation (`W R` with orthogonal `R` gives the same covariance). `match`
alternates permutation steps with an orthogonal Procrustes step for `R`, and the aligned guide's
factor is rotated so its columns line up with the other guide's.
"""),
    code(BUDGET + '''
import torch
import bnn_align as ba
from bnn_align import data, guides, models

WIDTH = 16 if SMALL else 128
EPOCHS = 2 if SMALL else 60
SAMPLES = 8 if SMALL else 64
RANK = 2 if SMALL else 10
split = data.mnist1d()

posteriors = []
for seed in (0, 1):
    torch.manual_seed(seed)
    model = ba.BayesianNetwork(models.mlp(40, [WIDTH, WIDTH], 10), input_shape=(40,))
    guide = guides.low_rank(model, rank=RANK)
    ba.fit(model, guide, split.train, epochs=EPOCHS, seed=seed, progress=False)
    posteriors.append(guide)
guide_a, guide_b = posteriors
view = ba.as_gaussian(guide_a)
print(view.kind, "rank", view.rank, "latent dimension", view.num_params)'''),
    md("""
`as_gaussian` reads any guide as a `GaussianView`: per site a mean, the diagonal scale, and the
rows of the covariance factor that belong to that site. For packed guides like this one the
mapping from the flat latent vector to sites follows Pyro's own execution order.

## Matching with and without the factor

The `"wasserstein"` objective includes the factor term `||W_a - P W_b R||^2`; `"mean"` matches the
means only. `ba.alignment_cost` evaluates either objective at any permutations, so we can compare
the alignments the two methods find on the full objective. (`match` starts the W2 descent from
the mean-matching solution when that is better, so on its own objective it never does worse.)
"""),
    code('''
full = ba.match(guide_a, guide_b)
means_only = ba.match(guide_a, guide_b, method="mean")
print("rotation R is orthogonal:",
      torch.allclose(full.rotation.T @ full.rotation, torch.eye(RANK), atol=1e-5))
agree = sum((full.perms[g] == means_only.perms[g]).float().mean().item()
            for g in full.perms) / len(full.perms)
print(f"units placed the same way by both methods: {agree:.1%}")
print("full objective at the identity:       ", round(full.cost_before, 3))
print("full objective after mean matching:   ",
      round(ba.alignment_cost(guide_a, guide_b, means_only.perms), 3))
print("full objective after W2 matching:     ", round(full.cost_after, 3))'''),
    md("""
The objective `match` minimises is the expected squared distance under a coupling of the two
Gaussians that shares their noise. For diagonal Gaussians it equals the squared 2-Wasserstein
distance; with a factor it is an upper bound on it (the test suite checks the bound against the
exact W2, computed with matrix square roots on small networks).

## Barriers along the low-rank path

The path interpolates means, diagonal scales and the (rotated) factors linearly. On small
networks its length exceeds the exact W2 distance between the endpoints by only 0.3-1%, so it is
close to the true geodesic.
"""),
    code('''
curves = {}
for name, other in (("naive", guide_b), ("mean matching", means_only.aligned),
                    ("W2 matching", full.aligned)):
    curves[name] = ba.marginal_loss(model, ba.interpolate(guide_a, other), split.test,
                                    num_samples=SAMPLES)
    print(f"{name:14s} NLL barrier {curves[name].barrier('nll')}")'''),
    code('''
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
for (name, curve), color in zip(curves.items(), ("tab:red", "tab:orange", "tab:blue")):
    curve.plot(["nll", "accuracy"], ax=axes, label=name, color=color)
plt.show()'''),
    md("""
Both alignments remove most of the barrier. W2 matching starts from the mean-matching
permutations and then moves a minority of the units (the share printed above) to fit the
standard deviations and the covariance factor, which carries correlations between layers that
the means alone do not see; that lowers the full objective by less than one percent, and the
barriers the two leave are within a standard error or so of each other. One pair of networks
cannot settle which objective is better; the reproduction study in
`studies/barrier.toml` compares mean and W2 matching for mean-field and low-rank guides
over several pairs and widths.
"""),
]


DIAGNOSTICS = [
    md("""
# 3. Diagnosing aligned posteriors with ArviZ

If two posteriors describe the same basin up to a permutation, treating their draws as two
MCMC chains should show it: before alignment the chains disagree (R-hat far above 1, the
signature of a multimodal posterior), and alignment should remove the part of the disagreement
that is only a relabelling of units. How much is left tells whether the two posteriors are the
same mode or two nearby ones.
`bnn_align.to_inference_data` turns posteriors into an ArviZ `InferenceData` with one chain per
posterior, and `bnn_align.diagnostics` builds the R-hat report and forest plots on top.
"""),
    code(BUDGET + '''
import torch
import bnn_align as ba
from bnn_align import data, diagnostics, guides, models

WIDTH = 16 if SMALL else 128
EPOCHS = 2 if SMALL else 60
DRAWS = 100 if SMALL else 1000
split = data.mnist1d()
posteriors = []
for seed in (0, 1):
    torch.manual_seed(seed)
    model = ba.BayesianNetwork(models.mlp(40, [WIDTH, WIDTH], 10), input_shape=(40,))
    guide = guides.mean_field(model)
    ba.fit(model, guide, split.train, epochs=EPOCHS, seed=seed, progress=False)
    posteriors.append(guide)
guide_a, guide_b = posteriors
alignment = ba.match(guide_a, guide_b)'''),
    md("""
## Posteriors as chains

Each site becomes a variable with dims named after its axes (`"2.weight_out"`,
`"2.weight_in"`) and integer unit coordinates, so the usual ArviZ tools apply.
"""),
    code('''
idata = ba.to_inference_data([guide_a, guide_b], num_samples=DRAWS,
                             names=["guide_a", "guide_b"])
idata.posterior["2.weight"]'''),
    code('''
diagnostics._arviz().summary(idata, var_names=["4.bias"])'''),
    md("""
## R-hat before and after alignment

`rhat_report` takes the `Alignment` (which remembers the two posteriors) and computes the R-hat
of every weight with guide_a and guide_b as the two chains, then with guide_a and the aligned
guide_b. The same draws of guide_a are used both times.

R-hat only asks whether two chains sample the same distribution, and two posteriors trained from
different seeds are different distributions even when perfectly aligned. So the report also
measures how far apart they are: per weight the standardized mean difference
`d = (mu_a - mu_b) / sqrt(sd_a^2 + sd_b^2)`, the distance between the two means in combined
standard deviations, and per site the correlation of the two posteriors' means, which does not
depend on the scale at all.
"""),
    code('''
report = diagnostics.rhat_report(alignment, num_samples=DRAWS)
print(report)'''),
    md("""
Alignment lowers R-hat in every permuted layer, but most weights stay above 1.01: what is left
is the genuine difference between the two solutions, which no relabelling removes. How well R-hat
shows the alignment depends on the layer, and the last column says where it does. Where most
aligned weights still have |d| > 1 (here the first layer), the two posteriors overlap little:
R-hat stays high whatever the alignment, and where their draws do not overlap at all it
saturates (rank-normalized R-hat of two such chains is about 1.83 however far apart they are).
There |d| and the correlation of the means show what alignment did: the correlation goes from
about 0 to 0.4-0.85 in the permuted layers. Where most aligned weights overlap (|d| <= 1), R-hat
is not saturated and its fall is a fair measure. R-hat is meant for chains that should agree:
on a planted pair, one posterior a relabelled copy of the other, the fraction above 1.01 after
alignment is zero (see the test suite). The output bias is not permuted, so alignment cannot
change it.

## A look at individual units

A forest plot shows a few units' incoming weights from both posteriors. We pick the three
first-layer units whose incoming weights the alignment brought closest to guide_a's (the ones
where relabelling matters most), and two of their inputs.
"""),
    code('''
import matplotlib.pyplot as plt

mean_a = ba.as_gaussian(guide_a).loc["0.weight"]
before = (mean_a - ba.as_gaussian(guide_b).loc["0.weight"]).norm(dim=1)
after = (mean_a - ba.as_gaussian(alignment.aligned).loc["0.weight"]).norm(dim=1)
units = tuple((before - after).topk(3).indices.tolist())
for u in units:
    print(f"unit {u}: distance to guide_a's incoming weights {before[u]:.2f} before, "
          f"{after[u]:.2f} after alignment")
fig = diagnostics.plot_units(alignment, site="0.weight", units=units, inputs=(0, 1),
                             num_samples=DRAWS)
plt.show()'''),
    md("""
Before alignment, position `i` of guide_b holds a different unit than position `i` of guide_a,
and its intervals sit elsewhere; after alignment guide_b's counterpart has moved into place and
the intervals lie much closer. They still do not coincide: in the first layer the aligned means
still differ by about one combined standard deviation at the median (|d| above).
"""),
    md("""
## Model comparison along the path

With `data=` the InferenceData also gets a `log_likelihood` group, so PSIS-LOO works for a
posterior: here for the endpoint guide_a and for the midpoints of the aligned and the naive
paths, on 300 training points (leave-one-out is defined for the data the posterior was fit
to).
"""),
    code('''
import warnings

az = diagnostics._arviz()
# ArviZ warns about large Pareto k for every posterior; the k values are printed below
warnings.filterwarnings("ignore", message="Estimated shape parameter of Pareto")
x, y = split.x_train[:300], split.y_train[:300]
candidates = {
    "guide_a": guide_a,
    "aligned midpoint": ba.interpolate(guide_a, alignment.aligned).at(0.5),
    "naive midpoint": ba.interpolate(guide_a, guide_b).at(0.5),
}
loo = {name: az.loo(ba.to_inference_data(q, num_samples=DRAWS // 2, data=(x, y)))
       for name, q in candidates.items()}
for name, result in loo.items():
    print(f"{name:17s} elpd_loo = {result['elpd_loo']:7.1f}   "
          f"largest Pareto k = {float(result['pareto_k'].max()):.2f}")'''),
    md("""
The ordering is the one the barrier predicts: the aligned midpoint is close to the endpoint and
the naive midpoint far worse. The Pareto k diagnostics, however, are well above 0.7: importance
sampling from a narrow mean-field posterior to its leave-one-out versions is unreliable, a known
limitation of PSIS-LOO for variational posteriors. Treat the numbers as a ranking, and prefer
`bnn_align.marginal_loss` on held-out data for the values themselves.
"""),
]


DETERMINISTIC = [
    md("""
# 4. Deterministic networks: weight matching, activation matching, width

Point estimates are the special case of posteriors with zero variance, and bnn_align accepts
plain `nn.Module`s and state dicts wherever it accepts guides. This notebook trains ordinary MLPs
with SGD and reproduces the Git Re-Basin observations: weight matching (`method="mean"`) and
activation matching (`method="activation"`, units paired by the correlation of their
activations) both find permutations that remove most of the loss barrier, and the barrier left
after alignment is smallest for wider networks.
"""),
    code(BUDGET + '''
import torch
from torch import nn
import bnn_align as ba
from bnn_align import data, models

EPOCHS = 2 if SMALL else 30
WIDTHS = [16, 32] if SMALL else [32, 64, 128, 256, 512]
split = data.mnist1d()


def train(width, seed):
    """SGD with momentum, weight decay and a one-cycle learning-rate schedule."""
    torch.manual_seed(seed)
    net = models.mlp(40, [width, width], 10)
    x, y = split.train
    batches = (len(x) + 127) // 128
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05,
                                                   total_steps=EPOCHS * batches)
    for epoch in range(EPOCHS):
        for idx in torch.randperm(len(x)).split(128):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
            schedule.step()
    return net'''),
    md("""
## Matching two networks

With plain modules there is no `BayesianNetwork` to take the permutation spec from, so we pass
`data=`: `match` traces the module on it to derive the spec, and activation matching uses it to
compute activations.
"""),
    code('''
net_a, net_b = train(WIDTHS[-1], 0), train(WIDTHS[-1], 1)
x_train = split.x_train[:1000]
weights = ba.match(net_a, net_b, method="mean", data=x_train)
activations = ba.match(net_a, net_b, method="activation", data=x_train)
agree = sum((weights.perms[g] == activations.perms[g]).float().mean().item()
            for g in weights.perms) / len(weights.perms)
print(f"units paired the same way by both methods: {agree:.1%}")
print("weight-matching objective: identity", round(weights.cost_before, 1),
      " weight matching", round(weights.cost_after, 1), " activation matching",
      round(ba.alignment_cost(net_a, net_b, activations.perms, method="mean", data=x_train), 1))
with torch.no_grad():
    same = torch.allclose(weights.aligned(split.x_test), net_b(split.x_test), atol=1e-5)
print("the aligned network computes the same function:", same)'''),
    md("""
The two methods pair only a minority of the units the same way, and activation matching's
permutations are far from optimal for the weight-matching objective; yet, as the barriers below
show, both lead into a low-loss region. Units of a trained layer are far from unique: several
pairings are nearly as good for the function, and only the weight objective tells them apart.

## Loss barriers

`marginal_loss` works for point estimates too (every "sample" is the same network), so the
barrier of deterministic networks is the ordinary loss barrier. The `BayesianNetwork` here only
provides the likelihood used for the loss.
"""),
    code('''
model = ba.BayesianNetwork(models.mlp(40, [WIDTHS[-1]] * 2, 10), input_shape=(40,))
for name, other in (("naive", net_b), ("weight matching", weights.aligned),
                    ("activation matching", activations.aligned)):
    curve = ba.marginal_loss(model, ba.interpolate(net_a, other), split.test, num_samples=1)
    print(f"{name:20s} loss barrier {curve.barrier('nll').value:.3f}   "
          f"accuracy drop {curve.barrier('accuracy').value:.3f}")'''),
    md("""
## The width effect

For every width we train two pairs of networks and average their barriers.
"""),
    code('''
import numpy as np

PAIRS = 1 if SMALL else 2
rows = []
for width in WIDTHS:
    model = ba.BayesianNetwork(models.mlp(40, [width] * 2, 10), input_shape=(40,))
    naive, after = [], []
    for pair in range(PAIRS):
        a, b = train(width, 2 * pair), train(width, 2 * pair + 1)
        aligned = ba.match(a, b, method="mean", data=x_train).aligned
        naive.append(ba.marginal_loss(model, ba.interpolate(a, b), split.test,
                                      num_samples=1).barrier("nll").value)
        after.append(ba.marginal_loss(model, ba.interpolate(a, aligned), split.test,
                                      num_samples=1).barrier("nll").value)
    rows.append((width, np.mean(naive), np.mean(after)))
    print(f"width {width:4d}: naive {rows[-1][1]:.3f}   aligned {rows[-1][2]:.3f}")'''),
    code('''
import matplotlib.pyplot as plt

w, naive, aligned = zip(*rows)
plt.figure(figsize=(4.5, 3.4))
plt.plot(w, naive, "o-", color="tab:red", label="naive")
plt.plot(w, aligned, "o-", color="tab:blue", label="weight matching")
plt.xscale("log", base=2)
plt.xlabel("hidden width")
plt.ylabel("loss barrier (nats)")
plt.legend()
plt.grid(alpha=0.3)
plt.show()'''),
    md("""
After weight matching the barrier is a small fraction of the naive one at every width. It is
highest for the narrowest networks and levels off at a few hundredths of a nat from width 128
on; the naive barrier stays an order of magnitude larger at every width (with two pairs per
width, its ups and downs are within the spread between pairs). Ainsworth et al. (2023) report
the barrier after matching falling towards zero with width for MLPs on MNIST; on MNIST-1D with
these budgets it does not reach zero. The reproduction study repeats the comparison for
Bayesian posteriors over more pairs.
"""),
]

CURVES = [
    md("""
# 5. Curves between posteriors

The straight path between two posteriors crosses a barrier that alignment shrinks but does not
always remove: on MNIST-1D about a tenth of a nat is left (tutorial 1). Garipov et al. (2018)
found that independently trained networks are joined by simple *curves* of low loss, and Tatro et
al. (2020) that aligning the endpoints first makes such curves easier to find. `fit_curve` learns
a curve between two posteriors whose every point is itself a posterior: for mean-field endpoints
the bend of a quadratic Bezier curve is a Gaussian of the same family, and it is trained so that
every `q_t` along the curve has a good ELBO.
"""),
    code(BUDGET + '''
import torch
import bnn_align as ba
from bnn_align import data, guides, models

WIDTH = 32 if SMALL else 128
EPOCHS = 2 if SMALL else 30
CURVE_EPOCHS = 1 if SMALL else 10
SAMPLES = 8 if SMALL else 64
split = data.mnist1d()

posteriors = []
for seed in (0, 1):
    torch.manual_seed(seed)
    model = ba.BayesianNetwork(models.mlp(40, [WIDTH, WIDTH], 10), input_shape=(40,))
    guide = guides.mean_field(model)
    ba.fit(model, guide, split.train, epochs=EPOCHS, seed=seed, progress=False)
    posteriors.append(guide)
guide_a, guide_b = posteriors
aligned = ba.match(guide_a, guide_b).aligned'''),
    md("""
## Learning the curves

A curve has fixed endpoints and trainable *bends*. With one bend (the default) the Bezier curve is
`q_t = (1-t)^2 q_0 + 2t(1-t) q_bend + t^2 q_1`, combining means and standard deviations alike
(the law of the weights `sum_i c_i(t) (mu_i + sigma_i * eps)` with shared noise). The bend starts
at the midpoint of the straight path, so the untrained curve *is* the straight path; training
minimises the expected negative ELBO at a random `t` per minibatch, the objective `fit` uses.
We learn one curve between the naive endpoints and one between the aligned ones.
"""),
    code('''
curves = {name: ba.fit_curve(model, guide_a, other, split.train, epochs=CURVE_EPOCHS,
                             progress=False)
          for name, other in (("naive", guide_b), ("aligned", aligned))}
curves["aligned"]'''),
    md("""
A `Curve` is a path like the one `interpolate` returns, so `marginal_loss` evaluates it as it is:
the predictive NLL of the model average at 11 points, common random numbers, bootstrap standard
errors.
"""),
    code('''
results = {}
for name, other in (("naive", guide_b), ("aligned", aligned)):
    for path_kind, path in (("linear", ba.interpolate(guide_a, other)), ("curve", curves[name])):
        results[name, path_kind] = ba.marginal_loss(model, path, split.test,
                                                    num_samples=SAMPLES)
        print(f"{name:8s} {path_kind:7s} NLL barrier {results[name, path_kind].barrier('nll')}   "
              f"accuracy drop {results[name, path_kind].barrier('accuracy').value:.3f}")'''),
    code('''
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
colors = {("naive", "linear"): "tab:red", ("naive", "curve"): "tab:orange",
          ("aligned", "linear"): "tab:blue", ("aligned", "curve"): "tab:green"}
for key, curve in results.items():
    curve.plot(["nll", "accuracy"], ax=axes, label=" ".join(key), color=colors[key])
plt.show()'''),
    md("""
## The plane through the endpoints and the bend

`plot_plane` shows the predictive NLL on the plane through the means of the two endpoints and the
bend. Every point of the plane is the affine combination of the three Gaussians whose mean lies
there; a curve with one bend lies in that plane. The dashed line is the straight path.
"""),
    code('''
test_subset = split.subset(num_test=300).test
fig = curves["naive"].plot_plane(model, test_subset, grid=9 if SMALL else 15,
                                 num_samples=4 if SMALL else 16)
plt.show()'''),
    md("""
## Every point is a posterior

`curve.at(t)` is a guide of the endpoints' kind (here an `AutoNormal`), usable everywhere a guide
is: `marginal_loss` on its own, `to_inference_data`, `match`. `curve.save` and `Curve.load`
store and restore a curve exactly (the endpoints are rebuilt over the model you pass).
"""),
    code('''
import tempfile
from pathlib import Path

middle = curves["aligned"].at(0.5)
print(type(middle).__name__,
      "accuracy of the model average at t = 0.5:",
      round(ba.marginal_loss(model, middle, split.test, num_samples=SAMPLES)
            .values["accuracy"][0], 3))
with tempfile.TemporaryDirectory() as folder:
    curves["aligned"].save(Path(folder) / "curve.pt")
    again = ba.Curve.load(Path(folder) / "curve.pt", model=model)
mine, theirs = curves["aligned"].view_at(0.3), again.view_at(0.3)
print("reloaded curve identical:",
      all(torch.equal(mine.loc[s], theirs.loc[s]) and torch.equal(mine.scale[s], theirs.scale[s])
          for s in mine.sites))'''),
    md("""
With these budgets (one pair of networks of width 128, 30 epochs per endpoint, 10 per curve) the
straight path between the naive endpoints climbs about 0.9 nats above the line between their
losses, and about 0.04 after alignment. Both learned curves stay at or below that line at every
`t` (a barrier of zero: the largest excess is at the endpoints themselves). Their middle is even
*better* than the endpoints: training the bend keeps optimising the same ELBO that 30 epochs left
unconverged at the endpoints, so read the NLL of a curve's interior as "at least as good as the
ends", not as a property of the endpoints alone. The accuracy along the naive curve still dips by
about 0.03; along the aligned curve it does not. So on this small network a one-bend curve
connects even unaligned posteriors in NLL. Whether alignment lets a curve get there in fewer
epochs (Tatro et al.'s claim), and how this holds for ResNets, needs several pairs and budgets:
`fit_curve(..., callback=...)` records the barrier epoch by epoch for such a study, and
`kind="polychain"` or `bends=2` give other curve families.
"""),
]

MANY = [
    md("""
# 8. Many posteriors: HMC chains and a deep ensemble

Several HMC chains on a Bayesian network never agree, even when each samples the same posterior
mode well: every chain settles in its own relabelling of the hidden units. R-hat, the standard
check that chains sample one distribution, then flags almost every weight. Aligning the samples
removes the relabelling and leaves the predictions untouched.

This notebook runs NUTS chains on a small MLP on the digits data, aligns every sample
(`align_samples`, through `rhat_report`), and then aligns and merges a deep ensemble with
`match_many`, `merge` and `repair`.
"""),
    code(BUDGET + """
import matplotlib.pyplot as plt
import numpy as np
import pyro
import torch
from pyro.infer import MCMC, NUTS

import bnn_align as ba
from bnn_align import data, diagnostics, models

WIDTH = 16
CHAINS = 2 if SMALL else 4
WARMUP, DRAWS = (10, 10) if SMALL else (60, 60)
TREE_DEPTH = 3 if SMALL else 5
MEMBERS = 3 if SMALL else 4
EPOCHS = 5 if SMALL else 150
split = data.digits()
x_train, y_train = (split.x_train[:300], split.y_train[:300]) if SMALL else (split.x_train,
                                                                             split.y_train)
model = ba.BayesianNetwork(models.mlp(64, [WIDTH], 10), prior=1.0, input_shape=(64,))
x_train.shape"""),
    md("""
## HMC chains

Each chain is a separate Pyro `MCMC` run from its own random initialisation (one process, so
the seeds decide everything). `SamplePosterior.from_mcmc` reads a run's samples; the chains are
concatenated into one sample set with `num_chains` chains.
"""),
    code("""
runs = []
for chain in range(CHAINS):
    pyro.set_rng_seed(chain)
    mcmc = MCMC(NUTS(model, max_tree_depth=TREE_DEPTH), num_samples=DRAWS, warmup_steps=WARMUP,
                num_chains=1, disable_progbar=True)
    mcmc.run(x_train, y_train)
    runs.append(ba.SamplePosterior.from_mcmc(mcmc, model))
chains = ba.SamplePosterior({s: torch.cat([r.samples[s] for r in runs]) for s in runs[0].sites},
                            model=model, num_chains=CHAINS)
chains"""),
    md("""
## R-hat before and after aligning every sample

`rhat_report` on a multi-chain sample set matches the chains to each other as wholes
(`match_many` over their means and standard deviations), aligns every sample to that barycenter
(`align_samples`), and reports R-hat of the chains before and after.
"""),
    code("""
alignment = ba.align_samples(None, chains)
report = diagnostics.rhat_report(alignment)
print(f"weights with R-hat > 1.01: {report.fraction_before:.0%} before, "
      f"{report.fraction_after:.0%} after alignment")
report.to_dataframe()[["median_before", "median_after", "above_before", "above_after"]]"""),
    code("""
pooled = {when: np.concatenate([v.reshape(-1) for v in values.values()])
          for when, values in (("before", report.before), ("after", report.after))}
fig, ax = plt.subplots(figsize=(6, 3))
bins = np.linspace(1.0, max(1.2, float(pooled["before"].max())), 40)
for when, values in pooled.items():
    ax.hist(np.clip(values, bins[0], bins[-1]), bins=bins, alpha=0.6, label=when)
ax.set_xlabel("R-hat of a weight across chains")
ax.set_ylabel("weights")
ax.legend()
fig.tight_layout()"""),
    md("""
Read the table with the output bias `2.bias` as a control: no permutation touches it, so its
R-hat is the same before and after, and where it is far above 1 the chains disagree for reasons
other than relabelling: short chains that have not converged, or genuinely different modes of
the posterior. Alignment can only remove the relabelling part; on the permuted sites the median
R-hat falls, and whatever remains is disagreement no permutation explains. With the budget here
(a few dozen draws per chain) that remainder dominates; longer chains are the study's
(`benchmarks/study_many.py hmc`).

Alignment must not change predictions: every aligned sample computes the function it computed
before, so the model average of the chains is the same.
"""),
    code("""
test = (split.x_test, split.y_test)
for name, samples in (("chains", chains), ("aligned chains", alignment.aligned)):
    curve = ba.marginal_loss(model, samples, test, num_samples=samples.num_samples,
                             metrics=("nll", "accuracy"))
    print(f"{name:<16} NLL {curve.values['nll'][0]:.4f}  accuracy "
          f"{curve.values['accuracy'][0]:.4f}")"""),
    md("""
## A deep ensemble: align, merge, repair

Deterministic networks trained from different seeds are point estimates. `match_many` aligns
all of them to one barycenter, so the permutation between any two members, composed through it,
is consistent (`result.pairwise(i, j)`). `merge` averages the aligned weights; `repair` restores
the per-unit statistics that averaging shrinks (REPAIR).
"""),
    code("""
def train(seed):
    torch.manual_seed(seed)
    net = models.mlp(64, [WIDTH], 10)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(EPOCHS):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x_train), y_train).backward()
        opt.step()
    return net

members = [train(seed) for seed in range(MEMBERS)]
result = ba.match_many(members, spec=model.spec)
merged = ba.merge(result)
repaired = ba.repair(merged, result.aligned, x_train)
ensemble = ba.SamplePosterior.from_modules(members, model=model)

def accuracy(net):
    with torch.no_grad():
        return float((net(split.x_test).argmax(-1) == split.y_test).float().mean())

ens = ba.marginal_loss(model, ensemble, test, num_samples=MEMBERS, metrics="accuracy")
print("members ", [round(accuracy(m), 3) for m in members])
print(f"ensemble {ens.values['accuracy'][0]:.3f}  merged {accuracy(merged):.3f}  "
      f"merged + REPAIR {accuracy(repaired):.3f}")
print("objective per round", [round(h, 2) for h in result.history])"""),
    code("""
consistent = all(
    torch.equal(result.pairwise(j, k)[g][result.pairwise(i, j)[g]], result.pairwise(i, k)[g])
    for i in range(MEMBERS) for j in range(MEMBERS) for k in range(MEMBERS) for g in result.perms[0])
separate = {(0, k): ba.match(members[0], members[k], spec=model.spec).perms for k in range(MEMBERS)}
distance = [diagnostics.transposition_distance(separate[(0, k)], result.pairwise(0, k))
            for k in range(1, MEMBERS)]
print("cycle-consistent:", consistent)
print("transpositions between pairwise match and match_many:", distance)"""),
    md("""
The permutations from separate `match` calls need not compose consistently; those of
`match_many` always do. The transposition distance counts how many unit swaps separate the two
answers for each pair.
"""),
]

SYMMETRY_REMOVAL = [
    md("""
# 7. Removing the scale symmetry: canonical forms, geodesics and flatness

Permutations are not a network's only symmetry. A ReLU unit can have its incoming weights and
bias multiplied by any `c > 0` and its outgoing weights by `1 / c`: the function is unchanged.
Pittorino et al. (ICML 2022) remove this symmetry by normalising every unit's incoming vector to
the unit sphere, match units on these *canonical* forms, and compare straight paths with great
circles (geodesics) on the resulting product of spheres. They also measure *flatness* by the
local energy: the training error under multiplicative weight noise. This notebook does the same
for mean-field posteriors on MNIST-1D.
"""),
    code(BUDGET + """
import torch
import bnn_align as ba
from bnn_align import data, guides, models

WIDTH = 16 if SMALL else 128
EPOCHS = 2 if SMALL else 30
SAMPLES = 8 if SMALL else 64
SIGMAS = [0.0, 0.5] if SMALL else [0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0]
split = data.mnist1d()
train = split.subset(num_train=500 if SMALL else 4000).train

posteriors = []
for seed in (0, 1):
    torch.manual_seed(seed)
    model = ba.BayesianNetwork(models.mlp(40, [WIDTH, WIDTH], 10), input_shape=(40,))
    guide = guides.mean_field(model, init_scale=1e-3)
    ba.fit(model, guide, split.train, epochs=EPOCHS, seed=seed, progress=False)
    posteriors.append(guide)
guide_a, guide_b = posteriors"""),
    md("""
## Which units are scalable

`spec_from_module` derives the scale symmetries from the graph together with the permutations:
`spec.scalable` lists, for each scalable group of units, the tensor axes a rescaling multiplies
(incoming) and divides (outgoing). With GELU the list is empty: GELU is not homogeneous.
"""),
    code("""
for group, symmetry in model.spec.scalable.items():
    print(group, symmetry)
gelu = ba.spec_from_module(models.mlp(40, [WIDTH, WIDTH], 10, activation="gelu"),
                           torch.zeros(1, 40))
print("scalable groups with GELU:", gelu.scalable)"""),
    md("""
A random rescaling of every scalable unit changes the weights but not the predictive
distribution: the model average's NLL is the same (the rescaled guide is the exact push-forward
of the posterior, its means, standard deviations and all). `canonicalize` picks the rescaling
that gives every unit's incoming mean vector unit norm, layer by layer (the scale of layer
`l` is pushed into layer `l + 1` before that is normalised).
"""),
    code("""
gen = torch.Generator().manual_seed(0)
scales = {g: torch.exp(torch.randn(WIDTH, generator=gen)) for g in model.spec.scalable}
rescaled = ba.rescale(guide_a, scales)
canonical_a = ba.canonicalize(guide_a)
for name, q in (("guide_a", guide_a), ("rescaled", rescaled), ("canonical", canonical_a)):
    loc = ba.as_gaussian(q).loc
    norms = torch.cat([loc["0.weight"], loc["0.bias"][:, None]], 1).norm(dim=1)
    nll = ba.marginal_loss(model, q, split.test, num_samples=SAMPLES).values["nll"][0]
    print(f"{name:10s} first-layer row norms {norms.min():.3f}..{norms.max():.3f}   "
          f"test NLL {nll:.4f}")"""),
    md("""
## Aligning with and without the scale symmetry

`match(..., symmetries=("permutation", "scale"))` canonicalises both posteriors and finds the
permutations between the canonical forms. We compare four paths: linear (Wasserstein) and
geodesic, after permutation-only and permutation-and-scale alignment. The geodesic moves each
unit's incoming mean vector along a great circle (its radius linearly), and standard deviations
linearly as the Wasserstein path does.
"""),
    code("""
perm_only = ba.match(guide_a, guide_b)
both = ba.match(guide_a, guide_b, symmetries=("permutation", "scale"))
pairs = {"permutation": (guide_a, perm_only.aligned),
         "permutation+scale": (both.canonical[0], both.aligned)}
curves = {}
for alignment, (q0, q1) in pairs.items():
    for kind in ("wasserstein", "geodesic"):
        curves[alignment, kind] = ba.marginal_loss(model, ba.interpolate(q0, q1, kind=kind),
                                                   split.test, num_samples=SAMPLES)
        print(f"{alignment:18s} {kind:12s} NLL barrier {curves[alignment, kind].barrier('nll')}"
              f"   accuracy drop {curves[alignment, kind].barrier('accuracy').value:.3f}")"""),
    code("""
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(5, 3.4))
for key, curve in curves.items():
    curve.plot(["nll"], ax=ax, label=" / ".join(key))
plt.show()"""),
    md("""
## Flatness: the local energy

`local_energy` perturbs every weight of the means multiplicatively, `theta (1 + sigma xi)`, and
reports the training error averaged over draws of `xi` (all draws in one batched call). Because
the noise is relative to each weight, it does not depend on the scale symmetry. We measure the
endpoints and the midpoints of the aligned paths.
"""),
    code("""
points = {"endpoint a": guide_a, "endpoint b": guide_b,
          "midpoint, permutation": ba.interpolate(*pairs["permutation"]).at(0.5),
          "midpoint, perm.+scale (geodesic)":
              ba.interpolate(*pairs["permutation+scale"], kind="geodesic").at(0.5)}
energies = {name: ba.local_energy(model, q, train, SIGMAS, num_draws=SAMPLES)
            for name, q in points.items()}
fig, ax = plt.subplots(figsize=(5, 3.4))
for name, energy in energies.items():
    ax.errorbar(energy.sigmas, energy.mean, energy.se, label=name, capsize=2)
    print(f"{name:34s} " + "  ".join(f"{m:.3f}" for m in energy.mean))
ax.set_xlabel("relative noise sigma")
ax.set_ylabel("training error")
ax.legend(fontsize=7)
plt.show()"""),
    md("""
What this run showed (one pair of width-128 mean-field posteriors, 30 epochs; single numbers
from one pair, which `benchmarks/study_symmetries.py` repeats over pairs, widths and MAP
estimates): removing the scale symmetry before matching did not lower the barrier (0.060 nats
along the linear path with permutations only, 0.080 with permutations and scale), and the
geodesic was *worse* than the straight line in both cases (0.250 and 0.262). The accuracy drops
were close on all four paths (0.045-0.065), so the geodesic's extra NLL is mostly confidence,
not errors. A likely reason: on the straight line the incoming vectors of the hidden units
shrink towards the middle (a chord of the sphere is shorter than the arc), so the midpoint
network is less confident, which the NLL of a model average rewards where the endpoints
disagree; the geodesic keeps every norm at 1. The local energy of the means says the same from
another side: the midpoints' training error is 0.21-0.23 without noise where the endpoints' is
0.01, and the geodesic midpoint is slightly less flat than the linear one at every `sigma`.
"""),
]

ASYMMETRIC = [
    md("""
# 6. Networks without permutation symmetry

Alignment exists because hidden units can be reordered without changing the function. Lim et al.
(NeurIPS 2024) remove that symmetry by construction, and report that such networks are linearly
connected *without* alignment. They are the natural control for everything `bnn_align` does:

- a **W-asymmetric** layer (`models.AsymLinear`) holds, in every row of its weight, a few
  entries fixed to seeded random values, so reordering its units would move them;
- a **sigma-asymmetric** network replaces each activation by `FiGLU`, `sigmoid(C x) * x` with a
  fixed random matrix `C` that mixes all units.

This notebook trains two mean-field posteriors of each variant on scikit-learn's digits and
measures the marginalized barrier between them, with and without alignment.
"""),
    code(BUDGET + """
import torch
import bnn_align as ba
from bnn_align import data, guides, models

WIDTH = 16 if SMALL else 128
EPOCHS = 2 if SMALL else 100
SAMPLES = 8 if SMALL else 64
split = data.digits()
split.x_train.shape"""),
    md("""
## The layers and what the spec makes of them

`asymmetry="w"` turns every linear layer of the MLP into an `AsymLinear`. Its only weight
parameter is `free`, the entries that are not fixed; the fixed values and positions are buffers.
A `BayesianNetwork` puts priors on parameters only, so a guide has no variational parameters
for the fixed entries: they never enter the ELBO, the matching objective or a path.
`spec_from_module` knows the layers and removes every group they touch, which here is all of them.
"""),
    code("""
net = models.mlp(64, [8, 8], 10, asymmetry="w", asymmetry_seed=0)
print(net[2])
print("parameters:", [name for name, _ in net.named_parameters()])
print("fixed entries per row:", net[2].fixed_mask.sum(1).tolist())
print("groups of the standard MLP:", ba.spec_from_module(models.mlp(64, [8, 8], 10),
                                                         torch.zeros(1, 64)).groups)
print("groups of the W-asymmetric MLP:", ba.spec_from_module(net, torch.zeros(1, 64)).groups)
print("groups of the sigma-asymmetric MLP:",
      ba.spec_from_module(models.mlp(64, [8, 8], 10, asymmetry="sigma"), torch.zeros(1, 64)).groups)"""),
    md("""
## Two posteriors of each variant

The two posteriors of a variant differ in their initial free weights (`torch.manual_seed`) but
share the fixed entries (`asymmetry_seed=0`): posteriors over different fixed entries would be
posteriors of different models. `fit(..., callback=...)` records the test accuracy of the model
average after every epoch.
"""),
    code("""
VARIANTS = {"standard": None, "W-asymmetric": "w", "sigma-asymmetric": "sigma"}
posteriors, histories, accuracies = {}, {}, {}
for name, asymmetry in VARIANTS.items():
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = ba.BayesianNetwork(
            models.mlp(64, [WIDTH, WIDTH], 10, asymmetry=asymmetry, asymmetry_seed=0),
            input_shape=(64,))
        guide = guides.mean_field(model)
        accuracy = []
        record = lambda epoch, g: accuracy.append(ba.marginal_loss(
            model, g, split.test, num_samples=8, metrics=["accuracy"]).values["accuracy"][0])
        histories[name, seed] = ba.fit(model, guide, split.train, epochs=EPOCHS, seed=seed,
                                       progress=False, callback=record)
        accuracies[name, seed] = accuracy
        posteriors[name, seed] = (model, guide)
    print(f"{name:17s} final negative ELBO {histories[name, 0][-1]:8.1f} {histories[name, 1][-1]:8.1f}"
          f"   test accuracy {accuracies[name, 0][-1]:.3f} {accuracies[name, 1][-1]:.3f}")"""),
    code("""
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
colors = {"standard": "tab:blue", "W-asymmetric": "tab:red", "sigma-asymmetric": "tab:green"}
for (name, seed), history in histories.items():
    label = name if seed == 0 else None
    axes[0].plot(range(1, EPOCHS + 1), history, color=colors[name], label=label)
    axes[1].plot(range(1, EPOCHS + 1), accuracies[name, seed], color=colors[name], label=label)
axes[0].set(xlabel="epoch", ylabel="negative ELBO", yscale="log")
axes[1].set(xlabel="epoch", ylabel="test accuracy (8 draws)")
axes[0].legend()
plt.show()"""),
    md("""
## Barriers

For the standard MLP, `match` aligns the second posterior to the first. For the asymmetric ones
there is nothing to align: `match` warns and returns the identity.
"""),
    code("""
import warnings

rows = []
for name in VARIANTS:
    (model, guide_a), (_, guide_b) = posteriors[name, 0], posteriors[name, 1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        aligned = ba.match(guide_a, guide_b).aligned
    if caught:
        print(f"{name}: {caught[0].message}")
    paths = {"naive": guide_b} if name != "standard" else {"naive": guide_b, "aligned": aligned}
    for path_name, other in paths.items():
        curve = ba.marginal_loss(model, ba.interpolate(guide_a, other), split.test,
                                 num_samples=SAMPLES)
        rows.append((name, path_name, curve))
for name, path_name, curve in rows:
    print(f"{name:17s} {path_name:8s} NLL barrier {curve.barrier('nll')}")"""),
    code("""
fig, ax = plt.subplots(figsize=(5, 3.4))
for name, path_name, curve in rows:
    curve.plot(["nll"], ax=[ax], label=f"{name} {path_name}",
               color="tab:purple" if path_name == "aligned" else colors[name])
plt.show()"""),
    md("""
In the full-budget run committed here (one pair per variant, width 128, 100 epochs on digits)
the standard MLP's naive barrier was 0.69 nats and 0.010 after alignment; the W-asymmetric
MLP's naive barrier 0.002, *below* the aligned standard one: linearly connected without any
alignment, as Lim et al. report for deterministic networks. The sigma-asymmetric one kept 0.49,
little below the standard naive barrier. All three reached 0.97-0.98 test accuracy. The
W-asymmetric ELBO is lower partly because that model has fewer latent weights (the fixed
entries carry no KL term), so compare ELBOs across variants with care. How strong the fixed
entries are matters: the builders use Lim et al.'s scales (1, and 1/4 in the output layer);
fixed entries of the free weights' size leave a clear barrier
(`benchmarks/study_asymmetric_scale.py`).

One pair is a demonstration, not a result: `studies/asymmetric.toml` runs the comparison over
MNIST-1D and digits, two widths and the 1-D ResNet-8, mean-field and low-rank guides and three
pairs per cell, and records the ELBO and test accuracy after every epoch. What to look at:
whether the asymmetric variants' *naive* barrier comes down to the order of the standard
network's *aligned* one (linear connectivity without alignment, as Lim et al. report for
deterministic networks), and whether they reach the standard network's accuracy in as many
epochs.
"""),
]


TRANSFORMERS = [
    md("""
# 9. Transformers: heads move as wholes

Inside an attention layer a permutation of all query/key dimensions at once is *not* a symmetry:
head `h` scores `q_h . k_h` over its own `d_head` dimensions only, so moving a dimension from one
head to another changes the function. The symmetries are a permutation of the residual stream,
per attention layer a permutation of the heads, within each head one permutation of the
query/key dimensions and another of the value dimensions, and the MLP's hidden units.
`spec_from_module` derives all of them from the graph, and `match` moves heads with a
hierarchical step: for every pair of heads the best within-head assignments, then one
assignment over heads on their values.

This notebook trains two small Bayesian transformers on MNIST-1D (the 40 values cut into 10
tokens of 4), aligns them, and compares the marginalized barrier naive, aligned, and aligned
with the heads kept in place (only within-head matching).
"""),
    code(BUDGET + """
import torch
import bnn_align as ba
from bnn_align import data, guides, models

DIM, HEADS, LAYERS = (16, 2, 1) if SMALL else (64, 4, 2)
EPOCHS = 1 if SMALL else 10
SAMPLES = 4 if SMALL else 32
split = data.mnist1d()
test = (split.x_test[:200], split.y_test[:200]) if SMALL else split.test
net = models.transformer(40, 10, dim=DIM, heads=HEADS, layers=LAYERS)
spec = ba.spec_from_module(net, torch.zeros(2, 40))
print(spec["blocks.0.attn.q.weight"], spec["blocks.0.attn.proj.weight"])
spec.heads"""),
    md("""
The query and key rows share one group, the value rows and the output projection's columns
another, and the residual stream (`P_embed`) runs through every layer. `spec.heads` declares
the two attention groups of each layer a *head set*: their permutations must map every head of
`d_head` units onto a whole head, the same one for both. `permute` checks it:
"""),
    code("""
sizes = spec.group_sizes({k: v.shape for k, v in net.state_dict().items()})
perms = {g: torch.arange(n) for g, n in sizes.items()}
qk, d = next(iter(next(iter(spec.heads.values())).items()))
perms[qk] = torch.roll(torch.arange(sizes[qk]), 1)  # shifts every unit into the next head
try:
    ba.permute(net, perms, spec)
except ValueError as err:
    print(err)
x = split.x_test[:64]
loose = ba.PermutationSpec(spec.axes_to_perm, blocks=spec.blocks)  # the heads forgotten
with torch.no_grad():
    change = (ba.permute(net, perms, loose)(x) - net(x)).abs().max() / net(x).abs().max()
print(f"a permutation that splits heads changes the logits by {float(change):.0%} of the largest")"""),
    md("""
## Two posteriors, three alignments
"""),
    code("""
posteriors = []
for seed in (0, 1):
    torch.manual_seed(seed)
    model = ba.BayesianNetwork(models.transformer(40, 10, dim=DIM, heads=HEADS, layers=LAYERS),
                               input_shape=(40,))
    guide = guides.mean_field(model)
    ba.fit(model, guide, split.train, epochs=EPOCHS, seed=seed, progress=False)
    posteriors.append(guide)
guide_a, guide_b = posteriors
aligned = ba.match(guide_a, guide_b)
within = ba.match(guide_a, guide_b, move_heads=False)
for name, result in (("heads moved", aligned), ("heads in place", within)):
    print(f"{name:15s} W2^2 {result.cost_before:.1f} -> {result.cost_after:.1f}")"""),
    code("""
curves = {}
for name, other in (("naive", guide_b), ("within heads only", within.aligned),
                    ("aligned", aligned.aligned)):
    curves[name] = ba.marginal_loss(model, ba.interpolate(guide_a, other), test,
                                    num_samples=SAMPLES)
    print(f"{name:18s} NLL barrier {curves[name].barrier('nll')}")"""),
    code("""
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
for (name, curve), color in zip(curves.items(), ("tab:red", "tab:orange", "tab:blue")):
    curve.plot(["nll", "accuracy"], ax=axes, label=name, color=color)
plt.show()"""),
    md("""
Matching within heads only pairs each head with whichever head of the other posterior shares
its index; the head step may pair it with any head. Which one lowers the barrier more on a given
pair is an empirical question (the script `studies/transformer.py` asks it over several pairs);
on two posteriors of one architecture both alignments keep the function of `guide_b` exactly.
Rotary position embeddings are not recognised (no permutation of their query/key dimensions
commutes with the rotation); see the specs guide for what is derived and what is refused.
"""),
]


NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_low_rank.ipynb": LOW_RANK,
    "03_diagnostics.ipynb": DIAGNOSTICS,
    "04_deterministic.ipynb": DETERMINISTIC,
    "05_curves.ipynb": CURVES,
    "06_asymmetric.ipynb": ASYMMETRIC,
    "07_symmetry_removal.ipynb": SYMMETRY_REMOVAL,
    "08_many_posteriors.ipynb": MANY,
    "09_transformers.ipynb": TRANSFORMERS,
}


def build(name: str) -> nbformat.NotebookNode:
    nb = new_notebook(cells=NOTEBOOKS[name])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def execute(nb: nbformat.NotebookNode, budget: str, timeout: int = 1800) -> None:
    """Run ``nb`` in place in a fresh kernel that sees ``BNN_ALIGN_TUTORIAL_BUDGET=budget``
    (this process's environment is restored afterwards)."""
    from nbclient import NotebookClient

    previous = os.environ.get("BNN_ALIGN_TUTORIAL_BUDGET")
    os.environ["BNN_ALIGN_TUTORIAL_BUDGET"] = budget  # the kernel inherits it
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(HERE)}}).execute()
    finally:
        if previous is None:
            del os.environ["BNN_ALIGN_TUTORIAL_BUDGET"]
        else:
            os.environ["BNN_ALIGN_TUTORIAL_BUDGET"] = previous


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--execute", action="store_true", help="run with the full budget")
    parser.add_argument("names", nargs="*", default=list(NOTEBOOKS))
    args = parser.parse_args()
    for name in args.names:
        nb = build(name)
        if args.execute:
            execute(nb, "full")
        nbformat.write(nb, HERE / name)
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
