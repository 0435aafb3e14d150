"""Scale symmetry: spec.scalable, rescale, canonicalize, match(symmetries=...), the geodesic
path and local_energy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnn_align as ba
from bnn_align import BayesianNetwork, PermutationSpec, as_gaussian, models
from bnn_align.paths.geodesic import slerp
from bnn_align.symmetry.canonical import unit_norms
from bnn_align.symmetry.permutation import random_perms
from bnn_align.symmetry.scale import ScaleSymmetry

from conftest import GUIDE_KINDS, group_sizes, make_guide

ARCHITECTURES = {
    "mlp": (lambda: models.mlp(5, [7, 6], 3), (5,)),
    "mlp_leaky": (lambda: models.mlp(5, [7, 6], 3, activation="leaky_relu"), (5,)),
    "cnn1d": (lambda: models.cnn1d(1, 12, 3, channels=(4, 3), hidden=(5,)), (1, 12)),
    "cnn2d": (lambda: models.cnn2d(2, 6, 3, channels=(3, 4), hidden=(5,)), (2, 6, 6)),
    "resnet8_layer": (lambda: models.resnet(8, dim=1, in_channels=1, num_classes=3,
                                            base_channels=4), (1, 10)),
    "resnet8_none": (lambda: models.resnet(8, dim=1, in_channels=1, num_classes=3,
                                           base_channels=4, norm=None), (1, 10)),
    "resnet8_batch": (lambda: models.resnet(8, num_classes=3, base_channels=3, norm="batch"),
                      (3, 6, 6)),
}


def randomised(net: nn.Module) -> nn.Module:
    """float64, random normalisation parameters and BatchNorm statistics."""
    gen = torch.Generator().manual_seed(7)
    net = net.double()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
                for p in (m.weight, m.bias):
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return net.eval()


def random_scales(spec: PermutationSpec, sizes, seed: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # log-uniform over two orders of magnitude
    return {g: torch.exp(4 * torch.rand(sizes[g], generator=gen, dtype=torch.float64) - 2)
            for g in spec.scalable}


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-10) -> bool:
    return (a - b).abs().max().item() <= rel * max(1.0, a.abs().max().item())


def build(arch: str):
    make, shape = ARCHITECTURES[arch]
    net = randomised(make())
    spec = ba.spec_from_module(net, torch.zeros(2, *shape, dtype=torch.float64))
    sizes = spec.group_sizes({k: v.shape for k, v in net.state_dict().items()})
    return net, shape, spec, sizes


# -- the spec ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_random_rescalings_of_scalable_units_keep_the_function(arch):
    net, shape, spec, sizes = build(arch)
    assert spec.scalable, "every builder has scalable units"
    scales = random_scales(spec, sizes)
    scaled = ba.rescale(net, scales, spec)
    x = torch.randn(6, *shape, dtype=torch.float64)
    assert close(scaled(x), net(x))
    changed = [k for k, v in net.state_dict().items()
               if not torch.equal(v, scaled.state_dict()[k])]
    expected = {n for s in spec.scalable.values() for n, _ in (*s.incoming, *s.outgoing)}
    assert set(changed) == expected
    # the input is never modified
    assert not any(torch.equal(net.state_dict()[k], scaled.state_dict()[k]) for k in changed)


def test_what_the_derivation_reports_for_the_builders():
    spec = ba.spec_from_module(models.mlp(4, [8, 6], 3), torch.zeros(1, 4))
    assert spec.scalable == {
        "P_0": ScaleSymmetry((("0.weight", 0), ("0.bias", 0)), (("2.weight", 1),)),
        "P_2": ScaleSymmetry((("2.weight", 0), ("2.bias", 0)), (("4.weight", 1),)),
    }
    # after BatchNorm the scalable pre-activation is the BatchNorm's affine output; the
    # convolution feeding it is only approximately invariant (eps, running statistics)
    spec = ba.spec_from_module(models.resnet(8, num_classes=3, base_channels=3, norm="batch"),
                               torch.zeros(2, 3, 6, 6))
    inner = spec.scalable["P_layer1.0.conv1"]
    assert inner.incoming == (("layer1.0.norm1.weight", 0), ("layer1.0.norm1.bias", 0))
    assert inner.outgoing == (("layer1.0.conv2.weight", 1),)
    assert all(not n.endswith("running_mean") and "conv" not in n or ax == 1
               for s in spec.scalable.values() for n, ax in (*s.incoming, *s.outgoing))
    # cnn: the flatten lays channels out in blocks, which the outgoing weights scale as blocks
    spec = ba.spec_from_module(models.cnn1d(1, 12, 3, channels=(4,), hidden=()),
                               torch.zeros(1, 1, 12))
    (sym,) = spec.scalable.values()
    assert sym.outgoing == (("4.weight", 1),) and spec.block("4.weight", 1) == 6


@pytest.mark.parametrize("activation", ["gelu", "tanh", "silu"])
def test_units_with_other_activations_are_not_scalable_and_rescaling_them_changes_the_function(
        activation):
    net = models.mlp(4, [8], 3, activation=activation).double()
    spec = ba.spec_from_module(net, torch.zeros(1, 4, dtype=torch.float64))
    assert spec.scalable == {}
    with pytest.raises(ValueError, match="not scalable"):
        ba.rescale(net, {"P_0": torch.full((8,), 2.0)}, spec)
    # the same rescaling forced through a hand-written spec changes the function
    forced = PermutationSpec(spec.axes_to_perm, scalable={"P_0": {
        "incoming": [("0.weight", 0), ("0.bias", 0)], "outgoing": [("2.weight", 1)]}})
    scaled = ba.rescale(net, {"P_0": torch.full((8,), 2.0, dtype=torch.float64)}, forced)
    x = torch.randn(6, 4, dtype=torch.float64)
    assert not close(scaled(x), net(x), rel=1e-3)


class _Custom(nn.Module):
    """Four hidden layers, each followed by a different operation."""

    def __init__(self, op: str):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.norm = nn.LayerNorm(8)
        self.op = op

    def forward(self, x):
        h = self.a(x)
        if self.op == "times_two":
            h = torch.relu(h * 2.0)
        elif self.op == "plus_one":
            h = torch.relu(h + 1.0)
        elif self.op == "relu6":
            h = nn.functional.relu6(h)
        elif self.op == "layernorm":
            h = torch.relu(self.norm(h))
        elif self.op == "softplus":
            h = nn.functional.softplus(h)
        elif self.op == "shared":  # one layer called twice: its input columns read two chains
            h = torch.relu(self.b(torch.relu(self.b(torch.relu(h)))))
        elif self.op == "maxpool":
            h = nn.functional.max_pool1d(torch.relu(h).unsqueeze(2), 1).squeeze(2)
        return self.c(torch.relu(self.b(h)) if self.op != "shared" else h)


@pytest.mark.parametrize("op, scalable_a", [("times_two", True), ("plus_one", False),
                                            ("relu6", False), ("softplus", False),
                                            ("shared", False), ("maxpool", True)])
def test_derivation_rules(op, scalable_a):
    net = _Custom(op).double()
    spec = ba.spec_from_module(net, torch.zeros(1, 4, dtype=torch.float64))
    a_group = spec["a.weight"][0]
    assert (a_group in spec.scalable) is scalable_a
    if op == "shared":
        # b is called twice: rescaling a's units (b's columns) would change b's second call
        assert spec["b.weight"][0] not in spec.scalable
    sizes = spec.group_sizes({k: v.shape for k, v in net.state_dict().items()})
    x = torch.randn(5, 4, dtype=torch.float64)
    assert close(ba.rescale(net, random_scales(spec, sizes), spec)(x), net(x))


def test_layernorm_over_the_units_breaks_the_chain_and_its_affine_output_starts_one():
    spec = ba.spec_from_module(_Custom("layernorm"), torch.zeros(1, 4))
    group = spec["a.weight"][0]
    assert spec.scalable[group].incoming == (("norm.weight", 0), ("norm.bias", 0))
    assert ("a.weight", 0) not in spec.scalable[group].incoming


def test_spec_scalable_round_trip_restrict_and_validation():
    spec = ba.spec_from_module(models.mlp(4, [8, 6], 3), torch.zeros(1, 4))
    again = PermutationSpec.from_dict(spec.to_dict())
    assert again.scalable == spec.scalable and again == spec
    # equality compares the permutation structure only
    assert PermutationSpec(spec.axes_to_perm) == spec
    assert PermutationSpec(spec.axes_to_perm).scalable == {}
    kept = spec.restrict(["0.weight", "0.bias", "2.weight", "2.bias"])
    assert list(kept.scalable) == ["P_0"]  # P_2 lost its outgoing weights
    with pytest.raises(ValueError, match="does not permute"):
        PermutationSpec(spec.axes_to_perm, scalable={"P_0": {
            "incoming": [("0.weight", 1)], "outgoing": [("2.weight", 1)]}})
    with pytest.raises(TypeError, match="incoming"):
        PermutationSpec(spec.axes_to_perm, scalable={"P_0": [("0.weight", 0)]})
    with pytest.raises(TypeError, match="scalable must be a mapping"):
        PermutationSpec(spec.axes_to_perm, scalable=[1])


# -- canonical forms -----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_canonicalize_gives_unit_norms_keeps_the_function_and_is_idempotent(arch):
    net, shape, spec, sizes = build(arch)
    canonical, scales = ba.canonicalize(net, spec, return_scales=True)
    state = canonical.state_dict()
    for group, norm in unit_norms(state, spec).items():
        torch.testing.assert_close(norm, torch.ones_like(norm), rtol=0, atol=1e-6)
    x = torch.randn(6, *shape, dtype=torch.float64)
    assert close(canonical(x), net(x))
    again, scales_again = ba.canonicalize(canonical, spec, return_scales=True)
    for k, v in state.items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=1e-6, atol=1e-9)
    # the scales returned reproduce the canonical object
    redone = ba.rescale(net, scales, spec)
    for k, v in state.items():
        torch.testing.assert_close(redone.state_dict()[k], v)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_permuted_and_rescaled_networks_have_the_same_canonical_form_up_to_the_permutation(arch):
    net, shape, spec, sizes = build(arch)
    perms = random_perms(sizes, torch.Generator().manual_seed(5))
    other = ba.rescale(ba.permute(net, perms, spec), random_scales(spec, sizes, seed=9), spec)
    expected = ba.permute(ba.canonicalize(net, spec), perms, spec).state_dict()
    got = ba.canonicalize(other, spec).state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind", GUIDE_KINDS)
def test_canonical_guides_are_the_exact_push_forward(kind, small_mlp_model):
    model = small_mlp_model
    guide = make_guide(kind, model, spread=0.5)
    canonical, scales = ba.canonicalize(guide, return_scales=True)
    assert type(canonical) is type(guide)
    view, new = as_gaussian(guide), as_gaussian(canonical)
    # the linear map, applied to the flat vector of all weights
    ones = {k: torch.ones_like(v) for k, v in view.loc.items()}
    d = torch.cat([v.reshape(-1) for v in ba.rescale(ones, scales, model.spec).values()])
    assert not torch.allclose(d, torch.ones_like(d))
    loc, _, _ = view.flat()
    new_loc, _, _ = new.flat()
    torch.testing.assert_close(new_loc, d * loc)
    cov = torch.cat([v.reshape(-1) for v in view.stddev().values()]) ** 2
    new_cov = torch.cat([v.reshape(-1) for v in new.stddev().values()]) ** 2
    torch.testing.assert_close(new_cov, d ** 2 * cov, rtol=1e-4, atol=1e-10)
    if view.factor is not None:
        _, s, w = view.flat()
        _, s2, w2 = new.flat()
        full = torch.diag(s ** 2) + w @ w.T
        full2 = torch.diag(s2 ** 2) + w2 @ w2.T
        torch.testing.assert_close(full2, d[:, None] * full * d[None, :], rtol=1e-4, atol=1e-9)
    # canonical means: unit incoming norms; the function of every pushed-forward draw is kept
    for norm in unit_norms(new.loc, model.spec).values():
        torch.testing.assert_close(norm, torch.ones_like(norm), rtol=1e-5, atol=1e-5)
    x = torch.randn(6, 5)
    draws = view.sample(4, torch.Generator().manual_seed(1))
    pushed = state_as_draws(ba.rescale(draws_as_state(draws), scales,
                                       batched_spec(model.spec)))
    for s in range(4):
        out = model.evaluate({k: v[s] for k, v in draws.items()}, x)
        out2 = model.evaluate({k: v[s] for k, v in pushed.items()}, x)
        assert close(out2, out, rel=1e-5)


def draws_as_state(draws):
    return {k: v.movedim(0, -1) for k, v in draws.items()}  # (site..., S): axes stay in place


def state_as_draws(state):
    return {k: v.movedim(-1, 0) for k, v in state.items()}


def batched_spec(spec):
    return PermutationSpec({k: (*v, None) for k, v in spec.axes_to_perm.items()},
                           scalable=spec.scalable)


def test_canonicalize_a_bayesian_network_and_a_state_dict(small_mlp_model):
    canonical = ba.canonicalize(small_mlp_model)
    assert isinstance(canonical, BayesianNetwork)
    state = ba.canonicalize(small_mlp_model.net.state_dict(), small_mlp_model.spec)
    for k, v in canonical.net.state_dict().items():
        torch.testing.assert_close(state[k], v)
    x = torch.randn(4, 5)
    torch.testing.assert_close(canonical.net(x), small_mlp_model.net(x), rtol=1e-5, atol=1e-6)
    assert not torch.equal(state["0.weight"], small_mlp_model.net.state_dict()["0.weight"])


def test_rescale_of_a_guide_moves_its_distribution_and_bad_scales_are_refused(small_mlp_model):
    guide = make_guide("mean_field", small_mlp_model)
    sizes = group_sizes(small_mlp_model)
    c = torch.rand(sizes["P_0"]) + 0.5
    moved = ba.rescale(guide, {"P_0": c})
    torch.testing.assert_close(as_gaussian(moved).scale["0.weight"],
                               as_gaussian(guide).scale["0.weight"] * c[:, None])
    torch.testing.assert_close(as_gaussian(moved).loc["2.weight"],
                               as_gaussian(guide).loc["2.weight"] / c[None, :])
    with pytest.raises(ValueError, match=r"shape \(7,\)"):
        ba.rescale(guide, {"P_0": torch.ones(3)})
    with pytest.raises(ValueError, match="finite and positive"):
        ba.rescale(guide, {"P_0": torch.zeros(7)})
    with pytest.raises(ValueError, match="not scalable"):
        ba.rescale(guide, {"nope": torch.ones(7)})
    with pytest.raises(TypeError, match="mapping"):
        ba.rescale(guide, [1.0])
    with pytest.raises(ValueError, match="no spec given"):
        ba.canonicalize({"w": torch.ones(2)})
    with pytest.raises(TypeError, match="expected a state dict"):
        ba.canonicalize(42, small_mlp_model.spec)


# -- match ---------------------------------------------------------------------------------------
def test_match_with_both_symmetries_recovers_a_planted_permutation_and_the_barrier_vanishes(
        small_mlp_model):
    model = small_mlp_model
    guide_a = make_guide("mean_field", model, spread=0.5)
    sizes = group_sizes(model)
    perms = random_perms(sizes, torch.Generator().manual_seed(2))
    scales = random_scales(model.spec, sizes)
    guide_b = ba.rescale(ba.permute(guide_a, perms), scales)
    result = ba.match(guide_a, guide_b, symmetries=("scale", "permutation"))
    assert result.symmetries == ("permutation", "scale")
    for g, p in perms.items():
        assert torch.equal(result.perms[g], torch.argsort(p))
    assert result.cost_after < 1e-8 < result.cost_before
    canonical_a, canonical_b = result.canonical
    assert set(result.scales[0]) == set(model.spec.scalable)
    torch.testing.assert_close(as_gaussian(result.aligned).loc["2.weight"],
                               as_gaussian(canonical_a).loc["2.weight"])
    x = torch.randn(64, 5)
    y = torch.randint(0, 3, (64,))
    for kind in ("wasserstein", "geodesic"):
        curve = ba.marginal_loss(model, ba.interpolate(canonical_a, result.aligned, kind=kind),
                                 (x, y), ts=5, num_samples=8)
        assert abs(curve.barrier("nll").value) < 1e-5
    # the same alignment applies anew, canonicalising first
    again = result.apply(guide_b)
    torch.testing.assert_close(as_gaussian(again).loc["0.weight"],
                               as_gaussian(result.aligned).loc["0.weight"])


def test_match_symmetries_bad_input(small_mlp_model):
    guide = make_guide("mean_field", small_mlp_model)
    with pytest.raises(ValueError, match="unknown name.*'rotation'"):
        ba.match(guide, guide, symmetries=("permutation", "rotation"))
    with pytest.raises(ValueError, match="must include 'permutation'"):
        ba.match(guide, guide, symmetries=("scale",))
    with pytest.raises(TypeError, match="tuple of names"):
        ba.match(guide, guide, symmetries="scale")


def test_alignment_with_scales_saves_and_loads(small_mlp_model, tmp_path):
    guide = make_guide("mean_field", small_mlp_model)
    result = ba.match(guide, guide, symmetries=("permutation", "scale"))
    result.save(tmp_path / "a.pt")
    loaded = ba.Alignment.load(tmp_path / "a.pt")
    assert loaded.symmetries == ("permutation", "scale")
    torch.testing.assert_close(loaded.scales[1]["P_0"], result.scales[1]["P_0"])


# -- the geodesic --------------------------------------------------------------------------------
def test_geodesic_stays_on_the_spheres_and_ends_at_the_endpoints(small_mlp_model):
    model = small_mlp_model
    torch.manual_seed(1)
    other = BayesianNetwork(models.mlp(5, [7, 6], 3), input_shape=(5,))
    a = ba.canonicalize(make_guide("low_rank", model, seed=1))
    b = ba.canonicalize(make_guide("low_rank", other, seed=2))
    path = ba.interpolate(a, b, kind="geodesic")
    linear = ba.interpolate(a, b)
    for t in (0.0, 0.1, 0.5, 0.9, 1.0):
        view = path.view_at(t)
        for norm in unit_norms(view.loc, model.spec).values():
            torch.testing.assert_close(norm, torch.ones_like(norm), rtol=1e-5, atol=1e-5)
        lin = linear.view_at(t)
        # standard deviations, factors and the last layer's bias move linearly
        for part in ("scale", "factor"):
            for k, v in getattr(lin, part).items():
                torch.testing.assert_close(getattr(view, part)[k], v)
        torch.testing.assert_close(view.loc["4.bias"], lin.loc["4.bias"])
    for t, end in ((0.0, a), (1.0, b)):
        for k, v in as_gaussian(end).loc.items():
            torch.testing.assert_close(path.view_at(t).loc[k], v, rtol=1e-5, atol=1e-6)
    middle = path.view_at(0.5).loc["0.weight"]
    assert not torch.allclose(middle, linear.view_at(0.5).loc["0.weight"])
    assert type(path.at(0.5)) is type(a)


def test_geodesic_equals_the_linear_path_when_the_endpoints_coincide(small_mlp_model):
    a = ba.canonicalize(make_guide("mean_field", small_mlp_model))
    path, linear = ba.interpolate(a, a, kind="geodesic"), ba.interpolate(a, a)
    for t in (0.0, 0.3, 1.0):
        for k, v in linear.view_at(t).loc.items():
            torch.testing.assert_close(path.view_at(t).loc[k], v)
    noise = path.noise(3, torch.Generator().manual_seed(0))
    for k, v in linear.draw(0.3, noise).items():
        torch.testing.assert_close(path.draw(0.3, noise)[k], v)


def test_slerp_rows():
    u0 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    u1 = torch.tensor([[0.0, 1.0], [0.0, 3.0], [0.0, 2.0], [-1.0, 0.0]], dtype=torch.float64)
    out = slerp(u0, u1, 0.5)
    torch.testing.assert_close(out[0], torch.tensor([0.5, 0.5], dtype=torch.float64).sqrt())
    torch.testing.assert_close(out[1].norm(), torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(out[2], torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.isfinite(out).all()  # antipodal ends: no NaN


def test_geodesic_bad_input(small_mlp_model):
    state = small_mlp_model.net.state_dict()
    with pytest.raises(ValueError, match="no spec given"):
        ba.interpolate(state, state, kind="geodesic")
    with pytest.raises(ValueError, match="kind must be one of"):
        ba.interpolate(state, state, kind="great-circle")


# -- local energy --------------------------------------------------------------------------------
def _trained(seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(256, 4)
    y = (x[:, 0] + x[:, 1] > 0).long()
    net = models.mlp(4, [16], 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return BayesianNetwork(net, input_shape=(4,)), net, (x, y)


def test_local_energy_rises_with_noise_and_is_invariant_to_rescaling():
    model, net, data = _trained()
    sigmas = [0.0, 0.3, 3.0]
    energy = ba.local_energy(model, net, data, sigmas, num_draws=16, seed=1)
    plain = (net(data[0]).argmax(1) != data[1]).double().mean().item()
    assert energy.mean[0] == pytest.approx(plain) and energy.se[0] == 0.0
    assert energy.mean[2] > energy.mean[0] + 0.1 and energy.se[2] > 0
    sizes = model.spec.group_sizes({k: v.shape for k, v in net.state_dict().items()})
    scaled = ba.rescale(net, random_scales(model.spec, sizes), model.spec)
    again = ba.local_energy(model, scaled, data, sigmas, num_draws=16, seed=1)
    assert again.mean == pytest.approx(energy.mean, abs=1e-9)
    # a guide is measured at its means
    from bnn_align import guides

    guide = guides.mean_field(model)
    from_guide = ba.local_energy(model, guide, data, sigmas, num_draws=16, seed=1)
    assert from_guide.mean == pytest.approx(energy.mean, abs=1e-9)
    assert from_guide.to_dict()["num_draws"] == 16


def test_local_energy_bad_input():
    model, net, data = _trained()
    with pytest.raises(ValueError, match="non-negative"):
        ba.local_energy(model, net, data, [0.1, -0.5])
    with pytest.raises(ValueError, match="empty"):
        ba.local_energy(model, net, data, [])
    with pytest.raises(ValueError, match="num_draws"):
        ba.local_energy(model, net, data, [0.1], num_draws=0)
    with pytest.raises(TypeError, match="BayesianNetwork"):
        ba.local_energy(net, net, data, [0.1])
    with pytest.raises(ValueError, match="site '0.weight'"):
        ba.local_energy(model, models.mlp(4, [8], 2), data, [0.1])
