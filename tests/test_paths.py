"""interpolate(): the Wasserstein path, the mixture, common random numbers and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pyro.infer import autoguide

from bnn_align import BayesianNetwork, as_gaussian, interpolate, match, models
from bnn_align.paths.interpolation import Mixture

from conftest import make_guide
from test_matching import exact_w2_squared


def small_model() -> BayesianNetwork:
    return BayesianNetwork(models.mlp(4, [6, 5], 3), input_shape=(4,))


def pair(kind: str):
    a = make_guide(kind, small_model(), seed=1, spread=0.3)
    b = make_guide(kind, small_model(), seed=2, spread=0.3)
    return a, b


@pytest.mark.parametrize("kind", ["mean_field", "diagonal", "low_rank", "full_rank", "delta"])
def test_wasserstein_path_is_linear_and_returns_guides_of_the_same_kind(kind):
    a, b = pair(kind)
    path = interpolate(a, b)
    va, vb = as_gaussian(a), as_gaussian(b)
    mid = path.at(0.3)
    assert type(mid) is type(a)
    vm = as_gaussian(mid)
    for s in va.sites:
        torch.testing.assert_close(vm.loc[s], 0.7 * va.loc[s] + 0.3 * vb.loc[s])
    if kind in ("mean_field", "diagonal"):
        for s in va.sites:  # standard deviations move linearly, not variances
            torch.testing.assert_close(vm.scale[s], 0.7 * va.scale[s] + 0.3 * vb.scale[s],
                                       rtol=1e-5, atol=1e-7)
    assert path.at(0.0) is a and path.at(1.0) is b


def test_point_estimates_interpolate_linearly_including_state_dicts():
    net_a, net_b = models.mlp(4, [6], 3), models.mlp(4, [6], 3)
    path = interpolate(net_a.state_dict(), net_b.state_dict())
    mid = path.at(0.25)
    for k, v in net_a.state_dict().items():
        torch.testing.assert_close(mid[k], 0.75 * v + 0.25 * net_b.state_dict()[k])


def test_low_rank_path_rotates_the_factor_and_stays_near_the_geodesic():
    a, b = pair("low_rank")
    # the same distribution as b with its factor's columns rotated: the path undoes it
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))
    rotated = make_guide("low_rank", small_model(), seed=2, spread=0.3)
    with torch.no_grad():
        rotated.cov_factor.copy_(b.cov_factor @ q)
    path = interpolate(b, rotated)
    mid = path.view_at(0.5)
    for s, f in as_gaussian(b).factor.items():
        torch.testing.assert_close(mid.factor[s], f, atol=1e-5, rtol=1e-5)
    # between different posteriors (aligned first), the interpolated path's length exceeds the
    # exact W2 distance by about 1% on these networks (0.3-1% measured): close to the geodesic
    aligned = match(a, b).aligned
    path = interpolate(a, aligned)
    d01 = exact_w2_squared(path.view_at(0), path.view_at(1)) ** 0.5
    for t in (0.25, 0.5, 0.75):
        d0t = exact_w2_squared(path.view_at(0), path.view_at(t)) ** 0.5
        dt1 = exact_w2_squared(path.view_at(t), path.view_at(1)) ** 0.5
        assert d0t + dt1 >= d01 * (1 - 1e-6)  # the triangle inequality: a sanity check
        assert d0t + dt1 <= 1.03 * d01


def test_common_random_numbers_reuse_the_noise_at_every_t():
    a, b = pair("mean_field")
    path = interpolate(a, b)
    ts = [0.0, 0.4, 1.0]
    draws = path.sample(ts, 7, torch.Generator().manual_seed(0))
    va = as_gaussian(a)
    site = "2.weight"
    assert draws[site].shape == (3, 7, *va.loc[site].shape)
    for i, t in enumerate(ts):
        view = path.view_at(t)
        eps = (draws[site][i] - view.loc[site]) / view.scale[site]
        eps0 = (draws[site][0] - va.loc[site]) / va.scale[site]
        torch.testing.assert_close(eps, eps0, rtol=1e-4, atol=1e-4)
    independent = path.sample(ts, 7, torch.Generator().manual_seed(0), common=False)
    eps_ind = [(independent[site][i] - path.view_at(t).loc[site]) / path.view_at(t).scale[site]
               for i, t in enumerate(ts)]
    assert not torch.allclose(eps_ind[0], eps_ind[1])


def test_mixture_picks_components_with_probability_t():
    a, b = pair("delta")
    path = interpolate(a, b, "mixture")
    q = path.at(0.3)
    assert isinstance(q, Mixture)
    draws = q.sample(4000, torch.Generator().manual_seed(0))
    loc_b = as_gaussian(b).loc["0.weight"]
    from_b = (draws["0.weight"] == loc_b).flatten(1).all(dim=1).float().mean().item()
    assert from_b == pytest.approx(0.3, abs=0.03)
    with pytest.raises(ValueError, match="not Gaussian"):
        path.view_at(0.5)


def test_paths_between_different_kinds():
    model = small_model()
    mean_field = make_guide("mean_field", model, spread=0.3)
    delta = make_guide("delta", model)
    path = interpolate(delta, mean_field)
    mid = path.at(0.5)
    assert isinstance(mid, autoguide.AutoNormal)  # the delta guide cannot hold a spread
    np.testing.assert_allclose(
        as_gaussian(mid).scale["0.weight"].numpy(),
        0.5 * as_gaussian(mean_field).scale["0.weight"].numpy(), rtol=1e-5)


def test_bad_input():
    a, b = pair("mean_field")
    path = interpolate(a, b)
    for t in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="t must lie in"):
            path.at(t)
    with pytest.raises(ValueError, match="num_samples"):
        path.sample([0.5], 0)
    other = make_guide("mean_field", BayesianNetwork(models.mlp(4, [7, 5], 3), input_shape=(4,)))
    with pytest.raises(ValueError, match="different architectures"):
        interpolate(a, other)
    with pytest.raises(ValueError, match="kind must be"):
        interpolate(a, b, "linear")
