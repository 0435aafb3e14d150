"""Layers with reduced permutation symmetry (Lim et al., "The Empirical Impact of Neural Parameter
Symmetries, or Lack Thereof", NeurIPS 2024).

* W-asymmetric layers (:class:`AsymLinear`, :class:`AsymConv1d`, :class:`AsymConv2d`): in every
  output row of the weight (an output unit's ``in_features`` entries, or an output channel's
  ``in_channels * kernel`` entries) ``num_fixed`` entries at random positions hold fixed values
  ``scale * N(0, 1)``. Permuting the layer's output units or its input units would move those
  entries, so neither is a symmetry any more.
* The sigma-asymmetric nonlinearity :class:`FiGLU`: ``y = sigmoid(C x) * x`` with a fixed random
  Gaussian matrix ``C``, which mixes all units of ``x`` and so breaks their permutation symmetry.

Fixed positions and values come from the layer's ``seed`` alone (a local ``torch.Generator``; the
global random state is neither read nor advanced by them), so two networks built with the same
seeds share them exactly, whatever else was drawn before.

How fixed entries stay out of the posterior: they are not parameters. A W-asymmetric layer's only
weight parameter is ``free``, of shape ``(out, row_length - num_fixed)``: the free entries of each
row, in increasing position order. The fixed values and the positions are buffers, and
``weight`` (a property) scatters both into the full weight in every forward pass. A
:class:`~bnn_align.BayesianNetwork` makes sites of parameters only, so a guide over it has no
variational parameters for the fixed entries at all: they carry no posterior, no KL term, no
weight in the matching objective and are never interpolated. ``C`` of :class:`FiGLU` is a buffer
for the same reason.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_int

__all__ = ["AsymLinear", "AsymConv1d", "AsymConv2d", "FiGLU", "default_num_fixed",
           "layer_seed"]


def default_num_fixed(row_length: int, last: bool = False) -> int:
    """The default number of fixed entries per row: an eighth of the row (a half in the last
    layer), at least one, and always leaving at least one free entry.

    Lim et al.'s MLP (784-512x3-10) fixed 64 of the 512 (or 784) entries of a hidden row and 256
    of the 512 entries of an output row; these fractions carry that over to any width.

    Parameters
    ----------
    row_length : int
        Entries in one output row (``in_features``, or ``in_channels * kernel``); at least 2.
    last : bool
        For the output layer.

    Returns
    -------
    int

    Raises
    ------
    ValueError
        A row length below 2 (no room for a fixed and a free entry).

    Examples
    --------
    >>> from bnn_align.models import default_num_fixed
    >>> default_num_fixed(512), default_num_fixed(512, last=True), default_num_fixed(40)
    (64, 256, 5)
    """
    row_length = check_int("row_length", row_length, low=2)
    wanted = row_length // 2 if last else math.ceil(row_length / 8)
    return min(max(wanted, 1), row_length - 1)


def layer_seed(seed: int, index: int) -> int:
    """The seed of layer ``index`` of a network built with ``seed`` (builders use it so that
    different layers get different fixed entries, and two builds with one seed the same ones).

    Parameters
    ----------
    seed : int
        The network's ``asymmetry_seed`` (``>= 0``).
    index : int
        The layer's index among the network's asymmetric layers (``>= 0``).

    Returns
    -------
    int
        A seed in ``0 .. 2**32 - 1`` mixed from both by ``numpy.random.SeedSequence``.

    Raises
    ------
    ValueError
        A negative or non-integer ``seed`` or ``index``.

    Examples
    --------
    >>> from bnn_align.models import layer_seed
    >>> layer_seed(0, 1) == layer_seed(0, 1), layer_seed(0, 1) == layer_seed(0, 2)
    (True, False)
    """
    return int(np.random.SeedSequence([check_int("seed", seed, low=0),
                                       check_int("index", index, low=0)]).generate_state(1)[0])


def _check_scale(name: str, scale: Any) -> float:
    if (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
            or not 0 <= scale < math.inf):
        raise ValueError(f"{name} must be a finite number >= 0, got {scale!r}")
    return float(scale)


class _FixedEntries(nn.Module):
    """Shared machinery of the W-asymmetric layers: the ``free`` parameter, the buffers holding
    the fixed entries and where everything goes, and the full ``weight``."""

    free: nn.Parameter
    fixed_values: torch.Tensor
    fixed_index: torch.Tensor
    free_index: torch.Tensor
    order: torch.Tensor

    def _build(self, shape: tuple[int, ...], num_fixed: int | None, scale: float | None,
               seed: int, bias: bool) -> None:
        rows, row_length = shape[0], math.prod(shape[1:])
        if row_length < 2:
            raise ValueError(f"a W-asymmetric layer needs rows of at least 2 entries (one fixed, "
                             f"one free), got rows of {row_length}")
        if num_fixed is None:
            num_fixed = default_num_fixed(row_length)
        num_fixed = check_int("num_fixed", num_fixed, low=1, high=row_length - 1)
        scale = 1.0 if scale is None else _check_scale("scale", scale)
        seed = check_int("seed", seed, low=0)
        self.weight_shape = tuple(shape)
        self.num_fixed, self.scale, self.seed = num_fixed, scale, seed
        gen = torch.Generator().manual_seed(seed)
        # a random permutation of every row: its first num_fixed positions are fixed
        shuffled = torch.rand(rows, row_length, generator=gen).argsort(dim=1)
        fixed_index = shuffled[:, :num_fixed].sort(dim=1).values
        free_index = shuffled[:, num_fixed:].sort(dim=1).values
        values = scale * torch.randn(rows, num_fixed, generator=gen)
        self.register_buffer("fixed_index", fixed_index)
        self.register_buffer("free_index", free_index)
        self.register_buffer("fixed_values", values)
        # weight row = cat(free, fixed)[order]: one gather, which vmap and autograd both handle
        self.register_buffer("order", torch.cat([free_index, fixed_index], 1).argsort(dim=1))
        # the free entries start as nn.Linear/nn.Conv's would (uniform, bound 1/sqrt(fan_in)),
        # from the global random state like any other initial weight
        bound = 1.0 / math.sqrt(row_length)
        self.free = nn.Parameter(torch.empty(rows, row_length - num_fixed).uniform_(-bound, bound))
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(torch.empty(rows).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    @property
    def weight(self) -> torch.Tensor:
        """The full weight, of the usual shape: free and fixed entries in their places."""
        rows = torch.cat([self.free, self.fixed_values.to(self.free.dtype)], dim=-1)
        return rows.gather(-1, self.order).reshape(self.weight_shape)

    @property
    def fixed_mask(self) -> torch.Tensor:
        """Boolean tensor of the weight's shape, True at the fixed entries."""
        mask = torch.zeros(self.order.shape, dtype=torch.bool, device=self.order.device)
        mask.scatter_(1, self.fixed_index, True)
        return mask.reshape(self.weight_shape)

    def _extra(self) -> str:
        return (f"num_fixed={self.num_fixed}, scale={self.scale:.4g}, seed={self.seed}, "
                f"bias={self.bias is not None}")


