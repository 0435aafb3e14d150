"""Derive a network's permutation symmetries from its graph (``spec_from_module``).

The module is traced with ``torch.fx`` and run once on an example input. Every activation tensor
carries at most one *unit axis* (features of a linear layer, channels of a convolution), labelled
by union-find variables. Each operation either creates a fresh variable (the output units of a
linear or convolutional layer, which may be reordered freely), passes its input's units through
(elementwise functions, pooling and padding of positions, normalisation that provably commutes
with permutations), or unites variables that must share one permutation (the branches of a
residual sum). The network's inputs and outputs are tied to a fixed variable that is never
permuted. What is not provably safe is refused, with the module and operation named, or, if
asked, tied to the fixed variable, which leaves it unpermuted. The result can therefore never
change the function.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch import nn
from torch.fx.operator_schemas import normalize_function

from ..models.asymmetric import ASYMMETRIC_LAYERS, AsymConv1d, AsymConv2d, AsymLinear
from ._graph import UnionFind, axis_order, flatten_args
from .scale import scale_symmetries
from .attention import AttentionRules, Heads, head_sets, op_name
from .spec import PermutationSpec

__all__ = ["spec_from_module"]

_FIXED = 0


class _UnionFind(UnionFind):
    """Unit variables; variable ``_FIXED`` (the network's inputs and outputs) is never permuted."""

    def __init__(self) -> None:
        super().__init__()
        self.origin: list[str] = []  # who created each variable (for group names)
        self.new("<input/output>")

    def new(self, origin: str) -> int:
        self.origin.append(origin)
        return self.add()


@dataclass(frozen=True)
class _Units:
    """The unit axis of an activation: which axis, which variables, and the block length.

    ``axis is None`` marks a tensor whose every axis is fixed (network inputs, outputs of ops that
    were frozen on request); ``segments`` holds several variables after a concatenation.
    """

    axis: int | None
    segments: tuple[int, ...]
    block: int = 1


_FIXED_UNITS = _Units(None, (_FIXED,))
# computed from parameters, buffers and constants alone: fixed like the inputs, but known to be
# free of activations (told apart by identity)
_CONSTANT_UNITS = _Units(None, (_FIXED,))


_REMEDY = ("Pass unknown='fix' to leave the units around it unpermuted, or write a "
           "PermutationSpec by hand.")


class UnsupportedOperation(ValueError):
    """Raised when a module contains an operation whose permutation behaviour is not known.

    ``problem`` names the operation and why it is refused; ``remedy`` is what the caller can do
    about it, which depends on the function the user called (``match`` re-raises with its own).
    """

    def __init__(self, problem: str, remedy: str = _REMEDY):
        super().__init__(f"{problem}. {remedy}")
        # torch.fx's interpreter appends its own notes to the message; keep the problem apart
        self.problem = problem


def check_unknown(unknown: Any) -> None:
    """Raise ``ValueError`` unless ``unknown`` is one of :func:`spec_from_module`'s policies."""
    if unknown not in ("error", "fix"):
        raise ValueError(f"unknown must be 'error' or 'fix', got {unknown!r}")


_ELEMENTWISE = {
    # activations and pointwise maths: any permutation of units commutes with them
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "elu", "selu", "celu", "leaky_relu",
    "softplus", "softsign", "hardtanh", "hardswish", "hardsigmoid", "mish", "logsigmoid",
    "tanhshrink", "abs", "neg", "exp", "log", "log1p", "sqrt", "rsqrt", "square", "sin", "cos",
    "erf", "sign", "reciprocal",
    # dropout is elementwise in distribution and the identity at evaluation
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    # softmax over any axis is permutation-equivariant on that axis
    "softmax", "log_softmax",
    # no-ops on values
    "clone", "contiguous", "float", "double", "half", "to", "detach", "type_as",
}
# clamp/clip with tensor bounds compare units with the bounds' units, like a binary operation
_CLAMP = {"clamp", "clip", "clamp_min", "clamp_max"}
# k-d pooling mixes the last k axes of its input and keeps the others where they are
_POOL = {f"{kind}_pool{k}d": k for kind in ("max", "avg", "adaptive_avg", "adaptive_max")
         for k in (1, 2, 3)}
_BINARY = {"add", "sub", "mul", "div", "true_divide", "maximum", "minimum", "where"}
_INPLACE_BINARY = {operator.iadd, operator.isub, operator.imul, operator.itruediv}
_RESHAPE = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "unflatten"}
_REDUCTION = {"mean", "sum", "amax", "amin", "logsumexp", "prod", "std", "var", "norm"}

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.SELU, nn.CELU,
    nn.LeakyReLU, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish,
    nn.LogSigmoid, nn.Tanhshrink, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Softmax, nn.LogSoftmax,
)
_POOL_MODULES = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2,
    nn.AvgPool3d: 3, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
}
# Padding only adds or removes positions of each channel on its own; every mode (also a nonzero
# constant, the same for every channel) commutes with permutations of any axis it leaves alone.
_PAD_MODULES = (
    nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d,
    nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
    nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d,
)  # nn.ZeroPad*d are ConstantPad*d
# Gate blocks packed along the hidden axis of a recurrent layer's weights
_GATES = {nn.LSTM: 4, nn.LSTMCell: 4, nn.GRU: 3, nn.GRUCell: 3}
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CHANNEL_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                 nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", repr(target))


