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
quadratic in that group, and a step is taken only if it lowers the exact cost. By default the
descent starts from a greedy forward pass, each group solved once from the neighbours already
solved; it, a given or a random start are first refined by descent on the means alone (kept
when that lowers the full objective): from the identity, on coupled residual networks, the full
descent otherwise stopped in poor local optima. Only where the standard deviations vary as much
as the means does the greedy pass solve each group on both and go straight to the full descent.

The solver itself (the cached similarity matrices, the exact assignment steps, the descents
and the starts) lives in ``_descent``; this module turns posteriors into its arrays.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from pyro.infer import autoguide
from tqdm.auto import tqdm

from .._checks import load_saved, positive_int
from .._threads import thread_count, torch_threads
from ._descent import Descent, Problem, assign, cost_at, descend, head_descend
from ..bayesian import BayesianNetwork
from ..symmetry.permutation import (Spare, check_perms, identity_perms, permute, permute_into,
                      random_perms)
from ..posterior import (FINITE_PARTS, GaussianView, adapter_for, check_finite, model_of,
                        paired_views)
from ..samples import SamplePosterior
from ..symmetry.spec import PermutationSpec, join_heads, split_heads
from ..symmetry.derive import UnsupportedOperation, check_unknown

__all__ = ["match", "Alignment", "alignment_cost", "METHODS"]

METHODS = ("wasserstein", "mean", "activation", "ste", "sinkhorn")
SYMMETRIES = ("permutation", "scale")
# learned on the loss along the path (bnn_align.matching.learned), starting from "wasserstein"
LEARNED_METHODS = ("ste", "sinkhorn")


def _solver_threads(num_threads: int | None, view: GaussianView, spec: PermutationSpec,
                    sizes: Mapping[str, int]) -> int:
    """The thread count for the descent: ``num_threads``, or chosen from the problem's size."""
    if num_threads is not None:
        return thread_count(num_threads, 0)
    largest = 0
    for site, loc in view.loc.items():
        for entry in spec.axes_to_perm.get(site, ()):
            groups = entry if isinstance(entry, tuple) else (entry,)
            for group in groups:
                if group is not None:  # a group's similarity: n units x all of the tensor
                    largest = max(largest, sizes[group] * loc.numel())
    return thread_count(None, largest)


