"""Paths between two posteriors: the Wasserstein geodesic and the mixture.

:func:`interpolate` returns a :class:`Path`; ``path.at(t)`` is a posterior of the endpoints' kind
(a Pyro guide usable everywhere a guide is), and ``path.sample(ts, n)`` draws weights for many
``t`` at once.

* ``"wasserstein"``: ``theta_t = (1 - t) theta_0 + t theta_1`` for the coupling that shares the
  standard-normal noise, ``theta = loc + scale * eps + factor @ z``. Means, diagonal scales and
  covariance factors move linearly (standard deviations, not variances). For diagonal Gaussians
  this is exactly the 2-Wasserstein geodesic; with covariance factors it is the displacement
  interpolation of the coupling :func:`bnn_align.match` optimises, after the Procrustes rotation
  that best aligns the two factors, and equals the geodesic when that coupling is optimal.
* ``"mixture"``: ``(1 - t) q_0 + t q_1``, whose loss barrier is never positive (the log of a
  mixture is concave in the mixing weight): the baseline that weight-space paths are compared
  with.

Common random numbers: a path draws one set of standard-normal numbers and reuses it at every
``t``, so differences along the path are not drowned in Monte-Carlo noise.

:class:`BasePath` is what every path provides (the learned curves of :mod:`bnn_align.paths.curves`
too): :func:`~bnn_align.marginal_loss` and the rest use only that.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from pyro.infer import autoguide

from .._checks import positive_int
from ..bayesian import BayesianNetwork
from ..posterior import (DIAGONAL, FULL_RANK, LOW_RANK, POINT, GaussianView, from_gaussian,
                         model_of, paired_views, rank_of)

__all__ = ["interpolate", "BasePath", "Path", "Noise", "Mixture", "KINDS"]

KINDS = ("wasserstein", "mixture")


@dataclass(frozen=True)
class Noise:
    """Standard-normal draws shared by every point of a path.

    Attributes
    ----------
    eps : Tensor of shape ``(S, D)``
        Per-weight noise.
    z : Tensor of shape ``(S, rank)`` or None
        Noise of the covariance factor.
    u : Tensor of shape ``(S,)``
        Uniform draws that pick a mixture component (unused by the Wasserstein path).
    index : LongTensor of shape ``(S,)`` or None
        Which samples a path between sample sets takes (``eps`` then has no columns).
    """

    eps: torch.Tensor
    z: torch.Tensor | None
    u: torch.Tensor
    index: torch.Tensor | None = None

    @property
    def num_samples(self) -> int:
        return len(self.eps)


class Mixture:
    """The posterior ``(1 - t) q_0 + t q_1`` of a mixture path (sampling only)."""

    def __init__(self, path: "Path", t: float):
        self.path, self.t = path, t

    def sample(self, num_samples: int, generator: torch.Generator | None = None
               ) -> dict[str, torch.Tensor]:
        return self.path.draw(self.t, self.path.noise(num_samples, generator))

    def __repr__(self) -> str:
        return f"Mixture(t={self.t:g}, q0={type(self.path.q0).__name__}, " \
               f"q1={type(self.path.q1).__name__})"


def _check_t(t: float) -> float:
    t = float(t)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must lie in [0, 1], got {t}")
    return t


def _procrustes(w0: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """Orthogonal ``R`` maximising ``<W_0, W_1 R>`` (``U V^T`` from the SVD of ``W_1^T W_0``)."""
    u, _, vh = torch.linalg.svd(w1.double().T @ w0.double())
    return (u @ vh).to(w1.dtype)


class BasePath:
    """A path ``t -> q_t`` between two posteriors over the same network: what
    :func:`~bnn_align.marginal_loss`, :func:`~bnn_align.to_inference_data` and the plots use.

    A path draws weights at ``t`` from standard-normal noise shared by every ``t`` (common
    random numbers) and says which buffers (BatchNorm statistics) go with them. Subclasses
    (:class:`Path`, :class:`~bnn_align.paths.curves.Curve`) implement :meth:`view_at`, and may
    override :meth:`draw`, :meth:`buffers_at` and :meth:`at`.

    Attributes
    ----------
    q0, q1 : posterior
        The endpoints as given.
    kind : str
        The path's kind (``"wasserstein"``, ``"mixture"``, ``"bezier"``, ...).
    view0, view1 : GaussianView
        The endpoints' views, factors rank-padded and the second one's rotated onto the first's.
    models : tuple
        The endpoints' BayesianNetworks (None where not known).
    device : torch.device
        The endpoints' device, where every posterior and draw of the path is made.
    """

    kind: str = ""

    def __init__(self, q0: Any, q1: Any):
        self.q0, self.q1 = q0, q1
        v0, v1 = paired_views(q0, q1, ("q0", "q1"))
        self.view0, self.view1 = _align_factors(v0, v1)
        self.models = (_model(q0), _model(q1))
        # buffers (BatchNorm statistics) that travel with each endpoint outside its sample
        # sites: a guide's model's, a module's or a state dict's own (snapshots)
        self._buffers = (_buffers_of(q0, self.view0), _buffers_of(q1, self.view1))

    # -- the distribution at t -------------------------------------------------------------------
    @property
    def model(self) -> BayesianNetwork | None:
        return self.models[0] or self.models[1]

    @property
    def device(self) -> torch.device | None:
        return self.view0.device

    def view_at(self, t: float) -> GaussianView:
        """The Gaussian ``q_t``."""
        raise NotImplementedError

    def kind_of_view(self) -> str:
        kinds = {self.view0.kind, self.view1.kind}
        if kinds == {POINT}:
            return POINT
        if self.view0.factor is None:
            return DIAGONAL
        return FULL_RANK if kinds == {FULL_RANK} else LOW_RANK

    def at(self, t: float) -> Any:
        """The posterior at ``t``: a new guide (or state dict) of the endpoints' kind; the
        endpoints themselves at ``t = 0`` and ``1``."""
        t = _check_t(t)
        if t == 0.0:
            return self.q0
        if t == 1.0:
            return self.q1
        return self._posterior_at(t)

    def _posterior_at(self, t: float) -> Any:
        view = self.view_at(t)
        model = self._model_at(t)
        for template in (self.q0, self.q1):
            try:
                if self.view0.rank and view.rank != rank_of(template):
                    continue
                if isinstance(template, autoguide.AutoGuide):
                    return from_gaussian(template, view, model)
                return _with_buffers(from_gaussian(template, view), self.buffers_at(t))
            except ValueError:
                continue
        raise ValueError(
            f"neither a {type(self.q0).__name__} nor a {type(self.q1).__name__} can hold the "
            f"{view.kind} posterior between them; use path.view_at(t) or path.sample")

    def buffers_at(self, t: float) -> dict[str, torch.Tensor] | None:
        """The endpoints' buffers (BatchNorm statistics) at ``t``: floating-point buffers move
        linearly, like the means; None when neither endpoint carries buffers of its own.

        A guide's buffers are those of its model's network (a permuted guide has a permuted
        copy); a module's or state dict's are its own. Buffers of state dicts and modules that
        are compared with each other are also sample sites of the views, and move there."""
        return lerp_buffers(*self._buffers, _check_t(t))

    def _model_at(self, t: float) -> BayesianNetwork | None:
        """The model for a guide at ``t``: the endpoints' own when their buffers agree, else a
        copy of it holding the interpolated buffers."""
        model = self.model
        b0, b1 = self._buffers
        if model is None or b0 is None or b1 is None or _same(b0, b1):
            return None  # the guide keeps its template's model
        return model.with_net(_with_buffers(copy.deepcopy(model.net), self.buffers_at(t)))

    # -- sampling ----------------------------------------------------------------------------------
    def noise(self, num_samples: int, generator: torch.Generator | None = None) -> Noise:
        """Standard-normal (and uniform) draws for ``num_samples`` weights, on the path's
        device; a ``generator`` draws on its own device (see
        :meth:`~bnn_align.posterior.GaussianView.standard_normal`)."""
        positive_int(num_samples=num_samples)
        eps, z = self.view0.standard_normal(num_samples, generator)
        source = eps.device if generator is None else generator.device
        u = torch.rand(num_samples, generator=generator, device=source).to(eps.device)
        return Noise(eps, z, u)

    def view0_draw(self, noise: Noise) -> dict[str, torch.Tensor]:
        """Weights of ``q_0`` for given noise."""
        return self.view0.transform((noise.eps, noise.z))

    def view1_draw(self, noise: Noise) -> dict[str, torch.Tensor]:
        """Weights of ``q_1`` for given noise."""
        return self.view1.transform((noise.eps, noise.z))

    def draw(self, t: float, noise: Noise) -> dict[str, torch.Tensor]:
        """Weights of ``q_t`` for given noise: site -> ``(S, *site_shape)``."""
        return self.view_at(t).transform((noise.eps, noise.z))

    def sample(self, ts: Sequence[float] | np.ndarray | torch.Tensor, num_samples: int,
               generator: torch.Generator | None = None, *, common: bool = True
               ) -> dict[str, torch.Tensor]:
        """Weights at several ``t``: site -> tensor ``(len(ts), num_samples, *site_shape)``.

        With ``common=True`` (the default) the same noise is used at every ``t``.
        """
        ts = [_check_t(t) for t in np.asarray(ts, dtype=float).reshape(-1)]
        if not ts:
            raise ValueError("ts is empty: give at least one t in [0, 1]")
        shared = self.noise(num_samples, generator) if common else None
        draws = [self.draw(t, shared if common else self.noise(num_samples, generator))
                 for t in ts]
        return {s: torch.stack([d[s] for d in draws]) for s in draws[0]}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(kind={self.kind!r}, q0={type(self.q0).__name__}, "
                f"q1={type(self.q1).__name__}, sites={len(self.view0.sites)})")


class Path(BasePath):
    """The Wasserstein or mixture path between two posteriors over the same network.

    Build it with :func:`interpolate`. Attributes as :class:`BasePath`; ``model`` is the
    BayesianNetwork of the endpoints if known.

    Examples
    --------
    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import guides, models
    >>> _ = torch.manual_seed(0)
    >>> guide_a = guides.mean_field(ba.BayesianNetwork(models.mlp(4, [8], 3), input_shape=(4,)))
    >>> guide_b = guides.mean_field(ba.BayesianNetwork(models.mlp(4, [8], 3), input_shape=(4,)))
    >>> path = ba.interpolate(guide_a, guide_b)
    >>> path
    Path(kind='wasserstein', q0=AutoNormal, q1=AutoNormal, sites=4)
    >>> view = path.view_at(0.25)                  # every part moves linearly
    >>> means = [ba.as_gaussian(q).loc["0.bias"] for q in (guide_a, guide_b)]
    >>> torch.allclose(view.loc["0.bias"], 0.75 * means[0] + 0.25 * means[1])
    True
    >>> draws = path.sample([0.0, 0.5, 1.0], 4, torch.Generator().manual_seed(0))
    >>> draws["0.weight"].shape                    # (len(ts), num_samples, *site_shape)
    torch.Size([3, 4, 8, 4])
    >>> path.buffers_at(0.5) is None               # no BatchNorm statistics to carry
    True
    """

    def __init__(self, q0: Any, q1: Any, kind: str):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        super().__init__(q0, q1)

    def view_at(self, t: float) -> GaussianView:
        """The Gaussian ``q_t`` of the Wasserstein path (linear in every part)."""
        t = _check_t(t)
        if self.kind != "wasserstein":
            raise ValueError("a mixture is not Gaussian: use path.at(t).sample or path.draw")
        return lerp_views(self.view0, self.view1, t, self.kind_of_view())

    def at(self, t: float) -> Any:
        """The posterior at ``t``: a new guide (or state dict) of the endpoints' kind, or a
        :class:`Mixture` for the mixture path."""
        if self.kind == "mixture":
            return Mixture(self, _check_t(t))
        return super().at(t)

    def draw(self, t: float, noise: Noise) -> dict[str, torch.Tensor]:
        """Weights of ``q_t`` for given noise: site -> ``(S, *site_shape)``."""
        t = _check_t(t)
        if self.kind == "wasserstein":
            return self.view_at(t).transform((noise.eps, noise.z))
        first, second = self.view0_draw(noise), self.view1_draw(noise)
        pick = noise.u < t  # component 1 with probability t
        return {s: torch.where(pick.view(-1, *([1] * (v.dim() - 1))), second[s], v)
                for s, v in first.items()}


def _model(q: Any) -> BayesianNetwork | None:
    if isinstance(q, autoguide.AutoGuide):
        m = model_of(q)
        return m if isinstance(m, BayesianNetwork) else None
    return None


def _buffers_of(q: Any, view: GaussianView) -> dict[str, torch.Tensor] | None:
    """Copies of the buffers a posterior carries besides its view's sites, or None."""
    if isinstance(q, autoguide.AutoGuide):
        model = _model(q)
        buffers = dict(model.net.named_buffers()) if model is not None else {}
    elif isinstance(q, torch.nn.Module):
        buffers = dict(q.named_buffers())
    elif isinstance(q, Mapping):
        buffers = {k: v for k, v in q.items() if isinstance(v, torch.Tensor)}
    else:
        buffers = {}
    buffers = {k: v.detach().clone() for k, v in buffers.items() if k not in view.loc}
    return buffers or None


