"""Align two posteriors over permutations: :func:`match` and its :class:`Alignment` result.

The weight-space methods minimise the expected squared distance between the posteriors under the
coupling that shares the standard-normal noise, ``theta = loc + scale * eps + factor @ z``:

    cost(P, R) = ||mu_a - P mu_b||^2 + ||s_a - P s_b||^2 + ||W_a - P W_b R||_F^2

For diagonal Gaussians this is exactly the squared 2-Wasserstein distance; with covariance factors
it is the cost of one particular coupling, hence an upper bound on W2^2, tight when the factors'
column spaces agree after rotation. ``R`` is orthogonal (factor columns are only defined up to a
rotation). Because permutations preserve norms, minimising the cost means maximising
``sum_t <A_t, P(B_t)>`` over tensors ``t``: a sum of bilinear assignment problems, solved by
coordinate descent over the permutation groups (each step an exact linear assignment, which can
only lower the cost) alternated with an orthogonal Procrustes step for ``R``. Where a tensor
carries one group on two axes (a layer from a residual stream back into it) the cost is
quadratic in that group, and a step is taken only if it lowers the exact cost. The descent on
the full objective starts from the result of the descent on the means alone when that is
better: on coupled residual networks it otherwise stopped in poor local optima. By default the
descent on the means starts from a greedy forward pass, each group solved once from the
neighbours already solved, which settles near-copies without a second pass of products.

Work is reused across steps: a group's similarity matrix is a sum of contributions, one per tensor
axis it permutes, and each contribution depends only on the permutations of that tensor's other
axes. Contributions are cached and recomputed only when one of those permutations changed, and a
group whose contributions are all unchanged is not solved again, nor a group whose margin on part
of its similarity (the greedy pass's, or the means') exceeds what the missing terms could gain
(see ``_Problem.certified``). Within one similarity evaluation, large gathered and
transposed operands are written into reused work arrays; the objective is summed in cache-sized
chunks (see ``_squared_distance``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from pyro.infer import autoguide
from scipy.optimize import linear_sum_assignment
from tqdm.auto import tqdm

from ._checks import positive_int
from .bayesian import BayesianNetwork
from .permute import axis_gathers, check_perms, identity_perms, permute, random_perms
from .posterior import GaussianView, adapter_for, model_of, paired_views
from .spec import PermutationSpec, _groups_of

__all__ = ["match", "Alignment", "alignment_cost", "METHODS"]

METHODS = ("wasserstein", "mean", "activation")


# ------------------------------------------------------------------------------ the result --
@dataclass
class Alignment:
    """The result of :func:`match`.

    Attributes
    ----------
    perms : dict of str to LongTensor
        Group -> permutation of shape ``(n_group,)``; ``permute(guide_b, perms)`` is aligned.
    aligned : object
        A new posterior of ``guide_b``'s kind, permuted (and, for low-rank guides, with its
        covariance factor rotated by ``rotation``, which leaves its distribution unchanged).
    cost_before, cost_after : float
        The method's objective before and after: the coupled squared distance of the module
        docstring for ``"wasserstein"`` (W2^2 for diagonal Gaussians), ``||mu_a - P mu_b||^2`` for
        ``"mean"``, and for ``"activation"`` (which maximises activation correlations) the
        ``"wasserstein"`` objective of the permutations it finds.
    history : list of float
        The objective after each sweep of coordinate descent (best restart).
    iterations : int
        Sweeps used by the best restart.
    converged : bool
        Whether the best restart stopped because a sweep changed nothing.
    seconds : float
        Wall-clock time of the whole call.
    method : str
    spec : PermutationSpec
    rotation : Tensor or None
        The orthogonal ``R`` (``rank x rank``) aligning the covariance factors, if any.
    restart_costs : list of float
        Final objective of every restart.
    guide_a, guide_b : object
        The posteriors that were matched (references, not copies; None after :meth:`load`).
    """

    perms: dict[str, torch.Tensor]
    aligned: Any
    cost_before: float
    cost_after: float
    history: list[float]
    iterations: int
    converged: bool
    seconds: float
    method: str
    spec: PermutationSpec
    rotation: torch.Tensor | None = None
    restart_costs: list[float] = field(default_factory=list)
    guide_a: Any = field(default=None, repr=False, compare=False)
    guide_b: Any = field(default=None, repr=False, compare=False)

    def apply(self, obj: Any) -> Any:
        """Permute any other object over the same spec (state dict, module, guide, ...).

        Only the permutations are applied: ``alignment.apply(guide_b)`` has the distribution
        of ``aligned``, but a low-rank factor keeps its columns (``aligned``'s are also
        rotated by ``rotation``, which does not change the distribution)."""
        return permute(obj, self.perms, self.spec)

    def save(self, path: str | Path) -> None:
        """Save the permutations, the spec and the numbers (not the guides) with ``torch.save``."""
        torch.save({
            "perms": self.perms, "spec": self.spec.to_dict(), "cost_before": self.cost_before,
            "cost_after": self.cost_after, "history": list(self.history),
            "iterations": self.iterations, "converged": self.converged,
            "seconds": self.seconds, "method": self.method, "rotation": self.rotation,
            "restart_costs": list(self.restart_costs), "format": "bnn_align.Alignment/1",
        }, Path(path))

    @classmethod
    def load(cls, path: str | Path, aligned: Any = None) -> "Alignment":
        """Load a saved alignment; ``aligned`` is None unless given (use :meth:`apply`)."""
        state = torch.load(Path(path), weights_only=True)  # plain data: no code is run
        if not isinstance(state, dict) or state.get("format") != "bnn_align.Alignment/1":
            raise ValueError(f"{path} does not hold a saved bnn_align Alignment")
        return cls(
            perms=state["perms"], aligned=aligned, cost_before=state["cost_before"],
            cost_after=state["cost_after"], history=state["history"],
            iterations=state["iterations"], converged=state["converged"],
            seconds=state["seconds"], method=state["method"],
            spec=PermutationSpec.from_dict(state["spec"]), rotation=state["rotation"],
            restart_costs=state["restart_costs"],
        )

    def __repr__(self) -> str:
        groups = ", ".join(f"{g}({len(p)})" for g, p in list(self.perms.items())[:4])
        more = " ..." if len(self.perms) > 4 else ""
        return (f"Alignment(method={self.method!r}, cost_before={self.cost_before:.6g}, "
                f"cost_after={self.cost_after:.6g}, iterations={self.iterations}, "
                f"converged={self.converged}, seconds={self.seconds:.3g}, "
                f"perms=[{groups}{more}])")


# --------------------------------------------------------------------------- the problem --
class _Problem:
    """``max_P sum_t <A_t, P(B_t)>`` over named tensors, reusing work between steps.

    ``pairs[site]`` is a list of ``(A, B)`` arrays shaped like the site (plus trailing axes);
    the ``B`` of a covariance factor is replaced by ``W_b R`` at every rotation step, which bumps
    the site's ``part_version``. A group's similarity is a sum of contributions, one per tensor
    axis it permutes; each is cached with the permutations it was computed under. When only a
    few units of the tensor's other axis moved since, the cache is corrected by a low-rank
    update over the moved units instead of being recomputed.

    The arithmetic runs in numpy (sharing memory with the torch views): its BLAS was faster than
    torch's on the benchmark machine, and keeping the hot loop in one library avoids two thread
    pools spinning against each other.
    """

    # above this fraction of moved units a full recomputation is cheaper than the update
    _UPDATE_LIMIT = 0.6
    # work arrays below this size come from the heap without page faults (see ``_scratch``)
    _SCRATCH_BYTES = 4 * 2**20

    def __init__(self, pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
                 spec: PermutationSpec, sizes: Mapping[str, int],
                 factor_part: Mapping[str, int] | None = None):
        self.pairs = {site: [(a.detach().numpy(), b.detach().numpy()) for a, b in parts]
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
        for site in pairs:
            entries = self.spec[site] if site in spec else ()
            self.site_groups[site] = tuple(sorted({g for e in entries for g in _groups_of(e)}))
            for axis, entry in enumerate(entries):
                offset = 0
                for g in _groups_of(entry):
                    others = tuple(sorted({h for ax, e in enumerate(entries) if ax != axis
                                           for h in _groups_of(e)}))
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
        self.scratch: dict[str, np.ndarray] = {}  # reused work arrays, see ``_scratch``
        self.axis_indices: dict[tuple[str, int], tuple] = {}  # see ``_axis_index``

    # -- bookkeeping ------------------------------------------------------------------------------
    def set_perms(self, perms: Mapping[str, torch.Tensor]) -> None:
        for g, p in perms.items():
            if not torch.equal(p, self.perms[g]):
                self.perms[g] = p
                self.version[g] += 1

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
        return tuple(self._stamp(site, others, part) for site, _, _, others in self.uses[g]
                     for part in self._parts(site))

    def needs_solve(self, g: str) -> bool:
        """Whether anything ``g``'s similarity depends on changed since ``g`` was last solved."""
        return self.solved_at.get(g) != self._solve_stamp(g)

    def _margin_stamp(self, g: str, sites: frozenset[str], parts: int) -> tuple:
        """What a margin depends on: ``g``'s own permutation and the contributions it was
        computed from (of ``sites``, their first ``parts`` parts)."""
        return self.version[g], tuple(
            self._stamp(site, others, part) for site, _, _, others in self.uses[g]
            if site in sites for part in range(min(parts, len(self.pairs[site]))))

    def note_margin(self, g: str, similarity: np.ndarray,
                    settled: set[str] | None = None) -> None:
        """After a solve that left ``g`` at the best permutation of ``similarity`` (double-
        centred, as the assignment step saw it; the partial one over ``settled`` of the greedy
        start, or the means' while the objective has more parts): remember by how much it
        beats every other (see :meth:`certified`)."""
        if not self.linear or (settled is None and self.active == self.num_parts):
            return  # a solve on everything leaves nothing to certify
        sites = frozenset(site for site, _, _, others in self.uses[g]
                          if settled is None or settled.issuperset(others))
        self.margins[g] = (self._margin_stamp(g, sites, self.active), self.active, sites,
                           _certified_margin(similarity, self.perms[g].numpy()))

    def certified(self, g: str) -> bool:
        """Whether ``g``'s permutation provably stays where it is, with none of the products
        its similarity is missing computed; if so ``g`` counts as solved.

        At ``g``'s last solve, on some of the contributions to its similarity (the settled
        neighbours' of the greedy start, or the means'), every other permutation was worse by
        at least the margin ``m`` (the neighbours unchanged since). The missing terms, of
        tensors acting on ``g``, can favour another permutation by at most half their
        current squared distance ``d`` (``<A, P B> <= (||A||^2 + ||B||^2) / 2``), known from
        the costs the warm start evaluates. So when ``d < m`` a step on the whole similarity
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
        missing = 0.0
        for site in dict.fromkeys(site for site, *_ in self.uses[g]):  # in a fixed order
            counted = min(parts, len(self.pairs[site])) if site in sites else 0
            for part in range(counted, min(self.active, len(self.pairs[site]))):
                hit = self.distances.get((site, part))
                if hit is None or hit[0] != self._stamp(site, self.site_groups[site], part):
                    return False  # not known at the current permutations
                missing += hit[1]
        if not missing < margin:
            return False
        self.solved_at[g] = self._solve_stamp(g)
        return True

    def _other_index(self, site: str, axis: int) -> dict[int, np.ndarray | None]:
        """Gather index of every other permuted axis of a tensor under the current perms
        (``axis=-1``: of every permuted axis), None for an identity."""
        return {ax: self._axis_index(site, ax) for ax, entry in enumerate(self.spec[site])
                if entry is not None and ax != axis}

    def _axis_index(self, site: str, axis: int) -> np.ndarray | None:
        """Gather index of one permuted axis, kept until one of its groups moves (rebuilding
        it with torch ops for every product and cost term was 4-6 % of ResNet-20 x4's match)."""
        entry = self.spec[site][axis]
        stamp = tuple(self.version[g] for g in _groups_of(entry))
        hit = self.axis_indices.get((site, axis))
        if hit is None or hit[0] != stamp:
            blocks = self.blocks.get(site, {})
            (index,) = axis_gathers((entry,), self.perms, {0: blocks.get(axis, 1)}).values()
            hit = self.axis_indices[site, axis] = (stamp,
                                                   None if index is None else index.numpy())
        return hit[1]

    # -- the similarity ---------------------------------------------------------------------------
    def similarity(self, g: str, settled: set[str] | None = None) -> np.ndarray:
        """``S[i, j]``: the gain of putting unit ``j`` of b at unit ``i``, shape ``(n, n)``.

        float32, like the weights: its rounding is far below the differences assignments make.
        With ``settled``, only the contributions whose other groups are all in it (and those
        that depend on no other group): the partial similarity of the greedy start.
        """
        n = self.sizes[g]
        total = np.zeros((n, n), dtype=np.float32)
        for part in range(self.active):
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
            for part in self._parts(site):
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
        if settled is None:  # a partial similarity does not make a solve of g up to date
            self.solved_at[g] = self._solve_stamp(g)
        self.scratch.clear()
        return total

    def information(self, g: str, settled: set[str]) -> int:
        """How many weights of the (active) tensors acting on ``g`` the partial similarity over
        ``settled`` contains."""
        return sum(self.pairs[site][part][0].size for site, _, _, others in self.uses[g]
                   if settled.issuperset(others) for part in self._parts(site))

    def _scratch(self, slot: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A work array reused from product to product within one call of
        :meth:`similarity` or :meth:`rotate` (released at its end, so peak
        memory stays that of fresh arrays).

        A fresh large array is new memory the kernel must fault in and zero: on ResNet-20
        x16 that was a third of the time spent gathering and copying operands for the
        products. Small arrays are allocated afresh: reusing them only moved page faults to
        other allocations (the 512-wide MLP got slower).
        """
        size = math.prod(shape)
        if size * np.dtype(dtype).itemsize < self._SCRATCH_BYTES:
            return np.empty(shape, dtype=dtype)
        buffer = self.scratch.get(slot)
        if buffer is None or buffer.size < size or buffer.dtype != dtype:
            buffer = self.scratch[slot] = np.empty(size, dtype=dtype)
        return buffer[:size].reshape(shape)

    def _take(self, t: np.ndarray, index: np.ndarray, axis: int, slot: str) -> np.ndarray:
        """``np.take(t, index, axis)`` into the work array ``slot``."""
        shape = t.shape[:axis] + (len(index),) + t.shape[axis + 1:]
        # mode="clip" writes straight into ``out`` (the default "raise" buffers it first); the
        # indices are positions of a permutation, always in range
        return np.take(t, index, axis=axis, out=self._scratch(slot, shape, t.dtype), mode="clip")

    def _gather(self, t: np.ndarray, index: Mapping[int, np.ndarray | None]) -> np.ndarray:
        """``t`` gathered along the axes of ``index`` (None: left as it is), in work arrays."""
        gathers = 0
        for ax, idx in index.items():
            if idx is not None:  # alternate work arrays: a second gather reads the first
                t = self._take(t, idx, ax, f"gather{gathers % 2}")
                gathers += 1
        return t

    def _rows(self, t: np.ndarray, axis: int, offset: int, n: int, block: int,
              slot: str) -> np.ndarray:
        """The group's units of ``axis`` as rows, everything else flattened into columns:
        a view where the layout allows it, else a copy into the work array ``slot``."""
        units = slice(offset * block, (offset + n) * block)
        part = np.moveaxis(t[(slice(None),) * axis + (units,)], axis, 0)
        if axis == 0 or (t.ndim == 2 and block == 1):
            return part.reshape(n, -1)
        rows = self._scratch(slot, part.shape, t.dtype)
        inner = math.prod(t.shape[axis + 1:]) * t.itemsize
        if t.ndim > axis + 1 and t.flags.c_contiguous:
            # the axes after ``axis`` move together: copying them as one opaque item each
            # (a 3x3 kernel) was 1.5-2x faster than numpy's copy of the moved float view
            item = np.dtype((np.void, inner))
            lead = math.prod(t.shape[:axis])
            np.copyto(rows.reshape(len(part), lead * inner // t.itemsize).view(item),
                      t.reshape(lead, -1).view(item)[:, units].T)
        else:
            np.copyto(rows, part)
        return rows.reshape(n, -1)

    def _full(self, site: str, part: int, axis: int, offset: int, n: int,
              index: Mapping[int, np.ndarray | None]) -> np.ndarray:
        """``A_(axis) P_other(B)_(axis)^T`` of one part, shape ``(n, n)``, float32."""
        block = self.blocks.get(site, {}).get(axis, 1)
        a, b = self.pairs[site][part]
        b = self._gather(b, index)
        return (self._rows(a, axis, offset, n, block, "rows_a")
                @ self._rows(b, axis, offset, n, block, "rows_b").T)

    def _update(self, site: str, part: int, axis: int, offset: int, n: int,
                matrix: np.ndarray, old: Mapping[int, np.ndarray | None],
                new: Mapping[int, np.ndarray | None]) -> np.ndarray | None:
        """Correct a cached contribution for moved units of the one other permuted axis:
        ``sum_k A[:, k] (B[:, new_k] - B[:, old_k])^T`` over the moved positions ``k``."""
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
        matrix = matrix.copy()
        if len(moved) == 0:
            return matrix
        block = self.blocks.get(site, {}).get(axis, 1)
        a, b = self.pairs[site][part]
        delta = self._take(b, idx_new[moved], ax, "gather0")
        delta -= self._take(b, idx_old[moved], ax, "gather1")
        a_moved = self._take(a, moved, ax, "gather1")
        matrix += (self._rows(a_moved, axis, offset, n, block, "rows_a")
                   @ self._rows(delta, axis, offset, n, block, "rows_b").T)
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
        total = 0.0
        for site, pairs in self.pairs.items():
            for part in self._parts(site):
                stamp = self._stamp(site, self.site_groups[site], part)
                hit = self.distances.get((site, part))
                if hit is None or hit[0] != stamp:
                    a, b = pairs[part]
                    index = self._other_index(site, -1) if site in self.spec else {}
                    hit = (stamp, _squared_distance(a, b, index))
                    self.distances[site, part] = hit
                total += hit[1]
        return total

    def permuted(self, site: str, b: np.ndarray) -> np.ndarray:
        """``b`` with every permuted axis of the site reordered (in a work array)."""
        if site not in self.spec:
            return b
        return self._gather(b, self._other_index(site, -1))

    def rotation_tensor(self) -> torch.Tensor | None:
        return None if self.rotation is None else torch.from_numpy(self.rotation)


def _squared_distance(a: np.ndarray, b: np.ndarray,
                      index: Mapping[int, np.ndarray | None]) -> float:
    """``||a - b[index]||^2`` summed in float64, with ``b`` gathered along the axes of ``index``
    (None: left as it is).

    The tensor is processed in flat chunks that fit in the cache: gathering a whole permuted
    copy and squaring the whole difference wrote and re-read every element three times, half
    the time of a cost evaluation on ResNet-20 x16. The chunks are whole multiples of numpy's
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
    with np.errstate(over="ignore"):  # match() reports an infinite cost
        for start in range(0, a.size, chunk):
            stop = min(start + chunk, a.size)
            # the rows the chunk overlaps, gathered, then cut to the chunk
            lo, hi = start // row, -(-stop // row)
            rows = b[lo:hi] if first is None else np.take(b, first[lo:hi], axis=0)
            for ax, idx in index.items():
                rows = np.take(rows, idx, axis=ax)
            diff = np.subtract(flat_a[start:stop],
                               rows.reshape(-1)[start - lo * row:stop - lo * row])
            total = float(np.square(diff, out=diff).sum(dtype=np.float64, initial=total))
    return total


def _exact_step(problem: _Problem, g: str, new: torch.Tensor) -> float:
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


def _assign(similarity: np.ndarray) -> torch.Tensor:
    """Exact linear assignment maximising ``sum_i S[i, p[i]]``.

    Adding a constant to a row or a column changes every assignment's total by the same
    amount, so the matrix is double-centred first: the solution is the same, and scipy's
    shortest-augmenting-path solver is 2-3x faster on the nearly constant similarities that
    positive standard deviations produce (measured on the 2048-wide benchmark MLP).
    """
    return _assign_centred(_centred(similarity))


def _assign_centred(centred: np.ndarray) -> torch.Tensor:
    """:func:`_assign` of a matrix :func:`_centred` already (the descent keeps it for
    :func:`_certified_margin`)."""
    best = _row_maxima_permutation(centred)
    if best is not None:
        return torch.from_numpy(best).long()
    rows, cols = linear_sum_assignment(centred, maximize=True)
    return torch.from_numpy(cols[np.argsort(rows)]).long()


def _centred(similarity: np.ndarray) -> np.ndarray:
    """``S`` minus its column means, then minus its row means (a new array)."""
    s = similarity - similarity.mean(0, keepdims=True)
    s -= s.mean(1, keepdims=True)
    return s


def _certified_margin(similarity: np.ndarray, perm: np.ndarray) -> float:
    """A lower bound on how much ``perm`` beats every other permutation on
    ``sum_i S[i, p[i]]``, or 0.0 when none is at hand.

    When ``perm`` picks every row's strictly largest entry, another permutation differs from
    it in two rows at least and loses at least each such row's margin over its runner-up: the
    two smallest margins bound the loss. The solver passes the double-centred matrix its
    assignment step used (it ranks assignments alike, and more of them qualify). A bound
    below 1e-4 of the chosen entries' absolute sum counts as none: it would not stand far
    enough above the similarity's float32 rounding. ``similarity`` is left as it was.
    """
    n = len(perm)
    if n < 2:
        return math.inf  # no other permutation
    rows = np.arange(n)
    chosen = similarity[rows, perm]
    similarity[rows, perm] = -np.inf  # the runner-up of every row, without a copy
    margins = chosen - similarity.max(1)
    similarity[rows, perm] = chosen
    lowest = float(np.partition(margins, 1)[:2].sum(dtype=np.float64))
    scale = float(np.abs(chosen).sum(dtype=np.float64))
    return lowest if margins.min() > 0 and lowest > 1e-4 * scale else 0.0


def _row_maxima_permutation(similarity: np.ndarray) -> np.ndarray | None:
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


def _gain(similarity: np.ndarray, new: torch.Tensor, old: torch.Tensor) -> float:
    """How much ``new`` beats ``old`` on ``sum_i S[i, p[i]]``; 0.0 unless by more than the
    rounding of the similarity matrix.

    Without the margin, float rounding of cached similarities could swap two tied
    permutations back and forth forever."""
    rows = np.arange(len(new))
    new, old = new.numpy(), old.numpy()
    gain = float(similarity[rows, new].sum(dtype=np.float64)
                 - similarity[rows, old].sum(dtype=np.float64))
    scale = float(np.abs(similarity[rows, old]).sum(dtype=np.float64))
    return gain if gain > 1e-6 * scale else 0.0


# ------------------------------------------------------------------------------ inputs --
def _resolve_spec(guide_a: Any, guide_b: Any, spec: PermutationSpec | None,
                  data: Any) -> PermutationSpec:
    if spec is not None:
        if not isinstance(spec, PermutationSpec):
            raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
        return spec
    specs = []
    for label, guide in (("guide_a", guide_a), ("guide_b", guide_b)):
        model = _bayesian_model(guide, data)
        if model is not None and model.input_shape is not None:
            specs.append((label, model.spec))
    if len(specs) == 2 and specs[0][1] != specs[1][1]:
        # same names and shapes, different wiring (e.g. a residual connection on one side):
        # no permutation makes the two comparable
        raise ValueError(
            "guide_a and guide_b are over different architectures: their networks have the "
            "same parameters but different permutation symmetries (e.g. a residual connection "
            "on one side only); pass spec= if you know which one applies")
    if specs:
        return specs[0][1]
    raise ValueError(
        "no spec given and neither posterior is a guide over a BayesianNetwork (or a module "
        "with data= to trace it on): pass spec= (e.g. bnn_align.spec_from_module(net, "
        "example_input)) with your model's site names"
    )


def _bayesian_model(obj: Any, data: Any = None) -> BayesianNetwork | None:
    """The BayesianNetwork behind a posterior: a guide's model, or a plain module wrapped (to be
    traced and evaluated; its input shape comes from ``data`` if given)."""
    if isinstance(obj, autoguide.AutoGuide):
        model = model_of(obj)
        return model if isinstance(model, BayesianNetwork) else None
    if isinstance(obj, torch.nn.Module) and not isinstance(obj, BayesianNetwork):
        x = _inputs(data)
        return BayesianNetwork(obj, input_shape=None if x is None else tuple(x.shape[1:]))
    return None


def _inputs(data: Any) -> torch.Tensor | None:
    x = data[0] if isinstance(data, (tuple, list)) else data
    return x if isinstance(x, torch.Tensor) else None


def _spec_sizes(spec: PermutationSpec, va: GaussianView, guide_a: Any) -> dict[str, int]:
    shapes = {s: tuple(t.shape) for s, t in va.loc.items()}
    # buffers (BatchNorm statistics) may be named by the spec too
    if isinstance(guide_a, autoguide.AutoGuide) and isinstance(model_of(guide_a),
                                                                 BayesianNetwork):
        buffers = model_of(guide_a).net.named_buffers()
    elif isinstance(guide_a, torch.nn.Module):
        buffers = guide_a.named_buffers()
    else:
        buffers = ()
    shapes.update({k: tuple(v.shape) for k, v in buffers if k not in shapes})
    try:
        return spec.group_sizes(shapes, where="the posteriors")
    except ValueError as err:
        raise ValueError(f"the permutation spec does not fit the posteriors: {err}") from None


# --------------------------------------------------------------------------- the solvers --
def _problem(va: GaussianView, vb: GaussianView, method: str, spec: PermutationSpec,
             sizes: Mapping[str, int]) -> tuple[_Problem, float]:
    """The assignment problem of a method, and the constant part of its cost (terms present on
    one side only, which no permutation changes)."""
    pairs: dict[str, list] = {s: [(va.loc[s], vb.loc[s])] for s in va.sites}
    constant = 0.0
    factor_part: dict[str, int] = {}
    if method == "mean":
        return _Problem(pairs, spec, sizes), constant
    a_has, b_has = va.kind not in ("point", "full_rank"), vb.kind not in ("point", "full_rank")
    for s in va.sites:
        if a_has and b_has:
            pairs[s].append((va.scale[s], vb.scale[s]))
        elif a_has or b_has:
            constant += float(((va.scale[s] if a_has else vb.scale[s]).double() ** 2).sum())
    if va.factor is not None and vb.factor is not None:
        rank = max(va.rank, vb.rank)  # zero columns leave a covariance unchanged
        for s in va.sites:
            factor_part[s] = len(pairs[s])
            pairs[s].append((_pad(va.factor[s], rank), _pad(vb.factor[s], rank)))
    else:
        for view in (va, vb):
            if view.factor is not None:
                constant += sum(float((f.double() ** 2).sum()) for f in view.factor.values())
    return _Problem(pairs, spec, sizes, factor_part), constant


def _pad(factor: torch.Tensor, rank: int) -> torch.Tensor:
    extra = rank - factor.shape[-1]
    if extra == 0:
        return factor
    return torch.cat([factor, factor.new_zeros(*factor.shape[:-1], extra)], dim=-1)


def _coordinate_descent(problem: _Problem, start: Mapping[str, torch.Tensor], constant: float,
                        max_iter: int, rng: np.random.Generator, bar: Any
                        ) -> tuple[dict, list[float], int, bool, torch.Tensor | None]:
    """Sweeps over the groups in random order, each an exact assignment, then a rotation step,
    until a sweep changes nothing.

    The objective after a sweep is the one before it minus twice the gains of its steps (it is
    ``||A||^2 + ||B||^2 - 2 sum_t <A_t, P(B_t)>``, linear in each step's permutation), so no
    sweep has to pass over all the weights; the first and last values are computed directly.
    """
    problem.set_perms(start)
    problem.rotate()
    current = problem.cost() + constant
    history: list[float] = []
    converged = False
    iterations = 0
    for iterations in range(1, max_iter + 1):
        gain = 0.0
        for g in rng.permutation(list(problem.sizes)):
            g = str(g)
            if not problem.needs_solve(g) or problem.certified(g):
                continue  # nothing it depends on moved since its last solve, or it provably
                # stays where it is
            similarity = problem.similarity(g)
            centred = _centred(similarity)
            new = _assign_centred(centred)
            if not torch.equal(new, problem.perms[g]):
                if problem.linear:
                    step = _gain(similarity, new, problem.perms[g])
                    if step > 0:
                        problem.set_perms({g: new})
                        gain += step
                else:
                    gain += _exact_step(problem, g, new)
            if torch.equal(new, problem.perms[g]):
                problem.note_margin(g, centred)
        gain += problem.rotate()
        changed = gain > 0
        current = current - 2 * gain if problem.linear else problem.cost() + constant
        history.append(current)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(cost=f"{current:.6g}")
        if not changed:
            converged = True
            break
    history[-1] = problem.cost() + constant  # exact, and free of accumulated rounding
    return dict(problem.perms), history, iterations, converged, problem.rotation_tensor()


# --------------------------------------------------------------------- activation matching --
def _activation_perms(guide_a: Any, guide_b: Any, va: GaussianView, vb: GaussianView,
                      spec: PermutationSpec, sizes: Mapping[str, int], data: Any,
                      num_samples: int, seed: int, batch_size: int) -> dict[str, torch.Tensor]:
    model_a, model_b = _bayesian_model(guide_a, data), _bayesian_model(guide_b, data)
    model_a = model_a or model_b
    model_b = model_b or model_a
    if model_a is None:
        raise ValueError("method='activation' runs the network, so at least one posterior must "
                         "be a guide over a BayesianNetwork or an nn.Module")
    x = _inputs(data)
    if x is None:
        raise TypeError("data must be a tensor of inputs or a tuple (x, y) of tensors")
    producers = _producers(model_a, spec, sizes)
    gen = torch.Generator().manual_seed(seed)
    stats = {g: _CorrelationStats(sizes[g]) for g in producers}
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size]
        acts_a = _expected_activations(model_a, va, producers, batch, num_samples, gen)
        acts_b = _expected_activations(model_b, vb, producers, batch, num_samples, gen)
        for g in producers:
            stats[g].update(acts_a[g], acts_b[g])
    perms = identity_perms(sizes)
    for g, s in stats.items():
        perms[g] = _assign(s.correlation().numpy())
    return perms


def _producers(model: BayesianNetwork, spec: PermutationSpec, sizes: Mapping[str, int]
               ) -> dict[str, list[str]]:
    """Group -> names of the linear/convolutional layers whose outputs carry its units."""
    out: dict[str, list[str]] = {}
    for name, module in model.net.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d,
                               torch.nn.Conv3d)):
            key = f"{name}.weight"
            if key in spec and isinstance(spec[key][0], str):
                out.setdefault(spec[key][0], []).append(name)
    missing = [g for g in sizes if g not in out]
    if missing:
        raise ValueError(f"activation matching found no layer producing the units of groups "
                         f"{missing}; use method='wasserstein' or 'mean'")
    return out


