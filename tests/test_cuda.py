"""On a GPU, ``match``, ``interpolate``, ``marginal_loss``, ``fit`` and ``to_inference_data``
give what they give on the CPU, up to float rounding, and leave their results on the GPU.

Skipped without CUDA. Every seeded draw of the library comes from a CPU generator and is moved
to the device, so the two runs see the same numbers; ``fit``'s ELBO noise is Pyro's, drawn on
the device by its own generator, so the fit tests draw it from one seeded CPU generator on both
devices (``_same_elbo_noise``).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.distributions.lowrank_multivariate_normal as lowrank_module
import torch.distributions.normal as normal_module

from bnn_align import (BayesianNetwork, Gaussian, alignment_cost, fit, guides, interpolate,
                       marginal_loss, match, models, to_inference_data)
from bnn_align.posterior import clone_guide, model_of

from conftest import make_guide

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = torch.device("cuda")
KINDS = ["mean_field", "low_rank"]


@pytest.fixture(autouse=True)
def _ieee_float32():
    """Full float32 products on the GPU (TF32 would round far above the tolerances)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _model(likelihood="categorical") -> BayesianNetwork:
    torch.manual_seed(0)
    out = 1 if likelihood != "categorical" else 3
    return BayesianNetwork(models.mlp(5, [16, 16], out), likelihood=likelihood,
                           input_shape=(5,))


def _data(n: int = 64, regression: bool = False):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=gen)
    if regression:
        return x, x[:, :1] * 0.5 + 0.1 * torch.randn(n, 1, generator=gen)
    return x, torch.randint(0, 3, (n,), generator=gen)


def _on_device(guide, model_on_device):
    """A copy of ``guide`` over ``model_on_device``, its parameters moved there."""
    return clone_guide(guide, model_on_device).to(DEVICE)


def _pair(kind: str, model: BayesianNetwork):
    """Two guides on the CPU and the same two on the GPU (over a copy of the model there)."""
    guide_a, guide_b = make_guide(kind, model), make_guide(kind, model, seed=1)
    on_device = copy.deepcopy(model).to(DEVICE)
    return (guide_a, guide_b), (_on_device(guide_a, on_device),
                                _on_device(guide_b, on_device)), on_device


def _params(guide) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in guide.named_parameters()}


def _assert_close_on_device(gpu: dict, cpu: dict, atol: float = 1e-5, rtol: float = 1e-5):
    assert gpu.keys() == cpu.keys()
    for k, v in gpu.items():
        assert v.device.type == DEVICE.type, k
        torch.testing.assert_close(v.cpu(), cpu[k], atol=atol, rtol=rtol, msg=k)


@pytest.mark.parametrize("kind", KINDS)
def test_match_agrees_with_the_cpu(kind):
    model = _model()
    (a, b), (a_gpu, b_gpu), _ = _pair(kind, model)
    on_cpu, on_gpu = match(a, b), match(a_gpu, b_gpu)
    for g, p in on_cpu.perms.items():  # the solver ran on the same numbers
        assert torch.equal(on_gpu.perms[g], p)
    assert on_gpu.cost_after == pytest.approx(on_cpu.cost_after, rel=1e-6)
    assert on_gpu.cost_before == pytest.approx(on_cpu.cost_before, rel=1e-6)
    _assert_close_on_device(_params(on_gpu.aligned), _params(on_cpu.aligned))
    assert alignment_cost(a_gpu, b_gpu, on_gpu.perms) == pytest.approx(
        alignment_cost(a, b, on_cpu.perms), rel=1e-6)
    activation = match(a_gpu, b_gpu, method="activation", data=_data()[0])
    expected = match(a, b, method="activation", data=_data()[0])
    assert all(torch.equal(activation.perms[g], p) for g, p in expected.perms.items())


@pytest.mark.parametrize("kind", KINDS)
def test_interpolate_agrees_with_the_cpu(kind):
    model = _model()
    (a, b), (a_gpu, b_gpu), _ = _pair(kind, model)
    path, path_gpu = interpolate(a, b), interpolate(a_gpu, b_gpu)
    assert path_gpu.device.type == DEVICE.type
    _assert_close_on_device(_params(path_gpu.at(0.3)), _params(path.at(0.3)))
    draws = path.sample([0.0, 0.5, 1.0], 8, torch.Generator().manual_seed(2))
    draws_gpu = path_gpu.sample([0.0, 0.5, 1.0], 8, torch.Generator().manual_seed(2))
    _assert_close_on_device(draws_gpu, draws)
    mixture = interpolate(a_gpu, b_gpu, "mixture").at(0.5).sample(8, torch.Generator())
    assert all(v.device.type == DEVICE.type for v in mixture.values())


