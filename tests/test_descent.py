"""The solver core on plain arrays, without posteriors: a planted permutation of a small chain,
and the assignment step."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import bnn_align.matching._descent as descent
from bnn_align import PermutationSpec
from bnn_align.matching._descent import (Problem, assign, assign_reduced, coordinate_descent, cost_at,
                                descend, greedy_start, in_parallel, reduced)
from bnn_align.symmetry.permutation import identity_perms, invert, permute_tensor

SPEC = PermutationSpec({"w1": ("h1", None), "b1": ("h1",), "w2": ("h2", "h1"),
                        "w3": (None, "h2")})
SIZES = {"h1": 20, "h2": 15}
SHAPES = {"w1": (20, 5), "b1": (20,), "w2": (15, 20), "w3": (4, 15)}


def scattered(a: np.ndarray, site: str, perms: dict[str, torch.Tensor]) -> np.ndarray:
    """``a`` permuted by the inverse of ``perms``, so gathering it by ``perms`` (what the
    solver does) gives ``a`` back."""
    return permute_tensor(torch.from_numpy(a), SPEC[site], invert(perms)).numpy()


def planted_pairs(seed: int, noise: float = 0.0) -> tuple[dict, dict[str, torch.Tensor]]:
    """Two parts per tensor (as the means and standard deviations), b a planted permutation of
    a plus ``noise`` times standard normal noise; and the planted permutations."""
    rng = np.random.default_rng(seed)
    planted = {g: torch.from_numpy(rng.permutation(n)) for g, n in SIZES.items()}
    pairs = {}
    for site, shape in SHAPES.items():
        parts = []
        for _ in range(2):
            a = rng.standard_normal(shape).astype(np.float32)
            b = scattered(a, site, planted)
            if noise:
                b = (b + noise * rng.standard_normal(shape)).astype(np.float32)
            parts.append((torch.from_numpy(a), torch.from_numpy(b)))
        pairs[site] = parts
    return pairs, planted


def test_descent_on_plain_arrays_recovers_a_planted_permutation():
    pairs, planted = planted_pairs(0)
    problem = Problem(pairs, SPEC, SIZES)
    assert problem.cost() > 1.0  # the identity is far from the planted permutations

    start = greedy_start(problem)
    perms, history, _, converged, rotation, _ = coordinate_descent(
        problem, start, 0.0, 20, np.random.default_rng(1), None)
    for g, p in planted.items():
        np.testing.assert_array_equal(perms[g].numpy(), p.numpy())
    assert converged and rotation is None
    assert history[-1] == 0.0  # an exact copy: every difference is zero
    assert all(later <= earlier for earlier, later in zip(history, history[1:]))
    # nothing the solver was handed was written to
    for site, parts in pairs.items():
        for a, b in parts:
            np.testing.assert_array_equal(scattered(a.numpy(), site, planted), b.numpy())


def test_descent_from_the_identity_stays_at_an_exact_match():
    rng = np.random.default_rng(2)
    pairs = {site: [(torch.from_numpy(a), torch.from_numpy(a.copy()))]
             for site, a in ((s, rng.standard_normal(shape).astype(np.float32))
                             for s, shape in SHAPES.items())}
    problem = Problem(pairs, SPEC, SIZES)
    identity = identity_perms(SIZES)
    perms, history, iterations, converged, _, _ = coordinate_descent(
        problem, identity, 0.0, 20, np.random.default_rng(3), None)
    assert all(torch.equal(perms[g], identity[g]) for g in SIZES)
    assert history == [0.0] and iterations == 1 and converged


def test_history_and_start_of_a_descent_are_the_objective_there():
    """Only the final objective is computed from the weights; the earlier values come from the
    steps' gains and must be the objective at those points."""
    for seed in range(3):
        pairs, _ = planted_pairs(seed, noise=2.0)  # far from the plant: several sweeps
        problem = Problem(pairs, SPEC, SIZES)
        start = identity_perms(SIZES)
        expected = Problem(pairs, SPEC, SIZES)  # computes every value directly
        result = coordinate_descent(problem, start, 1.5, 20, np.random.default_rng(seed), None)
        assert result.converged and len(result.history) == result.iterations >= 2
        assert result.initial == pytest.approx(cost_at(expected, start, 1.5), rel=1e-6)
        assert result.history[-1] == cost_at(expected, result.perms, 1.5)  # exact
        assert all(later <= earlier for earlier, later
                   in zip([result.initial, *result.history], result.history))
        # replaying the sweeps directly: the value after each is the objective there
        for sweep, value in enumerate(result.history[:-1], start=1):
            perms = coordinate_descent(Problem(pairs, SPEC, SIZES), start, 1.5, sweep,
                                       np.random.default_rng(seed), None).perms
            assert value == pytest.approx(cost_at(expected, perms, 1.5), rel=1e-6)


