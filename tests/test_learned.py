"""Learned matching (match(method="ste" | "sinkhorn")): a planted permutation is kept, the
validation barrier never rises above the "wasserstein" start, the straight-through gradient,
doubly stochastic Sinkhorn matrices, reproducibility, and bad input."""

from __future__ import annotations

import math

import pyro
import pytest
import torch

from bnn_align import (Alignment, BayesianNetwork, alignment_cost, fit, guides, interpolate,
                       marginal_loss, match, models, permute)
from bnn_align.data import digits
from bnn_align.matching.learned import VALIDATION_FRACTION, _Sinkhorn, _split, _StraightThrough
from bnn_align.matching.weights import _prepare
from bnn_align.symmetry.permutation import identity_perms, invert, permute_tensors, random_perms
from bnn_align.posterior import GaussianView, model_of

from conftest import group_sizes, make_guide

METHODS = ["ste", "sinkhorn"]


def small_model() -> BayesianNetwork:
    return BayesianNetwork(models.mlp(6, [8, 7], 3), input_shape=(6,))


def small_data(n: int = 60, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def planted(guide, model, *, seed: int = 1, noise: float = 1e-4):
    """A random permutation of ``guide`` with a little noise, and the permutations that align
    it back onto ``guide``."""
    perms = random_perms(group_sizes(model), torch.Generator().manual_seed(seed))
    moved = permute(guide, perms)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(noise * torch.randn(p.shape, generator=gen))
    return moved, invert(perms)


def state(guide) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in guide.state_dict().items()}


@pytest.fixture(scope="module")
def trained_pair():
    """Two mean-field MLPs 64-16-16-10 on digits, each trained a few epochs from its seed."""
    split = digits()
    pair = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = BayesianNetwork(models.mlp(64, [16, 16], 10), input_shape=(64,))
        guide = guides.mean_field(model)
        with pyro.get_param_store().scope():
            fit(model, guide, split.train, epochs=5, batch_size=256, seed=seed, progress=False)
        pair.append(guide)
    return (*pair, split)


# ------------------------------------------------------------------------------ behaviour --
def batchnorm_resnet() -> BayesianNetwork:
    """A residual network whose BatchNorm statistics are buffers the permutations move."""
    net = models.resnet(8, 1, 3, in_channels=1, dim=1, norm="batch", base_channels=4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, buffer in net.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=gen))
            elif name.endswith("running_var"):
                buffer.copy_(1 + torch.rand(buffer.shape, generator=gen))
    return BayesianNetwork(net, input_shape=(1, 10))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind, arch", [("mean_field", "mlp"), ("low_rank", "mlp"),
                                        ("delta", "mlp"), ("mean_field", "resnet")])
def test_a_planted_permutation_is_kept(method, kind, arch):
    model = small_model() if arch == "mlp" else batchnorm_resnet()
    guide_a = make_guide(kind, model, spread=0.3)
    guide_b, truth = planted(guide_a, model)
    x, y = small_data()
    data = (x, y) if arch == "mlp" else (torch.randn(60, 1, 10), y)
    result = match(guide_a, guide_b, method=method, data=data, epochs=2, batch_size=16)
    for g, p in truth.items():
        assert torch.equal(result.perms[g], p), g
    # the learned permutations themselves are the planted ones (the validation barrier is
    # computed once when they equal the start's), not a worse choice the check turned down
    assert result.validation_barrier == result.validation_barrier_start
    assert result.kept is False and result.converged
    assert result.method == method and result.iterations == 2 and len(result.history) == 2
    assert all(math.isfinite(v) for v in result.history)
    w2 = match(guide_a, guide_b)
    assert result.cost_after == pytest.approx(w2.cost_after, rel=1e-6)
    assert result.cost_before == pytest.approx(w2.cost_before, rel=1e-6)


def independent_validation_barrier(guide_a, aligned, split, num_samples, seed):
    """The NLL barrier on the held-out part of the training data, from marginal_loss."""
    model = model_of(guide_a)
    _, validation = _split(model, guide_a, split.train, "ste", seed)
    assert len(validation[0]) == round(VALIDATION_FRACTION * len(split.x_train))
    return marginal_loss(model, interpolate(guide_a, aligned), validation, ts=11,
                         num_samples=num_samples, metrics=["nll"], seed=seed
                         ).barrier("nll").value


