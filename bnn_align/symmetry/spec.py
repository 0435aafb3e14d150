"""Permutation specs: which axis of which tensor each permutation group acts on.

A :class:`PermutationSpec` uses the exchange format of Git Re-Basin (Ainsworth et al., 2023):
``axes_to_perm`` maps every parameter or buffer name to one entry per axis, the name of the group
that permutes that axis or ``None``; ``perm_to_axes`` is derived from it. Two extensions keep the
format exact for networks the original could not describe, and reduce to it when unused:

* **Blocks.** ``blocks={"4.weight": {1: 16}}`` says axis 1 of ``"4.weight"`` is permuted in
  contiguous blocks of 16 (unit ``i`` owns indices ``16 i ... 16 i + 15``): the layout
  ``torch.flatten`` produces after a convolution with 16 positions per channel. Axes not listed
  have blocks of 1, and their length must equal the group size exactly.
* **Concatenation.** An entry may be a tuple of group names: the axis is the concatenation of those
  groups' units (each in blocks of the same ``k``), as after ``torch.cat`` along the feature axis.
  A group may appear in a concatenation twice (the query and key rows of a packed attention
  projection); a group that appears only in concatenations takes the size the others leave.
* **Heads.** ``heads={"H_attn": {"P_attn.qk": 16, "P_attn.v": 16}}`` declares a *head set*: the
  listed groups are the query/key and the value dimensions of one attention layer, cut into heads
  of 16 consecutive units. Their permutations stay ordinary flat permutations of all
  ``n_heads * d_head`` units (so axes, ``permute`` and the exchange format are unchanged), but
  only those of the attention symmetry group are valid: every head is mapped onto a whole head,
  and all groups of one head set map head ``h`` to the same head ``H[h]``. In the gather
  convention unit ``h * d + i`` of the result is unit ``H[h] * d + w_h[i]`` of the input: a head
  permutation ``H`` composed with one within-head permutation ``w_h`` per head and group (see
  :func:`split_heads`, :func:`join_heads`). Without ``heads`` a spec is Git Re-Basin's.

A spec may also say which groups carry a positive-scale symmetry (``scalable``: group ->
:class:`~bnn_align.symmetry.scale.ScaleSymmetry`, the axes a rescaling multiplies and divides).
It is empty unless given; :func:`bnn_align.spec_from_module` derives it from the graph.

Specs are derived automatically by :func:`bnn_align.spec_from_module`; this module only holds the
format, its validation against tensor shapes and the index arithmetic every permutation uses.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence, Union

import torch

from .scale import ScaleSymmetry

__all__ = ["PermutationSpec", "AxisEntry"]

AxisEntry = Union[str, None, tuple]
"""One axis of a tensor: a group name, ``None`` (not permuted) or a tuple of group names."""


def _groups_of(entry: AxisEntry) -> tuple[str, ...]:
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


class PermutationSpec:
    """Which axes of which tensors share a permutation.

    Parameters
    ----------
    axes_to_perm : mapping of str to sequence
        Tensor name (``"0.weight"``, ``"layer1.0.norm1.running_mean"``) to one entry per axis: a
        group name, ``None``, or a tuple of group names for a concatenated axis. Names not listed
        are never permuted.
    blocks : mapping of str to mapping of int to int, optional
        Tensor name -> {axis: block length} for axes permuted in contiguous blocks.
    scalable : mapping of str to ScaleSymmetry, optional
        Group -> the ``(tensor, axis)`` pairs that a positive rescaling of its units multiplies
        (``incoming``) and divides (``outgoing``); a mapping ``{"incoming": [...],
        "outgoing": [...]}`` is accepted too. Groups not listed are not scalable. Scale
        symmetries are not compared by ``==`` (compare :attr:`scalable` itself).
    heads : mapping of str to mapping of str to int, optional
        Head set name -> {group: head length}: groups whose units are cut into heads that must
        move as wholes, all groups of a set moving heads alike (see the module docstring).

    Raises
    ------
    TypeError
        ``axes_to_perm`` that is not a mapping of names to sequences of entries, or an entry
        that is not a group name, ``None`` or a tuple of group names.
    ValueError
        ``blocks`` naming a tensor or axis the spec does not permute, or a block length
        below 1; ``scalable`` naming an unknown group, or an axis that group does not permute;
        ``heads`` naming a group the spec does not have, a group in two head sets, or a head
        length below 1.

    Examples
    --------
    A two-layer MLP ``Linear(4, 8) -> ReLU -> Linear(8, 3)`` has one group: the hidden units,
    the rows of the first layer and the columns of the second.

    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import models
    >>> spec = ba.PermutationSpec({"0.weight": ("P0", None), "0.bias": ("P0",),
    ...                            "2.weight": (None, "P0"), "2.bias": (None,)})
    >>> spec.groups
    ['P0']
    >>> spec.perm_to_axes
    {'P0': [('0.weight', 0), ('0.bias', 0), ('2.weight', 1)]}
    >>> net = models.mlp(4, [8], 3)
    >>> spec.group_sizes({name: t.shape for name, t in net.state_dict().items()})
    {'P0': 8}
    >>> spec == ba.spec_from_module(net, torch.zeros(1, 4))   # group names are only labels
    True
    >>> spec.group_sizes({"0.weight": (8, 4), "0.bias": (8,), "2.weight": (3, 6), "2.bias": (3,)})
    Traceback (most recent call last):
        ...
    ValueError: permutation group 'P0' has 8 units on '0.weight' but 6 on axis 1 of '2.weight'

    A head set: group ``Q`` is cut into heads of 2 units, which may only move as wholes.

    >>> heads = ba.PermutationSpec({"q.weight": ("Q", None), "o.weight": (None, "Q")},
    ...                            heads={"H": {"Q": 2}})
    >>> heads.heads
    {'H': {'Q': 2}}
    >>> heads.check_heads({"Q": torch.tensor([2, 3, 1, 0])})  # heads swapped, head 1 reversed
    >>> heads.check_heads({"Q": torch.tensor([0, 2, 1, 3])})
    Traceback (most recent call last):
        ...
    ValueError: perms['Q'] splits head 0: its 2 units come from heads [0, 1]; a permutation of attention units may only move whole heads and permute units within them
    """

    def __init__(
        self,
        axes_to_perm: Mapping[str, Sequence[AxisEntry]],
        *,
        blocks: Mapping[str, Mapping[int, int]] | None = None,
        scalable: Mapping[str, Any] | None = None,
        heads: Mapping[str, Mapping[str, int]] | None = None,
    ):
        if not isinstance(axes_to_perm, Mapping):
            raise TypeError(
                f"axes_to_perm must be a mapping of tensor name to axis entries, "
                f"got {type(axes_to_perm).__name__}"
            )
        normalised: dict[str, tuple[AxisEntry, ...]] = {}
        for name, entries in axes_to_perm.items():
            if not isinstance(name, str):
                raise TypeError(f"tensor names must be str, got {name!r}")
            if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence):
                raise TypeError(
                    f"axes_to_perm[{name!r}] must be a sequence with one entry per axis, "
                    f"got {entries!r}"
                )
            row = []
            for axis, entry in enumerate(entries):
                if isinstance(entry, (list, tuple)):
                    entry = tuple(entry)
                    if len(entry) == 0 or not all(isinstance(g, str) for g in entry):
                        raise TypeError(
                            f"axes_to_perm[{name!r}][{axis}]: a concatenated axis is a non-empty "
                            f"tuple of group names, got {entry!r}"
                        )
                    if len(entry) == 1:
                        entry = entry[0]
                elif entry is not None and not isinstance(entry, str):
                    raise TypeError(
                        f"axes_to_perm[{name!r}][{axis}] must be a group name, None or a tuple "
                        f"of group names, got {entry!r}"
                    )
                row.append(entry)
            normalised[name] = tuple(row)
        self._axes_to_perm = normalised
        self._blocks: dict[str, dict[int, int]] = {}
        for name, by_axis in (blocks or {}).items():
            if name not in normalised:
                raise ValueError(f"blocks names {name!r}, which is not in axes_to_perm")
            for axis, block in dict(by_axis).items():
                axis, block = int(axis), int(block)
                if not 0 <= axis < len(normalised[name]) or normalised[name][axis] is None:
                    raise ValueError(f"blocks[{name!r}] names axis {axis}, which is not permuted")
                if block < 1:
                    raise ValueError(f"blocks[{name!r}][{axis}] must be >= 1, got {block}")
                if block > 1:
                    self._blocks.setdefault(name, {})[axis] = block
        self._scalable = self._check_scalable(scalable or {})
        self._heads = _check_heads(heads, self.perm_to_axes)

    def _check_scalable(self, scalable: Mapping[str, Any]) -> dict[str, ScaleSymmetry]:
        if not isinstance(scalable, Mapping):
            raise TypeError(f"scalable must be a mapping of group name to ScaleSymmetry, got "
                            f"{type(scalable).__name__}")
        out = {}
        for group, value in scalable.items():
            sym = ScaleSymmetry.from_any(value, group)
            for name, axis in (*sym.incoming, *sym.outgoing):
                entries = self._axes_to_perm.get(name, ())
                if not 0 <= axis < len(entries) or entries[axis] != group:
                    raise ValueError(f"scalable[{group!r}] names axis {axis} of {name!r}, which "
                                     f"group {group!r} does not permute")
            out[group] = sym
        return out

    @property
    def scalable(self) -> dict[str, ScaleSymmetry]:
        """Group -> :class:`~bnn_align.symmetry.scale.ScaleSymmetry` for the groups whose
        units may be rescaled by any positive factor (a copy; empty if none are)."""
        return dict(self._scalable)

    # -- the exchange format -------------------------------------------------------------------
    @property
    def axes_to_perm(self) -> dict[str, tuple[AxisEntry, ...]]:
        """Tensor name -> one entry per axis (a copy; the spec is immutable)."""
        return dict(self._axes_to_perm)

    @property
    def perm_to_axes(self) -> dict[str, list[tuple[str, int]]]:
        """Group name -> list of ``(tensor name, axis)`` it acts on, in tensor order."""
        out: dict[str, list[tuple[str, int]]] = {}
        for name, entries in self._axes_to_perm.items():
            for axis, entry in enumerate(entries):
                for group in dict.fromkeys(_groups_of(entry)):
                    out.setdefault(group, []).append((name, axis))
        return out

    @property
    def groups(self) -> list[str]:
        """Group names in order of first appearance."""
        return list(self.perm_to_axes)

    @property
    def names(self) -> list[str]:
        """Names of the tensors the spec describes."""
        return list(self._axes_to_perm)

    @property
    def blocks(self) -> dict[str, dict[int, int]]:
        """Tensor name -> {axis: block length} for the axes permuted in blocks (a copy)."""
        return {name: dict(b) for name, b in self._blocks.items()}

    @property
    def heads(self) -> dict[str, dict[str, int]]:
        """Head set -> {group: head length} (a copy; empty for a spec without attention)."""
        return {h: dict(g) for h, g in self._heads.items()}

    def head_of(self, group: str) -> tuple[str, int] | None:
        """``(head set, head length)`` of a group cut into heads, else None."""
        for head, members in self._heads.items():
            if group in members:
                return head, members[group]
        return None

    def check_heads(self, perms: Mapping[str, torch.Tensor]) -> None:
        """Raise ``ValueError`` unless ``perms`` (validated LongTensors) respect every head set:
        each head mapped onto a whole head, every group of a set moving heads alike."""
        for head, members in self._heads.items():
            first = None
            for group, d in members.items():
                mapping = split_heads(perms[group], d, where=f"perms[{group!r}]")[0]
                if first is None:
                    first = (group, mapping)
                elif not torch.equal(mapping, first[1]):
                    raise ValueError(
                        f"perms[{group!r}] and perms[{first[0]!r}] move the heads of head set "
                        f"{head!r} differently ({mapping.tolist()} vs {first[1].tolist()}); "
                        f"the query/key and value dimensions of a head move together")

    def block(self, name: str, axis: int) -> int:
        """Block length of one axis (1 unless listed in :attr:`blocks`)."""
        return self._blocks.get(name, {}).get(axis, 1)

    def __getitem__(self, name: str) -> tuple[AxisEntry, ...]:
        return self._axes_to_perm[name]

    def __contains__(self, name: object) -> bool:
        return name in self._axes_to_perm

    def __len__(self) -> int:
        return len(self._axes_to_perm)

    def __repr__(self) -> str:
        lines = [f"  {name!r}: {entries!r}," for name, entries in self._axes_to_perm.items()]
        return "PermutationSpec({\n" + "\n".join(lines) + "\n})"

    def to_dict(self) -> dict[str, dict]:
        """Plain-Python form ``{"axes_to_perm": ..., "perm_to_axes": ...}`` (JSON-friendly)."""
        return {
            "axes_to_perm": {k: [list(e) if isinstance(e, tuple) else e for e in v]
                             for k, v in self._axes_to_perm.items()},
            "perm_to_axes": {g: [list(a) for a in axes] for g, axes in self.perm_to_axes.items()},
            "blocks": {name: {str(a): k for a, k in b.items()} for name, b in self._blocks.items()},
            "scalable": {g: sym.to_dict() for g, sym in self._scalable.items()},
            **({"heads": self.heads} if self._heads else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "PermutationSpec":
        """Inverse of :meth:`to_dict`; also accepts a bare ``axes_to_perm`` mapping."""
        if "axes_to_perm" not in data:
            return cls(data)
        return cls(data["axes_to_perm"], blocks=data.get("blocks"),
                   scalable=data.get("scalable"), heads=data.get("heads"))

    # -- comparison ----------------------------------------------------------------------------
    def _canonical(self) -> tuple:
        # Group names are labels: two specs are equal when they permute the same axes together.
        relabel: dict[str, int] = {}
        for group in self.perm_to_axes:
            relabel.setdefault(group, len(relabel))
        rows = []
        for name in sorted(self._axes_to_perm):
            row = []
            for entry in self._axes_to_perm[name]:
                groups = _groups_of(entry)
                row.append(tuple(relabel[g] for g in groups) if groups else None)
            rows.append((name, tuple(row), tuple(sorted(self._blocks.get(name, {}).items()))))
        # Relabel by first appearance in sorted-name order so the order of construction is moot.
        order: dict[int, int] = {}
        for _, row, _ in rows:
            for entry in row:
                for g in entry or ():
                    order.setdefault(g, len(order))
        canonical = tuple(
            (name, tuple(tuple(order[g] for g in e) if e else None for e in row), blocks)
            for name, row, blocks in rows
        )
        if not self._heads:
            return canonical
        head_sets = sorted(tuple(sorted((order[relabel[g]], d) for g, d in members.items()))
                           for members in self._heads.values())
        return canonical + (("heads", tuple(head_sets)),)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PermutationSpec):
            return NotImplemented
        return self._canonical() == other._canonical()

    def __hash__(self) -> int:
        return hash(self._canonical())

    def restrict(self, names: Iterable[str]) -> "PermutationSpec":
        """The spec for a subset of tensors (e.g. only the sample sites of a guide)."""
        keep = [n for n in names if n in self._axes_to_perm]
        axes = {n: self._axes_to_perm[n] for n in keep}
        kept = set(keep)
        # a rescaling is only exact with all its axes: drop those that lose one
        scalable = {g: sym for g, sym in self._scalable.items()
                    if all(n in kept for n, _ in (*sym.incoming, *sym.outgoing))}
        present = {g for row in axes.values() for e in row for g in _groups_of(e)}
        heads = {h: {g: d for g, d in members.items() if g in present}
                 for h, members in self._heads.items()}
        return PermutationSpec(
            axes,
            blocks={n: self._blocks[n] for n in keep if n in self._blocks},
            scalable=scalable,
            heads={h: m for h, m in heads.items() if m},
        )

    # -- validation against shapes -------------------------------------------------------------
    def group_sizes(self, shapes: Mapping[str, Sequence[int]], *, where: str = "") -> dict[str, int]:
        """Check the spec against tensor shapes and return the size of every group.

        Parameters
        ----------
        shapes : mapping of str to shape
            Shape of every tensor the spec names.
        where : str
            Context for error messages (e.g. ``"guide_b"``).

        Raises
        ------
        ValueError
            If the spec names a missing tensor, has the wrong number of axes for one, or if the
            axes of a group disagree on its size.
        """
        ctx = f" in {where}" if where else ""
        missing = [n for n in self._axes_to_perm if n not in shapes]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5])
            raise ValueError(
                f"the permutation spec names {len(missing)} tensor(s) missing{ctx}: {shown}"
                + (" ..." if len(missing) > 5 else "")
            )
        sizes: dict[str, int] = {}
        first: dict[str, str] = {}
        for name, entries in self._axes_to_perm.items():
            shape = tuple(shapes[name])
            if len(shape) != len(entries):
                raise ValueError(
                    f"the permutation spec gives {len(entries)} axes for {name!r} but it has "
                    f"shape {shape}{ctx}"
                )
            for axis, entry in enumerate(entries):
                if not isinstance(entry, str):
                    continue
                block = self.block(name, axis)
                if shape[axis] % block:
                    raise ValueError(
                        f"axis {axis} of {name!r} has length {shape[axis]}, not a multiple of its "
                        f"block length {block}{ctx}"
                    )
                units = shape[axis] // block
                if entry in sizes and sizes[entry] != units:
                    raise ValueError(
                        f"permutation group {entry!r} has {sizes[entry]} units on "
                        f"{first[entry]} but {units} on axis {axis} of {name!r}{ctx}"
                    )
                sizes[entry] = units
                first.setdefault(entry, f"{name!r}")
        self._concatenated_sizes(shapes, sizes)
        for group in self.perm_to_axes:
            if group not in sizes:
                raise ValueError(
                    f"permutation group {group!r} only appears in concatenated axes with "
                    f"other groups of unknown size; it needs an axis of its own to fix its "
                    f"size{ctx}"
                )
        for name, entries in self._axes_to_perm.items():
            for axis, entry in enumerate(entries):
                if isinstance(entry, tuple):
                    units = sum(sizes[g] for g in entry) * self.block(name, axis)
                    if shapes[name][axis] != units:
                        raise ValueError(
                            f"axis {axis} of {name!r} has length {shapes[name][axis]}, but the "
                            f"concatenation {entry!r} holds {units}{ctx}"
                        )
        for head, members in self._heads.items():
            counts = {}
            for group, d in members.items():
                if sizes[group] % d:
                    raise ValueError(
                        f"permutation group {group!r} has {sizes[group]} units, not a multiple "
                        f"of its head length {d} (head set {head!r}){ctx}")
                counts[group] = sizes[group] // d
            if len(set(counts.values())) > 1:
                raise ValueError(f"the groups of head set {head!r} disagree on the number of "
                                 f"heads: {counts}{ctx}")
        return sizes

    def _concatenated_sizes(self, shapes: Mapping[str, Sequence[int]],
                            sizes: dict[str, int]) -> None:
        """Size the groups that appear only in concatenations, where one concatenation holds
        a single group of unknown size (possibly repeated: q|k|v rows)."""
        changed = True
        while changed:
            changed = False
            for name, entries in self._axes_to_perm.items():
                for axis, entry in enumerate(entries):
                    if not isinstance(entry, tuple):
                        continue
                    unknown = {g for g in entry if g not in sizes}
                    if len(unknown) != 1:
                        continue
                    (group,) = unknown
                    rest = shapes[name][axis] // self.block(name, axis) - sum(
                        sizes[g] for g in entry if g in sizes)
                    repeats = entry.count(group)
                    if rest > 0 and rest % repeats == 0:
                        sizes[group] = rest // repeats
                        changed = True


def _check_heads(heads: Mapping[str, Mapping[str, int]] | None,
                 perm_to_axes: Mapping[str, list]) -> dict[str, dict[str, int]]:
    if heads is None:
        return {}
    if not isinstance(heads, Mapping):
        raise TypeError(f"heads must be a mapping of head set to {{group: head length}}, "
                        f"got {type(heads).__name__}")
    out: dict[str, dict[str, int]] = {}
    owner: dict[str, str] = {}
    for head, members in heads.items():
        if not isinstance(members, Mapping) or not members:
            raise TypeError(f"heads[{head!r}] must be a non-empty mapping of group name to head "
                            f"length, got {members!r}")
        for group, d in members.items():
            if group not in perm_to_axes:
                raise ValueError(f"heads[{head!r}] names group {group!r}, which permutes no axis "
                                 f"of the spec")
            if group in owner:
                raise ValueError(f"group {group!r} is in head sets {owner[group]!r} and {head!r}")
            if isinstance(d, bool) or int(d) != d or int(d) < 1:
                raise ValueError(f"heads[{head!r}][{group!r}] must be a head length >= 1, "
                                 f"got {d!r}")
            owner[group] = head
            out.setdefault(str(head), {})[group] = int(d)
    return out


def split_heads(perm: torch.Tensor, d: int, where: str = "the permutation"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A permutation of heads of ``d`` units as ``(H, w)``: unit ``h * d + i`` of the result is
    unit ``H[h] * d + w[h, i]`` of the input.

    Parameters
    ----------
    perm : LongTensor of shape ``(n_heads * d,)``
    d : int
        Head length.

    Returns
    -------
    H : LongTensor of shape ``(n_heads,)``
    w : LongTensor of shape ``(n_heads, d)``

    Raises
    ------
    ValueError
        If ``perm`` maps some head onto units of more than one head (it splits a head).
    """
    blocks = perm.reshape(-1, d)
    heads = blocks // d
    if not bool((heads == heads[:, :1]).all()):
        split = int((heads != heads[:, :1]).any(1).nonzero()[0])
        raise ValueError(
            f"{where} splits head {split}: its {d} units come from heads "
            f"{sorted(set(heads[split].tolist()))}; a permutation of attention units may only "
            f"move whole heads and permute units within them")
    return heads[:, 0].clone(), blocks % d


def join_heads(head: torch.Tensor, within: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split_heads`: the flat permutation ``H[h] * d + w[h, i]``."""
    d = within.shape[1]
    return (head[:, None] * d + within).reshape(-1)


def axis_index(
    entry: AxisEntry, perms: Mapping[str, torch.Tensor], block: int = 1
) -> torch.Tensor | None:
    """Gather index that applies ``perms`` to one axis described by ``entry``.

    Parameters
    ----------
    entry : AxisEntry
        The spec entry for the axis.
    perms : mapping of str to LongTensor
        Group name -> permutation of shape ``(n_group,)``; ``perm[i]`` is the unit of the input
        that becomes unit ``i`` of the output.
    block : int
        Contiguous block length per unit (see the module docstring).

    Returns
    -------
    LongTensor of shape ``(block * units,)`` or None
        ``None`` when the axis is not permuted.
    """
    groups = _groups_of(entry)
    if not groups:
        return None
    parts, offset = [], 0
    for g in groups:
        p = perms[g]
        parts.append(p + offset)
        offset += len(p)
    unit_index = torch.cat(parts) if len(parts) > 1 else parts[0]
    if block == 1:
        return unit_index
    return (unit_index[:, None] * block + torch.arange(block)).reshape(-1)