class _Tracer(torch.fx.Tracer):
    # torch.nn's own modules are leaves (their semantics are known or refused by type);
    # containers and user modules are traced through.
    failed_in: str = ""  # the innermost submodule whose tracing raised, for the error message
    # buffers read in forward become graph nodes, so they can be sliced by traced sizes (the
    # causal mask of minimal GPTs: ``self.bias[:, :, :T, :T]``)
    proxy_buffer_attributes = True

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if not self.failed_in:
                self.failed_in = self.path_of_module(m)
            raise

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        if isinstance(m, ASYMMETRIC_LAYERS):  # known by type, see _Deriver.module_rule
            return True
        return type(m).__module__.startswith("torch.nn")


class _Deriver(AttentionRules, torch.fx.Interpreter):
    Units = _Units
    FIXED = _FIXED_UNITS
    CONSTANT = _CONSTANT_UNITS
    elementwise_modules = _ELEMENTWISE_MODULES

    def __init__(self, gm: torch.fx.GraphModule, unknown: str):
        super().__init__(gm)
        self.init_heads()
        self.uf = _UnionFind()
        self.unknown = unknown
        self.units: dict[torch.fx.Node, _Units | None] = {}
        # (tensor name, axis) -> variables; tensors reused by several calls are united.
        self.assignments: dict[tuple[str, int], tuple[int, ...]] = {}
        self.blocks: dict[tuple[str, int], int] = {}
        self.node: torch.fx.Node | None = None

    # -- helpers --------------------------------------------------------------------------------
    def where(self) -> str:
        node = self.node
        if node is None:
            return "?"
        if node.op == "call_module":
            module = self.module.get_submodule(node.target)
            return f"module {node.target!r} ({type(module).__name__})"
        stack = node.meta.get("nn_module_stack") or {}
        owner = list(stack.values())[-1][0] if stack else ""
        owner = f" in module {owner!r}" if owner else ""
        return f"operation {_target_name(node.target)!r} (node {node.name!r}){owner}"

    def refuse(self, why: str, inputs: Sequence[_Units | None] = ()) -> _Units:
        if self.unknown == "error":
            raise UnsupportedOperation(
                f"spec_from_module cannot prove that permutations commute with {self.where()}: "
                f"{why}")
        for u in inputs:
            self.fix(u)
        return _FIXED_UNITS

    def fix(self, u: _Units | None) -> None:
        if u is not None:
            for v in u.segments:
                self.uf.union(v, _FIXED)

    def unite(self, a: _Units, b: _Units) -> bool:
        if a.axis is None or b.axis is None:
            self.fix(a)
            self.fix(b)
            return True
        if len(a.segments) != len(b.segments) or a.block != b.block:
            return False
        for va, vb in zip(a.segments, b.segments):
            self.uf.union(va, vb)
        return True

    def assign(self, name: str, axis: int, units: _Units) -> None:
        """Record that axis ``axis`` of tensor ``name`` carries ``units``."""
        key = (name, axis)
        if key not in self.assignments:
            self.assignments[key] = units.segments
            self.blocks[key] = units.block
            return
        # the tensor is used again (a shared layer): both uses must permute it the same way
        old = self.assignments[key]
        if len(old) == len(units.segments) and self.blocks[key] == units.block:
            for va, vb in zip(old, units.segments):
                self.uf.union(va, vb)
        else:
            # two different unit layouts meet in one tensor: only leaving it alone is safe
            for v in (*old, *units.segments):
                self.uf.union(v, _FIXED)

    def tensor_units(self, args: Any) -> list[_Units | None]:
        found: list[_Units | None] = []
        torch.fx.node.map_arg(args, lambda n: found.append(self.units.get(n)))
        return found

    def fresh(self, origin: str, axis: int) -> _Units:
        return _Units(axis, (self.uf.new(origin),))

    # -- the interpreter hooks --------------------------------------------------------------------
    def run_node(self, n: torch.fx.Node) -> Any:
        self.node = n
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        result = getattr(self, n.op)(n.target, args, kwargs)
        if n.op == "placeholder":
            self.units[n] = _FIXED_UNITS if isinstance(result, torch.Tensor) else None
        elif n.op == "output":
            for u in self.tensor_units(n.args):
                self.fix(u)
        elif n.op == "get_attr":
            self.units[n] = None
        elif isinstance(result, torch.Tensor) or n.op == "call_module" or (
                isinstance(result, (tuple, list)) and result
                and all(isinstance(t, torch.Tensor) for t in result)):  # split, chunk
            self.units[n] = self.rule(n, args, kwargs, result)
        else:
            # Shapes (x.size(0), x.shape, x.dim()) carry no units. Other non-tensors computed
            # from activations (x.item(), x.tolist()) could carry unit order into the function.
            self.units[n] = None
            inputs = [u for u in self.tensor_units((n.args, n.kwargs)) if u is not None]
            if inputs and _target_name(n.target) not in ("size", "dim", "getattr", "getitem"):
                self.refuse("it turns activations into a Python value", inputs)
        return result

    def rule(self, n: torch.fx.Node, args: tuple, kwargs: dict, out: torch.Tensor) -> _Units:
        if n.op == "call_module":
            return self.module_rule(n.target, self.module.get_submodule(n.target), args, out)
        name = _target_name(n.target)
        units = self.tensor_units((n.args, n.kwargs))
        handled = self.attention_rule(n, name, args, kwargs, out)
        if handled is not None:
            return handled
        uses_attr = any(
            isinstance(a, torch.fx.Node) and a.op == "get_attr"
            for a in flatten_args((n.args, n.kwargs))
        )
        if uses_attr and op_name(n, name) in ("add", "sub", "mul") and any(
                u is not None for u in units) and not any(isinstance(u, Heads) for u in units):
            return self.parameter_broadcast(n, out)
        if uses_attr:
            return self.refuse("it uses a parameter or buffer directly instead of through a "
                               "torch.nn layer", units)
        first = _first_tensor(args)
        in_units = self.units.get(_first_node(n.args)) if n.args else None
        inplace = name.endswith("_") and not name.startswith("_") and n.op == "call_method"
        base = name[:-1] if inplace else name
        if n.target in _INPLACE_BINARY:
            base = {operator.iadd: "add", operator.isub: "sub", operator.imul: "mul",
                    operator.itruediv: "div"}[n.target]
        if base in _ELEMENTWISE and in_units is not None:
            return in_units
        if base in _CLAMP and in_units is not None:
            return self.broadcast(self.operands(n), out)
        if base in _POOL and in_units is not None and first is not None:
            return self.pool(in_units, first, _POOL[base])
        if base in _BINARY or n.target in (operator.add, operator.sub, operator.mul,
                                           operator.truediv, operator.neg):
            return self.broadcast(self.operands(n), out)
        if base in _RESHAPE and in_units is not None and first is not None:
            return self.reshape(in_units, tuple(first.shape), tuple(out.shape))
        if base in ("transpose", "swapaxes", "permute", "t") and in_units is not None:
            return self.transpose(base, in_units, first, args[1:], out)
        if base in _REDUCTION and in_units is not None and first is not None:
            return self.reduce(base, in_units, first, args, kwargs)
        if base in ("cat", "concat", "concatenate", "stack"):
            return self.concatenate(base, n, args, kwargs, out)
        if base in ("pad", "constant_pad_nd") and in_units is not None and first is not None:
            return self.pad(in_units, first, kwargs.get("pad", args[1] if len(args) > 1 else None))
        return self.refuse("this operation is not known to commute with permutations", units)

    # -- functional rules ---------------------------------------------------------------------------
    def operands(self, n: torch.fx.Node) -> list[tuple[_Units, tuple[int, ...]]]:
        """Units and shapes of the tensor operands of a broadcasting operation."""
        return [(self.units[a], tuple(a.meta["_bnn_shape"]))
                for a in flatten_args((n.args, n.kwargs))
                if isinstance(a, torch.fx.Node) and self.units.get(a) is not None]

    def broadcast(self, operands: list[tuple[_Units, tuple[int, ...]]], out: torch.Tensor) -> _Units:
        ndim = out.dim()
        live: list[_Units] = []
        fixed_shapes: list[tuple[int, ...]] = []
        for units, shape in operands:
            if units.axis is None:
                fixed_shapes.append(shape)
                continue
            # align from the right as broadcasting does; a unit axis of length 1 is broadcast,
            # so it is the same for every unit and does not constrain the other operands
            axis = units.axis + ndim - len(shape)
            if shape[units.axis] == 1 and out.shape[axis] != 1:
                continue
            live.append(_Units(axis, units.segments, units.block))
        if not live:
            return _FIXED_UNITS
        result = live[0]
        for other in live[1:]:
            if other.axis != result.axis or not self.unite(result, other):
                return self.refuse("its operands carry units on different axes or layouts",
                                   [u for u, _ in operands])
        for shape in fixed_shapes:
            # an unpermutable operand that varies along the units pins them
            k = result.axis - (ndim - len(shape))
            if k >= 0 and shape[k] != 1:
                self.fix(result)
                return _FIXED_UNITS
        return result

    def reshape(self, units: _Units, in_shape: tuple, out_shape: tuple) -> _Units:
        if units.axis is None:
            return units
        moved = _reshape_units(in_shape, out_shape, units.axis, units.block)
        split = self.split_units(units, in_shape, out_shape) if moved is None else None
        if split is not None:
            return split
        if moved is None:
            return self.refuse(
                f"it reshapes {in_shape} -> {out_shape} in a way that splits or interleaves the "
                f"units of axis {units.axis}", [units])
        axis, block = moved
        return _Units(axis, units.segments, block)

    def transpose(self, name: str, units: _Units, x: torch.Tensor, rest: tuple,
                  out: torch.Tensor) -> _Units:
        if units.axis is None:
            return units
        order = axis_order(name, x.dim(), rest)
        return _Units(order.index(units.axis), units.segments, units.block)

    def pool(self, units: _Units, x: torch.Tensor, k: int) -> _Units:
        """k-d pooling: fine when the units sit before the ``k`` pooled (last) axes."""
        if units.axis is not None and units.axis >= x.dim() - k:
            return self.refuse(f"it pools over the last {k} axes of a {x.dim()}-d input, which "
                               f"include the units' axis {units.axis}", [units])
        return units

    def pad(self, units: _Units, x: torch.Tensor, pads: Any) -> _Units:
        """Padding (or cropping, with negative widths) of positions: fine when neither the units'
        axis nor the batch axis is padded."""
        if units.axis is None:
            return units
        if (not isinstance(pads, (tuple, list)) or len(pads) % 2 or len(pads) > 2 * x.dim()
                or not all(isinstance(p, int) for p in pads)):
            return self.refuse(f"its padding {pads!r} is not a sequence of (before, after) "
                               f"integer pairs", [units])
        # the pairs run from the last axis backwards: (last_before, last_after, previous, ...)
        padded = {x.dim() - 1 - i // 2 for i, p in enumerate(pads) if p != 0}
        if units.axis in padded:
            return self.refuse(f"it pads axis {units.axis} of a {x.dim()}-d input, which holds "
                               f"the units (the padding {tuple(pads)} lists the last axis first)",
                               [units])
        if 0 in padded:
            return self.refuse(f"it pads axis 0 of a {x.dim()}-d input, the batch axis (the "
                               f"padding {tuple(pads)} lists the last axis first)", [units])
        return units

    def reduce(self, name: str, units: _Units, x: torch.Tensor, args: tuple,
               kwargs: dict) -> _Units:
        if units.axis is None:
            return units
        # read ``dim`` and ``keepdim`` by the operation's own signature (``x.norm(2, 1)`` has
        # ``p`` first, ``x.std(0, True)`` ``unbiased`` second)
        types = tuple(torch.Tensor if isinstance(a, torch.Tensor) else type(a) for a in args)
        try:
            bound = normalize_function(
                getattr(torch, name), args, kwargs, arg_types=types,
                kwarg_types={k: type(v) for k, v in kwargs.items()},
                normalize_to_only_use_kwargs=True)
        except Exception:  # noqa: BLE001 - any failure to read the signature means: refuse
            bound = None
        if bound is None:
            return self.refuse("its arguments could not be matched to a known signature",
                               [units])
        dims = bound.kwargs.get("dim")
        keepdim = bool(bound.kwargs.get("keepdim", False))
        if dims is None or (isinstance(dims, (list, tuple)) and not dims):  # amax: dim=[]
            return _FIXED_UNITS  # a full reduction is invariant to any permutation
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = [d % x.dim() for d in dims]
        if units.axis in dims:
            return _FIXED_UNITS  # reduced over the units: invariant
        axis = units.axis if keepdim else units.axis - sum(d < units.axis for d in dims)
        return _Units(axis, units.segments, units.block)

    def concatenate(self, name: str, n: torch.fx.Node, args: tuple, kwargs: dict,
                    out: torch.Tensor) -> _Units:
        nodes = list(n.args[0])
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        dim = dim % out.dim()
        parts = [self.units.get(node) for node in nodes]
        if any(u is None or u.axis is None for u in parts):
            for u in parts:
                self.fix(u)
            return _FIXED_UNITS
        if name == "stack":
            axis = parts[0].axis
            for u in parts[1:]:
                if u.axis != axis or not self.unite(parts[0], u):
                    return self.refuse("its operands carry units on different axes", parts)
            return _Units(axis + (dim <= axis), parts[0].segments, parts[0].block)
        axes = {u.axis for u in parts}
        if len(axes) != 1:
            return self.refuse("its operands carry units on different axes", parts)
        axis = axes.pop()
        if dim != axis:
            for u in parts[1:]:
                if not self.unite(parts[0], u):
                    return self.refuse("its operands have different unit layouts", parts)
            return parts[0]
        blocks = {u.block for u in parts}
        if len(blocks) != 1:
            return self.refuse("it concatenates units with different block lengths", parts)
        return _Units(axis, tuple(v for u in parts for v in u.segments), blocks.pop())

    # -- module rules ---------------------------------------------------------------------------------
    def module_rule(self, qualname: str, m: nn.Module, args: tuple, out: Any) -> _Units:
        node = self.node
        handled = self.attention_module(qualname, m, args, node.kwargs, out)
        if handled is not None:
            return handled
        if any(isinstance(u, Heads) for u in self.tensor_units((node.args, node.kwargs))) \
                and not isinstance(m, _ELEMENTWISE_MODULES):
            return self.refuse("its input is split into attention heads",
                               self.tensor_units((node.args, node.kwargs)))
        if isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
            gates = next((k for cls, k in _GATES.items() if isinstance(m, cls)), 1)
            packed = f"the {gates} gate blocks packed in each weight and " if gates > 1 else ""
            return self.refuse(
                f"recurrent layers are not supported: their hidden units are permutable in "
                f"principle, but a spec must then tie {packed}both axes of the recurrent matrix "
                f"weight_hh, which this version does not derive",
                self.tensor_units((node.args, node.kwargs)))
        if not isinstance(out, torch.Tensor):
            return self.refuse("it does not return a single tensor",
                               self.tensor_units((node.args, node.kwargs)))
        x = args[0] if args else None
        units = self.units.get(node.args[0]) if node.args else None
        if units is None or not isinstance(x, torch.Tensor):
            return self.refuse("its input is not a tensor activation",
                               self.tensor_units(node.args))
        if len(node.args) > 1 or node.kwargs:
            return self.refuse("it is called with more than one argument",
                               self.tensor_units((node.args, node.kwargs)))
        prefix = qualname + "."
        if isinstance(m, _ELEMENTWISE_MODULES):
            return units
        if isinstance(m, ASYMMETRIC_LAYERS):
            return self.asymmetric(m, units, out)
        pooled = next((k for cls, k in _POOL_MODULES.items() if isinstance(m, cls)), None)
        if pooled is not None:
            return self.pool(units, x, pooled)
        if isinstance(m, (nn.Flatten, nn.Unflatten)):
            return self.reshape(units, tuple(x.shape), tuple(out.shape))
        if isinstance(m, _PAD_MODULES):
            return self.pad(units, x, m.padding)
        if isinstance(m, nn.Linear):
            if units.axis is not None and units.axis != x.dim() - 1:
                return self.refuse("its input units are not on the last axis", [units])
            new = self.fresh(qualname, out.dim() - 1)
            self.assign(prefix + "weight", 0, new)
            self.assign(prefix + "weight", 1, units)
            if m.bias is not None:
                self.assign(prefix + "bias", 0, new)
            return new
        if isinstance(m, _CONV):
            if units.axis is not None and units.axis != 1:
                return self.refuse("its input units are not on the channel axis", [units])
            if m.groups == 1:
                new = self.fresh(qualname, 1)
                self.assign(prefix + "weight", 1, units)
            elif m.groups == m.in_channels == m.out_channels and units.axis is not None:
                new = units  # depthwise: output channel c only sees input channel c
            elif m.groups == m.in_channels == m.out_channels:
                new = _FIXED_UNITS
            else:
                return self.refuse(f"grouped convolutions (groups={m.groups}) only allow "
                                   f"permutations within groups", [units])
            self.assign(prefix + "weight", 0, new)
            if m.bias is not None:
                self.assign(prefix + "bias", 0, new)
            return new
        if isinstance(m, _CHANNEL_NORM):
            if units.axis is not None and units.axis != 1:
                return self.refuse("its input units are not on the channel axis", [units])
            for tensor in ("weight", "bias", "running_mean", "running_var"):
                if getattr(m, tensor, None) is not None:
                    self.assign(prefix + tensor, 0, units)
            return units
        if isinstance(m, nn.GroupNorm):
            if units.axis is not None and units.axis != 1:
                return self.refuse("its input units are not on the channel axis", [units])
            if m.num_groups not in (1, m.num_channels):
                return self.refuse(
                    f"with {m.num_groups} groups of channels, a permutation that moves a "
                    f"channel to another group changes the normalisation", [units])
            if m.affine:
                self.assign(prefix + "weight", 0, units)
                self.assign(prefix + "bias", 0, units)
            return units
        if isinstance(m, nn.LayerNorm):
            first_normalised = x.dim() - len(m.normalized_shape)
            # Statistics over a set of axes are invariant to permuting one of them, and
            # per-element affine parameters move with their units.
            if m.elementwise_affine and units.axis is not None and units.axis >= first_normalised:
                self.assign(prefix + "weight", units.axis - first_normalised, units)
                if m.bias is not None:
                    self.assign(prefix + "bias", units.axis - first_normalised, units)
            return units
        if isinstance(m, nn.Embedding):
            new = self.fresh(qualname, out.dim() - 1)
            self.assign(prefix + "weight", 1, new)
            return new
        return self.refuse("this layer type is not known to commute with permutations", [units])

    def asymmetric(self, m: nn.Module, units: _Units, out: torch.Tensor) -> _Units:
        """A layer built to break permutation symmetry (bnn_align.models.asymmetric).

        A W-asymmetric layer's fixed entries sit at given (row, column) positions: permuting its
        output units moves them to other rows, permuting its input units (the previous layer's
        outputs) to other columns, and either changes the function. So both groups are tied to
        the fixed variable; its own parameters (free entries, bias) then get no group. FiGLU's
        ``sigmoid(C x) * x`` is equivariant only under permutations with ``P C P^T = C``, which
        a Gaussian ``C`` almost surely admits only for the identity: its units are fixed too.
        """
        self.fix(units)
        if isinstance(m, AsymLinear):  # new output units, on the last axis, never permuted
            return _Units(out.dim() - 1, (_FIXED,))
        if isinstance(m, (AsymConv1d, AsymConv2d)):  # new output channels
            return _Units(1, (_FIXED,))
        return _Units(units.axis, (_FIXED,)) if units.axis is not None else _FIXED_UNITS


def _first_node(args: tuple) -> torch.fx.Node | None:
    for a in flatten_args(args):
        if isinstance(a, torch.fx.Node):
            return a
    return None


def _first_tensor(args: tuple) -> torch.Tensor | None:
    for a in flatten_args(args):
        if isinstance(a, torch.Tensor):
            return a
    return None


def _reshape_units(in_shape: tuple, out_shape: tuple, axis: int, block: int
                   ) -> tuple[int, int] | None:
    """Where the unit axis goes under a reshape, or None if the reshape scrambles units.

    Dimensions are grouped into runs whose products match (the usual reshape decomposition). The
    unit axis is safe when its run merges it with later axes (units become contiguous blocks) or
    splits it into a leading axis and a remainder that divides the current block.
    """
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        i0, j0 = i, j
        p_in = in_shape[i] if i < len(in_shape) else 1
        p_out = out_shape[j] if j < len(out_shape) else 1
        i, j = i + 1, j + 1
        while p_in != p_out:
            if p_in < p_out:
                if i >= len(in_shape):
                    return None
                p_in *= in_shape[i]
                i += 1
            else:
                if j >= len(out_shape):
                    return None
                p_out *= out_shape[j]
                j += 1
        if not (i0 <= axis < i):
            continue
        ins = list(range(i0, min(i, len(in_shape))))
        outs = list(range(j0, min(j, len(out_shape))))
        if any(in_shape[k] != 1 for k in ins if k < axis):
            return None  # the units are interleaved with a more major axis
        if not outs:
            return None
        # drop leading size-1 output axes
        while len(outs) > 1 and out_shape[outs[0]] == 1:
            outs.pop(0)
        merged = block * math.prod(in_shape[k] for k in ins if k > axis)
        rest = math.prod(out_shape[k] for k in outs[1:])
        if merged % rest:
            return None
        return outs[0], merged // rest
    return None


def spec_from_module(
    net: nn.Module,
    example_input: torch.Tensor | Sequence[torch.Tensor],
    *,
    unknown: str = "error",
) -> PermutationSpec:
    """Derive the permutation spec of a network by tracing its graph.

    Parameters
    ----------
    net : nn.Module
        Any module ``torch.fx`` can trace. It is not modified (the trace runs on a copy in
        evaluation mode, so BatchNorm statistics stay as they are).
    example_input : Tensor or sequence of Tensor
        One input batch (or the positional inputs), e.g. ``torch.randn(2, 40)``; only its shape
        matters.
    unknown : {"error", "fix"}
        What to do with an operation whose permutation behaviour is not known (recurrent
        layers, custom ops, indexing, padding of the units' axis, rotary embeddings):
        ``"error"`` raises :class:`ValueError` naming the module and operation; ``"fix"`` ties
        the units around it to the unpermuted inputs, so the spec permutes less but still
        never changes the function.

    Returns
    -------
    PermutationSpec
        An entry for every parameter and buffer in ``net.state_dict()``; groups are named
        ``"P_<module>"`` after the first layer that creates their units. Attention layers
        (``nn.MultiheadAttention``, ``nn.Transformer*Layer``, attention written with
        ``view``/``transpose``/``@``) give a query/key and a value group per layer, declared a
        head set in :attr:`PermutationSpec.heads` (see :mod:`bnn_align.symmetry.attention`).
        ``spec.scalable`` lists the groups with a positive-scale symmetry (see
        :mod:`bnn_align.symmetry.scale`).

    Raises
    ------
    TypeError
        If ``net`` is not an ``nn.Module``.
    ValueError
        If the module cannot be traced or contains an operation that cannot be proved safe.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import bnn_align as ba
    >>> from bnn_align import models
    >>> ba.spec_from_module(models.mlp(4, [8], 3), torch.zeros(1, 4))
    PermutationSpec({
      '0.weight': ('P_0', None),
      '0.bias': ('P_0',),
      '2.weight': (None, 'P_0'),
      '2.bias': (None,),
    })

    After a flatten, each channel owns a block of positions (here 20 after one pooling):

    >>> spec = ba.spec_from_module(models.cnn1d(1, 40, 10, channels=(4,), hidden=()),
    ...                            torch.zeros(1, 1, 40))
    >>> spec["4.weight"], spec.blocks
    ((None, 'P_0'), {'4.weight': {1: 20}})

    A residual sum ties the units of both branches into one group:

    >>> class Residual(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)
    ...     def forward(self, x):
    ...         h = self.a(x)
    ...         return self.c(h + self.b(h).relu())
    >>> ba.spec_from_module(Residual(), torch.zeros(1, 4))["b.weight"]
    ('P_a', 'P_a')

    An operation not known to commute with permutations is refused, or with
    ``unknown="fix"`` its units stay in place:

    >>> class Flipped(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
    ...     def forward(self, x):
    ...         return self.b(self.a(x).flip(1))
    >>> ba.spec_from_module(Flipped(), torch.zeros(1, 4))
    Traceback (most recent call last):
        ...
    bnn_align.symmetry.derive.UnsupportedOperation: spec_from_module cannot prove that permutations
    commute with operation 'flip' ...
    >>> ba.spec_from_module(Flipped(), torch.zeros(1, 4), unknown="fix").groups
    []
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"spec_from_module needs an nn.Module, got {type(net).__name__}")
    check_unknown(unknown)
    inputs = (example_input,) if isinstance(example_input, torch.Tensor) else tuple(example_input)
    if not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("example_input must be a tensor or a sequence of tensors")
    work = copy.deepcopy(net).eval()
    tracer = _Tracer()
    try:
        graph = tracer.trace(work)
    except Exception as err:  # torch.fx raises many types (TraceError, TypeError, ...)
        where = ""
        if tracer.failed_in:
            name = tracer.failed_in
            where = f" (in module {name!r}, {type(work.get_submodule(name)).__name__})"
        raise ValueError(
            f"spec_from_module could not trace {type(net).__name__}{where} with torch.fx: "
            f"{err}. Modules that torch.fx cannot trace (data-dependent control flow, "
            f"assignment into activations, ...) need a hand-written PermutationSpec."
        ) from err
    gm = torch.fx.GraphModule(work, graph)
    deriver = _Deriver(gm, unknown)
    _record_shapes(gm, inputs)
    with torch.no_grad():
        try:
            deriver.run(*inputs)
        except UnsupportedOperation as err:
            raise UnsupportedOperation(err.problem) from None
        except Exception as err:
            raise ValueError(
                f"running {type(net).__name__} on the example input failed at "
                f"{deriver.where()}: {err}"
            ) from err
    return _build_spec(net, deriver)


def _record_shapes(gm: torch.fx.GraphModule, inputs: tuple) -> None:
    # A first pass stores every tensor's shape on its node so rules can look at operands' shapes.
    class _Shapes(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            result = super().run_node(n)
            if isinstance(result, torch.Tensor):
                n.meta["_bnn_shape"] = tuple(result.shape)
            return result

    with torch.no_grad():
        try:
            _Shapes(gm).run(*inputs)
        except Exception:
            pass  # the deriving pass reports the failure with its location


def _build_spec(net: nn.Module, d: _Deriver) -> PermutationSpec:
    uf = d.uf
    # A concatenated axis is permuted as a whole or not at all: once any of its parts is fixed
    # (possibly by a union made after the concatenation), fix the other parts too. Head sets
    # with a fixed group are fixed whole, which may fix more parts: repeat until nothing moves.
    changed = True
    while changed:
        changed = False
        for vars_ in d.assignments.values():
            roots = {uf.find(v) for v in vars_}
            if len(vars_) > 1 and uf.find(_FIXED) in roots and len(roots) > 1:
                for v in vars_:
                    uf.union(v, _FIXED)
                changed = True
        before = sum(uf.find(v) == uf.find(_FIXED) for v in range(len(uf.parent)))
        families = head_sets(d)
        changed = changed or before != sum(uf.find(v) == uf.find(_FIXED)
                                           for v in range(len(uf.parent)))
    names: dict[int, str] = {}
    for root in sorted({uf.find(v) for v in range(len(uf.parent))} - {uf.find(_FIXED)}):
        names[root] = f"P_{uf.origin[root]}"

    def entry(vars_: tuple[int, ...]) -> Any:
        groups = []
        for v in vars_:
            root = uf.find(v)
            if root == uf.find(_FIXED):
                return None
            groups.append(names[root])
        return groups[0] if len(groups) == 1 else tuple(groups)

    axes: dict[str, tuple] = {}
    blocks: dict[str, dict[int, int]] = {}
    for name, tensor in net.state_dict().items():
        row = []
        for axis in range(tensor.dim()):
            vars_ = d.assignments.get((name, axis))
            e = entry(vars_) if vars_ else None
            row.append(e)
            if e is not None and d.blocks.get((name, axis), 1) > 1:
                blocks.setdefault(name, {})[axis] = d.blocks[(name, axis)]
        axes[name] = tuple(row)
    used = {g for row in axes.values() for e in row
            for g in ((e,) if isinstance(e, str) else e or ())}
    heads = {}
    for members in families.values():
        groups = {names[root]: length for root, length in members.items()
                  if names[root] in used}
        if groups:
            first = next(iter(groups))[2:]
            heads["H_" + (first[:-3] if first.endswith(".qk") else first)] = groups
    scalable = scale_symmetries(d, lambda v: None if v is None else names.get(uf.find(v)))
    return PermutationSpec(axes, blocks=blocks, scalable=scalable, heads=heads)