@pytest.mark.parametrize("method, lr", [("ste", 0.05), ("sinkhorn", 1.0)])
def test_the_validation_barrier_never_rises_above_the_wasserstein_start(trained_pair, method,
                                                                        lr):
    guide_a, guide_b, split = trained_pair
    before = (state(guide_a), state(guide_b), split.x_train.clone())
    result = match(guide_a, guide_b, method=method, data=split.train, epochs=2, lr=lr,
                   batch_size=128, num_samples=16, seed=3)
    w2 = match(guide_a, guide_b, seed=3)
    start = independent_validation_barrier(guide_a, w2.aligned, split, 16, 3)
    assert result.validation_barrier_start == pytest.approx(start, rel=1e-9, abs=1e-12)
    chosen = independent_validation_barrier(guide_a, result.aligned, split, 16, 3)
    assert chosen <= start
    same = all(torch.equal(result.perms[g], w2.perms[g]) for g in w2.perms)
    if result.kept:
        assert not same and result.validation_barrier < result.validation_barrier_start
        assert chosen == pytest.approx(result.validation_barrier, rel=1e-9)
    else:
        assert same and chosen == pytest.approx(start, rel=1e-9)
        assert result.validation_barrier >= result.validation_barrier_start
    # cost_after is the W2 objective of the permutations returned
    assert result.cost_after == pytest.approx(alignment_cost(guide_a, guide_b, result.perms),
                                              rel=1e-6)
    for old, new in zip(before[:2], (guide_a, guide_b)):
        assert all(torch.equal(v, new.state_dict()[k]) for k, v in old.items())
    assert torch.equal(before[2], split.x_train)


def test_a_learning_rate_that_moves_the_permutations_is_turned_down_by_validation(
        trained_pair):
    # STE with a large step leaves the basin: its permutations differ from the start's and
    # their validation barrier is higher, so the start is kept
    guide_a, guide_b, split = trained_pair
    result = match(guide_a, guide_b, method="ste", data=split.train, epochs=2, lr=0.2,
                   batch_size=128, num_samples=16, seed=3)
    assert result.validation_barrier > result.validation_barrier_start
    assert result.kept is False
    w2 = match(guide_a, guide_b, seed=3)
    assert all(torch.equal(result.perms[g], w2.perms[g]) for g in w2.perms)


def test_same_seed_same_result_and_progress_is_silent(capsys):
    model = small_model()
    guide_a = make_guide("mean_field", model, spread=0.3, seed=1)
    guide_b = make_guide("mean_field", model, spread=0.3, seed=2)
    data = small_data()
    runs = [match(guide_a, guide_b, method="sinkhorn", data=data, epochs=2, batch_size=16,
                  seed=5) for _ in range(2)]
    assert runs[0].history == runs[1].history
    assert runs[0].validation_barrier == runs[1].validation_barrier
    assert all(torch.equal(runs[0].perms[g], runs[1].perms[g]) for g in runs[0].perms)
    assert torch.rand(()) is not None  # the global generator is usable (and was restored)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_the_new_fields_are_saved_and_loaded(tmp_path):
    model = small_model()
    guide_a = make_guide("mean_field", model, spread=0.3)
    guide_b, _ = planted(guide_a, model)
    result = match(guide_a, guide_b, method="ste", data=small_data(), epochs=1, batch_size=32)
    result.save(tmp_path / "a.pt")
    loaded = Alignment.load(tmp_path / "a.pt")
    assert (loaded.validation_barrier_start, loaded.validation_barrier, loaded.kept) == (
        result.validation_barrier_start, result.validation_barrier, result.kept)
    assert "kept=False" in repr(result)


# ------------------------------------------------------------------------- the relaxations --
def test_the_straight_through_gradient_reaches_the_continuous_copy():
    model = small_model()
    guide_a = make_guide("low_rank", model, spread=0.3, seed=1)
    guide_b = make_guide("low_rank", model, spread=0.3, seed=2)
    va, vb, spec, sizes = _prepare(guide_a, guide_b, None, None)
    start = random_perms(sizes, torch.Generator().manual_seed(4))
    initial = GaussianView(vb.kind, *(permute_tensors(part, start, spec)
                                      for part in (vb.loc, vb.scale, vb.factor)))
    ste = _StraightThrough(vb, initial, identity_perms(sizes), spec, sizes, max_iter=100,
                           seed=0, threads=1)
    for p in ste.params:
        p.requires_grad_(True)
    # the stand-in is a permutation of guide_b, so it projects onto that permutation
    view = ste.view()
    assert all(torch.equal(ste.perms[g], start[g]) for g in start)
    expected = permute_tensors(vb.loc, start, spec)
    assert all(torch.equal(view.loc[s], expected[s]) for s in expected)
    # a loss with a known gradient: d/dcopy sum(w * view) = w, for every part
    gen = torch.Generator().manual_seed(9)
    weights = {part: {s: torch.randn(t.shape, generator=gen)
                      for s, t in getattr(view, part).items()}
               for part in ("loc", "scale", "factor")}
    loss = sum((weights[part][s] * t).sum() for part in weights
               for s, t in getattr(view, part).items())
    loss.backward()
    for part in weights:
        for s, t in getattr(ste.copy, part).items():
            assert torch.equal(t.grad, weights[part][s]), (part, s)
    # the projection follows the copy: moved onto another permutation, it projects there
    other = random_perms(sizes, torch.Generator().manual_seed(5))
    with torch.no_grad():
        for part in ("loc", "scale", "factor"):
            moved = permute_tensors(getattr(vb, part), other, spec)
            for s, t in getattr(ste.copy, part).items():
                t.copy_(moved[s])
    ste.view()
    assert all(torch.equal(ste.perms[g], other[g]) for g in other)