def test_a_refined_start_that_is_not_better_gives_the_descent_from_the_start(monkeypatch):
    """``descend`` learns whether the warm start beat ``start`` only after descending from
    it; if not, the result must be the descent from ``start`` with the group order it
    would have had."""
    pairs, _ = planted_pairs(5, noise=0.05)
    start = identity_perms(SIZES)
    worse = {g: torch.from_numpy(np.random.default_rng(9).permutation(n))
             for g, n in SIZES.items()}

    def bad_warm_start(problem, start, rng, greedy=False):
        rng.permutation(7)  # uses the generator, as the descent on the means would
        return worse

    monkeypatch.setattr(descent, "warm_start", bad_warm_start)
    problem = Problem(pairs, SPEC, SIZES)
    assert cost_at(Problem(pairs, SPEC, SIZES), worse, 0.0) > cost_at(problem, start, 0.0)
    rng = np.random.default_rng(11)
    result = descend(problem, 0.0, start, 20, rng, None, greedy=True)
    after = rng.random()

    rng_ref = np.random.default_rng(11)
    rng_ref.permutation(7)
    expected = coordinate_descent(Problem(pairs, SPEC, SIZES), start, 0.0, 20, rng_ref, None)
    assert all(torch.equal(result.perms[g], expected.perms[g]) for g in SIZES)
    assert result.history == expected.history
    assert after == rng_ref.random()  # the generator continues where that descent left it


def test_assignment_on_the_reduced_matrix_is_the_raw_optimum():
    # rows and columns offset by large constants, like the similarities of positive standard
    # deviations: the reduction must not change which assignment is best
    rng = np.random.default_rng(1)
    for n in (2, 7, 40, 120):
        similarity = (rng.standard_normal((n, n)) + 50 * rng.random((n, 1))
                      + 30 * rng.random((1, n))).astype(np.float32)
        before = similarity.copy()
        rows, cols = linear_sum_assignment(similarity.astype(np.float64), maximize=True)
        assert torch.equal(assign(similarity), torch.from_numpy(cols[np.argsort(rows)]))
        np.testing.assert_array_equal(similarity, before)  # not reduced in place
        r = reduced(similarity)
        np.testing.assert_allclose(r.max(0), 0, atol=1e-4)  # every column's best is 0
        assert (r.max(1) >= -1e-4).all()  # and no row lies below it everywhere
        kept = r.copy()
        assert torch.equal(assign_reduced(r), torch.from_numpy(cols[np.argsort(rows)]))
        np.testing.assert_array_equal(r, kept)  # solved negated in place, then restored


