"""BayesianNetwork, priors, likelihoods, guides and the Gaussian view of every guide kind."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import autoguide

import bnn_align as ba
from bnn_align import (BayesianNetwork, FanInPrior, Gaussian, as_gaussian, fit,
                       guides, models)

from conftest import GUIDE_KINDS, make_guide


def trace(model, *args, **kwargs):
    return poutine.trace(model).get_trace(*args, **kwargs)


def test_sites_are_the_parameter_names_in_execution_order():
    net = models.resnet(8, width=1, dim=1, in_channels=1, base_channels=4)
    model = BayesianNetwork(net, input_shape=(1, 10))
    names = [n for n, _ in net.named_parameters()]
    assert list(model.sites) == names
    tr = trace(model)
    latent = [n for n, s in tr.nodes.items() if s["type"] == "sample" and not s["is_observed"]]
    assert latent == names
    for name, p in net.named_parameters():
        assert tr.nodes[name]["value"].shape == p.shape
        assert tr.nodes[name]["fn"].event_shape == p.shape


def test_the_network_is_copied_and_never_modified():
    net = models.mlp(3, [4], 2).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    model = BayesianNetwork(net)
    model(torch.randn(5, 3), torch.randint(0, 2, (5,)))
    assert net.training and model.net is not net
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_priors():
    net = models.mlp(9, [4], 2)
    tr = trace(BayesianNetwork(net, prior=0.3))
    assert tr.nodes["0.weight"]["fn"].base_dist.scale.unique().item() == pytest.approx(0.3)
    tr = trace(BayesianNetwork(net, prior=FanInPrior(gain=2.0, bias_scale=0.5)))
    assert tr.nodes["0.weight"]["fn"].base_dist.scale.unique().item() == pytest.approx(2 / 3)
    assert tr.nodes["2.weight"]["fn"].base_dist.scale.unique().item() == pytest.approx(1.0)
    assert tr.nodes["0.bias"]["fn"].base_dist.scale.unique().item() == pytest.approx(0.5)

    def laplace(name, tensor):
        return dist.Laplace(torch.zeros_like(tensor), 0.1)

    tr = trace(BayesianNetwork(net, prior=laplace))
    assert isinstance(tr.nodes["0.weight"]["fn"].base_dist, dist.Laplace)
    for bad in (-1.0, 0.0, float("nan")):
        with pytest.raises(ValueError, match="prior scale"):
            BayesianNetwork(net, prior=bad)
    with pytest.raises(TypeError, match="prior must be"):
        BayesianNetwork(net, prior="wide")


def test_minibatch_likelihood_is_scaled_to_the_dataset():
    model = BayesianNetwork(models.mlp(3, [4], 2))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    tr = trace(model, x, y, num_data=100)
    tr.compute_log_prob()
    obs = tr.nodes["obs"]
    unscaled = obs["fn"].log_prob(y).sum()
    assert obs["scale"] == pytest.approx(100 / 8)
    torch.testing.assert_close(obs["log_prob_sum"], unscaled * 100 / 8)
    with pytest.raises(ValueError, match="num_data=4 is smaller"):
        model(x, y, num_data=4)


def test_predictions_without_labels():
    model = BayesianNetwork(models.mlp(3, [4], 5))
    x = torch.randn(6, 3)
    tr = trace(model, x)
    out = tr.nodes["_RETURN"]["value"]
    assert out.shape == (6, 5)
    assert not tr.nodes["obs"]["is_observed"]
    assert tr.nodes["obs"]["value"].shape == (6,)
    assert model() is None  # weights only


def test_gaussian_likelihoods():
    net = models.mlp(3, [4], 2)
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    fixed = BayesianNetwork(net, likelihood=Gaussian(0.5))
    tr = trace(fixed, x, y)
    assert tr.nodes["obs"]["fn"].base_dist.scale.unique().item() == pytest.approx(0.5)
    learned = BayesianNetwork(net, likelihood=Gaussian("learned"))
    assert learned.sites[-1] == "obs_noise"
    tr = trace(learned, x, y)
    assert tr.nodes["obs_noise"]["value"] > 0
    guide = guides.mean_field(learned)
    view = as_gaussian(guide)
    assert "obs_noise" in view.sites  # the noise is a latent like the weights
    with pytest.raises(ValueError, match="noise must be"):
        Gaussian(-1.0)
    with pytest.raises(ValueError, match="shape"):
        fixed(x, torch.randn(6))
    with pytest.raises(TypeError, match="floating"):
        fixed(x, torch.ones(6, 2, dtype=torch.long))


def test_bad_data_gives_clear_errors():
    model = BayesianNetwork(models.mlp(3, [4], 5), input_shape=(3,))
    with pytest.raises(ValueError, match=r"input x of shape \(2, 7\) does not fit .*\(-1, 3\)"):
        model(torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"labels y must lie in \[0, 4\]"):
        model(torch.randn(2, 3), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"labels y must lie in"):
        model(torch.randn(2, 3), torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="integer"):
        model(torch.randn(2, 3), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="expected y of shape"):
        model(torch.randn(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="y was given without x"):
        model(None, torch.tensor([0]))
    with pytest.raises(TypeError, match="nn.Module"):
        BayesianNetwork(lambda x: x)
    with pytest.raises(ValueError, match="likelihood must be"):
        BayesianNetwork(models.mlp(3, [4], 5), likelihood="poisson")
    with pytest.raises(ValueError, match="input shape"):
        BayesianNetwork(models.mlp(3, [4], 5)).spec


def test_non_finite_data_is_refused_before_training_and_evaluation():
    model = BayesianNetwork(models.mlp(3, [4], 5), input_shape=(3,))
    guide = guides.mean_field(model)
    x, y = torch.randn(16, 3), torch.randint(0, 5, (16,))
    x[3, 1] = float("nan")
    x[7, 0] = float("inf")
    before = {k: v.detach().clone() for k, v in guide.named_parameters()}
    with pytest.raises(ValueError, match="data's inputs hold 2 NaN or infinite values"):
        fit(model, guide, (x, y), epochs=1, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in guide.named_parameters())
    with pytest.raises(ValueError, match="data's inputs hold 2 NaN"):
        ba.marginal_loss(model, guide, (x, y), num_samples=2)


def test_input_shape_is_remembered_for_the_spec():
    model = BayesianNetwork(models.cnn1d(1, 12, 3, channels=(4,), hidden=(5,)))
    model(torch.randn(2, 1, 12))
    assert model.input_shape == (1, 12)
    assert model.spec.block("4.weight", 1) == 6


# ---------------------------------------------------------------------------- guide helpers --
@pytest.mark.parametrize("kind", GUIDE_KINDS)
def test_guides_start_at_the_network_weights(kind, small_mlp_model):
    guide = {"mean_field": guides.mean_field, "diagonal": guides.diagonal,
             "low_rank": guides.low_rank, "full_rank": guides.full_rank,
             "delta": guides.delta}[kind](small_mlp_model)
    view = as_gaussian(guide)
    for name, p in small_mlp_model.net.named_parameters():
        torch.testing.assert_close(view.loc[name], p.detach())
    assert pyro.get_param_store().keys() == set()  # set up without touching the global store


def test_guide_helpers_reject_bad_arguments(small_mlp_model):
    with pytest.raises(ValueError, match="init_scale"):
        guides.mean_field(small_mlp_model, init_scale=0.0)
    with pytest.raises(ValueError, match="rank"):
        guides.low_rank(small_mlp_model, rank=0)
    with pytest.raises(TypeError, match="BayesianNetwork"):
        guides.mean_field(lambda: None)


# ----------------------------------------------------------------------------- Gaussian view --
@pytest.mark.parametrize("kind", ["diagonal", "low_rank", "full_rank"])
def test_packed_view_maps_sites_to_the_exact_flat_indices(kind, small_mlp_model):
    guide = make_guide(kind, small_mlp_model)
    d = guide.latent_dim
    with torch.no_grad():
        guide.loc.copy_(torch.arange(d, dtype=torch.float32))
    view = as_gaussian(guide)
    # Pyro's own unpacking of the latent vector is the ground truth
    for site, value in guide._unpack_latent(guide.loc.detach()):
        torch.testing.assert_close(view.loc[site["name"]], value)
    loc, scale, factor = view.flat()
    torch.testing.assert_close(loc, guide.loc.detach())
    posterior = guide.get_posterior()
    if kind == "diagonal":
        cov = torch.diag(posterior.variance.detach())
    else:
        cov = posterior.covariance_matrix.detach()
    if kind == "diagonal":
        torch.testing.assert_close(scale, guide.scale.detach())
        assert factor is None
    else:
        torch.testing.assert_close(torch.diag(scale ** 2) + factor @ factor.T, cov,
                                   rtol=1e-5, atol=1e-8)
    marginal = torch.cat([v.reshape(-1) for v in view.stddev().values()])
    torch.testing.assert_close(marginal, cov.diagonal().sqrt(), rtol=1e-5, atol=1e-8)


def test_mean_field_and_delta_views(small_mlp_model):
    guide = make_guide("mean_field", small_mlp_model)
    view = as_gaussian(guide)
    for name in small_mlp_model.sites:
        torch.testing.assert_close(view.loc[name], guide.locs.__getattr__(name).detach()
                                   if "." not in name else _get(guide.locs, name))
        torch.testing.assert_close(view.scale[name], _get(guide.scales, name))
    delta = make_guide("delta", small_mlp_model)
    dview = as_gaussian(delta)
    assert dview.kind == "point"
    assert all((v == 0).all() for v in dview.scale.values())
    sd = small_mlp_model.net.state_dict()
    sview = as_gaussian(sd)
    assert sview.sites == list(sd)


def _get(module, dotted):
    for part in dotted.split("."):
        module = getattr(module, part)
    return module.detach()


def test_view_samples_have_the_right_moments(small_mlp_model):
    guide = make_guide("low_rank", small_mlp_model)
    view = as_gaussian(guide)
    draws = view.sample(20000, torch.Generator().manual_seed(0))
    flat = torch.cat([v.reshape(len(v), -1) for v in draws.values()], dim=1)
    loc, _, _ = view.flat()
    sd = torch.cat([v.reshape(-1) for v in view.stddev().values()])
    assert ((flat.mean(0) - loc).abs() / sd).max() < 0.05
    assert ((flat.std(0) / sd) - 1).abs().max() < 0.05


def test_view_is_a_copy(small_mlp_model):
    guide = make_guide("mean_field", small_mlp_model)
    view = as_gaussian(guide)
    view.loc["0.weight"].add_(1.0)
    assert not torch.equal(as_gaussian(guide).loc["0.weight"], view.loc["0.weight"])


@pytest.mark.parametrize("cls", [autoguide.AutoNormal, autoguide.AutoDelta,
                                 autoguide.AutoDiagonalNormal,
                                 autoguide.AutoLowRankMultivariateNormal,
                                 autoguide.AutoMultivariateNormal])
def test_uninitialised_guide_is_reported(small_mlp_model, cls):
    # a guide straight from Pyro has no parameters until its first call; the packed kinds
    # have no ``loc`` attribute then, which used to surface as a raw AttributeError
    fresh, trained = cls(small_mlp_model), cls(small_mlp_model)
    trained()
    for call in (lambda: as_gaussian(fresh), lambda: ba.match(trained, fresh),
                 lambda: ba.match(fresh, trained), lambda: ba.interpolate(fresh, trained)):
        with pytest.raises(ValueError, match=r"has no parameters yet.*guide\(x, y\)"):
            call()


# ------------------------------------------------------------------------------------- fit --
def test_fit_validates_its_input(small_mlp_model):
    guide = guides.mean_field(small_mlp_model)
    x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    with pytest.raises(TypeError, match="pair of tensors"):
        fit(small_mlp_model, guide, x)
    with pytest.raises(ValueError, match="10 inputs but 9 targets"):
        fit(small_mlp_model, guide, (x, y[:9]))
    with pytest.raises(ValueError, match="epochs"):
        fit(small_mlp_model, guide, (x, y), epochs=0)


def test_fit_is_reproducible_and_leaves_the_global_rng_alone(small_mlp_model):
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    results = []
    for _ in range(2):
        guide = guides.mean_field(small_mlp_model)
        torch.manual_seed(123)
        history = fit(small_mlp_model, guide, (x, y), epochs=3, batch_size=16, seed=7,
                      progress=False)
        results.append((history, as_gaussian(guide).loc["0.weight"]))
        assert torch.rand(1).item() == pytest.approx(torch.manual_seed(123) and
                                                     torch.rand(1).item())
    assert (results[0][0] == results[1][0]).all()
    assert torch.equal(results[0][1], results[1][1])


def test_two_guides_of_one_class_train_independently(small_mlp_model):
    """Pyro's global param store would make two AutoNormals share parameters; fit scopes it."""
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    a, b = guides.mean_field(small_mlp_model), guides.mean_field(small_mlp_model)
    fit(small_mlp_model, a, (x, y), epochs=2, seed=1, progress=False)
    b_before = as_gaussian(b).loc["0.weight"].clone()
    assert torch.equal(as_gaussian(b).loc["0.weight"], b_before)
    fit(small_mlp_model, b, (x, y), epochs=2, seed=2, progress=False)
    assert not torch.equal(as_gaussian(a).loc["0.weight"], as_gaussian(b).loc["0.weight"])