def _expected_activations(model: BayesianNetwork, view: GaussianView,
                          producers: Mapping[str, list[str]], x: torch.Tensor,
                          num_samples: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Posterior-mean activations of every group's producing layers: ``(points, units)``."""
    is_point = view.kind == "point"
    draws = view.loc if is_point else view.sample(num_samples, gen)
    count = 1 if is_point else num_samples
    sums: dict[str, torch.Tensor] = {}
    modules = dict(model.net.named_modules())
    captured: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_module, _inputs, output):
            captured[name] = output.detach()
        return fn

    handles = [modules[name].register_forward_hook(hook(name))
               for names in producers.values() for name in names]
    try:
        with torch.no_grad():
            for s in range(count):
                weights = draws if is_point else {k: v[s] for k, v in draws.items()}
                model.evaluate(weights, x)
                for g, names in producers.items():
                    # units on axis 1 (channels) or last (features); positions become points
                    acts = torch.cat([_points_by_units(captured[n]) for n in names], dim=0)
                    sums[g] = acts if g not in sums else sums[g] + acts
    finally:
        for h in handles:
            h.remove()
    return {g: v / count for g, v in sums.items()}


def _points_by_units(t: torch.Tensor) -> torch.Tensor:
    if t.dim() <= 2:
        return t.reshape(len(t), -1)
    return t.movedim(1, -1).reshape(-1, t.shape[1])


