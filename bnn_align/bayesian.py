"""Bayesian networks: any ``nn.Module`` as a Pyro model, and its SVI training loop.

:class:`BayesianNetwork` makes every parameter of a deterministic module a latent sample site named
exactly like the parameter (``"0.weight"``, ``"layer1.0.conv1.weight"``), with a prior, and puts a
likelihood on the module's output. Because site names are parameter names, one
:class:`~bnn_align.PermutationSpec` serves the module, its state dict and every guide over it.
:func:`fit` trains a guide by stochastic variational inference.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, Union

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO
from pyro.poutine.messenger import Messenger
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from ._checks import check_positive_float, device_of, positive_int, same_device
from ._threads import thread_count, torch_threads

if TYPE_CHECKING:  # the spec stage builds on this module
    from .symmetry.spec import PermutationSpec

__all__ = [
    "BayesianNetwork", "Prior", "NormalPrior", "FanInPrior", "Likelihood", "Categorical",
    "Gaussian", "fit",
]


# ------------------------------------------------------------------------------------- priors --
class Prior:
    """A prior over each weight tensor: ``prior(name, tensor) -> Distribution``.

    The distribution's batch shape is the tensor's shape; :class:`BayesianNetwork` declares every
    axis an event axis.
    """

    def __call__(self, name: str, tensor: torch.Tensor) -> dist.Distribution:
        raise NotImplementedError


class NormalPrior(Prior):
    """Isotropic ``Normal(0, scale)`` on every weight and bias (the default, ``scale=1``).

    Parameters
    ----------
    scale : float
        Standard deviation of every weight (positive). ``BayesianNetwork(net, prior=0.5)`` is
        ``BayesianNetwork(net, prior=NormalPrior(0.5))``.

    Raises
    ------
    ValueError
        A scale that is not a positive finite number.

    Examples
    --------
    >>> import torch
    >>> import bnn_align as ba
    >>> prior = ba.NormalPrior(0.5)
    >>> normal = prior("0.weight", torch.zeros(8, 4))   # one Normal per entry of the tensor
    >>> normal.batch_shape, normal.scale.unique()
    (torch.Size([8, 4]), tensor([0.5000]))
    """

    def __init__(self, scale: float = 1.0):
        self.scale = check_positive_float("prior scale", scale)

    def __call__(self, name: str, tensor: torch.Tensor) -> dist.Distribution:
        return dist.Normal(torch.zeros_like(tensor), torch.full_like(tensor, self.scale))

    def __repr__(self) -> str:
        return f"NormalPrior(scale={self.scale})"


class FanInPrior(Prior):
    """Per-layer scales: ``Normal(0, gain / sqrt(fan_in))`` for weights, ``Normal(0, bias_scale)``
    for one-dimensional tensors (biases, normalisation parameters).

    ``fan_in`` is the product of all axes but the first (``in_features`` for a linear layer,
    ``in_channels * kernel`` for a convolution); ``gain=sqrt(2)`` matches He initialisation.

    Parameters
    ----------
    gain : float
        Scale of the weights' standard deviation ``gain / sqrt(fan_in)`` (positive).
    bias_scale : float
        Standard deviation of one-dimensional tensors (positive).

    Raises
    ------
    ValueError
        A gain or bias scale that is not a positive finite number.

    Examples
    --------
    >>> import torch
    >>> import bnn_align as ba
    >>> prior = ba.FanInPrior(gain=2 ** 0.5)
    >>> float(prior("0.weight", torch.zeros(8, 4)).scale[0, 0])      # sqrt(2) / sqrt(4)
    0.7071...
    >>> float(prior("0.bias", torch.zeros(8)).scale[0])
    1.0
    """

    def __init__(self, gain: float = 1.0, bias_scale: float = 1.0):
        self.gain = check_positive_float("FanInPrior gain", gain)
        self.bias_scale = check_positive_float("FanInPrior bias_scale", bias_scale)

    def __call__(self, name: str, tensor: torch.Tensor) -> dist.Distribution:
        if tensor.dim() <= 1:
            scale = self.bias_scale
        else:
            scale = self.gain / math.sqrt(tensor[0].numel())
        return dist.Normal(torch.zeros_like(tensor), torch.full_like(tensor, scale))

    def __repr__(self) -> str:
        return f"FanInPrior(gain={self.gain}, bias_scale={self.bias_scale})"


PriorLike = Union[float, Prior, Callable[[str, torch.Tensor], dist.Distribution]]


def _as_prior(prior: PriorLike) -> Callable[[str, torch.Tensor], dist.Distribution]:
    if isinstance(prior, bool):
        raise TypeError("prior must be a float scale, a Prior or a callable, got a bool")
    if isinstance(prior, (int, float)):
        return NormalPrior(prior)
    if callable(prior):
        return prior
    raise TypeError(
        f"prior must be a float scale, a Prior or a callable (name, tensor) -> Distribution, "
        f"got {type(prior).__name__}"
    )


# -------------------------------------------------------------------------------- likelihoods --
class Likelihood:
    """Observation model ``p(y | f(x))`` for a network output ``f(x)``.

    Subclasses implement :meth:`distribution`; those with their own latent variables (a learned
    noise scale) also implement :meth:`sample_globals`.
    """

    #: names of the likelihood's own latent sites
    sites: tuple[str, ...] = ()

    def sample_globals(self, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Sample the likelihood's own latent sites (inside a Pyro model), on ``device``, where
        the network's weights are."""
        return {}

    def distribution(self, output: torch.Tensor, globals_: Mapping[str, torch.Tensor]
                     ) -> dist.Distribution:
        raise NotImplementedError

    def check_targets(self, output: torch.Tensor, y: torch.Tensor) -> None:
        """Raise ``ValueError`` if ``y`` cannot be observations for ``output``."""


