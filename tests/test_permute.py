"""permute(): every object kind, exact inverses, function invariance of guide samples, bad input."""

from __future__ import annotations

import itertools
import sys

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import autoguide
from torch import nn

from bnn_align import BayesianNetwork, PermutationSpec, as_gaussian, models, permute
from bnn_align.symmetry.permutation import (Spare, check_perms, compose, invert, permute_tensor,
                               permute_tensors, random_perms, soft_permute_tensor,
                               soft_permute_tensors, take)

from conftest import GUIDE_KINDS, group_sizes, make_guide, permute_sample, permuted_noise


def snapshot(obj) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return {k: v.detach().clone() for k, v in obj.state_dict().items()}
    return {k: v.clone() for k, v in obj.items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


ARCHITECTURES = {
    "mlp": (lambda: models.mlp(5, [7, 6], 3), (5,)),
    "cnn1d": (lambda: models.cnn1d(1, 12, 3, channels=(4, 3), hidden=(5,)), (1, 12)),
    "cnn2d": (lambda: models.cnn2d(2, 6, 3, channels=(3, 4), hidden=(5,)), (2, 6, 6)),
    "resnet8_1d": (lambda: models.resnet(8, width=1, dim=1, in_channels=1, num_classes=3,
                                         base_channels=4), (1, 10)),
    "resnet8_2d": (lambda: models.resnet(8, width=1, num_classes=3, base_channels=3),
                   (3, 6, 6)),
    "resnet8_1d_batchnorm": (lambda: models.resnet(8, width=1, dim=1, in_channels=1,
                                                   num_classes=3, base_channels=4,
                                                   norm="batch"), (1, 10)),
}
SMALL = ("mlp", "cnn1d", "cnn2d")  # full-rank guides only where D x D stays small


def randomised(net: nn.Module) -> nn.Module:
    """Random normalisation parameters and BatchNorm statistics, so a wrongly moved one shows."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
                for p in (m.weight, m.bias):
                    p.copy_(torch.randn(p.shape, generator=gen))
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return net


@pytest.mark.parametrize("arch, kind", [(a, k) for a in ARCHITECTURES for k in GUIDE_KINDS
                                         if k != "full_rank" or a in SMALL])
def test_guide_samples_compute_the_same_function(arch, kind):
    from bnn_align.posterior import model_of

    build, input_shape = ARCHITECTURES[arch]
    model = BayesianNetwork(randomised(build()), input_shape=input_shape)
    guide = make_guide(kind, model)
    spec = model.spec
    perms = random_perms(group_sizes(model), torch.Generator().manual_seed(1))
    moved = permute(guide, perms)
    assert type(moved) is type(guide)
    x = torch.randn(6, *input_shape)
    view, moved_view = as_gaussian(guide), as_gaussian(moved)
    noise = view.standard_normal(4, torch.Generator().manual_seed(2))
    theta = view.transform(noise)
    if kind == "full_rank":
        # the factor is re-factorised, so compare the distributions: mean and covariance move
        # exactly with the permutation, and a permuted sample computes the same function
        d = view.num_params
        index = permute_flat_index(view, perms, spec)
        _, _, w = view.flat()
        _, _, w_new = moved_view.flat()
        torch.testing.assert_close(w_new @ w_new.T, (w @ w.T)[index][:, index],
                                   rtol=1e-4, atol=1e-7)
        theta_moved = {k: permute_sample(v, spec, k, perms) for k, v in theta.items()}
        assert d == len(index)
    else:
        theta_moved = moved_view.transform(permuted_noise(view, perms, spec, noise))
    moved_model = model_of(moved)  # BatchNorm: a copy holding the permuted statistics
    for s in range(4):
        out = model.evaluate({k: v[s] for k, v in theta.items()}, x)
        out_moved = moved_model.evaluate({k: v[s] for k, v in theta_moved.items()}, x)
        assert (out - out_moved).abs().max().item() < 1e-5 * max(1.0, out.abs().max().item())
    # something actually moved
    assert any(not torch.equal(view.loc[k], moved_view.loc[k]) for k in view.loc)


def permute_flat_index(view, perms, spec) -> torch.Tensor:
    """Flat index i -> source index: the permutation of the packed latent vector."""
    flat = torch.arange(view.num_params)
    pos, parts = 0, []
    for site, loc in view.loc.items():
        block = flat[pos:pos + loc.numel()].reshape(loc.shape)
        if site in spec:
            block = permute_tensor(block, spec[site], perms, spec.blocks.get(site))
        parts.append(block.reshape(-1))
        pos += loc.numel()
    return torch.cat(parts)


@pytest.mark.parametrize("kind", GUIDE_KINDS)
def test_permute_then_inverse_gives_back_the_guide(kind, small_mlp_model):
    guide = make_guide(kind, small_mlp_model)
    before = snapshot(guide)
    perms = random_perms(group_sizes(small_mlp_model), torch.Generator().manual_seed(3))
    there = permute(guide, perms)
    back = permute(there, invert(perms))
    if kind == "full_rank":
        # re-factorised: equal up to float32 rounding (the unconstrained upper triangle of
        # scale_tril is unused by Pyro, so compare the constrained values)
        for name in ("loc", "scale", "scale_tril"):
            torch.testing.assert_close(getattr(back, name), getattr(guide, name),
                                       rtol=1e-4, atol=1e-7)
    else:
        assert_same_state(snapshot(back), before)
    assert_same_state(snapshot(guide), before)  # the input is untouched
    assert guide.model is not None and back.model is not None
    assert not all(torch.equal(a, b) for a, b in zip(snapshot(there).values(), before.values()))


def test_permuted_guides_are_usable_pyro_guides(small_mlp_model):
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    perms = random_perms(group_sizes(small_mlp_model))
    for kind in GUIDE_KINDS:
        guide = make_guide(kind, small_mlp_model)
        moved = permute(guide, perms)
        with pyro.get_param_store().scope():
            loss = pyro.infer.Trace_ELBO().differentiable_loss(small_mlp_model, moved, x, y,
                                                               num_data=100)
        assert torch.isfinite(loss)
        if kind == "full_rank":
            tril = moved.scale_tril
            assert torch.equal(tril, torch.tril(tril))
            torch.testing.assert_close(torch.diagonal(tril), torch.ones(len(tril)))


@pytest.mark.parametrize("kind", ["state_dict", "module", "bayesian_network"])
def test_permute_then_inverse_for_point_objects(kind):
    net = models.resnet(8, width=1, norm="batch", base_channels=4)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
    model = BayesianNetwork(net, input_shape=(3, 8, 8))
    obj = {"state_dict": net.state_dict(), "module": net, "bayesian_network": model}[kind]
    before = snapshot(obj)
    perms = random_perms(group_sizes(model))
    there = permute(obj, perms, model.spec)
    assert type(there) is type(obj)
    back = permute(there, invert(perms), model.spec)
    assert_same_state(snapshot(back), before)
    assert_same_state(snapshot(obj), before)
    changed = snapshot(there)
    assert not torch.equal(changed[next(k for k in changed if k.endswith("running_mean"))],
                           before[next(k for k in before if k.endswith("running_mean"))])


@pytest.mark.parametrize("renamed", [False, True])
def test_permuted_module_is_a_new_copy_with_ties_and_buffers_kept(renamed):
    # Moved parameters and buffers are handed to the deep copy (each copied once); tied
    # parameters stay tied, non-persistent buffers are copied as they are, the original is
    # untouched, and a module whose state-dict names differ from its attributes (a hook
    # renaming them) still gets its permuted values.
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 6)
            self.out = nn.Linear(6, 6)
            self.back = nn.Linear(6, 6)
            self.back.weight = self.out.weight  # tied
            self.register_buffer("scratch", torch.arange(6.0), persistent=False)
            if renamed:
                self._register_state_dict_hook(Tied._rename)
                self._register_load_state_dict_pre_hook(Tied._unrename)

        @staticmethod
        def _rename(module, state, prefix, local_metadata):
            state["inp.weight_renamed"] = state.pop("inp.weight")

        @staticmethod
        def _unrename(state, prefix, *args):
            if "inp.weight_renamed" in state:
                state["inp.weight"] = state.pop("inp.weight_renamed")

    net = Tied()
    weight = "inp.weight_renamed" if renamed else "inp.weight"
    spec = PermutationSpec({weight: ("h", None), "inp.bias": ("h",)})
    perms = random_perms({"h": 6}, torch.Generator().manual_seed(2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    new = permute(net, perms, spec)
    assert torch.equal(new.inp.weight, before[weight][perms["h"]])
    assert torch.equal(new.inp.bias, before["inp.bias"][perms["h"]])
    assert new.back.weight is new.out.weight and new.out.weight is not net.out.weight
    assert torch.equal(new.out.weight, net.out.weight)
    assert new.scratch is not net.scratch and torch.equal(new.scratch, net.scratch)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    shared = {p.untyped_storage().data_ptr() for p in net.parameters()}
    assert not any(p.untyped_storage().data_ptr() in shared for p in new.parameters())
    assert new.inp.weight.requires_grad and isinstance(new.inp.weight, nn.Parameter)


def test_guide_over_batchnorm_network_moves_the_model_buffers():
    net = models.resnet(8, width=1, norm="batch", base_channels=4, dim=1, in_channels=1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    model = BayesianNetwork(net, input_shape=(1, 10))
    guide = make_guide("mean_field", model)
    perms = random_perms(group_sizes(model))
    moved = permute(guide, perms)
    from bnn_align.posterior import model_of

    assert model_of(moved) is not model
    assert model_of(guide) is model
    x = torch.randn(3, 1, 10)
    view = as_gaussian(guide)
    theta = {k: v for k, v in view.loc.items()}
    theta_moved = as_gaussian(moved).loc
    out = model.evaluate(theta, x)
    out_moved = model_of(moved).evaluate(theta_moved, x)
    assert (out - out_moved).abs().max() < 1e-5


def test_composition_and_identity():
    sizes = {"a": 5, "b": 3}
    p = random_perms(sizes, torch.Generator().manual_seed(0))
    q = random_perms(sizes, torch.Generator().manual_seed(1))
    spec = PermutationSpec({"w": ("a", "b")})
    w = {"w": torch.randn(5, 3)}
    both = permute(permute(w, p, spec), q, spec)
    assert torch.equal(both["w"], permute(w, compose(p, q), spec)["w"])
    ident = compose(p, invert(p))
    assert all(torch.equal(v, torch.arange(len(v))) for v in ident.values())


@pytest.mark.parametrize("stage_bytes", [None, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int64])
def test_permute_tensor_gathers_every_axis_and_keeps_autograd(dtype, stage_bytes, monkeypatch):
    # CPU tensors are gathered by take() in numpy unless autograd records them or numpy lacks
    # the dtype; every path must give what indexing gives, and keep the graph when recording.
    # stage_bytes=16 sends even this small tensor through take()'s staged blocks of rows.
    if stage_bytes is not None:
        monkeypatch.setattr(sys.modules["bnn_align.symmetry.permutation"], "_STAGE_BYTES", stage_bytes)
    entries = ("a", None, "b")
    perms = random_perms({"a": 4, "b": 5}, torch.Generator().manual_seed(3))
    t = (torch.arange(4 * 2 * 5) * 3 % 17).reshape(4, 2, 5).to(dtype)
    expected = t[perms["a"]][:, :, perms["b"]]
    out = permute_tensor(t, entries, perms)
    assert out.dtype == dtype and torch.equal(out, expected)
    assert permute_tensor(t, entries, {"a": torch.arange(4), "b": torch.arange(5)}) is t
    if dtype != torch.bfloat16:  # a numpy array in, a numpy array out
        assert np.array_equal(permute_tensor(t.numpy(), entries, perms), expected.numpy())
    if dtype.is_floating_point:
        leaf = t.clone().requires_grad_()
        out = permute_tensor(leaf, entries, perms)
        assert out.requires_grad
        (out * expected).sum().backward()
        # d/dleaf sum(P(leaf) * P(t)) = t
        assert torch.equal(leaf.grad, t)
        with torch.no_grad():
            assert torch.equal(permute_tensor(leaf, entries, perms), expected)


def test_soft_permutation_by_permutation_matrices_is_the_permutation():
    # blocks, a concatenated axis, a group on two axes and a trailing (factor) axis
    spec = PermutationSpec({"w": ("a", ("a", "b"), None), "v": (None, "b"), "c": (None,)},
                           blocks={"w": {1: 3}})
    sizes = {"a": 4, "b": 2}
    perms = random_perms(sizes, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(6)
    tensors = {"w": torch.randn(4, 18, 5, 2, generator=gen), "v": torch.randn(3, 2, generator=gen),
               "c": torch.randn(7, generator=gen)}
    onehot = {g: torch.eye(n)[perms[g]] for g, n in sizes.items()}
    hard = permute_tensors(tensors, perms, spec)
    soft = soft_permute_tensors(tensors, onehot, spec)
    for name in tensors:
        assert torch.allclose(soft[name], hard[name], atol=1e-6), name
    assert soft["c"] is tensors["c"]
    # linear in the matrix: a mixture of two permutations is the mixture of their results
    other = random_perms(sizes, torch.Generator().manual_seed(7))
    mixed = {g: 0.25 * onehot[g] + 0.75 * torch.eye(n)[other[g]] for g, n in sizes.items()}
    expected = 0.25 * hard["v"] + 0.75 * permute_tensor(tensors["v"], spec["v"], other)
    assert torch.allclose(soft_permute_tensor(tensors["v"], spec["v"], mixed), expected,
                          atol=1e-6)
    # differentiable in the matrices and the tensor
    leaf = {g: m.clone().requires_grad_() for g, m in mixed.items()}
    w = tensors["w"].clone().requires_grad_()
    soft_permute_tensor(w, spec["w"], leaf, spec.blocks["w"]).sum().backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in leaf.values())
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_permute_tensors_write_into_spare_memory_that_fits():
    # a spare tensor is used for a result of its dtype and size (its shape does not matter);
    # views into larger storage are never taken, and a buffer offered to a tensor that does
    # not move stays free for the next one
    spec = PermutationSpec({"w": ("a", "b"), "v": ("a",), "u": (None, "b"), "k": (None,)})
    perms = random_perms({"a": 4, "b": 3}, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(6)
    tensors = {"k": torch.randn(3, generator=gen), "w": torch.randn(4, 3, generator=gen),
               "v": torch.randn(4, generator=gen), "u": torch.randn(2, 3, generator=gen)}
    larger = torch.zeros(20)
    flat12, flat4, also3 = torch.zeros(12), torch.zeros(4), torch.zeros(3)
    wide = torch.zeros(4, dtype=torch.float64)
    spare = Spare([flat12, larger[:4], wide, flat4, larger[4:10], also3])
    out = permute_tensors(tensors, perms, spec, spare)
    expected = permute_tensors(tensors, perms, spec)
    assert all(torch.equal(out[k], expected[k]) for k in tensors)
    assert out["w"].data_ptr() == flat12.data_ptr() and out["w"].shape == (4, 3)
    assert out["v"].data_ptr() == flat4.data_ptr()
    assert out["k"] is tensors["k"]  # not permuted: also3 was not claimed for it
    assert spare.claim(torch.zeros(3)) is also3 and spare.claim(torch.zeros(6)) is None
    assert spare.claim(torch.zeros(4, dtype=torch.float64)) is wide
    with pytest.raises(ValueError, match="contiguous CPU tensor of 12"):
        permute_tensor(tensors["w"], spec["w"], perms, out=torch.zeros(11))


@pytest.mark.parametrize("stage_bytes", [None, 16, 300])
def test_take_equals_numpy_take_along_each_axis(stage_bytes, monkeypatch):
    # take() gathers large arrays a block of rows at a time (stage_bytes: the block's bytes,
    # forced small so these arrays take that path, with one row or several per block); the
    # result must be np.take along each axis in turn, for any set of axes, for indices that
    # cover only part of an axis, and written into out= when given
    if stage_bytes is not None:
        monkeypatch.setattr(sys.modules["bnn_align.symmetry.permutation"], "_STAGE_BYTES", stage_bytes)
    rng = np.random.default_rng(0)
    for shape in [(7,), (5, 3), (6, 4, 3, 2), (3, 40)]:
        a = rng.standard_normal(shape).astype(np.float32)
        for r in range(1, min(3, a.ndim) + 1):
            for axes in itertools.combinations(range(a.ndim), r):
                for part in (1.0, 0.5):
                    gathers = {ax: rng.permutation(shape[ax])[:max(1, int(part * shape[ax]))]
                               for ax in axes}
                    expected = a
                    for ax, index in gathers.items():
                        expected = np.take(expected, index, axis=ax)
                    assert np.array_equal(take(a, gathers), expected), (shape, axes, part)
                    out = np.full(expected.shape, np.nan, dtype=np.float32)
                    assert take(a, gathers, out=out) is out
                    assert np.array_equal(out, expected), (shape, axes, part)
    out = np.empty((5, 3), dtype=np.float32)
    b = rng.standard_normal((5, 3)).astype(np.float32)
    assert take(b, {}) is b and take(b, {}, out=out) is out and np.array_equal(out, b)


# ------------------------------------------------------------------------------- bad input --
def test_bad_permutations_are_rejected_with_the_group_named(small_mlp_model):
    sizes = group_sizes(small_mlp_model)
    good = random_perms(sizes)
    group, n = next(iter(sizes.items()))
    guide = make_guide("mean_field", small_mlp_model)
    before = snapshot(guide)
    cases = [
        ({**good, group: torch.arange(n + 1)}, ValueError, f"{group!r} must have shape"),
        ({**good, group: torch.zeros(n, dtype=torch.long)}, ValueError, "not a permutation"),
        ({**good, group: torch.arange(n).float()}, TypeError, "must hold integers"),
        ({k: v for k, v in good.items() if k != group}, ValueError, "missing groups"),
        ({**good, "Q": torch.arange(2)}, ValueError, "does not know"),
        ([1, 2], TypeError, "mapping"),
    ]
    for perms, error, words in cases:
        with pytest.raises(error, match=words):
            permute(guide, perms)
    assert_same_state(snapshot(guide), before)


def test_permutations_may_be_lists_or_arrays(small_mlp_model):
    sizes = group_sizes(small_mlp_model)
    perms = random_perms(sizes)
    as_lists = {g: p.tolist() for g, p in perms.items()}
    as_arrays = {g: p.numpy() for g, p in perms.items()}
    assert check_perms(as_lists, sizes).keys() == perms.keys()
    sd = small_mlp_model.net.state_dict()
    a, b = permute(sd, as_lists, small_mlp_model.spec), permute(sd, as_arrays, small_mlp_model.spec)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_spec_naming_a_missing_parameter(small_mlp_model):
    spec = PermutationSpec({**small_mlp_model.spec.axes_to_perm, "9.weight": ("P_0", None)})
    guide = make_guide("mean_field", small_mlp_model)
    perms = random_perms(group_sizes(small_mlp_model))
    with pytest.raises(ValueError, match="'9.weight'"):
        permute(guide, perms, spec)
    with pytest.raises(ValueError, match="'9.weight'"):
        permute(small_mlp_model.net.state_dict(), perms, spec)


def test_guide_over_a_plain_pyro_model_needs_a_spec():
    def model():
        pyro.sample("w", pyro.distributions.Normal(torch.zeros(3, 2), 1.0).to_event(2))

    guide = autoguide.AutoNormal(model)
    with pyro.get_param_store().scope():
        guide()
    with pytest.raises(ValueError, match="no spec given .*AutoNormal"):
        permute(guide, {"P": torch.arange(3)})
    spec = PermutationSpec({"w": ("P", None)})
    moved = permute(guide, {"P": torch.tensor([2, 0, 1])}, spec)
    torch.testing.assert_close(as_gaussian(moved).loc["w"], as_gaussian(guide).loc["w"][[2, 0, 1]])


def test_unsupported_objects():
    with pytest.raises(TypeError, match="expects a state dict"):
        permute(42, {}, PermutationSpec({}))
    model = BayesianNetwork(models.mlp(2, [3], 2), input_shape=(2,))
    guide = autoguide.AutoLaplaceApproximation(model)
    with pyro.get_param_store().scope():
        guide()
    with pytest.raises(TypeError, match="unsupported guide AutoLaplaceApproximation"):
        permute(guide, random_perms(group_sizes(model)))


@pytest.mark.parametrize("kind", GUIDE_KINDS)
def test_guides_with_a_scalar_site_are_read_and_permuted(kind):
    """A learned observation noise is a 0-d site packed among the weights."""
    from bnn_align import Gaussian

    model = BayesianNetwork(models.mlp(3, [6], 1), likelihood=Gaussian("learned"),
                            input_shape=(3,))
    guide = make_guide(kind, model)
    view = as_gaussian(guide)
    assert view.loc["obs_noise"].shape == ()
    before = snapshot(guide)
    perms = random_perms(group_sizes(model), torch.Generator().manual_seed(3))
    back = permute(permute(guide, perms), invert(perms))
    torch.testing.assert_close(as_gaussian(back).loc["obs_noise"], view.loc["obs_noise"])
    if kind != "full_rank":
        assert_same_state(snapshot(back), before)
    assert_same_state(snapshot(guide), before)


def test_permutations_of_strings_are_rejected_by_group():
    with pytest.raises(TypeError, match="group 'P' must hold integers"):
        check_perms({"P": ["a", "b"]}, {"P": 2})


@pytest.mark.parametrize("kind", GUIDE_KINDS)
def test_permuted_guide_copies_only_the_moved_parameters(kind, small_mlp_model):
    # What is read-only after set-up (the prototype trace and the initial values, each as large
    # as the network) is shared with the original, so a permuted guide costs one copy of its
    # parameters; the moved parameters themselves never share memory with the original.
    guide = make_guide(kind, small_mlp_model)
    moved = permute(guide, random_perms(group_sizes(small_mlp_model)))
    assert moved.prototype_trace is guide.prototype_trace
    if hasattr(guide, "init_loc_fn"):  # AutoNormal, AutoDelta (the others keep it in the model)
        assert moved.init_loc_fn is guide.init_loc_fn
    old = {p.untyped_storage().data_ptr() for p in guide.parameters()}
    assert not any(p.untyped_storage().data_ptr() in old for p in moved.parameters())
    # every module's own containers (hooks, buffers, submodules) are new, empty ones included:
    # a hook added to the permuted guide must not reach the original
    for original, copied in zip(guide.modules(), moved.modules()):
        for name, value in vars(original).items():
            if isinstance(value, (dict, list, set)):
                assert vars(copied)[name] is not value, name
                assert type(vars(copied)[name]) is type(value), name
    for module in moved.modules():
        module.register_forward_hook(lambda *args: None)
    assert not any(m._forward_hooks for m in guide.modules())
