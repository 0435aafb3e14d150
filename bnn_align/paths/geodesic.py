"""The geodesic path between canonical posteriors (Pittorino et al., ICML 2022).

Once the scale symmetry is removed (:func:`~bnn_align.canonicalize`), every scalable unit's
incoming vector (its weight row and bias, or a normalisation layer's affine parameters) lies on
the unit sphere, and the parameters of those units on a product of spheres. :class:`GeodesicPath`
moves each such vector along the great circle between its two ends (spherical linear
interpolation, *slerp*), and every other tensor linearly:

* means: each scalable unit's incoming mean vector ``u_t = r_t slerp(u_0 / r_0, u_1 / r_1, t)``
  with the radius ``r_t = (1 - t) r_0 + t r_1`` (``r = 1`` for canonical endpoints, so the path
  stays on the spheres); the other means linearly;
* standard deviations and covariance factors move linearly, as on the Wasserstein path
  (:func:`~bnn_align.interpolate`), and draws share their standard-normal noise at every ``t``:
  ``theta_t = mu_t + sigma_t * eps + W_t z``. The draws themselves are therefore not on the
  spheres; only their means are.

Endpoints that are not canonical are allowed (the radii then move linearly), but only canonical
ones make the path the geodesic of the quotient space.
"""

from __future__ import annotations

from typing import Any

import torch

from ..posterior import GaussianView
from ..symmetry.permutation import spec_for
from ..symmetry.scale import from_unit_rows, unit_rows
from ..symmetry.spec import PermutationSpec
from .interpolation import BasePath, _check_t, lerp_views

__all__ = ["GeodesicPath", "slerp"]


def slerp(u0: torch.Tensor, u1: torch.Tensor, t: float) -> torch.Tensor:
    """Row-wise spherical interpolation with linearly interpolated radius.

    Parameters
    ----------
    u0, u1 : Tensor of shape ``(n, d)``
        The ends, one vector per row.
    t : float
        In ``[0, 1]``.

    Returns
    -------
    Tensor of shape ``(n, d)``
        Row ``i`` has norm ``(1 - t) |u0_i| + t |u1_i|`` and its direction on the great circle
        from ``u0_i`` to ``u1_i``; where the ends point the same way (or one is zero) the
        direction of the linear interpolation is used. Antipodal ends (no unique great circle)
        follow the linear interpolation too.
    """
    r0, r1 = u0.norm(dim=1, keepdim=True), u1.norm(dim=1, keepdim=True)
    d0 = u0 / torch.where(r0 > 0, r0, 1.0)
    d1 = u1 / torch.where(r1 > 0, r1, 1.0)
    cos = (d0 * d1).sum(1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    great = sin > 1e-6
    safe = torch.where(great, sin, 1.0)
    on_circle = (torch.sin((1 - t) * omega) * d0 + torch.sin(t * omega) * d1) / safe
    line = torch.lerp(u0, u1, t)
    line_dir = line / torch.where(line.norm(dim=1, keepdim=True) > 0,
                                  line.norm(dim=1, keepdim=True), 1.0)
    direction = torch.where(great & (r0 > 0) & (r1 > 0), on_circle, line_dir)
    return torch.lerp(r0, r1, t) * direction


class GeodesicPath(BasePath):
    """The path whose scalable units' incoming mean vectors move along great circles.

    Build it with ``interpolate(q0, q1, kind="geodesic")`` (see the module docstring for what
    moves how). Attributes as :class:`~bnn_align.paths.BasePath`, plus ``spec``: the spec whose
    ``scalable`` groups are slerped (restricted to the posteriors' sites).

    Examples
    --------
    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import models
    >>> _ = torch.manual_seed(0)
    >>> net_a, net_b = models.mlp(4, [8], 3), models.mlp(4, [8], 3)
    >>> spec = ba.spec_from_module(net_a, torch.zeros(1, 4))
    >>> a = ba.canonicalize(net_a.state_dict(), spec)
    >>> b = ba.canonicalize(net_b.state_dict(), spec)
    >>> path = ba.interpolate(a, b, kind="geodesic", spec=spec)
    >>> middle = path.view_at(0.5).loc
    >>> rows = torch.cat([middle["0.weight"], middle["0.bias"][:, None]], 1)
    >>> torch.allclose(rows.norm(dim=1), torch.ones(8))       # still on the unit spheres
    True
    >>> torch.allclose(middle["2.bias"], (a["2.bias"] + b["2.bias"]) / 2)  # not scalable
    True
    """

    kind = "geodesic"

    def __init__(self, q0: Any, q1: Any, spec: PermutationSpec | None = None):
        super().__init__(q0, q1)
        if spec is None and self.model is not None:
            spec = self.model.spec
        self.spec = spec_for(q0, spec).restrict(self.view0.sites)

    def view_at(self, t: float) -> GaussianView:
        """The Gaussian ``q_t``: slerped incoming mean vectors, everything else linear."""
        t = _check_t(t)
        view = lerp_views(self.view0, self.view1, t, self.kind_of_view())
        loc = dict(view.loc)
        for sym in self.spec.scalable.values():
            rows = slerp(unit_rows(self.view0.loc, sym.incoming, self.spec.block),
                         unit_rows(self.view1.loc, sym.incoming, self.spec.block), t)
            loc.update(from_unit_rows(rows, self.view0.loc, sym.incoming, self.spec.block))
        return GaussianView(view.kind, loc, view.scale, view.factor)