class Categorical(Likelihood):
    """Classification: ``y ~ Categorical(logits=f(x))``; the network outputs ``(batch, classes)``.

    The labels ``y`` must be an integer tensor of shape ``(batch,)`` with values in
    ``0 .. classes - 1``; the model raises ``TypeError`` or ``ValueError`` saying which is not.

    Examples
    --------
    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import models
    >>> model = ba.BayesianNetwork(models.mlp(4, [8], 3), likelihood=ba.Categorical())
    >>> model(torch.randn(2, 4), torch.tensor([0, 3]))
    Traceback (most recent call last):
        ...
    ValueError: labels y must lie in [0, 2] for a network with 3 outputs, got values in [0, 3]
    """

    def distribution(self, output, globals_):
        return dist.Categorical(logits=output)

    def check_targets(self, output, y):
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.dtype.is_complex:
            raise TypeError(f"class labels y must be an integer tensor, got dtype {y.dtype}")
        if y.shape != output.shape[:-1]:
            raise ValueError(
                f"labels y have shape {tuple(y.shape)} but the network gives logits of shape "
                f"{tuple(output.shape)}; expected y of shape {tuple(output.shape[:-1])}"
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= output.shape[-1]):
            raise ValueError(
                f"labels y must lie in [0, {output.shape[-1] - 1}] for a network with "
                f"{output.shape[-1]} outputs, got values in [{int(y.min())}, {int(y.max())}]"
            )

    def __repr__(self) -> str:
        return "Categorical()"


