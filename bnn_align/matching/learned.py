"""Learned matching: permutations chosen by the loss along the path (``"ste"``, ``"sinkhorn"``).

Weight matching (:func:`~bnn_align.match`'s ``"wasserstein"``) minimises a distance between the
posteriors, a proxy for what matters: the loss along the path between them. The learned methods
minimise that loss itself, the objective :func:`~bnn_align.fit_curve` trains its bends on, with
the permutation of ``guide_b`` as the variable:

    E_{t ~ U[0, 1]} [ -ELBO(q_t) ],   q_t = (1 - t) q_a + t P(q_b) on the Wasserstein path,

one ``t`` and one reparameterised draw per minibatch: the expected NLL scaled to the size of
``data`` plus the KL to the model's prior (:func:`bnn_align._elbo.negative_elbo`). Low-rank
factors of ``P(q_b)`` are rotated onto ``q_a``'s first, as :func:`~bnn_align.interpolate` does.

* ``"ste"``, the straight-through estimator of Git Re-Basin (Ainsworth et al., 2023): a
  continuous stand-in ``theta~`` for ``guide_b``'s means, standard deviations and factors is
  projected on the forward pass to the nearest permutation of ``guide_b``,
  ``P = argmin_P ||theta~ - P(theta_b)||^2`` (the ``"wasserstein"`` objective, solved by
  :func:`bnn_align.matching._descent.descend` warm-started from the previous step's permutations, so a
  step that moves nothing costs one pass of similarities), and ``P(theta_b)`` enters the loss;
  the backward pass hands its gradient to ``theta~`` unchanged. As in Git Re-Basin,
  ``theta~`` starts at ``guide_a``'s parameters, whose projection is the ``"wasserstein"``
  result: started at the aligned ``guide_b`` itself it sits on a permutation, as far from
  every other as the units are apart, and on a trained MNIST-1D pair (MLP 128) five epochs
  never moved it off (at learning rates up to 1e-2), where from ``guide_a`` they did.
* ``"sinkhorn"``, Sinkhorn re-basin (Pena et al., 2023): every group's permutation is relaxed
  to a doubly stochastic matrix ``S = Sinkhorn(L / tau)`` of learned logits ``L``, applied
  along the group's axes of ``guide_b``'s tensors (:func:`bnn_align.permute.soft_permute_tensors`;
  mixtures of standard deviations stay positive). The logits start at ``kappa`` on the
  ``"wasserstein"`` permutation and 0 elsewhere, ``kappa = log(9 (n - 1))`` giving it 0.9 of
  every row at ``tau = 1``; ``tau`` falls geometrically from 1 to :data:`TEMPERATURE_END` over
  the training. Sinkhorn's row and column normalisations run without gradients until the rows
  sum to one within ``1e-6`` (:func:`_sinkhorn_scalings`, from the previous step's scalings);
  the gradient flows through one normalisation in log space at those scalings (held fixed),
  not through every iteration, so memory stays one matrix per group. Near a permutation
  Sinkhorn converges slowly, so the matrix is then rounded onto the doubly stochastic ones
  (:func:`_rounded`). The hard permutation is the exact assignment maximising
  ``sum_i L[i, p(i)]`` (scipy, as the solver's steps).

Both hold out a seeded random ``VALIDATION_FRACTION`` of ``data`` (the rest trains) and keep
the learned permutations only if their NLL barrier on it (11 points along the Wasserstein path,
:func:`~bnn_align.marginal_loss` with the same draws for both) is below the start's.
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping

import numpy as np
import torch
from pyro.infer import autoguide

from .._checks import check_int, check_positive_float
from ._descent import assign, cost_at, descend
from .._elbo import forward_draws, minimise_along_path, negative_elbo, prior_terms
from ..bayesian import BayesianNetwork, as_data_pair
from ..marginal import _check_inputs, marginal_loss
from .._threads import torch_threads
from .weights import Alignment, _aligned_guide, _prepare, _problem, _solver_threads, match
from ..paths.interpolation import _buffers_of, factor_rotation, interpolate, lerp_buffers, lerp_views
from ..symmetry.permutation import permute_tensors, soft_permute_tensors
from ..posterior import GaussianView, as_gaussian, model_of, shared_family
from ..symmetry.spec import PermutationSpec

__all__ = ["learned_match", "DEFAULT_LR", "VALIDATION_FRACTION", "TEMPERATURE_END"]

DEFAULT_LR = {"ste": 3e-3, "sinkhorn": 0.3}
VALIDATION_FRACTION = 0.2
TEMPERATURE_END = 0.1
# mass of a row's "wasserstein" unit in the first Sinkhorn matrices (tau = 1)
_START_MASS = 0.9
_VALIDATION_POINTS = 11
_SINKHORN_TOLERANCE = 1e-6
_SINKHORN_MAX_ITERATIONS = 200
_KERNEL_FLOOR = 1e-150


# ------------------------------------------------------------------------------ relaxations --
class _StraightThrough:
    """``"ste"``: a continuous stand-in for ``guide_b``'s view, starting at ``initial``,
    projected to the nearest permutation of the view on every forward pass (the gradient
    passes straight through to it); ``start`` warm-starts the first projection."""

    def __init__(self, view_b: GaussianView, initial: GaussianView,
                 start: Mapping[str, torch.Tensor], spec: PermutationSpec,
                 sizes: Mapping[str, int], max_iter: int, seed: int, threads: int):
        self.view_b, self.spec, self.sizes = view_b, spec, dict(sizes)
        self.max_iter, self.threads = max_iter, threads
        self.rng = np.random.default_rng(seed)
        self.perms = dict(start)
        self.copy = GaussianView(view_b.kind, *(
            None if part is None else {s: t.detach().clone() for s, t in part.items()}
            for part in (initial.loc, initial.scale, initial.factor)))
        self.params = [t for part in (self.copy.loc, self.copy.scale, self.copy.factor or {})
                       for t in part.values()]

    def permuted(self, view: GaussianView, perms: Mapping[str, torch.Tensor]) -> GaussianView:
        return GaussianView(view.kind, permute_tensors(view.loc, perms, self.spec),
                            permute_tensors(view.scale, perms, self.spec),
                            None if view.factor is None else
                            permute_tensors(view.factor, perms, self.spec))

    def project(self) -> dict[str, torch.Tensor]:
        """The permutations of ``guide_b`` nearest to the copy (the "wasserstein" objective),
        from the previous ones."""
        problem, constant = _problem(self.copy, self.view_b, "wasserstein", self.spec,
                                     self.sizes)
        with torch_threads(self.threads):
            self.perms = descend(problem, constant, self.perms, self.max_iter, self.rng,
                                 None).perms
        return self.perms

    def view(self) -> GaussianView:
        """``P(guide_b)`` for the projection ``P`` of the copy, differentiable in the copy
        (with the gradient of ``P(guide_b)``)."""
        hard = self.permuted(self.view_b, self.project())
        through = {}
        for part in ("loc", "scale", "factor"):
            mine = getattr(self.copy, part)
            through[part] = None if mine is None else {
                s: c + (getattr(hard, part)[s] - c).detach() for s, c in mine.items()}
        return GaussianView(self.view_b.kind, through["loc"], through["scale"],
                            through["factor"])

    def apply(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Other tensors of ``guide_b`` (its model's buffers) under the last projection."""
        return permute_tensors(tensors, self.perms, self.spec)

    def permutations(self) -> dict[str, torch.Tensor]:
        return self.project()