# ------------------------------------------------------------------------------ the result --
@dataclass
class Alignment:
    """The result of :func:`match`.

    Attributes
    ----------
    perms : dict of str to LongTensor
        Group -> permutation of shape ``(n_group,)`` (on the CPU, whatever the posteriors'
        device); ``permute(guide_b, perms)`` is aligned.
    aligned : object
        A new posterior of ``guide_b``'s kind on ``guide_b``'s device, permuted (and, for
        low-rank guides, with its covariance factor rotated by ``rotation``, which leaves its
        distribution unchanged).
    cost_before, cost_after : float
        The method's objective before and after: the coupled squared distance of the module
        docstring for ``"wasserstein"`` (W2^2 for diagonal Gaussians), ``||mu_a - P mu_b||^2`` for
        ``"mean"``, and for ``"activation"`` (which maximises activation correlations) the
        ``"wasserstein"`` objective of the permutations it finds.
        For the learned methods (``"ste"``, ``"sinkhorn"``), the ``"wasserstein"`` objective:
        at the identity, and at the permutations returned.
    history : list of float
        The objective after each sweep of coordinate descent (best restart); for the learned
        methods their training loss (the negative ELBO along the path) of every epoch.
    iterations : int
        Sweeps used by the best restart; epochs for the learned methods.
    converged : bool
        Whether the best restart stopped because a sweep changed nothing; for the learned
        methods, whether their permutations were the same after the last two epochs.
    seconds : float
        Wall-clock time of the whole call.
    method : str
    spec : PermutationSpec
    rotation : Tensor or None
        The orthogonal ``R`` (``rank x rank``, on the CPU) aligning the covariance factors, if
        any.
    restart_costs : list of float
        Final objective of every restart.
    guide_a, guide_b : object
        The posteriors that were matched (references, not copies; None after :meth:`load`).
    validation_barrier_start, validation_barrier : float or None
        Learned methods only: the NLL barrier on the held-out validation data of the
        ``"wasserstein"`` start and of the learned permutations.
    kept : bool or None
        Learned methods only: whether the learned permutations were kept (their validation
        barrier is below the start's); otherwise ``perms`` are the ``"wasserstein"`` start's.
    symmetries : tuple of str
        The symmetries removed: ``("permutation",)`` or ``("permutation", "scale")``.
    scales : tuple of two dicts or None
        With ``"scale"``: the factors that made ``guide_a`` and ``guide_b`` canonical (group ->
        ``(n_group,)``, see :func:`~bnn_align.canonicalize`); the permutations were found
        between the canonical forms, and ``aligned`` is the permuted canonical ``guide_b``.
    canonical : tuple of two posteriors or None
        With ``"scale"``: the canonical forms of ``guide_a`` and ``guide_b`` (compare
        ``aligned`` with ``canonical[0]``).

    Examples
    --------
    Save an alignment, load it and apply it again:

    >>> import tempfile
    >>> from pathlib import Path
    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import guides, models
    >>> _ = torch.manual_seed(0)
    >>> guide_a = guides.mean_field(ba.BayesianNetwork(models.mlp(4, [16], 3), input_shape=(4,)))
    >>> guide_b = guides.mean_field(ba.BayesianNetwork(models.mlp(4, [16], 3), input_shape=(4,)))
    >>> result = ba.match(guide_a, guide_b)
    >>> result
    Alignment(method='wasserstein', cost_before=..., perms=[P_0(16)])
    >>> folder = tempfile.TemporaryDirectory()
    >>> result.save(Path(folder.name) / "alignment.pt")
    >>> loaded = ba.Alignment.load(Path(folder.name) / "alignment.pt")
    >>> loaded.aligned is None, loaded.cost_after == result.cost_after
    (True, True)
    >>> again = loaded.apply(guide_b)              # the same permutations, applied anew
    >>> torch.equal(ba.as_gaussian(again).loc["0.weight"],
    ...             ba.as_gaussian(result.aligned).loc["0.weight"])
    True
    >>> folder.cleanup()
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
    validation_barrier_start: float | None = None
    validation_barrier: float | None = None
    kept: bool | None = None
    symmetries: tuple[str, ...] = ("permutation",)
    scales: tuple[dict, dict] | None = field(default=None, repr=False, compare=False)
    canonical: tuple[Any, Any] | None = field(default=None, repr=False, compare=False)

    def apply(self, obj: Any) -> Any:
        """Permute any other object over the same spec (state dict, module, guide, ...).

        Only the permutations are applied: ``alignment.apply(guide_b)`` has the distribution
        of ``aligned``, but a low-rank factor keeps its columns (``aligned``'s are also
        rotated by ``rotation``, which does not change the distribution). When the scale
        symmetry was removed too, ``obj`` is first made canonical (with its own scales)."""
        if "scale" in self.symmetries:
            from ..symmetry.canonical import canonicalize

            obj = canonicalize(obj, self.spec)
        return permute(obj, self.perms, self.spec)

    def save(self, path: str | Path) -> None:
        """Save the permutations, the spec and the numbers (not the guides) with ``torch.save``."""
        torch.save({
            "perms": self.perms, "spec": self.spec.to_dict(), "cost_before": self.cost_before,
            "cost_after": self.cost_after, "history": list(self.history),
            "iterations": self.iterations, "converged": self.converged,
            "seconds": self.seconds, "method": self.method, "rotation": self.rotation,
            "restart_costs": list(self.restart_costs), "format": "bnn_align.Alignment/1",
            "validation_barrier_start": self.validation_barrier_start,
            "validation_barrier": self.validation_barrier, "kept": self.kept,
            "symmetries": list(self.symmetries), "scales": self.scales,
        }, Path(path))

    @classmethod
    def load(cls, path: str | Path, aligned: Any = None) -> "Alignment":
        """Load a saved alignment; ``aligned`` is None unless given (use :meth:`apply`)."""
        state = load_saved(path, "Alignment", "bnn_align.Alignment/1")
        return cls(
            perms=state["perms"], aligned=aligned, cost_before=state["cost_before"],
            cost_after=state["cost_after"], history=state["history"],
            iterations=state["iterations"], converged=state["converged"],
            seconds=state["seconds"], method=state["method"],
            spec=PermutationSpec.from_dict(state["spec"]), rotation=state["rotation"],
            restart_costs=state["restart_costs"],
            # absent from files saved before the learned methods
            validation_barrier_start=state.get("validation_barrier_start"),
            validation_barrier=state.get("validation_barrier"), kept=state.get("kept"),
            # absent from files saved before scale symmetries
            symmetries=tuple(state.get("symmetries", ("permutation",))),
            scales=state.get("scales"),
        )

    def __repr__(self) -> str:
        groups = ", ".join(f"{g}({len(p)})" for g, p in list(self.perms.items())[:4])
        more = " ..." if len(self.perms) > 4 else ""
        learned = "" if self.kept is None else (
            f"validation_barrier_start={self.validation_barrier_start:.4g}, "
            f"validation_barrier={self.validation_barrier:.4g}, kept={self.kept}, ")
        return (f"Alignment(method={self.method!r}, cost_before={self.cost_before:.6g}, "
                f"cost_after={self.cost_after:.6g}, iterations={self.iterations}, "
                f"converged={self.converged}, seconds={self.seconds:.3g}, {learned}"
                f"perms=[{groups}{more}])")


# ------------------------------------------------------------------------------ inputs --
def _check_symmetries(symmetries: Any) -> tuple[str, ...]:
    if isinstance(symmetries, str) or not isinstance(symmetries, (tuple, list)):
        raise TypeError(f"symmetries must be a tuple of names from {SYMMETRIES}, got "
                        f"{symmetries!r}")
    unknown = [s for s in symmetries if s not in SYMMETRIES]
    if unknown:
        raise ValueError(f"symmetries has unknown name(s) {unknown}; known: {SYMMETRIES}")
    if "permutation" not in symmetries:
        raise ValueError(f"symmetries must include 'permutation' (match finds permutations; "
                         f"canonicalize alone removes the scale symmetry), got {symmetries!r}")
    return tuple(s for s in SYMMETRIES if s in symmetries)


def _resolve_spec(guide_a: Any, guide_b: Any, spec: PermutationSpec | None,
                  data: Any, unknown: str = "error", caller: str = "match") -> PermutationSpec:
    if spec is not None:
        if not isinstance(spec, PermutationSpec):
            raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
        return spec
    specs = []
    for label, guide in (("guide_a", guide_a), ("guide_b", guide_b)):
        model = _bayesian_model(guide, data)
        if model is not None and model.input_shape is not None:
            try:
                specs.append((label, model._derived_spec(unknown)))
            except UnsupportedOperation as err:
                # the derivation's own advice names spec_from_module's argument, not ours
                raise UnsupportedOperation(
                    err.problem,
                    f"Pass unknown='fix' to {caller}() to leave the units around it unpermuted, "
                    f"or spec=spec_from_module(net, example_input, unknown='fix') or a "
                    f"hand-written PermutationSpec.") from None
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


def _no_groups_reason(guide_a: Any, guide_b: Any, data: Any) -> str:
    """The warning of :func:`match` for a spec without permutable groups, saying why."""
    from ..models.asymmetric import ASYMMETRIC_LAYERS

    layers: list[str] = []
    for guide in (guide_a, guide_b):
        try:
            model = _bayesian_model(guide, data)
        except Exception:  # only for the message: the spec was resolved already
            model = None
        if model is not None:
            layers = [f"{name} ({type(m).__name__})" for name, m in model.net.named_modules()
                      if isinstance(m, ASYMMETRIC_LAYERS)]
            break
    if layers:
        shown = ", ".join(layers[:4]) + (f" and {len(layers) - 4} more" if len(layers) > 4 else "")
        why = (f"the asymmetric layers {shown} remove the permutation symmetry of the units "
               f"they touch (see bnn_align.models.asymmetric)")
    else:
        why = "no unit of the network can be permuted without changing its function"
    return (f"the permutation spec has no permutable group: {why}. There is nothing to align; "
            f"match returns the identity alignment (aligned is a copy of guide_b)")


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
             sizes: Mapping[str, int]) -> tuple[Problem, float]:
    """The assignment problem of a method, and the constant part of its cost (terms present on
    one side only, which no permutation changes)."""
    pairs: dict[str, list] = {s: [(va.loc[s], vb.loc[s])] for s in va.sites}
    constant = 0.0
    factor_part: dict[str, int] = {}
    if method == "mean":
        return Problem(pairs, spec, sizes), constant
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
    return Problem(pairs, spec, sizes, factor_part), constant


def _pad(factor: torch.Tensor, rank: int) -> torch.Tensor:
    extra = rank - factor.shape[-1]
    if extra == 0:
        return factor
    return torch.cat([factor, factor.new_zeros(*factor.shape[:-1], extra)], dim=-1)


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
    stats = {g: _CorrelationStats(sizes[g], va.device) for g in producers}
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size].to(va.device)
        acts_a = _expected_activations(model_a, va, producers, batch, num_samples, gen)
        acts_b = _expected_activations(model_b, vb, producers, batch, num_samples, gen)
        for g in producers:
            stats[g].update(acts_a[g], acts_b[g])
    perms = identity_perms(sizes)
    for g, s in stats.items():
        perms[g] = assign(s.correlation().cpu().numpy())
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

    def __init__(self, n: int, device: torch.device | None = None):
        self.count = 0
        self.sa, self.sb, self.saa, self.sbb = (
            torch.zeros(n, dtype=torch.float64, device=device) for _ in range(4))
        self.sab = torch.zeros(n, n, dtype=torch.float64, device=device)

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
_LABELS = ("guide_a", "guide_b")


def _prepare(guide_a: Any, guide_b: Any, spec: PermutationSpec | None, data: Any,
             objective: str | None = None, unknown: str = "error", caller: str = "match"
             ) -> tuple[GaussianView, GaussianView, PermutationSpec, dict[str, int]]:
    """Checked read-only views (sharing memory with the posteriors), the spec, group sizes.

    With an ``objective`` whose value the caller computes at once (and passes to
    :func:`_finite_cost`), the values that enter it are not checked for NaN here: a sum of
    squared differences is finite only if every value is, and that pass was already made.
    Covariance factors are always checked (the rotation step factorises them first), and for
    ``"mean"`` the scales too (not in its objective). ``unknown`` is checked and passed to the
    spec's derivation, and ``caller`` (the public function) named in its error's advice.
    """
    check_unknown(unknown)
    finite = {"wasserstein": ("covariance factor",),
              "mean": ("scale", "covariance factor")}.get(objective, FINITE_PARTS)
    va, vb = paired_views(guide_a, guide_b, _LABELS, copy=False, finite=finite)
    spec = _resolve_spec(guide_a, guide_b, spec, data, unknown, caller)
    if spec.heads and objective in ("activation", *LEARNED_METHODS):
        raise ValueError(
            f"method={objective!r} does not respect attention heads yet (the spec has head "
            f"sets {list(spec.heads)}); use method='wasserstein' or 'mean'")
    # a view carries no buffers (BatchNorm statistics the spec may name): read them off the
    # other posterior
    return va, vb, spec, _spec_sizes(spec, va, guide_b if isinstance(guide_a, GaussianView)
                                     else guide_a)


def _working_copies(views: tuple[GaussianView, ...], posteriors: tuple[Any, ...]
                    ) -> list[torch.Tensor]:
    """The views' tensors whose memory is not the posteriors' own (their parameters, buffers
    or state-dict values): copies made for the views, which nothing else holds."""
    theirs = set()
    for obj in posteriors:
        tensors = (obj.values() if isinstance(obj, Mapping)
                   else [*obj.parameters(), *obj.buffers()] if isinstance(obj, torch.nn.Module)
                   # a view given as a posterior may share memory with a guide of the caller's
                   else [t for part in (obj.loc, obj.scale, obj.factor or {})
                         for t in part.values()] if isinstance(obj, GaussianView)
                   else [])
        theirs.update(t.untyped_storage().data_ptr() for t in tensors
                      if isinstance(t, torch.Tensor))
    return [t for view in views for part in (view.loc, view.scale, view.factor or {})
            for t in part.values() if t.untyped_storage().data_ptr() not in theirs]


def _finite_cost(cost: float, va: GaussianView, vb: GaussianView) -> float:
    """``cost`` if it is finite; else the error naming the first site with NaN or infinite
    values, or, if every value is finite, the one for a squared distance that overflows."""
    if not math.isfinite(cost):
        check_finite(va, vb, _LABELS)
        raise ValueError("the squared distance between guide_a and guide_b overflows: "
                         "their parameters are too large to compare")
    return cost


def alignment_cost(guide_a: Any, guide_b: Any, perms: Mapping[str, Any] | None = None, *,
                   spec: PermutationSpec | None = None, method: str = "wasserstein",
                   data: Any = None, unknown: str = "error") -> float:
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
    unknown : {"error", "fix"}
        As in :func:`match`.

    Returns
    -------
    float

    Raises
    ------
    ValueError
        As :func:`match`: different architectures, NaN or infinite parameters (naming the
        site), a squared distance that overflows, a spec that does not fit or cannot be
        derived, an invalid ``unknown``.

    Examples
    --------
    >>> import math
    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import guides, models
    >>> _ = torch.manual_seed(0)
    >>> guide_a = guides.low_rank(ba.BayesianNetwork(models.mlp(4, [16], 3), input_shape=(4,)),
    ...                           rank=2, init_scale=0.1)
    >>> guide_b = guides.low_rank(ba.BayesianNetwork(models.mlp(4, [16], 3), input_shape=(4,)),
    ...                           rank=2, init_scale=0.1)
    >>> result = ba.match(guide_a, guide_b)
    >>> ba.alignment_cost(guide_a, guide_b) == result.cost_before      # at the identity
    True
    >>> math.isclose(ba.alignment_cost(guide_a, guide_b, result.perms), result.cost_after)
    True

    Compare what two methods achieve on the same objective:

    >>> by_means = ba.match(guide_a, guide_b, method="mean").perms
    >>> ba.alignment_cost(guide_a, guide_b, by_means) >= result.cost_after
    True
    """
    if method not in ("wasserstein", "mean"):
        raise ValueError(f"method must be 'wasserstein' or 'mean', got {method!r}")
    va, vb, spec, sizes = _prepare(guide_a, guide_b, spec, data, method, unknown,
                                   "alignment_cost")
    perms = check_perms(perms, sizes) if perms is not None else identity_perms(sizes)
    spec.check_heads(perms)
    problem, constant = _problem(va, vb, method, spec, sizes)
    return _finite_cost(cost_at(problem, perms, constant), va, vb)


