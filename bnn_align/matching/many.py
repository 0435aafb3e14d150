"""Align many posteriors at once, merge them, and align sample sets sample by sample.

:func:`match_many` aligns ``K >= 2`` posteriors of one architecture to a common reference (a
"universe", as in C2M3) by alternating two steps, each of which can only lower the total
objective ``sum_k cost(reference, P_k q_k)`` (the coupled squared distance :func:`match`
minimises):

1. match every posterior to the reference with :func:`match`'s solver (warm-started from its
   permutations of the previous round);
2. replace the reference by the barycenter of the aligned posteriors: for point estimates the
   average; for diagonal Gaussians the average of the means and of the standard deviations (the
   2-Wasserstein barycenter); for low-rank Gaussians additionally the average of the covariance
   factors, each rotated onto the reference's by the Procrustes rotation of step 1 (the minimiser
   of the coupled cost for those rotations, not the exact W2 barycenter of the full
   covariances).

Every posterior then has one permutation into the reference's frame, so the pairwise
permutations composed through it, ``P_j o P_i^-1``, are cycle-consistent by construction.
:func:`merge` turns the barycenter into a posterior of the inputs' kind, and :func:`repair`
corrects the variance collapse of a merged point estimate (REPAIR, Jordan et al., ICLR 2023).
:func:`align_samples` aligns every sample of a :class:`~bnn_align.SamplePosterior` to a
reference, one permutation per sample.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .._checks import check_int, positive_int
from ..bayesian import as_data_pair
from ..posterior import (DIAGONAL, FULL_RANK, LOW_RANK, POINT, GaussianView, as_gaussian,
                         from_gaussian, paired_views)
from ..samples import SamplePosterior
from ..symmetry.permutation import check_perms, compose, identity_perms, invert, permute
from ..symmetry.spec import PermutationSpec
from .weights import METHODS, _resolve_spec, _spec_sizes, alignment_cost, match

__all__ = ["match_many", "MultiAlignment", "merge", "repair", "align_samples",
           "SampleAlignment"]

_MANY_METHODS = ("wasserstein", "mean")


# ------------------------------------------------------------------------------ the results --
@dataclass
class MultiAlignment:
    """The result of :func:`match_many`: every posterior's permutations into one common frame.

    Attributes
    ----------
    perms : list of dict of str to LongTensor
        ``perms[k]``: group -> permutation of shape ``(n_group,)``;
        ``permute(posteriors[k], perms[k])`` lies next to the reference.
    aligned : list
        The posteriors permuted (new objects of their kinds; a low-rank guide's factor also
        rotated onto the reference's, which leaves its distribution unchanged).
    barycenter : GaussianView
        The final reference: the barycenter of the aligned posteriors (see the module
        docstring).
    history : list of float
        The total objective ``sum_k cost(barycenter, aligned_k)`` after every round.
    costs : list of float
        Each posterior's final cost to the barycenter.
    rounds : int
    converged : bool
        Whether the last round changed no permutation.
    seconds : float
    method : str
    reference : str or int
        ``"barycenter"`` or the index of the fixed reference posterior.
    spec : PermutationSpec
    posteriors : list
        The inputs (references, not copies).

    Examples
    --------
    Three relabelled copies of one posterior: composed pairwise permutations agree.

    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import guides, models
    >>> _ = torch.manual_seed(0)
    >>> guide = guides.mean_field(ba.BayesianNetwork(models.mlp(4, [16], 3), input_shape=(4,)),
    ...                           init_scale=0.1)
    >>> copies = [ba.permute(guide, {"P_0": torch.randperm(16)}) for _ in range(3)]
    >>> result = ba.match_many(copies)
    >>> round(result.history[-1], 6)               # all aligned exactly
    0.0
    >>> p01, p12, p02 = result.pairwise(0, 1), result.pairwise(1, 2), result.pairwise(0, 2)
    >>> torch.equal(p12["P_0"][p01["P_0"]], p02["P_0"])   # 2 -> 1 -> 0 is 2 -> 0
    True
    """

    perms: list[dict[str, torch.Tensor]]
    aligned: list[Any]
    barycenter: GaussianView
    history: list[float]
    costs: list[float]
    rounds: int
    converged: bool
    seconds: float
    method: str
    reference: str | int
    spec: PermutationSpec
    posteriors: list[Any] = field(default_factory=list, repr=False)

    def pairwise(self, i: int, j: int) -> dict[str, torch.Tensor]:
        """The permutations that bring posterior ``j`` onto posterior ``i`` (as
        ``match(posteriors[i], posteriors[j]).perms`` would): ``P_j`` into the common frame,
        then ``P_i^-1`` out of it.

        Raises
        ------
        ValueError
            An index out of range.
        """
        k = len(self.perms)
        check_int("i", i, low=0, high=k - 1)
        check_int("j", j, low=0, high=k - 1)
        return compose(self.perms[j], invert(self.perms[i]))

    def apply(self, k: int, obj: Any) -> Any:
        """Permute any object over the same spec by posterior ``k``'s permutations."""
        check_int("k", k, low=0, high=len(self.perms) - 1)
        return permute(obj, self.perms[k], self.spec)

    def __repr__(self) -> str:
        groups = ", ".join(f"{g}({len(p)})" for g, p in list(self.perms[0].items())[:4])
        return (f"MultiAlignment(K={len(self.perms)}, method={self.method!r}, "
                f"reference={self.reference!r}, objective={self.history[-1]:.6g}, "
                f"rounds={self.rounds}, converged={self.converged}, "
                f"seconds={self.seconds:.3g}, perms=[{groups}])")


@dataclass
class SampleAlignment:
    """The result of :func:`align_samples` (and of :func:`match` with a sample set).

    Attributes
    ----------
    perms : dict of str to LongTensor
        Group -> ``(S, n_group)``: row ``s`` aligns sample ``s``.
    aligned : SamplePosterior
        The sample set with every sample permuted (chains kept).
    samples : SamplePosterior
        The input.
    reference : GaussianView
        What every sample was aligned to.
    cost_before, cost_after : ndarray of shape (S,)
        Each sample's objective against the reference before and after.
    seconds : float
    method : str
    spec : PermutationSpec

    Examples
    --------
    See :func:`align_samples`.
    """

    perms: dict[str, torch.Tensor]
    aligned: SamplePosterior
    samples: SamplePosterior
    reference: GaussianView
    cost_before: np.ndarray
    cost_after: np.ndarray
    seconds: float
    method: str
    spec: PermutationSpec

    def __repr__(self) -> str:
        return (f"SampleAlignment(num_samples={len(self.cost_after)}, method={self.method!r}, "
                f"mean_cost_before={float(np.mean(self.cost_before)):.6g}, "
                f"mean_cost_after={float(np.mean(self.cost_after)):.6g}, "
                f"seconds={self.seconds:.3g})")


# ------------------------------------------------------------------------------- inputs --
def _view(posterior: Any) -> GaussianView:
    """A posterior's Gaussian view; a sample set's moments."""
    if isinstance(posterior, SamplePosterior):
        return posterior.moments()
    return as_gaussian(posterior, copy=False)


def _family(views: Sequence[GaussianView]) -> str:
    kinds = []
    for k, v in enumerate(views):
        if v.kind == FULL_RANK:
            raise ValueError(f"posteriors[{k}] is a full-rank posterior: match_many supports "
                             f"point, diagonal and low-rank posteriors")
        kinds.append(v.kind)
    if len(set(kinds)) > 1:
        first = kinds[0]
        other = next(k for k, kind in enumerate(kinds) if kind != first)
        raise ValueError(f"the posteriors must be of one family (their barycenter is of that "
                         f"family): posteriors[0] is a {first} posterior, posteriors[{other}] "
                         f"a {kinds[other]} one")
    if kinds[0] == LOW_RANK:
        ranks = [v.rank for v in views]
        if len(set(ranks)) > 1:
            other = next(k for k, r in enumerate(ranks) if r != ranks[0])
            raise ValueError(f"low-rank posteriors must have one rank: posteriors[0] has rank "
                             f"{ranks[0]}, posteriors[{other}] rank {ranks[other]}")
    return kinds[0]


def _spec_of(posteriors: Sequence[Any], spec: PermutationSpec | None) -> PermutationSpec:
    """The given spec, a sample set's, or the one the guides' BayesianNetworks derive (checked
    to agree pairwise with the first)."""
    if spec is not None:
        if not isinstance(spec, PermutationSpec):
            raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
        return spec
    for p in posteriors:
        if isinstance(p, SamplePosterior) and p.spec is not None:
            return p.spec
    found = None
    for k, p in enumerate(posteriors[1:], start=1):
        try:
            found = _resolve_spec(posteriors[0], p, None, None, caller="match_many")
        except ValueError as err:
            raise ValueError(f"posteriors[0] and posteriors[{k}]: {err}") from None
    return found


def _barycenter(views: Sequence[GaussianView], kind: str) -> GaussianView:
    """Average of means, of standard deviations and (low-rank) of the rotated factors."""
    def mean(parts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {s: torch.stack([p[s] for p in parts]).mean(0) for s in parts[0]}

    factor = None
    if kind == LOW_RANK:
        factor = mean([v.factor for v in views])
    return GaussianView(kind, mean([v.loc for v in views]), mean([v.scale for v in views]),
                        factor, "barycenter")


def _rotated(view: GaussianView, rotation: torch.Tensor | None) -> GaussianView:
    if rotation is None or view.factor is None:
        return view
    r = rotation.to(next(iter(view.factor.values())).device)
    return view.map(lambda part, site, t: t @ r.to(t.dtype) if part == "factor" else t)


# ------------------------------------------------------------------------------ match_many --
def match_many(
    posteriors: Sequence[Any],
    *,
    method: str = "wasserstein",
    reference: str | int = "barycenter",
    spec: PermutationSpec | None = None,
    max_iter: int = 20,
    seed: int = 0,
    progress: bool = False,
) -> MultiAlignment:
    """Align ``K >= 2`` posteriors of one architecture to a common reference.

    Parameters
    ----------
    posteriors : sequence of posteriors
        Guides, state dicts, modules, Gaussian views or sample sets
        (:class:`~bnn_align.SamplePosterior`, which enter through their moments: mean and
        standard deviation per weight) over one architecture, of one family (point, diagonal
        or low-rank of one rank). Not modified.
    method : {"wasserstein", "mean"}
        The objective of :func:`match`.
    reference : "barycenter" or int
        ``"barycenter"``: start from ``posteriors[0]`` and alternate matching with recomputing
        the reference as the barycenter of the aligned posteriors (module docstring) until a
        round changes no permutation or ``max_iter`` rounds. An int ``k``: match every
        posterior to ``posteriors[k]`` once (the pairwise baseline); the barycenter of the
        result is still computed.
    spec : PermutationSpec, optional
        Defaults to the spec of the posteriors' BayesianNetwork (or sample sets' spec).
    max_iter : int
        Maximum number of rounds.
    seed : int
        Seed of :func:`match`'s solver.
    progress : bool
        Show a tqdm bar over rounds.

    Returns
    -------
    MultiAlignment

    Raises
    ------
    ValueError
        Fewer than two posteriors, posteriors over different architectures (naming the pair
        and the first differing site), of different families or ranks, full-rank posteriors,
        an unknown method or reference, and what :func:`match` raises.
    TypeError
        ``posteriors`` not a sequence, unsupported posterior kinds.

    Examples
    --------
    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import guides, models
    >>> _ = torch.manual_seed(0)
    >>> guides_ = [guides.mean_field(ba.BayesianNetwork(models.mlp(4, [16], 3),
    ...                                                  input_shape=(4,)), init_scale=0.1)
    ...            for _ in range(4)]
    >>> result = ba.match_many(guides_)
    >>> result                                     # doctest: +ELLIPSIS
    MultiAlignment(K=4, method='wasserstein', reference='barycenter', objective=..., perms=[P_0(16)])
    >>> all(a <= b + 1e-9 for a, b in zip(result.history[1:], result.history))  # never rises
    True
    >>> merged = ba.merge(result)                  # the barycenter as an AutoNormal
    >>> type(merged).__name__
    'AutoNormal'
    >>> ba.match_many(guides_[:1])
    Traceback (most recent call last):
        ...
    ValueError: match_many needs at least 2 posteriors, got 1
    """
    started = time.perf_counter()
    if isinstance(posteriors, (Mapping, torch.nn.Module)) or not isinstance(posteriors, Sequence):
        raise TypeError(f"posteriors must be a sequence (list) of posteriors, got "
                        f"{type(posteriors).__name__}")
    posteriors = list(posteriors)
    if len(posteriors) < 2:
        raise ValueError(f"match_many needs at least 2 posteriors, got {len(posteriors)}")
    if method not in _MANY_METHODS:
        raise ValueError(f"method must be one of {_MANY_METHODS}, got {method!r}")
    count = len(posteriors)
    if isinstance(reference, str):
        if reference != "barycenter":
            raise ValueError(f"reference must be 'barycenter' or an index, got {reference!r}")
    else:
        check_int("reference", reference, low=0, high=count - 1)
    positive_int(max_iter=max_iter)
    views = [_view(p) for p in posteriors]
    # what match aligns: the posterior itself (its model's buffers move with it), a sample set
    # through its moments
    inputs = [v if isinstance(p, SamplePosterior) else p for p, v in zip(posteriors, views)]
    for k in range(1, count):  # one architecture, finite values: clear errors naming the pair
        paired_views(views[0], views[k], ("posteriors[0]", f"posteriors[{k}]"), copy=False)
    kind = _family(views)
    spec = _spec_of(posteriors, spec)
    sizes = _spec_sizes(spec, views[0], inputs[0])
    perms: list[dict[str, torch.Tensor] | None] = [None] * count
    ref = views[0] if reference == "barycenter" else views[reference]
    rounds = 1 if isinstance(reference, int) else max_iter
    history: list[float] = []
    converged = False
    aligned_views: list[GaussianView] = list(views)
    aligned: list[Any] = list(inputs)
    bar = tqdm(total=rounds, desc="match_many", disable=not progress, leave=False)
    for round_ in range(rounds):
        changed = False
        for k in range(count):
            result = match(ref, inputs[k], spec=spec, method=method, seed=seed,
                           init=perms[k])
            if perms[k] is None or any(not torch.equal(result.perms[g], perms[k][g])
                                       for g in sizes):
                changed = True
            perms[k] = result.perms
            if isinstance(result.aligned, GaussianView):  # match leaves a view's factor alone
                aligned[k] = aligned_views[k] = _rotated(result.aligned, result.rotation)
            else:  # a guide's factor is rotated already
                aligned[k] = result.aligned
                aligned_views[k] = as_gaussian(result.aligned, copy=False)
        ref = _barycenter(aligned_views, kind)
        costs = [alignment_cost(ref, a, spec=spec, method=method) for a in aligned]
        history.append(float(sum(costs)))
        bar.update()
        if not changed and round_ > 0:
            converged = True
            break
    bar.close()
    if isinstance(reference, int):
        converged = True
    aligned = [permute(p, perms[k], spec) if isinstance(p, SamplePosterior) else aligned[k]
               for k, p in enumerate(posteriors)]
    return MultiAlignment(
        perms=[check_perms(p, sizes) for p in perms], aligned=aligned, barycenter=ref,
        history=history, costs=costs, rounds=len(history), converged=converged,
        seconds=time.perf_counter() - started, method=method, reference=reference, spec=spec,
        posteriors=posteriors)


# ---------------------------------------------------------------------------------- merge --
def merge(alignment: MultiAlignment) -> Any:
    """The merged posterior: the barycenter of :func:`match_many`, as the inputs' kind.

    Parameters
    ----------
    alignment : MultiAlignment

    Returns
    -------
    posterior
        A guide of ``posteriors[0]``'s kind holding the barycenter (over the first aligned
        guide's model, whose floating-point buffers, e.g. BatchNorm statistics, are the
        average of the aligned ones'); a state dict or module of averaged parameters (and
        averaged buffers) for point estimates; the barycenter view for view inputs. For
        sample sets, the pooled aligned samples, one chain per input when they have equal
        sizes (a mixture of the aligned sets, not an average of weights).

    Raises
    ------
    TypeError
        Not a MultiAlignment.

    Examples
    --------
    Two relabelled copies of a network merge into the network itself:

    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import models
    >>> _ = torch.manual_seed(0)
    >>> net = models.mlp(4, [8], 3)
    >>> spec = ba.spec_from_module(net, torch.zeros(1, 4))
    >>> copies = [ba.permute(net, {"P_0": torch.randperm(8)}, spec) for _ in range(2)]
    >>> merged = ba.merge(ba.match_many(copies, spec=spec))
    >>> x = torch.randn(5, 4)
    >>> torch.allclose(merged(x), net(x), atol=1e-5)
    True
    """
    if not isinstance(alignment, MultiAlignment):
        raise TypeError(f"merge expects a MultiAlignment from match_many, got "
                        f"{type(alignment).__name__}")
    first = alignment.aligned[0]
    bary = alignment.barycenter
    if isinstance(first, GaussianView):
        return bary
    if isinstance(first, SamplePosterior):
        sets = alignment.aligned
        pooled = {s: torch.cat([a.samples[s] for a in sets]) for s in first.samples}
        equal = len({a.num_samples for a in sets}) == 1
        return first.with_samples(pooled, num_chains=len(sets) if equal else 1)
    if isinstance(first, torch.nn.Module) and not hasattr(first, "prototype_trace"):
        merged = from_gaussian(first, bary)
        _average_buffers(merged, alignment.aligned)
        return merged
    if isinstance(first, Mapping):
        merged = from_gaussian(first, bary)
        for name, value in merged.items():
            if name not in bary.loc and isinstance(value, torch.Tensor) \
                    and value.is_floating_point():
                merged[name] = torch.stack([a[name] for a in alignment.aligned]).mean(0)
        return merged
    from ..posterior import model_of

    model = model_of(first)
    new_model = None
    if hasattr(model, "net") and any(b.is_floating_point() for b in model.net.buffers()):
        net = copy.deepcopy(model.net)
        _average_buffers(net, [model_of(a).net for a in alignment.aligned])
        new_model = model.with_net(net)
    return from_gaussian(first, bary, new_model)


def _average_buffers(module: torch.nn.Module, others: Sequence[torch.nn.Module]) -> None:
    """Set ``module``'s floating-point buffers (ours, new) to the average of ``others``'."""
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if buf.is_floating_point():
                buf.copy_(torch.stack([o.get_buffer(name) for o in others]).mean(0))


# --------------------------------------------------------------------------------- REPAIR --
_REPAIRED = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def _unit_stats(module: torch.nn.Module, layers: Sequence[str], x: torch.Tensor,
                batch_size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-unit mean and standard deviation of every layer's output on ``x`` (units: the last
    axis of a linear layer's output, axis 1 of a convolution's)."""
    sums: dict[str, list] = {}
    modules = dict(module.named_modules())

    def hook(name: str):
        def fn(_module, _inputs, output):
            out = output.detach().double()
            flat = out.reshape(-1, out.shape[-1]) if out.dim() <= 2 else \
                out.movedim(1, -1).reshape(-1, out.shape[1])
            acc = sums.setdefault(name, [0, 0.0, 0.0])
            acc[0] += len(flat)
            acc[1] = acc[1] + flat.sum(0)
            acc[2] = acc[2] + (flat * flat).sum(0)
        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in layers]
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                module(x[start:start + batch_size])
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    out = {}
    for name, (n, s, ss) in sums.items():
        mean = s / n
        out[name] = (mean, (ss / n - mean ** 2).clamp_min(0).sqrt())
    return out


def repair(merged: torch.nn.Module, endpoints: Sequence[torch.nn.Module], data: Any, *,
           batch_size: int = 1024, layers: Sequence[str] | None = None) -> torch.nn.Module:
    """REPAIR (Jordan et al., ICLR 2023): undo the variance collapse of a merged network.

    Every repaired layer's output units (pre-activations) are rescaled so that their mean and
    standard deviation on ``data`` are the average of the endpoints' (aligned) networks':
    ``out <- (out - mu_merged) / sd_merged * sd_target + mu_target``, folded into the layer's
    weight and bias. Layers are repaired in execution order, each measured after the ones before
    it were repaired. BatchNorm running statistics are then re-estimated on ``data``.

    Parameters
    ----------
    merged : nn.Module
        The merged point estimate (e.g. ``merge(match_many(nets, ...))``). Not modified.
    endpoints : sequence of nn.Module
        The aligned networks it was merged from (``match_many(...).aligned``).
    data : Tensor or (x, y)
        Training inputs, ``(N, *input_shape)``.
    batch_size : int
    layers : sequence of str, optional
        Names of the linear/convolutional layers to repair (default: all of them but the last
        one, whose outputs are the network's). A layer without a bias gets one.

    Returns
    -------
    nn.Module
        A repaired copy.

    Raises
    ------
    ValueError
        No endpoints, unknown layer names, a non-positive batch size.
    TypeError
        A merged network or endpoint that is not an ``nn.Module``.

    Examples
    --------
    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import models
    >>> _ = torch.manual_seed(0)
    >>> nets = [models.mlp(4, [32], 3) for _ in range(2)]
    >>> spec = ba.spec_from_module(nets[0], torch.zeros(1, 4))
    >>> result = ba.match_many(nets, spec=spec)
    >>> merged = ba.merge(result)
    >>> x = torch.randn(256, 4)
    >>> fixed = ba.repair(merged, result.aligned, x)
    >>> target = torch.stack([n[0](x).std(0, correction=0) for n in result.aligned]).mean(0)
    >>> torch.allclose(fixed[0](x).std(0, correction=0), target, rtol=1e-3)
    True
    """
    if not isinstance(merged, torch.nn.Module):
        raise TypeError(f"merged must be an nn.Module, got {type(merged).__name__}")
    endpoints = list(endpoints)
    if not endpoints:
        raise ValueError("endpoints is empty: give the aligned networks that were merged")
    for k, e in enumerate(endpoints):
        if not isinstance(e, torch.nn.Module):
            raise TypeError(f"endpoints[{k}] must be an nn.Module, got {type(e).__name__}")
    positive_int(batch_size=batch_size)
    x = data if isinstance(data, torch.Tensor) else as_data_pair(data)[0]
    candidates = [n for n, m in merged.named_modules() if isinstance(m, _REPAIRED)]
    if layers is None:
        layers = candidates[:-1]
    unknown = [n for n in layers if n not in candidates]
    if unknown:
        raise ValueError(f"layers {unknown} are not linear or convolutional layers of the "
                         f"merged network; choose from {candidates}")
    targets = [_unit_stats(e, layers, x, batch_size) for e in endpoints]
    out = copy.deepcopy(merged)
    modules = dict(out.named_modules())
    for name in layers:
        mean_t = torch.stack([t[name][0] for t in targets]).mean(0)
        sd_t = torch.stack([t[name][1] for t in targets]).mean(0)
        mean_m, sd_m = _unit_stats(out, [name], x, batch_size)[name]
        gain = torch.where(sd_m > 0, sd_t / sd_m.clamp_min(1e-12), torch.ones_like(sd_m))
        layer = modules[name]
        with torch.no_grad():
            shape = (-1,) + (1,) * (layer.weight.dim() - 1)
            layer.weight.mul_(gain.view(shape).to(layer.weight.dtype))
            shift = (mean_t - gain * mean_m).to(layer.weight.dtype)
            if layer.bias is None:
                layer.bias = torch.nn.Parameter(torch.zeros_like(shift),
                                                requires_grad=layer.weight.requires_grad)
            # the bias was scaled with the unit's output: b' = g b + (mu_t - g mu_m)
            layer.bias.mul_(gain.to(layer.bias.dtype)).add_(shift)
    _reset_batchnorm(out, x, batch_size)
    return out


def _reset_batchnorm(module: torch.nn.Module, x: torch.Tensor, batch_size: int) -> None:
    """Re-estimate BatchNorm running statistics on ``x`` (cumulative averages)."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        return
    saved = [(m, m.momentum) for m in norms]
    was_training = module.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    module.train()
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                module(x[start:start + batch_size])
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        module.train(was_training)


# ------------------------------------------------------------------------ sample alignment --
def align_samples(
    reference: Any,
    samples: SamplePosterior,
    *,
    method: str = "wasserstein",
    spec: PermutationSpec | None = None,
    max_iter: int = 100,
    seed: int = 0,
    progress: bool = False,
) -> SampleAlignment:
    """Align every sample of a sample set to a reference: one permutation per sample.

    Parameters
    ----------
    reference : posterior, GaussianView or None
        What the samples are aligned to (any posterior :func:`match` takes as ``guide_a``).
        None: for a sample set of several chains, the barycenter of :func:`match_many` over
        the chains' moments; for one chain, the samples' mean.
    samples : SamplePosterior
        Not modified.
    method : {"wasserstein", "mean"}
        :func:`match`'s objective (a sample is a point, so both find the same permutations
        against a point reference).
    spec : PermutationSpec, optional
        Defaults to the sample set's.
    max_iter, seed : int
        Passed to :func:`match`.
    progress : bool
        A tqdm bar over the samples.

    Returns
    -------
    SampleAlignment

    Raises
    ------
    ValueError
        A reference over another architecture, no spec, an unknown method.
    TypeError
        ``samples`` not a SamplePosterior.

    Examples
    --------
    Samples of one network under random relabellings all come back to it, and every sample
    still computes its own function:

    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import models
    >>> _ = torch.manual_seed(0)
    >>> model = ba.BayesianNetwork(models.mlp(4, [8], 3), input_shape=(4,))
    >>> nets = [ba.permute(model.net, {"P_0": torch.randperm(8)}, model.spec) for _ in range(5)]
    >>> ensemble = ba.SamplePosterior.from_modules(nets, model=model)
    >>> result = ba.align_samples(model.net.state_dict(), ensemble)
    >>> float(result.cost_after.max())
    0.0
    >>> x = torch.randn(3, 4)
    >>> torch.allclose(model.evaluate(result.aligned.point(4), x), nets[4](x), atol=1e-6)
    True
    """
    started = time.perf_counter()
    if not isinstance(samples, SamplePosterior):
        raise TypeError(f"samples must be a SamplePosterior, got {type(samples).__name__}")
    if method not in _MANY_METHODS:
        raise ValueError(f"method must be one of {_MANY_METHODS}, got {method!r}")
    spec = spec if spec is not None else samples.spec
    if spec is None:
        raise ValueError("no spec: the sample set has no model; pass spec= (or build it with "
                         "model=)")
    if reference is None:
        if samples.num_chains > 1:
            reference = match_many(samples.chains(), method=method, spec=spec,
                                   seed=seed).barycenter
        else:
            reference = samples.moments()
    elif isinstance(reference, SamplePosterior):
        raise TypeError("reference must be a single posterior (a guide, state dict, module or "
                        "view), not a sample set: align two sample sets to a common reference "
                        "(match_many, or reference=None)")
    ref = reference if isinstance(reference, GaussianView) else as_gaussian(reference,
                                                                            copy=False)
    paired_views(ref, samples.moments(), ("reference", "samples"), copy=False)
    rows: list[dict[str, torch.Tensor]] = []
    before, after = [], []
    for s in tqdm(range(samples.num_samples), desc="align_samples", disable=not progress,
                  leave=False):
        result = match(ref, samples.point(s), spec=spec, method=method, max_iter=max_iter,
                       seed=seed)
        rows.append(result.perms)
        before.append(result.cost_before)
        after.append(result.cost_after)
    perms = {g: torch.stack([r[g] for r in rows]) for g in rows[0]}
    return SampleAlignment(perms=perms, aligned=permute(samples, perms, spec), samples=samples,
                           reference=ref, cost_before=np.asarray(before),
                           cost_after=np.asarray(after),
                           seconds=time.perf_counter() - started, method=method, spec=spec)