def test_kl_weight_schedule_is_applied():
    model = BayesianNetwork(models.mlp(2, [3], 2))
    x, y = torch.randn(32, 2), torch.randint(0, 2, (32,))
    seen = []

    def schedule(epoch):
        seen.append(epoch)
        return min(1.0, 0.1 * (epoch + 1))

    history = fit(model, guides.mean_field(model), (x, y), epochs=3, kl_weight=schedule,
                  progress=False)
    assert seen == [0, 1, 2] and history.shape == (3,)
    # a vanishing KL weight leaves only the likelihood term: a much smaller loss
    tempered = fit(model, guides.mean_field(model), (x, y), epochs=1, kl_weight=1e-6,
                   progress=False)
    full = fit(model, guides.mean_field(model), (x, y), epochs=1, progress=False)
    assert tempered[0] < full[0]


@pytest.mark.slow
def test_svi_on_mnist1d_beats_chance_clearly():
    from bnn_align.data import mnist1d

    data = mnist1d()
    model = BayesianNetwork(models.mlp(40, [64, 64], 10))
    guide = guides.mean_field(model)
    history = fit(model, guide, data.train, epochs=10, seed=0, progress=False)
    assert history[-1] < history[0]
    draws = as_gaussian(guide).sample(32, torch.Generator().manual_seed(0))
    x, y = data.test
    with torch.no_grad():
        probs = torch.stack([
            torch.softmax(model.evaluate({k: v[s] for k, v in draws.items()}, x), -1)
            for s in range(32)
        ]).mean(0)
    accuracy = (probs.argmax(-1) == y).float().mean().item()
    nll = -probs[torch.arange(len(y)), y].log().mean().item()
    # chance is 0.10 accuracy and log(10) = 2.30 nats; this budget gives about 0.55 and 1.15
    assert accuracy > 0.45
    assert nll < 0.75 * math.log(10)


