"""ArviZ diagnostics of posteriors before and after alignment.

* :func:`to_inference_data` draws from one or more posteriors into an ArviZ ``InferenceData``,
  one chain per posterior, with dims named after each tensor's axes (``"0.weight_out"``,
  ``"0.weight_in"``) and unit coordinates, optionally with a ``log_likelihood`` group so that
  ``az.loo`` and ``az.compare`` work for posteriors.
* :func:`rhat_report` treats two posteriors as two chains and reports R-hat per site before and
  after alignment: for a pair that is one distribution up to a relabelling, the multimodality
  shows as R-hat far above 1 and its removal as R-hat back near 1. Two independently trained
  variational posteriors stay different distributions when aligned, R-hat stays high (even
  saturated) for them, and the report says so and shows the alignment by the standardized
  differences of the means and their correlation instead.
* :func:`rhat_report` also takes ``K`` chains: a :class:`~bnn_align.MultiAlignment` (the
  posteriors of :func:`~bnn_align.match_many` before and after), a list of posteriors, a
  multi-chain :class:`~bnn_align.SamplePosterior` (every sample aligned with
  :func:`~bnn_align.align_samples`) or a :class:`~bnn_align.SampleAlignment`.
* :func:`transposition_distance` counts the transpositions between two alignments.
* :func:`plot_units` draws a forest plot of a few units' weights from both posteriors, before
  and after alignment.

Only ArviZ functions that both 0.23 (Python 3.11) and 1.x provide are used: ``from_dict``,
``rhat`` and ``plot_forest`` (``from_dict`` changed its signature in 1.0; both are handled).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ._checks import check_positive_float, positive_int, same_device
from .bayesian import BayesianNetwork, Categorical
from .matching.many import MultiAlignment, SampleAlignment, align_samples, match_many
from .matching.weights import Alignment, match
from .paths.interpolation import Mixture, _model
from .posterior import GaussianView, as_gaussian, paired_views
from .samples import SamplePosterior

__all__ = ["to_inference_data", "rhat_report", "RhatReport", "plot_units",
           "transposition_distance"]

_AXIS_NAMES = ("out", "in")


def _arviz():
    import warnings

    with warnings.catch_warnings():
        # ArviZ 0.23 announces its 1.0 refactor on import
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


def _arviz_major() -> int:
    return int(_arviz().__version__.split(".")[0])


def _from_dict(groups: dict[str, dict], coords: dict, dims: dict) -> Any:
    az = _arviz()
    if _arviz_major() >= 1:  # 1.x: one mapping of groups
        return az.from_dict(groups, coords=coords, dims=dims)
    return az.from_dict(**groups, coords=coords, dims=dims)


def _axis_dims(site: str, shape: Sequence[int]) -> list[str]:
    names = [_AXIS_NAMES[i] if i < 2 else f"k{i - 2}" for i in range(len(shape))]
    return [f"{site}_{name}" for name in names]


def _draws(posterior: Any, num_samples: int, generator: torch.Generator
           ) -> dict[str, torch.Tensor]:
    if isinstance(posterior, SamplePosterior):
        return posterior.samples
    if isinstance(posterior, Mixture):
        return posterior.sample(num_samples, generator)
    return as_gaussian(posterior, copy=False).sample(num_samples, generator)


def to_inference_data(
    posteriors: Any,
    num_samples: int = 500,
    sites: Sequence[str] | None = None,
    seed: int = 0,
    *,
    data: Any = None,
    model: BayesianNetwork | None = None,
    names: Sequence[str] | None = None,
) -> Any:
    """Draws from posteriors as an ArviZ ``InferenceData``, one chain per posterior.

    Parameters
    ----------
    posteriors : posterior or sequence of posteriors
        Guides, state dicts, modules or path points (``path.at(t)``) over the same network,
        on one device (any: the draws are made there and copied to numpy). A
        :class:`~bnn_align.SamplePosterior` gives its own chains, all their samples.
    num_samples : int
        Draws per posterior (per chain) for the posteriors that are not sample sets.
    sites : sequence of str, optional
        Sites to include (all by default).
    seed : int
        Seed of the draws.
    data : (x, y) tensors, optional
        Adds a ``log_likelihood`` group (variable ``"obs"``, dims ``("point",)``: the log
        density of every observation under every draw) and an ``observed_data`` group, so
        ``az.loo`` and ``az.compare`` work.
    model : BayesianNetwork, optional
        Needed with ``data`` when the posteriors are not guides over a BayesianNetwork.
    names : sequence of str, optional
        Chain coordinates (e.g. ``["guide_a", "guide_b"]``); ``0, 1, ...`` by default.

    Returns
    -------
    arviz.InferenceData
        ``posterior`` holds one variable per site of shape ``(chain, draw, *site_shape)``
        with dims ``"<site>_out"``, ``"<site>_in"``, ``"<site>_k0"``, ... and integer unit
        coordinates.

    Raises
    ------
    ValueError
        No posteriors, a non-positive ``num_samples``, posteriors over different
        architectures or with NaN parameters, unknown ``sites``, ``data`` without a model to
        evaluate it with, ``names`` of the wrong length.

    Examples
    --------
    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import guides, models
    >>> _ = torch.manual_seed(0)
    >>> model = ba.BayesianNetwork(models.mlp(4, [8], 3), input_shape=(4,))
    >>> guide_a = guides.mean_field(model)
    >>> guide_b = guides.mean_field(ba.BayesianNetwork(models.mlp(4, [8], 3), input_shape=(4,)))
    >>> idata = ba.to_inference_data([guide_a, guide_b], num_samples=10,
    ...                              names=["guide_a", "guide_b"])
    >>> weights = idata.posterior["0.weight"]
    >>> weights.dims, weights.shape
    (('chain', 'draw', '0.weight_out', '0.weight_in'), (2, 10, 8, 4))
    >>> weights.chain.values.tolist()
    ['guide_a', 'guide_b']

    With data, a ``log_likelihood`` group for ``az.loo``:

    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> idata = ba.to_inference_data(guide_a, num_samples=10, data=(x, y))
    >>> idata.log_likelihood["obs"].shape                         # (chain, draw, point)
    (1, 10, 32)
    """
    if not isinstance(posteriors, (list, tuple)):
        posteriors = [posteriors]
    if not posteriors:
        raise ValueError("posteriors is empty")
    positive_int(num_samples=num_samples)
    gaussian = [p.moments() if isinstance(p, SamplePosterior) else p for p in posteriors
                if not isinstance(p, Mixture)]
    for k, p in enumerate(gaussian[1:], start=1):  # same architecture, finite values
        paired_views(gaussian[0], p, ("posterior 0", f"posterior {k}"), copy=False)
    # a sample set keeps its chains
    posteriors = [c for p in posteriors
                  for c in (p.chains() if isinstance(p, SamplePosterior) else [p])]
    generator = torch.Generator().manual_seed(seed)
    chains = [_draws(p, num_samples, generator) for p in posteriors]
    lengths = [len(next(iter(c.values()))) for c in chains]
    if len(set(lengths)) > 1:
        raise ValueError(f"every chain needs the same number of draws, got {lengths} (sample "
                         f"sets give all their samples; pass num_samples equal to theirs)")
    available = list(chains[0])
    sites = list(sites) if sites is not None else available
    missing = [s for s in sites if s not in available]
    if missing:
        raise ValueError(f"unknown sites {missing}; the posteriors have {available}")
    posterior_group = {s: np.stack([c[s].cpu().numpy() for c in chains]) for s in sites}
    dims = {s: _axis_dims(s, chains[0][s].shape[1:]) for s in sites}
    coords: dict[str, Any] = {"chain": list(names) if names is not None else
                              list(range(len(chains)))}
    for s in sites:
        for dim, size in zip(dims[s], chains[0][s].shape[1:]):
            coords[dim] = np.arange(size)
    groups: dict[str, dict] = {"posterior": posterior_group}
    if data is not None:
        model = model or next((m for m in (p.model if isinstance(p, SamplePosterior)
                                           else _model(p) for p in posteriors)
                               if m is not None), None)
        if model is None:
            raise ValueError("data= needs the model: pass model= (a BayesianNetwork)")
        same_device({"model": model, "the posteriors": chains[0]})
        x, y = data
        groups["log_likelihood"] = {"obs": np.stack([_log_likelihood(model, c, x, y)
                                                     for c in chains])}
        groups["observed_data"] = {"obs": y.cpu().numpy()}
        dims["obs"] = ["point"]
        coords["point"] = np.arange(len(y))
    if names is not None and len(names) != len(chains):
        raise ValueError(f"names has {len(names)} entries for {len(chains)} posteriors")
    return _from_dict(groups, coords, dims)


def _log_likelihood(model: BayesianNetwork, draws: dict[str, torch.Tensor], x: torch.Tensor,
                    y: torch.Tensor) -> np.ndarray:
    """log p(y_i | x_i, theta_s) for every draw and point: ``(S, N)``."""
    from .marginal import _Evaluator, _noise_scale

    outputs = _Evaluator(model, 64, 1024).outputs(draws, x, None)
    y = y.to(outputs.device)
    if isinstance(model.likelihood, Categorical):
        logp = torch.log_softmax(outputs, -1).gather(
            -1, y.view(1, -1, 1).expand(len(outputs), -1, 1)).squeeze(-1)
    else:
        noise = _noise_scale(model, draws)
        if isinstance(noise, torch.Tensor):
            noise = noise.view(-1, *([1] * (outputs.dim() - 1)))
        logp = torch.distributions.Normal(outputs, noise).log_prob(y.unsqueeze(0))
        logp = logp.reshape(len(outputs), len(y), -1).sum(-1)
    return logp.cpu().numpy()


# --------------------------------------------------------------------------------- R-hat --
# ArviZ's rank-normalized split R-hat of two chains whose draws do not overlap: every draw of one
# chain ranks below every draw of the other, so the four half-chains' normal scores have means
# +-sqrt(2/pi) and variance 1 - 2/pi (many draws) whatever the distance: sqrt(1 + 8 / (3 pi - 6)).
_RHAT_CEILING_TWO_CHAINS = float(np.sqrt(1 + 8 / (3 * np.pi - 6)))


@dataclass(repr=False)
class RhatReport:
    """R-hat of every weight, treating two posteriors as two chains, and the standardized
    differences of their means, which show the alignment where R-hat cannot.

    R-hat asks whether two chains sample the same distribution. Two independently trained
    variational posteriors are different distributions even when perfectly aligned: where their
    means differ by more than their (often small) standard deviations, R-hat is far above 1 after
    alignment too, and for two chains that do not overlap it saturates (at about 1.83) however
    far apart they are. The standardized mean difference of every weight,
    ``d = (mu_a - mu_b) / sqrt(sd_a**2 + sd_b**2)``, keeps measuring the distance there, and
    the correlation of the two posteriors' means per site measures the alignment without any
    scale. R-hat is reported as informative only where most aligned weights overlap
    (``|d| <= separation``), that is for posteriors that should agree.

    Attributes
    ----------
    before, after : dict of str to ndarray
        Site -> R-hat of every weight (site-shaped) between ``guide_a`` and ``guide_b``, and
        between ``guide_a`` and the aligned ``guide_b``.
    threshold : float
        R-hat above which a weight counts as not mixed (1.01 by default).
    num_samples : int
        Draws per chain.
    standardized_diff_before, standardized_diff_after : dict of str to ndarray
        Site -> ``d`` of every weight (site-shaped, signed), from the posteriors' means and
        marginal standard deviations (exact, not from the draws). Where both standard
        deviations are zero (point estimates) ``d`` is 0 for equal means and +-inf otherwise.
    mean_correlation_before, mean_correlation_after : dict of str to float
        Site -> Pearson correlation between the two posteriors' means over the site's weights
        (NaN where either side's means are constant).
    separation : float
        ``|d|`` above which a weight's two posteriors count as separated (1 by default: the
        means differ by more than their combined standard deviation).
    num_chains : int
        ``K``, the number of chains. For ``K > 2`` (see :func:`rhat_report`) ``d`` is the
        unsigned ``sqrt(B / W)``: the standard deviation of the ``K`` means (``ddof=1``) over
        the root mean of the ``K`` variances, which is ``|d|`` for ``K = 2``; the correlation
        of the means is the average of chain 0's with each other chain's.

    Examples
    --------
    Made by :func:`rhat_report`; here for a posterior and a relabelled copy of it:

    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import diagnostics, guides, models
    >>> _ = torch.manual_seed(0)
    >>> model = ba.BayesianNetwork(models.mlp(4, [8], 3), input_shape=(4,))
    >>> guide_a = guides.mean_field(model, init_scale=0.1)
    >>> guide_b = ba.permute(guide_a, {"P_0": torch.randperm(8)})   # relabelled units
    >>> report = diagnostics.rhat_report((guide_a, guide_b), num_samples=200)
    >>> table = report.to_dataframe()                  # one row per site
    >>> table.index.tolist()
    ['0.weight', '0.bias', '2.weight', '2.bias']
    >>> bool((table["median_after"] < 1.05).all())     # R-hat back near 1 everywhere
    True
    >>> report.verdict()
    'R-hat is informative: after alignment 100% of the weights have |d| <= 1 ...'
    """

    before: dict[str, np.ndarray]
    after: dict[str, np.ndarray]
    threshold: float
    num_samples: int
    standardized_diff_before: dict[str, np.ndarray]
    standardized_diff_after: dict[str, np.ndarray]
    mean_correlation_before: dict[str, float]
    mean_correlation_after: dict[str, float]
    separation: float = 1.0
    num_chains: int = 2

    @property
    def sites(self) -> list[str]:
        """The sites reported, in the posteriors' order."""
        return list(self.before)

    @staticmethod
    def _pooled(values: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([v.reshape(-1) for v in values.values()])

    def _separated(self, d: np.ndarray) -> float:
        return float(np.mean(np.abs(d) > self.separation))

    @staticmethod
    def _informative(separated_after: float) -> bool:
        # R-hat can come back to 1 only if most aligned weights' posteriors overlap
        return separated_after <= 0.5

    @property
    def fraction_before(self) -> float:
        """Fraction of all weights with R-hat above the threshold before alignment."""
        return float(np.mean(self._pooled(self.before) > self.threshold))

    @property
    def fraction_after(self) -> float:
        """The same after alignment."""
        return float(np.mean(self._pooled(self.after) > self.threshold))

    @property
    def median_abs_d_before(self) -> float:
        """Median ``|d|`` over all weights before alignment."""
        return float(np.median(np.abs(self._pooled(self.standardized_diff_before))))

    @property
    def median_abs_d_after(self) -> float:
        """The same after alignment."""
        return float(np.median(np.abs(self._pooled(self.standardized_diff_after))))

    @property
    def separated_before(self) -> float:
        """Fraction of all weights with ``|d| > separation`` before alignment."""
        return self._separated(self._pooled(self.standardized_diff_before))

    @property
    def separated_after(self) -> float:
        """The same after alignment."""
        return self._separated(self._pooled(self.standardized_diff_after))

    @property
    def rhat_informative(self) -> bool:
        """Whether R-hat can tell anything here: at most half of all aligned weights are
        separated. Otherwise the aligned posteriors are different distributions, R-hat stays
        high (or saturated) before and after, and ``|d|`` and the correlation of the means are
        the measures of the alignment."""
        return self._informative(self.separated_after)

    def rows(self) -> list[dict]:
        """One record per site: weights, median R-hat and fraction above the threshold, median
        ``|d|``, fraction separated and correlation of the means (each before and after), and
        whether R-hat is informative for the site."""
        out = []
        for s in self.sites:
            b, a = self.before[s].reshape(-1), self.after[s].reshape(-1)
            d_b = np.abs(self.standardized_diff_before[s].reshape(-1))
            d_a = np.abs(self.standardized_diff_after[s].reshape(-1))
            separated_after = self._separated(d_a)
            out.append({"site": s, "weights": len(b), "median_before": float(np.median(b)),
                        "median_after": float(np.median(a)),
                        "above_before": float(np.mean(b > self.threshold)),
                        "above_after": float(np.mean(a > self.threshold)),
                        "median_abs_d_before": float(np.median(d_b)),
                        "median_abs_d_after": float(np.median(d_a)),
                        "separated_before": self._separated(d_b),
                        "separated_after": separated_after,
                        "mean_corr_before": self.mean_correlation_before[s],
                        "mean_corr_after": self.mean_correlation_after[s],
                        "rhat_informative": self._informative(separated_after)})
        return out

    def to_dataframe(self) -> Any:
        """:meth:`rows` as a pandas DataFrame indexed by site."""
        import pandas as pd

        return pd.DataFrame(self.rows()).set_index("site")

    def verdict(self) -> str:
        """Whether R-hat is informative for this pair, and why, naming the sites that differ
        from the verdict on all weights."""
        rows = self.rows()
        sep = format(self.separation, "g")
        if self.rhat_informative:
            text = (f"R-hat is informative: after alignment {1 - self.separated_after:.0%} of the "
                    f"weights have |d| <= {sep} (median |d| {self.median_abs_d_after:.3g}), where "
                    f"the two posteriors overlap and R-hat is not saturated, so its fall measures "
                    f"the alignment; R-hat above {self.threshold:g} after alignment marks weights "
                    f"whose posteriors still differ.")
            exceptions = [r["site"] for r in rows if not r["rhat_informative"]]
            if exceptions:
                text += (f" Not at {', '.join(exceptions)}: most of their aligned weights have "
                         f"|d| > {sep}, so judge them by |d| and the correlation of the means.")
            return text
        text = (f"R-hat is uninformative here: after alignment {self.separated_after:.0%} of the "
                f"weights have |d| > {sep} (median |d| {self.median_abs_d_after:.3g}). The two "
                f"posteriors are different distributions even when aligned, so R-hat stays above "
                f"{self.threshold:g} before and after, and saturates (about "
                f"{_RHAT_CEILING_TWO_CHAINS:.2f} for two chains) where they do not overlap. Judge "
                f"the alignment by the fall of |d| and the rise of the correlation of the means; "
                f"keep R-hat for chains that should agree.")
        exceptions = [r["site"] for r in rows if r["rhat_informative"]]
        if exceptions:
            text += f" (R-hat is informative at {', '.join(exceptions)} only.)"
        return text

    def __str__(self) -> str:
        rows = self.rows()
        head = (f"{'site':<28}{'weights':>9}{'R-hat before':>14}{'after':>9}"
                f"{'> ' + format(self.threshold, 'g') + ' before':>16}{'after':>9}")
        title = ("R-hat, the two posteriors as two chains:" if self.num_chains == 2 else
                 f"R-hat of the {self.num_chains} chains:")
        lines = [title, head, "-" * len(head)]
        for r in rows:
            lines.append(f"{r['site']:<28}{r['weights']:>9}{r['median_before']:>14.3f}"
                         f"{r['median_after']:>9.3f}{r['above_before']:>16.1%}"
                         f"{r['above_after']:>9.1%}")
        lines.append(f"{'all weights':<28}{'':>9}{'':>14}{'':>9}{self.fraction_before:>16.1%}"
                     f"{self.fraction_after:>9.1%}")
        head = (f"{'site':<28}{'|d| before':>11}{'after':>9}"
                f"{'> ' + format(self.separation, 'g') + ' before':>13}{'after':>9}"
                f"{'corr before':>13}{'after':>9}{'R-hat':>15}")
        lines += ["", "Standardized mean differences d = (mu_a - mu_b) / sqrt(sd_a^2 + sd_b^2):"
                  if self.num_chains == 2 else
                  "Spread of the chains' means d = sqrt(B / W) (sd of the means over the root "
                  "mean variance):",
                  f"median |d|, fraction of |d| > {self.separation:g}, correlation of the means",
                  head, "-" * len(head)]
        for r in rows:
            lines.append(f"{r['site']:<28}{r['median_abs_d_before']:>11.3g}"
                         f"{r['median_abs_d_after']:>9.3g}{r['separated_before']:>13.1%}"
                         f"{r['separated_after']:>9.1%}{r['mean_corr_before']:>13.3f}"
                         f"{r['mean_corr_after']:>9.3f}"
                         f"{'informative' if r['rhat_informative'] else 'uninformative':>15}")
        lines.append(f"{'all weights':<28}{self.median_abs_d_before:>11.3g}"
                     f"{self.median_abs_d_after:>9.3g}{self.separated_before:>13.1%}"
                     f"{self.separated_after:>9.1%}")
        lines += ["", *textwrap.wrap(self.verdict(), width=len(head))]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"RhatReport(sites={self.sites}, num_samples={self.num_samples}, "
                f"fraction_before={self.fraction_before:.3f}, "
                f"fraction_after={self.fraction_after:.3f}, "
                f"median_abs_d_before={self.median_abs_d_before:.3g}, "
                f"median_abs_d_after={self.median_abs_d_after:.3g}, "
                f"rhat_informative={self.rhat_informative})")


