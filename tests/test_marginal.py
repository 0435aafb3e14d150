"""marginal_loss(): batched evaluation, metrics, barriers with standard errors, bad input."""

from __future__ import annotations

import json
import math

import matplotlib
import numpy as np
import pytest
import torch
from torch import nn

from bnn_align import (BayesianNetwork, Gaussian, as_gaussian, fit, guides, interpolate,
                       marginal_loss, match, models)
from bnn_align.marginal import _Evaluator

from conftest import make_guide

matplotlib.use("Agg")


def classification_case(arch: str = "mlp", seed: int = 0):
    build = {
        "mlp": (lambda: models.mlp(6, [12, 9], 4), (6,)),
        "cnn1d": (lambda: models.cnn1d(1, 12, 4, channels=(5, 3), hidden=(7,)), (1, 12)),
        "resnet_bn": (lambda: models.resnet(8, dim=1, in_channels=1, num_classes=4,
                                            base_channels=4, norm="batch"), (1, 10)),
    }[arch]
    torch.manual_seed(seed)
    net, shape = build[0](), build[1]
    for m in net.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    model = BayesianNetwork(net, input_shape=shape)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(40, *shape, generator=gen)
    y = torch.randint(0, 4, (40,), generator=gen)
    return model, x, y


def spread_guide(model, seed, scale=0.1):
    guide = make_guide("mean_field", model, seed=seed, spread=0.3)
    with torch.no_grad():
        for p in guide.scales.parameters():
            p.fill_(math.log(math.expm1(scale)))  # softplus^-1(scale)
    return guide


@pytest.mark.parametrize("arch", ["mlp", "cnn1d", "resnet_bn"])
def test_batched_evaluation_equals_a_per_sample_loop(arch):
    model, x, y = classification_case(arch)
    guide = spread_guide(model, 1)
    draws = as_gaussian(guide).sample(9, torch.Generator().manual_seed(0))
    batched = _Evaluator(model, chunk_size=4, batch_size=16).outputs(draws, x, None)
    loop = torch.stack([model.evaluate({k: v[s] for k, v in draws.items()}, x)
                        for s in range(9)])
    assert (batched - loop).abs().max().item() < 1e-5


def test_metrics_equal_a_plain_computation():
    model, x, y = classification_case("cnn1d")
    q0, q1 = spread_guide(model, 1), spread_guide(model, 2)
    path = interpolate(q0, q1)
    curve = marginal_loss(model, path, (x, y), ts=[0.0, 0.5, 1.0], num_samples=16, seed=3)
    # recompute at t = 0.5 with the same draws, one sample at a time
    gen = torch.Generator().manual_seed(3)
    torch.randint(16, (200, 16), generator=gen)  # the bootstrap indices come first
    noise = path.noise(16, gen)
    draws = path.draw(0.5, noise)
    probs = torch.stack([torch.softmax(model.evaluate({k: v[s] for k, v in draws.items()}, x),
                                       -1) for s in range(16)]).double()
    logp = torch.stack([torch.log_softmax(model.evaluate({k: v[s] for k, v in draws.items()},
                                                         x).double(), -1)
                        for s in range(16)])
    bma = probs.mean(0)
    nll = -torch.log(bma[torch.arange(len(y)), y]).mean().item()
    gibbs = -logp[:, torch.arange(len(y)), y].mean().item()
    accuracy = (bma.argmax(-1) == y).double().mean().item()
    brier = ((bma - nn.functional.one_hot(y, 4)) ** 2).sum(-1).mean().item()
    conf, pred = bma.max(-1)
    bins = np.minimum((conf.numpy() * 15).astype(int), 14)
    ece = sum(abs(((pred == y).numpy()[bins == b]).sum() - conf.numpy()[bins == b].sum())
              for b in range(15)) / len(y)
    for metric, expected in (("nll", nll), ("gibbs", gibbs), ("accuracy", accuracy),
                             ("brier", brier), ("ece", ece)):
        assert curve.values[metric][1] == pytest.approx(expected, abs=1e-6), metric
        assert curve.se[metric][1] >= 0


def test_identical_endpoints_have_no_barrier():
    model, x, y = classification_case("mlp")
    q = spread_guide(model, 1)
    same = interpolate(q, q)
    curve = marginal_loss(model, same, (x, y), ts=5, num_samples=16)
    assert curve.barrier("nll").value == pytest.approx(0.0, abs=1e-12)
    independent = marginal_loss(model, same, (x, y), ts=5, num_samples=16, common=False)
    b = independent.barrier("nll")
    assert b.se > 0
    assert abs(b.value) <= 3 * b.se + 1e-12


