"""Attention rules for :func:`~bnn_align.symmetry.derive.spec_from_module`: the head symmetry.

Inside one attention layer the query/key dimensions (rows of W_q and W_k) form one group and the
value dimensions (rows of W_v, columns of W_out) another; both are cut into heads of ``d_head``
units that must move as wholes and alike, so the spec records them as a head set (see
:class:`~bnn_align.symmetry.spec.PermutationSpec`). This module holds the rules that find them:

* hand-written attention traced by ``torch.fx``: a projection's units split into
  ``(heads, d_head)`` by ``view``/``reshape``, carried through ``transpose``/``permute``,
  contracted by ``q @ k^T`` (which ties the query and key dimensions and leaves attention scores
  that carry only the heads), masked, softmaxed, applied to the values by ``@`` or
  ``F.scaled_dot_product_attention``, and merged back by a ``view``/``reshape``;
* ``nn.MultiheadAttention`` (packed or separate projections, either batch layout, with or without
  biases, ``add_bias_kv``), ``nn.TransformerEncoderLayer``/``DecoderLayer`` (both norm orders:
  the spec is the same) and ``nn.TransformerEncoder``, which ``torch.fx`` cannot trace into, as
  leaves of known structure.

Rotary position embeddings rotate pairs of query/key dimensions by angles that differ between
pairs, so no permutation of those dimensions commutes with them; they are not recognised (the
slicing they use is refused, or with ``unknown="fix"`` the whole attention layer stays
unpermuted). Anything that mixes heads or reshapes split units otherwise is refused.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ._graph import UnionFind, axis_order, flatten_args


@dataclass(frozen=True)
class Heads:
    """Activation units split into heads: ``head`` is the axis of the heads, ``dim`` the axis
    of the units within each head (None for attention scores, where they were contracted), and
    ``var`` the union-find variable of the flat group (its head set is looked up from it)."""

    head: int
    dim: int | None
    var: int

    @property
    def segments(self) -> tuple[int, ...]:
        return (self.var,)

    @property
    def axis(self) -> int:  # pragma: no cover - guards old rules against a silent misuse
        raise TypeError("split attention units reached a rule that does not know heads")


@dataclass(frozen=True)
class Several:
    """The units of each element of a tuple a module returned (``nn.MultiheadAttention``)."""

    parts: tuple

    @property
    def segments(self) -> tuple[int, ...]:
        return tuple(v for p in self.parts if p is not None for v in p.segments)


_MATMUL = {"matmul", "bmm", "__matmul__"}
_PASS = {"contiguous", "clone", "dropout", "softmax", "log_softmax", "float", "double", "to",
         "type_as", "detach", "relu", "gelu", "exp", "tanh", "sigmoid", "neg"}
_BROADCAST = {"add", "sub", "mul", "div", "true_divide", "masked_fill", "where"}
_COMPARE = {"eq", "ne", "lt", "le", "gt", "ge", "logical_not", "logical_and", "logical_or",
            "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__"}
_OPERATORS = {operator.eq: "eq", operator.ne: "ne", operator.lt: "lt", operator.le: "le",
              operator.gt: "gt", operator.ge: "ge", operator.add: "add", operator.sub: "sub",
              operator.mul: "mul",
              operator.truediv: "div", operator.matmul: "matmul", operator.neg: "neg",
              operator.getitem: "getitem"}


def op_name(n: torch.fx.Node, name: str) -> str:
    return _OPERATORS.get(n.target, name)


class AttentionRules:
    """Mixed into the deriving interpreter: the rules for split units and attention modules.

    Relies on the interpreter's ``uf``, ``units``, ``fresh``, ``assign``, ``fix``, ``refuse``
    and on ``Units``/``FIXED`` (its unit class and the fixed units)."""

    # -- head sets ---------------------------------------------------------------------------
    def init_heads(self) -> None:
        self.head_len: dict[int, list[int]] = {}  # var -> head lengths it was split with
        self.family: dict[int, int] = {}  # var -> head-set variable
        self.families = UnionFind()  # over head-set variables

    def unite_families(self, a: int, b: int) -> None:
        self.families.union(self.family[a], self.family[b])

    def split(self, var: int, d: int) -> None:
        """Record that ``var``'s units are cut into heads of ``d``."""
        self.head_len.setdefault(var, []).append(d)
        if var not in self.family:
            self.family[var] = self.families.add()

    # -- call_function / call_method ------------------------------------------------------------
    def attention_rule(self, n: torch.fx.Node, name: str, args: tuple, kwargs: dict,
                       out: torch.Tensor) -> Any:
        """Units of the result, or None when the ordinary rules should decide."""
        name = op_name(n, name)
        nodes = [a for a in flatten_args((n.args, n.kwargs)) if isinstance(a, torch.fx.Node)]
        units = [self.units.get(a) for a in nodes]
        if name == "getitem" and isinstance(self.units.get(n.args[0]), Several):
            return self.units[n.args[0]].parts[n.args[1]]
        self.pin_attrs(n) if name in _MATMUL else None
        if all(u is None for u in units):
            self.pin_attrs(n)
            # computed from parameters, buffers and constants alone (a causal mask sliced to the
            # sequence length, position indices): a constant of the function, never permuted
            # (parameters read this way get no spec entry)
            return self.FIXED
        heads = [u for u in units if isinstance(u, Heads)]
        if not isinstance(out, torch.Tensor):  # several tensors: only splits are known
            x = self.units.get(n.args[0]) if n.args else None
            if name in ("split", "chunk") and x is not None and not heads \
                    and not isinstance(x, Several):
                return self.split_tensor(n, name, x, args, kwargs, out)
            return self.refuse("it returns several tensors", [u for u in units if u is not None])
        if name == "scaled_dot_product_attention":
            return self.sdpa(n, args, kwargs)
        if name in _MATMUL:
            return self.matmul(n, args, out)
        if not heads:
            if name in _COMPARE:  # elementwise: a mask from the inputs, say
                return self.broadcast(self.operands(n), out)
            if name == "masked_fill":
                return self.broadcast(self.operands(n), out)
            return None
        x = self.units.get(n.args[0]) if n.args else None
        if name in _PASS and isinstance(x, Heads) and len(heads) == 1:
            return x
        if name in ("transpose", "swapaxes", "permute") and isinstance(x, Heads):
            return self.move_heads(name, x, args[0].dim(), args[1:])
        if name in ("view", "reshape", "flatten") and isinstance(x, Heads):
            return self.merge_heads(x, tuple(args[0].shape), tuple(out.shape))
        if name in _BROADCAST:
            return self.broadcast_heads(n, out)
        return self.refuse("it acts on units split into attention heads in a way not known "
                           "to keep each head whole", [u for u in units if u is not None])

    def pin_attrs(self, n: torch.fx.Node) -> None:
        """Parameters and buffers read directly by ``n`` are treated as constants of the
        function: none of their axes may move (a layer elsewhere that uses the same tensor
        then leaves those units in place)."""
        for a in flatten_args((n.args, n.kwargs)):
            if isinstance(a, torch.fx.Node) and a.op == "get_attr":
                for axis in range(len(a.meta.get("_bnn_shape", ()))):
                    self.assign(a.target, axis, self.FIXED)

    def parameter_broadcast(self, n: torch.fx.Node, out: torch.Tensor) -> Any:
        """An activation plus (or times) a parameter used directly (a learned positional
        embedding, a layer scale): the parameter's axis that meets the units moves with them."""
        result = self.broadcast(self.operands(n), out)
        for a in flatten_args((n.args, n.kwargs)):
            if not (isinstance(a, torch.fx.Node) and a.op == "get_attr"):
                continue
            shape = tuple(a.meta["_bnn_shape"])
            k = None if result.axis is None else result.axis - (out.dim() - len(shape))
            for axis in range(len(shape)):
                moves = axis == k and shape[axis] != 1
                self.assign(a.target, axis, result if moves else self.FIXED)
        return result

    def split_tensor(self, n: torch.fx.Node, name: str, x: Any, args: tuple, kwargs: dict,
                     out: tuple) -> Any:
        """``qkv.split(C, dim=2)`` (or ``chunk``) of a packed projection's output: each part's
        units become a group of their own, the projection's rows their concatenation."""
        ndim = args[0].dim()
        dim = kwargs.get("dim", args[2] if len(args) > 2 else 0) % ndim
        if x.axis is None or dim != x.axis:
            return Several(tuple(x for _ in out))  # split along positions: units kept
        var = x.segments[0]
        holders = [u for u in self.units.values() if u is not None and var in u.segments]
        alone = (len(x.segments) == 1 and x.block == 1 and self.uf.find(var) == var
                 and sum(self.uf.find(v) == var for v in range(len(self.uf.parent))) == 1
                 and var not in self.head_len and len(holders) == 1
                 and len(n.args[0].users) == 1)  # nothing else reads the units whole
        if not alone:
            return self.refuse("it splits units that are not the fresh output of one layer",
                               [x])
        parts = tuple(self.uf.new(f"{self.uf.origin[var]}.{i}") for i in range(len(out)))
        for key, segments in self.assignments.items():
            if segments == (var,):
                self.assignments[key] = parts
        return Several(tuple(self.Units(x.axis, (v,)) for v in parts))

    def move_heads(self, name: str, x: Heads, ndim: int, rest: tuple) -> Heads:
        order = axis_order(name, ndim, rest)
        return Heads(order.index(x.head), None if x.dim is None else order.index(x.dim), x.var)

    def split_units(self, units: Any, in_shape: tuple, out_shape: tuple) -> Heads | None:
        """``view(B, T, heads, d_head)`` of units on one axis, or None if not that."""
        a = units.axis
        if (len(units.segments) != 1 or units.block != 1 or len(out_shape) != len(in_shape) + 1
                or in_shape[:a] != out_shape[:a] or in_shape[a + 1:] != out_shape[a + 2:]
                or out_shape[a] * out_shape[a + 1] != in_shape[a]):
            return None
        self.split(units.segments[0], out_shape[a + 1])
        return Heads(a, a + 1, units.segments[0])

    def merge_heads(self, x: Heads, in_shape: tuple, out_shape: tuple) -> Any:
        a = x.head
        if (x.dim == a + 1 and len(out_shape) == len(in_shape) - 1
                and in_shape[:a] == out_shape[:a] and in_shape[a + 2:] == out_shape[a + 1:]
                and in_shape[a] * in_shape[a + 1] == out_shape[a]):
            return self.Units(a, (x.var,))
        return self.refuse(f"it reshapes {in_shape} -> {out_shape}, which does not merge the "
                           f"heads (axis {a}) with the units within them (axis {x.dim})", [x])

    def broadcast_heads(self, n: torch.fx.Node, out: torch.Tensor) -> Any:
        ndim = out.dim()
        live: list[Heads] = []
        constants: list[tuple[int, ...]] = []
        nodes = [a for a in flatten_args((n.args, n.kwargs)) if isinstance(a, torch.fx.Node)]
        if any(a.op == "get_attr" for a in nodes):
            return self.refuse("it combines attention heads with a parameter used directly",
                               [self.units[a] for a in nodes if self.units.get(a) is not None])
        for a in nodes:
            if self.units.get(a) is None:
                continue
            u, shape = self.units[a], tuple(a.meta["_bnn_shape"])
            shift = ndim - len(shape)
            if isinstance(u, Heads):
                live.append(Heads(u.head + shift, None if u.dim is None else u.dim + shift, u.var))
            elif u.axis is None:
                constants.append((shift, shape))
            else:
                return self.refuse("it combines units split into heads with unsplit units",
                                   [u, *live])
        first = live[0]
        for other in live[1:]:
            if (other.head, other.dim) != (first.head, first.dim):
                return self.refuse("its operands carry heads on different axes", live)
            self.unite_families(first.var, other.var)
            if first.dim is not None:
                self.uf.union(first.var, other.var)
        for shift, shape in constants:
            # a constant that differs between heads (a per-head bias) or units pins them
            for axis in (first.head, first.dim):
                if axis is not None and axis - shift >= 0 and shape[axis - shift] != 1:
                    for u in live:
                        self.fix(u)
                    return self.FIXED
        return first

    def matmul(self, n: torch.fx.Node, args: tuple, out: torch.Tensor) -> Any:
        a_node, b_node = n.args[0], n.args[1]
        ua = self.units.get(a_node) if isinstance(a_node, torch.fx.Node) else None
        ub = self.units.get(b_node) if isinstance(b_node, torch.fx.Node) else None
        a, b = args[0], args[1]
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dim() < 2 \
                or b.dim() < 2:
            return self.refuse("matrix products of vectors are not derived",
                               [u for u in (ua, ub) if u is not None])
        ndim = out.dim()
        role_a = _roles(ua, a.dim(), ndim, contract=a.dim() - 1, free=a.dim() - 2)
        role_b = _roles(ub, b.dim(), ndim, contract=b.dim() - 2, free=b.dim() - 1)
        if role_a is None or role_b is None:
            return self.refuse("its operands carry units on axes a matrix product mixes",
                               [u for u in (ua, ub) if u is not None])
        # the contracted axis: both sides' units must move together, else stay in place
        ca, cb = role_a["contract"], role_b["contract"]
        if ca is not None and cb is not None:
            self.uf.union(ca, cb)
        elif ca is not None or cb is not None:
            self.uf.union(ca if ca is not None else cb, 0)
        # batch axes holding heads: the heads of both sides move alike
        ha, hb = role_a["head"], role_b["head"]
        if ha is not None and hb is not None:
            if ha[0] != hb[0]:
                return self.refuse("its operands carry heads on different axes", [ua, ub])
            self.unite_families(ha[1], hb[1])
        elif ha is not None or hb is not None:
            self.fix(ua if ha is not None else ub)
            return self.FIXED
        fa, fb = role_a["free"], role_b["free"]
        if fa is not None and fb is not None:
            return self.refuse("both operands carry units on axes the product keeps", [ua, ub])
        head = ha or hb
        if head is None:
            if fa is not None:
                return self.Units(ndim - 2, (fa,))
            return self.Units(ndim - 1, (fb,)) if fb is not None else self.FIXED
        if fa is not None:
            return self.refuse("it keeps units within heads on the row axis of the product",
                               [ua, ub])
        if fb is not None:  # attention scores @ values: the values' units within their heads
            return Heads(head[0], ndim - 1, fb)
        return Heads(head[0], None, head[1])

    def sdpa(self, n: torch.fx.Node, args: tuple, kwargs: dict) -> Any:
        names = ["query", "key", "value", "attn_mask"]
        nodes = dict(zip(names, n.args))
        nodes.update({k: v for k, v in n.kwargs.items() if k in names})
        q, k, v = (self.units.get(nodes.get(x)) if isinstance(nodes.get(x), torch.fx.Node)
                   else None for x in names[:3])
        mask = nodes.get("attn_mask")
        mask_units = self.units.get(mask) if isinstance(mask, torch.fx.Node) else None
        if not all(isinstance(u, Heads) and u.dim is not None for u in (q, k, v)):
            return self.refuse("its query, key and value are not split into heads",
                               [u for u in (q, k, v) if u is not None])
        if mask_units is not None and mask_units.segments != (0,):
            return self.refuse("its attention mask depends on permuted units",
                               [q, k, v, mask_units])
        if n.kwargs.get("enable_gqa"):
            return self.refuse("grouped-query attention is not derived", [q, k, v])
        if not (q.head == k.head == v.head and q.dim == k.dim == v.dim):
            return self.refuse("its query, key and value carry heads on different axes",
                               [q, k, v])
        self.uf.union(q.var, k.var)
        self.unite_families(q.var, k.var)
        self.unite_families(q.var, v.var)
        if mask is not None:
            shape = tuple(mask.meta["_bnn_shape"])
            ndim = len(args[0].shape)
            at = q.head - (ndim - len(shape))
            if at >= 0 and shape[at] != 1:  # a mask per head pins the heads
                for u in (q, k, v):
                    self.fix(u)
                return self.FIXED
        return v

    # -- modules ---------------------------------------------------------------------------------
    def attention_module(self, qualname: str, m: nn.Module, args: tuple, kwargs: dict,
                         out: Any) -> Any:
        """Units of an attention module's output, or None if ``m`` is no attention module."""
        node = self.node
        if isinstance(m, nn.MultiheadAttention):
            bound = _bind(m, node, args, kwargs)
            return self.multihead(qualname, m, bound)
        if isinstance(m, nn.TransformerEncoderLayer):
            bound = _bind(m, node, args, kwargs)
            return self.encoder_layer(qualname, m, self.input_units(bound["src"]),
                                      len(bound["src"].meta["_bnn_shape"]), bound)
        if isinstance(m, nn.TransformerDecoderLayer):
            bound = _bind(m, node, args, kwargs)
            return self.decoder_layer(qualname, m, bound)
        if isinstance(m, nn.TransformerEncoder):
            bound = _bind(m, node, args, kwargs)
            self.check_masks(bound, ("mask", "src_key_padding_mask"))
            units = self.input_units(bound["src"])
            ndim = len(bound["src"].meta["_bnn_shape"])
            for i, layer in enumerate(m.layers):
                units = self.encoder_layer(f"{qualname}.layers.{i}", layer, units, ndim, {})
            if m.norm is not None:
                units = self.norm(f"{qualname}.norm", m.norm, units)
            return units
        return None

    def input_units(self, value: Any) -> Any:
        if isinstance(value, torch.fx.Node):
            u = self.units.get(value)
            return self.FIXED if u is None else u
        return value  # already units (a layer inside a container)

    def check_masks(self, bound: dict, names: tuple[str, ...]) -> None:
        for name in names:
            mask = bound.get(name)
            if isinstance(mask, torch.fx.Node):
                u = self.units.get(mask)
                if u is not None and u.segments != (0,):
                    self.refuse(f"its {name} depends on permuted units", [u])

    def last_axis(self, units: Any, ndim: int, what: str) -> Any:
        if isinstance(units, Heads) or (units.axis is not None and
                                        (units.axis != ndim - 1 or units.block != 1)):
            return self.refuse(f"its {what} does not carry its units on the last axis", [units])
        return units

    def multihead(self, qualname: str, m: nn.MultiheadAttention, bound: dict) -> Any:
        self.check_masks(bound, ("key_padding_mask", "attn_mask"))
        shapes = [tuple(bound[x].meta["_bnn_shape"]) for x in ("query", "key", "value")]
        q, k, v = (self.last_axis(self.input_units(bound[x]), len(s), x)
                   for x, s in zip(("query", "key", "value"), shapes))
        qk, val = self.head_groups(qualname, m)
        if m._qkv_same_embed_dim:
            # one matrix reads query, key and value: their units must be the same
            for other in (k, v):
                if not self.unite(q, other):
                    return self.refuse("its packed projection reads query, key and value with "
                                       "different unit layouts", [q, k, v])
        self.in_projections(qualname, m, qk, val, q, k, v)
        new = self.linear(qualname + ".out_proj", m.out_proj, val)
        output = self.Units(len(shapes[0]) - 1, new.segments)
        weights: Any = self.FIXED  # averaged over heads: invariant to every permutation
        if not bound.get("average_attn_weights", True):
            weights = Heads(1, None, qk.segments[0])
        return Several((output, weights if bound.get("need_weights", True) else None))

    def head_groups(self, qualname: str, m: nn.MultiheadAttention) -> tuple[Any, Any]:
        """Fresh query/key and value groups of ``m``, cut into heads that move alike."""
        qk = self.fresh(qualname + ".qk", 0)
        val = self.fresh(qualname + ".v", 0)
        self.split(qk.segments[0], m.head_dim)
        self.split(val.segments[0], m.head_dim)
        self.unite_families(qk.segments[0], val.segments[0])
        return qk, val

    def in_projections(self, qualname: str, m: nn.MultiheadAttention, qk: Any, val: Any,
                       q: Any, k: Any, v: Any) -> None:
        """Assign ``m``'s input projections (packed or separate) and their biases: rows to the
        ``qk``/``val`` groups, columns to the units of the query, key and value they read (for a
        packed projection the caller has united those)."""
        prefix = qualname + "."
        packed = self.Units(0, (qk.segments[0], qk.segments[0], val.segments[0]))
        if m._qkv_same_embed_dim:
            self.assign(prefix + "in_proj_weight", 0, packed)
            self.assign(prefix + "in_proj_weight", 1, q)
        else:
            for name, rows, cols in (("q_proj_weight", qk, q), ("k_proj_weight", qk, k),
                                     ("v_proj_weight", val, v)):
                self.assign(prefix + name, 0, rows)
                self.assign(prefix + name, 1, cols)
        if m.in_proj_bias is not None:
            self.assign(prefix + "in_proj_bias", 0, packed)
        if m.bias_k is not None:
            self.assign(prefix + "bias_k", 2, qk)
            self.assign(prefix + "bias_v", 2, val)

    def norm(self, qualname: str, m: nn.Module, units: Any) -> Any:
        if not isinstance(m, nn.LayerNorm) or len(m.normalized_shape) != 1:
            return self.refuse(f"its normalisation {qualname!r} ({type(m).__name__}) is not a "
                               f"LayerNorm over the last axis", [units])
        if m.elementwise_affine:
            self.assign(qualname + ".weight", 0, units)
            if m.bias is not None:
                self.assign(qualname + ".bias", 0, units)
        return units

    def linear(self, qualname: str, m: nn.Linear, units: Any, new: Any = None) -> Any:
        new = new if new is not None else self.fresh(qualname, 0)
        self.assign(qualname + ".weight", 0, new)
        self.assign(qualname + ".weight", 1, units)
        if m.bias is not None:
            self.assign(qualname + ".bias", 0, new)
        return new

    def feedforward(self, qualname: str, m: nn.Module, units: Any) -> Any:
        act = m.activation
        if not (act in (F.relu, F.gelu) or isinstance(act, self.elementwise_modules)):
            return self.refuse(f"its activation {act!r} is not known to act unit by unit",
                               [units])
        hidden = self.linear(qualname + ".linear1", m.linear1, units)
        self.linear(qualname + ".linear2", m.linear2, hidden, new=units)
        return units

    def encoder_layer(self, qualname: str, m: nn.TransformerEncoderLayer, src: Any, ndim: int,
                      bound: dict) -> Any:
        # pre- and post-norm differ only in where the norms sit on the residual stream: both
        # see its units, so the spec is the same
        self.check_masks(bound, ("src_mask", "src_key_padding_mask"))
        units = self.last_axis(src, ndim, "input")
        self.self_attention(qualname + ".self_attn", m.self_attn, units)
        self.norm(qualname + ".norm1", m.norm1, units)
        self.norm(qualname + ".norm2", m.norm2, units)
        return self.feedforward(qualname, m, units)

    def self_attention(self, qualname: str, m: nn.MultiheadAttention, units: Any,
                       memory: Any = None) -> Any:
        """The spec of an attention sublayer whose output is added back to ``units``."""
        qk, val = self.head_groups(qualname, m)
        kv = units if memory is None else memory
        if m._qkv_same_embed_dim:
            if kv is not units and not self.unite(units, kv):
                return self.refuse("its packed projection reads the target and the memory "
                                   "with different unit layouts", [units, kv])
        self.in_projections(qualname, m, qk, val, units, kv, kv)
        self.linear(qualname + ".out_proj", m.out_proj, val, new=units)
        return units

    def decoder_layer(self, qualname: str, m: nn.TransformerDecoderLayer, bound: dict) -> Any:
        self.check_masks(bound, ("tgt_mask", "memory_mask", "tgt_key_padding_mask",
                                 "memory_key_padding_mask"))
        units = self.last_axis(self.input_units(bound["tgt"]),
                               len(bound["tgt"].meta["_bnn_shape"]), "target")
        memory = self.last_axis(self.input_units(bound["memory"]),
                                len(bound["memory"].meta["_bnn_shape"]), "memory")
        self.self_attention(qualname + ".self_attn", m.self_attn, units)
        self.self_attention(qualname + ".multihead_attn", m.multihead_attn, units, memory)
        for norm in ("norm1", "norm2", "norm3"):
            self.norm(f"{qualname}.{norm}", getattr(m, norm), units)
        return self.feedforward(qualname, m, units)