def _standardized_differences(view_a: GaussianView, view_b: GaussianView,
                              sites: Sequence[str]) -> dict[str, np.ndarray]:
    """``(mu_a - mu_b) / sqrt(sd_a**2 + sd_b**2)`` per weight, in float64."""
    sd_a, sd_b = view_a.stddev(), view_b.stddev()
    out = {}
    for s in sites:
        diff = _float64(view_a.loc[s]) - _float64(view_b.loc[s])
        spread = np.hypot(_float64(sd_a[s]), _float64(sd_b[s]))
        with np.errstate(divide="ignore", invalid="ignore"):
            d = diff / spread
        # two point estimates: equal means agree, any other difference is infinitely many sds
        point = spread == 0
        d[point] = np.where(diff[point] == 0, 0.0, np.copysign(np.inf, diff[point]))
        out[s] = d
    return out


def _mean_correlations(view_a: GaussianView, view_b: GaussianView, sites: Sequence[str]
                       ) -> dict[str, float]:
    out = {}
    for s in sites:
        x = _float64(view_a.loc[s]).reshape(-1)
        y = _float64(view_b.loc[s]).reshape(-1)
        x, y = x - x.mean(), y - y.mean()
        norm = np.sqrt((x @ x) * (y @ y))
        out[s] = float(x @ y / norm) if norm > 0 else float("nan")
    return out


