"""Small pieces the graph walkers (``derive``, ``attention``, ``scale``) share: a union-find,
the flattening of a node's arguments and the axis order of a transpose.

A module of its own because ``derive`` imports ``attention`` and ``scale``, so they cannot
import these from it.
"""

from __future__ import annotations

from typing import Any

import torch.fx


class UnionFind:
    """Disjoint sets over ``0, 1, ...``; elements are added with :meth:`add`.

    The smallest element of a set is its root, so roots are stable and ordered by creation
    (callers rely on this: element 0 can stand for "fixed" and wins every union)."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self) -> int:
        """A new element in a set of its own."""
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]  # path halving
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> int | None:
        """Join the sets of ``a`` and ``b``; returns the root that stopped being one (None if
        they were one set already), for callers that merge per-set data into the new root."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return None
        keep, gone = min(ra, rb), max(ra, rb)
        self.parent[gone] = keep
        return gone


def flatten_args(args: Any) -> list:
    """Every leaf of nested arguments (tuples, lists, dicts) of an fx node."""
    out: list = []
    torch.fx.node.map_aggregate(args, out.append)
    return out


def axis_order(name: str, ndim: int, rest: tuple) -> list[int]:
    """For ``t``, ``permute`` or ``transpose``/``swapaxes`` of an ``ndim``-d tensor with the
    arguments ``rest`` after the tensor: the input axis each output axis comes from."""
    if name == "t":
        return list(range(ndim))[::-1]
    if name == "permute":
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        return [d % ndim for d in dims]
    d0, d1 = (d % ndim for d in rest[:2])
    order = list(range(ndim))
    order[d0], order[d1] = order[d1], order[d0]
    return order
