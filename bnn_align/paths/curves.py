"""Learned curves between two posteriors: Bezier curves and polygonal chains whose every point
is a posterior.

:func:`fit_curve` returns a :class:`Curve`, a path like the one :func:`~bnn_align.interpolate`
returns (both are :class:`~bnn_align.paths.BasePath`): ``curve.at(t)`` is a guide of the
endpoints' kind, ``curve.view_at(t)`` its Gaussian view, ``curve.sample(ts, n)`` draws with
common random numbers, and :func:`~bnn_align.marginal_loss` evaluates it unchanged.

A curve has the control points ``P_0, P_1, ..., P_K, P_{K+1}``: the two fixed endpoints and ``K``
trainable *bends* between them, and its point at ``t`` is ``sum_i c_i(t) P_i``:

* ``"bezier"``: ``c_i`` are the Bernstein polynomials of degree ``K + 1`` (one bend gives the
  quadratic Bezier curve of Garipov et al., 2018);
* ``"polychain"``: the polygonal chain through the control points, ``P_i`` at ``t = i / (K + 1)``.

For point estimates (state dicts, modules, ``AutoDelta``) the control points are weight vectors:
Garipov's curve. For Gaussian endpoints (diagonal: ``AutoNormal``, ``AutoDiagonalNormal``;
low-rank: ``AutoLowRankMultivariateNormal``) every bend is a Gaussian of the same family (mean,
diagonal scale, covariance factor) and ``q_t`` is the law of
``sum_i c_i(t) (mu_i + s_i * eps + W_i z)`` under the coupling that shares the noise: means,
scales and factors combine with the same weights, so ``q_t`` is a Gaussian of the family (the
weights are non-negative, so scales stay positive). The coefficients are exactly ``(1, 0, ...)``
at ``t = 0`` and ``(..., 0, 1)`` at ``t = 1``: the curve's ends are its endpoints.

The bends start on the line between the endpoints, equally spaced, where the curve is the
Wasserstein path of :func:`~bnn_align.interpolate` (Bernstein polynomials and polygonal chains
reproduce straight lines). Training minimises ``E_{t ~ U[0, 1]} [-ELBO(q_t)]`` with one ``t``
per minibatch: for point estimates the negative log joint (the MAP objective :func:`~bnn_align.fit`
gives an ``AutoDelta``), for Gaussians the reparameterised expected NLL plus the KL to the
model's prior (see :func:`bnn_align._elbo.negative_elbo`).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections import OrderedDict
from pathlib import Path as FilePath
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from pyro.infer import autoguide
from torch.func import functional_call, replace_all_batch_norm_modules_
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from .. import guides
from .._checks import check_int, load_saved, positive_int
from .._elbo import forward_draws, minimise_along_path, negative_elbo, prior_terms
from ..bayesian import BayesianNetwork, as_data_pair
from ..marginal import _check_inputs, _check_sites, marginal_loss
from .interpolation import BasePath, _check_t, _with_buffers
from ..posterior import FULL_RANK, LOW_RANK, POINT, GaussianView, adapter_for, shared_family

__all__ = ["fit_curve", "Curve", "KINDS"]

KINDS = ("bezier", "polychain")
_FORMAT = "bnn_align.Curve/1"
# guide classes a saved curve's endpoints are rebuilt as (over the model given to load)
_GUIDE_BUILDERS = {
    "AutoNormal": lambda model, raw: guides.mean_field(model),
    "AutoDiagonalNormal": lambda model, raw: guides.diagonal(model),
    "AutoLowRankMultivariateNormal": lambda model, raw: guides.low_rank(
        model, rank=next(iter(raw["cov_factor"].values())).shape[-1]),
    "AutoDelta": lambda model, raw: guides.delta(model),
}


def _inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


def _batchnorms(net: torch.nn.Module) -> list[tuple[str, _BatchNorm]]:
    """BatchNorm layers that keep running statistics."""
    return [(name, m) for name, m in net.named_modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats]


class Curve(BasePath):
    """A curve ``t -> q_t`` between two posteriors, with trainable bends.

    Build it with :func:`fit_curve` (``epochs=0`` gives the untrained curve, equal to the
    Wasserstein path). Attributes as :class:`~bnn_align.paths.BasePath`, and

    Attributes
    ----------
    kind : {"bezier", "polychain"}
    num_bends : int
    model : BayesianNetwork
        The model the curve was trained with.
    recompute_bn : bool
        Whether BatchNorm statistics are recomputed on the training inputs at every evaluated
        ``t`` (only networks with BatchNorm layers are affected).
    history : ndarray of shape (epochs,)
        Mean training objective per epoch (full-data scale).
    seconds : float
        Wall time of :func:`fit_curve`.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import guides, models
    >>> _ = torch.manual_seed(0)
    >>> model = ba.BayesianNetwork(models.mlp(4, [8], 3), input_shape=(4,))
    >>> guide_a = guides.mean_field(model)
    >>> guide_b = guides.mean_field(ba.BayesianNetwork(models.mlp(4, [8], 3), input_shape=(4,)))
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> curve = ba.fit_curve(model, guide_a, guide_b, (x, y), bends=2, epochs=1, progress=False)
    >>> curve
    Curve(kind='bezier', bends=2, family='diagonal', q0=AutoNormal, ..., epochs=1)
    >>> curve.coefficients(0.5)                    # Bernstein polynomials of degree 3
    [0.125, 0.375, 0.375, 0.125]
    >>> len(curve.bends), curve.bends[0].kind
    (2, 'diagonal')
    >>> folder = tempfile.TemporaryDirectory()
    >>> curve.save(Path(folder.name) / "curve.pt")
    >>> loaded = ba.Curve.load(Path(folder.name) / "curve.pt", model=model)
    >>> torch.equal(loaded.view_at(0.3).loc["0.weight"], curve.view_at(0.3).loc["0.weight"])
    True
    >>> folder.cleanup()
    """

    def __init__(self, model: BayesianNetwork, q0: Any, q1: Any, *, kind: str = "bezier",
                 bends: int = 1, recompute_bn: bool = True,
                 bn_inputs: torch.Tensor | None = None, bn_batch_size: int = 128,
                 seed: int = 0):
        if not isinstance(model, BayesianNetwork):
            raise TypeError(f"model must be a BayesianNetwork, got {type(model).__name__}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.num_bends = check_int("bends", bends)
        self.family = shared_family(q0, q1)
        self.kind = kind
        super().__init__(q0, q1)
        _check_sites(model, self)
        self._model = model
        self.recompute_bn = bool(recompute_bn)
        self._bn_inputs = bn_inputs if _batchnorms(model.net) else None
        self._bn_batch_size, self.seed = bn_batch_size, seed
        self._statistics: dict[float, dict[str, torch.Tensor]] = {}
        self._statistics_net: torch.nn.Module | None = None
        self.history = np.zeros(0)
        self.seconds = 0.0
        ends = (self.view0.flat(), self.view1.flat())
        self._ends = {part: (ends[0][i], ends[1][i]) for i, part in
                      enumerate(("loc", "scale", "factor"))}
        # bends on the line, equally spaced: the untrained curve is the Wasserstein path
        where = torch.arange(1, self.num_bends + 1, dtype=torch.float64) / (self.num_bends + 1)

        def on_line(part: str) -> torch.Tensor | None:
            a, b = self._ends[part]
            if a is None:
                return None
            weight = where.to(a.dtype).view(-1, *([1] * a.dim()))
            return torch.lerp(a.unsqueeze(0), b.unsqueeze(0), weight).contiguous()

        self._bend_loc = on_line("loc")
        scale = on_line("scale") if self.family != POINT else None
        self._bend_scale = None if scale is None else _inverse_softplus(scale)
        self._bend_factor = on_line("factor")

    # -- the curve -------------------------------------------------------------------------------
    @property
    def model(self) -> BayesianNetwork:
        return self._model

    def coefficients(self, t: float) -> list[float]:
        """The weights ``c_0(t), ..., c_{K+1}(t)`` of the control points (non-negative, sum 1)."""
        t = _check_t(t)
        n = self.num_bends + 1
        if self.kind == "bezier":
            return [math.comb(n, i) * t ** i * (1.0 - t) ** (n - i) for i in range(n + 1)]
        position = t * n
        segment = min(int(position), n - 1)
        out = [0.0] * (n + 1)
        out[segment], out[segment + 1] = 1.0 - (position - segment), position - segment
        return out

    def _bend_part(self, part: str) -> torch.Tensor | None:
        if part == "scale":
            return None if self._bend_scale is None else torch.nn.functional.softplus(
                self._bend_scale)
        return self._bend_loc if part == "loc" else self._bend_factor

    def _combine(self, weights: Sequence[float], part: str) -> torch.Tensor | None:
        """``sum_i weights[i] P_i`` of one part, packed; differentiable in the bends."""
        first, last = self._ends[part]
        bends = self._bend_part(part)
        if first is None:
            return None
        if bends is None:  # the scales of point estimates: zeros
            return torch.zeros_like(first)
        inner = torch.tensordot(torch.tensor(weights[1:-1], dtype=bends.dtype), bends, dims=1)
        return weights[0] * first + weights[-1] * last + inner

    def _view(self, weights: Sequence[float]) -> GaussianView:
        return GaussianView.from_flat(self.family, self.view0.shapes,
                                      self._combine(weights, "loc"),
                                      self._combine(weights, "scale"),
                                      self._combine(weights, "factor"))

    def view_at(self, t: float) -> GaussianView:
        """The Gaussian ``q_t`` (a point estimate's view for point curves)."""
        with torch.no_grad():
            return self._view(self.coefficients(t))

    @property
    def bends(self) -> list[GaussianView]:
        """The bends as Gaussian views (copies), in order along the curve."""
        count = self.num_bends + 2
        return [self._view([1.0 if j == i else 0.0 for j in range(count)]).map(
                lambda part, site, x: x.detach().clone()) for i in range(1, count - 1)]

    def at(self, t: float) -> Any:
        """The posterior at ``t``: a new guide (or state dict) of the endpoints' kind; the
        endpoints themselves at ``t = 0`` and ``1``, unless BatchNorm statistics are
        recomputed, when it is a copy holding the statistics recomputed there."""
        if self._recomputes:
            return self._posterior_at(_check_t(t))
        return super().at(t)

    # -- BatchNorm statistics --------------------------------------------------------------------
    @property
    def _recomputes(self) -> bool:
        return self.recompute_bn and self._bn_inputs is not None

    def buffers_at(self, t: float) -> dict[str, torch.Tensor] | None:
        """Buffers at ``t``: BatchNorm statistics recomputed on the training inputs when the
        curve recomputes them (once per ``t``, then cached), else the endpoints' buffers
        moving linearly as on the Wasserstein path.

        Recomputed statistics are cumulative averages over the training inputs in minibatches,
        each minibatch through a new draw of ``q_t`` (seeded): for a Gaussian curve they are
        the statistics an average draw of ``q_t`` sees."""
        t = _check_t(t)
        if not self._recomputes:
            return super().buffers_at(t)
        if t not in self._statistics:
            self._statistics[t] = {**(super().buffers_at(t) or {}),
                                   **self._recompute(self.view_at(t))}
        return dict(self._statistics[t])

    def _recompute(self, view: GaussianView) -> dict[str, torch.Tensor]:
        """The BatchNorm statistics of the posterior ``view`` on the training inputs."""
        if self._statistics_net is None:
            self._statistics_net = copy.deepcopy(self.model.net)
        net = self._statistics_net
        layers = _batchnorms(net)
        for _, layer in layers:
            layer.reset_running_stats()
            layer.momentum = None  # a cumulative average over the minibatches
            layer.train()
        generator = torch.Generator().manual_seed(self.seed)
        batches = list(self._bn_inputs.split(self._bn_batch_size))
        if len(batches) > 1 and len(batches[-1]) == 1:
            batches.pop()  # batch statistics need two examples
        sites = set(self.model.weight_sites)
        with torch.no_grad():
            for batch in batches:
                draw = view.transform(view.standard_normal(1, generator))
                functional_call(net, {k: v[0] for k, v in draw.items() if k in sites}, (batch,))
        return {f"{name}.{key}" if name else key: value.detach().clone()
                for name, layer in layers for key, value in layer.named_buffers()}

    def draw(self, t: float, noise: Any) -> dict[str, torch.Tensor]:
        """Weights of ``q_t`` for given noise: site -> ``(S, *site_shape)`` (without the
        buffers of state dicts when the statistics are recomputed)."""
        return self._without_recomputed(super().draw(t, noise))

    def _without_recomputed(self, draws: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # state dicts carry BatchNorm statistics as sites; recomputed ones replace them
        if not self._recomputes:
            return draws
        return {k: v for k, v in draws.items() if k in self.model.weight_sites}

    def _model_at(self, t: float) -> BayesianNetwork | None:
        if not self._recomputes:
            return super()._model_at(t)
        return self.model.with_net(_with_buffers(copy.deepcopy(self.model.net),
                                                 self.buffers_at(t)))

    # -- training --------------------------------------------------------------------------------
    def _trainable(self) -> list[torch.Tensor]:
        return [p for p in (self._bend_loc, self._bend_scale, self._bend_factor)
                if p is not None]

    def _train(self, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int,
               lr: float, lr_end: float | None, num_samples: int, clip_norm: float | None,
               seed: int, progress: bool,
               callback: Callable[[int, "Curve"], Any] | None = None) -> None:
        model = self.model
        prior = prior_terms(model)
        n = len(x)
        if self.family == POINT:
            num_samples = 1  # every draw of a point estimate is the same
        vectorized = num_samples > 1
        batch_statistics = self._recomputes
        if batch_statistics:
            # like deterministic training, BatchNorm normalises with each minibatch's (and each
            # draw's) own statistics; the running statistics are recomputed after training
            net = copy.deepcopy(model.net)
            replace_all_batch_norm_modules_(net)
        else:
            net = model.net
        fixed_state = dict(net.named_buffers())

        def loss(xb: torch.Tensor, yb: torch.Tensor, t: float) -> torch.Tensor:
            nonlocal vectorized
            view = self._view(self.coefficients(t))
            state = fixed_state
            if not batch_statistics:  # the endpoints' statistics, moving linearly
                state = {**fixed_state, **(BasePath.buffers_at(self, t) or {}),
                         **{k: v.detach() for k, v in view.loc.items()
                            if k in fixed_state}}  # a state dict's buffer sites
            noise = self.view0.standard_normal(num_samples)
            try:
                return negative_elbo(model, view, xb, yb, noise, num_data=n, prior=prior,
                                     forward=forward_draws(net, state, vectorized))
            except RuntimeError as err:
                if not vectorized:
                    raise
                vectorized = False
                warnings.warn(f"torch.func.vmap cannot run this network ({str(err)[:160]}); "
                              f"evaluating one posterior draw at a time", RuntimeWarning,
                              stacklevel=4)
                return negative_elbo(model, view, xb, yb, noise, num_data=n, prior=prior,
                                     forward=forward_draws(net, state, False))

        def after_epoch(epoch: int, mean_loss: float) -> None:
            self.history = np.append(self.history, mean_loss)
            self._statistics.clear()  # the bends moved
            if callback is not None:
                callback(epoch + 1, self)

        minimise_along_path(self._trainable(), loss, x, y, epochs=epochs,
                            batch_size=batch_size, lr=lr, lr_end=lr_end, clip_norm=clip_norm,
                            seed=seed, progress=progress, desc=f"fit_curve ({self.kind})",
                            objective="the curve's objective", on_epoch=after_epoch)

    # -- the plane through the endpoints and the first bend --------------------------------------
    def _plane(self) -> dict[str, Any]:
        """Orthonormal axes of the plane through the endpoints' means and the first bend's
        mean (origin at ``q0``'s), and the control points' coordinates in it."""
        mu0, mu1 = self._ends["loc"]
        bend = self._bend_loc[0]
        along = mu1 - mu0
        length = float(along.norm())
        if length == 0.0:
            raise ValueError("the endpoints have the same means: there is no plane to draw")
        u = along / length
        offset = bend - mu0
        bend_u = float(offset @ u)
        rest = offset - bend_u * u
        bend_v = float(rest.norm())
        if bend_v <= 1e-6 * length:
            raise ValueError("the first bend lies on the line between the endpoints (an "
                             "untrained curve?): the plane through them is not defined")
        return {"origin": mu0, "u": u, "v": rest / bend_v, "length": length,
                "bend": (bend_u, bend_v)}

    def _plane_weights(self, plane: dict[str, Any], a: float, b: float) -> list[float]:
        """The affine weights of ``q0``, the first bend and ``q1`` at plane coordinates
        ``(a, b)``."""
        bend_u, bend_v = plane["bend"]
        w_bend = b / bend_v
        w_end = (a - w_bend * bend_u) / plane["length"]
        return [1.0 - w_bend - w_end, w_bend, w_end]

    def _plane_view(self, weights: Sequence[float]) -> GaussianView:
        """The combination of ``q0``, the first bend and ``q1`` with affine ``weights``
        (scales may turn negative off the triangle: draws ``loc + scale * eps`` stay valid)."""
        full = [weights[0], weights[1]] + [0.0] * (self.num_bends - 1) + [weights[2]]
        with torch.no_grad():
            return self._view(full)

    def _plane_buffers(self, weights: Sequence[float], view: GaussianView
                       ) -> dict[str, torch.Tensor] | None:
        along = min(max(weights[2] + weights[1] / 2, 0.0), 1.0)  # the bend counts as t = 1/2
        base = BasePath.buffers_at(self, along)
        if not self._recomputes:
            return base
        return {**(base or {}), **self._recompute(view)}

    def plot_plane(self, model: BayesianNetwork, data: Any, *, grid: int = 15,
                   num_samples: int = 16, margin: float = 0.2, seed: int = 0,
                   ax: Any = None, progress: bool = False) -> Any:
        """The predictive NLL on the plane through the endpoints' means and the first bend's
        mean, with the straight path and the curve drawn on it.

        A point of the plane is the affine combination of ``q0``, the first bend and ``q1``
        (means, scales and factors alike) whose mean lies there; its NLL is that of its model
        average, estimated as :func:`~bnn_align.marginal_loss` does with ``num_samples``
        draws (the same noise everywhere; one draw for point estimates). A curve with one bend
        lies in the plane; with more bends its means are projected onto it. With recomputed
        BatchNorm statistics every grid point gets its own (one pass over the training inputs
        each).

        Parameters
        ----------
        model : BayesianNetwork
            The model the NLL is computed with.
        data : (x, y) tensors or TensorDataset
            Evaluation data (a few hundred points keep the ``grid**2`` evaluations quick).
        grid : int
            Points per axis.
        num_samples : int
            Posterior draws per grid point.
        margin : float
            Space around the control points and the curve, as a fraction of the plotted range.
        seed : int
            Seed of the draws.
        ax : matplotlib axis, optional
            Draw into it instead of a new figure.
        progress : bool
            A tqdm bar over the grid's rows.

        Returns
        -------
        matplotlib.figure.Figure
        """
        import matplotlib.pyplot as plt

        if not isinstance(model, BayesianNetwork):
            raise TypeError(f"model must be a BayesianNetwork, got {type(model).__name__}")
        _check_sites(model, self)
        check_int("grid", grid, low=2)
        positive_int(num_samples=num_samples)
        if not (isinstance(margin, (int, float)) and margin >= 0):
            raise ValueError(f"margin must be a non-negative number, got {margin!r}")
        plane = self._plane()
        length = plane["length"]
        ts = np.linspace(0.0, 1.0, 101)
        curve_xy = self._project(plane, ts)
        xs = np.concatenate([[0.0, 1.0, plane["bend"][0] / length], curve_xy[:, 0]])
        ys = np.concatenate([[0.0, plane["bend"][1] / length], curve_xy[:, 1]])
        span = max(xs.max() - xs.min(), ys.max() - ys.min())
        a = np.linspace(xs.min() - margin * span, xs.max() + margin * span, grid)
        b = np.linspace(ys.min() - margin * span, ys.max() + margin * span, grid)
        samples = 1 if self.family == POINT else num_samples
        nll = np.empty((grid, grid))
        for row, height in enumerate(tqdm(b, desc="plane", disable=not progress, leave=False)):
            line = _PlaneRow(self, plane, a[0] * length, a[-1] * length, height * length)
            nll[row] = marginal_loss(model, line, data, ts=np.linspace(0.0, 1.0, grid),
                                     num_samples=samples, metrics=["nll"], num_bootstrap=2,
                                     seed=seed).values["nll"]
        if ax is None:
            fig, ax = plt.subplots(figsize=(5.5, 4.2))
        else:
            fig = ax.figure
        low, top = float(np.nanmin(nll)), float(np.nanquantile(nll, 0.9))
        levels = np.linspace(low, max(top, low + 1e-6), 21)
        filled = ax.contourf(a, b, nll, levels=levels, cmap="viridis", extend="max")
        fig.colorbar(filled, ax=ax, label="predictive NLL")
        ax.plot([0.0, 1.0], [0.0, 0.0], ls="--", color="tab:cyan", lw=1.5, label="linear path")
        ax.plot(curve_xy[:, 0], curve_xy[:, 1], color="tab:red", lw=2, label=f"{self.kind} curve")
        ax.plot([0.0, 1.0], [0.0, 0.0], "o", color="black", ms=6)
        ax.plot([plane["bend"][0] / length], [plane["bend"][1] / length], "x", color="tab:red",
                ms=8, mew=2)
        ax.set_xlabel("along q0 -> q1 (units of the distance of their means)")
        ax.set_ylabel("towards the first bend")
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        return fig

    def _project(self, plane: dict[str, Any], ts: np.ndarray) -> np.ndarray:
        """Plane coordinates (units of the endpoints' distance) of the curve's means at ``ts``."""
        mu0, mu1 = self._ends["loc"]
        points = torch.cat([mu0[None], self._bend_loc, mu1[None]]) - plane["origin"]
        coords = torch.stack([points @ plane["u"], points @ plane["v"]], dim=1).double()
        weights = torch.tensor([self.coefficients(float(t)) for t in ts], dtype=torch.float64)
        return (weights @ coords).numpy() / plane["length"]

    # -- saving ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The endpoints, bends, settings and training history as plain tensors and numbers
        (what :meth:`save` writes); :meth:`from_state_dict` rebuilds the curve exactly."""
        return {
            "format": _FORMAT, "kind": self.kind, "num_bends": self.num_bends,
            "recompute_bn": self.recompute_bn, "seed": self.seed,
            "bn_batch_size": self._bn_batch_size,
            "bn_inputs": None if self._bn_inputs is None else self._bn_inputs.clone(),
            "endpoints": [_endpoint_record(self.q0), _endpoint_record(self.q1)],
            "buffers": list(self._buffers),
            "bends": {"loc": _cloned(self._bend_loc), "scale": _cloned(self._bend_scale),
                      "factor": _cloned(self._bend_factor)},
            "history": self.history.tolist(),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], *, model: BayesianNetwork) -> "Curve":
        """The curve of a :meth:`state_dict`; its endpoints are rebuilt over ``model`` (guides
        as the base class of the saved kind: ``AutoNormal``, ``AutoDiagonalNormal``,
        ``AutoLowRankMultivariateNormal``, ``AutoDelta``; modules as copies of
        ``model.net``)."""
        if not isinstance(model, BayesianNetwork):
            raise TypeError(f"model must be a BayesianNetwork, got {type(model).__name__}")
        q0, q1 = (_rebuild_endpoint(record, model) for record in state["endpoints"])
        curve = cls(model, q0, q1, kind=state["kind"], bends=state["num_bends"],
                    recompute_bn=state["recompute_bn"], bn_inputs=state["bn_inputs"],
                    bn_batch_size=state["bn_batch_size"], seed=state["seed"])
        curve._buffers = tuple(state["buffers"])
        bends = state["bends"]
        curve._bend_loc, curve._bend_scale = bends["loc"], bends["scale"]
        curve._bend_factor = bends["factor"]
        curve.history = np.asarray(state["history"], dtype=float)
        return curve

    def save(self, path: str | FilePath) -> None:
        """Save :meth:`state_dict` with ``torch.save``; :meth:`load` rebuilds the curve exactly."""
        torch.save(self.state_dict(), FilePath(path))

    @classmethod
    def load(cls, path: str | FilePath, *, model: BayesianNetwork) -> "Curve":
        """Load a curve saved with :meth:`save` (see :meth:`from_state_dict`)."""
        return cls.from_state_dict(load_saved(path, "Curve", _FORMAT), model=model)

    def __repr__(self) -> str:
        return (f"Curve(kind={self.kind!r}, bends={self.num_bends}, family={self.family!r}, "
                f"q0={type(self.q0).__name__}, q1={type(self.q1).__name__}, "
                f"sites={len(self.view0.sites)}, epochs={len(self.history)})")


def _cloned(t: torch.Tensor | None) -> torch.Tensor | None:
    # a snapshot: the bends keep training after a state_dict taken from a callback
    return None if t is None else t.detach().clone()


class _PlaneRow(BasePath):
    """A horizontal line of :meth:`Curve.plot_plane`'s grid, as a path that
    :func:`~bnn_align.marginal_loss` evaluates (affine in ``t``, so a straight segment)."""

    kind = "plane"

    def __init__(self, curve: Curve, plane: dict[str, Any], start: float, end: float,
                 height: float):
        self.curve, self.plane = curve, plane
        self.start, self.end, self.height = start, end, height
        self.q0 = self.q1 = None
        self.models = (curve.model, curve.model)
        self._buffers = (None, None)
        self.view0, self.view1 = self.view_at(0.0), self.view_at(1.0)

    def _weights(self, t: float) -> list[float]:
        a = (1.0 - t) * self.start + t * self.end
        return self.curve._plane_weights(self.plane, a, self.height)

    def view_at(self, t: float) -> GaussianView:
        return self.curve._plane_view(self._weights(_check_t(t)))

    def draw(self, t: float, noise: Any) -> dict[str, torch.Tensor]:
        return self.curve._without_recomputed(super().draw(t, noise))

    def buffers_at(self, t: float) -> dict[str, torch.Tensor] | None:
        weights = self._weights(_check_t(t))
        return self.curve._plane_buffers(weights, self.curve._plane_view(weights))


# ------------------------------------------------------------------------------ endpoints --
def _endpoint_record(q: Any) -> dict[str, Any]:
    if isinstance(q, autoguide.AutoGuide):
        for name in _GUIDE_BUILDERS:
            if isinstance(q, getattr(autoguide, name)):
                return {"type": name, "raw": adapter_for(q).raw(q)}
    if isinstance(q, torch.nn.Module):
        return {"type": "module", "raw": {k: v.detach().clone()
                                          for k, v in q.state_dict().items()}}
    return {"type": "ordered_dict" if isinstance(q, OrderedDict) else "state_dict",
            "raw": {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                    for k, v in q.items()}}


def _rebuild_endpoint(record: dict[str, Any], model: BayesianNetwork) -> Any:
    kind, raw = record["type"], record["raw"]
    if kind in ("state_dict", "ordered_dict"):  # as torch's state_dict() or a plain dict
        return (OrderedDict if kind == "ordered_dict" else dict)(raw)
    if kind == "module":
        net = copy.deepcopy(model.net)
        try:
            net.load_state_dict(raw)
        except RuntimeError as err:
            raise ValueError(f"the saved curve's endpoints do not fit model's network: "
                             f"{str(err)[:300]}") from None
        return net
    template = _GUIDE_BUILDERS[kind](model, raw)
    sites = adapter_for(template).raw(template)
    for part, tensors in raw.items():
        for site, value in tensors.items():
            mine = sites.get(part, {}).get(site)
            if mine is None or mine.shape != value.shape:
                raise ValueError(f"the saved curve's endpoints do not fit model: site {site!r} "
                                 f"is {'missing' if mine is None else tuple(mine.shape)} there, "
                                 f"{tuple(value.shape)} in the file")
    return adapter_for(template).from_raw(template, raw, model)


# ------------------------------------------------------------------------------- training --
def fit_curve(
    model: BayesianNetwork,
    q0: Any,
    q1: Any,
    data: Any,
    *,
    kind: str = "bezier",
    bends: int = 1,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 1e-2,
    lr_end: float | None = 1e-3,
    num_samples: int = 1,
    recompute_bn: bool = True,
    clip_norm: float | None = 10.0,
    seed: int = 0,
    progress: bool = True,
    callback: Callable[[int, Curve], Any] | None = None,
) -> Curve:
    """Learn a curve from ``q0`` to ``q1`` whose every point is a good posterior.

    The bends minimise ``E_{t ~ U[0, 1]} [-ELBO(q_t)]`` by Adam, one ``t`` per minibatch:
    the reparameterised expected NLL (scaled to the data set as :func:`~bnn_align.fit` does)
    plus the KL to the model's prior, analytic for Normal priors and a Monte-Carlo estimate on
    the same draws for others (the ``Trace_ELBO`` of ``fit`` estimates it by Monte Carlo; the
    expectation is the same). For point estimates it is the negative log joint (NLL plus
    ``-log prior``, i.e. cross-entropy with weight decay), as ``fit`` trains an ``AutoDelta``.
    The endpoints stay fixed.

    Parameters
    ----------
    model : BayesianNetwork
        The network, prior and likelihood (a fixed observation noise for regression).
    q0, q1 : posterior
        Endpoints of one family: point estimates (``AutoDelta``, state dicts, modules),
        diagonal Gaussians (``AutoNormal``, ``AutoDiagonalNormal``) or low-rank Gaussians of
        one rank, over ``model``'s network (e.g. ``guide_a`` and ``match(guide_a,
        guide_b).aligned``). Not modified.
    data : (x, y) tensors or TensorDataset
        Training data; ``x`` of shape ``(N, *input_shape)``.
    kind : {"bezier", "polychain"}
        Bezier curve or polygonal chain (see the module docstring).
    bends : int
        Number of bends (trainable control points).
    epochs : int
        Passes over the data; 0 returns the untrained curve (the Wasserstein path).
    batch_size, lr, lr_end, clip_norm :
        Minibatch size; Adam's learning rate, decayed exponentially to ``lr_end`` at the last
        step (``None``: constant); gradients clipped to norm ``clip_norm`` (``None``: not), as
        in :func:`~bnn_align.fit`.
    num_samples : int
        Draws of ``q_t`` per step for the expected NLL (one suffices, as in ``fit``; ignored
        for point estimates).
    recompute_bn : bool
        For networks with BatchNorm layers: train with each minibatch's statistics and
        recompute the running statistics on ``data``'s inputs at every evaluated ``t`` (see
        :meth:`Curve.buffers_at`), as mode-connectivity code does. ``False`` keeps the
        endpoints' statistics, moving linearly. No effect without BatchNorm.
    seed : int
        Seed of the minibatch order, the ``t`` draws and the noise; the global RNG state is
        restored.
    progress : bool
        Show a tqdm progress bar.
    callback : callable, optional
        Called as ``callback(epochs_done, curve)`` after every epoch, e.g. to record the
        barrier along training (``marginal_loss`` leaves the training's random numbers alone).

    Returns
    -------
    Curve

    Raises
    ------
    ValueError
        Endpoints over different architectures or another network than ``model``, endpoints
        of different families, full-rank endpoints, ``bends < 1``, an unknown ``kind``,
        non-positive counts or learning rates, inputs that do not fit the network, a
        likelihood with latent sites.
    TypeError
        A model that is not a BayesianNetwork, data that is not an ``(x, y)`` pair,
        unsupported posteriors.

    Examples
    --------
    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import guides, models
    >>> _ = torch.manual_seed(0)
    >>> model = ba.BayesianNetwork(models.mlp(4, [8], 3), input_shape=(4,))
    >>> guide_a = guides.mean_field(model)
    >>> guide_b = guides.mean_field(ba.BayesianNetwork(models.mlp(4, [8], 3), input_shape=(4,)))
    >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))

    Untrained, the curve is the Wasserstein path:

    >>> untrained = ba.fit_curve(model, guide_a, guide_b, (x, y), epochs=0)
    >>> straight = ba.interpolate(guide_a, guide_b)
    >>> torch.allclose(untrained.view_at(0.3).loc["0.weight"],
    ...                straight.view_at(0.3).loc["0.weight"])
    True

    Training moves the bend; the ends stay the endpoints:

    >>> curve = ba.fit_curve(model, guide_a, guide_b, (x, y), epochs=2, batch_size=32,
    ...                      progress=False)
    >>> curve.history.shape
    (2,)
    >>> torch.equal(curve.bends[0].loc["0.weight"], untrained.bends[0].loc["0.weight"])
    False
    >>> type(curve.at(0.5)).__name__, curve.at(0.0) is guide_a
    ('AutoNormal', True)
    >>> ba.fit_curve(model, guide_a, guide_b, (x, y), bends=0)
    Traceback (most recent call last):
        ...
    ValueError: bends must be a positive integer, got 0
    """
    started = time.perf_counter()
    if not isinstance(model, BayesianNetwork):
        raise TypeError(f"model must be a BayesianNetwork, got {type(model).__name__}")
    x, y = as_data_pair(data)
    check_int("epochs", epochs, low=0)
    positive_int(batch_size=batch_size, num_samples=num_samples)
    for name, value, optional in (("lr", lr, False), ("lr_end", lr_end, True)):
        if not ((optional and value is None)
                or (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and value > 0)):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    prior_terms(model)  # a likelihood the objective cannot handle fails before any work
    _check_inputs(model, x)
    curve = Curve(model, q0, q1, kind=kind, bends=bends, recompute_bn=recompute_bn,
                  bn_inputs=x, bn_batch_size=batch_size, seed=seed)
    with torch.no_grad():  # clear errors for inputs or labels that do not fit
        out = model.evaluate(curve.view0.loc, x[:1])
    model.likelihood.check_targets(out.expand(len(y), *out.shape[1:]), y)
    if epochs:
        curve._train(x, y, epochs=epochs, batch_size=batch_size, lr=lr, lr_end=lr_end,
                     num_samples=num_samples, clip_norm=clip_norm, seed=seed,
                     progress=progress, callback=callback)
    curve.seconds = time.perf_counter() - started
    return curve