def _average_correlations(views: Sequence[GaussianView], sites: Sequence[str]
                          ) -> dict[str, float]:
    """Site -> the average correlation of the first view's means with each other view's."""
    pairs = [_mean_correlations(views[0], v, sites) for v in views[1:]]
    return {s: float(np.mean([p[s] for p in pairs])) for s in sites}


def _float64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def _alignment(target: Any, method: str, seed: int) -> Alignment:
    if isinstance(target, Alignment):
        if target.guide_a is None or target.guide_b is None:
            raise ValueError("this Alignment does not hold its posteriors (it was loaded from "
                             "disk): pass (guide_a, guide_b) instead")
        return target
    if isinstance(target, (tuple, list)) and len(target) == 2:
        return match(target[0], target[1], method=method, seed=seed)
    raise TypeError("expected an Alignment from bnn_align.match or a pair (guide_a, guide_b), "
                    f"got {type(target).__name__}")


def _rhat(idata: Any) -> dict[str, np.ndarray]:
    az = _arviz()
    result = az.rhat(idata)
    return {name: np.asarray(result[name]) for name in result.data_vars}


def _spread_ratios(views: Sequence[GaussianView], sites: Sequence[str]
                   ) -> dict[str, np.ndarray]:
    """``sqrt(B / W)`` per weight: the standard deviation of the views' means over the root
    mean of their variances (``|d|`` for two views; 0 for equal means, inf for separated points).
    """
    sds = [v.stddev() for v in views]
    out = {}
    for s in sites:
        means = np.stack([_float64(v.loc[s]) for v in views])
        between = means.std(axis=0, ddof=1)
        within = np.sqrt(np.mean(np.stack([_float64(sd[s]) ** 2 for sd in sds]), axis=0))
        with np.errstate(divide="ignore", invalid="ignore"):
            d = between / within
        d[within == 0] = np.where(between[within == 0] == 0, 0.0, np.inf)
        out[s] = d
    return out