def _aligned_guide(guide_b: Any, perms: Mapping[str, torch.Tensor], spec: PermutationSpec,
                   rotation: torch.Tensor | None, spare: Spare | None = None) -> Any:
    """``guide_b`` permuted (written into ``spare``'s tensors where they fit) and, for a
    low-rank guide, its factor rotated by ``rotation``: the ``aligned`` of an Alignment."""
    # OpenBLAS's workers (scipy's) keep spinning a while after a product, and a torch operation
    # split over two threads then waits for the half that shares their core
    with torch_threads(1):
        aligned = permute_into(guide_b, perms, spec, spare)
        if isinstance(aligned, GaussianView):  # a view's factor is rotated by the caller
            return aligned
        adapter = adapter_for(aligned)
        if rotation is not None and hasattr(adapter, "rotate_"):
            adapter.rotate_(aligned, rotation)  # aligned is our own new guide
    return aligned


def _heads_in_place(perms: Mapping[str, torch.Tensor], spec: PermutationSpec
                    ) -> dict[str, torch.Tensor]:
    """``perms`` with every head set's heads put back in place (within-head moves kept)."""
    out = dict(perms)
    for members in spec.heads.values():
        for g, d in members.items():
            _, within = split_heads(perms[g], d)
            out[g] = join_heads(torch.arange(len(within)), within)
    return out


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
    num_threads: int | None = None,
    progress: bool = False,
    unknown: str = "error",
    epochs: int = 5,
    lr: float | None = None,
    symmetries: tuple[str, ...] = ("permutation",),
    move_heads: bool = True,
) -> Alignment:
    """Find the permutations of ``guide_b`` that bring it closest to ``guide_a``.

    Parameters
    ----------
    guide_a, guide_b : posterior
        Pyro autoguides (``AutoNormal``, ``AutoDiagonalNormal``, ``AutoLowRankMultivariateNormal``,
        ``AutoMultivariateNormal``, ``AutoDelta``), state dicts or modules over the same
        architecture; the two may be of different kinds. Neither is modified. Both (and the
        guides' models) on one device, any: the assignment solver works on CPU copies of
        their tensors (none are made for CPU tensors), and ``aligned`` is built on it.
    spec : PermutationSpec, optional
        Defaults to the spec of the guides' BayesianNetwork; pass one for your own Pyro model.
    method : {"wasserstein", "mean", "activation", "ste", "sinkhorn"}
        ``"wasserstein"`` minimises the coupled squared distance of the module docstring (W2^2
        for diagonal Gaussians) over permutations and, with covariance factors on both sides,
        a rotation of the factors. ``"mean"`` is Git Re-Basin weight matching on the means.
        Both start, by default, from a greedy forward pass (each group solved once from its
        already-solved neighbours, see ``_descent.greedy_start``); the descent from it is
        kept only if it starts below the identity, otherwise the descent runs from the
        identity. For W2, a given ``init``, a random restart and the greedy start are first
        refined on the means alone, and the refinement kept if it lowers the full objective
        (see ``_descent.warm_start``): from such a start the W2 result is never worse on its
        own objective than mean matching from it. The greedy start skips the refinement when
        the standard deviations vary across units at least as much as the means (and there
        are no covariance factors); it then solves each group on both.
        ``"activation"`` matches units by the Pearson correlation of their posterior-expected
        activations (the mean over ``num_samples`` weight draws) on ``data``, one exact
        assignment per group; residual streams share one permutation, and their correlation
        sums over every layer that writes to the stream.
        ``"ste"`` and ``"sinkhorn"`` start from the ``"wasserstein"`` result and learn the
        permutations on the loss itself: the negative ELBO of the posteriors along the
        Wasserstein path, on ``data`` (see :mod:`bnn_align.matching.learned`). A seeded random fifth of
        ``data`` is held out, and the learned permutations are kept only if their NLL barrier
        on it is below the start's (see ``kept``). Both need guides (point, diagonal or
        low-rank, of one family) over a BayesianNetwork.
    data : Tensor or (x, y), optional
        Inputs for ``"activation"``; the training data ``(x, y)`` for ``"ste"`` and
        ``"sinkhorn"`` (required there, unused otherwise).
    max_iter : int
        Maximum number of sweeps over the groups (of the descent on the method's objective;
        the warm start on the means runs to convergence).
    seed : int
        Seed of the group order, random restarts and activation sampling.
    init : mapping of str to permutation, optional
        Starting permutations for the first restart (default: the greedy start above, or the
        identity where that is better). A given ``init`` is used as it is, for
        ``"wasserstein"`` after the refinement on the means above.
    num_restarts : int
        Restarts of coordinate descent; restarts after the first start from random
        permutations. The lowest final objective wins.
    num_samples, batch_size : int
        Weight draws and batch size for ``"activation"``; for ``"ste"`` and ``"sinkhorn"``,
        the posterior draws of the validation barrier and the training minibatch size.
    num_threads : int, optional
        Threads for the solver's torch operations (restored afterwards). By default one
        thread where the largest similarity product is below about 10^9 multiply-adds (a
        ResNet-20 x4 or an MLP of width 512), where threads save little and a process
        busy on another core slows a multi-threaded match several times, and torch's own
        count (``torch.get_num_threads()``) above. Pass 1 on a shared machine.
    progress : bool
        Show a tqdm progress bar over sweeps.
    unknown : {"error", "fix"}
        Passed to :func:`spec_from_module` when the spec is derived from the guides' network
        (unused with ``spec=``): ``"error"`` refuses a network with an operation not known to
        commute with permutations (recurrent layers, rotary embeddings, ...), ``"fix"`` leaves
        the units around it unpermuted.
    epochs, lr : int, float
        ``"ste"`` and ``"sinkhorn"`` only: passes over the training part of ``data``, and
        Adam's learning rate (default: ``bnn_align.matching.learned.DEFAULT_LR`` of the method).
    symmetries : tuple of str
        ``("permutation",)`` (the default) or ``("permutation", "scale")``: both posteriors
        are first made canonical (:func:`~bnn_align.canonicalize`: every scalable unit's
        incoming weights of unit norm) and the permutations found between the canonical forms
        (see ``Alignment.scales`` and ``Alignment.canonical``).
    move_heads : bool
        Specs with head sets (attention) only: ``False`` leaves every attention head where it
        is and matches only the dimensions within each head (an ablation of the head step).

    Returns
    -------
    Alignment
        Or, when ``guide_b`` is a :class:`~bnn_align.SamplePosterior`, the
        :class:`~bnn_align.matching.many.SampleAlignment` of
        :func:`~bnn_align.matching.many.align_samples`: every sample aligned to ``guide_a``.

    Raises
    ------
    ValueError
        Posteriors on different devices (naming both), different architectures (naming the
        first site that differs, or, for networks with
        the same parameters, different permutation symmetries), NaN or infinite parameters
        (naming the site) or parameters whose squared distance overflows, a spec that does not
        fit or cannot be derived, an unknown method or ``unknown``, ``"activation"`` without
        data, ``symmetries`` naming an unknown symmetry or leaving out ``"permutation"``;
        for the learned methods no data, data that does not fit the network,
        ``epochs < 1``, a non-positive ``lr``, full-rank or mixed posterior families.
    TypeError
        Unsupported posterior kinds; for the learned methods posteriors that are not guides
        over a BayesianNetwork, data that is not a pair ``(x, y)``.

    Examples
    --------
    A posterior and a copy of it with relabelled hidden units: ``match`` finds the inverse
    relabelling, and the aligned copy is the posterior itself.

    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import guides, models
    >>> _ = torch.manual_seed(0)
    >>> model = ba.BayesianNetwork(models.mlp(4, [16], 3), input_shape=(4,))
    >>> guide_a = guides.mean_field(model)
    >>> hidden = torch.randperm(16)
    >>> guide_b = ba.permute(guide_a, {"P_0": hidden})
    >>> result = ba.match(guide_a, guide_b)
    >>> torch.equal(result.perms["P_0"], torch.argsort(hidden))
    True
    >>> result.cost_before > 0, result.cost_after
    (True, 0.0)

    Two independent posteriors come closer, not together:

    >>> guide_c = guides.mean_field(ba.BayesianNetwork(models.mlp(4, [16], 3), input_shape=(4,)))
    >>> result = ba.match(guide_a, guide_c, method="mean")
    >>> 0 < result.cost_after < result.cost_before
    True
    >>> type(result.aligned).__name__
    'AutoNormal'

    Removing the scale symmetry too: a copy with relabelled and rescaled hidden units has the
    same canonical form up to the relabelling.

    >>> guide_d = ba.rescale(guide_b, {"P_0": torch.rand(16) + 0.5})
    >>> result = ba.match(guide_a, guide_d, symmetries=("permutation", "scale"))
    >>> torch.equal(result.perms["P_0"], torch.argsort(hidden)), result.cost_after < 1e-10
    (True, True)
    """
    started = time.perf_counter()
    symmetries = _check_symmetries(symmetries)
    if "scale" in symmetries:
        from ..symmetry.canonical import canonicalize

        spec = _resolve_spec(guide_a, guide_b, spec, data, unknown)
        canonical_a, scales_a = canonicalize(guide_a, spec, return_scales=True)
        canonical_b, scales_b = canonicalize(guide_b, spec, return_scales=True)
        result = match(canonical_a, canonical_b, spec=spec, method=method, data=data,
                       max_iter=max_iter, seed=seed, init=init, num_restarts=num_restarts,
                       num_samples=num_samples, batch_size=batch_size, num_threads=num_threads,
                       progress=progress, unknown=unknown, epochs=epochs, lr=lr)
        result.symmetries = symmetries
        result.scales = (scales_a, scales_b)
        result.canonical = (canonical_a, canonical_b)
        result.seconds = time.perf_counter() - started
        return result
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(guide_a, SamplePosterior):
        raise TypeError("guide_a (the reference) must be a single posterior, not a "
                        "SamplePosterior: align sample sets to a common reference with "
                        "match_many or align_samples")
    if isinstance(guide_b, SamplePosterior):  # every sample aligned to guide_a
        if method not in ("wasserstein", "mean"):
            raise ValueError(f"a SamplePosterior is aligned sample by sample with method "
                             f"'wasserstein' or 'mean', got {method!r}")
        from .many import align_samples  # it builds on this module

        return align_samples(guide_a, guide_b, method=method, spec=spec, max_iter=max_iter,
                             seed=seed, progress=progress)
    positive_int(max_iter=max_iter, num_restarts=num_restarts, num_samples=num_samples,
                 batch_size=batch_size)
    if method == "activation" and data is None:
        raise ValueError("method='activation' needs data= (inputs to compute activations on)")
    if method in LEARNED_METHODS:
        from .learned import learned_match  # it builds on this module

        return learned_match(method, guide_a, guide_b, data, spec=spec, epochs=epochs, lr=lr,
                             batch_size=batch_size, num_samples=num_samples, max_iter=max_iter,
                             seed=seed, init=init, num_restarts=num_restarts,
                             num_threads=num_threads, progress=progress, unknown=unknown)
    va, vb, spec, sizes = _prepare(guide_a, guide_b, spec, data, method, unknown, "match")
    if not sizes:
        warnings.warn(_no_groups_reason(guide_a, guide_b, data), stacklevel=2)
    start = check_perms(init, sizes) if init is not None else identity_perms(sizes)
    spec.check_heads(start)
    with torch_threads(_solver_threads(num_threads, va, spec, sizes)):
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
                cost_before = _finite_cost(cost_at(problem, identity_perms(sizes), constant),
                                           va, vb)
            init_perms = start if restart == 0 else random_perms(sizes, gen, spec.heads)
            if not move_heads and restart > 0:
                init_perms = _heads_in_place(init_perms, spec)
            if max_iter == 0:
                cost = cost_at(problem, init_perms, constant)
                result = Descent(dict(problem.perms), [cost], 0, True, problem.rotation_tensor(),
                                 cost)
            elif spec.heads:  # every step keeps heads whole (see _descent.head_descent)
                result = head_descend(problem, constant, init_perms, max_iter, rng, bar,
                                      spec.heads, move_heads=bool(move_heads))
            else:
                result = descend(problem, constant, init_perms, max_iter, rng, bar,
                                 greedy=restart == 0 and init is None)
            restart_costs.append(result.history[-1])
            if best is None or result.history[-1] < best.history[-1]:
                best = result
    bar.close()
    perms, history, iterations, converged, rotation, _ = best
    # the working copies' memory (the scales computed from their parameters) becomes the
    # aligned guide's instead of new memory faulted in page by page
    spare = Spare(_working_copies((va, vb), (guide_a, guide_b)))
    del va, vb, problem
    aligned = _aligned_guide(guide_b, perms, spec, rotation, spare)
    return Alignment(
        perms=perms, aligned=aligned, cost_before=cost_before, cost_after=history[-1],
        history=history, iterations=iterations, converged=converged,
        seconds=time.perf_counter() - started, method=method, spec=spec, rotation=rotation,
        restart_costs=restart_costs, guide_a=guide_a, guide_b=guide_b,
    )