class AsymLinear(_FixedEntries):
    """A linear layer ``y = x W^T + b`` with ``num_fixed`` fixed entries in every row of ``W``.

    The trainable weight is ``free`` (the other entries of each row), so a Bayesian model over the
    layer has sites ``"free"`` and ``"bias"`` only; ``weight`` is the full ``(out_features,
    in_features)`` matrix. See the module docstring for why.

    Parameters
    ----------
    in_features, out_features : int
        As in ``nn.Linear``; inputs have shape ``(..., in_features)``.
    num_fixed : int, optional
        Fixed entries per row, ``1 .. in_features - 1``; default
        :func:`default_num_fixed` ``(in_features)``, an eighth of the row.
    scale : float, optional
        Fixed values are ``scale * N(0, 1)`` (``scale >= 0``); default 1, Lim et al.'s: fixed
        entries large against the free ones are what removes the barrier between posteriors.
    seed : int
        Seed of the fixed positions and values (a local generator).
    bias : bool
        Learn an additive bias.

    Raises
    ------
    ValueError
        ``num_fixed`` outside ``1 .. in_features - 1`` (in particular larger than the row), a
        negative or infinite ``scale``, a negative seed, a size that is not a positive integer.

    Examples
    --------
    >>> import torch
    >>> from bnn_align.models import AsymLinear
    >>> layer = AsymLinear(8, 3, num_fixed=2, scale=1.0, seed=0)
    >>> [name for name, _ in layer.named_parameters()]
    ['free', 'bias']
    >>> layer.free.shape, layer.weight.shape
    (torch.Size([3, 6]), torch.Size([3, 8]))
    >>> layer.fixed_mask.sum(dim=1)                     # two fixed entries in every row
    tensor([2, 2, 2])
    >>> torch.equal(layer.weight[layer.fixed_mask],
    ...             AsymLinear(8, 3, num_fixed=2, scale=1.0, seed=0).weight[layer.fixed_mask])
    True
    >>> AsymLinear(8, 3, num_fixed=9)
    Traceback (most recent call last):
        ...
    ValueError: num_fixed must be an integer in 1..7, got 9
    """

    def __init__(self, in_features: int, out_features: int, num_fixed: int | None = None,
                 scale: float | None = None, seed: int = 0, *, bias: bool = True):
        super().__init__()
        self.in_features = check_int("in_features", in_features)
        self.out_features = check_int("out_features", out_features)
        self._build((self.out_features, self.in_features), num_fixed, scale, seed, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._extra()}"


