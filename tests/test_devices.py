"""Posteriors on any device, checked on the CPU.

Without a GPU, PyTorch's "meta" device (shapes without values) stands in for a second device:
it shows that mixed devices are refused before anything is computed, and that the code paths
that need no values (permutations, draws from a seeded CPU generator, the batched network
evaluation, the spec derivation) leave their results on the input's device. The numerics on a
GPU are compared with the CPU's in ``test_cuda.py``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pyro.infer import autoguide
from pyro.infer.autoguide.initialization import init_to_value

import bnn_align
from bnn_align import BayesianNetwork, alignment_cost, fit, interpolate, marginal_loss, match
from bnn_align import models, permute, to_inference_data
from bnn_align._checks import device_of, same_device
from bnn_align.marginal import _Evaluator
from bnn_align.matching.weights import _prepare, _problem
from bnn_align.symmetry.permutation import permute_tensor, random_perms
from bnn_align.posterior import _param, as_gaussian

from conftest import GUIDE_KINDS, group_sizes, make_guide

META = torch.device("meta")


def _data(n: int = 8):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _computing_is_an_error(monkeypatch):
    """Any reading of a posterior's values (every computation starts there) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a posterior was read before the devices were checked")

    monkeypatch.setattr(bnn_align.posterior, "as_gaussian", refuse)


# ---------------------------------------------------------------------------- mixed devices --
@pytest.mark.parametrize("call", ["match", "alignment_cost", "interpolate", "to_inference_data"])
def test_posteriors_on_two_devices_are_refused_before_any_computation(call, small_mlp_model,
                                                                      monkeypatch):
    on_cpu = make_guide("mean_field", small_mlp_model)
    on_meta = make_guide("mean_field", small_mlp_model, seed=1).to(META)
    _computing_is_an_error(monkeypatch)
    run = {"match": lambda: match(on_cpu, on_meta),
           "alignment_cost": lambda: alignment_cost(on_cpu, on_meta),
           "interpolate": lambda: interpolate(on_cpu, on_meta),
           "to_inference_data": lambda: to_inference_data([on_cpu, on_meta], 4)}[call]
    labels = {"match": ("guide_a", "guide_b"), "alignment_cost": ("guide_a", "guide_b"),
              "interpolate": ("q0", "q1"),
              "to_inference_data": ("posterior 0", "posterior 1")}[call]
    with pytest.raises(ValueError, match=rf"{labels[0]} is on cpu, {labels[1]} on meta"):
        run()


def test_a_guide_whose_model_is_elsewhere_is_refused(small_mlp_model, monkeypatch):
    guide_a = make_guide("mean_field", small_mlp_model)
    moved = copy.deepcopy(small_mlp_model)
    guide_b = make_guide("diagonal", moved)
    moved.to(META)  # the guide's parameters stay on the CPU
    _computing_is_an_error(monkeypatch)
    with pytest.raises(ValueError, match=r"guide_a is on cpu, guide_b's model on meta"):
        match(guide_a, guide_b)
    with pytest.raises(ValueError, match=r"q0 is on cpu, q1's model on meta"):
        interpolate(guide_a, guide_b)


def test_fit_refuses_a_model_and_a_guide_on_two_devices(small_mlp_model, monkeypatch):
    guide = make_guide("mean_field", small_mlp_model)
    meta_guide = make_guide("mean_field", small_mlp_model, seed=1).to(META)
    meta_model = copy.deepcopy(small_mlp_model).to(META)

    def refuse(*args, **kwargs):
        raise AssertionError("the guide ran before the devices were checked")

    for g in (guide, meta_guide):
        monkeypatch.setattr(g, "forward", refuse)
    with pytest.raises(ValueError, match=r"model is on cpu, guide on meta"):
        fit(small_mlp_model, meta_guide, _data(), epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"model is on meta, guide on cpu"):
        fit(meta_model, guide, _data(), epochs=1, progress=False)


def test_weights_away_from_the_inputs_are_named_as_such(small_mlp_model):
    # a guide whose initialisation hands out values on another device than the model's: the
    # model, run on them while the guide is set up, names the devices (not the input's shape)
    values = {k: torch.zeros_like(v, device=META)
              for k, v in small_mlp_model.net.named_parameters()}
    guide = autoguide.AutoNormal(small_mlp_model, init_loc_fn=init_to_value(values=values))
    with pytest.raises(ValueError, match=r"weights are on meta but its input x is on cpu"):
        fit(small_mlp_model, guide, _data(), epochs=1, progress=False)


def test_marginal_loss_refuses_a_model_away_from_the_posteriors(small_mlp_model, monkeypatch):
    guide = make_guide("mean_field", small_mlp_model)
    meta_model = copy.deepcopy(small_mlp_model).to(META)
    monkeypatch.setattr(_Evaluator, "probe", lambda *a, **k: pytest.fail("network evaluated"))
    with pytest.raises(ValueError, match=r"model is on meta, the posteriors on cpu"):
        marginal_loss(meta_model, guide, _data(), num_samples=2, num_bootstrap=2)


def test_the_device_helpers():
    model = BayesianNetwork(models.mlp(5, [7], 3))
    assert device_of(model) == torch.device("cpu")
    assert device_of(copy.deepcopy(model).to(META)) == META
    assert device_of({"a": 1, "w": torch.zeros(2, device=META)}) == META
    assert device_of(torch.nn.ReLU()) is None and device_of(lambda x: x) is None
    assert device_of(torch.nn.BatchNorm1d(3, affine=False)) == torch.device("cpu")  # buffers
    assert same_device({"a": torch.nn.ReLU(), "b": {}}) is None
    assert same_device({"a": model, "b": None, "c": torch.zeros(1)}) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"a is on cpu, c on meta: put them"):
        same_device({"a": model, "b": None, "c": torch.zeros(1, device=META)})


