"""Positive-scale symmetries: which units may be rescaled, and the one function that rescales.

A hidden unit whose pre-activation ``a`` feeds only positively homogeneous operations
(``relu(c a) = c relu(a)`` for ``c > 0``: ReLU, LeakyReLU, identity, dropout, max and average
pooling, reshapes, sums with other units of the same kind) before it is read by the weights of
the next linear or convolutional layers can have its *incoming* parameters (the weight rows and
bias that compute ``a``) multiplied by ``c`` and its *outgoing* weights (the next layers' input
columns) by ``1 / c``, and the network computes the same function.

:func:`scale_symmetries` finds these symmetries in the graph that
:func:`~bnn_align.spec_from_module` traced, after it has derived the permutation groups. Like the
permutations it follows *chains*: the value created by a layer (its output units) is followed
through every operation until it is read by a layer's weights. A chain is scalable only when every
operation on the way is known to be positively homogeneous and nothing else reads it; anything
else (GELU, tanh, sigmoid, softplus, ELU, ReLU6, adding a constant or an unscaled tensor, an
unknown operation, reaching the network's output) breaks it. Chains joined by a sum (a residual
stream) share one scale.

Normalisation layers. A per-channel normalisation (BatchNorm, InstanceNorm, GroupNorm with one
group per channel, LayerNorm over other axes than the units') is invariant to rescaling its input
channels, but only approximately (its ``eps``) and, for BatchNorm in evaluation mode, only if the
running statistics are rescaled too. Such a chain is therefore *not* reported as scalable (the
library keeps to what it can prove exactly); LayerNorm and GroupNorm(1, C), which normalise over
the units, break it. The normalisation's own affine parameters (weight and bias) then compute a
new pre-activation and start a new chain: in ``conv -> BatchNorm -> ReLU -> conv`` the scalable
unit's incoming parameters are the BatchNorm weight and bias, its outgoing the second convolution's
input channels.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ._graph import UnionFind, flatten_args
from .attention import Heads, Several

if TYPE_CHECKING:  # the deriver imports this module
    from .derive import _Deriver

__all__ = ["ScaleSymmetry", "scale_symmetries", "scale_along", "unit_rows", "from_unit_rows"]


@dataclass(frozen=True)
class ScaleSymmetry:
    """The tensor axes one group's positive rescaling acts on.

    Scaling unit ``i`` by ``c_i > 0`` multiplies slice ``i`` of every ``incoming`` axis by
    ``c_i`` and slice ``i`` of every ``outgoing`` axis by ``1 / c_i`` (slices as the permutation
    spec lays them out, so blocked axes after a flatten scale whole blocks).

    Attributes
    ----------
    incoming : tuple of (str, int)
        ``(tensor name, axis)`` pairs that compute the units' pre-activations (weight rows,
        biases, a normalisation layer's affine parameters).
    outgoing : tuple of (str, int)
        ``(tensor name, axis)`` pairs that read the units (the next layers' input axes).

    Examples
    --------
    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import models
    >>> spec = ba.spec_from_module(models.mlp(4, [8], 3), torch.zeros(1, 4))
    >>> spec.scalable["P_0"]
    ScaleSymmetry(incoming=(('0.weight', 0), ('0.bias', 0)), outgoing=(('2.weight', 1),))
    >>> ba.spec_from_module(models.mlp(4, [8], 3, activation="gelu"), torch.zeros(1, 4)).scalable
    {}
    """

    incoming: tuple[tuple[str, int], ...]
    outgoing: tuple[tuple[str, int], ...]

    def to_dict(self) -> dict[str, list[list]]:
        return {"incoming": [list(a) for a in self.incoming],
                "outgoing": [list(a) for a in self.outgoing]}

    @classmethod
    def from_any(cls, value: Any, group: str) -> "ScaleSymmetry":
        """A ScaleSymmetry from itself or a mapping with ``incoming`` and ``outgoing`` lists."""
        if isinstance(value, ScaleSymmetry):
            return value
        if not isinstance(value, Mapping) or set(value) != {"incoming", "outgoing"}:
            raise TypeError(f"scalable[{group!r}] must be a ScaleSymmetry or a mapping with keys "
                            f"'incoming' and 'outgoing', got {value!r}")
        parts = []
        for key in ("incoming", "outgoing"):
            pairs = []
            for pair in value[key]:
                if (not isinstance(pair, Sequence) or len(pair) != 2
                        or not isinstance(pair[0], str) or not isinstance(pair[1], int)):
                    raise TypeError(f"scalable[{group!r}][{key!r}] must hold (tensor name, "
                                    f"axis) pairs, got {pair!r}")
                pairs.append((pair[0], int(pair[1])))
            parts.append(tuple(pairs))
        return cls(*parts)


def scale_along(tensor: torch.Tensor, axis: int, factors: torch.Tensor, block: int = 1
                ) -> torch.Tensor:
    """``tensor`` with slice ``i`` of axis ``axis`` multiplied by ``factors[i]``.

    Parameters
    ----------
    tensor : Tensor of shape ``(*axes, *extra)``
        Extra trailing axes (the columns of a covariance factor) are scaled along.
    axis : int
        The axis of the units.
    factors : Tensor of shape ``(units,)``
        One factor per unit; each unit owns ``block`` contiguous entries of the axis.
    block : int
        Block length (see :class:`~bnn_align.PermutationSpec`).

    Returns
    -------
    Tensor
        A new tensor of ``tensor``'s shape and dtype.
    """
    per_entry = factors.to(tensor.dtype).to(tensor.device)
    if block > 1:
        per_entry = per_entry.repeat_interleave(block)
    shape = [1] * tensor.dim()
    shape[axis] = -1
    return tensor * per_entry.reshape(shape)


def unit_rows(tensors: Mapping[str, torch.Tensor], pairs: Sequence[tuple[str, int]],
              blocks: Callable[[str, int], int]) -> torch.Tensor:
    """The units' slices of several ``(tensor, axis)`` pairs side by side: ``(units, d)``, row
    ``i`` the concatenation of unit ``i``'s slice of every pair (its incoming vector, for a
    group's incoming pairs). ``blocks(name, axis)`` gives the block length."""
    parts = []
    for name, axis in pairs:
        moved = tensors[name].movedim(axis, 0)
        parts.append(moved.reshape(moved.shape[0] // blocks(name, axis), -1))
    return torch.cat(parts, dim=1)


def from_unit_rows(rows: torch.Tensor, like: Mapping[str, torch.Tensor],
                   pairs: Sequence[tuple[str, int]], blocks: Callable[[str, int], int]
                   ) -> dict[str, torch.Tensor]:
    """The inverse of :func:`unit_rows`: name -> tensor shaped like ``like[name]``."""
    out, start = {}, 0
    for name, axis in pairs:
        moved = like[name].movedim(axis, 0)
        width = moved.numel() // (moved.shape[0] // blocks(name, axis))
        part = rows[:, start:start + width].reshape(moved.shape)
        out[name] = part.movedim(0, axis)
        start += width
    return out


# -- derivation --------------------------------------------------------------------------------
# activations with relu(c a) = c relu(a) for every c > 0, and value-preserving no-ops
_HOMOGENEOUS = {
    "relu", "leaky_relu", "dropout", "dropout1d", "dropout2d", "dropout3d", "clone",
    "contiguous", "detach", "float", "double", "half", "to", "type_as", "neg",
    "flatten", "view", "reshape", "squeeze", "unsqueeze", "unflatten", "transpose", "swapaxes",
    "permute", "t", "mean", "sum", "amax", "amin",
    *(f"{kind}_pool{k}d" for kind in ("max", "avg", "adaptive_avg", "adaptive_max")
      for k in (1, 2, 3)),
}
_HOMOGENEOUS_MODULES = (
    nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.Flatten, nn.Unflatten, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.ReflectionPad1d,
    nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
    nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d,
)
_SUMS = {"add", "sub"}
_SUMS_OPS = (operator.add, operator.sub, operator.iadd, operator.isub)
_PRODUCTS = (operator.mul, operator.truediv, operator.imul, operator.itruediv)
_PER_CHANNEL_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d,
                      nn.InstanceNorm2d, nn.InstanceNorm3d)


class _Chain:
    def __init__(self, var: int):
        self.var = var
        self.incoming: list[tuple[str, int]] = []
        self.outgoing: list[tuple[str, int]] = []
        self.broken = False
        self.absorbed = False  # read by a normalisation: approximately invariant only


class _Chains(UnionFind):
    """Union-find over chains (a residual sum joins chains into one scale); each root holds the
    joined chains' parameters and flags."""

    def __init__(self) -> None:
        super().__init__()
        self.chains: list[_Chain] = []

    def new(self, var: int) -> int:
        self.chains.append(_Chain(var))
        return self.add()

    def get(self, c: int) -> _Chain:
        return self.chains[self.find(c)]

    def union(self, a: int, b: int) -> int:
        gone = super().union(a, b)
        if gone is not None:
            first, second = self.get(a), self.chains[gone]
            first.incoming += second.incoming
            first.outgoing += second.outgoing
            first.broken |= second.broken
            first.absorbed |= second.absorbed
        return self.find(a)


def _name(target: Any) -> str:
    name = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


def _nodes_in(args: Any) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg(args, found.append)
    return found


def _axis_of(units: Any) -> int | None:
    """The axis of the value that holds the units; None where they were reduced away, are cut
    into attention heads or are spread over a tuple of a module's outputs."""
    if units is None or isinstance(units, (Heads, Several)):
        return None
    return units.axis


def _on_one_axis(units: Any) -> bool:
    """Units of one group (not concatenated) on one axis of the value."""
    return _axis_of(units) is not None and len(units.segments) == 1


def scale_symmetries(d: "_Deriver", group_of: Callable[[int], str | None]
                     ) -> dict[str, ScaleSymmetry]:
    """The scalable groups of a network the deriver has run over.

    ``group_of(var)`` is the name of the permutation group of a unit variable (None when the
    units are fixed). Returns group -> :class:`ScaleSymmetry`, in graph order; groups whose
    chains are not all provably scalable are left out.
    """
    chains = _Chains()
    state: dict[torch.fx.Node, int] = {}  # node -> chain whose scale the value carries

    def carried(args: Any) -> list[int]:
        return [state[n] for n in _nodes_in(args) if n in state]

    def brk(cs: list[int]) -> None:
        for c in cs:
            chains.get(c).broken = True

    def start(node: torch.fx.Node, incoming: list[tuple[str, int]]) -> None:
        units = d.units.get(node)
        if not _on_one_axis(units):
            return
        c = chains.new(units.segments[0])
        chains.get(c).incoming += incoming
        state[node] = c

    def passes(node: torch.fx.Node, inputs: list[int]) -> None:
        units = d.units.get(node)
        if not inputs:
            return
        if not _on_one_axis(units):
            brk(inputs)  # the units were reduced away, fixed, concatenated or cut into heads
            return
        c = inputs[0]
        for other in inputs[1:]:
            c = chains.union(c, other)
        state[node] = c

    for node in d.module.graph.nodes:
        inputs = carried((node.args, node.kwargs))
        if node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "output":
            brk(inputs)  # a scaled output changes the function
            continue
        if node.op == "call_module":
            _module(d, node, d.module.get_submodule(node.target), inputs, chains, start,
                    passes, brk)
            continue
        name = _name(node.target)
        if node.target in _SUMS_OPS or name in _SUMS:
            operands = list(node.args)
            if (len(operands) == 2 and not node.kwargs
                    and all(isinstance(a, torch.fx.Node) and a in state for a in operands)):
                passes(node, inputs)
            else:
                brk(inputs)  # a constant or an unscaled tensor added to scaled units
            continue
        if node.target in _PRODUCTS or name in ("mul", "div", "true_divide"):
            tensors = [a for a in flatten_args((node.args, node.kwargs))
                       if isinstance(a, torch.fx.Node)]
            divide = node.target in (operator.truediv, operator.itruediv) or name != "mul"
            # a product with a number is homogeneous; dividing by scaled units is not
            if len(tensors) == 1 and (not divide or node.args[0] is tensors[0]):
                passes(node, inputs)
            else:
                brk(inputs)
            continue
        if name in _HOMOGENEOUS:
            passes(node, inputs)
            continue
        if name in ("cat", "concat", "concatenate", "stack"):
            parts = [n for n in _nodes_in(node.args[0])] if node.args else []
            if parts and all(p in state for p in parts):
                passes(node, inputs)
            else:
                brk(inputs)
            continue
        if name in ("pad", "constant_pad_nd"):
            value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else 0)
            if value in (0, 0.0, None):
                passes(node, inputs)
            else:
                brk(inputs)
            continue
        if name in ("size", "dim", "getattr") or (name == "getitem" and not inputs):
            continue  # shapes carry no values
        brk(inputs)

    roots = sorted({chains.find(c) for c in range(len(chains.parent))})
    # a (tensor, axis) scaled by two chains (a layer called twice) or twice by one: no single
    # rescaling of one chain is then provably exact
    count: dict[tuple[str, int], int] = {}
    for r in roots:
        for pair in chains.chains[r].incoming + chains.chains[r].outgoing:
            count[pair] = count.get(pair, 0) + 1
    merged: dict[str, tuple[list, list]] = {}
    for r in roots:
        chain = chains.chains[r]
        group = group_of(chain.var)
        pairs = chain.incoming + chain.outgoing
        if (chain.broken or chain.absorbed or group is None or not chain.incoming
                or not chain.outgoing or any(count[p] > 1 for p in pairs)
                or any(group_of(v) != group for v in _vars_of(d, pairs) or [None])):
            continue
        # several scalable chains of one group (independent symmetries) share one scale
        incoming, outgoing = merged.setdefault(group, ([], []))
        incoming += chain.incoming
        outgoing += chain.outgoing
    return {g: ScaleSymmetry(tuple(i), tuple(o)) for g, (i, o) in merged.items()}


def _vars_of(d: "_Deriver", pairs: list[tuple[str, int]]) -> list[int] | None:
    # every axis a rescaling touches must belong to a single (not concatenated) group
    out = []
    for key in pairs:
        segments = d.assignments.get(key, ())
        if len(segments) != 1:
            return None
        out.extend(segments)
    return out


def _module(d: "_Deriver", node: torch.fx.Node, m: nn.Module, inputs: list[int],
            chains: _Chains, start: Callable, passes: Callable, brk: Callable) -> None:
    prefix = node.target + "."
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    if isinstance(m, nn.Linear) or (isinstance(m, conv) and m.groups == 1):
        if len(node.args) != 1 or node.kwargs:
            brk(inputs)
            return
        for c in inputs:
            chains.get(c).outgoing.append((prefix + "weight", 1))
        start(node, [(prefix + "weight", 0)] + ([(prefix + "bias", 0)]
                                                if m.bias is not None else []))
        return
    if isinstance(m, _HOMOGENEOUS_MODULES) or (
            isinstance(m, (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d))
            and m.value == 0):
        passes(node, inputs)
        return
    per_channel = isinstance(m, _PER_CHANNEL_NORMS) or (
        isinstance(m, nn.GroupNorm) and m.num_groups == m.num_channels)
    units = d.units.get(node.args[0]) if node.args else None
    if isinstance(m, nn.LayerNorm) and _axis_of(units) is not None:
        x_dim = len(node.args[0].meta.get("_bnn_shape", ()))
        per_channel = units.axis < x_dim - len(m.normalized_shape)
    if isinstance(m, (*_PER_CHANNEL_NORMS, nn.GroupNorm, nn.LayerNorm)):
        for c in inputs:
            if per_channel:
                chains.get(c).absorbed = True
            else:
                chains.get(c).broken = True
        # the affine parameters compute a fresh pre-activation per unit
        affine = [(prefix + t, axis) for (name, axis) in d.assignments
                  for t in ("weight", "bias") if name == prefix + t]
        if any(name == prefix + "weight" for name, _ in affine):
            start(node, affine)
        return
    if isinstance(m, nn.Embedding):
        start(node, [(prefix + "weight", 1)])
        return
    brk(inputs)