class _AsymConv(_FixedEntries):
    dim = 0

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, ...],
                 num_fixed: int | None = None, scale: float | None = None, seed: int = 0, *,
                 stride: int | tuple[int, ...] = 1, padding: int | tuple[int, ...] = 0,
                 dilation: int | tuple[int, ...] = 1, bias: bool = True):
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels)
        self.out_channels = check_int("out_channels", out_channels)
        kernel = (kernel_size,) * self.dim if isinstance(kernel_size, int) else tuple(kernel_size)
        if len(kernel) != self.dim:
            raise ValueError(f"kernel_size must be an int or {self.dim} ints, got {kernel_size!r}")
        self.kernel_size = tuple(check_int("kernel_size", k) for k in kernel)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self._build((self.out_channels, self.in_channels, *self.kernel_size), num_fixed, scale,
                    seed, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = F.conv1d if self.dim == 1 else F.conv2d
        return conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, {self._extra()}")


class AsymConv1d(_AsymConv):
    """A 1-D convolution with ``num_fixed`` fixed entries in every output channel's
    ``in_channels * kernel_size`` weights.

    Parameters
    ----------
    in_channels, out_channels, kernel_size : int
        As in ``nn.Conv1d``; inputs have shape ``(batch, in_channels, length)``.
    num_fixed, scale, seed
        As in :class:`AsymLinear`, over rows of ``in_channels * kernel_size`` entries.
    stride, padding, dilation : int
        As in ``nn.Conv1d`` (one group only).
    bias : bool
        Learn an additive bias per output channel.

    Raises
    ------
    ValueError
        As :class:`AsymLinear`, with rows of ``in_channels * kernel_size`` entries.

    Examples
    --------
    >>> import torch
    >>> from bnn_align.models import AsymConv1d
    >>> conv = AsymConv1d(2, 4, 3, num_fixed=1, padding=1, seed=0)
    >>> conv.free.shape, conv.weight.shape                   # rows of 2 * 3 = 6 entries
    (torch.Size([4, 5]), torch.Size([4, 2, 3]))
    >>> conv(torch.randn(5, 2, 10)).shape
    torch.Size([5, 4, 10])
    """

    dim = 1


class AsymConv2d(_AsymConv):
    """A 2-D convolution with ``num_fixed`` fixed entries in every output channel's
    ``in_channels * kh * kw`` weights.

    Parameters
    ----------
    in_channels, out_channels : int
        As in ``nn.Conv2d``; inputs have shape ``(batch, in_channels, height, width)``.
    kernel_size : int or (int, int)
        As in ``nn.Conv2d``.
    num_fixed, scale, seed
        As in :class:`AsymLinear`, over rows of ``in_channels * kh * kw`` entries.
    stride, padding, dilation : int or (int, int)
        As in ``nn.Conv2d`` (one group only).
    bias : bool
        Learn an additive bias per output channel.

    Raises
    ------
    ValueError
        As :class:`AsymLinear`, with rows of ``in_channels * kh * kw`` entries.

    Examples
    --------
    >>> import torch
    >>> from bnn_align.models import AsymConv2d
    >>> conv = AsymConv2d(3, 8, 3, padding=1, seed=1)
    >>> conv.num_fixed, conv.weight.shape                    # ceil(27 / 8) fixed of 27
    (4, torch.Size([8, 3, 3, 3]))
    >>> conv(torch.randn(2, 3, 6, 6)).shape
    torch.Size([2, 8, 6, 6])
    """

    dim = 2


class FiGLU(nn.Module):
    """The sigma-asymmetric nonlinearity ``y = sigmoid(C x) * x`` with a fixed Gaussian ``C``.

    ``C`` (``dim x dim``, a buffer, never learned) holds ``scale * N(0, 1)`` entries drawn from
    ``seed``. Because ``C`` couples every unit with every other, permuting the units of ``x``
    changes the function unless the permutation happens to commute with ``C``.

    Parameters
    ----------
    dim : int
        Number of units (features, or channels of a convolution).
    seed : int
        Seed of ``C`` (a local generator).
    scale : float, optional
        Standard deviation of ``C``'s entries (``>= 0``); default ``1 / sqrt(dim)``, so ``C x``
        has about the scale of ``x`` at any width.
    axis : int
        The axis of ``x`` holding the units: ``-1`` for ``(batch, features)``, ``1`` for
        convolutional ``(batch, channels, *positions)``.

    Raises
    ------
    ValueError
        A ``dim`` that is not a positive integer, a negative seed or scale; in the forward
        pass an input whose ``axis`` does not have ``dim`` entries.

    Examples
    --------
    >>> import torch
    >>> from bnn_align.models import FiGLU
    >>> act = FiGLU(4, seed=0)
    >>> x = torch.randn(3, 4)
    >>> torch.allclose(act(x), torch.sigmoid(x @ act.C.T) * x)
    True
    >>> list(act.parameters()), act.C.shape                  # nothing to learn
    ([], torch.Size([4, 4]))
    >>> torch.equal(act.C, FiGLU(4, seed=0).C), torch.equal(act.C, FiGLU(4, seed=1).C)
    (True, False)
    """

    C: torch.Tensor

    def __init__(self, dim: int, seed: int = 0, scale: float | None = None, *, axis: int = -1):
        super().__init__()
        self.dim = check_int("dim", dim)
        self.seed = check_int("seed", seed, low=0)
        self.scale = 1.0 / math.sqrt(self.dim) if scale is None else _check_scale("scale", scale)
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"axis must be an int, got {axis!r}")
        self.axis = axis
        gen = torch.Generator().manual_seed(self.seed)
        self.register_buffer("C", self.scale * torch.randn(self.dim, self.dim, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[self.axis] != self.dim:
            raise ValueError(f"FiGLU({self.dim}) got an input of shape {tuple(x.shape)}: its "
                             f"axis {self.axis} must have {self.dim} units")
        h = x.movedim(self.axis, -1)
        return (torch.sigmoid(h @ self.C.T.to(h.dtype)) * h).movedim(-1, self.axis)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, seed={self.seed}, scale={self.scale:.4g}, axis={self.axis}"


#: every layer type whose presence removes permutation symmetry (``spec_from_module`` knows them)
ASYMMETRIC_LAYERS = (AsymLinear, AsymConv1d, AsymConv2d, FiGLU)
