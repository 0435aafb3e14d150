"""The solver core of :func:`bnn_align.match`: ``max_P sum_t <A_t, P(B_t)>`` over named arrays.

:class:`Problem` holds the pairs of arrays (one pair per tensor and part: means, standard
deviations, covariance factors) and evaluates a permutation group's similarity matrix, the
objective and the Procrustes rotation of the factors; the functions below take exact assignment
steps on it and run the descents and starts that :func:`bnn_align.match` chains. Nothing here
knows about Pyro or posteriors: ``matching`` turns those into the arrays.

Work is reused across steps: a group's similarity matrix is a sum of contributions, one per tensor
axis it permutes, and each contribution depends only on the permutations of that tensor's other
axes. Contributions are cached and recomputed only when one of those permutations changed, and a
group whose contributions are all unchanged is not solved again, nor a group whose margin on part
of its similarity (the greedy pass's, or the means') exceeds what the missing terms could gain
(see :meth:`Problem.certified`); a step is decided on the means' similarity alone when the same
bound shows the other parts cannot change it (see :func:`means_first`). Within one similarity
evaluation, large gathered and
transposed operands are written into reused work arrays; the objective is summed in cache-sized
chunks (see :func:`squared_distance`) and evaluated only where a value is reported, a decision
or a bound needs it: the values between come from the assignment steps' gains (see
:func:`coordinate_descent`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Mapping, NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ._gemm import product
from ..symmetry.permutation import axis_gathers, gathered_shape, identity_perms, take
from ..symmetry.spec import PermutationSpec, _groups_of


# --------------------------------------------------------------------------- the problem --
class Problem:
    """``max_P sum_t <A_t, P(B_t)>`` over named tensors, reusing work between steps.

    ``pairs[site]`` is a list of ``(A, B)`` arrays shaped like the site (plus trailing axes);
    the ``B`` of a covariance factor is replaced by ``W_b R`` at every rotation step, which bumps
    the site's ``part_version``. A group's similarity is a sum of contributions, one per tensor
    axis it permutes; each is cached with the permutations it was computed under. When only a
    few units of the tensor's other axis moved since, the cache is corrected by a low-rank
    update over the moved units instead of being recomputed.

    The arithmetic runs in numpy (sharing memory with the torch views on the CPU, on CPU
    copies of tensors on another device), except the matrix
    products: every one goes through :func:`~bnn_align.matching._gemm.product`, on torch's threads
    (see :mod:`bnn_align.matching._gemm`).
    """

    # above this fraction of moved units a full recomputation is cheaper than the update
    _UPDATE_LIMIT = 0.6
    # work arrays below this size, or this fraction of the problem's arrays, are kept for the
    # problem's lifetime, larger ones for one similarity (see ``_scratch``)
    _SCRATCH_BYTES = 4 * 2**20
    _SCRATCH_FRACTION = 1 / 16

    def __init__(self, pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
                 spec: PermutationSpec, sizes: Mapping[str, int],
                 factor_part: Mapping[str, int] | None = None):
        # on the CPU, numpy shares the tensors' memory; from another device it gets copies
        self.pairs = {site: [(a.detach().cpu().numpy(), b.detach().cpu().numpy())
                             for a, b in parts]
                      for site, parts in pairs.items()}
        self.spec = spec
        self.sizes = dict(sizes)
        self.blocks = spec.blocks
        # site -> index of its covariance-factor pair, whose b side is W_b R for the rotation R
        self.factor_part = dict(factor_part or {})
        self.factors_b = {site: self.pairs[site][i][1] for site, i in self.factor_part.items()}
        self.rotation: np.ndarray | None = None
        # group -> [(site, axis, offset, others)]: where the group acts, and the groups of the
        # tensor's other axes, on which that contribution depends
        self.uses: dict[str, list[tuple[str, int, int, tuple[str, ...]]]] = {g: [] for g in sizes}
        self.site_groups: dict[str, tuple[str, ...]] = {}
        # site -> (axis, spec entry, groups) of its permuted axes
        self.axes: dict[str, tuple[tuple[int, Any, tuple[str, ...]], ...]] = {}
        for site in pairs:
            entries = self.spec[site] if site in spec else ()
            axes = self.axes[site] = tuple((axis, entry, _groups_of(entry))
                                           for axis, entry in enumerate(entries)
                                           if entry is not None)
            self.site_groups[site] = tuple(sorted({g for *_, groups in axes for g in groups}))
            for axis, _, groups in axes:
                others = tuple(sorted({h for ax, _, gs in axes if ax != axis for h in gs}))
                offset = 0
                for g in groups:
                    self.uses[g].append((site, axis, offset, others))
                    offset += self.sizes[g]
        # The objective is linear in each group's permutation unless a tensor carries the group
        # on two axes (or twice in one concatenation); only then must it be recomputed rather
        # than updated by the gains of the assignment steps.
        self.linear = all(len(uses) == len({(site) for site, *_ in uses})
                          for uses in self.uses.values())
        self.perms = identity_perms(sizes)  # the current permutations
        self.version = {g: 0 for g in sizes}  # bumped whenever a group's permutation changes
        self.part_version = {site: 0 for site in pairs}  # bumped when a factor is rotated
        # Only the first ``active`` parts of every site enter the objective: 1 for the means
        # alone (the warm start), all of them for the full objective. Everything below is
        # cached per part, so the full objective reuses what the means-only descent computed.
        self.num_parts = max((len(parts) for parts in pairs.values()), default=1)
        self.active = self.num_parts
        # Contributions that depend on no other group (biases, norm parameters, the first and
        # last layers) never change: they are summed once per group and part.
        self.static: dict[tuple[str, int], np.ndarray] = {}
        self.cache: dict[tuple, tuple[tuple, np.ndarray, dict]] = {}
        self.solved_at: dict[str, tuple] = {}
        self.distances: dict[tuple[str, int], tuple[tuple, float]] = {}
        # group -> (stamp, parts, sites, margin) of its last solve on part of its similarity,
        # see ``certified``
        self.margins: dict[str, tuple[tuple, int, frozenset, float]] = {}
        # reused work arrays (see ``_scratch``): the large ones, released after each
        # similarity, and the small ones, kept
        self.scratch: dict[str, np.ndarray] = {}
        self.kept_scratch: dict[str, np.ndarray] = {}
        self.axis_indices: dict[tuple[str, int], tuple] = {}  # see ``_axis_index``
        self.scratch_limit = max(self._SCRATCH_BYTES, self._SCRATCH_FRACTION * sum(
            a.nbytes + b.nbytes for parts in self.pairs.values() for a, b in parts))

    # -- bookkeeping ------------------------------------------------------------------------------
    def set_perms(self, perms: Mapping[str, torch.Tensor]) -> None:
        for g, p in perms.items():
            if not torch.equal(p, self.perms[g]):
                self.perms[g] = p
                self.version[g] += 1

    def means_dominate(self) -> bool:
        """Whether the means vary across units more than the other parts do: their sum of
        squares about each tensor's mean (an offset common to all units favours no
        permutation), estimated from at most 4096 evenly spaced entries per tensor and side,
        is the larger."""
        variation = [0.0] * self.num_parts
        for parts in self.pairs.values():
            for part, (a, b) in enumerate(parts):
                for t in (a, b):
                    flat = t.reshape(-1)
                    sample = flat[::max(1, flat.size // 4096)].astype(np.float64)
                    variation[part] += flat.size * float(sample.var()) if sample.size else 0.0
        return variation[0] > sum(variation[1:])

    @contextlib.contextmanager
    def means_only(self) -> Iterator[None]:
        """Within the block, only the means enter the objective (``active`` 1)."""
        active, self.active = self.active, 1
        try:
            yield
        finally:
            self.active = active

    def _parts(self, site: str) -> range:
        return range(min(self.active, len(self.pairs[site])))

    def _is_factor(self, site: str, part: int) -> bool:
        return self.factor_part.get(site) == part

    def _stamp(self, site: str, groups: tuple[str, ...], part: int) -> tuple:
        """What a part's contribution depends on: the other groups' permutations, and the
        rotation for a covariance factor."""
        rotated = self.part_version[site] if self._is_factor(site, part) else 0
        return tuple(self.version[h] for h in groups), rotated

    def _solve_stamp(self, g: str) -> tuple:
        """What a solve of ``g`` depends on: its similarity's contributions, and ``g``'s own
        permutation, which must still be the one the solve left (a descent that starts
        elsewhere sets it without solving)."""
        return self.version[g], tuple(
            self._stamp(site, others, part) for site, _, _, others in self.uses[g]
            for part in self._parts(site))

    def note_solved(self, g: str) -> None:
        """``g``'s current permutation is the one a solve on its current similarity chose."""
        self.solved_at[g] = self._solve_stamp(g)

    def needs_solve(self, g: str) -> bool:
        """Whether anything ``g``'s similarity depends on changed since ``g`` was last solved,
        or ``g``'s permutation was set to another than that solve's."""
        return self.solved_at.get(g) != self._solve_stamp(g)

    def _margin_stamp(self, g: str, sites: frozenset[str], parts: int) -> tuple:
        """What a margin depends on: ``g``'s own permutation and the contributions it was
        computed from (of ``sites``, their first ``parts`` parts)."""
        return self.version[g], tuple(
            self._stamp(site, others, part) for site, _, _, others in self.uses[g]
            if site in sites for part in range(min(parts, len(self.pairs[site]))))

    def note_margin(self, g: str, similarity: np.ndarray, matrix: np.ndarray,
                    settled: set[str] | None = None) -> None:
        """After a solve that left ``g`` at the best permutation of ``similarity`` (the
        partial one over ``settled`` of the greedy start, or the means' while the objective
        has more parts; ``matrix``: it :func:`reduced`, as the assignment step saw it):
        remember by how much it beats every other (see :meth:`certified`)."""
        if not self.linear or (settled is None and self.active == self.num_parts):
            return  # a solve on everything leaves nothing to certify
        sites = frozenset(site for site, _, _, others in self.uses[g]
                          if settled is None or settled.issuperset(others))
        self.margins[g] = (self._margin_stamp(g, sites, self.active), self.active, sites,
                           self.margin(g, similarity, matrix))

    def margin(self, g: str, similarity: np.ndarray, matrix: np.ndarray) -> float:
        """:func:`certified_margin` of ``g``'s current permutation on ``similarity`` (its
        :func:`reduced` ``matrix``)."""
        perm = self.perms[g].numpy()
        scale = float(np.abs(similarity[np.arange(len(perm)), perm]).sum(dtype=np.float64))
        return certified_margin(matrix, perm, scale)

    def certified(self, g: str) -> bool:
        """Whether ``g``'s permutation provably stays where it is, with none of the products
        its similarity is missing computed; if so ``g`` counts as solved.

        At ``g``'s last solve, on some of the contributions to its similarity (the settled
        neighbours' of the greedy start, or the means'), every other permutation was worse by
        at least the margin ``m`` (the neighbours unchanged since). The missing terms, of
        tensors acting on ``g``, can favour another permutation by at most half their
        current squared distance ``d`` (``<A, P B> <= (||A||^2 + ||B||^2) / 2``), computed
        here only once a margin is at hand (see :meth:`terms`; no other step needs them before
        the final objective). So when ``d < m`` a step on the whole similarity
        would keep the permutation with at least ``m / 2`` to spare, far above rounding: the
        result is the one solving gives. A near-copy (a planted permutation, checkpoints of
        one run) is settled by the greedy start alone, without a second pass of products on
        the means or any on the standard deviations. Linear problems only: elsewhere a step
        is not a plain assignment.
        """
        noted = self.margins.get(g)
        if not self.linear or noted is None:
            return False
        stamp, parts, sites, margin = noted
        if not margin > 0 or parts > self.active or stamp != self._margin_stamp(g, sites, parts):
            return False
        missing = self.terms([
            (site, part) for site in dict.fromkeys(site for site, *_ in self.uses[g])
            for part in range(min(parts, len(self.pairs[site])) if site in sites else 0,
                              min(self.active, len(self.pairs[site])))])
        if not sum(missing, 0.0) < margin:
            return False
        self.note_solved(g)
        return True

    def _other_index(self, site: str, axis: int) -> dict[int, np.ndarray | None]:
        """Gather index of every other permuted axis of a tensor under the current perms
        (``axis=-1``: of every permuted axis), None for an identity."""
        return {ax: self._axis_index(site, ax, entry, groups)
                for ax, entry, groups in self.axes[site] if ax != axis}

    def _axis_index(self, site: str, axis: int, entry: Any, groups: tuple[str, ...]
                    ) -> np.ndarray | None:
        """Gather index of one permuted axis (its spec ``entry``, acting ``groups``), kept
        until one of its groups moves: rebuilding it with torch ops for every product and cost
        term was a measurable share of a match (``benchmarks/NOTES.md``)."""
        stamp = tuple([self.version[g] for g in groups])
        hit = self.axis_indices.get((site, axis))
        if hit is None or hit[0] != stamp:
            blocks = self.blocks.get(site, {})
            (index,) = axis_gathers((entry,), self.perms, {0: blocks.get(axis, 1)}).values()
            hit = self.axis_indices[site, axis] = (stamp,
                                                   None if index is None else index.numpy())
        return hit[1]

    # -- the similarity ---------------------------------------------------------------------------
    def similarity(self, g: str, settled: set[str] | None = None,
                   first_part: int = 0, into: np.ndarray | None = None) -> np.ndarray:
        """``S[i, j]``: the gain of putting unit ``j`` of b at unit ``i``, shape ``(n, n)``.

        float32, like the weights: its rounding is far below the differences assignments make.
        With ``settled``, only the contributions whose other groups are all in it (and those
        that depend on no other group): the partial similarity of the greedy start. With
        ``first_part``, only the parts from it on (the rest of a similarity whose means'
        part is at hand), added to ``into`` (in place) when given.
        """
        n = self.sizes[g]
        total = np.zeros((n, n), dtype=np.float32) if into is None else into
        for part in range(first_part, self.active):
            if (g, part) not in self.static:
                static = np.zeros((n, n), dtype=np.float32)
                for site, axis, offset, others in self.uses[g]:
                    if (not others and not self._is_factor(site, part)
                            and part < len(self.pairs[site])):
                        static += self._full(site, part, axis, offset, n, {})
                self.static[g, part] = static
            total += self.static[g, part]
        for site, axis, offset, others in self.uses[g]:
            if settled is not None and not settled.issuperset(others):
                continue
            for part in self._parts(site)[first_part:]:
                if not others and not self._is_factor(site, part):
                    continue  # in the static sum
                key = (g, site, axis, offset, part)
                stamp = self._stamp(site, others, part)
                hit = self.cache.get(key)
                if hit is None or hit[0] != stamp:
                    index = self._other_index(site, axis)
                    matrix = None
                    if hit is not None and hit[0][1] == stamp[1]:
                        matrix = self._update(site, part, axis, offset, n, hit[1], hit[2],
                                              index)
                    if matrix is None:
                        matrix = self._full(site, part, axis, offset, n, index)
                    hit = (stamp, matrix, index)
                    self.cache[key] = hit
                total += hit[1]
        if settled is None and first_part == 0:  # a partial similarity does not make a
            self.note_solved(g)  # solve of g up to date
        self.scratch.clear()
        return total

    def information(self, g: str, settled: set[str]) -> int:
        """How many weights of the (active) tensors acting on ``g`` the partial similarity over
        ``settled`` contains."""
        return sum(self.pairs[site][part][0].size for site, _, _, others in self.uses[g]
                   if settled.issuperset(others) for part in self._parts(site))

    def _scratch(self, slot: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A work array reused from product to product: for the rest of the problem's
        life if it is small (below 4 MB or a sixteenth of the problem's arrays), else
        within one call of :meth:`similarity` or :meth:`rotate` (released at its end, so
        peak memory stays that of fresh arrays).

        A fresh array is new memory the kernel must fault in and zero, a large share of the
        time spent gathering and copying the products' operands; small freed operands were
        moreover returned to the system by the heap and taken back, page fault by page fault.
        Keeping the large ones within a call as well shortened the largest matches
        (measurements: ``benchmarks/NOTES.md``). The few work slots kept cost at most a
        quarter of the problem's memory, in practice far less.
        """
        size = math.prod(shape)
        pool = (self.kept_scratch if size * np.dtype(dtype).itemsize < self.scratch_limit
                else self.scratch)
        buffer = pool.get(slot)
        if buffer is None or buffer.size < size or buffer.dtype != dtype:
            buffer = pool[slot] = np.empty(size, dtype=dtype)
        return buffer[:size].reshape(shape)

    def _take(self, t: np.ndarray, index: Mapping[int, np.ndarray], slot: str) -> np.ndarray:
        """``t`` gathered along the axes of ``index`` (see :func:`permute.take`) into the work
        array ``slot``."""
        return take(t, index, out=self._scratch(slot, gathered_shape(t.shape, index), t.dtype))

    def _gather(self, t: np.ndarray, index: Mapping[int, np.ndarray | None]) -> np.ndarray:
        """``t`` gathered along the axes of ``index`` (None: left as it is), in a work array."""
        index = {ax: idx for ax, idx in index.items() if idx is not None}
        return self._take(t, index, "gather0") if index else t

    def _rows(self, t: np.ndarray, axis: int, offset: int, n: int, block: int,
              slot: str) -> np.ndarray:
        """The group's units of ``axis`` as rows, everything else flattened into columns:
        a view where the layout allows it, else a copy into the work array ``slot``."""
        units = slice(offset * block, (offset + n) * block)
        if axis == 0:
            return t[units].reshape(n, -1)
        if t.ndim == 2 and block == 1:
            return t[:, units].T
        part = np.moveaxis(t[(slice(None),) * axis + (units,)], axis, 0)
        rows = self._scratch(slot, part.shape, t.dtype)
        # torch's strided copy, on torch's threads, beat numpy's copy of the 3x3 kernels as
        # opaque items, itself faster than numpy's copy of the moved float view
        # (benchmarks/NOTES.md)
        torch.from_numpy(rows).copy_(torch.from_numpy(part))
        return rows.reshape(n, -1)

    def _full(self, site: str, part: int, axis: int, offset: int, n: int,
              index: Mapping[int, np.ndarray | None]) -> np.ndarray:
        """``A_(axis) P_other(B)_(axis)^T`` of one part, shape ``(n, n)``, float32."""
        block = self.blocks.get(site, {}).get(axis, 1)
        a, b = self.pairs[site][part]
        b = self._gather(b, index)
        return product(self._rows(a, axis, offset, n, block, "rows_a"),
                       self._rows(b, axis, offset, n, block, "rows_b"), repeated=True)

    def _update(self, site: str, part: int, axis: int, offset: int, n: int,
                matrix: np.ndarray, old: Mapping[int, np.ndarray | None],
                new: Mapping[int, np.ndarray | None]) -> np.ndarray | None:
        """Correct a cached contribution for moved units of the one other permuted axis:
        ``sum_k A[:, k] (B[:, new_k] - B[:, old_k])^T`` over the moved positions ``k``, added
        to ``matrix`` in place (the cache entry it came from is replaced by the result)."""
        if len(new) != 1:
            return None
        ((ax, idx_new),) = new.items()
        idx_old = old[ax]
        length = self.pairs[site][0][1].shape[ax]
        idx_new = np.arange(length) if idx_new is None else idx_new
        idx_old = np.arange(length) if idx_old is None else idx_old
        moved = np.flatnonzero(idx_old != idx_new)
        if len(moved) > self._UPDATE_LIMIT * len(idx_new):
            return None
        if len(moved) == 0:
            return matrix
        block = self.blocks.get(site, {}).get(axis, 1)
        a, b = self.pairs[site][part]
        delta = self._take(b, {ax: idx_new[moved]}, "gather0")
        delta -= self._take(b, {ax: idx_old[moved]}, "gather1")
        a_moved = self._take(a, {ax: moved}, "gather1")
        matrix += product(self._rows(a_moved, axis, offset, n, block, "rows_a"),
                          self._rows(delta, axis, offset, n, block, "rows_b"))
        return matrix

    # -- the rotation of covariance factors -------------------------------------------------------
    def rotate(self) -> float:
        """Procrustes step: the orthogonal ``R`` maximising ``<W_a, P(W_b) R>``, i.e. ``U V^T``
        from the SVD of ``P(W_b)^T W_a``. Returns the gain in ``sum_t <A_t, P(B_t)>`` (0.0 when
        ``R`` did not change)."""
        if not self.factor_part or min(self.factor_part.values()) >= self.active:
            return 0.0
        cross = None
        for site, index in self.factor_part.items():
            wa, wb = self.pairs[site][index][0], self.factors_b[site]
            pb = self.permuted(site, wb).reshape(-1, wb.shape[-1]).astype(np.float64)
            c = pb.T @ wa.reshape(-1, wa.shape[-1]).astype(np.float64)
            cross = c if cross is None else cross + c
        self.scratch.clear()
        u, _, vh = np.linalg.svd(cross)
        new = (u @ vh).astype(next(iter(self.factors_b.values())).dtype)
        if self.rotation is not None and np.allclose(new, self.rotation, atol=1e-6, rtol=0):
            return 0.0
        # <W_a, P(W_b) R> = trace(R^T cross): the gain of the new rotation over the old one
        old = self.rotation if self.rotation is not None else np.eye(len(new))
        gain = float(np.sum((new.astype(np.float64) - old) * cross))
        self.rotation = new
        for site, index in self.factor_part.items():
            a, _ = self.pairs[site][index]
            self.pairs[site][index] = (a, self.factors_b[site] @ new)
            self.part_version[site] += 1
        return max(gain, np.finfo(np.float64).tiny)  # positive: it changed

    # -- the objective ----------------------------------------------------------------------------
    def cost(self) -> float:
        """``sum_t ||A_t - P(B_t)||^2``, each tensor's term recomputed only when it moved."""
        return sum(self.terms([(site, part) for site in self.pairs
                               for part in self._parts(site)]), 0.0)

    def terms(self, keys: list[tuple[str, int]]) -> list[float]:
        """The squared distances ``||A - P(B)||^2`` of the ``(site, part)`` pairs ``keys``
        at the current permutations, each recomputed only when it moved since it was last.

        The terms to recompute are shared out between threads (see :func:`in_parallel`);
        the results come back in the order of ``keys``, whatever the threads.
        """
        stamps, tasks, sizes = {}, [], []
        for site, part in keys:
            stamp = self._stamp(site, self.site_groups[site], part)
            hit = self.distances.get((site, part))
            if hit is None or hit[0] != stamp:
                a, b = self.pairs[site][part]
                index = self._other_index(site, -1)
                stamps[site, part] = stamp
                tasks.append(functools.partial(squared_distance, a, b, index))
                sizes.append(a.size)
        for (key, stamp), term in zip(stamps.items(), in_parallel(tasks, sizes)):
            self.distances[key] = (stamp, term)
        return [self.distances[key][1] for key in keys]

    def permuted(self, site: str, b: np.ndarray) -> np.ndarray:
        """``b`` with every permuted axis of the site reordered (in a work array)."""
        return self._gather(b, self._other_index(site, -1))

    def rotation_tensor(self) -> torch.Tensor | None:
        return None if self.rotation is None else torch.from_numpy(self.rotation)


# below this many elements of work, threads cost more than they save: the objective of a
# ResNet-20 x4 took as long on two threads as on one, that of an x16 clearly less
# (benchmarks/NOTES.md)
_PARALLEL_SIZE = 2**24


def in_parallel(tasks: list, sizes: list[int]) -> list:
    """The results of calling ``tasks`` (functions without arguments), in order, shared out
    between as many threads as torch uses when their work (``sizes``, in elements) is large
    enough; the largest start first, so the threads finish together.

    For numpy work that leaves the interpreter lock while it runs (gathers, elementwise
    arithmetic, reductions): on the 2-core benchmark machine the objective's passes over
    the weights ran on one core while BLAS products use both.
    """
    workers = min(torch.get_num_threads(), len(tasks))
    if workers < 2 or sum(sizes) < _PARALLEL_SIZE:
        return [task() for task in tasks]
    pool = _thread_pool(os.getpid(), workers)
    largest_first = sorted(range(len(tasks)), key=lambda i: -sizes[i])
    futures = {i: pool.submit(tasks[i]) for i in largest_first}
    return [futures[i].result() for i in range(len(tasks))]


@functools.lru_cache(maxsize=None)
def _thread_pool(process: int, workers: int) -> ThreadPoolExecutor:
    """One pool per process: a child forked from a process whose pool had started its threads
    inherits the pool without them, and work handed to it would wait forever."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bnn_align")


def squared_distance(a: np.ndarray, b: np.ndarray,
                      index: Mapping[int, np.ndarray | None]) -> float:
    """``||a - b[index]||^2`` summed in float64, with ``b`` gathered along the axes of ``index``
    (None: left as it is).

    The tensor is processed in flat chunks that fit in the cache: gathering a whole permuted
    copy and squaring the whole difference wrote and re-read every element three times, much
    of the time of a cost evaluation on large networks. The chunks are whole multiples of numpy's
    reduction buffer and the running sum is passed on as ``initial``, so the result is the sum
    over the whole difference, bit for bit with numpy 2.x's buffered float64 reduction (the
    study's 144 matches came out identical).
    """
    chunk = 16 * np.getbufsize()
    index = {ax: idx for ax, idx in index.items() if idx is not None}
    first = index.pop(0, None)
    if a.ndim == 0:  # a scalar site: one row of one number
        a, b = a.reshape(1), b.reshape(1)
    row = math.prod(a.shape[1:])
    flat_a = a.reshape(-1)
    total = 0.0
    # one work array for every chunk: a fresh one each time was new memory to fault in
    work = np.empty(min(chunk, a.size), dtype=np.result_type(a, b))
    with np.errstate(over="ignore"):  # match() reports an infinite cost
        for start in range(0, a.size, chunk):
            stop = min(start + chunk, a.size)
            # the rows the chunk overlaps, gathered, then cut to the chunk
            lo, hi = start // row, -(-stop // row)
            rows = b[lo:hi] if first is None else take(b, {0: first[lo:hi]})
            if index:
                rows = take(rows, index)
            diff = np.subtract(flat_a[start:stop],
                               rows.reshape(-1)[start - lo * row:stop - lo * row],
                               out=work[:stop - start])
            total = float(np.square(diff, out=diff).sum(dtype=np.float64, initial=total))
    return total


def exact_step(problem: Problem, g: str, new: torch.Tensor) -> float:
    """Take the step to ``new`` only if it lowers the exact cost; returns its gain (in the
    similarity's units, half the drop in cost) or 0.0 after undoing it.

    When a tensor carries ``g`` on two axes (``h + Linear(h)`` on one residual stream), the
    cost is quadratic in ``g``'s permutation and the assignment, which maximises its
    linearisation at the current point, can overshoot."""
    before, old = problem.cost(), problem.perms[g]
    problem.set_perms({g: new})
    drop = before - problem.cost()
    if drop > 1e-7 * abs(before):
        return drop / 2
    problem.set_perms({g: old})
    return 0.0


def assign(similarity: np.ndarray) -> torch.Tensor:
    """Exact linear assignment maximising ``sum_i S[i, p[i]]``.

    The matrix is :func:`reduced` first: the solution is the same, and scipy's solver is
    faster on it.
    """
    return assign_reduced(reduced(similarity))


def assign_reduced(matrix: np.ndarray) -> torch.Tensor:
    """:func:`assign` of a matrix :func:`reduced` already (the descent keeps it for
    :func:`certified_margin`)."""
    best = row_maxima_permutation(matrix)
    if best is not None:
        return torch.from_numpy(best).long()
    # the minimisation of -matrix, negated in place and back: with maximize=True scipy would
    # negate a copy of its own (32 MB at 2048 units)
    np.negative(matrix, out=matrix)
    try:
        rows, cols = linear_sum_assignment(matrix)
    finally:
        np.negative(matrix, out=matrix)
    return torch.from_numpy(cols[np.argsort(rows)]).long()


def reduced(similarity: np.ndarray) -> np.ndarray:
    """``S`` minus its column means, then its row maxima, then its column maxima: a new
    float64 array whose every column's largest entry is 0.

    Adding a constant to a row or a column changes every assignment's total by the same
    amount, so the assignment is the same; scipy's shortest-augmenting-path solver, which
    starts from zero dual variables, is faster the closer the matrix is to such a reduced
    form: centring rows and columns helps most on the nearly constant similarities that
    positive standard deviations produce, and reducing by the maxima, as Jonker-Volgenant's
    initialisation does, helps further (every solution the same). The row means need no
    subtracting: the row maxima absorb them. The order matters: column maxima first made the
    study's assignments several times slower. The result is float64, the solver's own type,
    which spares it a converted copy. Measurements: ``benchmarks/NOTES.md``.
    """
    s = np.subtract(similarity, similarity.mean(0, keepdims=True), dtype=np.float64)
    s -= s.max(1, keepdims=True)
    s -= s.max(0, keepdims=True)
    return s


def certified_margin(matrix: np.ndarray, perm: np.ndarray, scale: float) -> float:
    """A lower bound on how much ``perm`` beats every other permutation on
    ``sum_i S[i, p[i]]``, or 0.0 when none is at hand.

    When ``perm`` picks every row's strictly largest entry of ``matrix`` (``S``, or any
    matrix that ranks assignments alike: the solver passes the :func:`reduced` one its
    assignment step used), another permutation differs from it in two rows at least and loses
    at least each such row's margin over its runner-up: the two smallest margins bound the
    loss. A bound below 1e-4 of ``scale``, the absolute sum of ``S``'s chosen entries, counts
    as none: it would not stand far enough above the float32 rounding of ``S``. ``matrix``
    is left as it was.
    """
    n = len(perm)
    if n < 2:
        return math.inf  # no other permutation
    rows = np.arange(n)
    chosen = matrix[rows, perm]
    matrix[rows, perm] = -np.inf  # the runner-up of every row, without a copy
    margins = chosen - matrix.max(1)
    matrix[rows, perm] = chosen
    lowest = float(np.partition(margins, 1)[:2].sum(dtype=np.float64))
    return lowest if margins.min() > 0 and lowest > 1e-4 * scale else 0.0


def row_maxima_permutation(similarity: np.ndarray) -> np.ndarray | None:
    """The rows' argmaxes if they form a permutation, else None.

    No assignment can beat the sum of the row maxima, so when every row's best column is a
    different one the assignment problem is solved without the solver. That happens in most
    steps of aligning near-copies (checkpoints of one run, a planted permutation) and costs one
    pass over the matrix otherwise.
    """
    best = similarity.argmax(1)
    seen = np.zeros(len(best), dtype=bool)
    seen[best] = True
    return best if seen.all() else None


def assignment_gain(similarity: np.ndarray, new: torch.Tensor, old: torch.Tensor) -> float:
    """How much ``new`` beats ``old`` on ``sum_i S[i, p[i]]``; 0.0 unless by more than the
    rounding of the similarity matrix.

    Without the margin, float rounding of cached similarities could swap two tied
    permutations back and forth forever."""
    new, old = new.numpy(), old.numpy()
    gain = chosen_total(similarity, new) - chosen_total(similarity, old)
    scale = float(np.abs(similarity[np.arange(len(old)), old]).sum(dtype=np.float64))
    return gain if gain > 1e-6 * scale else 0.0


def chosen_total(similarity: np.ndarray, perm: np.ndarray) -> float:
    """``sum_i S[i, perm[i]]`` in float64."""
    return float(similarity[np.arange(len(perm)), perm].sum(dtype=np.float64))



# --------------------------------------------------------------------------- the descent --
class Descent(NamedTuple):
    """What :func:`coordinate_descent` and :func:`descend` return."""

    perms: dict[str, torch.Tensor]
    history: list[float]  # the objective after each sweep
    iterations: int
    converged: bool
    rotation: torch.Tensor | None
    initial: float  # the objective at the start (nan when not evaluated)


def coordinate_descent(problem: Problem, start: Mapping[str, torch.Tensor], constant: float,
                        max_iter: int, rng: np.random.Generator, bar: Any,
                        evaluate: bool = True) -> Descent:
    """Sweeps over the groups in random order, each an exact assignment, then a rotation step,
    until a sweep changes nothing.

    The objective is ``||A||^2 + ||B||^2 - 2 sum_t <A_t, P(B_t)>``, linear in each step's
    permutation, so a sweep lowers it by twice the gains of its steps: only the final value is
    computed from the weights, every earlier one (and the start's) is the final one plus the
    later sweeps' drops. (Evaluating the start as well cost a pass over every weight.) With
    ``evaluate=False`` not even the final value is computed: the history is empty. When a
    tensor carries a group on two axes (``not problem.linear``), every value is computed.
    """
    problem.set_perms(start)
    problem.rotate()
    initial = problem.cost() + constant if not problem.linear else math.nan
    history: list[float] = []
    gains: list[float] = []
    converged = False
    iterations = 0
    for iterations in range(1, max_iter + 1):
        gain = 0.0
        for g in rng.permutation(list(problem.sizes)):
            g = str(g)
            if not problem.needs_solve(g) or problem.certified(g):
                continue  # nothing it depends on moved since its last solve, or it provably
                # stays where it is
            similarity, step = means_first(problem, g)
            if step is not None:  # the means settled the step: no products on the rest
                gain += step
                problem.note_solved(g)
                continue
            matrix = reduced(similarity)
            new = assign_reduced(matrix)
            if not torch.equal(new, problem.perms[g]):
                if problem.linear:
                    step = assignment_gain(similarity, new, problem.perms[g])
                    if step > 0:
                        problem.set_perms({g: new})
                        gain += step
                else:
                    gain += exact_step(problem, g, new)
            if torch.equal(new, problem.perms[g]):
                problem.note_margin(g, similarity, matrix)
            if problem.linear:  # g's similarity does not depend on g: the step is up to date
                problem.note_solved(g)
            del similarity, matrix  # not held while the next group's similarity is built
        gain += problem.rotate()
        gains.append(gain)
        if not problem.linear:
            history.append(problem.cost() + constant)
        if _sweep_done(bar, gains):
            converged = True
            break
    if problem.linear and evaluate:
        history, initial = _replay(problem, constant, gains)
    return Descent(dict(problem.perms), history, iterations, converged,
                   problem.rotation_tensor(), initial)


def _sweep_done(bar: Any, gains: list[float]) -> bool:
    """Show the objective's drop so far on ``bar``; True when the last sweep gained nothing."""
    if bar is not None:
        bar.update(1)
        bar.set_postfix(drop=f"{2 * sum(gains):.6g}")
    return gains[-1] <= 0


def _replay(problem: Problem, constant: float, gains: list[float]
            ) -> tuple[list[float], float]:
    """The objective after each sweep and at the start, from the final value alone: a sweep
    lowered it by twice its gain. The final value is computed exactly, so rounding does not
    accumulate across sweeps."""
    value = problem.cost() + constant
    history: list[float] = []
    for gain in reversed(gains):
        history.append(value)
        value += 2 * gain
    history.reverse()
    return history, value


WARM_START_SWEEPS = 100


def cost_at(problem: Problem, perms: Mapping[str, torch.Tensor], constant: float) -> float:
    """The objective at ``perms`` (with the best rotation of the factors for them)."""
    problem.set_perms(perms)
    problem.rotate()
    return problem.cost() + constant


def descend(problem: Problem, constant: float, start: Mapping[str, torch.Tensor],
            max_iter: int, rng: np.random.Generator, bar: Any, greedy: bool = False) -> Descent:
    """Coordinate descent on the objective from :func:`warm_start`'s point (the greedy start,
    or a refinement of ``start`` on the means), or from ``start`` itself when that point is not
    below it.

    The warm start's objective is the descent's :attr:`Descent.initial`, known once the
    descent from it has run (see :func:`coordinate_descent`); so the descent from ``start``
    runs only when that is not lower than the objective at ``start``, with the random group
    order it would have had, and the result is the one of deciding before descending.
    """
    if problem.num_parts == 1 and not greedy:  # nothing to refine: the objective is the means'
        return coordinate_descent(problem, start, constant, max_iter, rng, bar)
    # before the warm start: evaluated after it, it would move the permutations away and back,
    # and every cached product would look stale (free at the identity, already evaluated)
    at_start = cost_at(problem, start, constant)
    perms = warm_start(problem, start, rng, greedy)
    state = rng.bit_generator.state
    if not all(torch.equal(perms[g], start[g]) for g in perms):
        result = coordinate_descent(problem, perms, constant, max_iter, rng, bar)
        if result.initial < at_start:
            return result
        rng.bit_generator.state = state  # the group order the descent from start would have had
    return coordinate_descent(problem, start, constant, max_iter, rng, bar)


def warm_start(problem: Problem, start: Mapping[str, torch.Tensor], rng: np.random.Generator,
                greedy: bool = False) -> dict[str, torch.Tensor]:
    """The point the descent on the method's objective starts from: :func:`greedy_start`'s
    with ``greedy``, refined by coordinate descent on the means where the objective has
    covariance factors or the means vary more than the standard deviations (see
    :meth:`Problem.means_dominate`); without ``greedy``, ``start`` refined on the means.

    The refinement is for an arbitrary start (a given ``init``, a random restart) and for
    trained posteriors: the standard deviations and factors add many terms to the
    similarities that, between trained posteriors, carry little information about which units
    correspond (similar spreads everywhere), and a shared rotation of the factors fitted at a
    wrong permutation couples all groups; from the identity, coordinate descent on the full
    objective could then stop in a poor local optimum on coupled (residual) networks. Weight
    matching on the means finds the basin; the full objective then refines within it
    (:func:`descend` keeps the refinement only if it lowers the objective). It runs to
    convergence whatever ``max_iter`` is, on ``problem`` itself (its other parts switched
    off), so the full descent reuses its cached terms; no objective is evaluated here. A
    greedy start that is refined runs on the means alone.

    Where the standard deviations vary as much as the means, the greedy start (then on both,
    see :func:`greedy_start`) is not refined: refining it spent one to two passes of products
    that the full descent then undid. Where the standard deviations vary more than the means
    (the benchmark's independent pairs) the full descent moves nearly every unit of the
    means' optimum, and descending from the greedy point directly ends lower, with fewer
    products. Trained posteriors are on the other side: there the refinement keeps the
    results they had with it. Measurements: ``benchmarks/NOTES.md``.
    """
    if greedy and not problem.factor_part and not problem.means_dominate():
        problem.set_perms(start)
        return greedy_start(problem)
    with problem.means_only():
        perms = dict(start)
        if greedy:
            problem.set_perms(start)
            perms = greedy_start(problem)
        if problem.num_parts > 1:
            perms = coordinate_descent(problem, perms, 0.0, WARM_START_SWEEPS, rng, None,
                                       evaluate=False).perms
    return perms


def greedy_start(problem: Problem) -> dict[str, torch.Tensor]:
    """Solve every group once, each from what its settled neighbours determine.

    A forward pass of weight matching, for any spec: the next group is the one whose means'
    similarity is most determined by the groups solved so far (tensors whose other axes are
    all settled, and those with no other permuted axis, such as the first layer), and it is
    solved from those contributions alone. Coordinate descent from the identity solves groups
    against neighbours that have not moved yet and must redo those products once they have;
    from here, on a near-copy, the first sweep already finds nothing to change.

    It runs on the problem's active parts (:func:`warm_start` switches all but the means off,
    or leaves the means and standard deviations on). With more than the means, each group's
    step goes through :func:`means_first`: the standard deviations of the same tensors join
    only where they could change the means' choice, so a near-copy is placed without any
    product on them and independent posteriors on both parts. The objective is not
    evaluated: the caller compares what the descent from here reaches with its start.
    """
    settled: set[str] = set()
    while len(settled) < len(problem.sizes):
        with problem.means_only():
            g = max((h for h in problem.sizes if h not in settled),
                    key=lambda h: problem.information(h, settled))
        similarity, step = means_first(problem, g, settled)
        if step is None and similarity.any():  # no information yet: keep the permutation
            matrix = reduced(similarity)
            problem.set_perms({g: assign_reduced(matrix)})
            problem.note_margin(g, similarity, matrix, settled)
        settled.add(g)
    return dict(problem.perms)


def means_first(problem: Problem, g: str, settled: set[str] | None = None
                ) -> tuple[np.ndarray, float | None]:
    """``g``'s (partial, over ``settled``) similarity, from the means' part alone when that
    settles the step.

    The means' similarity settles it when its rows' best entries form a permutation (no
    assignment needed) that beats every other by a margin (see :func:`certified_margin`)
    above the squared distance ``d`` of the other parts of the same tensors there: those can
    favour another permutation by at most ``d / 2`` (see :meth:`Problem.certified`), so the
    step on the whole similarity would choose the same permutation. Then ``g`` is set to it and
    the result is ``(means' similarity, gain)``, the gain on the whole similarity computed
    from the means' part and the change of ``d`` (0.0 for a partial similarity: the greedy
    start counts no gains). Otherwise ``g`` is left as it was and the
    result is ``(whole similarity, None)``, the means' part computed once for both.

    This is what keeps near-copies cheap: a planted permutation, or checkpoints of one run,
    are matched without products on the standard deviations or factors, while for independent
    posteriors (no margin: the rows' best entries collide) the check costs one pass over the
    means' similarity.
    """
    parts = problem.active
    with problem.means_only():
        means = problem.similarity(g, settled)
    if parts == 1:
        return means, None
    matrix = reduced(means) if problem.linear and means.any() else None
    best = None if matrix is None else row_maxima_permutation(matrix)
    if best is not None:
        old = problem.perms[g]
        new = torch.from_numpy(best).long()
        sites = dict.fromkeys(site for site, _, _, others in problem.uses[g]
                              if settled is None or settled.issuperset(others))
        rest = [(site, part) for site in sites
                for part in range(1, min(parts, len(problem.pairs[site])))]
        before = sum(problem.terms(rest), 0.0) if settled is None else math.nan
        problem.set_perms({g: new})
        margin = problem.margin(g, means, matrix)
        after = sum(problem.terms(rest), 0.0) if margin > 0 else math.inf
        if after < margin:
            with problem.means_only():  # the margin is the means'
                problem.note_margin(g, means, matrix, settled)
            if settled is not None:  # the greedy start counts no gains
                return means, 0.0
            gain = chosen_total(means, best) - chosen_total(means, old.numpy())
            return means, gain + (before - after) / 2
        problem.set_perms({g: old})
    del matrix  # not held while the rest is built: peak memory stays that of one solve
    return problem.similarity(g, settled, first_part=1, into=means), None


# ------------------------------------------------------------------------ attention heads --
def head_assignment(similarities: Mapping[str, np.ndarray], lengths: Mapping[str, int],
                    move_heads: bool = True) -> dict[str, torch.Tensor]:
    """The best element of one head set's symmetry for fixed other groups, hierarchically.

    ``similarities[g]`` is group ``g``'s ``(n_heads * d, n_heads * d)`` similarity and
    ``lengths[g]`` its head length ``d``. For every pair of heads ``(h_a, h_b)`` and every
    group, the within-head assignment on the ``d x d`` block of the pair, and its value; the
    values summed over the groups give an ``n_heads x n_heads`` matrix, and one assignment
    over heads on it chooses the head permutation shared by the set (Verma & Elbayad's
    hierarchical matching). Exact: once the head permutation is fixed, the groups and heads
    separate into independent assignments, whose optima are those values.

    With ``move_heads=False`` the heads stay in place (``H`` the identity) and only the
    within-head assignments are made.

    Returns the flat permutations (``H[h] * d + w[h, i]``, see
    :func:`~bnn_align.symmetry.spec.split_heads`).
    """
    groups = list(similarities)
    count = len(similarities[groups[0]]) // lengths[groups[0]]
    value = np.zeros((count, count), dtype=np.float64)
    within: dict[str, dict[tuple[int, int], np.ndarray]] = {g: {} for g in groups}
    for g in groups:
        d, s = lengths[g], similarities[g]
        for ha in range(count):
            for hb in (range(count) if move_heads else (ha,)):
                block = np.ascontiguousarray(s[ha * d:(ha + 1) * d, hb * d:(hb + 1) * d],
                                             dtype=np.float64)
                perm = assign(block).numpy()
                within[g][ha, hb] = perm
                value[ha, hb] += block[np.arange(d), perm].sum()
    heads = assign(value).numpy() if move_heads else np.arange(count)
    out = {}
    for g in groups:
        d = lengths[g]
        out[g] = torch.from_numpy(np.concatenate(
            [heads[ha] * d + within[g][ha, heads[ha]] for ha in range(count)])).long()
    return out


def _coupled(problem: Problem) -> set[str]:
    """Groups a tensor carries on two different axes: the objective is quadratic in them."""
    out = set()
    for axes in problem.axes.values():
        seen: set[str] = set()
        for _, _, groups in axes:
            for g in set(groups):
                if g in seen:
                    out.add(g)
            seen.update(groups)
    return out


def head_descent(problem: Problem, start: Mapping[str, torch.Tensor], constant: float,
                 max_iter: int, rng: np.random.Generator, bar: Any,
                 heads: Mapping[str, Mapping[str, int]], evaluate: bool = True,
                 move_heads: bool = True) -> Descent:
    """Coordinate descent for a spec with head sets: each step is an exact assignment of one
    group outside the head sets, or the hierarchical step of one head set
    (:func:`head_assignment`) over all its groups at once, so every iterate respects the
    attention symmetry; then a rotation step; until a sweep changes nothing.

    The objective's history is recovered from the steps' gains as in
    :func:`coordinate_descent`; a step on a group carried on two axes of one tensor is taken
    only if it lowers the exact cost.
    """
    members = {g for m in heads.values() for g in m}
    steps = [(False, g) for g in problem.sizes if g not in members]
    steps += [(True, h) for h in heads]
    coupled = _coupled(problem)
    problem.set_perms(start)
    problem.rotate()
    gains: list[float] = []
    converged = False
    iterations = 0
    for iterations in range(1, max_iter + 1):
        gain = 0.0
        for k in rng.permutation(len(steps)):
            is_head, name = steps[int(k)]
            if not is_head:
                similarity = problem.similarity(name)
                new = assign(similarity)
                if not torch.equal(new, problem.perms[name]):
                    if name in coupled:
                        gain += exact_step(problem, name, new)
                    else:
                        step = assignment_gain(similarity, new, problem.perms[name])
                        if step > 0:
                            problem.set_perms({name: new})
                            gain += step
                continue
            lengths = dict(heads[name])
            sims = {g: problem.similarity(g) for g in lengths}
            new = head_assignment(sims, lengths, move_heads)
            if all(torch.equal(new[g], problem.perms[g]) for g in lengths):
                continue
            if coupled & set(lengths):
                before, old = problem.cost(), {g: problem.perms[g] for g in lengths}
                problem.set_perms(new)
                drop = before - problem.cost()
                if drop > 1e-7 * abs(before):
                    gain += drop / 2
                else:
                    problem.set_perms(old)
                continue
            step = sum(chosen_total(sims[g], new[g].numpy())
                       - chosen_total(sims[g], problem.perms[g].numpy()) for g in lengths)
            scale = sum(float(np.abs(sims[g][np.arange(len(new[g])),
                                             problem.perms[g].numpy()]).sum(dtype=np.float64))
                        for g in lengths)
            if step > 1e-6 * scale:
                problem.set_perms(new)
                gain += step
        gain += problem.rotate()
        gains.append(gain)
        if _sweep_done(bar, gains):
            converged = True
            break
    history: list[float] = []
    initial = math.nan
    if evaluate:
        history, initial = _replay(problem, constant, gains)
    return Descent(dict(problem.perms), history, iterations, converged,
                   problem.rotation_tensor(), initial)


def head_descend(problem: Problem, constant: float, start: Mapping[str, torch.Tensor],
                 max_iter: int, rng: np.random.Generator, bar: Any,
                 heads: Mapping[str, Mapping[str, int]], move_heads: bool = True) -> Descent:
    """:func:`head_descent` on the full objective, from ``start`` refined on the means alone
    when the objective has more parts (as :func:`descend` does for specs without heads): the
    descent from the refined point is kept when the refined point is below ``start``, else the
    descent runs from ``start``."""
    if problem.num_parts == 1:
        return head_descent(problem, start, constant, max_iter, rng, bar, heads,
                        move_heads=move_heads)
    at_start = cost_at(problem, start, constant)
    with problem.means_only():
        refined = head_descent(problem, start, 0.0, WARM_START_SWEEPS, rng, None, heads,
                               evaluate=False, move_heads=move_heads).perms
    if not all(torch.equal(refined[g], start[g]) for g in start):
        result = head_descent(problem, refined, constant, max_iter, rng, bar, heads,
                              move_heads=move_heads)
        if result.initial < at_start:
            return result
    return head_descent(problem, start, constant, max_iter, rng, bar, heads,
                        move_heads=move_heads)
