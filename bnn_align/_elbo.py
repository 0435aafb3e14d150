"""The network for many weight draws at once, the negative ELBO of a Gaussian posterior, and
the loop that trains tensors on it along a path.

All need only the model and a :class:`~bnn_align.posterior.GaussianView`, so they sit low in the
package: :mod:`bnn_align.marginal` evaluates paths with :func:`forward_draws`, and training
objectives over posteriors that are functions of other tensors (the bends of a curve, a relaxed
permutation of a guide) differentiate :func:`negative_elbo` in :func:`minimise_along_path`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from .bayesian import BayesianNetwork, DecayingAdam
from .posterior import FULL_RANK, POINT, GaussianView

Forward = Callable[[Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor]


def forward_draws(net: torch.nn.Module, state: Mapping[str, torch.Tensor],
                  vectorized: bool = True) -> Forward:
    """``f(weights, x)``: the network's outputs ``(S, N, *out)`` for weights given as
    site -> ``(S, *site_shape)`` and inputs ``x`` of shape ``(N, *input_shape)``.

    ``state`` holds the tensors every draw shares (buffers); the weights override it. With
    ``vectorized`` the draws run under ``torch.func.vmap``, otherwise one after another (for
    networks ``vmap`` cannot run, and for a single draw, where a plain call is cheaper).
    Differentiable in the weights.
    """
    def single(w: Mapping[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        return functional_call(net, {**state, **w}, (inputs,))

    if vectorized:
        return vmap(single, in_dims=(0, None))

    def one_by_one(w: Mapping[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        count = next(iter(w.values())).shape[0]
        return torch.stack([single({k: v[i] for k, v in w.items()}, inputs)
                            for i in range(count)])

    return one_by_one


@dataclass(frozen=True)
class PriorTerms:
    """The model's prior, read once: per weight site its distribution and, when every site has
    a Normal prior, the packed prior means and scales ``(D,)`` for the analytic KL."""

    dists: dict[str, torch.distributions.Distribution]
    loc: torch.Tensor | None
    scale: torch.Tensor | None

    @property
    def normal(self) -> bool:
        return self.loc is not None


def prior_terms(model: BayesianNetwork) -> PriorTerms:
    """The prior of every weight site, called as the model calls it (on the network's own
    parameters), packed in site order when all are Normal."""
    if model.likelihood.sites:
        raise ValueError(
            f"the model's {type(model.likelihood).__name__} likelihood has latent sites "
            f"{list(model.likelihood.sites)} (a learned observation noise): the negative ELBO "
            f"here covers weight sites only; use a fixed noise")
    params = dict(model.net.named_parameters())
    dists = {name: model.prior(name, p) for name, p in params.items()}
    if not all(isinstance(d, torch.distributions.Normal) for d in dists.values()):
        return PriorTerms(dists, None, None)
    loc = torch.cat([d.loc.expand(params[k].shape).reshape(-1) for k, d in dists.items()])
    scale = torch.cat([d.scale.expand(params[k].shape).reshape(-1) for k, d in dists.items()])
    return PriorTerms(dists, loc.detach(), scale.detach())


def negative_elbo(model: BayesianNetwork, view: GaussianView, x: torch.Tensor,
                  y: torch.Tensor, noise: tuple[torch.Tensor, torch.Tensor | None], *,
                  num_data: int, prior: PriorTerms | None = None,
                  forward: Forward | None = None) -> torch.Tensor:
    """``-ELBO(q)`` on a minibatch, for ``q = N(loc, diag(scale^2) + factor factor^T)``.

    ``num_data / B * E_q[-log p(y | x, theta)] + KL(q || prior)``: the objective
    :func:`bnn_align.fit` minimises with Pyro's ``Trace_ELBO``, with the same scaling of a
    minibatch of ``B`` points to the ``num_data`` of the data set, differentiable in the
    view's tensors.

    * The expected NLL is a reparameterised Monte-Carlo average over the given draws.
    * The KL is **analytic** when every weight site has a Normal prior (all priors of
      bnn_align are): ``Trace_ELBO`` estimates the same term from the draws as
      ``log q(theta) - log p(theta)``, with the same expectation and more variance. For
      other priors it is that Monte-Carlo estimate, on the same draws.
    * A point estimate (``view.kind == "point"``) has no entropy: the term is
      ``-log p(loc)``, and the whole value is the negative log joint that ``Trace_ELBO``
      gives for an ``AutoDelta``.

    Parameters
    ----------
    model : BayesianNetwork
        Its network, prior and likelihood (likelihoods with latent sites are not supported).
    view : GaussianView
        Diagonal, low-rank or point posterior over the model's weight sites, tensors possibly
        requiring gradients (shapes ``site_shape``, factors ``site_shape + (rank,)``).
    x, y : Tensor
        Minibatch: ``(B, *input_shape)`` and the targets.
    noise : (eps, z)
        Standard-normal draws ``(S, D)`` and ``(S, rank)`` or None (``view.standard_normal``).
    num_data : int
        Size of the data set the minibatch is drawn from.
    prior : PriorTerms, optional
        :func:`prior_terms` of the model, computed once by callers in a loop.
    forward : callable, optional
        :func:`forward_draws` of the network to run (default: the model's own network with its
        buffers, under ``vmap`` for several draws).

    Returns
    -------
    Tensor
        Scalar.
    """
    if view.kind == FULL_RANK:
        raise ValueError("negative_elbo supports point, diagonal and low-rank posteriors, "
                         "not full-rank ones")
    prior = prior if prior is not None else prior_terms(model)
    draws = view.transform(noise)
    weights = {k: v for k, v in draws.items() if k in prior.dists}
    if forward is None:
        forward = forward_draws(model.net, dict(model.net.named_buffers()),
                                vectorized=len(noise[0]) > 1)
    outputs = forward(weights, x)
    likelihood = model.likelihood
    log_lik = torch.stack([likelihood.distribution(out, {}).log_prob(y).sum()
                           for out in outputs])
    expected_nll = -log_lik.mean() * (num_data / len(x))
    return expected_nll + _kl(view, weights, prior)


def _kl(view: GaussianView, draws: Mapping[str, torch.Tensor], prior: PriorTerms
        ) -> torch.Tensor:
    """``KL(q || prior)``: analytic for Normal priors, else ``mean(log q - log p)`` over the
    draws; ``-log p(loc)`` for a point estimate."""
    if view.kind == POINT:
        return -sum(d.log_prob(view.loc[k]).sum() for k, d in prior.dists.items())
    loc, scale, factor = view.flat()
    if prior.normal:
        variance = scale ** 2 if factor is None else scale ** 2 + factor.pow(2).sum(-1)
        quadratic = ((variance + (loc - prior.loc) ** 2) / prior.scale ** 2).sum()
        log_det = 2 * scale.log().sum()
        if factor is not None:  # matrix determinant lemma on diag(s^2) + W W^T
            whitened = factor / scale[:, None]
            capacitance = torch.eye(factor.shape[1], dtype=factor.dtype, device=factor.device)
            capacitance = capacitance + whitened.T @ whitened
            log_det = log_det + torch.linalg.cholesky(capacitance).diagonal().log().sum() * 2
        return 0.5 * (quadratic - loc.numel() + 2 * prior.scale.log().sum() - log_det)
    theta = torch.cat([v.reshape(len(v), -1) for v in draws.values()], dim=1)
    if factor is None:
        log_q = torch.distributions.Normal(loc, scale).log_prob(theta).sum(-1)
    else:
        log_q = torch.distributions.LowRankMultivariateNormal(
            loc, factor, scale ** 2).log_prob(theta)
    log_p = sum(prior.dists[k].log_prob(v).reshape(len(v), -1).sum(-1)
                for k, v in draws.items())
    return (log_q - log_p).mean()


def minimise_along_path(params: Sequence[torch.Tensor],
                        loss: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor],
                        x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int,
                        lr: float, lr_end: float | None, clip_norm: float | None, seed: int,
                        progress: bool, desc: str, objective: str,
                        on_epoch: Callable[[int, float], Any] | None = None) -> np.ndarray:
    """Adam on ``E_{t ~ U[0, 1]} [loss(x_batch, y_batch, t)]`` over ``params``, one ``t`` per
    minibatch: the training loop of :func:`~bnn_align.fit_curve` and the learned matchings.

    Every epoch visits the data in a new random order; a step draws ``t``, then calls ``loss``
    (which draws its own noise from torch's global generator). The learning rate decays
    exponentially from ``lr`` to ``lr_end`` at the last step (``None``: constant) and gradients
    are clipped to norm ``clip_norm`` (``None``: not), as :func:`~bnn_align.fit` does. Runs with
    torch's global generator seeded by ``seed`` and restores its state afterwards; ``params``
    require gradients only during the loop.

    Parameters
    ----------
    params : sequence of Tensor
        Leaf tensors to train, in place.
    loss : callable
        ``loss(x_batch, y_batch, t)``: a differentiable scalar.
    x, y : Tensor
        Training data ``(N, *input_shape)`` and targets ``(N, ...)``.
    desc, objective : str
        The progress bar's label, and the objective's name in the error for a non-finite value
        (e.g. ``"the curve's objective"``).
    on_epoch : callable, optional
        Called as ``on_epoch(epoch, mean_loss)`` after every epoch (``epoch`` from 0).

    Returns
    -------
    ndarray of shape (epochs,)
        The mean loss of every epoch.

    Raises
    ------
    FloatingPointError
        When the loss is not finite, naming the epoch.
    """
    n = len(x)
    batch_size = min(batch_size, n)
    steps_per_epoch = math.ceil(n / batch_size)
    history = np.zeros(epochs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for p in params:
            p.requires_grad_(True)
        try:
            optimizer = DecayingAdam(params, lr, lr_end, epochs * steps_per_epoch, clip_norm)
            bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
            for epoch in bar:
                order = torch.randperm(n)
                total_loss = 0.0
                for start in range(0, n, batch_size):
                    idx = order[start:start + batch_size]
                    t = float(torch.rand(()))
                    total_loss += optimizer.step(loss(x[idx], y[idx], t),
                                                 f"{objective} at epoch {epoch}", "lower lr")
                history[epoch] = total_loss / steps_per_epoch
                bar.set_postfix(loss=f"{history[epoch]:.4g}")
                if on_epoch is not None:
                    on_epoch(epoch, history[epoch])
        finally:
            for p in params:
                p.requires_grad_(False)
    return history