def test_fit_shows_a_progress_bar_that_can_be_silenced(small_mlp_model, capfd):
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    fit(small_mlp_model, guides.mean_field(small_mlp_model), (x, y), epochs=2, progress=True)
    shown = capfd.readouterr().err
    assert "epoch" in shown.lower() or "it/s" in shown or "2/2" in shown
    fit(small_mlp_model, guides.mean_field(small_mlp_model), (x, y), epochs=2, progress=False)
    assert capfd.readouterr().err == ""


def test_fit_trains_small_networks_on_one_thread_and_restores_the_setting(monkeypatch,
                                                                          small_mlp_model):
    """A busy neighbour process slows a two-thread SVI step of a small network several times;
    fit runs those on one thread, large ones on torch's count, ``num_threads`` overrides."""
    import bnn_align._threads as _threads
    import bnn_align.bayesian as bayesian

    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    seen = []

    def recording_loss(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_loss(self, *args, **kwargs)

    real_loss = bayesian.Trace_ELBO.differentiable_loss
    monkeypatch.setattr(bayesian.Trace_ELBO, "differentiable_loss", recording_loss)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = {}
        for label, kwargs in (("default", {}), ("given", {"num_threads": 2})):
            seen.clear()
            runs[label] = fit(small_mlp_model, guides.mean_field(small_mlp_model), (x, y),
                              epochs=2, batch_size=6, progress=False, **kwargs)
            assert set(seen) == {1 if label == "default" else 2}
        monkeypatch.setattr(_threads, "THREADED_WORK", 1)  # every network is "large"
        seen.clear()
        fit(small_mlp_model, guides.mean_field(small_mlp_model), (x, y), epochs=1,
            progress=False)
        assert set(seen) == {2} and torch.get_num_threads() == 2
        assert runs["default"] == pytest.approx(runs["given"], rel=1e-5)
        with pytest.raises(ValueError, match="num_threads must be a positive integer"):
            fit(small_mlp_model, guides.mean_field(small_mlp_model), (x, y), num_threads=0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
