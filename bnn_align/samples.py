"""Sample-set posteriors: MCMC chains, deep ensembles and SWAG draws as one kind of posterior.

A :class:`SamplePosterior` is a finite set of weight vectors, site -> tensor of shape
``(S, *site_shape)``, possibly split into chains of equal length (samples stored chain after
chain). It is not a Gaussian, so it is not read through :func:`~bnn_align.as_gaussian`; it offers
the same small protocol the Gaussian view does (``sites``, ``shapes``, ``device``,
``sample(num_samples, generator)``) plus what only a sample set has: one sample by index
(:meth:`SamplePosterior.point`), the chains (:meth:`SamplePosterior.by_chain`), and its moments
as a diagonal Gaussian view (:meth:`SamplePosterior.moments`), through which it enters the
weight-space objectives. :func:`~bnn_align.permute` applies one permutation to every sample or
one per sample.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ._checks import check_int, positive_int
from .bayesian import BayesianNetwork
from .posterior import DIAGONAL, POINT, GaussianView

__all__ = ["SamplePosterior"]


def _site_tensors(member: Any, index: int, names: Sequence[str] | None) -> dict[str, torch.Tensor]:
    """The parameters of one ensemble member (a module or a state dict), by name."""
    label = f"members[{index}]"
    if isinstance(member, nn.Module):
        floating = [n for n, b in member.named_buffers() if b.is_floating_point()]
        if floating:
            raise ValueError(
                f"{label} has floating-point buffers ({floating[0]!r}, e.g. BatchNorm "
                f"statistics): a SamplePosterior holds no per-sample buffers, so networks with "
                f"them are not supported as sample sets")
        tensors = {k: v.detach() for k, v in member.named_parameters()}
    elif isinstance(member, Mapping):
        tensors = {k: v.detach() for k, v in member.items()
                   if isinstance(v, torch.Tensor) and v.is_floating_point()}
    else:
        raise TypeError(f"{label} must be an nn.Module or a state dict, got "
                        f"{type(member).__name__}")
    if names is None:
        return tensors
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"{label} has no tensor {missing[0]!r} of the model: the members are "
                         f"over a different architecture")
    return {n: tensors[n] for n in names}


class SamplePosterior:
    """A posterior given by samples: site -> tensor of shape ``(S, *site_shape)``.

    Parameters
    ----------
    samples : mapping of str to Tensor
        Site -> ``(S, *site_shape)`` floating-point tensor, the same ``S >= 1`` for every
        site, samples of chain 0 first, then chain 1, ... Not copied (not modified either).
    model : BayesianNetwork, optional
        The network the samples are weights of; its parameters must all be sites of
        ``samples``, with their shapes. Gives the spec (``model.spec``).
    spec : PermutationSpec, optional
        The permutation spec, when there is no model (or to override the model's).
    num_chains : int
        Number of chains the samples are split into (equal lengths; 1 by default).

    Attributes
    ----------
    samples : dict of str to Tensor
    model : BayesianNetwork or None
    num_chains : int

    Raises
    ------
    ValueError
        An empty sample set (no sites or ``S = 0``), sites with different numbers of samples,
        ``S`` not a multiple of ``num_chains``, NaN or infinite samples (naming the site), a
        model whose parameters are missing from the samples or have other shapes.
    TypeError
        Samples that are not a mapping of floating-point tensors, a model that is not a
        BayesianNetwork.

    Examples
    --------
    A deep ensemble of three networks as a sample set:

    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import models
    >>> nets = [models.mlp(4, [8], 3) for _ in range(3)]
    >>> model = ba.BayesianNetwork(models.mlp(4, [8], 3), input_shape=(4,))
    >>> ensemble = ba.SamplePosterior.from_modules(nets, model=model)
    >>> ensemble
    SamplePosterior(num_samples=3, num_chains=1, sites=4)
    >>> ensemble.samples["0.weight"].shape                # (S, *site_shape)
    torch.Size([3, 8, 4])
    >>> torch.equal(ensemble.point(1)["2.bias"], nets[1][2].bias)
    True
    >>> ensemble.moments().kind                           # mean and sd over the samples
    'diagonal'

    One permutation for every sample, or one per sample:

    >>> perm = torch.randperm(8)
    >>> moved = ba.permute(ensemble, {"P_0": perm})
    >>> torch.equal(moved.samples["0.bias"], ensemble.samples["0.bias"][:, perm])
    True
    >>> per_sample = torch.stack([torch.randperm(8) for _ in range(3)])   # (S, n)
    >>> moved = ba.permute(ensemble, {"P_0": per_sample})
    >>> torch.equal(moved.samples["0.bias"][2], ensemble.samples["0.bias"][2, per_sample[2]])
    True
    >>> ba.SamplePosterior({"w": torch.zeros(0, 3)})
    Traceback (most recent call last):
        ...
    ValueError: the sample set is empty: site 'w' has 0 samples
    """

    def __init__(self, samples: Mapping[str, torch.Tensor], *, model: BayesianNetwork | None = None,
                 spec: Any = None, num_chains: int = 1):
        if not isinstance(samples, Mapping):
            raise TypeError(f"samples must be a mapping of site name to tensor, got "
                            f"{type(samples).__name__}")
        if not samples:
            raise ValueError("the sample set is empty: samples has no sites")
        if model is not None and not isinstance(model, BayesianNetwork):
            raise TypeError(f"model must be a BayesianNetwork, got {type(model).__name__}")
        check_int("num_chains", num_chains)
        counts = {}
        for site, t in samples.items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"samples[{site!r}] must be a floating-point tensor of shape "
                                f"(S, *site_shape), got {type(t).__name__}"
                                + (f" of {t.dtype}" if isinstance(t, torch.Tensor) else ""))
            if t.dim() == 0 or len(t) == 0:
                raise ValueError(f"the sample set is empty: site {site!r} has 0 samples")
            counts[site] = len(t)
        if len(set(counts.values())) > 1:
            first, *rest = counts.items()
            other = next(item for item in rest if item[1] != first[1])
            raise ValueError(f"every site needs the same number of samples: site {first[0]!r} "
                             f"has {first[1]}, site {other[0]!r} has {other[1]}")
        count = next(iter(counts.values()))
        if count % num_chains:
            raise ValueError(f"{count} samples cannot be split into num_chains={num_chains} "
                             f"chains of equal length")
        for site, t in samples.items():
            if not torch.isfinite(t).all():
                raise ValueError(f"the samples of site {site!r} hold NaN or infinite values")
        if model is not None:
            for name, param in model.net.named_parameters():
                if name not in samples:
                    raise ValueError(f"the samples have no site {name!r} of the model: they "
                                     f"are over a different architecture")
                if samples[name].shape[1:] != param.shape:
                    raise ValueError(f"site {name!r} has samples of shape "
                                     f"{tuple(samples[name].shape[1:])} but the model's "
                                     f"parameter has shape {tuple(param.shape)}")
        self.samples = dict(samples)
        self.model = model
        self._spec = spec
        self.num_chains = int(num_chains)

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def from_mcmc(cls, mcmc_or_samples: Any, model: BayesianNetwork | None = None, *,
                  group_by_chain: bool = True, spec: Any = None) -> "SamplePosterior":
        """The samples of a Pyro ``MCMC`` run (or a dict of them).

        Parameters
        ----------
        mcmc_or_samples : pyro.infer.MCMC or mapping of str to Tensor
            A finished run (its ``get_samples(group_by_chain=True)`` is read), or a dict of
            samples: site -> ``(chains, draws, *site_shape)`` as
            ``get_samples(group_by_chain=True)`` gives, or ``(S, *site_shape)`` as
            ``get_samples()`` gives. With a ``model`` the layout is read off its parameter
            shapes; without one a dict is taken to have a chain axis iff ``group_by_chain``.
        model : BayesianNetwork, optional
            The model the chain ran on (gives the spec).
        group_by_chain : bool
            Keep the chains (the default); False pools them into one.
        spec : PermutationSpec, optional

        Returns
        -------
        SamplePosterior
            With ``num_chains`` chains (1 when pooled).

        Raises
        ------
        ValueError, TypeError
            As the constructor; a dict whose tensors have no chain axis.

        Examples
        --------
        >>> import torch
        >>> import bnn_align as ba
        >>> draws = {"w": torch.randn(4, 10, 3)}          # 4 chains of 10 draws
        >>> ba.SamplePosterior.from_mcmc(draws).num_chains
        4
        >>> ba.SamplePosterior.from_mcmc({"w": torch.randn(40, 3)}, group_by_chain=False)
        SamplePosterior(num_samples=40, num_chains=1, sites=1)
        """
        if hasattr(mcmc_or_samples, "get_samples"):
            raw = mcmc_or_samples.get_samples(group_by_chain=True)
            chained = True
        elif isinstance(mcmc_or_samples, Mapping):
            raw, chained = mcmc_or_samples, group_by_chain
        else:
            raise TypeError(f"mcmc_or_samples must be a pyro.infer.MCMC or a dict of samples, "
                            f"got {type(mcmc_or_samples).__name__}")
        if not raw:
            raise ValueError("the sample set is empty: the MCMC run has no samples")
        names = list(raw)
        if model is not None:
            names = [n for n in names if n in model.sites] or names
            params = dict(model.net.named_parameters())
            known = next((n for n in names if n in params), None)
            if known is not None and isinstance(raw[known], torch.Tensor):
                chained = raw[known].dim() == params[known].dim() + 2
        if not chained:
            return cls({n: raw[n] for n in names}, model=model, spec=spec)
        out, chains = {}, 1
        for n in names:
            t = raw[n]
            if not isinstance(t, torch.Tensor) or t.dim() < 2:
                raise ValueError(f"site {n!r} needs a tensor of shape (chains, draws, "
                                 f"*site_shape)")
            chains = t.shape[0]
            out[n] = t.reshape(-1, *t.shape[2:])
        if group_by_chain and len(next(iter(out.values()))):
            return cls(out, model=model, spec=spec, num_chains=chains)
        return cls(out, model=model, spec=spec)

    @classmethod
    def from_modules(cls, members: Sequence[Any], model: BayesianNetwork | None = None, *,
                     spec: Any = None) -> "SamplePosterior":
        """A deep ensemble: one sample per module or state dict.

        Parameters
        ----------
        members : sequence of nn.Module or state dict
            Networks of one architecture (not modified). Modules contribute their parameters,
            state dicts their floating-point tensors (the model's parameters when ``model`` is
            given).
        model : BayesianNetwork, optional
        spec : PermutationSpec, optional

        Returns
        -------
        SamplePosterior
            One chain of ``len(members)`` samples.

        Raises
        ------
        ValueError
            No members, members over different architectures (naming the member and the
            site), modules with floating-point buffers (BatchNorm statistics: a sample set
            holds no per-sample buffers).
        TypeError
            A member that is neither a module nor a state dict.

        Examples
        --------
        >>> import bnn_align as ba
        >>> from bnn_align import models
        >>> ba.SamplePosterior.from_modules([models.mlp(4, [8], 3), models.mlp(4, [8], 3)])
        SamplePosterior(num_samples=2, num_chains=1, sites=4)
        >>> ba.SamplePosterior.from_modules([models.mlp(4, [8], 3), models.mlp(4, [9], 3)])
        Traceback (most recent call last):
            ...
        ValueError: members[1] has site '0.weight' of shape (9, 4) but members[0] has (8, 4): ...
        """
        if isinstance(members, (nn.Module, Mapping)) or not isinstance(members, Sequence):
            raise TypeError("members must be a sequence (list) of modules or state dicts")
        if not members:
            raise ValueError("the sample set is empty: members is empty")
        names = None if model is None else [n for n, _ in model.net.named_parameters()]
        tensors = [_site_tensors(m, i, names) for i, m in enumerate(members)]
        first = tensors[0]
        for i, t in enumerate(tensors[1:], start=1):
            for site, value in first.items():
                if site not in t:
                    raise ValueError(f"members[{i}] has no site {site!r} of members[0]: the "
                                     f"members are over different architectures")
                if t[site].shape != value.shape:
                    raise ValueError(f"members[{i}] has site {site!r} of shape "
                                     f"{tuple(t[site].shape)} but members[0] has "
                                     f"{tuple(value.shape)}: the members are over different "
                                     f"architectures")
            extra = [s for s in t if s not in first]
            if extra:
                raise ValueError(f"members[{i}] has site {extra[0]!r} that members[0] lacks: "
                                 f"the members are over different architectures")
        samples = {s: torch.stack([t[s] for t in tensors]) for s in first}
        return cls(samples, model=model, spec=spec)

    @classmethod
    def from_swag(cls, mean: Mapping[str, torch.Tensor], sq_mean: Mapping[str, torch.Tensor],
                  deviations: Sequence[Mapping[str, torch.Tensor]] | None = None, *,
                  num_samples: int, seed: int = 0, model: BayesianNetwork | None = None,
                  spec: Any = None) -> "SamplePosterior":
        """Draws from a SWAG posterior (Maddox et al., 2019) given its moments.

        With ``deviations`` (the last ``K`` iterates minus their running mean), SWAG's
        ``theta = mean + diag^(1/2) z_1 / sqrt(2) + D z_2 / sqrt(2 (K - 1))``; without them
        SWAG-diagonal, ``theta = mean + diag^(1/2) z_1``, where ``diag = sq_mean - mean**2``
        (clamped at 0) and ``z_1, z_2`` are standard normal.

        Parameters
        ----------
        mean, sq_mean : mapping of str to Tensor
            The running first and second moments of the weights, site -> ``site_shape``.
        deviations : sequence of mappings, optional
            ``K >= 2`` deviation vectors, each site -> ``site_shape``.
        num_samples : int
        seed : int
        model, spec : optional
            As the constructor.

        Returns
        -------
        SamplePosterior
            One chain of ``num_samples`` draws.

        Raises
        ------
        ValueError
            Sites missing from ``sq_mean`` or a deviation or of another shape, fewer than two
            deviations, a non-positive ``num_samples``.

        Examples
        --------
        >>> import torch
        >>> import bnn_align as ba
        >>> mean = {"w": torch.zeros(3)}
        >>> sq_mean = {"w": torch.full((3,), 4.0)}        # variance 4
        >>> swag = ba.SamplePosterior.from_swag(mean, sq_mean, num_samples=4000)
        >>> round(float(swag.samples["w"].std()), 1)
        2.0
        """
        positive_int(num_samples=num_samples)
        for label, other in [("sq_mean", sq_mean)] + [(f"deviations[{k}]", d)
                                                      for k, d in enumerate(deviations or [])]:
            for site, value in mean.items():
                if site not in other or other[site].shape != value.shape:
                    raise ValueError(f"{label} has no site {site!r} of shape "
                                     f"{tuple(value.shape)} (as in mean)")
        if deviations is not None and len(deviations) < 2:
            raise ValueError(f"deviations needs at least 2 vectors, got {len(deviations)}")
        gen = torch.Generator().manual_seed(seed)
        samples = {}
        k = len(deviations) if deviations else 0
        z2 = torch.randn(num_samples, k, generator=gen) if k else None
        for site, mu in mean.items():
            mu = mu.detach()
            diag = (sq_mean[site].detach() - mu ** 2).clamp_min(0).sqrt()
            z1 = torch.randn(num_samples, *mu.shape, generator=gen, dtype=mu.dtype)
            if k:
                stacked = torch.stack([d[site].detach() for d in deviations], dim=-1)
                low = (z2.to(mu.dtype) @ stacked.reshape(-1, k).T).reshape(num_samples, *mu.shape)
                samples[site] = mu + diag * z1 / 2 ** 0.5 + low / (2 * (k - 1)) ** 0.5
            else:
                samples[site] = mu + diag * z1
        return cls(samples, model=model, spec=spec)

    # -- the protocol ------------------------------------------------------------------------
    @property
    def spec(self) -> Any:
        """The given spec, else the model's, else None."""
        if self._spec is not None:
            return self._spec
        return self.model.spec if self.model is not None else None

    @property
    def num_samples(self) -> int:
        """``S``, all chains together."""
        return len(next(iter(self.samples.values())))

    def __len__(self) -> int:
        return self.num_samples

    @property
    def sites(self) -> list[str]:
        return list(self.samples)

    @property
    def shapes(self) -> dict[str, torch.Size]:
        """Site -> shape of one sample of the site."""
        return {k: v.shape[1:] for k, v in self.samples.items()}

    @property
    def device(self) -> torch.device:
        return next(iter(self.samples.values())).device

    def point(self, index: int) -> dict[str, torch.Tensor]:
        """Sample ``index`` as a state dict (site -> ``site_shape``, views)."""
        check_int("index", index, low=0, high=self.num_samples - 1)
        return {k: v[index] for k, v in self.samples.items()}

    def by_chain(self) -> dict[str, torch.Tensor]:
        """Site -> ``(num_chains, draws, *site_shape)`` (views)."""
        return {k: v.reshape(self.num_chains, -1, *v.shape[1:]) for k, v in self.samples.items()}

    def chains(self) -> list["SamplePosterior"]:
        """One sample set per chain."""
        grouped = self.by_chain()
        return [self.with_samples({k: v[c] for k, v in grouped.items()}, num_chains=1)
                for c in range(self.num_chains)]

    def with_samples(self, samples: Mapping[str, torch.Tensor], num_chains: int | None = None
                     ) -> "SamplePosterior":
        """A sample set over the same model and spec holding other samples."""
        return SamplePosterior(samples, model=self.model, spec=self._spec,
                               num_chains=self.num_chains if num_chains is None else num_chains)

    def moments(self) -> GaussianView:
        """The samples' mean and standard deviation per weight as a diagonal Gaussian view
        (a point view for a single sample): how a sample set enters the weight-space
        objectives of :func:`~bnn_align.match_many`."""
        loc = {k: v.mean(0) for k, v in self.samples.items()}
        if self.num_samples == 1:
            return GaussianView(POINT, loc, {k: torch.zeros_like(v) for k, v in loc.items()},
                                None, "SamplePosterior")
        scale = {k: v.std(0, correction=0) for k, v in self.samples.items()}
        return GaussianView(DIAGONAL, loc, scale, None, "SamplePosterior")

    def indices(self, num_samples: int, generator: torch.Generator | None = None
                ) -> torch.Tensor:
        """Which samples ``num_samples`` draws take: all of them in order for ``S``, a random
        subset (without replacement) for fewer.

        Raises
        ------
        ValueError
            ``num_samples`` above ``S``: a sample set has no more draws to give.
        """
        positive_int(num_samples=num_samples)
        if num_samples > self.num_samples:
            raise ValueError(f"num_samples={num_samples} exceeds the {self.num_samples} samples "
                             f"of the sample set; pass num_samples <= {self.num_samples} "
                             f"(num_samples={self.num_samples} takes every sample once)")
        if num_samples == self.num_samples:
            return torch.arange(num_samples)
        return torch.randperm(self.num_samples, generator=generator)[:num_samples]

    def sample(self, num_samples: int, generator: torch.Generator | None = None
               ) -> dict[str, torch.Tensor]:
        """``num_samples`` of the samples (see :meth:`indices`): site -> ``(num_samples,
        *site_shape)``."""
        index = self.indices(num_samples, generator).to(self.device)
        return {k: v.index_select(0, index) for k, v in self.samples.items()}

    def to(self, device: Any) -> "SamplePosterior":
        """The sample set on another device (the model is not moved)."""
        return self.with_samples({k: v.to(device) for k, v in self.samples.items()})

    def __repr__(self) -> str:
        return (f"SamplePosterior(num_samples={self.num_samples}, num_chains={self.num_chains}, "
                f"sites={len(self.samples)})")
