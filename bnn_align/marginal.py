"""Monte-Carlo predictive losses along a path, and the marginalized loss barrier.

:func:`marginal_loss` evaluates, at every ``t`` of a path (any
:class:`~bnn_align.paths.BasePath`), the predictive performance of the posterior ``q_t``: weights
for all Monte-Carlo samples are drawn at once (with common random numbers along the path) and the
network is evaluated for all of them in one batched call (``torch.func.functional_call`` under
``vmap``, chunked so memory stays bounded). Each value carries a Monte-Carlo standard error from
a bootstrap over the posterior draws; the same resampled draws are used at every ``t``, so the
standard error of a barrier accounts for the correlation that common random numbers create.

Classification metrics (``Categorical`` likelihood): ``"nll"``, the predictive negative
log-likelihood of the Bayesian model average ``-mean_i log mean_s p(y_i | x_i, theta_s)``;
``"gibbs"``, the expected NLL under ``q_t``; ``"accuracy"``, ``"ece"`` (15 equal-width bins) and
``"brier"`` of the model average. Regression (``Gaussian``): ``"nll"``, ``"gibbs"`` and
``"rmse"`` of the predictive mean.
"""

from __future__ import annotations

import json
import numbers
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ._checks import check_int, positive_int, same_device
from ._elbo import forward_draws
from .bayesian import BayesianNetwork, Categorical, Gaussian, as_data_pair
from .paths.interpolation import BasePath, Mixture, Noise, interpolate
from .posterior import POINT

__all__ = ["marginal_loss", "LossCurve", "Barrier", "CLASSIFICATION", "REGRESSION"]

CLASSIFICATION = ("nll", "gibbs", "accuracy", "ece", "brier")
REGRESSION = ("nll", "gibbs", "rmse")
HIGHER_IS_BETTER = ("accuracy",)


@dataclass(frozen=True)
class Barrier:
    """A loss barrier: the largest excess of the curve over the straight line between its ends.

    Attributes
    ----------
    value : float
        ``max_t L(t) - ((1 - t) L(0) + t L(1))``; for accuracy the largest drop below the line.
    se : float
        Its Monte-Carlo standard error (bootstrap over posterior draws).
    t : float
        Where the excess peaks (0.5 for the midpoint barrier).
    metric : str

    Examples
    --------
    :meth:`LossCurve.barrier` and :meth:`LossCurve.midpoint_barrier` return one; ``str``
    gives the value with its standard error:

    >>> import bnn_align as ba
    >>> print(ba.Barrier(value=0.25, se=0.01, t=0.5, metric="nll"))
    0.2500 +- 0.0100 (t=0.5, nll)
    """

    value: float
    se: float
    t: float
    metric: str

    def __str__(self) -> str:
        return f"{self.value:.4f} +- {self.se:.4f} (t={self.t:g}, {self.metric})"


