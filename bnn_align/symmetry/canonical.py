"""Remove the positive-scale symmetry: :func:`rescale` and :func:`canonicalize`.

A scalable group (``spec.scalable``, see :mod:`bnn_align.symmetry.scale`) can have unit ``i``'s
incoming parameters multiplied by ``c_i > 0`` and its outgoing weights by ``1 / c_i`` without
changing the function. :func:`canonicalize` picks the representative of each orbit in which every
scalable unit's incoming vector (its weight row, bias and, for units after a normalisation
layer, the layer's affine parameters) has unit Euclidean norm, as Pittorino et al. (ICML 2022)
do: the parameter space of those vectors becomes a product of spheres.

Order matters in deep networks: normalising layer ``l`` pushes its scale into the rows of layer
``l + 1``, which are then normalised including what was pushed. Groups are processed in an order
where every group comes after the groups that push into its incoming parameters (a topological
order); where no such order exists (a residual block without normalisation reads and writes
the residual stream) sweeps are repeated until every norm is within ``1e-6`` of 1.

For a Gaussian posterior the rescaling is a fixed linear map ``theta -> D theta`` (``D``
diagonal and positive, computed from the means), so the canonical posterior is the exact
push-forward: means and diagonal scales are multiplied by ``D``, covariance-factor rows too,
and a diagonal posterior stays diagonal. The function distribution is unchanged.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from pyro.infer import autoguide
from torch import nn

from ..bayesian import BayesianNetwork
from ..posterior import as_gaussian, from_gaussian
from .permutation import _copy_module, spec_for
from .scale import scale_along, unit_rows
from .spec import PermutationSpec

__all__ = ["canonicalize", "rescale", "unit_norms"]

_TOLERANCE = 1e-6
_MAX_SWEEPS = 200


def unit_norms(tensors: Mapping[str, torch.Tensor], spec: PermutationSpec,
               groups: Any = None) -> dict[str, torch.Tensor]:
    """Norm of every scalable unit's incoming vector: group -> ``(n_group,)`` (for ``groups``,
    default all scalable groups).

    The incoming vector of unit ``i`` is the concatenation of slice ``i`` of every incoming
    axis of its group (``spec.scalable[group].incoming``).
    """
    scalable = spec.scalable
    return {group: unit_rows(tensors, scalable[group].incoming, spec.block).norm(dim=1)
            for group in (scalable if groups is None else groups)}


def rescale_tensors(tensors: Mapping[str, torch.Tensor], scales: Mapping[str, torch.Tensor],
                    spec: PermutationSpec) -> dict[str, torch.Tensor]:
    """Incoming axes of each group in ``scales`` multiplied by its factors, outgoing divided
    (others are kept as they are)."""
    out = dict(tensors)
    for group, factors in scales.items():
        sym = spec.scalable[group]
        for (name, axis), power in [*((p, 1) for p in sym.incoming),
                                    *((p, -1) for p in sym.outgoing)]:
            if name in out:
                out[name] = scale_along(out[name], axis, factors ** power, spec.block(name, axis))
    return out


def _order(spec: PermutationSpec) -> tuple[list[str], bool]:
    """Scalable groups in an order where a group comes after those pushing into its incoming
    tensors, and whether one exists (False: a cycle, the spec's order)."""
    scalable = spec.scalable
    incoming = {g: {n for n, _ in s.incoming} for g, s in scalable.items()}
    after = {g: {h for h, s in scalable.items() if h != g
                 and any(n in incoming[g] for n, _ in s.outgoing)} for g in scalable}
    order: list[str] = []
    pending = dict(after)
    while pending:
        ready = [g for g, deps in pending.items() if not deps - set(order)]
        if not ready:
            return list(scalable), False
        order += ready
        for g in ready:
            del pending[g]
    return order, True


def canonical_scales(tensors: Mapping[str, torch.Tensor], spec: PermutationSpec
                     ) -> dict[str, torch.Tensor]:
    """The factors ``c`` (group -> ``(n_group,)``, float64) with which :func:`rescale_tensors`
    makes every scalable unit's incoming vector a unit vector. Units whose incoming vector is
    zero keep factor 1."""
    named = {n for sym in spec.scalable.values() for n, _ in (*sym.incoming, *sym.outgoing)}
    work = {name: t.detach().to(torch.float64) for name, t in tensors.items() if name in named}
    order, acyclic = _order(spec)
    scales: dict[str, torch.Tensor] = {}
    for _ in range(_MAX_SWEEPS):
        worst = 0.0
        for group in order:
            norm = unit_norms(work, spec, [group])[group]
            factor = torch.where(norm > 0, 1.0 / torch.where(norm > 0, norm, 1.0), 1.0)
            work = rescale_tensors(work, {group: factor}, spec)
            scales[group] = scales[group] * factor if group in scales else factor
            worst = max(worst, float((norm[norm > 0] - 1).abs().max()) if (norm > 0).any()
                        else 0.0)
        if acyclic or worst < _TOLERANCE:
            break
    return scales


def _check_scales(scales: Any, spec: PermutationSpec, shapes: Mapping[str, tuple]
                  ) -> dict[str, torch.Tensor]:
    if not isinstance(scales, Mapping):
        raise TypeError(f"scales must be a mapping of group name to positive factors, got "
                        f"{type(scales).__name__}")
    sizes = spec.group_sizes(shapes)
    out = {}
    for group, value in scales.items():
        if group not in spec.scalable:
            raise ValueError(f"scales names group {group!r}, which is not scalable; the "
                             f"scalable groups are {list(spec.scalable)}")
        t = torch.as_tensor(value)
        if not t.is_floating_point():
            t = t.double()
        if t.shape != (sizes[group],):
            raise ValueError(f"scales[{group!r}] must have shape ({sizes[group]},), got "
                             f"{tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
            raise ValueError(f"scales[{group!r}] must be finite and positive: only positive "
                             f"factors leave the function unchanged")
        out[group] = t
    return out


def _posterior_spec(obj: Any, spec: PermutationSpec | None) -> PermutationSpec:
    spec = spec_for(obj, spec)
    return spec


def _apply(obj: Any, spec: PermutationSpec, scales_of: Any) -> tuple[Any, dict]:
    """Rescale any posterior kind by ``scales_of(loc, spec)`` (computed from its means)."""
    if isinstance(obj, BayesianNetwork):
        net, scales = _apply(obj.net, spec, scales_of)
        return obj.with_net(net), scales
    if isinstance(obj, autoguide.AutoGuide):
        view = as_gaussian(obj)
        spec = spec.restrict(view.sites)
        scales = scales_of(view.loc, spec)
        # one positive diagonal map for every part: means, scales and factor rows
        new = view.map(lambda part, site, t: rescale_tensors({site: t}, scales, spec)[site])
        return from_gaussian(obj, new), scales
    if isinstance(obj, nn.Module):
        state = obj.state_dict()
        scales = scales_of(state, spec)
        return _copy_module(obj, rescale_tensors(state, scales, spec), state), scales
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        scales = scales_of(tensors, spec)
        out = copy.copy(obj) if isinstance(obj, dict) else dict(obj)
        new = rescale_tensors(tensors, scales, spec)
        out.update({k: v.to(tensors[k].dtype) if v is not tensors[k] else v.clone()
                    for k, v in new.items()})
        return out, scales
    raise TypeError(f"expected a state dict, an nn.Module, a BayesianNetwork or a Pyro autoguide, "
                    f"got {type(obj).__name__}")


def rescale(obj: Any, scales: Mapping[str, Any], spec: PermutationSpec | None = None) -> Any:
    """Apply positive rescalings of scalable units to a state dict, module or guide.

    Parameters
    ----------
    obj : state dict, nn.Module, BayesianNetwork or Pyro autoguide
        Never modified.
    scales : mapping of str to Tensor
        Scalable group -> positive factors of shape ``(n_group,)``: unit ``i``'s incoming
        parameters are multiplied by ``scales[group][i]``, its outgoing weights divided by it.
        Groups not given are left alone.
    spec : PermutationSpec, optional
        Defaults to the spec of the BayesianNetwork ``obj`` is (or is a guide over).

    Returns
    -------
    object of the same kind
        Computing the same function; for a guide, the exact push-forward of its distribution
        (means, scales and covariance-factor rows multiplied alike).

    Raises
    ------
    ValueError
        A group that is not scalable, factors of the wrong shape, zero, negative or not finite;
        no spec for an object that is not (a guide over) a BayesianNetwork.
    TypeError
        An unsupported object or ``scales`` that is not a mapping.

    Examples
    --------
    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import models
    >>> _ = torch.manual_seed(0)
    >>> net = models.mlp(4, [8], 3)
    >>> spec = ba.spec_from_module(net, torch.zeros(1, 4))
    >>> c = torch.rand(8) + 0.5
    >>> scaled = ba.rescale(net, {"P_0": c}, spec)
    >>> torch.allclose(scaled[0].weight, net[0].weight * c[:, None])
    True
    >>> x = torch.randn(5, 4)
    >>> torch.allclose(scaled(x), net(x), atol=1e-5)
    True
    >>> ba.rescale(net, {"P_0": -c}, spec)
    Traceback (most recent call last):
        ...
    ValueError: scales['P_0'] must be finite and positive: only positive factors leave the function unchanged
    """
    spec = _posterior_spec(obj, spec)

    def given(tensors: Mapping[str, torch.Tensor], sub: PermutationSpec) -> dict:
        return _check_scales(scales, sub, {k: tuple(v.shape) for k, v in tensors.items()})

    return _apply(obj, spec, given)[0]


def canonicalize(obj: Any, spec: PermutationSpec | None = None, *,
                 return_scales: bool = False) -> Any:
    """The equivalent posterior in which every scalable unit's incoming vector has unit norm.

    Parameters
    ----------
    obj : state dict, nn.Module, BayesianNetwork or Pyro autoguide
        Point estimates, or a guide (``AutoDelta``, ``AutoNormal``, ``AutoDiagonalNormal``,
        ``AutoLowRankMultivariateNormal``, ``AutoMultivariateNormal``). Never modified.
    spec : PermutationSpec, optional
        Defaults to the spec of the BayesianNetwork ``obj`` is (or is a guide over); its
        ``scalable`` groups are the ones normalised.
    return_scales : bool
        Also return the factors used.

    Returns
    -------
    object of the same kind, or (object, dict)
        For a guide, the exact push-forward under the rescaling computed from its means (see
        the module docstring). With ``return_scales``, also group -> factors ``c`` (float64,
        shape ``(n_group,)``) such that ``rescale(obj, c)`` is the canonical object.

    Raises
    ------
    ValueError
        No spec for an object that is not (a guide over) a BayesianNetwork, a spec that does
        not fit.
    TypeError
        An unsupported object.

    Examples
    --------
    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import guides, models
    >>> _ = torch.manual_seed(0)
    >>> model = ba.BayesianNetwork(models.mlp(4, [8, 8], 3), input_shape=(4,))
    >>> model.spec.scalable["P_0"].incoming        # the rows and bias of the first layer
    (('0.weight', 0), ('0.bias', 0))
    >>> guide = guides.mean_field(model, init_scale=0.01)
    >>> canonical = ba.canonicalize(guide)
    >>> loc = ba.as_gaussian(canonical).loc
    >>> rows = torch.cat([loc["0.weight"], loc["0.bias"][:, None]], 1)
    >>> torch.allclose(rows.norm(dim=1), torch.ones(8))
    True
    >>> x = torch.randn(5, 4)                    # the function at the means is unchanged
    >>> before = model.evaluate(ba.as_gaussian(guide).loc, x)
    >>> torch.allclose(model.evaluate(loc, x), before, atol=1e-5)
    True
    """
    spec = _posterior_spec(obj, spec)
    out, scales = _apply(obj, spec, canonical_scales)
    return (out, scales) if return_scales else out