class _CorrelationStats:
    """Streaming Pearson correlation between the units of two activation matrices."""

    def __init__(self, n: int):
        self.count = 0
        self.sa = torch.zeros(n, dtype=torch.float64)
        self.sb = torch.zeros(n, dtype=torch.float64)
        self.saa = torch.zeros(n, dtype=torch.float64)
        self.sbb = torch.zeros(n, dtype=torch.float64)
        self.sab = torch.zeros(n, n, dtype=torch.float64)

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.double(), b.double()
        self.count += len(a)
        self.sa += a.sum(0)
        self.sb += b.sum(0)
        self.saa += (a * a).sum(0)
        self.sbb += (b * b).sum(0)
        self.sab += a.T @ b

    def correlation(self) -> torch.Tensor:
        n = self.count
        cov = self.sab / n - torch.outer(self.sa / n, self.sb / n)
        va = (self.saa / n - (self.sa / n) ** 2).clamp_min(0)
        vb = (self.sbb / n - (self.sb / n) ** 2).clamp_min(0)
        return cov / (torch.outer(va.sqrt(), vb.sqrt()) + 1e-12)


# ----------------------------------------------------------------- starts and the cost --
def _prepare(guide_a: Any, guide_b: Any, spec: PermutationSpec | None, data: Any
             ) -> tuple[GaussianView, GaussianView, PermutationSpec, dict[str, int]]:
    """Checked read-only views (sharing memory with the posteriors), the spec, group sizes."""
    va, vb = paired_views(guide_a, guide_b, ("guide_a", "guide_b"), copy=False)
    spec = _resolve_spec(guide_a, guide_b, spec, data)
    return va, vb, spec, _spec_sizes(spec, va, guide_a)