@pytest.mark.parametrize("kind", KINDS)
def test_marginal_loss_agrees_with_the_cpu(kind):
    model = _model()
    (a, b), (a_gpu, b_gpu), model_gpu = _pair(kind, model)
    data = _data()  # stays on the CPU: moved a batch at a time
    # not "ece": a confidence within rounding of a bin's edge may land in the next bin
    settings = dict(ts=3, num_samples=16, num_bootstrap=20, batch_size=16,
                    metrics=("nll", "gibbs", "accuracy", "brier"))
    curve = marginal_loss(model, interpolate(a, b), data, **settings)
    curve_gpu = marginal_loss(model_gpu, interpolate(a_gpu, b_gpu), data, **settings)
    for m in curve.metrics:
        assert isinstance(curve_gpu.values[m], np.ndarray)
        np.testing.assert_allclose(curve_gpu.values[m], curve.values[m], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(curve_gpu.se[m], curve.se[m], rtol=1e-3, atol=1e-6)
    on_device_data = tuple(t.to(DEVICE) for t in data)
    single = marginal_loss(model_gpu, a_gpu, on_device_data, **settings)
    np.testing.assert_allclose(single.values["nll"],
                               marginal_loss(model, a, data, **settings).values["nll"],
                               rtol=1e-4)


def test_learned_noise_regression_on_the_gpu():
    model = _model(Gaussian("learned"))
    model_gpu = copy.deepcopy(model).to(DEVICE)
    built_there = guides.mean_field(model_gpu)  # the noise prior follows the network
    assert all(p.device.type == DEVICE.type for p in built_there.parameters())
    guide = guides.mean_field(model)
    data = _data(regression=True)
    settings = dict(ts=1, num_samples=16, num_bootstrap=20)
    curve = marginal_loss(model, guide, data, **settings)
    curve_gpu = marginal_loss(model_gpu, _on_device(guide, model_gpu), data, **settings)
    np.testing.assert_allclose(curve_gpu.values["nll"], curve.values["nll"], rtol=1e-4)


def test_to_inference_data_agrees_with_the_cpu():
    model = _model()
    (a, b), (a_gpu, b_gpu), _ = _pair("mean_field", model)
    data = _data(16)
    idata = to_inference_data([a, b], 10, data=data)
    idata_gpu = to_inference_data([a_gpu, b_gpu], 10, data=data)
    for group in ("posterior", "log_likelihood"):
        for name, value in idata[group].data_vars.items():
            np.testing.assert_allclose(idata_gpu[group][name].values, value.values,
                                       rtol=1e-4, atol=1e-5)


@pytest.fixture
def _same_elbo_noise(monkeypatch):
    """Pyro draws the ELBO's noise with the device's own generator; here it comes from one
    seeded CPU generator on both devices, so the two fits see the same numbers."""
    state = {}

    def standard_normal(shape, dtype, device):
        return torch.randn(shape, dtype=dtype, generator=state["gen"]).to(device)

    for module in (normal_module, lowrank_module):
        monkeypatch.setattr(module, "_standard_normal", standard_normal)

    def reseed():
        state["gen"] = torch.Generator().manual_seed(3)

    reseed()
    return reseed


@pytest.mark.parametrize("kind", KINDS + ["delta"])
def test_fit_agrees_with_the_cpu(kind, _same_elbo_noise):
    model = _model()
    guide = make_guide(kind, model)
    model_gpu = copy.deepcopy(model).to(DEVICE)
    guide_gpu = _on_device(guide, model_gpu)
    # a small learning rate: Adam's first steps move every weight by about lr whatever the
    # gradient's size, so a gradient within rounding of zero could differ by 2 lr
    settings = dict(epochs=2, batch_size=16, lr=1e-3, lr_end=None, progress=False, seed=4)
    _same_elbo_noise()
    history = fit(model, guide, _data(), **settings)
    _same_elbo_noise()
    history_gpu = fit(model_gpu, guide_gpu, _data(), **settings)  # data on the CPU
    np.testing.assert_allclose(history_gpu, history, rtol=1e-4)
    trained, trained_gpu = _params(guide), _params(guide_gpu)
    assert all(v.device.type == DEVICE.type for v in trained_gpu.values())
    difference = torch.cat([(trained_gpu[k].cpu() - v).reshape(-1) for k, v in trained.items()])
    size = torch.cat([v.reshape(-1) for v in trained.values()])
    assert float(difference.norm() / size.norm()) < 3e-4
    assert model_of(guide_gpu) is model_gpu


def test_a_guide_gets_its_parameters_on_the_model_s_device():
    from pyro.infer import autoguide

    model_gpu = copy.deepcopy(_model()).to(DEVICE)
    guide = autoguide.AutoNormal(model_gpu)  # no parameters until fit calls it
    fit(model_gpu, guide, _data(), epochs=1, progress=False)
    assert all(p.device.type == DEVICE.type for p in guide.parameters())