class _Sinkhorn:
    """``"sinkhorn"``: every group's permutation relaxed to ``Sinkhorn(L / tau)`` of learned
    logits ``L``, ``tau`` annealed from 1 to :data:`TEMPERATURE_END` over ``total_steps``."""

    def __init__(self, view_b: GaussianView, start: Mapping[str, torch.Tensor],
                 spec: PermutationSpec, total_steps: int):
        self.view_b, self.spec, self.total_steps = view_b, spec, total_steps
        self.steps = 0
        device = view_b.device
        self.logits = {}
        for g, perm in start.items():
            n = len(perm)
            kappa = math.log(_START_MASS / (1 - _START_MASS) * max(n - 1, 1))
            self.logits[g] = kappa * torch.eye(n, dtype=torch.float64, device=device)[
                perm.to(device)]
        self.params = list(self.logits.values())
        # log-scalings of the last matrices (rows, columns) times their temperature (in the
        # logits' units): the next ones start from them
        self.scalings: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.current: dict[str, torch.Tensor] = {}

    def temperature(self, step: int) -> float:
        return TEMPERATURE_END ** (step / max(self.total_steps - 1, 1))

    def matrices(self, temperature: float) -> dict[str, torch.Tensor]:
        """Every group's doubly stochastic matrix at ``temperature`` (float64),
        differentiable in the logits."""
        out = {}
        for g, logits in self.logits.items():
            scaled = logits / temperature
            rows, cols = self.scalings.get(g, (None, None))
            with torch.no_grad():
                rows, cols = _sinkhorn_scalings(
                    scaled, None if rows is None else rows / temperature,
                    None if cols is None else cols / temperature)
            self.scalings[g] = (rows * temperature, cols * temperature)
            # one differentiable normalisation at the converged scalings
            log_s = scaled + rows[:, None] + cols[None, :]
            log_s = log_s - log_s.logsumexp(1, keepdim=True)
            out[g] = _rounded((log_s - log_s.logsumexp(0, keepdim=True)).exp())
        return out

    def view(self) -> GaussianView:
        """``guide_b`` with every group's axes mixed by the current matrices."""
        dtype = next(iter(self.view_b.loc.values())).dtype
        self.current = {g: m.to(dtype) for g, m in
                        self.matrices(self.temperature(min(self.steps,
                                                           self.total_steps - 1))).items()}
        self.steps += 1
        view = self.view_b
        return GaussianView(view.kind, self.apply(view.loc), self.apply(view.scale),
                            None if view.factor is None else self.apply(view.factor))

    def apply(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return soft_permute_tensors(tensors, self.current, self.spec)

    def permutations(self) -> dict[str, torch.Tensor]:
        """The exact assignment maximising ``sum_i L[i, p(i)]`` of every group."""
        return {g: assign(logits.detach().cpu().numpy()) for g, logits in self.logits.items()}


def _sinkhorn_scalings(scaled: torch.Tensor, rows: torch.Tensor | None,
                       cols: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-scalings ``(r, c)`` that make ``exp(scaled + r[:, None] + c[None, :])`` doubly
    stochastic: Sinkhorn's alternating normalisations of rows and columns, from given
    scalings (the previous step's: the logits moved little) or zeros, until the rows sum to
    one within the tolerance after a column normalisation (or the iteration cap).

    Log space only for the matrix itself (each row shifted by its largest entry, the rest
    floored far below float64's rounding so no column vanishes): the iterations scale it by
    vectors, two matrix-vector products each (a logsumexp over the matrix per half-iteration
    was some 25 times slower).
    """
    shift = scaled.max(1).values
    kernel = (scaled - shift[:, None]).exp().clamp_min(_KERNEL_FLOOR)
    u = torch.ones_like(shift) if rows is None else (rows + shift).exp()
    v = torch.ones_like(shift) if cols is None else cols.exp()
    for iteration in range(_SINKHORN_MAX_ITERATIONS):
        u = 1.0 / (kernel @ v)
        v = 1.0 / (kernel.T @ u)
        if iteration % 10 == 9 and float((u * (kernel @ v) - 1).abs().max()) < \
                _SINKHORN_TOLERANCE:
            break
    return u.log() - shift, v.log()


def _rounded(matrix: torch.Tensor) -> torch.Tensor:
    """A nonnegative matrix with unit row and column sums close to ``matrix`` (whose sums are
    nearly one): rows then columns scaled down where their sum exceeds one, and the missing
    mass added back as an outer product of the deficits (Altschuler, Weed & Rigollet 2017,
    Algorithm 2). Sinkhorn converges slowly near a permutation matrix; this makes the result
    doubly stochastic up to float rounding whatever the iterations left. Differentiable."""
    matrix = matrix * (1.0 / matrix.sum(1)).clamp(max=1.0)[:, None]
    matrix = matrix * (1.0 / matrix.sum(0)).clamp(max=1.0)[None, :]
    # deficits, >= 0 but for the rounding of a sum scaled down to one
    rows, cols = (1.0 - matrix.sum(1)).clamp(min=0.0), (1.0 - matrix.sum(0)).clamp(min=0.0)
    missing = rows.sum()
    if float(missing.detach()) <= 0.0:
        return matrix
    return matrix + torch.outer(rows, cols) / missing


# ------------------------------------------------------------------------------ the inputs --
def _model(guide_a: Any, guide_b: Any, method: str) -> BayesianNetwork:
    for label, guide in (("guide_a", guide_a), ("guide_b", guide_b)):
        if not (isinstance(guide, autoguide.AutoGuide)
                and isinstance(model_of(guide), BayesianNetwork)):
            raise TypeError(f"method={method!r} trains on the model's ELBO (its prior and "
                            f"likelihood): {label} must be a Pyro guide over a "
                            f"BayesianNetwork, got {type(guide).__name__}")
    return model_of(guide_a)


def _split(model: BayesianNetwork, guide_a: Any, data: Any, method: str, seed: int
           ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``data`` checked against the network and split into (training, validation) parts: a
    random :data:`VALIDATION_FRACTION` of it (at least one point), drawn with ``seed``."""
    if data is None:
        raise ValueError(f"method={method!r} learns on the loss along the path: pass "
                         f"data=(x, y), the training data (a random "
                         f"{VALIDATION_FRACTION:.0%} of it is held out for validation)")
    x, y = as_data_pair(data)
    if len(x) < 2:
        raise ValueError(f"method={method!r} needs at least 2 data points (one to train on, "
                         f"one to validate on), got {len(x)}")
    _check_inputs(model, x)
    with torch.no_grad():
        view = as_gaussian(guide_a, copy=False)
        out = model.evaluate(view.loc, x[:1].to(view.device))
    model.likelihood.check_targets(out.expand(len(y), *out.shape[1:]), y)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    held = max(1, round(VALIDATION_FRACTION * len(x)))
    validation, train = order[:held], order[held:]
    return (x[train], y[train]), (x[validation], y[validation])


def _validation_barrier(model: BayesianNetwork, guide_a: Any, aligned: Any,
                        validation: tuple[torch.Tensor, torch.Tensor], num_samples: int,
                        seed: int) -> float:
    curve = marginal_loss(model, interpolate(guide_a, aligned), validation,
                          ts=_VALIDATION_POINTS, num_samples=num_samples, metrics=["nll"],
                          seed=seed)
    return curve.barrier("nll").value


# ------------------------------------------------------------------------------- the method --
def learned_match(method: str, guide_a: Any, guide_b: Any, data: Any, *,
                  spec: PermutationSpec | None, epochs: int, lr: float | None,
                  batch_size: int, num_samples: int, max_iter: int, seed: int,
                  init: Mapping[str, Any] | None, num_restarts: int,
                  num_threads: int | None, progress: bool, unknown: str) -> Alignment:
    """:func:`~bnn_align.match` with ``method="ste"`` or ``"sinkhorn"`` (see the module
    docstring); the arguments are ``match``'s, whose other checks have run."""
    started = time.perf_counter()
    epochs = check_int("epochs", epochs)
    lr = DEFAULT_LR[method] if lr is None else check_positive_float("lr", lr)
    model = _model(guide_a, guide_b, method)
    family = shared_family(guide_a, guide_b, ("guide_a", "guide_b"), f"method={method!r}",
                     "guide_a and guide_b", "the posteriors along the path are of that family")
    prior = prior_terms(model)  # a likelihood the objective cannot handle fails here
    train, validation = _split(model, guide_a, data, method, seed)
    start = match(guide_a, guide_b, spec=spec, method="wasserstein", max_iter=max_iter,
                  seed=seed, init=init, num_restarts=num_restarts, num_threads=num_threads,
                  progress=progress, unknown=unknown)
    if start.spec.heads:
        raise ValueError(f"method={method!r} does not respect attention heads yet (the spec "
                         f"has head sets {list(start.spec.heads)}); use method='wasserstein' "
                         f"or 'mean'")
    va, vb, spec, sizes = _prepare(guide_a, guide_b, start.spec, None, "wasserstein", unknown)
    device = va.device
    x, y = (t.to(device) for t in train)

    if method == "ste":  # the stand-in starts at guide_a, whose projection is the start
        relaxation: Any = _StraightThrough(vb, va, start.perms, spec, sizes, max_iter, seed,
                                           _solver_threads(num_threads, va, spec, sizes))
    else:
        steps = epochs * math.ceil(len(x) / min(batch_size, len(x)))
        relaxation = _Sinkhorn(vb, start.perms, spec, steps)
    net = model.net
    fixed_state = dict(net.named_buffers())
    buffers_a, buffers_b = _buffers_of(guide_a, va), _buffers_of(guide_b, vb)
    num_data = len(train[0]) + len(validation[0])  # the data set the posteriors were fit to

    def loss(xb: torch.Tensor, yb: torch.Tensor, t: float) -> torch.Tensor:
        view_b = relaxation.view()
        if view_b.factor is not None:  # rotated onto guide_a's factor, as the path does
            rotation = factor_rotation(va.factor, {s: f.detach()
                                                   for s, f in view_b.factor.items()})
            view_b = GaussianView(view_b.kind, view_b.loc, view_b.scale,
                                  {s: f @ rotation for s, f in view_b.factor.items()})
        # BatchNorm statistics follow the permutation without a gradient (batch_norm takes
        # none through them)
        with torch.no_grad():
            moved = None if buffers_b is None else relaxation.apply(buffers_b)
            state = {**fixed_state, **(lerp_buffers(buffers_a, moved, t) or {})}
        return negative_elbo(model, lerp_views(va, view_b, t, family), xb, yb,
                             va.standard_normal(1), num_data=num_data, prior=prior,
                             forward=forward_draws(net, state, vectorized=False))

    found = [dict(start.perms)]  # the permutations after every epoch

    def after_epoch(epoch: int, mean_loss: float) -> None:
        with torch.no_grad():
            found.append(relaxation.permutations())

    history = minimise_along_path(relaxation.params, loss, x, y, epochs=epochs,
                                  batch_size=batch_size, lr=lr, lr_end=None, clip_norm=None,
                                  seed=seed, progress=progress, desc=f"match ({method})",
                                  objective=f"the loss of method={method!r}",
                                  on_epoch=after_epoch)
    perms = found[-1]
    converged = all(torch.equal(perms[g], found[-2][g]) for g in perms)
    barrier_start = _validation_barrier(model, guide_a, start.aligned, validation, num_samples,
                                        seed)
    barrier, kept = barrier_start, False
    cost, rotation, aligned = start.cost_after, start.rotation, start.aligned
    if any(not torch.equal(perms[g], start.perms[g]) for g in perms):
        problem, constant = _problem(va, vb, "wasserstein", spec, sizes)
        learned_cost = cost_at(problem, perms, constant)
        learned_rotation = problem.rotation_tensor()
        learned = _aligned_guide(guide_b, perms, spec, learned_rotation)
        barrier = _validation_barrier(model, guide_a, learned, validation, num_samples, seed)
        kept = barrier < barrier_start
        if kept:
            cost, rotation, aligned = learned_cost, learned_rotation, learned
    if not kept:
        perms = start.perms
    return Alignment(
        perms=perms, aligned=aligned, cost_before=start.cost_before, cost_after=cost,
        history=[float(v) for v in history], iterations=epochs, converged=converged,
        seconds=time.perf_counter() - started, method=method, spec=spec, rotation=rotation,
        restart_costs=[cost], guide_a=guide_a, guide_b=guide_b,
        validation_barrier_start=barrier_start, validation_barrier=barrier, kept=kept)
