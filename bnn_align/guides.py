"""Ready-to-train Pyro autoguides over a :class:`~bnn_align.BayesianNetwork`.

Each helper builds a standard Pyro autoguide whose means start at the network's own initial
weights (He-style initialisation, as in deterministic training) and whose scales start small, then
runs it once without data so its parameters exist. The result is an ordinary Pyro guide: train it
with :func:`bnn_align.fit` or your own SVI loop.
"""

from __future__ import annotations

import pyro
from pyro.infer import autoguide
from pyro.infer.autoguide.initialization import init_to_median, init_to_value

from ._checks import check_positive_float, positive_int
from .bayesian import BayesianNetwork

__all__ = ["mean_field", "diagonal", "low_rank", "full_rank", "delta"]


def _init_fn(model: BayesianNetwork):
    if not isinstance(model, BayesianNetwork):
        raise TypeError(f"guide helpers need a BayesianNetwork, got {type(model).__name__}")
    values = {name: p.detach().clone() for name, p in model.net.named_parameters()}
    return init_to_value(values=values, fallback=init_to_median)


def _check_scale(init_scale: float) -> float:
    return check_positive_float("init_scale", init_scale)


def _ready(guide: autoguide.AutoGuide) -> autoguide.AutoGuide:
    # Running the guide once without data creates its parameters (the model then only samples
    # its weights); the temporary param-store scope keeps Pyro's global store untouched.
    with pyro.get_param_store().scope():
        guide()
    return guide


def mean_field(model: BayesianNetwork, init_scale: float = 1e-3) -> autoguide.AutoNormal:
    """``AutoNormal``: an independent Normal per weight, one parameter pair per site."""
    return _ready(autoguide.AutoNormal(model, init_loc_fn=_init_fn(model),
                                       init_scale=_check_scale(init_scale)))


def diagonal(model: BayesianNetwork, init_scale: float = 1e-3) -> autoguide.AutoDiagonalNormal:
    """``AutoDiagonalNormal``: the same family as :func:`mean_field`, packed into one vector."""
    return _ready(autoguide.AutoDiagonalNormal(model, init_loc_fn=_init_fn(model),
                                               init_scale=_check_scale(init_scale)))


def low_rank(model: BayesianNetwork, rank: int = 10, init_scale: float = 1e-3
             ) -> autoguide.AutoLowRankMultivariateNormal:
    """``AutoLowRankMultivariateNormal`` of the given rank (covariance ``diag + rank-r``)."""
    positive_int(rank=rank)
    return _ready(autoguide.AutoLowRankMultivariateNormal(
        model, init_loc_fn=_init_fn(model), init_scale=_check_scale(init_scale), rank=rank))


def full_rank(model: BayesianNetwork, init_scale: float = 1e-3
              ) -> autoguide.AutoMultivariateNormal:
    """``AutoMultivariateNormal`` (a full covariance: only for small networks)."""
    return _ready(autoguide.AutoMultivariateNormal(model, init_loc_fn=_init_fn(model),
                                                   init_scale=_check_scale(init_scale)))


def delta(model: BayesianNetwork) -> autoguide.AutoDelta:
    """``AutoDelta``: a point estimate (MAP training with :func:`bnn_align.fit`)."""
    return _ready(autoguide.AutoDelta(model, init_loc_fn=_init_fn(model)))