def test_mixture_barrier_is_never_positive():
    model, x, y = classification_case("mlp")
    q0, q1 = spread_guide(model, 1, 0.3), spread_guide(model, 2, 0.3)
    curve = marginal_loss(model, interpolate(q0, q1, "mixture"), (x, y), ts=7, num_samples=8)
    excess = curve.values["nll"] - ((1 - curve.ts) * curve.values["nll"][0]
                                    + curve.ts * curve.values["nll"][-1])
    assert (excess <= 1e-12).all()
    assert curve.barrier("nll").value <= 1e-12
    assert excess[1:-1].max() < -1e-6  # strictly concave between different endpoints


def test_common_random_numbers_shrink_the_barrier_standard_error():
    model, x, y = classification_case("mlp")
    q0 = spread_guide(model, 1, 0.2)
    q1 = spread_guide(model, 1, 0.2)
    with torch.no_grad():  # a nearby posterior: the barrier is small and noise matters
        for p in q1.locs.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
    path = interpolate(q0, q1)
    common = marginal_loss(model, path, (x, y), ts=5, num_samples=32, seed=1)
    independent = marginal_loss(model, path, (x, y), ts=5, num_samples=32, seed=1,
                                common=False)
    # the midpoint: the barrier's maximum can sit at an end, where its error is exactly 0
    shared, own = common.midpoint_barrier("nll"), independent.midpoint_barrier("nll")
    assert 0 < shared.se < 0.5 * own.se


def test_linear_gaussian_regression_matches_the_closed_form():
    d, n, noise = 3, 50, 0.3
    model = BayesianNetwork(nn.Linear(d, 1), likelihood=Gaussian(noise), input_shape=(d,))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen)
    y = x @ torch.tensor([[0.5], [-1.0], [2.0]]) + 0.3 * torch.randn(n, 1, generator=gen)
    q0, q1 = guides.mean_field(model), guides.mean_field(model)
    for q, seed in ((q0, 1), (q1, 2)):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in q.locs.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            for p in q.scales.parameters():
                p.copy_(torch.rand(p.shape, generator=g) - 1.0)
    path = interpolate(q0, q1)
    curve = marginal_loss(model, path, (x, y), ts=5, num_samples=4000, seed=0)
    for i, t in enumerate(curve.ts):
        v = path.view_at(t)
        mean = x @ v.loc["weight"].T + v.loc["bias"]
        var = noise ** 2 + (x ** 2) @ (v.scale["weight"] ** 2).T + v.scale["bias"] ** 2
        exact = -torch.distributions.Normal(mean, var.sqrt()).log_prob(y).mean().item()
        assert curve.values["nll"][i] == pytest.approx(exact, abs=max(4 * curve.se["nll"][i],
                                                                      0.01))
        rmse = ((mean - y) ** 2).mean().sqrt().item()
        assert curve.values["rmse"][i] == pytest.approx(rmse, abs=0.02)


def test_learned_noise_regression_runs_through_the_constraint():
    model = BayesianNetwork(models.mlp(2, [5], 1), likelihood=Gaussian("learned"),
                            input_shape=(2,))
    q = guides.mean_field(model)
    x, y = torch.randn(30, 2), torch.randn(30, 1)
    curve = marginal_loss(model, q, (x, y), num_samples=8)
    assert curve.kind == "posterior" and len(curve.ts) == 1
    assert np.isfinite(curve.values["nll"]).all() and set(curve.metrics) == {"nll", "gibbs",
                                                                            "rmse"}


