"""match(): planted recovery, monotone objective, invariance, determinism and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from bnn_align import (Alignment, BayesianNetwork, Gaussian, PermutationSpec, alignment_cost,
                       as_gaussian, guides, match, models, permute, spec_from_module)
from bnn_align.posterior import model_of
from bnn_align.symmetry.permutation import identity_perms, invert, random_perms

from conftest import Recurrent, group_sizes, make_guide, permuted_noise


def orthogonal(r: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(r, r, generator=torch.Generator().manual_seed(seed)))
    return q


def planted(guide, model, *, seed: int = 1, noise: float = 1e-3, rotate: bool = True):
    """guide_b = a random permutation of guide_a, with small noise on means, scales and factors
    (and the low-rank factor's columns rotated, which leaves the distribution unchanged)."""
    perms = random_perms(group_sizes(model), torch.Generator().manual_seed(seed))
    moved = permute(guide, perms)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            if name.endswith("cov_factor") and rotate:
                p.copy_(p @ orthogonal(p.shape[1], seed))
            p.add_(noise * torch.randn(p.shape, generator=gen))
    return moved, invert(perms)  # invert(perms) aligns moved back onto guide


ARCHES = {
    "mlp": (lambda: models.mlp(8, [16, 12], 4), (8,)),
    "cnn1d": (lambda: models.cnn1d(1, 12, 4, channels=(6, 5), hidden=(7,)), (1, 12)),
    "resnet": (lambda: models.resnet(8, width=1, dim=1, in_channels=1, num_classes=3,
                                     base_channels=6), (1, 10)),
}


def make(arch: str) -> BayesianNetwork:
    build, shape = ARCHES[arch]
    return BayesianNetwork(build(), input_shape=shape)


def w2_objective(view_a, view_b) -> float:
    """The coupled squared distance recomputed from two views, independently of match."""
    total = 0.0
    for s in view_a.sites:
        total += float(((view_a.loc[s] - view_b.loc[s]).double() ** 2).sum())
        if view_a.kind not in ("point", "full_rank") and view_b.kind not in ("point", "full_rank"):
            total += float(((view_a.scale[s] - view_b.scale[s]).double() ** 2).sum())
        if view_a.factor is not None and view_b.factor is not None:
            total += float(((view_a.factor[s] - view_b.factor[s]).double() ** 2).sum())
    return total


@pytest.mark.parametrize("arch", list(ARCHES))
@pytest.mark.parametrize("kind", ["mean_field", "low_rank", "delta"])
def test_planted_permutations_are_recovered(arch, kind):
    model = make(arch)
    guide_a = make_guide(kind, model, spread=0.3)
    guide_b, truth = planted(guide_a, model)
    result = match(guide_a, guide_b)
    for g, p in truth.items():
        assert torch.equal(result.perms[g], p), g
    assert result.converged
    assert result.cost_after < 1e-3 * result.cost_before
    # only the noise is left: its energy is about noise^2 per parameter
    d = sum(p.numel() for p in guide_b.parameters())
    assert result.cost_after < 10 * d * 1e-6
    recomputed = w2_objective(as_gaussian(guide_a), as_gaussian(result.aligned))
    assert result.cost_after == pytest.approx(recomputed, rel=1e-4, abs=1e-9)


def test_planted_recovery_for_state_dicts_and_mixed_kinds():
    model = make("cnn1d")
    net_a = model.net
    perms = random_perms(group_sizes(model), torch.Generator().manual_seed(4))
    sd_b = permute(net_a.state_dict(), perms, model.spec)
    result = match(net_a.state_dict(), sd_b, spec=model.spec)
    assert all(torch.equal(result.perms[g], p) for g, p in invert(perms).items())
    assert result.cost_after == 0.0
    # a mean-field posterior against a point estimate at its permuted means
    guide = make_guide("mean_field", model, spread=0.3)
    delta = make_guide("delta", model)
    with torch.no_grad():
        for site, value in as_gaussian(guide).loc.items():
            owner = delta
            *path, attr = site.split(".")
            for part in path:
                owner = getattr(owner, part)
            getattr(owner, attr + "_unconstrained").copy_(value)
    result = match(guide, permute(delta, perms))
    assert all(torch.equal(result.perms[g], p) for g, p in invert(perms).items())
    # what is left is the spread of the mean-field posterior: sum of its variances
    variances = sum(float((s.double() ** 2).sum()) for s in as_gaussian(guide).scale.values())
    assert result.cost_after == pytest.approx(variances, rel=1e-5)


@pytest.mark.parametrize("arch,kind,method", [
    ("mlp", "mean_field", "mean"), ("mlp", "low_rank", "wasserstein"),
    ("resnet", "mean_field", "wasserstein"), ("resnet", "low_rank", "wasserstein"),
])
def test_objective_never_increases_and_is_recomputable(arch, kind, method):
    if arch == "mlp":  # wider than ARCHES["mlp"], so that descent takes several sweeps
        model, other = (BayesianNetwork(models.mlp(8, [32, 24], 4), input_shape=(8,))
                        for _ in range(2))
    else:
        model, other = make(arch), make(arch)
    a = make_guide(kind, model, spread=0.3, seed=1)
    b = make_guide(kind, other, spread=0.3, seed=2)
    result = match(a, b, spec=model.spec, method=method)
    history = np.array(result.history)
    assert len(history) == result.iterations >= 2
    # steps are exact assignments; the tracked objective is exact up to float32 rounding
    assert (np.diff(history) <= 1e-6 * history[0]).all()
    assert result.cost_after <= result.cost_before
    assert result.cost_after < 0.99 * result.cost_before  # independent nets: a real gain
    if method == "mean":
        recompute = lambda va, vb: sum(float(((va.loc[s] - vb.loc[s]).double() ** 2).sum())
                                       for s in va.sites)
    else:
        recompute = w2_objective
    assert result.cost_after == pytest.approx(
        recompute(as_gaussian(a), as_gaussian(result.aligned)), rel=1e-5)
    if kind == "mean_field":  # low-rank: cost_before has the factors' best rotation
        assert result.cost_before == pytest.approx(
            recompute(as_gaussian(a), as_gaussian(b)), rel=1e-6)


@pytest.mark.parametrize("kind", ["mean_field", "low_rank", "delta"])
def test_aligned_guide_has_the_same_predictive_distribution(kind):
    model = make("cnn1d")
    a = make_guide(kind, model, seed=1, spread=0.3)
    b = make_guide(kind, make("cnn1d"), seed=2, spread=0.3)
    result = match(a, b, spec=model.spec)
    assert type(result.aligned) is type(b)
    vb, va = as_gaussian(b), as_gaussian(result.aligned)
    noise = vb.standard_normal(5, torch.Generator().manual_seed(0))
    theta_b = vb.transform(noise)
    theta_aligned = va.transform(permuted_noise(vb, result.perms, model.spec, noise,
                                                result.rotation))
    x = torch.randn(7, 1, 12)
    for s in range(5):
        out_b = model.evaluate({k: v[s] for k, v in theta_b.items()}, x)
        out_aligned = model.evaluate({k: v[s] for k, v in theta_aligned.items()}, x)
        assert (out_b - out_aligned).abs().max() < 1e-4 * max(1.0, out_b.abs().max().item())


def test_same_seed_same_result_and_inputs_untouched():
    model = make("resnet")
    a = make_guide("mean_field", model, seed=1, spread=0.3)
    b = make_guide("mean_field", make("resnet"), seed=2, spread=0.3)
    before = [p.detach().clone() for p in (*a.parameters(), *b.parameters())]
    r1 = match(a, b, seed=5, num_restarts=2, spec=model.spec)
    r2 = match(a, b, seed=5, num_restarts=2, spec=model.spec)
    assert all(torch.equal(r1.perms[g], r2.perms[g]) for g in r1.perms)
    assert r1.history == r2.history
    after = [p.detach() for p in (*a.parameters(), *b.parameters())]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert b.model is model or b.model is not None


def test_aligned_guide_is_built_on_one_torch_thread_and_the_setting_restored(monkeypatch):
    """BLAS threads still spin after the descent; the aligned guide is built on torch's calling
    thread alone, and the process-wide thread count is given back, also on an error."""
    import bnn_align.matching.weights as matching

    model = make("mlp")
    a = make_guide("mean_field", model, seed=1, spread=0.3)
    b = make_guide("mean_field", make("mlp"), seed=2, spread=0.3)
    seen = []
    permute_into = matching.permute_into

    def recording_permute(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return permute_into(*args, **kwargs)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(matching, "permute_into", recording_permute)
        result = match(a, b, spec=model.spec)
        assert seen == [1] and torch.get_num_threads() == 2
        assert all(torch.equal(x, y) for x, y in zip(result.aligned.parameters(),
                                                      permute(b, result.perms).parameters()))

        def failing_permute(*args, **kwargs):
            raise RuntimeError("boom")

        monkeypatch.setattr(matching, "permute_into", failing_permute)
        with pytest.raises(RuntimeError, match="boom"):
            match(a, b, spec=model.spec)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_solver_threads_one_for_small_problems_the_given_count_else(monkeypatch):
    """Small problems run on one thread (a busy neighbour process slows a two-thread match
    several times); large ones on torch's count; ``num_threads`` overrides both. The
    process-wide setting is restored every time."""
    import bnn_align._threads as _threads
    import bnn_align.matching.weights as matching

    model = make("mlp")
    a = make_guide("mean_field", model, seed=1, spread=0.3)
    b = make_guide("mean_field", make("mlp"), seed=2, spread=0.3)
    seen = []
    descend = matching.descend

    def recording_descend(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return descend(*args, **kwargs)

    monkeypatch.setattr(matching, "descend", recording_descend)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        reference = match(a, b, spec=model.spec)
        explicit = match(a, b, spec=model.spec, num_threads=2)
        monkeypatch.setattr(_threads, "THREADED_WORK", 1)  # every problem is "large"
        large = match(a, b, spec=model.spec)
        assert seen == [1, 2, 2] and torch.get_num_threads() == 2
        for other in (explicit, large):
            assert other.cost_after == pytest.approx(reference.cost_after, rel=1e-6)
        for bad in (0, 1.5, True):
            with pytest.raises(ValueError, match="num_threads must be a positive integer"):
                match(a, b, spec=model.spec, num_threads=bad)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["mean_field", "diagonal", "delta"])
def test_aligned_guide_owns_its_memory_and_the_inputs_stay_as_they_were(kind):
    """The aligned guide's parameters are written into the solver's working copies where those
    fit (the scales computed for the objective), never into memory of the inputs: it equals
    permute(guide_b), no two of its parameters share memory, none shares memory with an input,
    and changing it leaves both inputs as they were."""
    from bnn_align.matching.weights import _working_copies

    model = make("resnet")
    a = make_guide(kind, model, seed=1, spread=0.3)
    b = make_guide(kind, make("resnet"), seed=2, spread=0.3)
    before = [p.detach().clone() for p in (*a.parameters(), *b.parameters())]
    result = match(a, b, spec=model.spec)
    expected = permute(b, result.perms)
    assert all(torch.equal(x, y) for x, y in zip(result.aligned.parameters(),
                                                  expected.parameters()))
    inputs = {p.untyped_storage().data_ptr() for g in (a, b) for p in g.parameters()}
    aligned = [p.untyped_storage().data_ptr() for p in result.aligned.parameters()]
    assert len(set(aligned)) == len(aligned) and not inputs & set(aligned)
    with torch.no_grad():
        for p in result.aligned.parameters():
            p.add_(1.0)
    after = [p.detach() for p in (*a.parameters(), *b.parameters())]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    # what may be reused: the computed scales of AutoNormal, never a view of a parameter
    va, vb = as_gaussian(a, copy=False), as_gaussian(b, copy=False)
    spare = {t.untyped_storage().data_ptr() for t in _working_copies((va, vb), (a, b))}
    assert not spare & inputs
    if kind == "mean_field":
        assert spare == {t.untyped_storage().data_ptr()
                         for v in (va, vb) for t in v.scale.values()}


def test_restarts_keep_the_best():
    model = make("resnet")
    a = make_guide("mean_field", model, seed=1, spread=0.3)
    b = make_guide("mean_field", make("resnet"), seed=2, spread=0.3)
    one = match(a, b, spec=model.spec, seed=3)
    many = match(a, b, spec=model.spec, seed=3, num_restarts=4)
    assert len(many.restart_costs) == 4
    assert many.cost_after == min(many.restart_costs) <= one.cost_after + 1e-9


def test_wasserstein_beats_mean_matching_when_only_scales_are_informative():
    model = BayesianNetwork(models.mlp(6, [10], 3), input_shape=(6,))
    a = make_guide("mean_field", model, seed=1)
    with torch.no_grad():  # every hidden unit has the same means: they carry no information
        for p in a.locs.parameters():
            p.fill_(0.1)
    b, truth = planted(a, model, seed=7, noise=0.0)
    w2 = match(a, b)
    mean = match(a, b, method="mean")
    assert all(torch.equal(w2.perms[g], p) for g, p in truth.items())
    va = as_gaussian(a)
    w2_cost = w2_objective(va, as_gaussian(w2.aligned))
    mean_cost = w2_objective(va, as_gaussian(mean.aligned))
    assert w2_cost < 1e-10
    assert mean_cost > 1e-3
    assert mean.cost_after == pytest.approx(0.0, abs=1e-10)  # its own objective cannot tell


def exact_w2_squared(va, vb) -> float:
    """Exact squared 2-Wasserstein distance between two full Gaussians (matrix square roots)."""
    def moments(v):
        loc, scale, factor = v.flat()
        cov = torch.diag(scale.double() ** 2)
        if factor is not None:
            cov = cov + factor.double() @ factor.double().T
        return loc.double().numpy(), cov.numpy()

    ma, ca = moments(va)
    mb, cb = moments(vb)
    root_a = scipy.linalg.sqrtm(ca).real
    cross = scipy.linalg.sqrtm(root_a @ cb @ root_a).real
    return float(((ma - mb) ** 2).sum() + np.trace(ca + cb - 2 * cross))


@pytest.mark.parametrize("kind", ["low_rank", "full_rank"])
def test_factor_objective_bounds_the_exact_w2_and_alignment_lowers_it(kind):
    model = BayesianNetwork(models.mlp(4, [6, 5], 3), input_shape=(4,))
    a = make_guide(kind, model, seed=1, spread=0.3)
    b = make_guide(kind, BayesianNetwork(models.mlp(4, [6, 5], 3), input_shape=(4,)), seed=2,
                   spread=0.3)
    result = match(a, b, spec=model.spec)
    exact_before = exact_w2_squared(as_gaussian(a), as_gaussian(b))
    exact_after = exact_w2_squared(as_gaussian(a), as_gaussian(result.aligned))
    assert exact_after < exact_before
    assert result.cost_after >= exact_after - 1e-6  # a coupling's cost bounds W2^2 from above
    assert result.cost_before >= exact_before - 1e-6
    # planted: the exact W2 after alignment is only the noise
    c, _ = planted(a, model, seed=3, noise=1e-4)
    aligned = match(a, c).aligned
    assert exact_w2_squared(as_gaussian(a), as_gaussian(aligned)) < 1e-3 * exact_before


def test_low_rank_rotation_is_applied_to_the_aligned_factor():
    model = make("mlp")
    a = make_guide("low_rank", model, spread=0.3)
    b, _ = planted(a, model, noise=0.0)
    result = match(a, b)
    assert result.rotation is not None and result.rotation.shape == (3, 3)
    torch.testing.assert_close(result.rotation.T @ result.rotation, torch.eye(3),
                               atol=1e-5, rtol=0)
    fa, fb = as_gaussian(a).factor, as_gaussian(result.aligned).factor
    for s in fa:
        torch.testing.assert_close(fa[s], fb[s], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["mlp", "resnet"])
def test_activation_matching_recovers_planted_permutations(arch):
    model = make(arch)
    a = make_guide("delta", model, spread=0.3)
    b, truth = planted(a, model, noise=0.0)
    x = torch.randn(256, *model.input_shape)
    result = match(a, b, method="activation", data=x)
    for g, p in truth.items():
        assert torch.equal(result.perms[g], p), g
    assert result.cost_after < 1e-8


def test_activation_matching_under_mean_field_posteriors():
    model = make("mlp")
    a = make_guide("mean_field", model, spread=0.3)
    b, truth = planted(a, model, noise=0.0)
    data = (torch.randn(512, 8), torch.zeros(512, dtype=torch.long))
    result = match(a, b, method="activation", data=data, num_samples=64, seed=1)
    agree = np.mean([float((result.perms[g] == p).float().mean()) for g, p in truth.items()])
    assert agree > 0.9
    assert result.cost_after < 0.1 * result.cost_before


def test_alignment_save_load_and_apply(tmp_path):
    model = make("mlp")
    a = make_guide("mean_field", model, spread=0.3)
    b, _ = planted(a, model)
    result = match(a, b)
    path = tmp_path / "alignment.pt"
    result.save(path)
    loaded = Alignment.load(path)
    assert loaded.aligned is None and loaded.spec == result.spec
    assert all(torch.equal(loaded.perms[g], result.perms[g]) for g in result.perms)
    assert loaded.cost_after == result.cost_after and loaded.history == result.history
    applied = loaded.apply(b)
    for s, v in as_gaussian(applied).loc.items():
        assert torch.equal(v, as_gaussian(result.aligned).loc[s])
    torch.save({"not": "an alignment"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="does not hold a saved bnn_align Alignment"):
        Alignment.load(tmp_path / "other.pt")
    assert "Alignment(method='wasserstein'" in repr(result)


def test_loading_a_file_that_is_not_an_alignment_says_what_was_expected(tmp_path):
    # torch's own unpickling errors (a text file, a pickled module) used to surface raw
    text, module = tmp_path / "notes.txt", tmp_path / "model.pt"
    text.write_text("not a checkpoint")
    torch.save(torch.nn.Linear(2, 2), module)
    for path in (text, module):
        with pytest.raises(ValueError, match=r"not a saved bnn_align Alignment.*Alignment\.save"):
            Alignment.load(path)
    with pytest.raises(FileNotFoundError):
        Alignment.load(tmp_path / "missing.pt")


# ------------------------------------------------------------------------------- bad input --
def test_bad_input_is_rejected_and_nothing_is_modified():
    model = make("mlp")
    a = make_guide("mean_field", model, spread=0.3)
    snapshot = [p.detach().clone() for p in a.parameters()]
    wider = make_guide("mean_field", BayesianNetwork(models.mlp(8, [16, 13], 4),
                                                     input_shape=(8,)))
    with pytest.raises(ValueError, match=r"site '2.weight' has shape \(12, 16\) in guide_a but "
                                         r"\(13, 16\)"):
        match(a, wider)
    deeper = make_guide("mean_field", BayesianNetwork(models.mlp(8, [16, 12, 5], 4),
                                                      input_shape=(8,)))
    with pytest.raises(ValueError, match="different architectures"):
        match(a, deeper)
    broken = make_guide("mean_field", make("mlp"))
    with torch.no_grad():
        broken.locs.__getattr__("2").weight_unconstrained[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"guide_b has NaN or infinite values in the mean of "
                                         r"site '2.weight'"):
        match(a, broken)
    with torch.no_grad():
        broken.locs.__getattr__("2").weight_unconstrained[0, 0] = 0.0
        broken.scales.__getattr__("0").bias_unconstrained[1] = float("inf")
    with pytest.raises(ValueError, match="scale of site '0.bias'"):
        match(a, broken)
    other_spec = make("cnn1d").spec
    with pytest.raises(ValueError, match="spec does not fit"):
        match(a, a, spec=other_spec)
    bad_sizes = PermutationSpec({"0.weight": ("P", None), "2.weight": ("P", None)})
    with pytest.raises(ValueError, match="group 'P'"):
        match(a, a, spec=bad_sizes)
    with pytest.raises(ValueError, match="needs data"):
        match(a, a, method="activation")
    with pytest.raises(ValueError, match="method must be one of"):
        match(a, a, method="procrustes")
    with pytest.raises(ValueError, match="max_iter"):
        match(a, a, max_iter=0)
    with pytest.raises(ValueError, match="not a permutation"):
        match(a, a, init={g: torch.zeros(n, dtype=torch.long)
                          for g, n in group_sizes(model).items()})
    with pytest.raises(TypeError, match="expected a posterior"):
        match(a, "guide")
    plain = {"0.weight": torch.randn(16, 8)}
    with pytest.raises(ValueError, match="no spec given"):
        match(plain, plain)
    sd = {k: v for k, v in model.net.state_dict().items()}
    with pytest.raises(ValueError, match="site '4.bias' is missing from guide_b"):
        match(a, {k: v for k, v in sd.items() if k != "4.bias"})
    huge = make_guide("mean_field", make("mlp"), spread=1e20)
    with pytest.raises(ValueError, match="overflows"):
        match(a, huge)
    assert all(torch.equal(x, y.detach()) for x, y in zip(snapshot, a.parameters()))
    assert torch.isnan(broken.locs.__getattr__("2").weight_unconstrained).sum() == 0


def test_unknown_reaches_the_derived_spec_and_the_advice_names_the_callers_argument():
    model = BayesianNetwork(Recurrent(), input_shape=(5, 4))
    a, b = make_guide("mean_field", model, spread=0.3), make_guide("mean_field", model, seed=1)
    for name, call in (("match", match), ("alignment_cost", alignment_cost)):
        with pytest.raises(ValueError, match=rf"'rnn' \(LSTM\): recurrent layers .* Pass "
                                             rf"unknown='fix' to {name}\(\)") as info:
            call(a, b)
        assert "spec=spec_from_module(net, example_input, unknown='fix')" in str(info.value)
        with pytest.raises(ValueError, match="unknown must be 'error' or 'fix', got 'skip'"):
            call(a, b, unknown="skip")
    result = match(a, b, unknown="fix")
    fixed = spec_from_module(model.net, model.example_input(), unknown="fix")
    assert result.spec == fixed and len(result.perms) == 2  # the head after the LSTM
    assert result.cost_after < result.cost_before
    assert alignment_cost(a, b, result.perms, unknown="fix") == pytest.approx(result.cost_after,
                                                                              rel=1e-5)
    # the spec derived with "fix" is cached apart: the default still refuses, and the advice
    # of .spec and permute (neither takes unknown=) names what they can be given instead
    for call in (lambda: model.spec, lambda: permute(b, result.perms)):
        with pytest.raises(ValueError, match=r"recurrent layers") as info:
            call()
        assert "spec_from_module(model.net, model.example_input(), unknown='fix')" in str(
            info.value) and "Pass unknown='fix' to leave" not in str(info.value)
    with pytest.raises(ValueError, match="recurrent layers"):
        match(a, b)


@pytest.mark.parametrize("method", ["wasserstein", "mean"])
@pytest.mark.parametrize("kind,param,part", [
    ("mean_field", lambda g: next(iter(g.locs.parameters())), "mean"),
    ("mean_field", lambda g: next(iter(g.scales.parameters())), "scale"),
    # a low-rank view's factor carries the scales as well: either part may be named first
    ("low_rank", lambda g: g.loc, "mean"),
    ("low_rank", lambda g: g.scale_unconstrained, "(scale|covariance factor)"),
    ("low_rank", lambda g: g.cov_factor, "covariance factor"),
    ("delta", lambda g: next(iter(g.parameters())), "mean")])
def test_nan_in_any_part_is_named_whatever_the_objective_reads(method, kind, param, part):
    """The objective's own pass stands in for the NaN check of the values it reads; every
    other part (the scales under "mean", the factors, which the rotation reads first) is
    still checked before anything runs."""
    model = make("mlp")
    a, b = make_guide("low_rank", model, spread=0.3), make_guide(kind, model, seed=1)
    with torch.no_grad():
        param(b).view(-1)[0] = float("nan")
    first = next(iter(as_gaussian(b).sites))
    for call in (lambda: match(a, b, method=method),
                 lambda: alignment_cost(a, b, method=method)):
        with pytest.raises(ValueError, match=f"guide_b has NaN or infinite values in the {part} "
                                             f"of site '{first}'"):
            call()


class _Stream(torch.nn.Module):
    """Two layers on one residual stream: ``mix.weight`` carries the stream's group on both
    axes, so the objective is quadratic in that group's permutation."""

    def __init__(self, wiring: str = "residual"):
        super().__init__()
        self.inp, self.mix, self.out = (torch.nn.Linear(6, 20), torch.nn.Linear(20, 20),
                                        torch.nn.Linear(20, 3))
        self.wiring = wiring

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = h + torch.relu(self.mix(h)) if self.wiring == "residual" else torch.relu(self.mix(h))
        return self.out(h)


def test_objective_never_increases_when_a_tensor_carries_a_group_twice():
    for seed in range(5):
        torch.manual_seed(seed)
        model_a = BayesianNetwork(_Stream(), input_shape=(6,))
        model_b = BayesianNetwork(_Stream(), input_shape=(6,))
        (group,) = {g for g in model_a.spec["mix.weight"]}
        assert model_a.spec["mix.weight"] == (group, group)
        a = make_guide("mean_field", model_a, spread=0.3, seed=seed)
        b = make_guide("mean_field", model_b, spread=0.3, seed=seed + 10)
        result = match(a, b, seed=seed)
        history = np.array([result.cost_before] + result.history)
        assert (np.diff(history) <= 1e-6 * history[0]).all(), history
        assert result.converged and result.iterations < 100
        assert result.cost_after == pytest.approx(
            w2_objective(as_gaussian(a), as_gaussian(result.aligned)), rel=1e-5)


def test_same_names_but_different_wiring_is_rejected():
    torch.manual_seed(0)
    plain = guides.delta(BayesianNetwork(_Stream("plain"), input_shape=(6,)))
    residual = guides.delta(BayesianNetwork(_Stream("residual"), input_shape=(6,)))
    with pytest.raises(ValueError, match="different architectures"):
        match(plain, residual)
    # the user may insist on one spec
    result = match(plain, residual, spec=model_of(plain).spec)
    assert set(result.perms) == set(model_of(plain).spec.perm_to_axes)


@pytest.mark.parametrize("kind", ["mean_field", "low_rank"])
def test_planted_resnet_is_recovered_from_a_single_start(kind):
    """Coupled residual groups: without the warm start on the means, coordinate descent on the
    full objective from the identity stopped in a wrong local optimum for some seeds."""
    for seed in range(6):
        model = make("resnet")
        a = make_guide(kind, model, spread=0.3, seed=seed)
        b, truth = planted(a, model, seed=seed + 1)
        result = match(a, b, seed=seed)
        assert all(torch.equal(result.perms[g], p) for g, p in truth.items()), seed


def test_alignment_cost_recomputes_the_objective_at_any_permutations():
    model = make("cnn1d")
    a = make_guide("low_rank", model, seed=1, spread=0.3)
    b = make_guide("low_rank", make("cnn1d"), seed=2, spread=0.3)
    w2, mean = match(a, b), match(a, b, method="mean")
    assert alignment_cost(a, b) == pytest.approx(w2.cost_before, rel=1e-6)
    assert alignment_cost(a, b, w2.perms) == pytest.approx(w2.cost_after, rel=1e-5)
    assert alignment_cost(a, b, mean.perms, method="mean") == pytest.approx(mean.cost_after,
                                                                             rel=1e-5)
    # from a given start, the warm start on the means makes W2 matching at least as good as
    # mean matching on its objective
    identity = identity_perms(group_sizes(model))
    w2_from, mean_from = match(a, b, init=identity), match(a, b, method="mean", init=identity)
    assert alignment_cost(a, b, mean_from.perms) >= w2_from.cost_after * (1 - 1e-6)
    with pytest.raises(ValueError, match="method must be"):
        alignment_cost(a, b, method="activation")


@pytest.mark.parametrize("kind", ["mean_field", "diagonal", "low_rank", "full_rank", "delta"])
def test_scalar_sites_such_as_a_learned_noise_are_matched(kind):
    models_ = [BayesianNetwork(models.mlp(3, [8], 1), likelihood=Gaussian("learned"),
                               input_shape=(3,)) for _ in range(2)]
    a = make_guide(kind, models_[0], seed=1, spread=0.3)
    b, truth = planted(a, models_[0], seed=2)
    assert "obs_noise" in as_gaussian(a).sites
    result = match(a, b)
    assert all(torch.equal(result.perms[g], p) for g, p in truth.items())


@pytest.mark.parametrize("kind", ["mean_field", "low_rank"])
def test_cached_and_updated_similarities_equal_fresh_ones(kind):
    """The solver's reuse of work (cached contributions, low-rank updates after a few units
    moved, work arrays reused from product to product) gives the same similarity matrices and
    cost as computing every product afresh."""
    from bnn_align.matching.weights import _problem

    model = make("resnet")
    a = make_guide(kind, model, seed=1, spread=0.3)
    b = make_guide(kind, make("resnet"), seed=2, spread=0.3)
    va, vb = as_gaussian(a), as_gaussian(b)
    sizes = group_sizes(model)
    problem, _ = _problem(va, vb, "wasserstein", model.spec, sizes)
    problem._SCRATCH_BYTES = 0  # reuse work arrays for every gather and row copy
    gen = torch.Generator().manual_seed(0)
    problem.set_perms(random_perms(sizes, gen))
    problem.rotate()
    for g in sizes:
        problem.similarity(g)
    updated = []  # whether each attempted low-rank update was taken
    original_update = problem._update

    def counting_update(*args):
        matrix = original_update(*args)
        updated.append(matrix is not None)
        return matrix

    problem._update = counting_update
    for step in range(6):
        g = list(sizes)[step % len(sizes)]
        p = problem.perms[g].clone()
        i, j = torch.randperm(len(p), generator=gen)[:2].tolist()
        p[[i, j]] = p[[j, i]]  # a small move: neighbours get low-rank updates
        problem.set_perms({g: p})
        fresh, _ = _problem(va, vb, "wasserstein", model.spec, sizes)
        fresh._SCRATCH_BYTES = float("inf")  # a new array for every intermediate
        fresh.set_perms(problem.perms)
        fresh.rotate()
        problem.rotate()  # the factor's rotation moves too (low-rank): a full recomputation
        for h in sizes:
            np.testing.assert_allclose(problem.similarity(h), fresh.similarity(h),
                                       rtol=1e-4, atol=1e-4)
        assert problem.cost() == pytest.approx(fresh.cost(), rel=1e-6)
    if kind == "mean_field":
        assert sum(updated) > 0


@pytest.mark.parametrize("shape", [(70, 60, 6, 5), (420, 400), (5000,), ()])
def test_squared_distance_in_chunks_equals_the_whole_sum(shape):
    """The objective's per-tensor term, summed chunk by chunk over gathered rows (tensors above
    a chunk, 131072 numbers, and below), equals the float64 sum over the whole difference
    (squares of the float32 difference, as the solver has always summed them)."""
    from bnn_align.matching._descent import squared_distance

    rng = np.random.default_rng(len(shape))
    a = rng.standard_normal(shape).astype(np.float32)
    b = rng.standard_normal(shape).astype(np.float32)
    index = {ax: rng.permutation(n) for ax, n in enumerate(shape[:2])}
    if len(shape) == 4:
        index[3] = rng.permutation(shape[3])  # a permuted axis after a fixed one
        index[1] = None  # left as it is
    moved = b
    for ax, idx in index.items():
        if idx is not None:
            moved = np.take(moved, idx, axis=ax)
    # the difference in the tensors' float32, its squares summed in float64
    expected = float(np.sum(np.square(a - moved), dtype=np.float64))
    assert squared_distance(a, b, index) == pytest.approx(expected, rel=1e-12)
    assert squared_distance(a, b, {}) == pytest.approx(
        float(np.sum(np.square(a - b), dtype=np.float64)), rel=1e-12)


@pytest.mark.parametrize("arch", ["cnn1d", "resnet"])
@pytest.mark.parametrize("kind", ["mean_field", "low_rank"])
def test_similarity_is_the_sum_of_unfolded_products(arch, kind):
    """A group's similarity is ``sum_t A_t(axis) P_other(B_t)(axis)^T`` over the tensor axes it
    permutes: recomputed here in torch from the definition, independently of the solver's own
    gathers and axis moves (convolution kernels moved as one item, blocks of a flattened
    feature map, the trailing rank axis of covariance factors)."""
    from bnn_align.matching.weights import _problem
    from bnn_align.symmetry.permutation import axis_gathers

    model = make(arch)
    a = make_guide(kind, model, seed=1, spread=0.3)
    b = make_guide(kind, make(arch), seed=2, spread=0.3)
    va, vb = as_gaussian(a), as_gaussian(b)
    sizes = group_sizes(model)
    spec = model.spec
    problem, _ = _problem(va, vb, "wasserstein", spec, sizes)
    perms = random_perms(sizes, torch.Generator().manual_seed(5))
    problem.set_perms(perms)
    problem.rotate()
    for g, n in sizes.items():
        expected = torch.zeros(n, n, dtype=torch.float64)
        for site in va.sites:
            for axis, entry in enumerate(spec[site]):
                offset = 0
                for h in (entry if isinstance(entry, tuple) else (entry,)):
                    if h is None:
                        continue
                    width = sizes[h] * spec.blocks.get(site, {}).get(axis, 1)
                    if h == g:
                        for pa, pb in problem.pairs[site]:
                            ta, tb = torch.from_numpy(pa), torch.from_numpy(pb)
                            for ax, index in axis_gathers(spec[site], perms, spec.blocks.get(site),
                                                          skip=axis).items():
                                if index is not None:
                                    tb = tb.index_select(ax, index)
                            rows = [t.narrow(axis, offset, width).movedim(axis, 0).reshape(n, -1)
                                    for t in (ta, tb)]
                            expected += rows[0].double() @ rows[1].double().T
                    offset += width
        np.testing.assert_allclose(problem.similarity(g), expected.numpy(), rtol=1e-4,
                                   atol=1e-4 * float(expected.abs().max()))


def test_plain_modules_match_by_weights_and_activations():
    """Deterministic networks: modules are point estimates; with data= the spec is traced
    from the module, and activation matching runs the module itself."""
    net = models.mlp(8, [16, 12], 4)
    model = BayesianNetwork(net, input_shape=(8,))
    perms = random_perms(group_sizes(model), torch.Generator().manual_seed(2))
    other = permute(net, perms, model.spec)
    x = torch.randn(200, 8)
    for method in ("mean", "activation"):
        result = match(net, other, method=method, data=x)
        assert all(torch.equal(result.perms[g], p) for g, p in invert(perms).items()), method
        assert isinstance(result.aligned, torch.nn.Module)
        torch.testing.assert_close(result.aligned(x), net(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no spec given"):
        match(net, other)


@pytest.mark.parametrize("kind", ["mean_field", "low_rank"])
def test_tracked_history_equals_the_exact_objective_after_every_sweep(kind):
    """The history is updated from the assignment (and rotation) gains, not recomputed; the
    same seed stopped after k sweeps must give the k-th value exactly. (From the identity: the
    greedy start leaves this pair too few sweeps to compare.)"""
    model = make("resnet")
    a = make_guide(kind, model, seed=1, spread=0.3)
    b = make_guide(kind, make("resnet"), seed=2, spread=0.3)
    identity = identity_perms(group_sizes(model))
    full = match(a, b, spec=model.spec, seed=4, init=identity)
    assert full.iterations >= 2
    for k in range(1, full.iterations):
        partial = match(a, b, spec=model.spec, seed=4, max_iter=k, init=identity)
        assert partial.history == pytest.approx(full.history[:k - 1] + [partial.cost_after],
                                                rel=1e-6)
        assert full.history[k - 1] == pytest.approx(partial.cost_after, rel=1e-5)


@pytest.mark.parametrize("signal", [0.0, 0.3, 3.0])
def test_assignment_steps_are_exact_with_and_without_the_row_maxima_shortcut(signal):
    """The shortcut (rows' argmaxes that form a permutation) must give the optimal value;
    without a strong diagonal it must not fire and the solver decides."""
    from scipy.optimize import linear_sum_assignment

    from bnn_align.matching._descent import assign, row_maxima_permutation

    rng = np.random.default_rng(7)
    fired = 0
    for trial in range(20):
        n = int(rng.integers(2, 40))
        planted = rng.permutation(n)
        s = rng.standard_normal((n, n)).astype(np.float32)
        s[np.arange(n), planted] += signal * n  # a clear optimum when signal is large
        p = assign(s).numpy()
        assert sorted(p) == list(range(n))
        rows, cols = linear_sum_assignment(s.astype(np.float64), maximize=True)
        optimum = s.astype(np.float64)[rows, cols].sum()
        assert s.astype(np.float64)[np.arange(n), p].sum() == pytest.approx(optimum, rel=1e-6)
        fired += row_maxima_permutation(s) is not None
    if signal == 3.0:
        assert fired == 20
    if signal == 0.0:
        assert fired < 20


@pytest.mark.parametrize("arch", list(ARCHES))
def test_greedy_start_settles_a_planted_permutation_in_one_pass(arch):
    """Each group solved once from its already-solved neighbours: a near-copy needs no descent."""
    from bnn_align.matching._descent import greedy_start
    from bnn_align.matching.weights import _prepare, _problem

    model = make(arch)
    a = make_guide("mean_field", model, spread=0.3)
    b, truth = planted(a, model, seed=3)
    va, vb, spec, sizes = _prepare(a, b, None, None)
    problem, _ = _problem(va, vb, "mean", spec, sizes)
    perms = greedy_start(problem)
    for g, p in truth.items():
        assert torch.equal(perms[g], p), g


def test_a_given_init_is_used_without_the_greedy_start(monkeypatch):
    from bnn_align.matching import _descent

    model = make("resnet")
    a = make_guide("mean_field", model, seed=1, spread=0.3)
    b = make_guide("mean_field", make("resnet"), seed=2, spread=0.3)
    calls = []
    original = _descent.greedy_start
    monkeypatch.setattr(_descent, "greedy_start", lambda p: calls.append(1) or original(p))
    for method in ("wasserstein", "mean"):
        calls.clear()
        match(a, b, method=method, num_restarts=2)
        assert len(calls) == 1, method  # the default start only, not the random restart
        calls.clear()
        match(a, b, method=method, init=identity_perms(group_sizes(model)))
        assert not calls, method


def test_certified_margin_bounds_every_other_assignment():
    """The margin is a lower bound on how much the rows' argmax permutation beats every other
    one (checked against all permutations), and none is given for a permutation that does not
    pick every row's best entry."""
    import itertools

    from bnn_align.matching._descent import certified_margin

    rng = np.random.default_rng(3)
    certified = 0
    for trial in range(30):
        n = int(rng.integers(2, 7))
        s = rng.standard_normal((n, n)).astype(np.float32)
        s[np.arange(n), rng.permutation(n)] += float(rng.uniform(0, 4))
        total = {p: s.astype(np.float64)[np.arange(n), list(p)].sum()
                 for p in itertools.permutations(range(n))}
        best = max(total, key=total.get)
        for p in [best] + [tuple(rng.permutation(n)) for _ in range(3)]:
            chosen = s[np.arange(n), list(p)]
            margin = certified_margin(s, np.array(p), float(np.abs(chosen).sum()))
            assert margin >= 0.0
            if margin > 0:
                assert all(total[p] - value >= margin - 1e-5
                           for q, value in total.items() if q != p)
                certified += 1
        swapped = np.array(best)
        swapped[[0, 1]] = swapped[[1, 0]]
        assert certified_margin(s, swapped, 1.0) == 0.0
    assert certified > 5
    assert certified_margin(np.ones((1, 1), np.float32), np.zeros(1, int), 1.0) == math.inf
    # a margin within the rounding of large similarity entries is none
    s = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    assert certified_margin(s, np.arange(2), 2.0) == 2.0
    assert certified_margin(s, np.arange(2), 1e5) == 0.0


@pytest.mark.parametrize("arch", list(ARCHES))
@pytest.mark.parametrize("kind", ["mean_field", "low_rank"])
def test_certified_groups_end_where_solving_them_ends(arch, kind, monkeypatch):
    """A group whose margin on part of its similarity exceeds what the missing terms could
    gain is not solved (or, see ``means_first``, solved on the means alone): the result must
    be the one solving it on everything gives, bit for bit. On a planted pair that spares
    solves, among them W2's over the standard deviations."""
    from bnn_align.matching._descent import Problem

    model = make(arch)
    a = make_guide(kind, model, seed=1, spread=0.3)
    pairs = {"planted": planted(a, model, seed=5)[0],
             "independent": make_guide(kind, make(arch), seed=2, spread=0.3)}
    margin, similarity = Problem.margin, Problem.similarity
    for method in ("wasserstein", "mean"):
        for setting, b in pairs.items():
            # (whole similarity?, over the parts after the means?) per call
            solves = {True: [], False: []}
            mode = [True]  # with certificates?
            monkeypatch.setattr(Problem, "margin", margin)
            monkeypatch.setattr(
                Problem, "similarity",
                lambda self, g, settled=None, first_part=0, into=None: solves[mode[0]].append(
                    (settled is None, self.active == self.num_parts))
                or similarity(self, g, settled, first_part, into))
            with_certificates = match(a, b, method=method, seed=3)
            # no margin, no certificate: every step solved on every part
            monkeypatch.setattr(Problem, "margin", lambda self, *args: 0.0)
            mode[0] = False
            solved = match(a, b, method=method, seed=3)
            assert all(torch.equal(with_certificates.perms[g], p)
                       for g, p in solved.perms.items())
            assert with_certificates.history == solved.history
            assert with_certificates.iterations == solved.iterations
            assert with_certificates.converged == solved.converged
            if setting == "planted":
                assert len(solves[True]) < len(solves[False]), (arch, method)
                if method == "wasserstein":  # fewer solves over the standard deviations
                    assert (solves[True].count((True, True))
                            < solves[False].count((True, True))), arch


def test_no_certificate_when_the_scales_disagree_with_the_means():
    """Means planted one way and widely spread scales another: the means' optimum is clear,
    but the full objective must leave it, so no certificate may keep the group there."""
    model = BayesianNetwork(models.mlp(6, [10], 3), input_shape=(6,))
    a = make_guide("mean_field", model, seed=1, spread=0.3)
    with torch.no_grad():  # scales from about 0 to 15
        for p in a.scales.parameters():
            p.copy_(5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(9)))
    sizes = group_sizes(model)
    by_means = random_perms(sizes, torch.Generator().manual_seed(4))
    by_scales = random_perms(sizes, torch.Generator().manual_seed(5))
    b = permute(a, by_means)
    with torch.no_grad():
        for p, q in zip(b.scales.parameters(), permute(a, by_scales).scales.parameters()):
            p.copy_(q)
    means_only = invert(by_means)
    mean = match(a, b, method="mean")
    assert all(torch.equal(mean.perms[g], p) for g, p in means_only.items())
    result = match(a, b)
    assert all(torch.equal(result.perms[g], p) for g, p in invert(by_scales).items())
    assert result.cost_after < 0.1 * alignment_cost(a, b, means_only)


def test_the_greedy_start_is_refined_on_the_means_only_where_they_vary_most(monkeypatch):
    """Trained-like pairs (means varying more than the standard deviations) keep the descent
    on the means after the greedy start, and with it W2's edge over mean matching; pairs whose
    standard deviations vary more go from the greedy start to the W2 descent directly."""
    from bnn_align.matching import _descent

    means_descents = []
    original = _descent.coordinate_descent

    def counting(problem, *args, **kwargs):
        means_descents.append(problem.active == 1 < problem.num_parts)
        return original(problem, *args, **kwargs)

    monkeypatch.setattr(_descent, "coordinate_descent", counting)
    model = make("resnet")
    for wide_scales in (False, True):
        a = make_guide("mean_field", model, seed=1, spread=0.3)
        b = make_guide("mean_field", make("resnet"), seed=2, spread=0.3)
        if wide_scales:  # softplus of N(1, 1): scales of about 0.3 to 3
            with torch.no_grad():
                for guide, seed in ((a, 3), (b, 4)):
                    gen = torch.Generator().manual_seed(seed)
                    for p in guide.scales.parameters():
                        p.copy_(torch.randn(p.shape, generator=gen) + 1)
        means_descents.clear()
        w2 = match(a, b)
        assert any(means_descents) != wide_scales
        mean = match(a, b, method="mean")
        if not wide_scales:
            assert alignment_cost(a, b, mean.perms) >= w2.cost_after * (1 - 1e-6)
        else:  # here the means' optimum is a poor start for W2
            assert alignment_cost(a, b, mean.perms) > w2.cost_after