class Gaussian(Likelihood):
    """Regression: ``y ~ Normal(f(x), noise)``, every output dimension independent.

    Parameters
    ----------
    noise : float or "learned"
        A fixed noise scale, or ``"learned"`` for a latent site ``"obs_noise"`` with prior
        ``noise_prior`` that the guide learns like any weight.
    noise_prior : Distribution
        Prior of the learned noise scale (positive support); ``LogNormal(log 0.1, 1)`` by default.

    Raises
    ------
    ValueError
        A noise that is neither a positive number nor ``"learned"``.

    Examples
    --------
    A learned noise scale is one more latent site, after the weights:

    >>> import bnn_align as ba
    >>> from bnn_align import models
    >>> model = ba.BayesianNetwork(models.mlp(4, [8], 1), likelihood=ba.Gaussian("learned"))
    >>> model.sites
    ('0.weight', '0.bias', '2.weight', '2.bias', 'obs_noise')
    >>> ba.Gaussian(noise=0.1)
    Gaussian(noise=0.1)
    """

    def __init__(self, noise: float | str = 1.0, noise_prior: dist.Distribution | None = None):
        if noise == "learned":
            self.sites = ("obs_noise",)
            self.noise_prior = noise_prior or dist.LogNormal(math.log(0.1), 1.0)
            self.noise = None
        elif isinstance(noise, (int, float)) and not isinstance(noise, bool) and noise > 0:
            self.noise = float(noise)
        else:
            raise ValueError(f"noise must be a positive float or 'learned', got {noise!r}")

    def sample_globals(self, device=None):
        if self.noise is not None:
            return {}
        prior = self.noise_prior
        if device is not None:
            # a prior made of floats has CPU parameters: its draws, and the guide parameters
            # initialised from them, would be on the CPU beside weights on another device
            prior = _distribution_on(prior, device)
        return {"obs_noise": pyro.sample("obs_noise", prior)}

    def distribution(self, output, globals_):
        noise = globals_.get("obs_noise", self.noise)
        return dist.Normal(output, noise).to_event(output.dim() - 1)

    def check_targets(self, output, y):
        if not y.dtype.is_floating_point:
            raise TypeError(f"regression targets y must be floating point, got dtype {y.dtype}")
        if y.shape != output.shape:
            raise ValueError(
                f"targets y have shape {tuple(y.shape)} but the network outputs shape "
                f"{tuple(output.shape)}"
            )

    def __repr__(self) -> str:
        return f"Gaussian(noise={'learned' if self.noise is None else self.noise})"


def _distribution_on(distribution: dist.Distribution, device: torch.device
                     ) -> dist.Distribution:
    """``distribution`` with its parameters on ``device``: itself if they are there (or it has
    none), else rebuilt from the parameters its ``arg_constraints`` name (as every usual prior
    of a positive noise scale is: LogNormal, HalfNormal, Gamma, Exponential, ...)."""
    params = {name: getattr(distribution, name) for name in distribution.arg_constraints}
    if all(not isinstance(v, torch.Tensor) or v.device == device for v in params.values()):
        return distribution
    try:  # the values were validated when the prior was made
        return type(distribution)(**{k: v.to(device) if isinstance(v, torch.Tensor) else v
                                     for k, v in params.items()}, validate_args=False)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"the {type(distribution).__name__} noise prior has its parameters on "
            f"{next(v.device for v in params.values() if isinstance(v, torch.Tensor))} but the "
            f"network is on {device}, and it cannot be rebuilt there ({err}): pass a "
            f"noise_prior made on {device}") from err


def _as_likelihood(likelihood: str | Likelihood) -> Likelihood:
    if isinstance(likelihood, Likelihood):
        return likelihood
    if likelihood == "categorical":
        return Categorical()
    if likelihood == "gaussian":
        return Gaussian()
    raise ValueError(
        f"likelihood must be 'categorical', 'gaussian' or a Likelihood, got {likelihood!r}"
    )