def head_sets(d: Any) -> dict[int, dict[int, int]]:
    """The head sets of a finished derivation: family -> {group root: head length}, after
    fixing whatever cannot keep heads whole (modifies ``d``'s union-find).

    A group split with two different head lengths is fixed; a head set with a fixed group is
    fixed whole (its heads could then only move if every other group kept them in place,
    which a head set cannot express)."""
    uf = d.uf
    while True:
        fixed = uf.find(0)
        families: dict[int, dict[int, set[int]]] = {}
        for var, lengths in d.head_len.items():
            fam = d.families.find(d.family[var])
            families.setdefault(fam, {}).setdefault(uf.find(var), set()).update(lengths)
        # two families sharing a group move their heads alike
        merged = False
        owner: dict[int, int] = {}
        for fam, members in families.items():
            for root in members:
                if root != fixed and root in owner and owner[root] != fam:
                    d.families.union(fam, owner[root])
                    merged = True
                owner.setdefault(root, fam)
        if merged:
            continue
        changed = False
        for members in families.values():
            if fixed in members or any(len(lengths) > 1 for lengths in members.values()):
                for root in members:
                    if root != fixed:
                        uf.union(root, 0)
                        changed = True
        if not changed:
            return {fam: {root: lengths.pop() for root, lengths in members.items()}
                    for fam, members in families.items() if fixed not in members}