def test_objective_on_threads_is_the_serial_one_bit_for_bit(monkeypatch):
    """Large objectives are evaluated term by term on threads; every term and the total must
    be exactly the one-thread value, whatever order the threads finish in."""
    rng = np.random.default_rng(4)
    pairs = {site: [(torch.from_numpy(rng.standard_normal(shape).astype(np.float32)),
                     torch.from_numpy(rng.standard_normal(shape).astype(np.float32)))
                    for _ in range(2)] for site, shape in SHAPES.items()}
    perms = {g: torch.from_numpy(rng.permutation(n)) for g, n in SIZES.items()}
    values = {}
    threads, real = torch.get_num_threads(), descent.squared_distance
    try:
        for name, limit, workers in (("serial", 2**62, 1), ("threads", 0, 2)):
            monkeypatch.setattr(descent, "_PARALLEL_SIZE", limit)
            torch.set_num_threads(workers)
            calls = []
            monkeypatch.setattr(descent, "squared_distance",
                                lambda *args: calls.append(1) or real(*args))
            problem = Problem(pairs, SPEC, SIZES)
            problem.set_perms(perms)
            values[name] = (problem.cost(), dict(problem.distances))
            assert len(calls) == 2 * len(SHAPES)  # every term computed, once
    finally:
        torch.set_num_threads(threads)
    assert values["threads"][0] == values["serial"][0]
    assert values["threads"][1] == values["serial"][1]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_threads_work_in_a_child_forked_after_they_ran(monkeypatch):
    """A process forked after the objective ran on both threads (a multiprocessing pool over
    pairs of posteriors) must get threads of its own: the parent's do not exist in the child,
    and work queued for them would never run."""
    monkeypatch.setattr(descent, "_PARALLEL_SIZE", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def busy():  # long enough that both threads are started
            time.sleep(0.2)
            return 1

        assert in_parallel([busy, busy], [1, 1]) == [1, 1]
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report what the threads computed, then leave at once
            try:
                os.write(write, bytes(in_parallel([lambda: 3, lambda: 4], [1, 1])))
            finally:
                os._exit(0)
        os.close(write)
        for _ in range(100):
            if os.waitpid(pid, os.WNOHANG)[0]:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child's threads never ran its work")
        assert os.read(read, 2) == bytes([3, 4])
        os.close(read)
    finally:
        torch.set_num_threads(threads)


def test_the_descent_from_the_start_solves_a_lone_group_again(monkeypatch):
    """With one group, nothing its similarity depends on ever moves; when ``descend`` goes
    back from a worse refined point to ``start``, the group must still be solved there, not
    taken as solved at the permutation the first descent left (it used to stay at ``start``)."""
    spec = PermutationSpec({"w1": ("h", None), "w2": (None, "h")})
    rng = np.random.default_rng(3)
    truth = torch.from_numpy(rng.permutation(12))
    pairs = {}
    for site, shape in {"w1": (12, 5), "w2": (4, 12)}.items():
        parts = []
        for _ in range(2):
            a = rng.standard_normal(shape).astype(np.float32)
            b = permute_tensor(torch.from_numpy(a), spec[site], invert({"h": truth})).numpy()
            parts.append((torch.from_numpy(a), torch.from_numpy(b)))
        pairs[site] = parts
    start = identity_perms({"h": 12})
    problem = Problem(pairs, spec, {"h": 12})
    # a refined point worse than the start: the start's perm reversed, truth's far from it
    worse = {"h": torch.arange(11, -1, -1)}
    assert cost_at(Problem(pairs, spec, {"h": 12}), worse, 0.0) > cost_at(problem, start, 0.0)
    monkeypatch.setattr(descent, "warm_start", lambda problem, start, rng, greedy=False: worse)
    result = descend(problem, 0.0, start, 20, np.random.default_rng(0), None, greedy=True)
    assert torch.equal(result.perms["h"], truth)
    assert result.history[-1] == pytest.approx(0.0, abs=1e-9)


def _with_second_part(pairs: dict, scale: float, seed: int) -> dict:
    """``pairs`` with the second part of every tensor replaced by independent noise of
    ``scale`` on both sides (standard deviations unrelated to the means' plant)."""
    rng = np.random.default_rng(seed)
    out = {}
    for site, ((a0, b0), _) in pairs.items():
        shape = a0.shape
        out[site] = [(a0, b0)] + [tuple(torch.from_numpy(
            (scale * rng.standard_normal(shape)).astype(np.float32)) for _ in range(2))]
    return out


@pytest.mark.parametrize("spread", [0.02, 1.0])
def test_means_first_settles_a_step_only_as_solving_everything_would(spread):
    """Planted means and second parts of little (0.02) or great (1.0) spread: ``means_first``
    must give the step solving on everything gives, with its gain on the whole similarity;
    it may skip the second parts' products only where they cannot change the step."""
    pairs, planted = planted_pairs(4, noise=0.01)
    pairs = _with_second_part(pairs, spread, seed=5)
    start = dict(planted)
    start["h2"] = torch.from_numpy(np.random.default_rng(6).permutation(SIZES["h2"]))
    problem = Problem(pairs, SPEC, SIZES)
    problem.set_perms(start)
    before = problem.cost()
    similarity, gain = descent.means_first(problem, "h2")

    fresh = Problem(pairs, SPEC, SIZES)  # the whole similarity, solved directly
    fresh.set_perms(start)
    whole = fresh.similarity("h2")
    best = assign(whole)
    if spread < 0.1:
        assert gain is not None  # the means decide: their margin beats the noise
        assert torch.equal(problem.perms["h2"], best)
        assert torch.equal(best, planted["h2"])
        assert gain == pytest.approx(descent.assignment_gain(whole, best, start["h2"]),
                                     rel=1e-5)
        assert before - problem.cost() == pytest.approx(2 * gain, rel=1e-5)
    else:
        assert gain is None  # the second parts could outweigh the means' margin
        assert torch.equal(problem.perms["h2"], start["h2"])  # left as it was
        np.testing.assert_allclose(similarity, whole, rtol=1e-5, atol=1e-5)
