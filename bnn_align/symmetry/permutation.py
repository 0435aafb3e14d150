"""Apply permutations: the one place in the library that moves tensor axes.

:func:`permute_tensor` reorders the permuted axes of one tensor; everything else (state dicts,
modules, Bayesian networks, every guide kind) goes through it via :func:`permute`. Permutations
are LongTensors ``p`` with the gather convention: unit ``i`` of the result is unit ``p[i]`` of the
input, so ``permute(b, match(a, b).perms)`` lies next to ``a``.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from pyro.infer import autoguide
from torch import nn

from ..bayesian import BayesianNetwork
from ..posterior import GaussianView, adapter_for, model_of, replacement_memo
from ..samples import SamplePosterior
from .spec import PermutationSpec, _groups_of, axis_index, join_heads

__all__ = ["permute", "permute_tensor", "invert", "compose", "random_perms", "identity_perms",
           "check_perms", "spec_for"]

Perms = Mapping[str, torch.Tensor]


def check_perms(perms: Mapping[str, Any], sizes: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Validate permutations against group sizes and return them as LongTensors.

    Raises
    ------
    TypeError
        If ``perms`` is not a mapping or a value is not integer-valued.
    ValueError
        If a group is missing or unknown, or a value has the wrong length or is not a permutation.
    """
    if not isinstance(perms, Mapping):
        raise TypeError(f"perms must be a mapping of group name to permutation, "
                        f"got {type(perms).__name__}")
    unknown = [g for g in perms if g not in sizes]
    if unknown:
        raise ValueError(f"perms has groups the spec does not know: {unknown}; "
                         f"the spec's groups are {list(sizes)}")
    missing = [g for g in sizes if g not in perms]
    if missing:
        raise ValueError(f"perms is missing groups {missing} (give the identity, "
                         f"torch.arange(n), for groups to leave alone)")
    out = {}
    for group, n in sizes.items():
        value = perms[group]
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu()
        else:
            array = np.asarray(value)
            if array.dtype.kind not in "biuf":  # strings, objects, ...
                raise TypeError(f"permutation of group {group!r} must hold integers, got "
                                f"{array.dtype} values")
            t = torch.as_tensor(array)
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
            raise TypeError(f"permutation of group {group!r} must hold integers, got {t.dtype}")
        t = t.long()
        if t.shape != (n,):
            raise ValueError(f"permutation of group {group!r} must have shape ({n},), "
                             f"got {tuple(t.shape)}")
        if not torch.equal(torch.sort(t).values, torch.arange(n)):
            raise ValueError(f"perms[{group!r}] is not a permutation of 0..{n - 1}")
        out[group] = t
    return out


def invert(perms: Perms) -> dict[str, torch.Tensor]:
    """The inverse permutations: ``permute(permute(x, p), invert(p)) == x``."""
    return {g: torch.argsort(p) for g, p in perms.items()}


def compose(first: Perms, second: Perms) -> dict[str, torch.Tensor]:
    """Permutations equal to applying ``first``, then ``second``."""
    return {g: first[g][second[g]] for g in first}


def identity_perms(sizes: Mapping[str, int]) -> dict[str, torch.Tensor]:
    return {g: torch.arange(n) for g, n in sizes.items()}


def random_perms(sizes: Mapping[str, int], generator: torch.Generator | None = None,
                 heads: Mapping[str, Mapping[str, int]] | None = None
                 ) -> dict[str, torch.Tensor]:
    """A uniformly random permutation of every group (``sizes``: group -> number of units).

    With ``heads`` (:attr:`PermutationSpec.heads`), the groups of each head set get a uniformly
    random element of the attention symmetry: one random head permutation shared by the set,
    composed with independent random permutations within every head."""
    out = {g: torch.randperm(n, generator=generator) for g, n in sizes.items()}
    for members in (heads or {}).values():
        count = sizes[next(iter(members))] // next(iter(members.values()))
        head = torch.randperm(count, generator=generator)
        for g, d in members.items():
            within = torch.stack([torch.randperm(d, generator=generator) for _ in range(count)])
            out[g] = join_heads(head, within)
    return out


def _is_identity(index: torch.Tensor) -> bool:
    return bool(torch.equal(index, torch.arange(len(index))))


