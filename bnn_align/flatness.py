"""Flatness of a minimum: the local energy of Pittorino et al. (ICML 2022).

The local energy at noise level ``sigma`` is the training error of the network whose every weight
is perturbed multiplicatively, ``theta * (1 + sigma * xi)`` with ``xi ~ N(0, 1)`` independent per
weight, averaged over draws of ``xi``. A flat minimum keeps a low error up to larger ``sigma``.
Because the noise is relative to each weight, the measure is invariant under the symmetries:
rescaling a unit (:func:`~bnn_align.rescale`) multiplies its weights and their noise alike, so
every draw computes the same function as the draw of the rescaled network, and permutations
only relabel weights (additive noise of a fixed size would not have this property).

:func:`local_energy` evaluates point estimates and the means of posteriors (the noise replaces
the posterior's own spread). Draws are evaluated as one batched call (``vmap`` over the draws,
as :func:`~bnn_align.marginal_loss` does), and the same ``xi`` is used at every ``sigma``
(common random numbers), so the curve is smooth in ``sigma``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from pyro.infer import autoguide
from tqdm.auto import tqdm

from ._checks import positive_int, same_device
from .bayesian import BayesianNetwork, Categorical, Gaussian, as_data_pair
from .marginal import _check_inputs, _Evaluator
from .posterior import as_gaussian, model_of

__all__ = ["local_energy", "LocalEnergy"]


@dataclass(frozen=True)
class LocalEnergy:
    """The result of :func:`local_energy`.

    Attributes
    ----------
    sigmas : ndarray of shape ``(K,)``
        The relative noise levels.
    mean, se : ndarray of shape ``(K,)``
        Mean over draws of the training error (classification error rate for a Categorical
        likelihood, mean squared error for a Gaussian one) and its standard error
        (standard deviation over draws / sqrt(num_draws)).
    metric : str
        ``"error"`` or ``"mse"``.
    num_draws : int
    """

    sigmas: np.ndarray
    mean: np.ndarray
    se: np.ndarray
    metric: str
    num_draws: int

    def to_dict(self) -> dict:
        """Plain-Python form (JSON-friendly)."""
        return {"sigmas": self.sigmas.tolist(), "mean": self.mean.tolist(),
                "se": self.se.tolist(), "metric": self.metric, "num_draws": self.num_draws}


def _check_sigmas(sigmas: Any) -> np.ndarray:
    if isinstance(sigmas, numbers.Real) and not isinstance(sigmas, bool):
        sigmas = [sigmas]
    try:
        values = np.asarray(sigmas, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        raise TypeError(f"sigmas must be a number or a sequence of numbers, got {sigmas!r}"
                        ) from None
    if len(values) == 0:
        raise ValueError("sigmas is empty: give at least one noise level")
    if not np.isfinite(values).all() or (values < 0).any():
        raise ValueError(f"sigmas must be finite and non-negative (relative noise levels), got "
                         f"{values.tolist()}")
    return values


def _buffers(obj: Any, model: BayesianNetwork) -> dict[str, torch.Tensor] | None:
    names = dict(model.net.named_buffers())
    if isinstance(obj, autoguide.AutoGuide):
        owner = model_of(obj)
        if isinstance(owner, BayesianNetwork):
            return dict(owner.net.named_buffers())
        return None
    if isinstance(obj, torch.nn.Module):
        return {k: v for k, v in obj.named_buffers() if k in names}
    if isinstance(obj, Mapping):
        return {k: v for k, v in obj.items() if k in names and isinstance(v, torch.Tensor)}
    return None


def local_energy(
    model: BayesianNetwork,
    posterior_or_weights: Any,
    data: Any,
    sigmas: Sequence[float] | float,
    *,
    num_draws: int = 32,
    seed: int = 0,
    batch_size: int = 1024,
    chunk_size: int | None = None,
    progress: bool = False,
) -> LocalEnergy:
    """Training error under multiplicative Gaussian weight noise, per noise level.

    Parameters
    ----------
    model : BayesianNetwork
        The network (and likelihood, which picks the metric).
    posterior_or_weights : posterior
        A guide (its means are used), a state dict or a module over ``model``'s network.
    data : (x, y) tensors or TensorDataset
        The data to measure the error on (Pittorino et al. use the training set).
    sigmas : float or sequence of float
        Relative noise levels, ``>= 0``; ``0`` gives the error of the unperturbed weights.
    num_draws : int
        Draws of the noise per level (the same draws at every level).
    seed : int
        Seed of the noise (a CPU generator, so any device gives the same numbers).
    batch_size, chunk_size : int
        Data points and draws per batched network call (default: all draws at once).
    progress : bool
        Show a tqdm bar over the noise levels.

    Returns
    -------
    LocalEnergy

    Raises
    ------
    ValueError
        Negative, infinite or no ``sigmas``; non-positive counts; posteriors over another
        architecture (naming the missing site); inputs that do not fit the network.
    TypeError
        A model that is not a BayesianNetwork, an unsupported posterior, data that is not a
        pair, an unsupported likelihood.

    Examples
    --------
    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import models
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(256, 4)
    >>> y = (x[:, 0] > 0).long()
    >>> model = ba.BayesianNetwork(models.mlp(4, [16], 2), input_shape=(4,))
    >>> energy = ba.local_energy(model, model.net.state_dict(), (x, y), [0.0, 0.5, 2.0],
    ...                          num_draws=16)
    >>> energy.metric, energy.mean.shape
    ('error', (3,))
    >>> float(energy.se[0])                     # no noise: every draw is the same network
    0.0
    >>> ba.local_energy(model, model.net, (x, y), [-0.1])
    Traceback (most recent call last):
        ...
    ValueError: sigmas must be finite and non-negative (relative noise levels), got [-0.1]
    """
    if not isinstance(model, BayesianNetwork):
        raise TypeError(f"model must be a BayesianNetwork, got {type(model).__name__}")
    levels = _check_sigmas(sigmas)
    positive_int(num_draws=num_draws, batch_size=batch_size)
    if chunk_size is not None:
        positive_int(chunk_size=chunk_size)
    x, y = as_data_pair(data)
    if isinstance(model.likelihood, Categorical):
        metric = "error"
    elif isinstance(model.likelihood, Gaussian):
        metric = "mse"
    else:
        raise TypeError(f"local_energy supports Categorical and Gaussian likelihoods, got "
                        f"{type(model.likelihood).__name__}")
    _check_inputs(model, x)
    means = as_gaussian(posterior_or_weights).loc
    weights = {}
    for name, param in model.net.named_parameters():
        if name not in means:
            raise ValueError(f"the posterior has no site {name!r} of the model: it is over a "
                             f"different architecture")
        if means[name].shape != param.shape:
            raise ValueError(f"site {name!r} has shape {tuple(means[name].shape)} in the "
                             f"posterior but {tuple(param.shape)} in the model")
        weights[name] = means[name]
    device = same_device({"model": model, "the posterior": means})
    buffers = _buffers(posterior_or_weights, model)
    generator = torch.Generator().manual_seed(seed)
    xi = {k: torch.randn(num_draws, *w.shape, generator=generator, dtype=w.dtype).to(device)
          for k, w in weights.items()}
    evaluator = _Evaluator(model, chunk_size or num_draws, batch_size)
    y = y.to(device)
    # one draw on one point first: whether vmap can run the network, clear errors otherwise
    try:
        evaluator.probe({k: w[None] for k, w in weights.items()}, x[:1], buffers)
    except RuntimeError as err:
        raise ValueError(f"inputs x of shape {tuple(x.shape)} do not fit the network: {err}"
                         ) from err
    mean, se = [], []
    for sigma in tqdm(levels, desc="local energy", disable=not progress, leave=False):
        draws = {k: w * (1 + float(sigma) * xi[k]) for k, w in weights.items()}
        out = evaluator.outputs(draws, x, buffers)  # (S, N, *out)
        if metric == "error":
            per_draw = (out.argmax(-1) != y).double().mean(1)
        else:
            diff = out.reshape(len(out), len(y), -1) - y.reshape(1, len(y), -1).to(out.dtype)
            per_draw = diff.double().pow(2).mean((1, 2))
        mean.append(float(per_draw.mean()))
        se.append(float(per_draw.std(unbiased=True)) / math.sqrt(num_draws)
                  if num_draws > 1 else float("nan"))
    return LocalEnergy(levels, np.asarray(mean), np.asarray(se), metric, int(num_draws))
