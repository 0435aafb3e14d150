"""MLPs, CNNs and ResNets: the standard (fully permutation-symmetric) networks.

Every builder returns an ordinary deterministic PyTorch module with readable parameter names
(``"0.weight"`` for the MLP, ``"layer1.0.conv1.weight"`` for the ResNet). Nothing here knows about
Pyro: :class:`bnn_align.BayesianNetwork` turns any of them (or any other module) into a Bayesian
model, and :func:`bnn_align.spec_from_module` derives their permutation symmetries.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from .._checks import check_int
from .asymmetric import AsymConv1d, AsymConv2d, AsymLinear, FiGLU, default_num_fixed, layer_seed

__all__ = ["mlp", "cnn1d", "cnn2d", "resnet", "BasicBlock", "ResNet"]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
}


def _activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}"
        ) from None


ASYMMETRIES = (None, "none", "w", "sigma")


class _Layers:
    """Makes a builder's layers: standard ones, or with ``asymmetry`` ("w": every linear and
    convolutional layer W-asymmetric; "sigma": every activation a FiGLU), each asymmetric layer
    seeded with ``layer_seed(seed, i)`` for its index ``i`` in the order of construction."""

    def __init__(self, asymmetry: str | None, seed: int, activation: str):
        if asymmetry not in ASYMMETRIES:
            raise ValueError(f"asymmetry must be None, 'w' or 'sigma', got {asymmetry!r}")
        self.kind = None if asymmetry == "none" else asymmetry
        self.seed = check_int("asymmetry_seed", seed, low=0)
        _activation(activation)  # an unknown name fails even where FiGLU replaces it
        self.activation = activation
        self.count = 0

    def _next_seed(self) -> int:
        self.count += 1
        return layer_seed(self.seed, self.count - 1)

    def linear(self, fan_in: int, fan_out: int, last: bool = False) -> nn.Module:
        if self.kind != "w":
            return nn.Linear(fan_in, fan_out)
        self._check_row(fan_in)
        num_fixed = default_num_fixed(fan_in, last=last)
        # Lim et al.'s scales: 1, and a quarter in the output layer (256 of 512 fixed there).
        # Milder fixed entries (1 / sqrt(num_fixed), unit variance per unit) leave
        # posteriors that are far from linearly connected: benchmarks/NOTES.md
        scale = 0.25 if last else 1.0
        return AsymLinear(fan_in, fan_out, num_fixed, scale, self._next_seed())

    def conv(self, dim: int, fan_in: int, fan_out: int, kernel: int, **kwargs: Any) -> nn.Module:
        if self.kind != "w":
            return {1: nn.Conv1d, 2: nn.Conv2d}[dim](fan_in, fan_out, kernel, **kwargs)
        self._check_row(fan_in * kernel ** dim)
        layer = {1: AsymConv1d, 2: AsymConv2d}[dim]
        return layer(fan_in, fan_out, kernel, seed=self._next_seed(), **kwargs)

    def _check_row(self, row: int) -> None:
        if row < 2:
            raise ValueError(f"asymmetry='w' needs at least 2 weights per unit (one fixed, one "
                             f"free), but a layer of this network has {row}")

    def act(self, units: int, axis: int = -1) -> nn.Module:
        if self.kind != "sigma":
            return _activation(self.activation)
        return FiGLU(units, self._next_seed(), axis=axis)


def mlp(
    in_features: int,
    widths: Sequence[int],
    out_features: int,
    *,
    activation: str = "relu",
    asymmetry: str | None = None,
    asymmetry_seed: int = 0,
) -> nn.Sequential:
    """Fully connected network ``Linear -> act -> ... -> Linear``.

    Parameters
    ----------
    in_features : int
        Size of the input vector; inputs have shape ``(batch, in_features)``.
    widths : sequence of int
        Hidden widths, one per hidden layer (any depth, may be empty).
    out_features : int
        Output size (number of classes or regression targets).
    activation : str
        One of ``"relu"``, ``"gelu"``, ``"tanh"``, ``"silu"``, ``"leaky_relu"``.
    asymmetry : {None, "w", "sigma"}
        ``None`` (or ``"none"``): the standard network. ``"w"``: every linear layer an
        :class:`~bnn_align.models.AsymLinear` (an eighth of each hidden row fixed at scale 1,
        half of each output row at scale 1/4, as Lim et al.; their weights are
        then ``"0.free"``, ``"2.free"``, ...). ``"sigma"``: every activation a
        :class:`~bnn_align.models.FiGLU` (which replaces ``activation``). Either removes
        every permutation symmetry of the hidden units.
    asymmetry_seed : int
        Seed of the fixed entries (layer ``i`` gets ``layer_seed(asymmetry_seed, i)``): two
        networks built with one seed share them, whatever the global random state.

    Returns
    -------
    nn.Sequential
        Linear layers sit at even indices: ``"0.weight"``, ``"2.weight"``, ...

    Raises
    ------
    ValueError
        A size that is not a positive integer (naming it), an unknown activation or
        ``asymmetry``, a negative ``asymmetry_seed``.

    Examples
    --------
    >>> import torch
    >>> from bnn_align import models
    >>> net = models.mlp(4, [8, 8], 3)
    >>> [name for name, _ in net.named_parameters()]
    ['0.weight', '0.bias', '2.weight', '2.bias', '4.weight', '4.bias']
    >>> net(torch.randn(5, 4)).shape
    torch.Size([5, 3])
    >>> models.mlp(4, [0], 3)
    Traceback (most recent call last):
        ...
    ValueError: widths[0] must be a positive integer, got 0

    A W-asymmetric MLP has no permutation symmetry left:

    >>> asym = models.mlp(4, [8, 8], 3, asymmetry="w", asymmetry_seed=0)
    >>> [name for name, _ in asym.named_parameters()][:2]
    ['0.free', '0.bias']
    >>> import bnn_align as ba
    >>> ba.spec_from_module(asym, torch.zeros(1, 4)).groups
    []
    """
    sizes = [check_int("in_features", in_features),
             *(check_int(f"widths[{i}]", w) for i, w in enumerate(widths)),
             check_int("out_features", out_features)]
    make = _Layers(asymmetry, asymmetry_seed, activation)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(make.linear(fan_in, fan_out, last=i == len(sizes) - 2))
        if i < len(sizes) - 2:
            layers.append(make.act(fan_out))
    return nn.Sequential(*layers)


def _cnn(
    dim: int,
    in_channels: int,
    input_size: int | tuple[int, ...],
    num_classes: int,
    channels: Sequence[int],
    hidden: Sequence[int],
    kernel_size: int,
    activation: str,
    asymmetry: str | None = None,
    asymmetry_seed: int = 0,
) -> nn.Sequential:
    make = _Layers(asymmetry, asymmetry_seed, activation)
    pool = {1: nn.MaxPool1d, 2: nn.MaxPool2d}[dim]
    channels = [check_int(f"channels[{i}]", c) for i, c in enumerate(channels)]
    hidden = [check_int(f"hidden[{i}]", h) for i, h in enumerate(hidden)]
    spatial = [input_size] * dim if isinstance(input_size, int) else list(input_size)
    if len(spatial) != dim:
        raise ValueError(f"input_size must have {dim} entries, got {input_size}")
    layers: list[nn.Module] = []
    previous = in_channels
    for c in channels:
        layers += [make.conv(dim, previous, c, kernel_size, padding=kernel_size // 2),
                   make.act(c, axis=1)]
        if min(spatial) >= 2:
            layers.append(pool(2))
            spatial = [s // 2 for s in spatial]
        previous = c
    layers.append(nn.Flatten())
    features = previous
    for s in spatial:
        features *= s
    for h in hidden:
        layers += [make.linear(features, h), make.act(h)]
        features = h
    layers.append(make.linear(features, num_classes, last=True))
    return nn.Sequential(*layers)


def cnn1d(
    in_channels: int = 1,
    length: int = 40,
    num_classes: int = 10,
    *,
    channels: Sequence[int] = (32, 32),
    hidden: Sequence[int] = (128,),
    kernel_size: int = 5,
    activation: str = "relu",
    asymmetry: str | None = None,
    asymmetry_seed: int = 0,
) -> nn.Sequential:
    """1-D convolutional network: ``[Conv1d -> act -> MaxPool1d] * k -> Flatten -> MLP``.

    Inputs have shape ``(batch, in_channels, length)``; for MNIST-1D (``(batch, 40)``) add the
    channel axis with ``x.unsqueeze(1)`` or load it with ``mnist1d(channel_axis=True)``. The
    flatten makes the first linear layer's input axis a block per channel, which
    :func:`bnn_align.spec_from_module` handles.

    Parameters
    ----------
    in_channels, length : int
        Shape of one input, ``(in_channels, length)``.
    num_classes : int
        Output size.
    channels : sequence of int
        Output channels of each convolution; each is followed by a max-pooling that halves the
        length (while it is at least 2).
    hidden : sequence of int
        Widths of the hidden linear layers after the flatten (may be empty).
    kernel_size : int
        Odd kernel sizes keep the length (padding ``kernel_size // 2``).
    activation : str
        As in :func:`mlp`.
    asymmetry, asymmetry_seed
        As in :func:`mlp`: ``"w"`` makes every convolution an
        :class:`~bnn_align.models.AsymConv1d` and every linear layer an
        :class:`~bnn_align.models.AsymLinear`; ``"sigma"`` every activation a
        :class:`~bnn_align.models.FiGLU` (over channels after a convolution).

    Returns
    -------
    nn.Sequential
        Maps ``(batch, in_channels, length)`` to ``(batch, num_classes)``.

    Raises
    ------
    ValueError
        A channel count or hidden width that is not a positive integer, an unknown
        activation or ``asymmetry``.

    Examples
    --------
    >>> import torch
    >>> from bnn_align import models
    >>> net = models.cnn1d(1, 40, 10, channels=(4, 4), hidden=(16,))
    >>> net(torch.randn(2, 1, 40)).shape
    torch.Size([2, 10])

    Two poolings leave 10 positions, so the first linear layer reads 4 channels x 10:

    >>> net[7]
    Linear(in_features=40, out_features=16, bias=True)
    """
    return _cnn(1, in_channels, length, num_classes, channels, hidden, kernel_size, activation,
                asymmetry, asymmetry_seed)


def cnn2d(
    in_channels: int = 3,
    image_size: int | tuple[int, int] = 32,
    num_classes: int = 10,
    *,
    channels: Sequence[int] = (32, 64),
    hidden: Sequence[int] = (128,),
    kernel_size: int = 3,
    activation: str = "relu",
    asymmetry: str | None = None,
    asymmetry_seed: int = 0,
) -> nn.Sequential:
    """2-D convolutional network: ``[Conv2d -> act -> MaxPool2d] * k -> Flatten -> MLP``.

    Inputs have shape ``(batch, in_channels, height, width)``.

    Parameters
    ----------
    in_channels : int
        Channels of the input (3 for RGB images).
    image_size : int or (int, int)
        ``height`` and ``width`` of one input (one int for square images).
    num_classes : int
        Output size.
    channels, hidden, kernel_size, activation, asymmetry, asymmetry_seed
        As in :func:`cnn1d`; every pooling halves both spatial sizes.

    Returns
    -------
    nn.Sequential
        Maps ``(batch, in_channels, height, width)`` to ``(batch, num_classes)``.

    Raises
    ------
    ValueError
        ``image_size`` without two entries, a channel count or hidden width that is not a
        positive integer, an unknown activation or ``asymmetry``.

    Examples
    --------
    >>> import torch
    >>> from bnn_align import models
    >>> net = models.cnn2d(1, 8, 10, channels=(4,), hidden=(16,))
    >>> net(torch.randn(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    >>> net[4]                     # 4 channels x 4 x 4 positions after one pooling
    Linear(in_features=64, out_features=16, bias=True)
    """
    return _cnn(2, in_channels, image_size, num_classes, channels, hidden, kernel_size, activation,
                asymmetry, asymmetry_seed)


def _norm(kind: str | None, dim: int, channels: int) -> nn.Module:
    if kind is None or kind == "none":
        return nn.Identity()
    if kind == "layer":
        # GroupNorm with one group normalises each sample over (C, *spatial): a per-sample
        # LayerNorm with per-channel affine parameters, which commutes with channel permutations.
        return nn.GroupNorm(1, channels)
    if kind == "batch":
        return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dim](channels)
    raise ValueError(f"norm must be 'layer', 'batch' or None, got {kind!r}")


class BasicBlock(nn.Module):
    """Two ``conv3 -> norm`` layers with a residual connection (ResNet v1 basic block).

    When the stride or width changes, the shortcut is a 1x1 convolution followed by a norm layer
    (a "downsampling shortcut", option B of He et al.); otherwise it is the identity.

    Parameters
    ----------
    dim : {1, 2}
        Convolutions over sequences or images.
    in_channels, channels : int
        Channels in and out.
    stride : int
        Stride of the first convolution (and of the shortcut): 2 halves the spatial size.
    norm : {"layer", "batch", None}
        As in :func:`resnet`.
    layers : optional
        Internal: the maker of the (possibly asymmetric) layers, from :func:`resnet`.

    Examples
    --------
    >>> import torch
    >>> from bnn_align import models
    >>> block = models.BasicBlock(1, 4, 8, 2, "layer")
    >>> block(torch.randn(2, 4, 40)).shape
    torch.Size([2, 8, 20])
    >>> [name for name, _ in block.named_parameters() if name.startswith("shortcut")]
    ['shortcut.0.weight', 'shortcut.1.weight', 'shortcut.1.bias']
    """

    def __init__(self, dim: int, in_channels: int, channels: int, stride: int, norm: str | None,
                 layers: "_Layers | None" = None):
        super().__init__()
        make = layers if layers is not None else _Layers(None, 0, "relu")
        self.conv1 = make.conv(dim, in_channels, channels, 3, stride=stride, padding=1,
                               bias=False)
        self.norm1 = _norm(norm, dim, channels)
        self.conv2 = make.conv(dim, channels, channels, 3, padding=1, bias=False)
        self.norm2 = _norm(norm, dim, channels)
        self.relu = make.act(channels, axis=1)
        if stride != 1 or in_channels != channels:
            self.shortcut: nn.Module = nn.Sequential(
                make.conv(dim, in_channels, channels, 1, stride=stride, bias=False),
                _norm(norm, dim, channels),
            )
        else:
            self.shortcut = nn.Identity()
        # a FiGLU holds its own fixed matrix, so the second activation needs one of its own
        self.relu2 = make.act(channels, axis=1) if make.kind == "sigma" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu(out) if self.relu2 is None else self.relu2(out)


class ResNet(nn.Module):
    """ResNet for small inputs (He et al. 2016, CIFAR variant): stem, three stages, pooled head.

    Parameter names follow torchvision's style: ``conv1``, ``norm1``, ``layer{1,2,3}.{i}.conv1``,
    ``layer2.0.shortcut.0`` and ``fc``. Build it with :func:`resnet`, which documents the
    parameters (same names, ``dim`` first here).

    Raises
    ------
    ValueError
        ``dim`` not 1 or 2, a depth that is not ``6 n + 2``, or a width that is not a positive
        integer.

    Examples
    --------
    >>> from bnn_align import models
    >>> net = models.ResNet(dim=1, depth=8, in_channels=1)
    >>> [len(stage) for stage in (net.layer1, net.layer2, net.layer3)]
    [1, 1, 1]
    >>> net.fc
    Linear(in_features=64, out_features=10, bias=True)
    """

    def __init__(
        self,
        dim: int = 2,
        depth: int = 20,
        width: int = 1,
        num_classes: int = 10,
        in_channels: int = 3,
        norm: str | None = "layer",
        base_channels: int = 16,
        asymmetry: str | None = None,
        asymmetry_seed: int = 0,
    ):
        super().__init__()
        make = _Layers(asymmetry, asymmetry_seed, "relu")
        if dim not in (1, 2):
            raise ValueError(f"dim must be 1 or 2, got {dim}")
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth must be 6n + 2 (8, 14, 20, 32, ...), got {depth}")
        check_int("width", width)
        blocks = (depth - 2) // 6
        widths = [base_channels * width * m for m in (1, 2, 4)]
        self.conv1 = make.conv(dim, in_channels, widths[0], 3, padding=1, bias=False)
        self.norm1 = _norm(norm, dim, widths[0])
        self.relu = make.act(widths[0], axis=1)
        previous = widths[0]
        for stage, channels in enumerate(widths, start=1):
            stride = 1 if stage == 1 else 2
            layer = []
            for b in range(blocks):
                layer.append(BasicBlock(dim, previous, channels, stride if b == 0 else 1, norm,
                                        make))
                previous = channels
            setattr(self, f"layer{stage}", nn.Sequential(*layer))
        self.pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}[dim](1)
        self.flatten = nn.Flatten()
        self.fc = make.linear(previous, num_classes, last=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.norm1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


def resnet(
    depth: int = 20,
    width: int = 1,
    num_classes: int = 10,
    *,
    in_channels: int = 3,
    dim: int = 2,
    norm: str | None = "layer",
    base_channels: int = 16,
    asymmetry: str | None = None,
    asymmetry_seed: int = 0,
) -> ResNet:
    """ResNet-``depth`` (ResNet-20 by default) with a width multiplier.

    Parameters
    ----------
    depth : int
        ``6 n + 2``; ResNet-20 has three stages of three basic blocks.
    width : int
        Width multiplier: stage widths are ``base_channels * width * (1, 2, 4)``.
    num_classes, in_channels : int
        Output and input sizes. Inputs have shape ``(batch, in_channels, *spatial)``.
    dim : int
        1 for sequences (MNIST-1D: ``(batch, 1, 40)``), 2 for images.
    norm : {"layer", "batch", None}
        ``"layer"`` (default) normalises each sample on its own (``GroupNorm(1, C)``), which keeps
        the network a deterministic function of one input and its weights; ``"batch"`` uses
        BatchNorm, whose running statistics are buffers that permutations move too.
    base_channels : int
        Width of the first stage at ``width=1``.
    asymmetry, asymmetry_seed
        As in :func:`mlp`: ``"w"`` makes every convolution (shortcuts too) W-asymmetric and
        ``fc`` an :class:`~bnn_align.models.AsymLinear`; ``"sigma"`` every ReLU a
        :class:`~bnn_align.models.FiGLU` over channels. Normalisation layers stay as they are.

    Returns
    -------
    ResNet
        Maps ``(batch, in_channels, *spatial)`` to ``(batch, num_classes)``.

    Raises
    ------
    ValueError
        A depth that is not ``6 n + 2``, ``dim`` not 1 or 2, an unknown ``norm`` or
        ``asymmetry``.

    Examples
    --------
    A 1-D ResNet-8 for MNIST-1D:

    >>> import torch
    >>> from bnn_align import models
    >>> net = models.resnet(8, width=1, in_channels=1, dim=1)
    >>> net(torch.randn(2, 1, 40)).shape
    torch.Size([2, 10])
    >>> [name for name, _ in net.named_parameters()][:4]
    ['conv1.weight', 'norm1.weight', 'norm1.bias', 'layer1.0.conv1.weight']
    >>> models.resnet(10)
    Traceback (most recent call last):
        ...
    ValueError: depth must be 6n + 2 (8, 14, 20, 32, ...), got 10
    """
    return ResNet(dim, depth, width, num_classes, in_channels, norm, base_channels, asymmetry,
                  asymmetry_seed)