def _same(b0: Mapping[str, torch.Tensor], b1: Mapping[str, torch.Tensor]) -> bool:
    return b0.keys() == b1.keys() and all(torch.equal(v, b1[k]) for k, v in b0.items())


def _with_buffers(obj: Any, buffers: Mapping[str, torch.Tensor] | None) -> Any:
    """A state dict or module (a new one of ours, updated in place) holding ``buffers``."""
    if not buffers:
        return obj
    if isinstance(obj, torch.nn.Module):
        with torch.no_grad():
            for name, value in buffers.items():
                obj.get_buffer(name).copy_(value)
        return obj
    obj.update({k: v.clone() for k, v in buffers.items() if k in obj})
    return obj


def lerp_views(v0: GaussianView, v1: GaussianView, t: float, kind: str) -> GaussianView:
    """The Gaussian at ``t`` of the Wasserstein path between two views of one rank: means,
    scales and factors ``(1 - t) v0 + t v1`` (differentiable in both), of the given ``kind``."""

    def lerp(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]
             ) -> dict[str, torch.Tensor]:
        return {s: torch.lerp(x, second[s], t) for s, x in first.items()}

    return GaussianView(kind, lerp(v0.loc, v1.loc), lerp(v0.scale, v1.scale),
                        None if v0.factor is None else lerp(v0.factor, v1.factor))