_WARM_START_SWEEPS = 100


def _cost_at(problem: _Problem, perms: Mapping[str, torch.Tensor], constant: float) -> float:
    """The objective at ``perms`` (with the best rotation of the factors for them)."""
    problem.set_perms(perms)
    problem.rotate()
    return problem.cost() + constant


def _warm_start(problem: _Problem, constant: float, start: Mapping[str, torch.Tensor],
                rng: np.random.Generator, greedy: bool = False) -> dict[str, torch.Tensor]:
    """Where the descent on the method's objective starts: ``start`` refined on the means.

    With ``greedy``, the means are first matched by :func:`_greedy_start` (used for the default
    start: it settles near-copies in one pass of products where a descent from the identity
    needs two or three). Then, for an objective with more than the means, coordinate descent on
    the means alone refines that point: the standard deviations and covariance factors add many
    terms to the similarities that carry little information about which units correspond
    (independently trained posteriors have similar spreads everywhere), and a shared rotation
    of the factors fitted at a wrong permutation couples all groups; from the identity,
    coordinate descent on the full objective can then stop in a poor local optimum on coupled
    (residual) networks. Weight matching on the means finds the basin; the full objective then
    refines within it. The result is kept only if it lowers the objective below ``start``'s, so
    the descent that follows never ends worse than a descent from ``start``'s point would begin.
    The means-only descent runs to convergence whatever ``max_iter`` is, on ``problem`` itself
    (its other parts switched off), so the full descent reuses its cached terms.
    """
    if problem.num_parts == 1 and not greedy:
        return dict(start)  # the objective is the means': its own descent starts at start
    at_start = _cost_at(problem, start, constant)
    problem.active = 1
    try:
        perms = dict(start)
        if greedy:  # on the means, the greedy point replaces start only if it is no worse
            means_at_start = _cost_at(problem, start, 0.0)
            candidate = _greedy_start(problem)
            if _cost_at(problem, candidate, 0.0) <= means_at_start:
                perms = candidate
        if problem.num_parts > 1:
            perms = _coordinate_descent(problem, perms, 0.0, _WARM_START_SWEEPS, rng, None)[0]
    finally:
        problem.active = problem.num_parts
    # evaluated last, so the descent that follows finds its terms cached
    if _cost_at(problem, perms, constant) < at_start:
        return perms
    return dict(start)