def permute_tensor(
    tensor: torch.Tensor,
    entries: tuple,
    perms: Perms,
    blocks: Mapping[int, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reorder the permuted axes of one tensor.

    Parameters
    ----------
    tensor : Tensor or ndarray of shape ``(*axes, *extra)``
        The first ``len(entries)`` axes are described by ``entries``; extra trailing axes (e.g.
        the columns of a covariance factor) are carried along. A numpy array gives a numpy
        array (the matching solver works in numpy).
    entries : tuple
        The tensor's row of ``PermutationSpec.axes_to_perm``.
    perms : mapping of str to LongTensor
        Validated permutations (see :func:`check_perms`).
    blocks : mapping of int to int, optional
        Axis -> block length for axes permuted in blocks.
    out : Tensor, optional
        A contiguous CPU tensor of ``tensor``'s dtype and number of elements to write the
        result into (its memory is reused, its shape ignored); used when the gather runs in
        numpy (a CPU tensor of a numpy dtype, not recording autograd), else left alone.

    Returns
    -------
    Tensor
        A new tensor (a view of ``out`` when that was written) when an axis moves; the input
        itself when no axis is permuted (or every permutation is the identity).
    """
    gathers = {axis: index for axis, index in axis_gathers(entries, perms, blocks).items()
               if index is not None}
    if not gathers:
        return tensor
    if isinstance(tensor, np.ndarray):
        return take(tensor, {axis: index.numpy() for axis, index in gathers.items()})
    if _numpy_gatherable(tensor):
        index = {axis: index.numpy() for axis, index in gathers.items()}
        if out is None:
            return torch.from_numpy(take(tensor.detach().numpy(), index))
        if not (out.dtype == tensor.dtype and out.numel() == tensor.numel()
                and out.device.type == "cpu" and out.is_contiguous()):
            raise ValueError(f"out must be a contiguous CPU tensor of {tensor.numel()} "
                             f"{tensor.dtype} numbers, got {tuple(out.shape)} {out.dtype} "
                             f"on {out.device}")
        out = out.view(tensor.shape)
        take(tensor.detach().numpy(), index, out=out.numpy())
        return out
    moved = tensor  # autograd, a device or a dtype numpy does not have: torch's own gathers
    for axis, index in gathers.items():
        moved = moved.index_select(axis, index.to(moved.device))
    return moved


def take(array: np.ndarray, gathers: Mapping[int, np.ndarray],
         out: np.ndarray | None = None) -> np.ndarray:
    """``array`` gathered along each axis of ``gathers`` (axis -> index array), as ``np.take``
    along each axis in turn would, written into ``out`` when given.

    The indices must be in range (positions of a permutation, or some of them): they are not
    checked. Gathering along an inner axis of a large array reads every row's items in a
    shuffled order, which defeats the hardware prefetcher: ``np.take`` along the inputs of a
    large convolution kernel took several times as long as a plain copy. So arrays above 1 MB
    are gathered a block of rows at a time: the rows (gathered along the first axis, if it is
    permuted) are first copied in order into a buffer that stays in the core's cache, and the
    inner axes are gathered from there, which more than halved the time for the largest
    kernels (measurements: ``benchmarks/NOTES.md``).
    """
    if not gathers:
        if out is None:
            return array
        np.copyto(out, array)
        return out
    if len(gathers) == 1:
        ((axis, index),) = gathers.items()
        if axis == 0 or array.nbytes <= 2 * _STAGE_BYTES:  # whole rows in order, or cached
            return np.take(array, index, axis=axis, out=out, mode="clip")
    first = gathers.get(0)
    inner = sorted(axis for axis in gathers if axis > 0)
    if array.nbytes <= 2 * _STAGE_BYTES or not inner:
        for k, axis in enumerate(sorted(gathers)):
            array = np.take(array, gathers[axis], axis=axis, mode="clip",
                            out=out if k == len(gathers) - 1 else None)
        return array
    if out is None:
        out = np.empty(gathered_shape(array.shape, gathers), dtype=array.dtype)
    rows = len(out)
    block = max(1, _STAGE_BYTES // (array.nbytes // len(array)))
    stage = np.empty((min(block, rows),) + array.shape[1:], dtype=array.dtype)
    for start in range(0, rows, block):
        stop = min(start + block, rows)
        part = stage[:stop - start]
        if first is None:
            np.copyto(part, array[start:stop])
        else:
            np.take(array, first[start:stop], axis=0, out=part, mode="clip")
        for k, axis in enumerate(inner):
            part = np.take(part, gathers[axis], axis=axis, mode="clip",
                           out=out[start:stop] if k == len(inner) - 1 else None)
    return out


def gathered_shape(shape: tuple[int, ...], gathers: Mapping[int, np.ndarray]
                   ) -> tuple[int, ...]:
    """The shape :func:`take` gives an array of ``shape``: each gathered axis as long as its
    index."""
    out = list(shape)
    for axis, index in gathers.items():
        out[axis] = len(index)
    return tuple(out)


# rows staged per block: well inside the 1 MB second-level cache of each core
_STAGE_BYTES = 2**19


def axis_gathers(entries: tuple, perms: Perms, blocks: Mapping[int, int] | None = None,
                 skip: int | None = None) -> dict[int, torch.Tensor | None]:
    """Gather index of every permuted axis of a tensor (but ``skip``), None for an identity.

    Returns axis -> LongTensor of shape ``(axis length,)`` (or None), for the axes whose
    ``entries`` are not None.

    An identity needs no gather (which would copy the whole tensor); checking for one costs
    O(units). Shared by :func:`permute_tensor` and the matching solver, which gathers into
    work arrays of its own.
    """
    out = {}
    for axis, entry in enumerate(entries):
        if entry is None or axis == skip:
            continue
        index = axis_index(entry, perms, (blocks or {}).get(axis, 1))
        out[axis] = None if _is_identity(index) else index
    return out


_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64, torch.int32, torch.int64,
                 torch.bool)


def _numpy_gatherable(tensor: Any) -> bool:
    """Whether a torch tensor can be gathered by :func:`take`: on the CPU, of a dtype numpy
    has, and not recording a graph for autograd (so the result is the same).

    :func:`take` was faster than ``index_select`` on large tensors and as fast on small ones
    (measurements: ``benchmarks/NOTES.md``)."""
    return (isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu"
            and tensor.dtype in _NUMPY_DTYPES and not tensor.is_conj() and not tensor.is_neg()
            and not (tensor.requires_grad and torch.is_grad_enabled()))


class Spare:
    """Tensors whose memory their owner gives up, for new tensors of the same dtype and
    number of elements to be written into (see :func:`permute_tensors`).

    Only tensors that own their whole storage, contiguously, are taken (a view into a larger
    tensor is left out), each storage once.
    """

    def __init__(self, tensors: Iterable[torch.Tensor]):
        self.free: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
        seen = set()
        for t in tensors:
            storage = t.untyped_storage()
            if (t.device.type == "cpu" and t.is_contiguous() and t.storage_offset() == 0
                    and storage.nbytes() == t.numel() * t.element_size()
                    and storage.data_ptr() not in seen):
                seen.add(storage.data_ptr())
                self.free.setdefault((t.numel(), t.dtype), []).append(t)

    def claim(self, like: torch.Tensor) -> torch.Tensor | None:
        """A free tensor with ``like``'s dtype and number of elements, or None."""
        free = self.free.get((like.numel(), like.dtype))
        return free.pop() if free else None

    def give_back(self, t: torch.Tensor) -> None:
        """Return a claimed tensor that was not written into."""
        self.free.setdefault((t.numel(), t.dtype), []).append(t)


def permute_tensors(tensors: Mapping[str, torch.Tensor], perms: Perms, spec: PermutationSpec,
                    spare: Spare | None = None) -> dict[str, torch.Tensor]:
    """Apply :func:`permute_tensor` to every named tensor the spec lists (others are kept),
    writing into ``spare``'s tensors where one fits."""
    blocks = spec.blocks
    out = {}
    for name, t in tensors.items():
        if name not in spec:
            out[name] = t
            continue
        buffer = spare.claim(t) if spare is not None and _numpy_gatherable(t) else None
        out[name] = permute_tensor(t, spec[name], perms, blocks.get(name), out=buffer)
        if buffer is not None and out[name] is t:  # nothing moved: the buffer is still free
            spare.give_back(buffer)
    return out


def soft_permute_tensor(tensor: torch.Tensor, entries: tuple,
                        matrices: Mapping[str, torch.Tensor],
                        blocks: Mapping[int, int] | None = None) -> torch.Tensor:
    """The relaxation of :func:`permute_tensor`: every permuted axis multiplied by its groups'
    (doubly stochastic) matrices.

    Unit ``i`` of the result is ``sum_j S[i, j]`` times unit ``j`` of the input, so the matrix
    of a permutation ``p`` (``S[i, p[i]] = 1``, i.e. ``eye(n)[p]``) gives what
    :func:`permute_tensor` gives. A concatenated axis applies each group's matrix to its own
    segment, a blocked axis to whole blocks, as :func:`~bnn_align.symmetry.spec.axis_index` lays them
    out. Differentiable in the tensor and the matrices.

    Parameters
    ----------
    tensor : Tensor of shape ``(*axes, *extra)``
        As in :func:`permute_tensor`.
    entries : tuple
        The tensor's row of ``PermutationSpec.axes_to_perm``.
    matrices : mapping of str to Tensor
        Group -> ``(n_group, n_group)`` matrix, of the tensor's dtype and device.
    blocks : mapping of int to int, optional
        Axis -> block length for axes permuted in blocks.

    Returns
    -------
    Tensor
        Of ``tensor``'s shape; the input itself when no axis is permuted.
    """
    out = tensor
    for axis, entry in enumerate(entries):
        groups = _groups_of(entry)
        if not groups:
            continue
        block = (blocks or {}).get(axis, 1)
        moved = out.movedim(axis, 0)
        pieces, offset = [], 0
        for group in groups:
            matrix = matrices[group]
            length = len(matrix) * block
            piece = moved[offset:offset + length]
            # unit i owns rows i * block ... i * block + block - 1: one row of the product each
            pieces.append((matrix @ piece.reshape(len(matrix), -1)).reshape(piece.shape))
            offset += length
        out = (torch.cat(pieces) if len(pieces) > 1 else pieces[0]).movedim(0, axis)
    return out


def soft_permute_tensors(tensors: Mapping[str, torch.Tensor],
                         matrices: Mapping[str, torch.Tensor], spec: PermutationSpec
                         ) -> dict[str, torch.Tensor]:
    """Apply :func:`soft_permute_tensor` to every named tensor the spec lists (others are
    kept), as :func:`permute_tensors` applies :func:`permute_tensor`."""
    blocks = spec.blocks
    return {name: soft_permute_tensor(t, spec[name], matrices, blocks.get(name))
            if name in spec else t for name, t in tensors.items()}


def spec_for(obj: Any, spec: PermutationSpec | None) -> PermutationSpec:
    """The given spec, or the one of the BayesianNetwork behind ``obj``."""
    if spec is not None:
        if not isinstance(spec, PermutationSpec):
            raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
        return spec
    model = obj
    if isinstance(obj, SamplePosterior):
        if obj.spec is not None:
            return obj.spec
        model = obj.model
    if isinstance(obj, autoguide.AutoGuide):
        model = model_of(obj)
    if isinstance(model, BayesianNetwork):
        return model.spec
    raise ValueError(
        f"no spec given and {type(obj).__name__} is not a BayesianNetwork or a guide over one: "
        f"pass spec= (e.g. bnn_align.spec_from_module(net, example_input))"
    )


def _shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def permute(obj: Any, perms: Mapping[str, Any], spec: PermutationSpec | None = None) -> Any:
    """Apply permutations to a state dict, module, BayesianNetwork or guide.

    Parameters
    ----------
    obj : state dict, nn.Module, BayesianNetwork, Pyro autoguide, SamplePosterior or GaussianView
        Any posterior kind bnn_align supports. Never modified. A view's means, scales and
        covariance-factor rows move together (``spec`` is then required).
    perms : mapping of str to permutation
        Group name -> LongTensor (or array, or list) of shape ``(n_group,)`` for every group of
        the spec; ``perm[i]`` is the input unit that becomes unit ``i``. For a
        :class:`~bnn_align.SamplePosterior` a value may also have shape ``(S, n_group)``: one
        permutation per sample.
    spec : PermutationSpec, optional
        Defaults to the spec of the BayesianNetwork ``obj`` is (or is a guide over).

    Returns
    -------
    object of the same kind
        A new state dict, module, BayesianNetwork or guide. A permuted guide has its mean, scale
        and covariance-factor rows moved together; a full-rank guide is re-factorised so it stays
        a valid ``AutoMultivariateNormal``. A guide whose model has permuted buffers (BatchNorm
        statistics) gets a permuted copy of the model; otherwise it shares the original model.

    Raises
    ------
    ValueError
        No ``spec`` for an object that is not (a guide over) a BayesianNetwork; a spec that
        does not fit the object's tensors; ``perms`` missing a group of the spec or naming an
        unknown one, or a value of the wrong length or that is not a permutation.
    TypeError
        An unsupported object, ``perms`` that is not a mapping, non-integer permutations.

    Examples
    --------
    Permuting the hidden units of a network leaves its function unchanged:

    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import guides, models
    >>> _ = torch.manual_seed(0)
    >>> net = models.mlp(4, [8], 3)
    >>> spec = ba.spec_from_module(net, torch.zeros(1, 4))
    >>> perm = torch.randperm(8)
    >>> permuted = ba.permute(net, {"P_0": perm}, spec)
    >>> torch.equal(permuted[0].weight, net[0].weight[perm])       # rows of the first layer
    True
    >>> torch.equal(permuted[2].weight, net[2].weight[:, perm])    # columns of the second
    True
    >>> x = torch.randn(5, 4)
    >>> torch.allclose(permuted(x), net(x), atol=1e-6)
    True

    A guide over a BayesianNetwork carries its spec:

    >>> guide = guides.mean_field(ba.BayesianNetwork(net, input_shape=(4,)))
    >>> moved = ba.permute(guide, {"P_0": perm})
    >>> torch.equal(ba.as_gaussian(moved).loc["0.bias"], ba.as_gaussian(guide).loc["0.bias"][perm])
    True
    >>> ba.permute(net, {"P_0": torch.arange(7)}, spec)
    Traceback (most recent call last):
        ...
    ValueError: permutation of group 'P_0' must have shape (8,), got (7,)
    """
    return permute_into(obj, perms, spec, None)


def permute_into(obj: Any, perms: Mapping[str, Any], spec: PermutationSpec | None,
                 spare: Spare | None) -> Any:
    """:func:`permute`, the moved tensors written into ``spare``'s tensors where those fit
    (their memory is then the new object's; see :class:`Spare`)."""
    spec = spec_for(obj, spec)
    if isinstance(obj, SamplePosterior):
        return _permute_samples(obj, perms, spec)
    if isinstance(obj, GaussianView):  # mean, scale and factor rows move together
        perms = check_perms(perms, spec.group_sizes(
            {k: tuple(v.shape) for k, v in obj.loc.items()}, where="the Gaussian view"))
        blocks = spec.blocks
        return obj.map(lambda part, site, t: permute_tensor(t, spec[site], perms,
                                                            blocks.get(site))
                       if site in spec else t)
    if isinstance(obj, BayesianNetwork):
        return obj.with_net(permute_into(obj.net, perms, spec, spare))
    if isinstance(obj, autoguide.AutoGuide):
        return _permute_guide(obj, perms, spec, spare)
    if isinstance(obj, nn.Module):
        state = obj.state_dict()
        perms = check_perms(perms, spec.group_sizes(_shapes(state), where=type(obj).__name__))
        spec.check_heads(perms)
        return _copy_module(obj, permute_tensors(state, perms, spec, spare), state)
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        perms = check_perms(perms, spec.group_sizes(_shapes(tensors), where="the state dict"))
        spec.check_heads(perms)
        # keep the mapping's class (a state dict is an OrderedDict with _metadata)
        out = copy.copy(obj) if isinstance(obj, dict) else dict(obj)
        out.update({k: v.clone() if v is tensors[k] else v
                    for k, v in permute_tensors(tensors, perms, spec, spare).items()})
        return out
    raise TypeError(
        f"permute expects a state dict, an nn.Module, a BayesianNetwork or a Pyro autoguide, "
        f"got {type(obj).__name__}"
    )


def _permute_samples(obj: SamplePosterior, perms: Mapping[str, Any], spec: PermutationSpec
                     ) -> SamplePosterior:
    """A sample set permuted: by one permutation per group for every sample (values of shape
    ``(n,)``), or by one per sample (values of shape ``(S, n)``, row ``s`` for sample ``s``)."""
    if not isinstance(perms, Mapping):
        raise TypeError(f"perms must be a mapping of group name to permutation, "
                        f"got {type(perms).__name__}")
    sizes = spec.group_sizes({k: tuple(v) for k, v in obj.shapes.items()},
                             where="the sample set")
    per_sample = {g: torch.as_tensor(p).dim() == 2 for g, p in perms.items()}
    blocks = spec.blocks
    if not any(per_sample.values()):
        perms = check_perms(perms, sizes)
        # the sample axis is one more axis no permutation moves
        moved = {name: permute_tensor(t, (None, *spec[name]), perms,
                                      {a + 1: b for a, b in blocks.get(name, {}).items()})
                 if name in spec else t for name, t in obj.samples.items()}
    else:
        count = obj.num_samples
        rows = []
        for g, p in perms.items():
            p = torch.as_tensor(p)
            if p.dim() == 2 and len(p) != count:
                raise ValueError(f"per-sample permutations of group {g!r} must have shape "
                                 f"({count}, n) for the {count} samples, got {tuple(p.shape)}")
        for s in range(count):
            rows.append(check_perms({g: torch.as_tensor(p)[s] if per_sample[g] else p
                                     for g, p in perms.items()}, sizes))
        moved = {name: torch.stack([permute_tensor(t[s], spec[name], rows[s], blocks.get(name))
                                    for s in range(count)]) if name in spec else t
                 for name, t in obj.samples.items()}
    return obj.with_samples({k: v if v is not obj.samples[k] else v.clone()
                             for k, v in moved.items()})


def _copy_module(module: nn.Module, tensors: Mapping[str, torch.Tensor],
                 state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are ``tensors`` (state-dict names)
    where those are new (not ``state``'s own), each copied once: handed to ``deepcopy``
    instead of copied and then overwritten by ``load_state_dict`` (half the copying of a large
    network). A module whose state-dict names are not its attribute names (state-dict hooks)
    takes the ``load_state_dict`` way."""
    moved = {name for name, t in tensors.items() if t is not state.get(name)}
    replace = []
    for name, old in [*module.named_parameters(remove_duplicate=False),
                      *module.named_buffers(remove_duplicate=False)]:
        if name in moved:
            replace.append((old, tensors[name]))
            moved.discard(name)
    if moved:
        new_module = copy.deepcopy(module)
        new_module.load_state_dict(tensors)
        return new_module
    return copy.deepcopy(module, replacement_memo(replace))


def _permute_guide(guide: autoguide.AutoGuide, perms: Mapping[str, Any],
                   spec: PermutationSpec, spare: Spare | None) -> autoguide.AutoGuide:
    adapter = adapter_for(guide)
    raw = adapter.raw(guide)
    site_shapes = adapter.sites(guide)
    model = model_of(guide)
    buffers: dict[str, torch.Tensor] = {}
    if isinstance(model, BayesianNetwork):
        buffers = dict(model.net.named_buffers())
    extra = [n for n in spec.names if n not in site_shapes]
    strangers = [n for n in extra if n not in buffers]
    if strangers:
        raise ValueError(
            f"the permutation spec names {strangers[:5]}, which are neither sample sites of the "
            f"{type(guide).__name__} nor buffers of its model"
        )
    shapes = dict(site_shapes)
    shapes.update({n: tuple(buffers[n].shape) for n in extra})
    perms = check_perms(perms, spec.group_sizes(shapes, where=type(guide).__name__))
    spec.check_heads(perms)
    new_model = None
    if any(any(e is not None for e in spec[n]) for n in extra):
        new_model = permute(model, perms, spec)
    moved = {part: permute_tensors(tensors, perms, spec, spare) for part, tensors in raw.items()}
    return adapter.from_raw(guide, moved, new_model)