def lerp_buffers(b0: Mapping[str, torch.Tensor] | None, b1: Mapping[str, torch.Tensor] | None,
                 t: float) -> dict[str, torch.Tensor] | None:
    """Buffers at ``t`` between two endpoints' (either may be None: the other's are used):
    floating-point buffers move linearly, others are ``b0``'s before ``t = 1``."""
    if b0 is None or b1 is None:
        return b0 if b1 is None else b1
    return {k: torch.lerp(v, b1[k], t) if v.is_floating_point() and k in b1
            else (v if t < 1.0 else b1.get(k, v)) for k, v in b0.items()}


def factor_rotation(f0: Mapping[str, torch.Tensor], f1: Mapping[str, torch.Tensor]
                    ) -> torch.Tensor:
    """The orthogonal ``R`` (``rank x rank``) that best rotates the covariance factor ``f1``
    (site -> ``site_shape + (rank,)``) onto ``f0`` of the same rank (Procrustes)."""
    rank = next(iter(f0.values())).shape[-1]
    flat0 = torch.cat([f.reshape(-1, rank) for f in f0.values()])
    flat1 = torch.cat([f.reshape(-1, rank) for f in f1.values()])
    return _procrustes(flat0, flat1)


def _align_factors(v0: GaussianView, v1: GaussianView) -> tuple[GaussianView, GaussianView]:
    """Give both views factors of one rank (zeros where missing) and rotate the second's columns
    onto the first's (Procrustes), so that linear interpolation pairs matching columns."""
    if v0.factor is None and v1.factor is None:
        return v0, v1
    rank = max(v0.rank, v1.rank)

    def padded(v: GaussianView) -> dict[str, torch.Tensor]:
        if v.factor is None:
            return {s: x.new_zeros(*x.shape, rank) for s, x in v.loc.items()}
        extra = rank - v.rank
        return {s: torch.cat([f, f.new_zeros(*f.shape[:-1], extra)], -1) if extra else f
                for s, f in v.factor.items()}

    f0, f1 = padded(v0), padded(v1)
    if v0.factor is not None and v1.factor is not None:
        rotation = factor_rotation(f0, f1)
        f1 = {s: f @ rotation for s, f in f1.items()}
    kind0 = v0.kind if v0.factor is not None else v1.kind
    kind1 = v1.kind if v1.factor is not None else v0.kind
    return (GaussianView(kind0, v0.loc, v0.scale, f0, v0._source),
            GaussianView(kind1, v1.loc, v1.scale, f1, v1._source))


