"""SamplePosterior: constructors, permute (shared and per sample), the sample path's optimal
coupling, marginal_loss and to_inference_data on sample sets, and bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import pyro
import torch
from pyro.infer import MCMC, NUTS

from bnn_align import (BayesianNetwork, SamplePosterior, interpolate, marginal_loss, models,
                       permute, to_inference_data)
from bnn_align.paths import SamplePath
from bnn_align.symmetry.permutation import random_perms

from conftest import group_sizes


def ensemble(model, count, seed=0):
    torch.manual_seed(seed)
    nets = [models.mlp(5, [7, 6], 3) for _ in range(count)]
    return nets, SamplePosterior.from_modules(nets, model=model)


def test_from_modules_and_state_dicts(small_mlp_model):
    nets, samples = ensemble(small_mlp_model, 3)
    assert samples.num_samples == 3 and samples.num_chains == 1
    for k, net in enumerate(nets):
        for name, p in net.named_parameters():
            assert torch.equal(samples.samples[name][k], p)
    again = SamplePosterior.from_modules([n.state_dict() for n in nets], model=small_mlp_model)
    assert all(torch.equal(again.samples[s], samples.samples[s]) for s in samples.sites)
    moments = samples.moments()
    stacked = samples.samples["0.weight"]
    torch.testing.assert_close(moments.loc["0.weight"], stacked.mean(0))
    torch.testing.assert_close(moments.scale["0.weight"], stacked.std(0, correction=0))


def test_from_mcmc_keeps_chains(small_mlp_model):
    draws = {k: torch.randn(3, 5, *v.shape) for k, v in small_mlp_model.net.named_parameters()}
    chained = SamplePosterior.from_mcmc(draws, small_mlp_model)
    assert chained.num_chains == 3 and chained.num_samples == 15
    torch.testing.assert_close(chained.by_chain()["0.bias"], draws["0.bias"])
    assert torch.equal(chained.chains()[2].samples["2.weight"], draws["2.weight"][2])
    pooled = SamplePosterior.from_mcmc(draws, small_mlp_model, group_by_chain=False)
    assert pooled.num_chains == 1 and pooled.num_samples == 15
    flat = {k: v.reshape(15, *v.shape[2:]) for k, v in draws.items()}  # get_samples() layout
    assert SamplePosterior.from_mcmc(flat, small_mlp_model).num_samples == 15


def test_from_a_pyro_mcmc_run():
    pyro.set_rng_seed(0)
    model = BayesianNetwork(models.mlp(2, [3], 2), input_shape=(2,))
    x, y = torch.randn(20, 2), torch.randint(0, 2, (20,))
    mcmc = MCMC(NUTS(model), num_samples=6, warmup_steps=4, num_chains=1,
                disable_progbar=True)
    mcmc.run(x, y)
    samples = SamplePosterior.from_mcmc(mcmc, model)
    assert samples.num_samples == 6 and samples.num_chains == 1
    assert torch.equal(samples.samples["0.weight"], mcmc.get_samples()["0.weight"])
    assert samples.spec is model.spec


def test_from_swag_moments():
    mean = {"w": torch.tensor([1.0, -2.0, 0.5])}
    sq_mean = {"w": mean["w"] ** 2 + torch.tensor([0.25, 1.0, 4.0])}
    diag = SamplePosterior.from_swag(mean, sq_mean, num_samples=20000, seed=1)
    torch.testing.assert_close(diag.samples["w"].mean(0), mean["w"], atol=0.05, rtol=0)
    torch.testing.assert_close(diag.samples["w"].var(0), torch.tensor([0.25, 1.0, 4.0]),
                               atol=0, rtol=0.05)
    devs = [{"w": torch.tensor([1.0, 1.0, 0.0])}, {"w": torch.tensor([-1.0, 1.0, 2.0])},
            {"w": torch.tensor([0.0, -2.0, -2.0])}]
    swag = SamplePosterior.from_swag(mean, sq_mean, devs, num_samples=40000, seed=2)
    d = torch.stack([v["w"] for v in devs], dim=1)                   # (3, K)
    expected = torch.diag(torch.tensor([0.25, 1.0, 4.0])) / 2 + d @ d.T / (2 * (3 - 1))
    cov = torch.cov(swag.samples["w"].T)
    torch.testing.assert_close(cov, expected, atol=0.06, rtol=0.05)
    with pytest.raises(ValueError, match="at least 2"):
        SamplePosterior.from_swag(mean, sq_mean, devs[:1], num_samples=4)
    with pytest.raises(ValueError, match="sq_mean has no site 'w'"):
        SamplePosterior.from_swag(mean, {"v": torch.zeros(3)}, num_samples=4)


def test_permute_shared_and_per_sample(small_mlp_model):
    nets, samples = ensemble(small_mlp_model, 4)
    sizes = group_sizes(small_mlp_model)
    gen = torch.Generator().manual_seed(3)
    shared = random_perms(sizes, gen)
    rows = [random_perms(sizes, gen) for _ in range(4)]
    per_sample = {g: torch.stack([r[g] for r in rows]) for g in sizes}
    moved = permute(samples, shared)
    repeated = permute(samples, {g: p.expand(4, -1) for g, p in shared.items()})
    each = permute(samples, per_sample)
    x = torch.randn(16, 5, dtype=torch.float64)
    net64 = BayesianNetwork(models.mlp(5, [7, 6], 3).double(), input_shape=(5,))
    for s in range(4):
        assert all(torch.equal(moved.samples[k][s], repeated.samples[k][s]) for k in moved.sites)
        expected = permute(nets[s].state_dict(), rows[s], small_mlp_model.spec)
        assert all(torch.equal(each.samples[k][s], expected[k]) for k in each.sites)
        for version in (moved, each):  # every sample keeps its function
            out = net64.evaluate({k: v[s].double() for k, v in version.samples.items()}, x)
            ref = net64.evaluate({k: v[s].double() for k, v in samples.samples.items()}, x)
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert not torch.equal(each.samples["0.weight"], samples.samples["0.weight"])
    assert torch.equal(samples.samples["0.weight"][0], nets[0][0].weight)  # input untouched
    with pytest.raises(ValueError, match=r"shape \(4, n\)"):
        permute(samples, {g: p[:2] for g, p in per_sample.items()})
    with pytest.raises(ValueError, match="not a permutation"):
        permute(samples, {g: torch.zeros(4, n, dtype=torch.long) for g, n in sizes.items()})


def test_bad_input(small_mlp_model):
    with pytest.raises(ValueError, match="empty: site 'w' has 0 samples"):
        SamplePosterior({"w": torch.zeros(0, 3)})
    with pytest.raises(ValueError, match="empty: samples has no sites"):
        SamplePosterior({})
    with pytest.raises(ValueError, match="empty: members is empty"):
        SamplePosterior.from_modules([])
    with pytest.raises(ValueError, match="site 'b' has 3"):
        SamplePosterior({"a": torch.zeros(2, 1), "b": torch.zeros(3, 1)})
    with pytest.raises(ValueError, match="num_chains=2"):
        SamplePosterior({"a": torch.zeros(3, 1)}, num_chains=2)
    with pytest.raises(ValueError, match="NaN"):
        SamplePosterior({"a": torch.tensor([[float("nan")]])})
    with pytest.raises(TypeError, match="floating-point"):
        SamplePosterior({"a": torch.zeros(3, 1, dtype=torch.long)})
    with pytest.raises(ValueError, match="different architecture"):
        SamplePosterior({"a": torch.zeros(3, 1)}, model=small_mlp_model)
    with pytest.raises(ValueError, match=r"members\[1\] has site '0.weight' of shape \(8, 5\)"):
        SamplePosterior.from_modules([models.mlp(5, [7], 3), models.mlp(5, [8], 3)])
    bn = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="BatchNorm"):
        SamplePosterior.from_modules([bn, bn])
    _, samples = ensemble(small_mlp_model, 3)
    with pytest.raises(ValueError, match="num_samples=4 exceeds the 3 samples"):
        samples.sample(4)


# ------------------------------------------------------------------------------ the path --
def test_optimal_coupling_against_brute_force(small_mlp_model):
    _, q0 = ensemble(small_mlp_model, 5, seed=0)
    _, q1 = ensemble(small_mlp_model, 5, seed=1)
    path = interpolate(q0, q1)
    assert isinstance(path, SamplePath)

    def flat(q, i):
        return torch.cat([v[i].reshape(-1) for v in q.samples.values()]).double()

    cost = np.array([[float((flat(q0, i) - flat(q1, j)).pow(2).sum()) for j in range(5)]
                     for i in range(5)])
    best = min(sum(cost[i, p[i]] for i in range(5)) for p in itertools.permutations(range(5)))
    chosen = sum(cost[i, int(path.coupling[i])] for i in range(5))
    assert chosen == pytest.approx(best, rel=1e-12)
    # endpoints and the midpoint: every pair moves linearly
    noise = path.noise(5)
    for s in q0.sites:
        torch.testing.assert_close(path.draw(0.0, noise)[s], q0.samples[s])
        torch.testing.assert_close(path.draw(1.0, noise)[s], q1.samples[s][path.coupling])
        torch.testing.assert_close(path.at(0.5).samples[s],
                                   (q0.samples[s] + q1.samples[s][path.coupling]) / 2)
    draws = path.sample([0.0, 0.3, 1.0], 3, torch.Generator().manual_seed(0))
    assert draws["0.weight"].shape == (3, 3, 7, 5)


def test_path_bad_input(small_mlp_model):
    _, q0 = ensemble(small_mlp_model, 4)
    _, q1 = ensemble(small_mlp_model, 5)
    with pytest.raises(ValueError, match="one size.*q0 has 4 samples, q1 5"):
        interpolate(q0, q1)
    with pytest.raises(TypeError, match="q1 is an OrderedDict"):
        interpolate(q0, small_mlp_model.net.state_dict())
    with pytest.raises(ValueError, match="not Gaussian"):
        interpolate(q0, q0).view_at(0.5)


def test_marginal_loss_of_a_sample_set_is_the_ensemble_average(small_mlp_model):
    nets, samples = ensemble(small_mlp_model, 6)
    x, y = torch.randn(50, 5), torch.randint(0, 3, (50,))
    curve = marginal_loss(small_mlp_model, samples, (x, y), num_samples=6,
                          metrics=("nll", "accuracy"))
    with torch.no_grad():
        probs = torch.stack([torch.softmax(n(x), -1) for n in nets]).mean(0).double()
    nll = -probs[torch.arange(50), y].log().mean()
    assert curve.values["nll"][0] == pytest.approx(float(nll), rel=1e-5)
    assert curve.values["accuracy"][0] == pytest.approx(float((probs.argmax(-1) == y)
                                                              .double().mean()))
    _, other = ensemble(small_mlp_model, 6, seed=4)
    along = marginal_loss(small_mlp_model, interpolate(samples, other), (x, y), ts=3,
                          num_samples=6, metrics="nll")
    assert along.values["nll"][0] == pytest.approx(float(nll), rel=1e-5)
    with pytest.raises(ValueError, match="exceeds the 6 samples"):
        marginal_loss(small_mlp_model, samples, (x, y), num_samples=64)


def test_to_inference_data_keeps_chains(small_mlp_model):
    draws = {k: torch.randn(3, 5, *v.shape) for k, v in small_mlp_model.net.named_parameters()}
    chained = SamplePosterior.from_mcmc(draws, small_mlp_model)
    idata = to_inference_data(chained)
    assert idata.posterior["0.weight"].shape == (3, 5, 7, 5)
    np.testing.assert_array_equal(idata.posterior["0.bias"].values, draws["0.bias"].numpy())
    x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    assert to_inference_data(chained, data=(x, y)).log_likelihood["obs"].shape == (3, 5, 10)
    with pytest.raises(ValueError, match="same number of draws"):
        to_inference_data([chained, chained.chains()[0].with_samples(
            {k: v[:4] for k, v in chained.chains()[0].samples.items()})])
