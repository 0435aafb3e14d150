"""fit_curve / Curve: the untrained curve is the linear path, training lowers the barrier,
guides of the endpoints' kind, save/load, BatchNorm statistics, the plane plot, the ELBO,
bad input."""

from __future__ import annotations

import copy

import matplotlib
import numpy as np
import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch import nn

from bnn_align import (BayesianNetwork, Curve, as_gaussian, fit, fit_curve, guides,
                       interpolate, marginal_loss, models, to_inference_data)
from bnn_align._elbo import PriorTerms, negative_elbo, prior_terms

from conftest import make_guide

matplotlib.use("Agg")

ENDPOINTS = ["mean_field", "diagonal", "low_rank", "delta", "state_dict"]


def small_model() -> BayesianNetwork:
    return BayesianNetwork(models.mlp(4, [6, 5], 3), input_shape=(4,))


def small_data(n: int = 48, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def endpoints(kind: str, model: BayesianNetwork):
    if kind == "state_dict":
        nets = [models.mlp(4, [6, 5], 3) for _ in range(2)]
        return nets[0].state_dict(), nets[1].state_dict()
    return (make_guide(kind, model, seed=1, spread=0.3),
            make_guide(kind, model, seed=2, spread=0.3))


def assert_views_equal(a, b, exact: bool = True):
    check = (lambda u, v: torch.equal(u, v)) if exact else (
        lambda u, v: torch.allclose(u, v, rtol=1e-5, atol=1e-6))
    for part in ("loc", "scale", "factor"):
        pa, pb = getattr(a, part), getattr(b, part)
        assert (pa is None) == (pb is None), part
        for site in (pa or {}):
            assert check(pa[site], pb[site]), (part, site)


# ----------------------------------------------------------------------------- the path --
@pytest.mark.parametrize("kind", ENDPOINTS)
@pytest.mark.parametrize("shape", [("bezier", 1), ("bezier", 3), ("polychain", 2)])
def test_the_untrained_curve_is_the_linear_path(kind, shape):
    model = small_model()
    q0, q1 = endpoints(kind, model)
    x, y = small_data()
    curve = fit_curve(model, q0, q1, (x, y), kind=shape[0], bends=shape[1], epochs=0)
    line = interpolate(q0, q1)
    on_curve = marginal_loss(model, curve, (x, y), ts=7, num_samples=8, seed=3)
    on_line = marginal_loss(model, line, (x, y), ts=7, num_samples=8, seed=3)
    assert on_curve.kind == shape[0]
    for metric in ("nll", "accuracy", "brier"):
        np.testing.assert_allclose(on_curve.values[metric], on_line.values[metric],
                                   rtol=1e-5, atol=1e-6)
    assert_views_equal(curve.view_at(0.37), line.view_at(0.37), exact=False)


@pytest.mark.parametrize("kind", ENDPOINTS)
def test_the_curve_is_made_of_posteriors_of_the_endpoints_kind(kind):
    model = small_model()
    q0, q1 = endpoints(kind, model)
    curve = fit_curve(model, q0, q1, small_data(), epochs=2, batch_size=16, lr=0.05,
                      progress=False)
    assert not torch.allclose(curve.bends[0].loc["0.weight"],  # the bend moved off the line
                              interpolate(q0, q1).view_at(0.5).loc["0.weight"], atol=1e-3)
    assert curve.at(0.0) is q0 and curve.at(1.0) is q1
    assert_views_equal(curve.view_at(0.0), curve.view0)  # exactly the endpoints
    assert_views_equal(curve.view_at(1.0), curve.view1)
    middle = curve.at(0.3)
    assert type(middle) is type(q0)
    assert_views_equal(as_gaussian(middle), curve.view_at(0.3), exact=False)
    if kind == "low_rank":
        assert middle.cov_factor.shape == q0.cov_factor.shape
    if kind == "mean_field":  # ArviZ takes points of a curve like any posterior
        idata = to_inference_data([middle, curve.at(1.0)], num_samples=4, sites=["0.weight"])
        assert idata.posterior["0.weight"].shape == (2, 4, 6, 4)
    # the path protocol: draws at many t with common random numbers
    draws = curve.sample([0.0, 0.3, 1.0], 5, torch.Generator().manual_seed(0))
    assert draws["0.weight"].shape == (3, 5, 6, 4)
    noise = curve.noise(5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(draws["0.weight"][1], curve.draw(0.3, noise)["0.weight"])


def test_polychain_passes_through_its_bends_and_bezier_coefficients_sum_to_one():
    model = small_model()
    q0, q1 = endpoints("mean_field", model)
    chain = fit_curve(model, q0, q1, small_data(), kind="polychain", bends=2, epochs=1,
                      batch_size=16, lr=0.05, progress=False)
    assert_views_equal(chain.view_at(1 / 3), chain.bends[0], exact=False)
    assert_views_equal(chain.view_at(2 / 3), chain.bends[1], exact=False)
    bezier = fit_curve(model, q0, q1, small_data(), bends=3, epochs=0)
    for t in (0.0, 0.2, 0.5, 0.9, 1.0):
        weights = bezier.coefficients(t)
        assert len(weights) == 5 and min(weights) >= 0 and sum(weights) == pytest.approx(1)


@pytest.mark.slow
def test_a_trained_curve_has_a_lower_barrier_than_the_linear_path():
    from bnn_align.data import mnist1d

    split = mnist1d().subset(num_train=2000, num_test=500)
    posteriors = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = BayesianNetwork(models.mlp(40, [32, 32], 10), input_shape=(40,))
        guide = guides.mean_field(model)
        fit(model, guide, split.train, epochs=4, seed=seed, progress=False)
        posteriors.append(guide)
    curve = fit_curve(model, *posteriors, split.train, epochs=3, progress=False)
    assert len(curve.history) == 3 and curve.history[-1] < curve.history[0]
    barriers = [marginal_loss(model, path, split.test, num_samples=32).barrier("nll")
                for path in (interpolate(*posteriors), curve)]
    linear, learned = barriers
    assert learned.value + 3 * np.hypot(linear.se, learned.se) < linear.value, barriers


# -------------------------------------------------------------------------- the objective --
def test_negative_elbo_is_the_objective_of_fit():
    """Its expectation is Pyro's Trace_ELBO loss (what fit minimises); the analytic KL equals
    the Monte-Carlo one; for a point estimate it is the exact negative log joint."""
    model = small_model()
    x, y = small_data(32)
    num_data = 200
    for kind in ("mean_field", "low_rank"):
        guide = make_guide(kind, model, seed=4, spread=0.3)
        view = as_gaussian(guide)
        with pyro.get_param_store().scope():
            losses = np.array([Trace_ELBO().loss(model, guide, x, y, num_data=num_data)
                               for _ in range(200)])
        gen = torch.Generator().manual_seed(0)
        analytic, monte_carlo = [], []
        prior = prior_terms(model)
        forced = PriorTerms(prior.dists, None, None)  # the Monte-Carlo branch, same prior
        for _ in range(10):
            noise = view.standard_normal(500, gen)
            analytic.append(negative_elbo(model, view, x, y, noise, num_data=num_data).item())
            monte_carlo.append(negative_elbo(model, view, x, y, noise, num_data=num_data,
                                             prior=forced).item())
        pyro_se = losses.std(ddof=1) / np.sqrt(len(losses))
        assert abs(np.mean(analytic) - losses.mean()) < 4 * pyro_se, kind
        difference = np.array(monte_carlo) - np.array(analytic)  # the KL estimates only
        assert abs(difference.mean()) < 4 * difference.std(ddof=1) / np.sqrt(10) + 1e-3, kind
    point = guides.delta(model)
    with pyro.get_param_store().scope():
        exact = Trace_ELBO().differentiable_loss(model, point, x, y, num_data=num_data)
    view = as_gaussian(point)
    ours = negative_elbo(model, view, x, y, view.standard_normal(1), num_data=num_data)
    assert ours.item() == pytest.approx(exact.item(), rel=1e-5)


# ----------------------------------------------------------------------------- saving --
@pytest.mark.parametrize("kind", ["mean_field", "low_rank", "state_dict"])
def test_save_and_load_round_trip_exactly(kind, tmp_path):
    model = small_model()
    q0, q1 = endpoints(kind, model)
    x, y = small_data()
    curve = fit_curve(model, q0, q1, (x, y), kind="polychain", bends=2, epochs=2,
                      batch_size=16, lr=0.05, progress=False)
    curve.save(tmp_path / "curve.pt")
    loaded = Curve.load(tmp_path / "curve.pt", model=small_model())
    assert (loaded.kind, loaded.num_bends, loaded.family) == ("polychain", 2, curve.family)
    np.testing.assert_array_equal(loaded.history, curve.history)
    for t in (0.0, 0.2, 0.5, 1.0):
        assert_views_equal(loaded.view_at(t), curve.view_at(t))
    for mine, theirs in zip(curve.bends, loaded.bends):
        assert_views_equal(mine, theirs)
    assert type(loaded.at(0.0)) is type(q0)
    a = marginal_loss(model, curve, (x, y), ts=5, num_samples=6)
    b = marginal_loss(model, loaded, (x, y), ts=5, num_samples=6)
    np.testing.assert_array_equal(a.values["nll"], b.values["nll"])


def test_load_refuses_foreign_files_and_other_networks(tmp_path):
    model = small_model()
    q0, q1 = endpoints("mean_field", model)
    curve = fit_curve(model, q0, q1, small_data(), epochs=0)
    curve.save(tmp_path / "curve.pt")
    other = BayesianNetwork(models.mlp(4, [7, 5], 3), input_shape=(4,))
    with pytest.raises(ValueError, match="do not fit model: site '0.weight'"):
        Curve.load(tmp_path / "curve.pt", model=other)
    (tmp_path / "junk.pt").write_text("not a curve")
    with pytest.raises(ValueError, match="is not a saved bnn_align Curve"):
        Curve.load(tmp_path / "junk.pt", model=model)
    torch.save({"format": "something else"}, tmp_path / "dict.pt")
    with pytest.raises(ValueError, match="does not hold a saved bnn_align Curve"):
        Curve.load(tmp_path / "dict.pt", model=model)


# -------------------------------------------------------------------------- BatchNorm --
def batchnorm_model() -> BayesianNetwork:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    return BayesianNetwork(net, input_shape=(4,))


@pytest.mark.parametrize("kind", ["mean_field", "state_dict"])
def test_batchnorm_statistics_are_recomputed_at_every_t(kind):
    model = batchnorm_model()
    x, y = small_data(50)
    if kind == "state_dict":
        nets = [copy.deepcopy(model.net) for _ in range(2)]
        for net in nets:
            for p in net.parameters():
                p.data.normal_()
        q0, q1 = (net.state_dict() for net in nets)
    else:
        q0, q1 = (make_guide(kind, model, seed=s, spread=0.3) for s in (1, 2))
    curve = fit_curve(model, q0, q1, (x, y), epochs=1, batch_size=16, num_samples=2,
                      progress=False)
    t = 0.4
    view = curve.view_at(t)
    # by hand: a cumulative average over minibatches, each through a new draw of q_t
    net = copy.deepcopy(model.net).train()
    net[1].reset_running_stats()
    net[1].momentum = None
    gen = torch.Generator().manual_seed(curve.seed)
    with torch.no_grad():
        for batch in x.split(16):  # the last has 2 of the 50 examples: enough for statistics
            draw = view.transform(view.standard_normal(1, gen))
            torch.func.functional_call(net, {k: v[0] for k, v in draw.items()
                                             if k in model.weight_sites}, (batch,))
    buffers = curve.buffers_at(t)
    for name in ("1.running_mean", "1.running_var"):
        torch.testing.assert_close(buffers[name], net.state_dict()[name])
    assert not torch.allclose(buffers["1.running_var"], torch.ones(8))
    # the posterior at t carries them, and evaluates as the curve does at t
    along = marginal_loss(model, curve, (x, y), ts=[0.0, t], num_samples=4).values["nll"]
    alone = marginal_loss(model, curve.at(t), (x, y), num_samples=4).values["nll"]
    assert alone[0] == pytest.approx(along[1], rel=1e-6)
    # without recomputation the endpoints' statistics move linearly, as on the line
    kept = fit_curve(model, q0, q1, (x, y), epochs=0, recompute_bn=False)
    line = interpolate(q0, q1)
    np.testing.assert_allclose(
        marginal_loss(model, kept, (x, y), ts=5, num_samples=4).values["nll"],
        marginal_loss(model, line, (x, y), ts=5, num_samples=4).values["nll"], rtol=1e-5)


# ------------------------------------------------------------------------------ plane --
def test_plot_plane_draws_the_plane_through_the_endpoints_and_the_bend():
    model = small_model()
    q0, q1 = endpoints("mean_field", model)
    x, y = small_data()
    curve = fit_curve(model, q0, q1, (x, y), epochs=2, batch_size=16, lr=0.05,
                      progress=False)
    plane = curve._plane()
    length, (bend_u, bend_v) = plane["length"], plane["bend"]
    for (a, b), expected in (((0.0, 0.0), curve.view0), ((length, 0.0), curve.view1),
                             ((bend_u, bend_v), curve.bends[0])):
        got = curve._plane_view(curve._plane_weights(plane, a, b))
        assert_views_equal(got, expected, exact=False)
    # a one-bend Bezier curve lies in the plane: every part of q_t, not only the means
    for t, (a, b) in zip((0.3, 0.8), curve._project(plane, np.array([0.3, 0.8]))):
        got = curve._plane_view(curve._plane_weights(plane, a * length, b * length))
        assert_views_equal(got, curve.view_at(t), exact=False)
    fig = curve.plot_plane(model, (x, y), grid=5, num_samples=4)
    ax = fig.axes[0]
    assert ax.collections, "the filled contours"
    assert {line.get_label() for line in ax.lines} >= {"linear path", "bezier curve"}
    untrained = fit_curve(model, q0, q1, (x, y), epochs=0)
    with pytest.raises(ValueError, match="lies on the line"):
        untrained.plot_plane(model, (x, y))


# ------------------------------------------------------------------------- bad input --
def test_seeded_leaves_the_global_rng_and_the_endpoints_alone():
    model = small_model()
    q0, q1 = endpoints("mean_field", model)
    before = copy.deepcopy(as_gaussian(q0))
    torch.manual_seed(5)
    first = fit_curve(model, q0, q1, small_data(), epochs=1, batch_size=16, seed=2,
                      progress=False)
    after_rng = torch.rand(3)
    torch.manual_seed(5)
    second = fit_curve(model, q0, q1, small_data(), epochs=1, batch_size=16, seed=2,
                       progress=False)
    assert torch.equal(torch.rand(3), after_rng)
    assert_views_equal(first.bends[0], second.bends[0])
    assert_views_equal(as_gaussian(q0), before)
    # a callback after every epoch may evaluate the curve without changing its training
    seen = []

    def record(epochs_done, curve):
        nll = marginal_loss(model, curve, small_data(), ts=3, num_samples=4).values["nll"]
        seen.append((epochs_done, len(curve.history), nll[1]))

    third = fit_curve(model, q0, q1, small_data(), epochs=2, batch_size=16, seed=2,
                      progress=False, callback=record)
    assert [s[:2] for s in seen] == [(1, 1), (2, 2)] and seen[0][2] != seen[1][2]
    fourth = fit_curve(model, q0, q1, small_data(), epochs=2, batch_size=16, seed=2,
                       progress=False)
    assert_views_equal(third.bends[0], fourth.bends[0])


def test_bad_input_gives_clear_errors():
    model = small_model()
    q0, q1 = endpoints("mean_field", model)
    data = small_data()
    other = make_guide("mean_field", BayesianNetwork(models.mlp(4, [7, 5], 3),
                                                     input_shape=(4,)), seed=3)
    with pytest.raises(ValueError, match="different architectures"):
        fit_curve(model, q0, other, data)
    with pytest.raises(ValueError, match="bends must be a positive integer, got 0"):
        fit_curve(model, q0, q1, data, bends=0)
    with pytest.raises(ValueError, match="kind must be one of"):
        fit_curve(model, q0, q1, data, kind="spline")
    with pytest.raises(ValueError, match="of one family.*q0 is a diagonal.*q1 a point"):
        fit_curve(model, q0, guides.delta(model), data)
    with pytest.raises(ValueError, match="of one family"):
        fit_curve(model, q0, make_guide("low_rank", model), data)
    with pytest.raises(ValueError, match="one rank: q0 has rank 3, q1 rank 2"):
        fit_curve(model, make_guide("low_rank", model), guides.low_rank(model, rank=2), data)
    with pytest.raises(ValueError, match="full-rank"):
        fit_curve(model, make_guide("full_rank", model), make_guide("full_rank", model), data)
    with pytest.raises(TypeError, match="BayesianNetwork"):
        fit_curve(model.net, q0, q1, data)
    with pytest.raises(ValueError, match="site '0.weight' has shape"):
        fit_curve(BayesianNetwork(models.mlp(4, [7, 5], 3), input_shape=(4,)), q0, q1, data)
    with pytest.raises(ValueError, match="epochs must be an integer >= 0"):
        fit_curve(model, q0, q1, data, epochs=-1)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        fit_curve(model, q0, q1, data, lr=0)
    with pytest.raises(ValueError, match=r"labels y must lie in \[0, 2\]"):
        fit_curve(model, q0, q1, (data[0], torch.cat([data[1][:-1], torch.tensor([3])])))
    with pytest.raises(ValueError, match="lr_end must be a positive number"):
        fit_curve(model, q0, q1, data, lr_end=-1.0)
    with pytest.raises(ValueError, match="learned observation noise"):
        noisy = BayesianNetwork(models.mlp(4, [6, 5], 3), likelihood=_learned_noise(),
                                input_shape=(4,))
        fit_curve(noisy, guides.mean_field(noisy), guides.mean_field(noisy),
                  (data[0], torch.randn(len(data[0]), 3)))
    curve = fit_curve(model, q0, q1, data, epochs=0)
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match="t must lie in"):
            curve.view_at(bad)
        with pytest.raises(ValueError, match="t must lie in"):
            curve.at(bad)
    with pytest.raises(ValueError, match="t must lie in"):
        curve.sample([0.0, 2.0], 3)
    with pytest.raises(ValueError, match="every t must lie in"):
        marginal_loss(model, curve, data, ts=[0.0, 1.2])


def _learned_noise():
    from bnn_align import Gaussian

    return Gaussian("learned")


def test_a_state_dict_taken_during_training_is_a_snapshot():
    """What a study stores after each checkpoint epoch: later epochs do not change it, and the
    curve it rebuilds is the curve of that epoch."""
    model = small_model()
    q0, q1 = endpoints("mean_field", model)
    snapshots, views = {}, {}

    def record(epoch, curve):
        snapshots[epoch] = curve.state_dict()
        views[epoch] = copy.deepcopy(curve.view_at(0.5))

    fit_curve(model, q0, q1, small_data(), epochs=2, batch_size=16, seed=2, progress=False,
              callback=record)
    for epoch in (1, 2):
        rebuilt = Curve.from_state_dict(snapshots[epoch], model=model)
        assert len(rebuilt.history) == epoch
        assert_views_equal(rebuilt.view_at(0.5), views[epoch])
    assert not torch.equal(snapshots[1]["bends"]["loc"], snapshots[2]["bends"]["loc"])