def interpolate(q0: Any, q1: Any, kind: str = "wasserstein", *,
                spec: Any = None) -> BasePath:
    """The path from posterior ``q0`` to posterior ``q1``.

    Parameters
    ----------
    q0, q1 : posterior
        Guides, state dicts or modules over the same network (e.g. ``guide_a`` and
        ``match(guide_a, guide_b).aligned``), on one device (any; the path is computed
        there). Not modified. Two :class:`~bnn_align.SamplePosterior` of one size give a
        :class:`~bnn_align.paths.samples.SamplePath`: their samples coupled optimally (exact
        assignment), each pair moving linearly.
    kind : {"wasserstein", "mixture", "geodesic"}
        See the module docstring; ``"geodesic"`` slerps every scalable unit's incoming mean
        vector (for canonical endpoints, see :func:`~bnn_align.canonicalize` and
        :mod:`bnn_align.paths.geodesic`). Sample sets take ``"wasserstein"`` or ``"mixture"``.
    spec : PermutationSpec, optional
        ``"geodesic"`` only: whose ``scalable`` groups to slerp (default: the spec of the
        endpoints' BayesianNetwork).

    Returns
    -------
    Path, a GeodesicPath for ``"geodesic"``, or a SamplePath for sample sets

    Raises
    ------
    ValueError
        For posteriors on different devices (naming both), over different architectures
        (naming the first differing site), NaN parameters, or an unknown kind; sample sets
        of different sizes.
    TypeError
        A sample set and a posterior of another kind.

    Examples
    --------
    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import guides, models
    >>> _ = torch.manual_seed(0)
    >>> guide_a = guides.mean_field(ba.BayesianNetwork(models.mlp(4, [8], 3), input_shape=(4,)))
    >>> guide_b = guides.mean_field(ba.BayesianNetwork(models.mlp(4, [8], 3), input_shape=(4,)))
    >>> path = ba.interpolate(guide_a, guide_b)
    >>> middle = path.at(0.5)                      # a new guide of the endpoints' kind
    >>> type(middle).__name__
    'AutoNormal'
    >>> means = [ba.as_gaussian(q).loc["0.weight"] for q in (guide_a, guide_b, middle)]
    >>> torch.allclose(means[2], (means[0] + means[1]) / 2)
    True
    >>> path.at(0.0) is guide_a
    True
    >>> ba.interpolate(guide_a, guide_b, kind="mixture").at(0.3)
    Mixture(t=0.3, q0=AutoNormal, q1=AutoNormal)
    >>> ba.interpolate(guide_a, guide_b, kind="straight")
    Traceback (most recent call last):
        ...
    ValueError: kind must be one of ('wasserstein', 'mixture', 'geodesic'), got 'straight'
    """
    from ..samples import SamplePosterior

    if isinstance(q0, SamplePosterior) or isinstance(q1, SamplePosterior):
        from .samples import SamplePath  # it builds on this module

        return SamplePath(q0, q1, kind)
    if kind == "geodesic":
        from .geodesic import GeodesicPath  # it builds on this module

        return GeodesicPath(q0, q1, spec)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {(*KINDS, 'geodesic')}, got {kind!r}")
    return Path(q0, q1, kind)