# ------------------------------------------------------------------------------------ the model --
class BayesianNetwork(nn.Module):
    """A Pyro model whose latent variables are the parameters of a deterministic network.

    Parameters
    ----------
    net : nn.Module
        The network. It is copied (the original is never touched) and evaluated in evaluation
        mode; its current parameter values are where the guide helpers put the initial means,
        and its buffers (BatchNorm running statistics) are used as fixed values.
    prior : float, Prior or callable
        A float is the scale of an isotropic ``Normal(0, scale)`` prior (default 1); see
        :class:`NormalPrior`, :class:`FanInPrior`, or pass ``f(name, tensor) -> Distribution``.
    likelihood : {"categorical", "gaussian"} or Likelihood
        Observation model of the network's output.
    input_shape : tuple of int, optional
        Shape of one input example (without the batch axis). Needed to derive the permutation
        spec; remembered from the first call with data if not given.

    Raises
    ------
    TypeError
        ``net`` is not an ``nn.Module`` (or is a BayesianNetwork already), or ``prior`` is
        neither a number, a Prior nor a callable.
    ValueError
        A network without parameters, parameter names that clash with the likelihood's sites,
        an unknown likelihood.

    Notes
    -----
    Call as ``model(x, y, num_data=N)``: ``x`` of shape ``(batch, *input_shape)``, ``y`` the
    observations (``None`` to predict), ``num_data`` the dataset size so a minibatch's likelihood
    is scaled by ``N / batch``. ``model()`` without data only samples the weights (used to set up
    guides). Returns the network output (logits or regression means) for the sampled weights.

    Examples
    --------
    >>> import pyro
    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import models
    >>> model = ba.BayesianNetwork(models.mlp(4, [8], 3), prior=1.0, likelihood="categorical",
    ...                            input_shape=(4,))
    >>> model.sites                           # named exactly like the network's parameters
    ('0.weight', '0.bias', '2.weight', '2.bias')
    >>> model.spec.groups                     # the hidden layer's units
    ['P_0']
    >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    >>> model(x).shape                        # logits for weights drawn from the prior
    torch.Size([5, 3])
    >>> trace = pyro.poutine.trace(model).get_trace(x, y, num_data=100)
    >>> trace.nodes["0.weight"]["value"].shape
    torch.Size([8, 4])
    >>> trace.nodes["obs"]["scale"]           # the minibatch's likelihood counts 100 / 5 times
    20.0
    """

    def __init__(
        self,
        net: nn.Module,
        prior: PriorLike = 1.0,
        likelihood: str | Likelihood = "categorical",
        *,
        input_shape: Sequence[int] | None = None,
    ):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"BayesianNetwork needs an nn.Module, got {type(net).__name__}")
        if isinstance(net, BayesianNetwork):
            raise TypeError("net is already a BayesianNetwork; pass its .net")
        self.prior = _as_prior(prior)
        self.likelihood = _as_likelihood(likelihood)
        self.net = copy.deepcopy(net).eval().requires_grad_(False)
        names = [name for name, _ in self.net.named_parameters()]
        if not names:
            raise ValueError("the network has no parameters to put a prior on")
        clash = set(names) & (set(self.likelihood.sites) | {"obs", "data"})
        if clash:
            raise ValueError(f"parameter names {sorted(clash)} clash with the likelihood's sites")
        self._weight_sites = tuple(names)
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self._specs: dict[str, PermutationSpec] = {}  # by spec_from_module's ``unknown``

    @property
    def sites(self) -> tuple[str, ...]:
        """Latent site names in execution order: the parameters, then the likelihood's."""
        return self._weight_sites + tuple(self.likelihood.sites)

    @property
    def weight_sites(self) -> tuple[str, ...]:
        """Latent sites that are network parameters."""
        return self._weight_sites

    def example_input(self, batch: int = 2) -> torch.Tensor:
        """A zero input of shape ``(batch, *input_shape)``, on the network's device."""
        if self.input_shape is None:
            raise ValueError(
                "the BayesianNetwork does not know its input shape: pass input_shape= when "
                "building it (or call it once with data)"
            )
        return torch.zeros(batch, *self.input_shape, device=device_of(self.net))

    @property
    def spec(self) -> PermutationSpec:
        """The permutation spec of the network, derived once with :func:`spec_from_module`.

        Raises
        ------
        ValueError
            The network holds an operation whose permutation behaviour is not known, or the
            model does not know its input shape.

        Examples
        --------
        >>> import bnn_align as ba
        >>> from bnn_align import models
        >>> model = ba.BayesianNetwork(models.mlp(4, [8, 8], 3), input_shape=(4,))
        >>> model.spec.perm_to_axes["P_2"]
        [('2.weight', 0), ('2.bias', 0), ('4.weight', 1)]
        """
        from .symmetry.derive import UnsupportedOperation

        try:
            return self._derived_spec("error")
        except UnsupportedOperation as err:
            # the derivation's advice names spec_from_module's argument, which .spec (and
            # permute, which reads it) does not take
            raise UnsupportedOperation(
                err.problem,
                "spec_from_module(model.net, model.example_input(), unknown='fix') derives a "
                "spec that leaves the units around it unpermuted: pass it as spec= (to permute, "
                "match, ...), or pass unknown='fix' to match()") from None

    def _derived_spec(self, unknown: str) -> PermutationSpec:
        """The spec derived with ``spec_from_module(..., unknown=unknown)``, once per policy."""
        if unknown == "fix" and "error" in self._specs:
            return self._specs["error"]  # nothing was refused, so nothing would be fixed
        if unknown not in self._specs:
            from .symmetry.derive import spec_from_module

            self._specs[unknown] = spec_from_module(self.net, self.example_input(),
                                                    unknown=unknown)
        return self._specs[unknown]

    def with_net(self, net: nn.Module) -> "BayesianNetwork":
        """The same model (prior, likelihood, input shape, spec) around another network of the
        same architecture, e.g. one with permuted or interpolated BatchNorm statistics. ``net``
        is used as given, not copied; ``self`` is not modified."""
        new = copy.copy(self)
        for key, value in vars(self).items():
            if isinstance(value, dict):  # parameters, buffers, modules and hooks: own dicts
                setattr(new, key, copy.copy(value))
        new._modules["net"] = net.eval().requires_grad_(False)
        return new

    def sample_weights(self) -> dict[str, torch.Tensor]:
        """Sample every parameter from its prior (inside a Pyro model: one site each)."""
        weights = {}
        for name, param in self.net.named_parameters():
            prior = self.prior(name, param)
            weights[name] = pyro.sample(name, prior.to_event(prior.batch_shape.__len__()))
        return weights

    def evaluate(self, weights: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The network output for given weights (no Pyro sites): ``f(x; weights)``.

        Raises ``ValueError`` naming the shapes when ``x`` does not fit the network, or the
        devices when the weights are on another than ``x``.
        """
        state = dict(self.net.named_buffers())
        state.update(weights)
        try:
            return functional_call(self.net, state, (x,))
        except RuntimeError as err:
            elsewhere = sorted({str(t.device) for t in state.values() if t.device != x.device})
            if elsewhere:
                raise ValueError(
                    f"the network's weights are on {', '.join(elsewhere)} but its input x is on "
                    f"{x.device}: put the model and its guide on one device") from err
            expected = f" (expected {(-1, *self.input_shape)})" if self.input_shape else ""
            raise ValueError(
                f"input x of shape {tuple(x.shape)} does not fit the network{expected}: {err}"
            ) from err

    def forward(
        self,
        x: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        *,
        num_data: int | None = None,
    ) -> torch.Tensor | None:
        weights = self.sample_weights()
        globals_ = self.likelihood.sample_globals(device_of(self.net))
        if x is None:
            if y is not None:
                raise ValueError("y was given without x")
            return None
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if self.input_shape is None:
            self.input_shape = tuple(x.shape[1:])
        output = self.evaluate(weights, x)
        batch = x.shape[0]
        if y is not None:
            if not isinstance(y, torch.Tensor):
                raise TypeError(f"y must be a tensor, got {type(y).__name__}")
            self.likelihood.check_targets(output, y)
        if num_data is not None and num_data < batch:
            raise ValueError(f"num_data={num_data} is smaller than the batch of {batch}")
        size = batch if num_data is None else int(num_data)
        with pyro.plate("data", size, subsample=torch.arange(batch, device=x.device)):
            pyro.sample("obs", self.likelihood.distribution(output, globals_), obs=y)
        return output

    def extra_repr(self) -> str:
        return f"prior={self.prior!r}, likelihood={self.likelihood!r}"


# ------------------------------------------------------------------------------------ training --
class _ScaleLatents(Messenger):
    """Multiply the log density of every latent (unobserved) sample site by ``scale``."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = msg["scale"] * self.scale


def as_data_pair(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` tensors from a pair or a TensorDataset, checked to be non-empty and paired."""
    if isinstance(data, torch.utils.data.TensorDataset):
        data = data.tensors
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if len(x) != len(y):
                raise ValueError(f"data has {len(x)} inputs but {len(y)} targets")
            if len(x) == 0:
                raise ValueError("data is empty")
            for name, tensor in (("inputs", x), ("targets", y)):
                # one bad value otherwise surfaces as a distribution's constraint error deep in
                # Pyro, or as a NaN barrier
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    bad = int((~torch.isfinite(tensor)).sum())
                    raise ValueError(f"data's {name} hold {bad} NaN or infinite values")
            return x, y
    raise TypeError("data must be a pair of tensors (x, y) or a TensorDataset of two tensors")


class DecayingAdam:
    """Adam whose learning rate decays exponentially from ``lr`` to ``lr_end`` at the last of
    ``total_steps`` steps (``lr_end=None``: constant), with gradients clipped to norm
    ``clip_norm`` (``None``: not): the optimiser of :func:`fit` and of the objectives trained
    along paths (curves, learned matchings)."""

    def __init__(self, params: Sequence[torch.Tensor], lr: float, lr_end: float | None,
                 total_steps: int, clip_norm: float | None):
        self.params = list(params)
        self.clip_norm = clip_norm
        gamma = (lr_end / lr) ** (1.0 / max(total_steps - 1, 1)) if lr_end is not None else 1.0
        self.optimizer = torch.optim.Adam(self.params, lr=lr)
        self.schedule = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma)

    def step(self, loss: torch.Tensor, what: str, advice: str) -> float:
        """One step down ``loss`` (a scalar not yet differentiated); returns its value. A
        non-finite loss raises ``FloatingPointError("{what} became {value}; {advice}")``."""
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{what} became {loss.item()}; {advice}")
        self.optimizer.zero_grad()
        loss.backward()
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        self.optimizer.step()
        self.schedule.step()
        return loss.item()


def fit(
    model: Callable,
    guide: nn.Module,
    data: Any,
    *,
    epochs: int = 60,
    batch_size: int = 128,
    lr: float = 1e-2,
    lr_end: float | None = 1e-3,
    kl_weight: float | Callable[[int], float] = 1.0,
    num_particles: int = 1,
    clip_norm: float | None = 10.0,
    seed: int = 0,
    num_threads: int | None = None,
    progress: bool = True,
    callback: Callable[[int, nn.Module], Any] | None = None,
) -> np.ndarray:
    """Train ``guide`` by stochastic variational inference (Adam on the ELBO, minibatches).

    Parameters
    ----------
    model : BayesianNetwork or callable
        The Pyro model, called as ``model(x, y, num_data=N)`` for a :class:`BayesianNetwork` and
        ``model(x, y)`` otherwise.
    guide : pyro AutoGuide
        Trained in place (its parameters are what ``fit`` updates), on the device of the
        model and the guide (a guide without parameters yet gets them there).
    data : (x, y) tensors or TensorDataset
        Training data; ``x`` of shape ``(N, *input_shape)``, on any device: each minibatch
        is moved to the model's.
    epochs, batch_size : int
        Passes over the data and minibatch size.
    lr, lr_end : float
        Adam learning rate, decayed exponentially to ``lr_end`` at the last step (``None``: no
        decay). Gradients are clipped to norm ``clip_norm``.
    kl_weight : float or callable epoch -> float
        Weight ``beta`` of the KL term (the prior and guide densities): a constant below 1
        tempers the posterior, a schedule rising to 1 anneals the KL.
    num_particles : int
        Monte-Carlo samples of the ELBO per step.
    seed : int
        Seed of the minibatch order and the ELBO's noise; the global RNG state is restored.
    num_threads : int, optional
        Threads for torch during training (restored afterwards). By default one thread when
        a minibatch's forward pass is below about 10^9 multiply-adds (an MLP of width 512, a
        1-D ResNet-8 at batch 128), where threads save little and a process busy on another
        core slows a multi-threaded step several times, and torch's own count above (and for
        models that are not a :class:`BayesianNetwork`). Pass 1 on a shared machine.
    progress : bool
        Show a tqdm progress bar.
    callback : callable, optional
        Called as ``callback(epochs_done, guide)`` after every epoch, e.g. to record the test
        accuracy of the model average during training. It runs under its own fork of the random
        state (and without gradients), so what it draws does not change the training.

    Returns
    -------
    ndarray of shape (epochs,)
        Mean negative ELBO per epoch (full-data scale).

    Raises
    ------
    ValueError
        Naming both devices when the model and the guide are on different devices; a
        non-positive count or learning rate (naming it), empty data, inputs and targets of
        different lengths, targets that do not fit the likelihood, a guide without trainable
        parameters.
    TypeError
        Data that is not a pair of tensors or a TensorDataset, a guide that is not a module.
    FloatingPointError
        The ELBO became NaN or infinite (naming the epoch): lower ``lr`` or ``init_scale``.

    Examples
    --------
    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import guides, models
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(64, 4)
    >>> y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()         # three classes
    >>> model = ba.BayesianNetwork(models.mlp(4, [8], 3), input_shape=(4,))
    >>> guide = guides.mean_field(model)
    >>> losses = ba.fit(model, guide, (x, y), epochs=10, batch_size=64, lr=0.1, progress=False)
    >>> losses.shape
    (10,)
    >>> bool(losses[-1] < losses[0])
    True

    Record something after every epoch, here the accuracy of the posterior mean's network:

    >>> def accuracy(epoch, guide):
    ...     logits = model.evaluate(ba.as_gaussian(guide).loc, x)
    ...     record.append((epoch, float((logits.argmax(1) == y).float().mean())))
    >>> record = []
    >>> _ = ba.fit(model, guide, (x, y), epochs=3, batch_size=64, progress=False,
    ...            callback=accuracy)
    >>> [epoch for epoch, _ in record], all(0 <= acc <= 1 for _, acc in record)
    ([1, 2, 3], True)
    """
    x, y = as_data_pair(data)
    positive_int(epochs=epochs, batch_size=batch_size, num_particles=num_particles)
    check_positive_float("lr", lr)
    if lr_end is not None:
        check_positive_float("lr_end", lr_end)
    if not isinstance(guide, nn.Module):
        raise TypeError(f"guide must be a Pyro autoguide (an nn.Module), got {type(guide).__name__}")
    # a plain callable model holds no tensors, nor a guide before its first call: then the
    # other one, or else the data, decides
    device = same_device({"model": model, "guide": guide})
    if device is None:
        device = x.device
    n = len(x)
    batch_size = min(batch_size, n)
    steps_per_epoch = math.ceil(n / batch_size)
    kwargs = {"num_data": n} if isinstance(model, BayesianNetwork) else {}
    elbo = Trace_ELBO(num_particles=num_particles)
    history = np.zeros(epochs)
    threads = thread_count(num_threads, _step_work(model, x[:1], batch_size))
    with torch_threads(threads), torch.random.fork_rng(), pyro.get_param_store().scope():
        torch.manual_seed(seed)
        # creates the parameters if needed, from the model's draws (on the model's device)
        guide(x[:batch_size].to(device), y[:batch_size].to(device), **kwargs)
        params = [p for p in guide.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the guide has no trainable parameters")
        optimizer = DecayingAdam(params, lr, lr_end, epochs * steps_per_epoch, clip_norm)
        bar = tqdm(range(epochs), desc="fit", disable=not progress, leave=False)
        for epoch in bar:
            beta = float(kl_weight(epoch) if callable(kl_weight) else kl_weight)
            scaled_model = _ScaleLatents(beta)(model) if beta != 1.0 else model
            scaled_guide = pyro.poutine.scale(guide, scale=beta) if beta != 1.0 else guide
            order = torch.randperm(n)
            total_loss = 0.0
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                loss = elbo.differentiable_loss(scaled_model, scaled_guide, x[idx].to(device),
                                                y[idx].to(device), **kwargs)
                total_loss += optimizer.step(loss, f"the ELBO at epoch {epoch}",
                                             "lower lr or the guide's init_scale")
            history[epoch] = total_loss / steps_per_epoch
            bar.set_postfix(loss=f"{history[epoch]:.4g}")
            if callback is not None:
                with torch.random.fork_rng(), torch.no_grad():
                    callback(epoch + 1, guide)
    return history


def _step_work(model: Any, x: torch.Tensor, batch_size: int) -> float:
    """Multiply-adds of one minibatch's forward pass (``inf`` when it cannot be counted)."""
    if not isinstance(model, BayesianNetwork):
        return math.inf
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.net(x.to(device_of(model.net) or x.device))
    return counter.get_total_flops() / 2 * batch_size