@dataclass
class LossCurve:
    """Predictive metrics of the posteriors along a path, with Monte-Carlo standard errors.

    Attributes
    ----------
    ts : ndarray of shape (T,)
    values : dict of str to ndarray of shape (T,)
        Metric -> estimate at every ``t`` (all draws).
    se : dict of str to ndarray of shape (T,)
        Metric -> bootstrap standard error.
    replicates : dict of str to ndarray of shape (B, T)
        Metric -> bootstrap replicates (the same resampled draws at every ``t``).
    kind : str
        Path kind (``"wasserstein"``, ``"mixture"``, a curve's ``"bezier"`` or
        ``"polychain"``, or ``"posterior"`` for a single one).
    num_samples, num_points : int
        Posterior draws per ``t`` and test points.
    common : bool
        Whether common random numbers were used along the path.
    seconds : float

    Examples
    --------
    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import guides, models
    >>> _ = torch.manual_seed(0)
    >>> model = ba.BayesianNetwork(models.mlp(4, [8], 3), input_shape=(4,))
    >>> other = ba.BayesianNetwork(models.mlp(4, [8], 3), input_shape=(4,))
    >>> path = ba.interpolate(guides.mean_field(model), guides.mean_field(other))
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> curve = ba.marginal_loss(model, path, (x, y), ts=3, num_samples=4, num_bootstrap=50)
    >>> curve.ts, curve.metrics
    (array([0. , 0.5, 1. ]), ['nll', 'gibbs', 'accuracy', 'ece', 'brier'])
    >>> curve.values["nll"].shape, curve.replicates["nll"].shape     # (T,) and (B, T)
    ((3,), (50, 3))
    >>> barrier = curve.barrier("accuracy")        # the largest drop below the line
    >>> barrier.metric, barrier.t in curve.ts
    ('accuracy', True)
    >>> curve.midpoint_barrier().t
    0.5
    >>> sorted(curve.to_dict()["barriers"])
    ['accuracy', 'brier', 'ece', 'gibbs', 'nll']
    """

    ts: np.ndarray
    values: dict[str, np.ndarray]
    se: dict[str, np.ndarray]
    replicates: dict[str, np.ndarray] = field(repr=False)
    kind: str = "wasserstein"
    num_samples: int = 0
    num_points: int = 0
    common: bool = True
    seconds: float = 0.0

    @property
    def metrics(self) -> list[str]:
        """The metrics computed, in the order of ``values``."""
        return list(self.values)

    def _check(self, metric: str) -> None:
        if metric not in self.values:
            raise ValueError(f"metric {metric!r} was not computed; available: {self.metrics}")
        if len(self.ts) < 2 or self.ts[0] != 0.0 or self.ts[-1] != 1.0:
            raise ValueError("a barrier needs a curve whose ts start at 0 and end at 1")

    def _excess(self, metric: str, curves: np.ndarray) -> np.ndarray:
        # curves: (..., T) -> excess over the line between the ends (sign: higher is worse)
        line = (1 - self.ts) * curves[..., :1] + self.ts * curves[..., -1:]
        sign = -1.0 if metric in HIGHER_IS_BETTER else 1.0
        return sign * (curves - line)

    def barrier(self, metric: str = "nll") -> Barrier:
        """``max_t L(t) - ((1 - t) L(0) + t L(1))`` (for accuracy, the largest drop below the
        line), with its bootstrap standard error and the ``t`` where it peaks."""
        self._check(metric)
        excess = self._excess(metric, self.values[metric])
        peak = int(np.argmax(excess))
        replicated = self._excess(metric, self.replicates[metric]).max(axis=1)
        return Barrier(float(excess[peak]), float(replicated.std(ddof=1)),
                       float(self.ts[peak]), metric)

    def midpoint_barrier(self, metric: str = "nll") -> Barrier:
        """The excess at ``t = 0.5`` (which must be one of the ``ts``)."""
        self._check(metric)
        where = np.flatnonzero(np.isclose(self.ts, 0.5))
        if len(where) == 0:
            raise ValueError("the midpoint barrier needs t = 0.5 among the ts")
        i = int(where[0])
        excess = self._excess(metric, self.values[metric])[i]
        replicated = self._excess(metric, self.replicates[metric])[:, i]
        return Barrier(float(excess), float(replicated.std(ddof=1)), 0.5, metric)

    def to_dict(self) -> dict:
        """Plain-Python record: the curves, their standard errors and the barriers."""
        out = {
            "kind": self.kind, "ts": self.ts.tolist(), "num_samples": self.num_samples,
            "num_points": self.num_points, "common_random_numbers": self.common,
            "seconds": self.seconds,
            "values": {k: v.tolist() for k, v in self.values.items()},
            "se": {k: v.tolist() for k, v in self.se.items()},
        }
        if len(self.ts) >= 2 and self.ts[0] == 0.0 and self.ts[-1] == 1.0:
            out["barriers"] = {m: vars(self.barrier(m)) for m in self.metrics}
        return out

    def to_json(self, path: str | FilePath | None = None) -> str:
        """The :meth:`to_dict` record as JSON, also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            FilePath(path).write_text(text)
        return text

    def plot(self, metrics: Sequence[str] | None = None, *, ax: Any = None, label: str = "",
             color: Any = None) -> Any:
        """Curves with +-2 standard-error bands and the straight line between the ends.

        Returns the matplotlib figure. Pass ``ax`` (one axis, or one per metric) to draw into
        existing axes, e.g. to overlay a naive and an aligned path.
        """
        import matplotlib.pyplot as plt

        metrics = list(metrics or [m for m in ("nll", "accuracy") if m in self.values]
                       or self.metrics[:1])
        if ax is None:
            fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.4),
                                     squeeze=False)
            axes = list(axes[0])
        else:
            axes = list(np.atleast_1d(ax))
            fig = axes[0].figure
        for axis, metric in zip(axes, metrics):
            v, s = self.values[metric], self.se[metric]
            line, = axis.plot(self.ts, v, marker="o", ms=3, label=label or self.kind,
                              color=color)
            axis.fill_between(self.ts, v - 2 * s, v + 2 * s, alpha=0.25, color=line.get_color())
            axis.plot([self.ts[0], self.ts[-1]], [v[0], v[-1]], ls="--", lw=1,
                      color=line.get_color())
            axis.set_xlabel("t")
            axis.set_ylabel(metric)
            axis.grid(alpha=0.3)
        axes[0].legend()
        fig.tight_layout()
        return fig


# ------------------------------------------------------------------------------ evaluation --
def _ts(ts: int | Sequence[float] | np.ndarray) -> np.ndarray:
    if isinstance(ts, bool) or (isinstance(ts, np.ndarray) and ts.dtype == bool):
        raise TypeError("ts must be a number of points or a sequence of t in [0, 1], not a bool")
    if isinstance(ts, numbers.Integral):
        if ts < 1:
            raise ValueError(f"ts must be at least 1 point, got {ts}")
        return np.linspace(0.0, 1.0, int(ts)) if ts > 1 else np.zeros(1)
    out = np.asarray(ts, dtype=float).reshape(-1)
    if len(out) == 0:
        raise ValueError("ts is empty")
    bad = out[(out < 0) | (out > 1) | ~np.isfinite(out)]
    if len(bad):
        raise ValueError(f"every t must lie in [0, 1], got {bad[0]}")
    return out


class _Evaluator:
    """The network under ``vmap`` over weight samples, in chunks of samples and data.

    Networks that ``vmap`` cannot run (recurrent layers, data-dependent control flow,
    ``.item()``) are evaluated one draw at a time instead (``vectorized=False``).
    """

    def __init__(self, model: BayesianNetwork, chunk_size: int, batch_size: int):
        self.model = model
        self.chunk_size, self.batch_size = chunk_size, batch_size
        self.weight_sites = set(model.weight_sites)
        self.vectorized = True

    def outputs(self, draws: dict[str, torch.Tensor], x: torch.Tensor,
                buffers: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """Network outputs for every draw and input: ``(S, N, *out)``, on the draws' device
        (``x`` may be elsewhere: it is moved there a batch at a time)."""
        net = self.model.net
        state = dict(net.named_buffers())
        state.update({k: v for k, v in (buffers or {}).items() if k in state})
        # buffers that are sites of state-dict posteriors: deterministic, the same in every draw
        state.update({k: v[0] for k, v in draws.items() if k in state})
        weights = {k: v for k, v in draws.items() if k in self.weight_sites}
        batched = forward_draws(net, state, self.vectorized)
        first = next(iter(weights.values()))
        num, device = first.shape[0], first.device
        rows = []
        with torch.no_grad():
            for s in range(0, num, self.chunk_size):
                chunk = {k: v[s:s + self.chunk_size] for k, v in weights.items()}
                cols = [batched(chunk, x[b:b + self.batch_size].to(device))
                        for b in range(0, len(x), self.batch_size)]
                rows.append(torch.cat(cols, dim=1))
        return torch.cat(rows, dim=0)

    def probe(self, draws: dict[str, torch.Tensor], x: torch.Tensor,
              buffers: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, int]:
        """Outputs for one draw and point, and the bytes of activations one (draw, point)
        pair produces (summed over the layers' outputs), for choosing chunk sizes."""
        sizes: list[int] = []

        def count(_module, _inputs, output):
            if isinstance(output, torch.Tensor):
                sizes.append(output.numel() * output.element_size())

        hooks = [m.register_forward_hook(count) for m in self.model.net.modules()]
        try:
            try:
                out = self.outputs(draws, x, buffers)
            except RuntimeError as err:
                # if the plain call fails too, the inputs are at fault: its error propagates
                self.vectorized = False
                sizes.clear()
                out = self.outputs(draws, x, buffers)
                warnings.warn(f"torch.func.vmap cannot run this network ({str(err)[:160]}); "
                              f"evaluating one posterior draw at a time", RuntimeWarning,
                              stacklevel=3)
        finally:
            for h in hooks:
                h.remove()
        return out, sum(sizes)


# about this much memory for the activations of one batched call when chunk_size is None
_MEMORY_BUDGET = 2 * 2 ** 30


def _noise_scale(model: BayesianNetwork, draws: dict[str, torch.Tensor]) -> torch.Tensor | float:
    """Observation noise of a Gaussian likelihood per draw (learned: constrained from the
    guide's unconstrained space) or its fixed value."""
    lik = model.likelihood
    if lik.noise is not None:
        return lik.noise
    from pyro.distributions.transforms import biject_to

    return biject_to(lik.noise_prior.support)(draws["obs_noise"])


# ------------------------------------------------------------------------------ the metrics --
def _bootstrap_weights(num_samples: int, num_bootstrap: int, generator: torch.Generator
                       ) -> torch.Tensor:
    """Row 0 weighs every draw equally; rows 1..B are multinomial resamples: ``(B + 1, S)``."""
    counts = torch.zeros(num_bootstrap, num_samples, dtype=torch.float64)
    if num_bootstrap:
        index = torch.randint(num_samples, (num_bootstrap, num_samples), generator=generator)
        counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float64))
    uniform = torch.ones(1, num_samples, dtype=torch.float64)
    return torch.cat([uniform, counts]) / num_samples