def _greedy_start(problem: _Problem) -> dict[str, torch.Tensor]:
    """Solve every group once, each from what its settled neighbours determine.

    A forward pass of weight matching, for any spec: the next group is the one whose similarity
    is most determined by the groups solved so far (tensors whose other axes are all settled,
    and those with no other permuted axis, such as the first layer), and it is solved from those
    contributions alone. Coordinate descent from the identity solves groups against neighbours
    that have not moved yet and must redo those products once they have; from here, on a
    near-copy, the first sweep already finds nothing to change. The objective is not evaluated:
    the caller compares what the descent from here reaches with its start.
    """
    settled: set[str] = set()
    while len(settled) < len(problem.sizes):
        g = max((h for h in problem.sizes if h not in settled),
                key=lambda h: problem.information(h, settled))
        similarity = problem.similarity(g, settled)
        if similarity.any():  # no information yet: keep the current permutation
            centred = _centred(similarity)
            problem.set_perms({g: _assign_centred(centred)})
            problem.note_margin(g, centred, settled)
        settled.add(g)
    return dict(problem.perms)


def alignment_cost(guide_a: Any, guide_b: Any, perms: Mapping[str, Any] | None = None, *,
                   spec: PermutationSpec | None = None, method: str = "wasserstein",
                   data: Any = None) -> float:
    """The objective :func:`match` minimises, at given permutations of ``guide_b``.

    Parameters
    ----------
    guide_a, guide_b : posterior
        As in :func:`match`.
    perms : mapping of str to permutation, optional
        Group -> permutation (default: the identity), e.g. ``alignment.perms`` of any method.
    spec : PermutationSpec, optional
        As in :func:`match`.
    method : {"wasserstein", "mean"}
        ``"wasserstein"``: the coupled squared distance (W2^2 for diagonal Gaussians), with
        the covariance factors rotated optimally for ``perms``; ``"mean"``:
        ``||mu_a - P mu_b||^2``.
    data : optional
        Inputs to trace plain modules on, as in :func:`match`.

    Returns
    -------
    float

    Examples
    --------
    Compare what two methods achieve on the same objective:

    >>> w2 = match(q0, q1)                                        # doctest: +SKIP
    >>> alignment_cost(q0, q1, match(q0, q1, method="mean").perms) >= w2.cost_after  # doctest: +SKIP
    True
    """
    if method not in ("wasserstein", "mean"):
        raise ValueError(f"method must be 'wasserstein' or 'mean', got {method!r}")
    va, vb, spec, sizes = _prepare(guide_a, guide_b, spec, data)
    perms = check_perms(perms, sizes) if perms is not None else identity_perms(sizes)
    problem, constant = _problem(va, vb, method, spec, sizes)
    return _cost_at(problem, perms, constant)