def test_sinkhorn_matrices_are_doubly_stochastic():
    model = BayesianNetwork(models.mlp(6, [40, 30], 3), input_shape=(6,))
    guide = make_guide("mean_field", model, spread=0.3)
    va, vb, spec, sizes = _prepare(guide, guide, None, None)
    start = random_perms(sizes, torch.Generator().manual_seed(2))
    relaxation = _Sinkhorn(vb, start, spec, total_steps=50)
    first = relaxation.matrices(1.0)
    for g, m in first.items():  # 0.9 of every row on the start's permutation
        assert torch.allclose(m[torch.arange(len(m)), start[g]],
                              torch.full((len(m),), 0.9, dtype=m.dtype), atol=1e-6)
    assert all(torch.equal(relaxation.permutations()[g], start[g]) for g in start)
    # logits as training leaves them: every entry moved, some rows nearly tied
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for logits in relaxation.logits.values():
            logits.add_(2.0 * torch.randn(logits.shape, generator=gen, dtype=logits.dtype))
    for step in (0, 10, 25, 49):
        for g, m in relaxation.matrices(relaxation.temperature(step)).items():
            ones = torch.ones(len(m), dtype=m.dtype)
            assert torch.allclose(m.sum(0), ones, atol=1e-5, rtol=0), (step, g)
            assert torch.allclose(m.sum(1), ones, atol=1e-5, rtol=0), (step, g)
            assert float(m.min()) >= 0.0
    assert relaxation.temperature(0) == 1.0
    assert relaxation.temperature(49) == pytest.approx(0.1)
    # differentiable in the logits
    for logits in relaxation.logits.values():
        logits.requires_grad_(True)
    view = relaxation.view()
    sum(v.square().sum() for v in view.loc.values()).backward()
    assert all(float(logits.grad.abs().sum()) > 0 for logits in relaxation.logits.values())


# ------------------------------------------------------------------------------- bad input --
def test_bad_input_is_rejected_naming_the_problem():
    model = small_model()
    guide_a = make_guide("mean_field", model, spread=0.3, seed=1)
    guide_b = make_guide("mean_field", model, spread=0.3, seed=2)
    x, y = small_data()
    for method in METHODS:
        with pytest.raises(ValueError, match="pass data=\\(x, y\\)"):
            match(guide_a, guide_b, method=method)
        with pytest.raises(ValueError, match="does not fit|do not fit"):
            match(guide_a, guide_b, method=method, data=(torch.randn(60, 5), y))
        with pytest.raises(ValueError, match="labels y have shape"):
            match(guide_a, guide_b, method=method, data=(x, y[:, None]))
        with pytest.raises(ValueError, match="60 inputs but 59 targets"):
            match(guide_a, guide_b, method=method, data=(x, y[:59]))
        with pytest.raises(TypeError, match="pair of tensors"):
            match(guide_a, guide_b, method=method, data=x)
        with pytest.raises(ValueError, match="at least 2 data points"):
            match(guide_a, guide_b, method=method, data=(x[:1], y[:1]))
        for epochs in (0, -1, 1.5):
            with pytest.raises(ValueError, match="epochs must be a positive integer"):
                match(guide_a, guide_b, method=method, data=(x, y), epochs=epochs)
        with pytest.raises(ValueError, match="lr must be a positive"):
            match(guide_a, guide_b, method=method, data=(x, y), lr=0.0)
        with pytest.raises(TypeError, match="guide_b must be a Pyro guide over a Bayes"):
            match(guide_a, model.net.state_dict(), method=method, data=(x, y))
        with pytest.raises(ValueError, match="guide_a and guide_b must be of one family"):
            match(guide_a, make_guide("delta", model), method=method, data=(x, y))
        with pytest.raises(ValueError, match="full-rank"):
            match(make_guide("full_rank", model), make_guide("full_rank", model, seed=3),
                  method=method, data=(x, y))
    assert VALIDATION_FRACTION == 0.2