def _log_mean(weights: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """``log sum_s w[b, s] exp(logp[s, i])``: ``(B + 1, N)``, stable.

    One matrix product relative to each point's best draw; where a resample leaves out every
    draw within ~700 nats of it the sum underflows, and those entries are redone in log space.
    """
    logp = logp.double()
    peak = logp.max(dim=0).values
    total = weights @ torch.exp(logp - peak)
    out = torch.log(total) + peak
    rows, points = torch.nonzero(total == 0, as_tuple=True)
    if len(rows):
        out[rows, points] = torch.logsumexp(torch.log(weights[rows]) + logp[:, points].T, dim=1)
    return out


def _classification_metrics(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor,
                            wanted: Sequence[str], point_chunk: int = 2048
                            ) -> dict[str, torch.Tensor]:
    logp_all = torch.log_softmax(logits.float(), dim=-1)               # (S, N, C)
    logp = logp_all.gather(-1, y.view(1, -1, 1).expand(len(logp_all), -1, 1)).squeeze(-1)
    logp = logp.double()
    n = len(y)
    out: dict[str, torch.Tensor] = {}
    if "nll" in wanted:
        out["nll"] = -_log_mean(weights, logp).mean(dim=1)
    if "gibbs" in wanted:
        out["gibbs"] = weights @ (-logp.mean(dim=1))
    if not {"accuracy", "ece", "brier"} & set(wanted):
        return out
    rows, bins = len(weights), 15
    correct_sum, brier_sum = (torch.zeros(rows, dtype=torch.float64, device=logits.device)
                              for _ in range(2))
    conf_bins, acc_bins = (torch.zeros(rows, bins, dtype=torch.float64, device=logits.device)
                           for _ in range(2))
    # the model average only needs float32 (its rounding is far below the Monte-Carlo error)
    probs_all = logp_all.exp()
    weights32 = weights.float()
    for start in range(0, n, point_chunk):
        probs = torch.einsum("bs,snc->bnc", weights32,
                             probs_all[:, start:start + point_chunk]).double()
        labels = y[start:start + point_chunk]
        confidence, predicted = probs.max(dim=-1)
        correct = (predicted == labels).double()
        correct_sum += correct.sum(dim=1)
        onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).double()
        brier_sum += ((probs - onehot) ** 2).sum(dim=-1).sum(dim=1)
        index = (confidence * bins).long().clamp_(max=bins - 1)
        conf_bins.scatter_add_(1, index, confidence)
        acc_bins.scatter_add_(1, index, correct)
    if "accuracy" in wanted:
        out["accuracy"] = correct_sum / n
    if "ece" in wanted:
        out["ece"] = (acc_bins - conf_bins).abs().sum(dim=1) / n
    if "brier" in wanted:
        out["brier"] = brier_sum / n
    return out