def _chain_views(chains: Sequence[Any]) -> list[GaussianView]:
    return [c.moments() if isinstance(c, SamplePosterior) else as_gaussian(c, copy=False)
            for c in chains]


def _many_chains(target: Any, method: str, seed: int) -> tuple[list, list] | None:
    """The chains before and after alignment for the ``K``-chain forms of the target, or None
    for an Alignment or a pair."""
    if isinstance(target, MultiAlignment):
        return list(target.posteriors), list(target.aligned)
    if (isinstance(target, (list, tuple)) and len(target) >= 2
            and all(isinstance(t, SamplePosterior) for t in target)):
        target = _pooled_chains(target)  # several MCMC runs: their chains side by side
    if isinstance(target, SamplePosterior):
        if target.num_chains < 2:
            raise ValueError("a sample set needs at least 2 chains for R-hat "
                             f"(num_chains={target.num_chains})")
        target = align_samples(None, target, method=method, seed=seed)
    if isinstance(target, SampleAlignment):
        if target.samples.num_chains < 2:
            raise ValueError("the aligned sample set has 1 chain: R-hat needs at least 2")
        return target.samples.chains(), target.aligned.chains()
    if isinstance(target, (list, tuple)) and len(target) > 2:
        result = match_many(list(target), method=method, seed=seed)
        return list(result.posteriors), list(result.aligned)
    return None


