"""One Gaussian view over every kind of posterior, and the way back to a guide of the same kind.

Posteriors are Pyro autoguides (``AutoNormal``, ``AutoDiagonalNormal``,
``AutoLowRankMultivariateNormal``, ``AutoMultivariateNormal``, ``AutoDelta``) or point estimates
(a state dict or an ``nn.Module``). :func:`as_gaussian` reads any of them as a
:class:`GaussianView`: per sample site a mean, a diagonal scale and, for low- and full-rank guides,
the rows of a covariance factor, so that ``theta = loc + scale * eps + factor @ z`` with
``eps, z ~ N(0, I)``. Everything is in the guides' unconstrained space (for network weights, which
have real support, that is the weight space itself).

Each posterior kind has a small adapter (the hierarchy mirrors Pyro's autoguides) that reads the
view, exposes the raw parameters that a permutation moves exactly, and builds a new posterior of
the same kind from either. Inputs are never modified: new guides are copies.
"""

from __future__ import annotations

import copy
import functools
import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from pyro.infer import autoguide
from pyro.nn.module import PyroModule
from pyro.poutine.messenger import _bound_partial, unwrap
from torch import nn
from torch.distributions import transform_to

from ._checks import same_device

__all__ = ["GaussianView", "as_gaussian", "model_of", "POINT", "DIAGONAL", "LOW_RANK", "FULL_RANK"]

POINT, DIAGONAL, LOW_RANK, FULL_RANK = "point", "diagonal", "low_rank", "full_rank"