def _regression_metrics(means: torch.Tensor, noise: torch.Tensor | float, y: torch.Tensor,
                        weights: torch.Tensor, wanted: Sequence[str]) -> dict[str, torch.Tensor]:
    means = means.double()
    target = y.double().unsqueeze(0)
    if isinstance(noise, torch.Tensor):
        noise = noise.double().view(-1, *([1] * (means.dim() - 1)))
    logp = torch.distributions.Normal(means, noise).log_prob(target)
    logp = logp.reshape(len(means), len(y), -1).sum(-1)                 # (S, N)
    out: dict[str, torch.Tensor] = {}
    if "nll" in wanted:
        out["nll"] = -_log_mean(weights, logp).mean(dim=1)
    if "gibbs" in wanted:
        out["gibbs"] = weights @ (-logp.mean(dim=1))
    if "rmse" in wanted:
        predictive = torch.einsum("bs,sn->bn", weights, means.reshape(len(means), -1))
        err = (predictive - target.reshape(1, -1)) ** 2
        out["rmse"] = err.mean(dim=1).sqrt()
    return out


# --------------------------------------------------------------------------- the estimator --
def marginal_loss(
    model: BayesianNetwork,
    path_or_posterior: Any,
    data: Any,
    *,
    ts: int | Sequence[float] = 11,
    num_samples: int = 64,
    batch_size: int = 1024,
    chunk_size: int | None = None,
    metrics: Sequence[str] | None = None,
    common: bool = True,
    num_bootstrap: int = 200,
    seed: int = 0,
    progress: bool = False,
) -> LossCurve:
    """Monte-Carlo predictive losses of the posteriors along a path.

    Parameters
    ----------
    model : BayesianNetwork
        The network and likelihood the posteriors are over.
    path_or_posterior : path or posterior
        A path from :func:`~bnn_align.interpolate` or :func:`~bnn_align.fit_curve` (any
        :class:`~bnn_align.paths.BasePath`), or a single posterior (evaluated once), on
        ``model``'s device (any): the network runs there. A
        :class:`~bnn_align.SamplePosterior` (or a path between two) is evaluated on its own
        samples: ``num_samples`` at most ``S`` (all of them for ``S``, a random subset for
        fewer).
    data : (x, y) tensors or TensorDataset
        Evaluation data; ``x`` of shape ``(N, *input_shape)``, on any device (moved to the
        model's a batch at a time).
    ts : int or sequence of float
        Number of equally spaced points in ``[0, 1]`` (11 by default) or the points themselves.
    num_samples : int
        Posterior draws per ``t``.
    batch_size, chunk_size : int
        Data points and posterior draws per batched network call (they bound memory). By
        default ``chunk_size`` is the largest number of draws whose activations, measured on
        one point, fit in about 2 GiB (all draws for small networks).
    metrics : str or sequence of str, optional
        Subset of ``CLASSIFICATION`` or ``REGRESSION`` (default: all for the likelihood).
    common : bool
        Use the same standard-normal draws at every ``t`` (common random numbers).
    num_bootstrap : int
        Bootstrap resamples of the draws for the standard errors.
    seed : int
        Seed of the draws and the bootstrap.
    progress : bool
        Show a tqdm bar over ``ts``.

    Returns
    -------
    LossCurve
        Its numbers are numpy arrays and floats, whatever the device. The draws and the
        bootstrap come from a CPU generator seeded with ``seed`` and are moved to the device,
        so a curve on a GPU equals the CPU's up to float rounding.

    Raises
    ------
    ValueError
        The model and the posteriors on different devices (naming both), inputs whose shape does not fit the network, labels out of range or of the wrong
        shape, ``t`` outside ``[0, 1]``, non-positive counts, unknown or empty metrics,
        posteriors over a different architecture than ``model``.
    TypeError
        A model that is not a BayesianNetwork, data that is not an ``(x, y)`` pair, inputs of
        another dtype than the weights, an unsupported likelihood.

    Notes
    -----
    The network runs under ``torch.func.vmap`` over the draws; a network ``vmap`` cannot run
    (recurrent layers, data-dependent control flow) is evaluated one draw at a time, with a
    ``RuntimeWarning``. With ``num_samples=1`` the standard errors are NaN (a warning says so)
    unless the posteriors are point estimates.

    Examples
    --------
    A trained posterior and a copy of it with relabelled hidden units: the straight path
    between them crosses a barrier, the path to the aligned copy has none.

    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import guides, models
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(256, 4)
    >>> y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    >>> model = ba.BayesianNetwork(models.mlp(4, [16], 3), input_shape=(4,))
    >>> guide_a = guides.mean_field(model)
    >>> _ = ba.fit(model, guide_a, (x, y), epochs=20, lr=0.05, progress=False)
    >>> guide_b = ba.permute(guide_a, {"P_0": torch.randperm(16)})
    >>> naive = ba.marginal_loss(model, ba.interpolate(guide_a, guide_b), (x, y),
    ...                          ts=5, num_samples=8)
    >>> barrier = naive.barrier("nll")
    >>> barrier.t, barrier.value > 10 * barrier.se
    (0.5, True)
    >>> aligned = ba.match(guide_a, guide_b).aligned
    >>> curve = ba.marginal_loss(model, ba.interpolate(guide_a, aligned), (x, y),
    ...                          ts=5, num_samples=8)
    >>> round(curve.barrier("nll").value, 6)
    0.0

    A single posterior is evaluated once:

    >>> ba.marginal_loss(model, guide_a, (x, y), num_samples=8, metrics="accuracy").values
    {'accuracy': array([0.9...])}
    """
    started = time.perf_counter()
    if not isinstance(model, BayesianNetwork):
        raise TypeError(f"model must be a BayesianNetwork, got {type(model).__name__}")
    positive_int(num_samples=num_samples, batch_size=batch_size)
    num_samples, batch_size = int(num_samples), int(batch_size)
    if chunk_size is not None:
        positive_int(chunk_size=chunk_size)
    check_int("num_bootstrap", num_bootstrap, low=2)
    x, y = as_data_pair(data)
    regression = isinstance(model.likelihood, Gaussian)
    if not regression and not isinstance(model.likelihood, Categorical):
        raise TypeError(f"marginal_loss supports Categorical and Gaussian likelihoods, got "
                        f"{type(model.likelihood).__name__}")
    metrics = _metrics(metrics, REGRESSION if regression else CLASSIFICATION)
    _check_inputs(model, x)
    if isinstance(path_or_posterior, Mixture):  # one point of a mixture path
        path_or_posterior, ts = path_or_posterior.path, [path_or_posterior.t]
    if isinstance(path_or_posterior, BasePath):
        path, kind = path_or_posterior, path_or_posterior.kind
    else:
        path, kind = interpolate(path_or_posterior, path_or_posterior), "posterior"
        if isinstance(ts, numbers.Integral) and not isinstance(ts, bool):
            ts = [0.0]
    ts = _ts(ts)
    device = same_device({"model": model, "the posteriors": path.view0})
    _check_sites(model, path)
    # one forward on a single point: clear errors for inputs or labels that do not fit, whether
    # vmap can run the network, and how large its activations are
    probe_noise = path.noise(1, torch.Generator().manual_seed(seed))  # leaves global RNG alone
    evaluator = _Evaluator(model, chunk_size or num_samples, batch_size)
    with torch.no_grad():
        try:
            out, pair_bytes = evaluator.probe(path.draw(0.0, probe_noise), x[:1],
                                              path.buffers_at(0.0))
        except RuntimeError as err:
            raise ValueError(f"inputs x of shape {tuple(x.shape)} do not fit the network: "
                             f"{err}") from err
    out = out[0]
    if chunk_size is None:  # bound the memory of one batched call
        per_draw = max(pair_bytes, 1) * min(batch_size, len(x))
        evaluator.chunk_size = int(min(num_samples, max(1, _MEMORY_BUDGET // per_draw)))
    model.likelihood.check_targets(out.expand(len(y), *out.shape[1:]), y)

    generator = torch.Generator().manual_seed(seed)
    weights = _bootstrap_weights(num_samples, num_bootstrap, generator).to(device)
    shared = path.noise(num_samples, generator) if common else None
    y = y.to(device)

    def evaluate(t: float, noise: Noise) -> tuple[torch.Tensor, Any]:
        if path.kind == "mixture":  # each endpoint's draws with its own buffers, weighted below
            ends = [(path.view0_draw(noise), path.buffers_at(0.0)),
                    (path.view1_draw(noise), path.buffers_at(1.0))]
        else:
            ends = [(path.draw(t, noise), path.buffers_at(t))]
        outputs = torch.cat([evaluator.outputs(d, x, b) for d, b in ends])
        if not regression:
            return outputs, None
        scales = [_noise_scale(model, d) for d, _ in ends]
        return outputs, (torch.cat(scales) if isinstance(scales[0], torch.Tensor)
                         else scales[0])

    rows: dict[str, list[torch.Tensor]] = {m: [] for m in metrics}
    cached = None
    for t in tqdm(ts, desc=f"marginal ({kind})", disable=not progress, leave=False):
        t = float(t)
        noise = shared if common else path.noise(num_samples, generator)
        if path.kind == "mixture":
            # (1 - t) q0 + t q1 exactly: the predictive is the weighted average of both
            # endpoints' draws (a stratified estimate), so its NLL is concave in t draw by draw
            if cached is None or not common:
                cached = evaluate(t, noise)
            outputs, noise_scale = cached
            w = torch.cat([(1 - t) * weights, t * weights], dim=1)
        else:
            outputs, noise_scale = evaluate(t, noise)
            w = weights
        if regression:
            values = _regression_metrics(outputs, noise_scale, y, w, metrics)
        else:
            values = _classification_metrics(outputs, y, w, metrics)
        for m in metrics:
            rows[m].append(values[m])
    table = {m: torch.stack(v, dim=1).cpu().numpy() for m, v in rows.items()}  # (B + 1, T)
    se = {m: v[1:].std(axis=0, ddof=1) for m, v in table.items()}
    if num_samples == 1 and path.kind_of_view() != POINT:
        warnings.warn("num_samples=1 cannot estimate a Monte-Carlo error: the standard errors "
                      "are NaN", RuntimeWarning, stacklevel=2)
        se = {m: np.full_like(v, np.nan) for m, v in se.items()}
    return LossCurve(
        ts=ts,
        values={m: v[0] for m, v in table.items()},
        se=se,
        replicates={m: v[1:] for m, v in table.items()},
        kind=kind, num_samples=num_samples, num_points=len(x), common=common,
        seconds=time.perf_counter() - started,
    )


def _metrics(metrics: str | Sequence[str] | None, available: tuple[str, ...]
             ) -> tuple[str, ...]:
    if metrics is None:
        return available
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    if not metrics:
        raise ValueError(f"metrics is empty; choose from {available} (or None for all)")
    unknown = [m for m in metrics if m not in available]
    if unknown:
        raise ValueError(f"unknown metrics {unknown} for this likelihood; choose from {available}")
    return metrics


def _check_inputs(model: BayesianNetwork, x: torch.Tensor) -> None:
    """Inputs must be floating point like the weights and, when the model knows its input
    shape, of shape ``(N, *input_shape)``."""
    dtype = next(model.net.parameters()).dtype
    if x.dtype != dtype:
        raise TypeError(f"inputs x have dtype {x.dtype} but the network's weights are {dtype}: "
                        f"convert them with x.to({dtype})")
    if model.input_shape is not None and tuple(x.shape[1:]) != tuple(model.input_shape):
        raise ValueError(f"inputs x of shape {tuple(x.shape)} do not fit the network: expected "
                         f"{('N', *model.input_shape)}")


def _check_sites(model: BayesianNetwork, path: BasePath) -> None:
    expected = {name: p.shape for name, p in model.net.named_parameters()}
    for site, shape in expected.items():
        if site not in path.view0.loc:
            raise ValueError(f"the posteriors have no site {site!r} of the model: they are over "
                             f"a different architecture")
        if path.view0.loc[site].shape != shape:
            raise ValueError(f"site {site!r} has shape {tuple(path.view0.loc[site].shape)} in "
                             f"the posteriors but {tuple(shape)} in the model")
    missing = [s for s in model.likelihood.sites if s not in path.view0.loc]
    if missing:
        raise ValueError(f"the posteriors have no site {missing[0]!r}, which the model's "
                         f"{type(model.likelihood).__name__} likelihood needs (a learned "
                         f"observation noise): use guides over the BayesianNetwork")