def test_loss_curve_record_and_plot(tmp_path):
    model, x, y = classification_case("mlp")
    curve = marginal_loss(model, interpolate(spread_guide(model, 1), spread_guide(model, 2)),
                          (x, y), ts=5, num_samples=8, metrics=["nll", "accuracy"])
    record = json.loads(curve.to_json(tmp_path / "curve.json"))
    assert record["ts"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert record["barriers"]["nll"]["value"] == pytest.approx(curve.barrier("nll").value)
    assert json.loads((tmp_path / "curve.json").read_text()) == record
    mid = curve.midpoint_barrier("nll")
    assert mid.t == 0.5 and mid.value <= curve.barrier("nll").value + 1e-12
    fig = curve.plot()
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 2
    with pytest.raises(ValueError, match="metric 'ece' was not computed"):
        curve.barrier("ece")
    partial = marginal_loss(model, interpolate(spread_guide(model, 1), spread_guide(model, 2)),
                            (x, y), ts=[0.2, 0.8], num_samples=4)
    with pytest.raises(ValueError, match="start at 0 and end at 1"):
        partial.barrier()
    with pytest.raises(ValueError, match="t = 0.5"):
        marginal_loss(model, interpolate(spread_guide(model, 1), spread_guide(model, 2)),
                      (x, y), ts=4, num_samples=4).midpoint_barrier()


def test_bad_input_gives_clear_errors():
    model, x, y = classification_case("mlp")
    path = interpolate(spread_guide(model, 1), spread_guide(model, 2))
    with pytest.raises(ValueError, match=r"inputs x of shape \(40, 7\) do not fit"):
        marginal_loss(model, path, (torch.randn(40, 7), y))
    with pytest.raises(ValueError, match=r"labels y must lie in \[0, 3\]"):
        marginal_loss(model, path, (x, y + 4))
    with pytest.raises(ValueError, match="every t must lie in"):
        marginal_loss(model, path, (x, y), ts=[0.0, 1.2])
    with pytest.raises(ValueError, match="num_samples"):
        marginal_loss(model, path, (x, y), num_samples=0)
    with pytest.raises(ValueError, match="unknown metrics"):
        marginal_loss(model, path, (x, y), metrics=["rmse"])
    with pytest.raises(TypeError, match="pair of tensors"):
        marginal_loss(model, path, x)
    other = BayesianNetwork(models.mlp(6, [13, 9], 4), input_shape=(6,))
    with pytest.raises(ValueError, match="site '0.weight' has shape"):
        marginal_loss(other, path, (x, y))


@pytest.mark.slow
def test_alignment_cuts_the_barrier_on_mnist1d():
    from bnn_align.data import mnist1d

    data = mnist1d()
    posteriors = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = BayesianNetwork(models.mlp(40, [64, 64], 10), input_shape=(40,))
        q = guides.mean_field(model)
        fit(model, q, data.train, epochs=10, seed=seed, progress=False)
        posteriors.append((model, q))
    (model, q0), (_, q1) = posteriors
    aligned = match(q0, q1).aligned
    test = data.subset(num_test=500).test
    naive = marginal_loss(model, interpolate(q0, q1), test, ts=5, num_samples=32).barrier()
    after = marginal_loss(model, interpolate(q0, aligned), test, ts=5,
                          num_samples=32).barrier()
    # measured: naive about 0.8 nats, aligned about 0.09
    assert naive.value - after.value > 3 * math.hypot(naive.se, after.se)
    assert after.value < 0.5 * naive.value


def test_seeded_and_leaves_the_global_rng_alone():
    model, x, y = classification_case("mlp")
    path = interpolate(spread_guide(model, 1), spread_guide(model, 2))
    torch.manual_seed(11)
    first = marginal_loss(model, path, (x, y), ts=3, num_samples=8, seed=5)
    after_first = torch.rand(1)
    torch.manual_seed(11)
    second = marginal_loss(model, path, (x, y), ts=3, num_samples=8, seed=5)
    assert torch.equal(torch.rand(1), after_first)
    for m in first.metrics:
        assert np.array_equal(first.values[m], second.values[m])
        assert np.array_equal(first.se[m], second.se[m])
    other = marginal_loss(model, path, (x, y), ts=3, num_samples=8, seed=6)
    assert not np.array_equal(first.values["nll"], other.values["nll"])


def test_batchnorm_statistics_travel_with_each_posterior():
    """A permuted BatchNorm network computes the same function only with its own permuted
    running statistics: every kind of endpoint must bring them along."""
    from bnn_align import permute
    from bnn_align.symmetry.permutation import random_perms

    from conftest import group_sizes

    model, x, y = classification_case("resnet_bn")
    with torch.no_grad():
        exact = nn.functional.cross_entropy(model.net(x), y).item()
    q = make_guide("delta", model)
    perms = random_perms(group_sizes(model), torch.Generator().manual_seed(0))
    qp = permute(q, perms)
    net_p, sd_p = permute(model.net, perms, model.spec), permute(model.net.state_dict(), perms,
                                                                 model.spec)
    for posterior in (qp, net_p, sd_p):
        nll = marginal_loss(model, posterior, (x, y), num_samples=1).values["nll"]
        assert nll[0] == pytest.approx(exact, rel=1e-5), type(posterior).__name__
    for q0, q1 in ((q, qp), (model.net, net_p), (model.net.state_dict(), sd_p)):
        for kind in ("wasserstein", "mixture"):
            curve = marginal_loss(model, interpolate(q0, q1, kind), (x, y), ts=3,
                                  num_samples=1)
            assert curve.values["nll"][[0, -1]] == pytest.approx([exact, exact], rel=1e-5)
    # the guide at t = 0.5 carries a model with the interpolated statistics
    path = interpolate(q, qp)
    middle = marginal_loss(model, path, (x, y), ts=[0.5], num_samples=1).values["nll"]
    alone = marginal_loss(model, path.at(0.5), (x, y), num_samples=1).values["nll"]
    assert alone == pytest.approx(middle, rel=1e-6)
    assert middle[0] != pytest.approx(exact, rel=1e-3)  # the midpoint is a different network


class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(2, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.gru(x)[0][:, -1])


def test_networks_vmap_cannot_run_are_evaluated_draw_by_draw():
    model = BayesianNetwork(_Recurrent(), input_shape=(4, 2))
    guide = make_guide("mean_field", model, spread=0.1)
    x, y = torch.randn(10, 4, 2), torch.randint(0, 3, (10,))
    with pytest.warns(RuntimeWarning, match="vmap cannot run this network"):
        curve = marginal_loss(model, guide, (x, y), num_samples=3, seed=2)
    gen = torch.Generator().manual_seed(2)
    torch.randint(3, (200, 3), generator=gen)  # the bootstrap indices come first
    path = interpolate(guide, guide)
    draws = path.draw(0.0, path.noise(3, gen))
    probs = torch.stack([torch.softmax(model.evaluate({k: v[s] for k, v in draws.items()}, x),
                                       -1) for s in range(3)]).double().mean(0)
    expected = -torch.log(probs[torch.arange(10), y]).mean().item()
    assert curve.values["nll"][0] == pytest.approx(expected, rel=1e-5)


def test_draws_are_chunked_to_bound_memory(monkeypatch):
    import bnn_align.marginal as marginal

    model, x, y = classification_case("cnn1d")
    path = interpolate(spread_guide(model, 1), spread_guide(model, 2))
    whole = marginal_loss(model, path, (x, y), ts=3, num_samples=8, seed=1)
    calls = []
    original = marginal._Evaluator.outputs

    def spy(self, draws, inputs, buffers):
        calls.append(self.chunk_size)
        return original(self, draws, inputs, buffers)

    monkeypatch.setattr(marginal._Evaluator, "outputs", spy)
    monkeypatch.setattr(marginal, "_MEMORY_BUDGET", 1)  # one draw per call
    chunked = marginal_loss(model, path, (x, y), ts=3, num_samples=8, seed=1)
    assert calls[-1] == 1
    for m in whole.metrics:
        np.testing.assert_allclose(chunked.values[m], whole.values[m], rtol=1e-6, atol=1e-9)


def test_log_mean_survives_resamples_without_the_dominant_draw():
    from bnn_align.marginal import _log_mean

    logp = torch.tensor([[0.0], [-900.0], [-905.0]], dtype=torch.float64)  # (S, N)
    weights = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.0, 0.5, 0.5]], dtype=torch.float64)
    out = _log_mean(weights, logp)
    assert torch.isfinite(out).all()
    expected = math.log(0.5 * math.exp(-900.0 + 900) + 0.5 * math.exp(-905.0 + 900)) - 900
    assert out[1, 0].item() == pytest.approx(expected, rel=1e-12)
    assert out[0, 0].item() == pytest.approx(math.log(1 / 3), rel=1e-9)