@dataclass(frozen=True, eq=False)
class GaussianView:
    """A posterior as ``N(loc, diag(scale**2) + factor factor^T)``, split by sample site.

    Attributes
    ----------
    kind : {"point", "diagonal", "low_rank", "full_rank"}
        Which family the posterior came from.
    loc : dict of str to Tensor
        Mean of every site, shape ``site_shape``, in site execution order.
    scale : dict of str to Tensor
        Diagonal part of the standard deviation, shape ``site_shape`` (zeros for point
        estimates and for full-rank guides, whose covariance is all in ``factor``).
    factor : dict of str to Tensor or None
        Rows of the covariance factor ``W`` belonging to each site, shape ``site_shape + (rank,)``
        (``rank = D`` for a full-rank guide); ``None`` for point and diagonal posteriors.

    Examples
    --------
    Read a low-rank guide and draw from it:

    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import guides, models
    >>> model = ba.BayesianNetwork(models.mlp(4, [8], 3), input_shape=(4,))
    >>> view = ba.as_gaussian(guides.low_rank(model, rank=2))
    >>> view.kind, view.num_params, view.rank
    ('low_rank', 67, 2)
    >>> view.factor["0.weight"].shape                  # site shape + (rank,)
    torch.Size([8, 4, 2])
    >>> loc, scale, factor = view.flat()               # packed in site order
    >>> loc.shape, scale.shape, factor.shape
    (torch.Size([67]), torch.Size([67]), torch.Size([67, 2]))
    >>> draws = view.sample(10, torch.Generator().manual_seed(0))
    >>> draws["2.weight"].shape                        # (num_samples, *site_shape)
    torch.Size([10, 3, 8])
    """

    kind: str
    loc: dict[str, torch.Tensor]
    scale: dict[str, torch.Tensor]
    factor: dict[str, torch.Tensor] | None = None
    _source: str = field(default="", repr=False)

    @property
    def sites(self) -> list[str]:
        """Site names in execution order."""
        return list(self.loc)

    @property
    def shapes(self) -> dict[str, torch.Size]:
        """Site -> shape of the site, in execution order."""
        return {k: v.shape for k, v in self.loc.items()}

    @property
    def device(self) -> torch.device | None:
        """Where the view's tensors live (None for a view without sites)."""
        return next((v.device for v in self.loc.values()), None)

    @property
    def num_params(self) -> int:
        """Total number of latent dimensions ``D``."""
        return sum(v.numel() for v in self.loc.values())

    @property
    def rank(self) -> int:
        """Number of columns of the covariance factor (0 without one)."""
        if not self.factor:
            return 0
        return next(iter(self.factor.values())).shape[-1]

    def stddev(self) -> dict[str, torch.Tensor]:
        """Marginal standard deviation of every weight, shape ``site_shape``."""
        if self.factor is None:
            return dict(self.scale)
        return {k: (self.scale[k] ** 2 + self.factor[k].pow(2).sum(-1)).sqrt() for k in self.loc}

    def flat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(loc, scale, factor)`` packed in site order: shapes ``(D,)``, ``(D,)``, ``(D, rank)``."""
        loc = torch.cat([v.reshape(-1) for v in self.loc.values()])
        scale = torch.cat([v.reshape(-1) for v in self.scale.values()])
        factor = None
        if self.factor is not None:
            factor = torch.cat([v.reshape(-1, v.shape[-1]) for v in self.factor.values()])
        return loc, scale, factor

    def sample(
        self, num_samples: int, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Draw ``num_samples`` weights: site -> tensor of shape ``(num_samples, *site_shape)``."""
        noise = self.standard_normal(num_samples, generator)
        return self.transform(noise)

    def standard_normal(
        self, num_samples: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The ``(eps, z)`` a sample is made from: shapes ``(S, D)`` and ``(S, rank)`` or None,
        on the view's device.

        A ``generator`` draws on its own device (the CPU's for ``torch.Generator()``) and the
        draws are moved to the view's: a seed then gives the same numbers on every device.
        """
        ref = next(iter(self.loc.values()))
        source = ref.device if generator is None else generator.device
        eps = torch.randn(num_samples, self.num_params, generator=generator,
                          dtype=ref.dtype, device=source).to(ref.device)
        z = None
        if self.factor is not None:
            z = torch.randn(num_samples, self.rank, generator=generator,
                            dtype=ref.dtype, device=source).to(ref.device)
        return eps, z

    def transform(self, noise: tuple[torch.Tensor, torch.Tensor | None]
                  ) -> dict[str, torch.Tensor]:
        """``loc + scale * eps + factor @ z`` for given standard-normal draws, split by site."""
        eps, z = noise
        loc, scale, factor = self.flat()
        theta = loc + scale * eps
        if factor is not None and z is not None:
            theta = theta + z @ factor.T
        return split_flat(theta, self.shapes, dim=1)

    @classmethod
    def from_flat(cls, kind: str, shapes: Mapping[str, torch.Size], loc: torch.Tensor,
                  scale: torch.Tensor, factor: torch.Tensor | None = None) -> "GaussianView":
        """The inverse of :meth:`flat`: a view from packed ``(D,)``, ``(D,)`` and ``(D, rank)``
        tensors, split into sites of the given shapes (in order). The parts are views of the
        packed tensors (gradients flow through)."""
        return cls(kind, split_flat(loc, shapes), split_flat(scale, shapes),
                   None if factor is None else split_flat(factor, shapes))

    def map(self, fn: Callable[[str, str, torch.Tensor], torch.Tensor]) -> "GaussianView":
        """A new view with ``fn(part, site, tensor)`` applied to every tensor.

        ``part`` is ``"loc"``, ``"scale"`` or ``"factor"``.
        """
        factor = None
        if self.factor is not None:
            factor = {k: fn("factor", k, v) for k, v in self.factor.items()}
        return GaussianView(
            self.kind,
            {k: fn("loc", k, v) for k, v in self.loc.items()},
            {k: fn("scale", k, v) for k, v in self.scale.items()},
            factor,
            self._source,
        )


# ------------------------------------------------------------------------------ helpers --
def split_flat(flat: torch.Tensor, shapes: Mapping[str, torch.Size], dim: int = 0
               ) -> dict[str, torch.Tensor]:
    """Undo the packing of site tensors along axis ``dim``: ``flat`` has ``D`` entries there,
    and every site gets its slice with that axis reshaped to the site's shape (views)."""
    out, pos = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        part = flat.narrow(dim, pos, size)
        out[name] = part.reshape((*flat.shape[:dim], *shape, *flat.shape[dim + 1:]))  # 0-d too
        pos += size
    return out


def model_of(guide: nn.Module) -> Any:
    """The model a Pyro autoguide was built over, with Pyro's handler wrappers removed."""
    return unwrap(guide.model)


def _replace_model(wrapped: Any, new_model: Any) -> Any:
    # Autoguides hold their model wrapped in handlers (InitMessenger); rebuild the same chain
    # of handlers around a new model.
    if isinstance(wrapped, _bound_partial):
        return _bound_partial(_replace_model(wrapped.func, new_model))
    if isinstance(wrapped, functools.partial) and len(wrapped.args) >= 2:
        inner = _replace_model(wrapped.args[1], new_model)
        return functools.partial(wrapped.func, wrapped.args[0], inner, *wrapped.args[2:],
                                 **wrapped.keywords)
    return new_model


def _owner(module: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    """The submodule holding a dotted parameter name (site names contain dots), and the name."""
    *path, attr = dotted.split(".")
    for part in path:
        module = module._modules[part]
    return module, attr


def _param(module: nn.Module, dotted: str) -> nn.Parameter:
    """The ``nn.Parameter`` behind a (possibly constrained, possibly nested) guide parameter."""
    owner, attr = _owner(module, dotted)
    if attr in getattr(owner, "_pyro_params", {}):
        return owner._parameters[attr + "_unconstrained"]
    return owner._parameters[attr]


def _constraint(module: nn.Module, dotted: str) -> Any:
    owner, attr = _owner(module, dotted)
    return owner._pyro_params[attr][0]


def _unconstrained(module: nn.Module, dotted: str, value: torch.Tensor) -> torch.Tensor:
    """The unconstrained value a constrained guide parameter needs to take ``value``."""
    return transform_to(_constraint(module, dotted)).inv(value)


def replacement_memo(replace: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[int, Any]:
    """A ``copy.deepcopy`` memo handing each old parameter or buffer its new value (pairs
    ``(old, value)``), so a deep copy takes the values instead of copying the old tensors.

    Values are detached, cast to the old dtype, made contiguous and never share memory with
    the old tensor; a parameter's stays a parameter with the same ``requires_grad``.
    """
    memo: dict[int, Any] = {}
    for old, value in replace:
        value = value.detach().to(old.dtype)
        if value.untyped_storage().data_ptr() == old.untyped_storage().data_ptr():
            value = value.clone()  # never share memory with the original
        value = value.contiguous()
        memo[id(old)] = (nn.Parameter(value, requires_grad=old.requires_grad)
                         if isinstance(old, nn.Parameter) else value)
    return memo


_EMPTY_CONTAINERS = (dict, OrderedDict, list, set)
_ATOMIC = (type(None), bool, int, float, str)


def clone_guide(guide: autoguide.AutoGuide, model: Any = None,
                replace: Mapping[nn.Parameter, torch.Tensor] | None = None
                ) -> autoguide.AutoGuide:
    """A copy of an autoguide, with some parameters replaced by new values.

    Parameters named in ``replace`` (old parameter -> new unconstrained value) are not copied at
    all, and what is read-only after set-up is shared: the prototype trace and the
    initialisation function, each as large as the network (``init_to_value`` holds a value per
    site). So a clone costs one copy of the parameters it does not replace. ``model`` replaces
    the model the guide is built over; otherwise the clone is over the guide's own model. The
    guide is never modified (``copy.deepcopy`` would go through ``AutoGuide.__getstate__``,
    which detaches it from its model, and ``PyroModule.__getstate__``, which edits its
    parameters).
    """
    shared = (guide.prototype_trace, getattr(guide, "init_loc_fn", None))
    memo = replacement_memo((replace or {}).items())
    memo.update({id(obj): obj for obj in shared if obj is not None})
    modules = list(guide.modules())
    new = _copy_modules(modules, memo, leave_out=("_model", "master"))
    new.master = None
    master = weakref.ref(new)
    for module in new.modules():  # nested guides (AutoGuideList) answer to the new one
        if module is not new and isinstance(module, autoguide.AutoGuide):
            module._update_master(master)
    wrapped = guide._model[0] if guide._model else None
    if model is not None and wrapped is not None:
        wrapped = _replace_model(wrapped, model)
    new._model = (wrapped,)
    return new


def _copy_modules(modules: list[nn.Module], memo: dict[int, Any],
                  leave_out: tuple[str, ...] = ()) -> Any:
    """``copy.deepcopy`` of a module tree (``modules``: all of it, the root first), every
    module's attributes deep-copied with ``memo`` but the modules made directly, and the
    attributes that need no deep copy taken directly: deepcopy's pickling protocol
    (``__reduce_ex__``, a ``PyroModule.__getstate__`` that walks every parameter below the
    module, ``__setstate__``) and its handling of the dozen empty hook and state containers of
    every module were most of the time of cloning a guide with many modules (one per
    site-name prefix, as a ResNet's; ``benchmarks/NOTES.md``).
    ``leave_out``: attributes of the root not to copy (it gets none of them)."""
    root = modules[0]
    fresh = [module for module in modules if id(module) not in memo]
    for module in fresh:
        memo[id(module)] = object.__new__(type(module))
    for module in fresh:
        state = {}
        for key, value in module.__dict__.items():
            if module is root and key in leave_out:
                continue
            kind = type(value)
            if kind in _ATOMIC:
                state[key] = value
            elif kind in _EMPTY_CONTAINERS and not value:
                state[key] = memo.setdefault(id(value), kind())  # aliases stay aliases
            else:
                state[key] = copy.deepcopy(value, memo)
        memo[id(module)].__dict__.update(state)
    return memo[id(root)]


def _copy(t: torch.Tensor, copy: bool) -> torch.Tensor:
    t = t.detach()
    return t.clone() if copy else t


# ------------------------------------------------------------------------------ adapters --
class _Adapter:
    """Reads one kind of posterior and builds new ones of the same kind.

    ``view(obj, copy=False)`` may share memory with ``obj`` (for internal, read-only use).
    ``raw`` gives the tensors a permutation moves exactly, as ``{part: {site: tensor}}`` with
    the site's axes first and any extra axes last; ``from_raw`` builds a posterior from such
    tensors, ``from_view`` from a Gaussian view.
    """

    kind: str = ""

    def view(self, obj: Any, copy: bool = True) -> GaussianView:
        raise NotImplementedError

    def raw(self, obj: Any) -> dict[str, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def from_raw(self, obj: Any, raw: Mapping[str, Mapping[str, torch.Tensor]],
                 model: Any = None) -> Any:
        raise NotImplementedError

    def from_view(self, obj: Any, view: GaussianView, model: Any = None) -> Any:
        raise NotImplementedError


def _check_ready(guide: autoguide.AutoGuide) -> None:
    # Pyro creates an autoguide's parameters on its first call, from the model's trace; before
    # that the packed guides have no ``loc`` attribute at all
    if guide.prototype_trace is None:
        raise ValueError(
            f"the {type(guide).__name__} guide has no parameters yet: Pyro creates them on the "
            f"guide's first call. Run it once with the model's arguments (guide(x, y); for a "
            f"bnn_align BayesianNetwork guide() is enough) or train it (bnn_align.fit), or build "
            f"it with bnn_align.guides, whose guides are set up already"
        )


class _GuideAdapter(_Adapter):
    def sites(self, guide: autoguide.AutoGuide) -> dict[str, torch.Size]:
        return {name: site["value"].shape
                for name, site in guide.prototype_trace.iter_stochastic_nodes()}


class _NormalAdapter(_GuideAdapter):
    """``AutoNormal``: one ``locs.<site>`` and ``scales.<site>`` parameter per site."""

    kind = DIAGONAL

    def view(self, guide, copy=True):
        sites = self.sites(guide)
        loc = {s: _copy(_param(guide.locs, s), copy) for s in sites}
        scale = {s: transform_to(_constraint(guide.scales, s))(_param(guide.scales, s)).detach()
                 for s in sites}
        return GaussianView(self.kind, loc, scale, None, type(guide).__name__)

    def raw(self, guide):
        sites = self.sites(guide)
        return {part: {s: _param(getattr(guide, part), s).detach() for s in sites}
                for part in ("locs", "scales")}

    def from_raw(self, guide, raw, model=None):
        return clone_guide(guide, model, {
            _param(getattr(guide, part), site): value
            for part, tensors in raw.items() for site, value in tensors.items()})

    def from_view(self, guide, view, model=None):
        _require_kind(view, (DIAGONAL, POINT), guide)
        replace = {}
        for site in self.sites(guide):
            replace[_param(guide.locs, site)] = view.loc[site]
            replace[_param(guide.scales, site)] = _unconstrained(guide.scales, site,
                                                                 view.scale[site])
        return clone_guide(guide, model, replace)


class _DeltaAdapter(_GuideAdapter):
    """``AutoDelta``: one parameter per site holding the point estimate."""

    kind = POINT

    def view(self, guide, copy=True):
        loc = {s: _copy(_param(guide, s), copy) for s in self.sites(guide)}
        return GaussianView(self.kind, loc, {s: torch.zeros_like(v) for s, v in loc.items()},
                            None, type(guide).__name__)

    def raw(self, guide):
        return {"value": {s: _param(guide, s).detach() for s in self.sites(guide)}}

    def from_raw(self, guide, raw, model=None):
        return clone_guide(guide, model,
                           {_param(guide, s): v for s, v in raw["value"].items()})

    def from_view(self, guide, view, model=None):
        _require_kind(view, (POINT,), guide)
        return clone_guide(guide, model,
                           {_param(guide, s): view.loc[s] for s in self.sites(guide)})


class _PackedAdapter(_GuideAdapter):
    """``AutoContinuous`` guides: all sites packed into one vector in execution order."""

    raw_names: tuple[str, ...] = ()

    def layout(self, guide) -> dict[str, tuple[slice, torch.Size]]:
        out, pos = {}, 0
        for name, shape in guide._unconstrained_shapes.items():
            size = math.prod(shape)
            out[name] = (slice(pos, pos + size), shape)
            pos += size
        return out

    def split(self, guide, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        # (D, *extra) -> {site: (*site_shape, *extra)}, as views of ``flat``
        return split_flat(flat, guide._unconstrained_shapes)

    def join(self, guide, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([parts[name].reshape(sl.stop - sl.start, *parts[name].shape[len(shape):])
                          for name, (sl, shape) in self.layout(guide).items()])

    def raw(self, guide):
        return {name: self.split(guide, _param(guide, name).detach()) for name in self.raw_names}

    def from_raw(self, guide, raw, model=None):
        return clone_guide(guide, model, {_param(guide, name): self.join(guide, parts)
                                          for name, parts in raw.items()})


class _DiagonalAdapter(_PackedAdapter):
    """``AutoDiagonalNormal``: ``loc`` and ``scale`` vectors."""

    kind = DIAGONAL
    raw_names = ("loc", "scale")

    def view(self, guide, copy=True):
        return GaussianView(self.kind, self.split(guide, _copy(guide.loc, copy)),
                            self.split(guide, guide.scale.detach()), None, type(guide).__name__)

    def from_view(self, guide, view, model=None):
        _require_kind(view, (DIAGONAL, POINT), guide)
        return clone_guide(guide, model, {
            _param(guide, "loc"): self.join(guide, view.loc),
            _param(guide, "scale"): _unconstrained(guide, "scale", self.join(guide, view.scale)),
        })


class _LowRankAdapter(_PackedAdapter):
    """``AutoLowRankMultivariateNormal``: covariance ``diag(s) (F F^T + I) diag(s)``.

    In the view, ``scale = s`` and ``factor = diag(s) F``.
    """

    kind = LOW_RANK
    raw_names = ("loc", "scale", "cov_factor")

    def view(self, guide, copy=True):
        s = guide.scale.detach()
        return GaussianView(self.kind, self.split(guide, _copy(guide.loc, copy)),
                            self.split(guide, s),
                            self.split(guide, s[:, None] * guide.cov_factor.detach()),
                            type(guide).__name__)

    def from_view(self, guide, view, model=None):
        _require_kind(view, (LOW_RANK,), guide)
        if view.rank != guide.cov_factor.shape[1]:
            raise ValueError(f"the view has rank {view.rank} but the guide has rank "
                             f"{guide.cov_factor.shape[1]}")
        s = self.join(guide, view.scale)
        return clone_guide(guide, model, {
            _param(guide, "loc"): self.join(guide, view.loc),
            _param(guide, "scale"): _unconstrained(guide, "scale", s),
            _param(guide, "cov_factor"): self.join(guide, view.factor) / s[:, None],
        })

    def rotate_(self, guide, rotation: torch.Tensor) -> None:
        """Rotate the factor's columns in place, ``F <- F R`` (the distribution is unchanged).

        Only for a guide the caller owns (e.g. one just made by ``permute``)."""
        if rotation.shape != (guide.cov_factor.shape[1],) * 2:
            return  # ranks were padded to match another guide: keep this guide's own factor
        with torch.no_grad():
            guide.cov_factor.copy_(guide.cov_factor @ rotation.to(guide.cov_factor.device))


class _FullRankAdapter(_PackedAdapter):
    """``AutoMultivariateNormal``: covariance ``W W^T`` with ``W = diag(s) L`` (``L`` unit lower).

    A permutation of the rows of ``W`` breaks its triangular form, so new guides re-factorise
    ``W W^T`` (an exact identity in exact arithmetic, done in float64).
    """

    kind = FULL_RANK
    raw_names = ("loc", "cov_rows")

    def rows(self, guide) -> torch.Tensor:
        return guide.scale.detach()[:, None] * guide.scale_tril.detach()

    def view(self, guide, copy=True):
        loc = self.split(guide, _copy(guide.loc, copy))
        return GaussianView(self.kind, loc, {k: torch.zeros_like(v) for k, v in loc.items()},
                            self.split(guide, self.rows(guide)), type(guide).__name__)

    def raw(self, guide):
        return {"loc": self.split(guide, guide.loc.detach()),
                "cov_rows": self.split(guide, self.rows(guide))}

    def refactorise(self, guide, loc: torch.Tensor, rows: torch.Tensor, model: Any):
        # W W^T = R^T R for W^T = Q R, so L = R^T (signs fixed so the diagonal is positive).
        r = torch.linalg.qr(rows.to(torch.float64).T, mode="r").R
        diag = torch.diagonal(r)
        lower = r.T * torch.where(diag < 0, -1.0, 1.0)[None, :]
        s = torch.diagonal(lower)
        return clone_guide(guide, model, {
            _param(guide, "loc"): loc,
            _param(guide, "scale"): _unconstrained(guide, "scale", s.to(rows.dtype)),
            _param(guide, "scale_tril"): _unconstrained(guide, "scale_tril",
                                                        (lower / s[:, None]).to(rows.dtype)),
        })

    def from_raw(self, guide, raw, model=None):
        return self.refactorise(guide, self.join(guide, raw["loc"]),
                                self.join(guide, raw["cov_rows"]), model)

    def from_view(self, guide, view, model=None):
        _require_kind(view, (FULL_RANK,), guide)
        rows = self.join(guide, view.factor)
        if any(bool((v != 0).any()) for v in view.scale.values()):
            # fold a diagonal part into the factor: W W^T + diag(d^2) = [W, diag(d)] [..]^T
            rows = torch.cat([rows, torch.diag(self.join(guide, view.scale))], dim=1)
        return self.refactorise(guide, self.join(guide, view.loc), rows, model)


class _PointAdapter(_Adapter):
    """A state dict (mapping of name to tensor) or an ``nn.Module``: a point estimate.

    For a module the sites are its parameters; for a mapping every floating-point tensor.
    """

    kind = POINT

    def tensors(self, obj) -> dict[str, torch.Tensor]:
        if isinstance(obj, nn.Module):
            return {k: v.detach() for k, v in obj.named_parameters()}
        return {k: v.detach() for k, v in obj.items()
                if isinstance(v, torch.Tensor) and v.is_floating_point()}

    def view(self, obj, copy=True):
        loc = {k: _copy(v, copy) for k, v in self.tensors(obj).items()}
        return GaussianView(self.kind, loc, {k: torch.zeros_like(v) for k, v in loc.items()},
                            None, type(obj).__name__)

    def from_view(self, obj, view, model=None):
        _require_kind(view, (POINT,), obj)
        if isinstance(obj, nn.Module):
            new = copy.deepcopy(obj)
            with torch.no_grad():
                for name, param in new.named_parameters():
                    param.copy_(view.loc[name])
            return new
        out = copy.copy(obj) if isinstance(obj, dict) else dict(obj)
        out.update({k: v.clone() for k, v in view.loc.items()})
        return out


def _require_kind(view: GaussianView, kinds: tuple[str, ...], target: Any) -> None:
    if view.kind not in kinds:
        raise ValueError(
            f"a {view.kind} posterior cannot be written into a {type(target).__name__}, which "
            f"holds {' or '.join(kinds)} posteriors"
        )


_GUIDE_ADAPTERS: tuple[tuple[type, _Adapter], ...] = (
    (autoguide.AutoNormal, _NormalAdapter()),
    (autoguide.AutoDelta, _DeltaAdapter()),
    (autoguide.AutoLowRankMultivariateNormal, _LowRankAdapter()),
    (autoguide.AutoMultivariateNormal, _FullRankAdapter()),
    (autoguide.AutoDiagonalNormal, _DiagonalAdapter()),
)
_POINT = _PointAdapter()
SUPPORTED = ("AutoNormal", "AutoDiagonalNormal", "AutoLowRankMultivariateNormal",
             "AutoMultivariateNormal", "AutoDelta", "a state dict", "an nn.Module")


def adapter_for(obj: Any) -> _Adapter:
    """The adapter of a posterior object (raises ``TypeError`` for unsupported kinds)."""
    if isinstance(obj, autoguide.AutoGuide):
        for cls, adapter in _GUIDE_ADAPTERS:
            if type(obj) is cls:
                _check_ready(obj)
                return adapter
        for cls, adapter in _GUIDE_ADAPTERS:  # user subclasses of a supported guide
            if isinstance(obj, cls) and not isinstance(obj, autoguide.AutoLaplaceApproximation):
                _check_ready(obj)
                return adapter
        raise TypeError(f"unsupported guide {type(obj).__name__}; supported: {', '.join(SUPPORTED)}")
    if isinstance(obj, Mapping) or (isinstance(obj, nn.Module) and not isinstance(obj, PyroModule)):
        return _POINT
    raise TypeError(
        f"expected a posterior ({', '.join(SUPPORTED)}), got {type(obj).__name__}"
    )


def as_gaussian(posterior: Any, *, copy: bool = True) -> GaussianView:
    """Read any supported posterior as a :class:`GaussianView`.

    Parameters
    ----------
    posterior : autoguide, state dict, nn.Module or GaussianView
        See the module docstring for the supported kinds.
    copy : bool
        Copy the means (the default). ``copy=False`` lets the view share memory with the
        posterior's parameters: cheaper, for code that only reads the view.

    Returns
    -------
    GaussianView
        ``kind`` ``"point"`` for ``AutoDelta``, state dicts and modules (zero scales; every
        floating-point tensor of a state dict, the parameters of a module), ``"diagonal"`` for
        ``AutoNormal`` and ``AutoDiagonalNormal``, ``"low_rank"`` and ``"full_rank"`` for the
        multivariate guides. A view is returned as it is.

    Raises
    ------
    TypeError
        An unsupported kind of posterior (the message lists the supported ones).
    ValueError
        An autoguide whose parameters do not exist yet (never run nor trained).

    Examples
    --------
    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import guides, models
    >>> model = ba.BayesianNetwork(models.mlp(4, [8], 3), input_shape=(4,))
    >>> view = ba.as_gaussian(guides.mean_field(model, init_scale=0.01))
    >>> view.kind, view.sites
    ('diagonal', ['0.weight', '0.bias', '2.weight', '2.bias'])
    >>> torch.allclose(view.scale["0.bias"], torch.full((8,), 0.01))
    True
    >>> point = ba.as_gaussian(model.net.state_dict())      # a point estimate
    >>> point.kind, float(point.scale["0.weight"].abs().max())
    ('point', 0.0)
    >>> ba.as_gaussian([1, 2])
    Traceback (most recent call last):
        ...
    TypeError: expected a posterior (AutoNormal, AutoDiagonalNormal, ...), got list
    """
    if isinstance(posterior, GaussianView):
        return posterior
    return adapter_for(posterior).view(posterior, copy=copy)


def posterior_device(named: Mapping[str, Any]) -> torch.device | None:
    """The one device of the named posteriors and of the models the guides among them are
    over (see :func:`bnn_align._checks.device_of`; None if none holds a tensor).

    Raises
    ------
    ValueError
        Naming the first two that are on different devices, and both devices.
    """
    named_with_models = {}
    for label, obj in named.items():
        named_with_models[label] = obj
        if isinstance(obj, autoguide.AutoGuide):
            named_with_models[f"{label}'s model"] = model_of(obj)
    return same_device(named_with_models)


FINITE_PARTS = ("mean", "scale", "covariance factor")  # what may hold NaN or infinite values


def paired_views(a: Any, b: Any, labels: tuple[str, str] = ("a", "b"), *,
                 copy: bool = True, finite: tuple[str, ...] = FINITE_PARTS
                 ) -> tuple[GaussianView, GaussianView]:
    """Views of two posteriors over the same sites, checked to be comparable.

    A state dict also holds buffers, so next to a guide it is read on the guide's sites.
    ``finite`` names the parts checked for NaN and infinite values (see :func:`check_finite`):
    a caller that passes over every value anyway may check less here.

    Raises
    ------
    ValueError
        Naming both devices when the posteriors (or their models) are on different devices
        (checked first, before any computation); naming the first site missing on one side or
        whose shapes differ ("different architectures"), or the first site with NaN or
        infinite parameters.
    """
    posterior_device({labels[0]: a, labels[1]: b})
    va, vb = as_gaussian(a, copy=copy), as_gaussian(b, copy=copy)
    if isinstance(a, Mapping) and not isinstance(b, Mapping):
        va = _restrict(va, vb.sites, labels[0])
    if isinstance(b, Mapping) and not isinstance(a, Mapping):
        vb = _restrict(vb, va.sites, labels[1])
    for site in va.sites:
        if site not in vb.loc:
            raise ValueError(f"site {site!r} of {labels[0]} is missing from {labels[1]}: the "
                             f"posteriors are over different architectures")
        if va.loc[site].shape != vb.loc[site].shape:
            raise ValueError(
                f"site {site!r} has shape {tuple(va.loc[site].shape)} in {labels[0]} but "
                f"{tuple(vb.loc[site].shape)} in {labels[1]}: the posteriors are over different "
                f"architectures")
    extra = [s for s in vb.sites if s not in va.loc]
    if extra:
        raise ValueError(f"site {extra[0]!r} of {labels[1]} is missing from {labels[0]}: the "
                         f"posteriors are over different architectures")
    check_finite(va, vb, labels, finite)
    return va, vb


def check_finite(va: GaussianView, vb: GaussianView, labels: tuple[str, str] = ("a", "b"),
                 parts: tuple[str, ...] = FINITE_PARTS) -> None:
    """Raise a ValueError naming the first site with NaN or infinite values in one of
    ``parts`` (of :data:`FINITE_PARTS`) of either view."""
    for label, view in zip(labels, (va, vb)):
        for part, tensors in (("mean", view.loc), ("scale", view.scale),
                              ("covariance factor", view.factor or {})):
            if part not in parts:
                continue
            for site, t in tensors.items():
                # a sum is much cheaper than an elementwise test and is finite when all terms
                # are (barring overflow, which the exact test then rules out)
                if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
                    raise ValueError(f"{label} has NaN or infinite values in the {part} of site "
                                     f"{site!r}")


def _restrict(view: GaussianView, sites: list[str], label: str) -> GaussianView:
    missing = [s for s in sites if s not in view.loc]
    if missing:
        raise ValueError(f"site {missing[0]!r} is missing from {label}: the posteriors are over "
                         f"different architectures")
    return GaussianView(view.kind, {s: view.loc[s] for s in sites},
                        {s: view.scale[s] for s in sites}, None, view._source)


def from_gaussian(template: Any, view: GaussianView, model: Any = None) -> Any:
    """A new posterior of ``template``'s kind holding the values of ``view``.

    The view must be of a family the template can hold (a diagonal guide takes diagonal or point
    views, a low-rank guide low-rank views of its rank, ...). ``model`` replaces the guide's model.
    """
    return adapter_for(template).from_view(template, view, model)


def rank_of(posterior: Any) -> int:
    """The number of covariance-factor columns of a guide (0 for point and diagonal ones)."""
    if isinstance(posterior, autoguide.AutoLowRankMultivariateNormal):
        return posterior.cov_factor.shape[1]
    if isinstance(posterior, autoguide.AutoMultivariateNormal):
        return posterior.loc.shape[0]
    return 0


def shared_family(q0: Any, q1: Any, labels: tuple[str, str] = ("q0", "q1"),
            user: str = "curves", why: str = "the endpoints of a curve",
            because: str = "its bends are of that family") -> str:
    """The family both posteriors share (point, diagonal or low-rank of one rank); else a
    ValueError naming them by ``labels``, saying that ``user`` (e.g. ``"curves"``) needs it
    for ``why`` and ``because``."""
    kinds = []
    for label, q in zip(labels, (q0, q1)):
        kind = adapter_for(q).kind
        if kind == FULL_RANK:
            raise ValueError(f"{label} is a full-rank posterior ({type(q).__name__}): {user} "
                             f"support point, diagonal and low-rank posteriors")
        kinds.append(kind)
    if kinds[0] != kinds[1]:
        raise ValueError(
            f"{why} must be of one family ({because}): {labels[0]} is a {kinds[0]} posterior "
            f"({type(q0).__name__}), {labels[1]} a {kinds[1]} one ({type(q1).__name__})")
    if kinds[0] == LOW_RANK and rank_of(q0) != rank_of(q1):
        raise ValueError(f"low-rank {why.removeprefix('the ')} must have one rank: {labels[0]} "
                         f"has rank {rank_of(q0)}, {labels[1]} rank {rank_of(q1)}")
    return kinds[0]
