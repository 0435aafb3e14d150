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
    """``AutoNormal``: an independent Normal per weight, one parameter pair per site.

    Parameters
    ----------
    model : BayesianNetwork
        The model; its network's current weights become the guide's initial means.
    init_scale : float
        Initial standard deviation of every weight (positive).

    Returns
    -------
    pyro.infer.autoguide.AutoNormal
        Ready to train (its parameters exist): ``locs.<site>`` and ``scales.<site>`` of the
        site's shape.

    Raises
    ------
    TypeError
        ``model`` is not a :class:`~bnn_align.BayesianNetwork`.
    ValueError
        A non-positive ``init_scale``.

    Examples
    --------
    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import guides, models
    >>> _ = torch.manual_seed(0)
    >>> model = ba.BayesianNetwork(models.mlp(4, [8], 3), input_shape=(4,))
    >>> guide = guides.mean_field(model, init_scale=1e-3)
    >>> view = ba.as_gaussian(guide)
    >>> view.kind, view.sites
    ('diagonal', ['0.weight', '0.bias', '2.weight', '2.bias'])
    >>> torch.equal(view.loc["0.weight"], model.net[0].weight)   # means start at the weights
    True
    >>> float(view.scale["0.weight"].max())
    0.001...
    """
    return _ready(autoguide.AutoNormal(model, init_loc_fn=_init_fn(model),
                                       init_scale=_check_scale(init_scale)))


def diagonal(model: BayesianNetwork, init_scale: float = 1e-3) -> autoguide.AutoDiagonalNormal:
    """``AutoDiagonalNormal``: the same family as :func:`mean_field`, packed into one vector.

    Parameters
    ----------
    model : BayesianNetwork
        The model; its network's current weights become the guide's initial means.
    init_scale : float
        Initial standard deviation of every weight (positive).

    Returns
    -------
    pyro.infer.autoguide.AutoDiagonalNormal
        Ready to train; ``loc`` and ``scale`` of shape ``(D,)`` for ``D`` weights in all.

    Raises
    ------
    TypeError
        ``model`` is not a :class:`~bnn_align.BayesianNetwork`.
    ValueError
        A non-positive ``init_scale``.

    Examples
    --------
    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import guides, models
    >>> _ = torch.manual_seed(0)
    >>> model = ba.BayesianNetwork(models.mlp(4, [8], 3), input_shape=(4,))
    >>> guide = guides.diagonal(model)
    >>> guide.loc.shape                       # 4 * 8 + 8 + 8 * 3 + 3 weights
    torch.Size([67])
    >>> ba.as_gaussian(guide).loc["2.weight"].shape
    torch.Size([3, 8])
    """
    return _ready(autoguide.AutoDiagonalNormal(model, init_loc_fn=_init_fn(model),
                                               init_scale=_check_scale(init_scale)))


def low_rank(model: BayesianNetwork, rank: int = 10, init_scale: float = 1e-3
             ) -> autoguide.AutoLowRankMultivariateNormal:
    """``AutoLowRankMultivariateNormal`` of the given rank (covariance ``diag + rank-r``).

    Parameters
    ----------
    model : BayesianNetwork
        The model; its network's current weights become the guide's initial means.
    rank : int
        Columns of the covariance factor.
    init_scale : float
        Initial standard deviation of every weight (positive).

    Returns
    -------
    pyro.infer.autoguide.AutoLowRankMultivariateNormal
        Ready to train; ``loc`` and ``scale`` of shape ``(D,)``, ``cov_factor`` of shape
        ``(D, rank)``.

    Raises
    ------
    TypeError
        ``model`` is not a :class:`~bnn_align.BayesianNetwork`.
    ValueError
        A non-positive ``init_scale`` or ``rank``.

    Examples
    --------
    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import guides, models
    >>> _ = torch.manual_seed(0)
    >>> model = ba.BayesianNetwork(models.mlp(4, [8], 3), input_shape=(4,))
    >>> guide = guides.low_rank(model, rank=2)
    >>> guide.cov_factor.shape
    torch.Size([67, 2])
    >>> view = ba.as_gaussian(guide)
    >>> view.kind, view.rank, view.factor["0.weight"].shape
    ('low_rank', 2, torch.Size([8, 4, 2]))
    >>> guides.low_rank(model, rank=0)
    Traceback (most recent call last):
        ...
    ValueError: rank must be a positive integer, got 0
    """
    positive_int(rank=rank)
    return _ready(autoguide.AutoLowRankMultivariateNormal(
        model, init_loc_fn=_init_fn(model), init_scale=_check_scale(init_scale), rank=rank))


def full_rank(model: BayesianNetwork, init_scale: float = 1e-3
              ) -> autoguide.AutoMultivariateNormal:
    """``AutoMultivariateNormal`` (a full covariance: only for small networks).

    Parameters
    ----------
    model : BayesianNetwork
        The model; its network's current weights become the guide's initial means.
    init_scale : float
        Initial standard deviation of every weight (positive).

    Returns
    -------
    pyro.infer.autoguide.AutoMultivariateNormal
        Ready to train; ``loc`` of shape ``(D,)`` and a ``(D, D)`` Cholesky factor, so memory
        grows with the square of the number of weights.

    Raises
    ------
    TypeError
        ``model`` is not a :class:`~bnn_align.BayesianNetwork`.
    ValueError
        A non-positive ``init_scale``.

    Examples
    --------
    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import guides, models
    >>> _ = torch.manual_seed(0)
    >>> model = ba.BayesianNetwork(models.mlp(4, [8], 3), input_shape=(4,))
    >>> guide = guides.full_rank(model)
    >>> guide.scale_tril.shape
    torch.Size([67, 67])
    >>> ba.as_gaussian(guide).kind
    'full_rank'
    """
    return _ready(autoguide.AutoMultivariateNormal(model, init_loc_fn=_init_fn(model),
                                                   init_scale=_check_scale(init_scale)))


def delta(model: BayesianNetwork) -> autoguide.AutoDelta:
    """``AutoDelta``: a point estimate (MAP training with :func:`bnn_align.fit`).

    Parameters
    ----------
    model : BayesianNetwork
        The model; its network's current weights become the guide's initial means.

    Returns
    -------
    pyro.infer.autoguide.AutoDelta
        Ready to train; one parameter per site, of the site's shape.

    Raises
    ------
    TypeError
        ``model`` is not a :class:`~bnn_align.BayesianNetwork`.

    Examples
    --------
    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import guides, models
    >>> _ = torch.manual_seed(0)
    >>> model = ba.BayesianNetwork(models.mlp(4, [8], 3), input_shape=(4,))
    >>> guide = guides.delta(model)
    >>> ba.as_gaussian(guide).kind
    'point'
    >>> guides.delta(model.net)
    Traceback (most recent call last):
        ...
    TypeError: guide helpers need a BayesianNetwork, got Sequential
    """
    return _ready(autoguide.AutoDelta(model, init_loc_fn=_init_fn(model)))