def _pooled_chains(runs: Sequence[SamplePosterior]) -> SamplePosterior:
    """Sample sets (MCMC runs) as one set whose chains are all of theirs."""
    lengths = {r.num_samples // r.num_chains for r in runs}
    if len(lengths) > 1:
        raise ValueError(f"the runs' chains must have one length to be compared as chains, got "
                         f"{sorted(lengths)} draws per chain")
    first = runs[0]
    for k, r in enumerate(runs[1:], start=1):
        paired_views(first.moments(), r.moments(), ("runs[0]", f"runs[{k}]"), copy=False)
    samples = {s: torch.cat([r.samples[s] for r in runs]) for s in first.sites}
    return first.with_samples(samples, num_chains=sum(r.num_chains for r in runs))


def transposition_distance(p: Any, q: Any) -> int:
    """The number of transpositions between two alignments: the fewest swaps of two units
    that turn permutations ``p`` into ``q``, summed over groups (``n - cycles(p^-1 o q)`` per
    group; Xiao, Liu and Bamler, 2023).

    Parameters
    ----------
    p, q : mapping of str to permutation, or Alignment
        Permutations of the same groups (an :class:`~bnn_align.Alignment`'s ``perms`` are
        taken).

    Returns
    -------
    int
        0 for equal alignments, at most ``sum_g (n_g - 1)``.

    Raises
    ------
    ValueError
        Different groups, or values that are not permutations of one length.

    Examples
    --------
    >>> import torch
    >>> from bnn_align import diagnostics
    >>> p = {"P_0": torch.tensor([0, 1, 2, 3])}
    >>> diagnostics.transposition_distance(p, {"P_0": torch.tensor([1, 0, 2, 3])})
    1
    >>> diagnostics.transposition_distance(p, {"P_0": torch.tensor([1, 2, 3, 0])})  # a 4-cycle
    3
    """
    from .symmetry.permutation import check_perms

    p = p.perms if isinstance(p, Alignment) else p
    q = q.perms if isinstance(q, Alignment) else q
    if not hasattr(p, "keys") or not hasattr(q, "keys") or set(p) != set(q):
        raise ValueError("p and q must be permutations of the same groups (mappings of group "
                         "name to permutation)")
    p = check_perms(p, {g: len(torch.as_tensor(v)) for g, v in p.items()})
    q = check_perms(q, {g: len(p[g]) for g in p})
    total = 0
    for g in p:
        r = torch.argsort(p[g])[q[g]].numpy()
        seen = np.zeros(len(r), dtype=bool)
        cycles = 0
        for start in range(len(r)):
            if not seen[start]:
                cycles += 1
                i = start
                while not seen[i]:
                    seen[i] = True
                    i = r[i]
        total += len(r) - cycles
    return int(total)


def rhat_report(alignment: Any, *, num_samples: int = 500, sites: Sequence[str] | None = None,
                seed: int = 0, threshold: float = 1.01, method: str = "wasserstein",
                separation: float = 1.0) -> RhatReport:
    """R-hat per site with the two posteriors as two chains, before and after alignment, and
    the standardized differences of their means, which show the alignment where R-hat cannot.

    Parameters
    ----------
    alignment : Alignment, (guide_a, guide_b), MultiAlignment, SampleAlignment, SamplePosterior or list
        The result of :func:`bnn_align.match` (which keeps its posteriors), or a pair to match
        now with ``method``. ``K`` chains: a :class:`~bnn_align.MultiAlignment` (its
        posteriors before, its aligned ones after), a list of three or more posteriors
        (matched now with :func:`~bnn_align.match_many`), a list of two or more sample sets
        (MCMC runs: their chains side by side, aligned sample by sample), a
        :class:`~bnn_align.SamplePosterior` of two or more chains (every sample aligned now
        with :func:`~bnn_align.align_samples` to the chains' barycenter) or a
        :class:`~bnn_align.SampleAlignment` of one.
    num_samples : int
        Draws per posterior (per chain); sample sets give all their samples.
    sites : sequence of str, optional
        Sites to report (all by default).
    seed : int
        Seed of the draws (the same draws of ``guide_a`` are used before and after).
    threshold : float
        R-hat above which a weight counts as not mixed.
    method : str
        The :func:`~bnn_align.match` method for a pair.
    separation : float
        ``|d|`` above which a weight's two posteriors count as separated, and the bound under
        which most aligned weights must stay for R-hat to count as informative.

    Returns
    -------
    RhatReport
        ``print(report)`` shows both tables and whether R-hat is informative;
        ``report.to_dataframe()`` has one row per site.

    Notes
    -----
    R-hat is the right check for a pair that should be one distribution once aligned (a
    posterior and a relabelled copy of it, two MCMC runs): it is near 1 after alignment. Two
    independently trained variational posteriors are narrow and their aligned means still
    differ by many standard deviations, so they are different distributions: R-hat is high
    before and after, and saturated where the draws do not overlap, so its fractions cannot
    show the alignment. The report says so (``report.rhat_informative`` is False when more
    than half of the aligned weights have ``|d| > separation``); per weight,
    ``d = (mu_a - mu_b) / sqrt(sd_a**2 + sd_b**2)`` and the correlation of the means per site
    then show what the alignment did.

    Raises
    ------
    ValueError
        A loaded :class:`~bnn_align.Alignment` (it holds no posteriors), a non-positive
        ``separation`` or ``num_samples``, unknown ``sites``, and what :func:`~bnn_align.match`
        raises for a pair.
    TypeError
        Neither an Alignment nor a pair of posteriors.

    Examples
    --------
    A posterior and a copy of it with relabelled hidden units are one distribution: R-hat is
    high before alignment and back near 1 after it.

    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import diagnostics, guides, models
    >>> _ = torch.manual_seed(0)
    >>> model = ba.BayesianNetwork(models.mlp(4, [8], 3), input_shape=(4,))
    >>> guide_a = guides.mean_field(model, init_scale=0.1)
    >>> guide_b = ba.permute(guide_a, {"P_0": torch.randperm(8)})   # relabelled units
    >>> report = diagnostics.rhat_report((guide_a, guide_b), num_samples=200)
    >>> report.rhat_informative
    True
    >>> report.fraction_before > 0.5, report.fraction_after < 0.1
    (True, True)
    >>> report.median_abs_d_after                      # the aligned means are equal
    0.0
    """
    check_positive_float("separation", separation)
    many = _many_chains(alignment, method, seed)
    if many is not None:
        before_chains, after_chains = many
        before = _rhat(to_inference_data(before_chains, num_samples, sites, seed))
        after = _rhat(to_inference_data(after_chains, num_samples, sites, seed))
        reported = list(before)
        views_b, views_a = _chain_views(before_chains), _chain_views(after_chains)
        count = sum(c.num_chains if isinstance(c, SamplePosterior) else 1
                    for c in before_chains)
        return RhatReport(before, after, threshold, num_samples,
                          _spread_ratios(views_b, reported), _spread_ratios(views_a, reported),
                          _average_correlations(views_b, reported),
                          _average_correlations(views_a, reported), float(separation), count)
    result = _alignment(alignment, method, seed)
    a = result.guide_a
    before = _rhat(to_inference_data([a, result.guide_b], num_samples, sites, seed))
    after = _rhat(to_inference_data([a, result.aligned], num_samples, sites, seed))
    view_a, view_b = paired_views(a, result.guide_b, ("guide_a", "guide_b"), copy=False)
    _, view_aligned = paired_views(a, result.aligned, ("guide_a", "aligned guide_b"),
                                   copy=False)
    reported = list(before)
    return RhatReport(before, after, threshold, num_samples,
                      _standardized_differences(view_a, view_b, reported),
                      _standardized_differences(view_a, view_aligned, reported),
                      _mean_correlations(view_a, view_b, reported),
                      _mean_correlations(view_a, view_aligned, reported), float(separation))


# ------------------------------------------------------------------------------ forest plot --
def plot_units(alignment: Any, site: str | None = None, units: Sequence[int] = (0, 1, 2),
               inputs: Sequence[int] = (0, 1, 2), *, num_samples: int = 500, seed: int = 0,
               method: str = "wasserstein") -> Any:
    """Forest plots of a few units' incoming weights, before and after alignment.

    Parameters
    ----------
    alignment : Alignment or (guide_a, guide_b)
    site : str, optional
        A weight whose first axis holds units (default: the first such site of the spec).
    units : sequence of int
        Which units (rows of ``site``) to show.
    inputs : sequence of int
        Which incoming weights (entries of the second axis) of each unit to show.
    num_samples : int
        Draws per posterior.
    seed : int
        Seed of the draws.
    method : str
        The :func:`~bnn_align.match` method for a pair.

    Returns
    -------
    matplotlib.figure.Figure
        Two panels: ``guide_a`` against ``guide_b`` and against the aligned ``guide_b``. Where
        the alignment found the unit's counterpart, its intervals overlap after alignment.
        With ArviZ 1.x, whose forest plots each own a chart, a list of two figures (before,
        after).

    Raises
    ------
    ValueError
        An unknown site or one without a unit axis and an input axis, ``units`` or ``inputs``
        out of range, a spec without permuted units (when ``site`` is not given).

    Examples
    --------
    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import diagnostics, guides, models
    >>> _ = torch.manual_seed(0)
    >>> model = ba.BayesianNetwork(models.mlp(4, [8], 3), input_shape=(4,))
    >>> guide_a = guides.mean_field(model, init_scale=0.1)
    >>> guide_b = ba.permute(guide_a, {"P_0": torch.randperm(8)})   # relabelled units
    >>> figure = diagnostics.plot_units((guide_a, guide_b), num_samples=50)
    >>> [axis.get_title() for axis in figure.axes]
    ['0.weight: before alignment', '0.weight: after alignment']
    >>> diagnostics.plot_units((guide_a, guide_b), units=(8,))
    Traceback (most recent call last):
        ...
    ValueError: units [8] out of range for site '0.weight' of shape (8, 4)
    >>> import matplotlib.pyplot as plt
    >>> plt.close(figure)
    """
    import matplotlib.pyplot as plt

    az = _arviz()
    result = _alignment(alignment, method, seed)
    if site is None:
        site = next((s for s, e in result.spec.axes_to_perm.items()
                     if len(e) >= 2 and e[0] is not None), None)
        if site is None:
            raise ValueError("no site with permuted units in the spec; pass site=")
    shape = as_gaussian(result.guide_a, copy=False).loc.get(site)
    if shape is None:
        raise ValueError(f"unknown site {site!r}")
    shape = tuple(shape.shape)
    if len(shape) < 2:
        raise ValueError(f"site {site!r} has shape {shape}; plot_units needs a weight matrix")
    for label, idx, n in (("units", units, shape[0]), ("inputs", inputs, shape[1])):
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise ValueError(f"{label} {bad} out of range for site {site!r} of shape {shape}")
    titles = ("before alignment", "after alignment")
    labels = [f"unit {u}, in {i}" for u in units for i in inputs]
    panels = []
    for other in (result.guide_b, result.aligned):
        data = []
        for posterior in (result.guide_a, other):
            draws = _draws(posterior, num_samples, torch.Generator().manual_seed(seed))[site]
            columns = draws[:, list(units)][:, :, list(inputs)].reshape(num_samples, -1)
            entries = {label: columns[None, :, k].cpu().numpy()
                       for k, label in enumerate(labels)}
            data.append(_from_dict({"posterior": entries}, {}, {}))
        panels.append(data)
    if _arviz_major() >= 1:
        return _forest_arviz1(az, panels, labels, site, titles)
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 + 0.45 * len(units) * len(inputs)),
                             sharex=True)
    for ax, data, title in zip(axes, panels, titles):
        az.plot_forest(data, model_names=["guide_a", "guide_b"], var_names=labels,
                       combined=True, ax=ax)
        ax.set_title(f"{site}: {title}")
    fig.tight_layout()
    return fig


def _forest_arviz1(az: Any, panels: list, labels: list[str], site: str,
                   titles: Sequence[str]) -> list:
    """ArviZ 1.x (Python >= 3.12): arviz-plots draws every forest plot in a chart of its own
    and takes the models as a mapping, so the two panels come back as two figures.
    Not exercised by the test suite, which runs on ArviZ 0.23 (Python 3.11)."""
    figures = []
    for data, title in zip(panels, titles):
        collection = az.plot_forest({"guide_a": data[0], "guide_b": data[1]},
                                    var_names=labels, combined=True, backend="matplotlib")
        figure = collection.viz["chart"].item()
        figure.suptitle(f"{site}: {title}")
        figures.append(figure)
    return figures