def test_more_bad_input_and_lenient_input():
    from bnn_align.paths.interpolation import Mixture

    model, x, y = classification_case("mlp")
    path = interpolate(spread_guide(model, 1), spread_guide(model, 2))
    with pytest.raises(TypeError, match="dtype torch.float64"):
        marginal_loss(model, path, (x.double(), y))
    with pytest.raises(ValueError, match=r"shape \(40, 1, 6\) do not fit the network: "
                                         r"expected \('N', 6\)"):
        marginal_loss(model, path, (x.unsqueeze(1), y))
    with pytest.raises(ValueError, match="metrics is empty"):
        marginal_loss(model, path, (x, y), metrics=[])
    with pytest.raises(TypeError, match="not a bool"):
        marginal_loss(model, path, (x, y), ts=True)
    with pytest.raises(ValueError, match="ts is empty"):
        path.sample([], 2)
    one = marginal_loss(model, path, (x, y), ts=3, num_samples=np.int64(4), metrics="nll")
    assert one.metrics == ["nll"] and one.num_samples == 4
    with pytest.warns(RuntimeWarning, match="num_samples=1"):
        single = marginal_loss(model, path, (x, y), ts=3, num_samples=1, metrics="nll")
    assert np.isnan(single.se["nll"]).all()
    mixture = interpolate(spread_guide(model, 1), spread_guide(model, 2), "mixture")
    point = mixture.at(0.25)
    assert isinstance(point, Mixture)
    on_path = marginal_loss(model, mixture, (x, y), ts=[0.25], num_samples=8, seed=3)
    alone = marginal_loss(model, point, (x, y), num_samples=8, seed=3)
    np.testing.assert_array_equal(alone.values["nll"], on_path.values["nll"])
    # a learned observation noise needs posteriors that hold it
    reg = BayesianNetwork(models.mlp(3, [4], 1), likelihood=Gaussian("learned"),
                          input_shape=(3,))
    sd = reg.net.state_dict()
    with pytest.raises(ValueError, match="no site 'obs_noise'"):
        marginal_loss(reg, sd, (torch.randn(5, 3), torch.randn(5, 1)))