# ------------------------------------------------------------ results on the input's device --
@pytest.mark.parametrize("kind", GUIDE_KINDS)
def test_permute_keeps_every_guide_on_its_device(kind, small_mlp_model):
    guide = make_guide(kind, small_mlp_model).to(META)
    perms = random_perms(group_sizes(small_mlp_model), torch.Generator().manual_seed(0))
    out = permute(guide, perms)
    assert type(out) is type(guide)
    params = dict(out.named_parameters())
    assert params and all(p.device == META for p in params.values())
    assert {k: p.shape for k, p in params.items()} == {
        k: p.shape for k, p in guide.named_parameters()}
    assert all(p.device.type == "cpu" for p in perms.values())  # the inputs are left alone


def test_permute_moves_modules_state_dicts_and_buffers_on_their_device():
    net = models.resnet(depth=8, width=1, dim=1, norm="batch", in_channels=1)
    model = BayesianNetwork(net, input_shape=(1, 16))
    spec = model.spec
    sizes = spec.group_sizes({k: v.shape for k, v in net.state_dict().items()})
    perms = random_perms(sizes, torch.Generator().manual_seed(0))
    meta_net = copy.deepcopy(net).to(META)
    moved = permute(meta_net, perms, spec)
    assert all(t.device == META for t in moved.state_dict().values())
    state = permute(meta_net.state_dict(), perms, spec)
    assert all(t.device == META for t in state.values())
    guide = make_guide("mean_field", copy.deepcopy(model))
    bnn_align.posterior.model_of(guide).to(META)
    guide.to(META)
    permuted = permute(guide, perms)  # BatchNorm statistics: a permuted copy of the model
    new_model = bnn_align.posterior.model_of(permuted)
    assert new_model is not bnn_align.posterior.model_of(guide)
    assert all(b.device == META for b in new_model.net.buffers())
    # one tensor by itself, with CPU permutations
    weight = torch.zeros(4, 3, device=META)
    spec4 = bnn_align.PermutationSpec({"w": ("P", None)})
    assert permute_tensor(weight, spec4["w"], {"P": torch.tensor([2, 0, 3, 1])}).device == META


def test_the_spec_is_derived_on_the_network_s_device():
    model = BayesianNetwork(models.resnet(depth=8, width=1, dim=1, norm="batch",
                                          in_channels=1), input_shape=(1, 16))
    on_meta = copy.deepcopy(model).to(META)
    assert on_meta.example_input().device == META
    assert on_meta.spec == model.spec


def test_seeded_draws_are_made_on_the_generator_s_device_and_moved(small_mlp_model,
                                                                    monkeypatch):
    guide = make_guide("low_rank", small_mlp_model)
    meta_view = as_gaussian(copy.deepcopy(guide).to(META), copy=False)
    made_on = []
    randn = torch.randn

    def recording_randn(*args, **kwargs):
        made_on.append(torch.device(kwargs.get("device") or "cpu"))
        return randn(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", recording_randn)
    eps, z = meta_view.standard_normal(3, torch.Generator().manual_seed(5))
    monkeypatch.undo()
    assert made_on == [torch.device("cpu")] * 2  # the generator's device, not the view's
    assert eps.device == META and z.device == META
    assert eps.shape == (3, meta_view.num_params) and z.shape == (3, 3)
    # the numbers are the CPU generator's, so a seed gives the same draws on every device
    cpu_eps, cpu_z = as_gaussian(guide).standard_normal(3, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    assert torch.equal(cpu_eps, torch.randn(3, meta_view.num_params, generator=gen))
    assert torch.equal(cpu_z, torch.randn(3, 3, generator=gen))
    draws = meta_view.sample(4, torch.Generator().manual_seed(0))
    assert all(v.device == META for v in draws.values())


def test_the_batched_network_runs_on_the_draws_device_with_data_elsewhere(small_mlp_model):
    meta_model = copy.deepcopy(small_mlp_model).to(META)
    guide = make_guide("mean_field", small_mlp_model).to(META)
    draws = as_gaussian(guide, copy=False).sample(4, torch.Generator().manual_seed(0))
    x, _ = _data(7)  # on the CPU, moved a batch at a time
    seen = []
    meta_model.net.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].device))
    out = _Evaluator(meta_model, chunk_size=3, batch_size=2).outputs(draws, x, None)
    assert out.device == META and out.shape == (4, 7, 3)
    assert seen and set(seen) == {META}  # (meta kernels would not object to CPU inputs)


# -------------------------------------------------------------- the CPU path makes no copies --
def test_the_solver_reads_cpu_posteriors_in_place(small_mlp_model):
    guide_a = make_guide("mean_field", small_mlp_model)
    guide_b = make_guide("mean_field", small_mlp_model, seed=1)
    va, vb, spec, sizes = _prepare(guide_a, guide_b, None, None, "wasserstein")
    problem, _ = _problem(va, vb, "wasserstein", spec, sizes)
    for site in va.sites:
        a_loc, b_loc = problem.pairs[site][0]
        assert np.shares_memory(a_loc, _param(guide_a.locs, site).detach().numpy())
        assert np.shares_memory(b_loc, _param(guide_b.locs, site).detach().numpy())