# ------------------------------------------------------------------------------- match --
def match(
    guide_a: Any,
    guide_b: Any,
    *,
    spec: PermutationSpec | None = None,
    method: str = "wasserstein",
    data: Any = None,
    max_iter: int = 100,
    seed: int = 0,
    init: Mapping[str, Any] | None = None,
    num_restarts: int = 1,
    num_samples: int = 16,
    batch_size: int = 512,
    progress: bool = False,
) -> Alignment:
    """Find the permutations of ``guide_b`` that bring it closest to ``guide_a``.

    Parameters
    ----------
    guide_a, guide_b : posterior
        Pyro autoguides (``AutoNormal``, ``AutoDiagonalNormal``, ``AutoLowRankMultivariateNormal``,
        ``AutoMultivariateNormal``, ``AutoDelta``), state dicts or modules over the same
        architecture; the two may be of different kinds. Neither is modified.
    spec : PermutationSpec, optional
        Defaults to the spec of the guides' BayesianNetwork; pass one for your own Pyro model.
    method : {"wasserstein", "mean", "activation"}
        ``"wasserstein"`` minimises the coupled squared distance of the module docstring (W2^2
        for diagonal Gaussians) over permutations and, with covariance factors on both sides,
        a rotation of the factors. Each start is first refined on the means alone and the
        result kept if it lowers the full objective (see ``_warm_start``), so the W2 result is
        never worse on its own objective than mean matching from the same start.
        ``"mean"`` is Git Re-Basin weight matching on the means. Both start, by default, from
        a greedy forward pass (each group solved once from its already-solved neighbours, see
        ``_greedy_start``) when that is no worse on the means than the identity.
        ``"activation"`` matches units by the Pearson correlation of their posterior-expected
        activations (the mean over ``num_samples`` weight draws) on ``data``, one exact
        assignment per group; residual streams share one permutation, and their correlation
        sums over every layer that writes to the stream.
    data : Tensor or (x, y), optional
        Inputs for ``"activation"`` (required there, unused otherwise).
    max_iter : int
        Maximum number of sweeps over the groups (of the descent on the method's objective;
        the warm start on the means runs to convergence).
    seed : int
        Seed of the group order, random restarts and activation sampling.
    init : mapping of str to permutation, optional
        Starting permutations for the first restart (default: the greedy start above, or the
        identity where that is better). A given ``init`` is used as it is. For
        ``"wasserstein"`` every start is first refined on the means, and the refined
        permutations replace it when they lower the full objective.
    num_restarts : int
        Restarts of coordinate descent; restarts after the first start from random
        permutations. The lowest final objective wins.
    num_samples, batch_size : int
        Weight draws and batch size for ``"activation"``.
    progress : bool
        Show a tqdm progress bar over sweeps.

    Returns
    -------
    Alignment

    Raises
    ------
    ValueError
        Different architectures (naming the first site that differs, or, for networks with
        the same parameters, different permutation symmetries), NaN or infinite parameters
        (naming the site) or parameters whose squared distance overflows, a spec that does not
        fit, an unknown method, ``"activation"`` without data.
    TypeError
        Unsupported posterior kinds.
    """
    started = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    positive_int(max_iter=max_iter, num_restarts=num_restarts, num_samples=num_samples,
                 batch_size=batch_size)
    if method == "activation" and data is None:
        raise ValueError("method='activation' needs data= (inputs to compute activations on)")
    va, vb, spec, sizes = _prepare(guide_a, guide_b, spec, data)
    start = check_perms(init, sizes) if init is not None else identity_perms(sizes)
    rng = np.random.default_rng(seed)

    if method == "activation":
        start = _activation_perms(guide_a, guide_b, va, vb, spec, sizes, data, num_samples,
                                  seed, batch_size)
        objective = "wasserstein"
        max_iter, num_restarts = 0, 1
    else:
        objective = method

    bar = tqdm(total=max_iter * num_restarts, desc=f"match ({method})", disable=not progress,
               leave=False)
    best = None
    restart_costs = []
    cost_before = None
    gen = torch.Generator().manual_seed(seed)
    for restart in range(num_restarts):
        problem, constant = _problem(va, vb, objective, spec, sizes)
        if cost_before is None:  # at the identity, with the best rotation of the factors
            cost_before = _cost_at(problem, identity_perms(sizes), constant)
            if not math.isfinite(cost_before):
                raise ValueError("the squared distance between guide_a and guide_b overflows: "
                                 "their parameters are too large to compare")
        init_perms = start if restart == 0 else random_perms(sizes, gen)
        if max_iter == 0:
            cost = _cost_at(problem, init_perms, constant)
            result = (dict(problem.perms), [cost], 0, True, problem.rotation_tensor())
        else:
            init_perms = _warm_start(problem, constant, init_perms, rng,
                                     greedy=restart == 0 and init is None)
            result = _coordinate_descent(problem, init_perms, constant, max_iter, rng, bar)
        restart_costs.append(result[1][-1])
        if best is None or result[1][-1] < best[1][-1]:
            best = result
    bar.close()
    perms, history, iterations, converged, rotation = best
    del va, vb, problem  # free the working copies before building the aligned guide
    aligned = permute(guide_b, perms, spec)
    adapter = adapter_for(aligned)
    if rotation is not None and hasattr(adapter, "rotate_"):
        adapter.rotate_(aligned, rotation)  # aligned is our own new guide
    return Alignment(
        perms=perms, aligned=aligned, cost_before=cost_before, cost_after=history[-1],
        history=history, iterations=iterations, converged=converged,
        seconds=time.perf_counter() - started, method=method, spec=spec, rotation=rotation,
        restart_costs=restart_costs, guide_a=guide_a, guide_b=guide_b,
    )
