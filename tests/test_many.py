"""match_many, merge, repair, align_samples and the K-chain diagnostics: planted recovery,
cycle consistency, monotone objective, function invariance and bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from bnn_align import (BayesianNetwork, SamplePosterior, align_samples, as_gaussian,
                       diagnostics, guides, match, match_many, merge, models, permute, repair)
from bnn_align.matching.many import MultiAlignment, SampleAlignment
from bnn_align.symmetry.permutation import compose, identity_perms, invert, random_perms

from conftest import group_sizes, make_guide

K = 4


def planted_copies(obj, model, count=K, seed=1):
    """``count`` random relabellings of ``obj`` and the permutations used."""
    gen = torch.Generator().manual_seed(seed)
    planted = [random_perms(group_sizes(model), gen) for _ in range(count)]
    return [permute(obj, p, model.spec) for p in planted], planted


def true_pairwise(planted, i, j):
    """The permutations bringing copy j onto copy i: inv(r_j)[r_i]."""
    return {g: torch.argsort(planted[j][g])[planted[i][g]] for g in planted[i]}


def assert_perms_equal(p, q):
    assert p.keys() == q.keys()
    for g in p:
        assert torch.equal(p[g], q[g]), g


@pytest.mark.parametrize("kind", ["mean_field", "low_rank", "delta"])
def test_planted_copies_all_aligned_exactly(kind, small_mlp_model):
    guide = make_guide(kind, small_mlp_model)
    copies, planted = planted_copies(guide, small_mlp_model)
    result = match_many(copies)
    assert isinstance(result, MultiAlignment)
    assert result.history[-1] == pytest.approx(0.0, abs=1e-8)
    for i, j in itertools.product(range(K), repeat=2):
        assert_perms_equal(result.pairwise(i, j), true_pairwise(planted, i, j))
    # the aligned copies are one posterior, the merged one of the input kind
    views = [as_gaussian(a) for a in result.aligned]
    for v in views[1:]:
        for s in v.loc:
            torch.testing.assert_close(v.loc[s], views[0].loc[s])
    merged = merge(result)
    assert type(merged) is type(guide)
    merged_view = as_gaussian(merged)
    for s in merged_view.loc:
        torch.testing.assert_close(merged_view.loc[s], views[0].loc[s])


def test_planted_point_estimates_with_noise():
    net = models.mlp(6, [24, 16], 3)
    model = BayesianNetwork(net, input_shape=(6,))
    copies, planted = planted_copies(net.state_dict(), model, count=5)
    gen = torch.Generator().manual_seed(5)
    noisy = [{k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in c.items()}
             for c in copies]
    result = match_many(noisy, spec=model.spec)
    for i, j in itertools.product(range(5), repeat=2):
        assert_perms_equal(result.pairwise(i, j), true_pairwise(planted, i, j))
    # the merged network is the original up to the averaged noise
    merged = merge(result)
    x = torch.randn(32, 6)
    ref = result.apply(0, noisy[0])  # noisy copy 0 in the common frame
    out = model.evaluate(merged, x)
    assert torch.allclose(out, model.evaluate(ref, x), atol=0.05)
    back = permute(merged, invert(result.perms[0]), model.spec)  # the frame of copy 0
    assert torch.allclose(model.evaluate(back, x), net(x), atol=0.05)


def test_independent_posteriors_cycle_consistent_and_monotone(small_mlp_model):
    posteriors = [make_guide("mean_field", BayesianNetwork(models.mlp(5, [7, 6], 3),
                                                           input_shape=(5,)), spread=1.0, seed=k)
                  for k in range(K)]
    result = match_many(posteriors, max_iter=10)
    sizes = group_sizes(small_mlp_model)
    for i in range(K):
        assert_perms_equal(result.pairwise(i, i), identity_perms(sizes))
    for i, j, k in itertools.product(range(K), repeat=3):
        # k -> j, then j -> i, is k -> i
        assert_perms_equal(compose(result.pairwise(j, k), result.pairwise(i, j)),
                           result.pairwise(i, k))
    history = result.history
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(history, history[1:]))
    # the barycenter is the average of the aligned means and standard deviations
    views = [as_gaussian(a) for a in result.aligned]
    for s in views[0].loc:
        torch.testing.assert_close(result.barycenter.loc[s],
                                   torch.stack([v.loc[s] for v in views]).mean(0))
        torch.testing.assert_close(result.barycenter.scale[s],
                                   torch.stack([v.scale[s] for v in views]).mean(0))
    # aligning to the barycenter is no worse than aligning all to the first one
    pairwise = match_many(posteriors, reference=0)
    assert result.history[-1] <= pairwise.history[-1] + 1e-6
    assert pairwise.rounds == 1
    # each aligned posterior is its input permuted: same function (via its Gaussian)
    for k in range(K):
        moved = as_gaussian(permute(posteriors[k], result.perms[k]))
        torch.testing.assert_close(moved.loc["2.weight"], views[k].loc["2.weight"])


def test_sample_sets_enter_through_their_moments(small_mlp_model):
    base = {k: v.detach() for k, v in small_mlp_model.net.named_parameters()}
    copies, planted = planted_copies(base, small_mlp_model, count=3)
    gen = torch.Generator().manual_seed(0)
    sets = [SamplePosterior({k: v + 0.01 * torch.randn(20, *v.shape, generator=gen)
                             for k, v in c.items()}, model=small_mlp_model) for c in copies]
    result = match_many(sets)
    for i, j in itertools.product(range(3), repeat=2):
        assert_perms_equal(result.pairwise(i, j), true_pairwise(planted, i, j))
    pooled = merge(result)
    assert isinstance(pooled, SamplePosterior)
    assert pooled.num_chains == 3 and pooled.num_samples == 60


def test_bad_input(small_mlp_model):
    guide = make_guide("mean_field", small_mlp_model)
    other = guides.mean_field(BayesianNetwork(models.mlp(5, [8, 6], 3), input_shape=(5,)))
    with pytest.raises(ValueError, match="at least 2 posteriors, got 1"):
        match_many([guide])
    with pytest.raises(ValueError, match=r"posteriors\[1\].*different architectures"):
        match_many([guide, other])
    with pytest.raises(ValueError, match="one family.*posteriors\\[1\\] a low_rank"):
        match_many([guide, make_guide("low_rank", small_mlp_model)])
    with pytest.raises(ValueError, match="full-rank"):
        match_many([make_guide("full_rank", small_mlp_model)] * 2)
    with pytest.raises(TypeError, match="sequence"):
        match_many(guide)
    with pytest.raises(ValueError, match="reference"):
        match_many([guide, guide], reference=2)
    with pytest.raises(ValueError, match="method"):
        match_many([guide, guide], method="activation")
    with pytest.raises(TypeError, match="MultiAlignment"):
        merge(guide)
    before = as_gaussian(guide).loc["0.weight"].clone()
    match_many([guide, permute(guide, random_perms(group_sizes(small_mlp_model)))])
    assert torch.equal(as_gaussian(guide).loc["0.weight"], before)  # inputs never modified


# ------------------------------------------------------------------------------ REPAIR --
def test_repair_matches_the_endpoints_statistics():
    torch.manual_seed(0)
    nets = [models.mlp(6, [32, 32], 3) for _ in range(3)]
    spec = BayesianNetwork(nets[0], input_shape=(6,)).spec
    result = match_many(nets, spec=spec)
    merged = merge(result)
    x = torch.randn(512, 6)
    fixed = repair(merged, result.aligned, x)
    for depth, layer in ((1, 0), (3, 2)):  # outputs of the two hidden linear layers
        target_mean = torch.stack([n[:depth](x).mean(0) for n in result.aligned]).mean(0)
        target_sd = torch.stack([n[:depth](x).std(0, correction=0)
                                 for n in result.aligned]).mean(0)
        out = fixed[:depth](x)
        torch.testing.assert_close(out.mean(0), target_mean, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(out.std(0, correction=0), target_sd, atol=1e-4, rtol=1e-3)
    # the merged network's variance had collapsed; the input was not modified
    assert merged[:1](x).std(0).mean() < fixed[:1](x).std(0).mean()
    assert not torch.equal(merged[0].weight, fixed[0].weight)
    # repairing a network against copies of itself changes nothing
    same = repair(nets[0], [nets[0], nets[0]], x)
    torch.testing.assert_close(same(x), nets[0](x), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="endpoints is empty"):
        repair(merged, [], x)
    with pytest.raises(ValueError, match="not linear or convolutional"):
        repair(merged, nets, x, layers=["1"])


def test_repair_resets_batchnorm_statistics():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                              torch.nn.Linear(8, 2))
    x = torch.randn(256, 4) * 3 + 1
    fixed = repair(net, [net], x)
    h = fixed[0](x)
    torch.testing.assert_close(fixed[1].running_mean, h.mean(0), atol=1e-4, rtol=1e-4)
    assert torch.equal(net[1].running_mean, torch.zeros(8))  # the input is untouched


# ------------------------------------------------------------------------ align_samples --
def test_align_samples_planted_and_invariant(small_mlp_model):
    base = {k: v.detach() for k, v in small_mlp_model.net.named_parameters()}
    copies, planted = planted_copies(base, small_mlp_model, count=6)
    ensemble = SamplePosterior.from_modules(copies, model=small_mlp_model)
    result = match(small_mlp_model.net.state_dict(), ensemble)  # dispatches to align_samples
    assert isinstance(result, SampleAlignment)
    for s in range(6):
        assert_perms_equal({g: p[s] for g, p in result.perms.items()}, invert(planted[s]))
    assert float(result.cost_after.max()) == pytest.approx(0.0, abs=1e-10)
    assert (result.cost_before > 0).all()
    # every aligned sample computes its own function (float64)
    x = torch.randn(16, 5, dtype=torch.float64)
    net64 = BayesianNetwork(models.mlp(5, [7, 6], 3).double(), input_shape=(5,))
    for s in range(6):
        before = {k: v.double() for k, v in ensemble.point(s).items()}
        after = {k: v.double() for k, v in result.aligned.point(s).items()}
        torch.testing.assert_close(net64.evaluate(after, x), net64.evaluate(before, x),
                                   rtol=1e-12, atol=1e-12)


def test_align_samples_bad_input(small_mlp_model):
    ensemble = SamplePosterior.from_modules([models.mlp(5, [7, 6], 3) for _ in range(2)])
    with pytest.raises(ValueError, match="no spec"):
        align_samples(None, ensemble)
    with pytest.raises(TypeError, match="SamplePosterior"):
        align_samples(None, small_mlp_model.net.state_dict())
    with pytest.raises(TypeError, match="guide_a .* must be a single posterior"):
        match(ensemble, ensemble)
    other = BayesianNetwork(models.mlp(5, [8, 6], 3), input_shape=(5,))
    with pytest.raises(ValueError, match="different architectures"):
        align_samples(other.net.state_dict(), ensemble, spec=small_mlp_model.spec)


# ------------------------------------------------------------------------- diagnostics --
def planted_chains(model, chains=4, draws=40, seed=0):
    """``chains`` chains around one mode, each chain relabelled by its own permutation."""
    gen = torch.Generator().manual_seed(seed)
    base = {k: v.detach() for k, v in model.net.named_parameters()}
    copies, _ = planted_copies(base, model, count=chains, seed=seed + 1)
    samples = {k: torch.cat([c[k] + 0.05 * torch.randn(draws, *c[k].shape, generator=gen)
                             for c in copies]) for k in base}
    return SamplePosterior(samples, model=model, num_chains=chains)


def test_rhat_of_planted_permuted_chains(small_mlp_model):
    chains = planted_chains(small_mlp_model)
    # 40 draws per chain: R-hat of well-mixed iid chains scatters by about 0.01 around 1
    report = diagnostics.rhat_report(chains, threshold=1.05)
    assert report.num_chains == 4
    assert report.fraction_before > 0.9
    assert report.fraction_after < 0.05
    pooled = np.concatenate([v.reshape(-1) for v in report.after.values()])
    assert np.median(pooled) < 1.01
    assert report.rhat_informative
    # the aligned chains keep every sample's function
    result = align_samples(None, chains)
    x = torch.randn(8, 5)
    for s in (0, 50, 159):
        torch.testing.assert_close(small_mlp_model.evaluate(result.aligned.point(s), x),
                                   small_mlp_model.evaluate(chains.point(s), x),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="at least 2 chains"):
        diagnostics.rhat_report(chains.chains()[0])


def test_rhat_of_many_posteriors(small_mlp_model):
    guide = make_guide("mean_field", small_mlp_model)
    copies, _ = planted_copies(guide, small_mlp_model, count=3)
    report = diagnostics.rhat_report(match_many(copies), num_samples=100, threshold=1.05)
    assert report.num_chains == 3
    assert report.fraction_before > 0.5 and report.fraction_after < 0.1
    assert report.median_abs_d_after == 0.0 and report.median_abs_d_before > 1
    assert "3 chains" in str(report)


def test_transposition_distance_against_swap_counting():
    rng = np.random.default_rng(0)

    def swaps(p, q):  # selection sort of p^-1 o q, counting swaps
        r = list(np.argsort(p)[q])
        count = 0
        for i in range(len(r)):
            while r[i] != i:
                j = r[i]
                r[i], r[j] = r[j], r[i]
                count += 1
        return count

    for _ in range(20):
        p, q = rng.permutation(9), rng.permutation(9)
        a, b = rng.permutation(5), rng.permutation(5)
        expected = swaps(p, q) + swaps(a, b)
        got = diagnostics.transposition_distance({"x": torch.from_numpy(p), "y": torch.from_numpy(a)},
                                                 {"x": torch.from_numpy(q), "y": torch.from_numpy(b)})
        assert got == expected
    p = {"x": torch.arange(4)}
    assert diagnostics.transposition_distance(p, p) == 0
    with pytest.raises(ValueError, match="same groups"):
        diagnostics.transposition_distance(p, {"y": torch.arange(4)})
    with pytest.raises(ValueError, match="not a permutation"):
        diagnostics.transposition_distance(p, {"x": torch.tensor([0, 0, 1, 2])})


def test_batchnorm_buffers_move_and_merge():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                              torch.nn.Linear(8, 3))
    with torch.no_grad():
        net[1].running_mean.copy_(torch.randn(8))
        net[1].running_var.copy_(torch.rand(8) + 0.5)
    model = BayesianNetwork(net, input_shape=(4,))
    guide = make_guide("mean_field", model)
    copies, planted = planted_copies(guide, model, count=3)
    result = match_many(copies)
    for i, j in itertools.product(range(3), repeat=2):
        assert_perms_equal(result.pairwise(i, j), true_pairwise(planted, i, j))
    merged = merge(result)
    from bnn_align.posterior import model_of

    buffers = model_of(merged).net[1].running_mean
    expected = model_of(result.aligned[0]).net[1].running_mean
    torch.testing.assert_close(buffers, expected)
    # in the frame of copy 0 the merged posterior is the original one, statistics included
    back = permute(merged, invert(result.perms[0]))
    torch.testing.assert_close(model_of(back).net[1].running_mean,
                               model_of(copies[0]).net[1].running_mean)


def test_rhat_of_several_mcmc_runs(small_mlp_model):
    chains = planted_chains(small_mlp_model, chains=3)
    runs = chains.chains()                       # three runs of one chain each
    report = diagnostics.rhat_report(runs, threshold=1.05)
    assert report.num_chains == 3
    # the output bias (3 of 111 weights) is never permuted: it mixes before alignment too
    assert report.fraction_before > 0.8 and report.fraction_after < 0.05
    short = runs[1].with_samples({k: v[:10] for k, v in runs[1].samples.items()})
    with pytest.raises(ValueError, match="one length"):
        diagnostics.rhat_report([runs[0], short])