def _roles(units: Any, dim: int, ndim: int, contract: int, free: int) -> dict | None:
    """Where an operand of a matrix product carries its units: the variable on the contracted
    axis, on the kept (free) axis, and ``(axis in the result, variable)`` of heads on a batch
    axis; None when units sit where the product would mix them."""
    roles: dict[str, Any] = {"contract": None, "free": None, "head": None}
    if units is None or (not isinstance(units, Heads) and units.axis is None):
        return roles
    shift = ndim - dim
    if isinstance(units, Heads):
        if units.head >= dim - 2:
            return None
        roles["head"] = (units.head + shift, units.var)
        if units.dim == contract:
            roles["contract"] = units.var
        elif units.dim == free:
            roles["free"] = units.var
        elif units.dim is not None:
            return None
        return roles
    if len(units.segments) != 1 or units.block != 1:
        return None
    if units.axis == contract:
        roles["contract"] = units.segments[0]
    elif units.axis == free:
        roles["free"] = units.segments[0]
    else:
        return None  # units on a batch axis of a product: not derived
    return roles


def _bind(m: nn.Module, node: torch.fx.Node, args: tuple, kwargs: dict) -> dict:
    """The module call's arguments by name: nodes where the caller passed activations, values
    otherwise."""
    sig = inspect.signature(type(m).forward)
    bound = sig.bind(m, *node.args, **node.kwargs)
    bound.apply_defaults()
    out = dict(bound.arguments)
    out.pop("self", None)
    return out
