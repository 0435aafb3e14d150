"""The spec stage: which axes of which tensors a permutation moves, derived from the network's
graph, and the one function that applies permutations.

* :mod:`~bnn_align.symmetry.spec`: :class:`PermutationSpec`, the permutation groups and the
  tensor axes each one moves.
* :mod:`~bnn_align.symmetry.derive`: :func:`spec_from_module`, the spec of a module read off its
  traced graph, refusing what it cannot prove safe.
* :mod:`~bnn_align.symmetry.attention`: the rules for attention (heads that move as wholes), used
  by :func:`spec_from_module`.
* :mod:`~bnn_align.symmetry.permutation`: :func:`permute`, applying permutations to tensors, state
  dicts, modules and guides.
* :mod:`~bnn_align.symmetry.scale`: the positive-scale symmetries of a traced graph
  (``spec.scalable``); :mod:`~bnn_align.symmetry.canonical`: :func:`rescale` and
  :func:`canonicalize`, which removes them (unit-norm incoming weights).
"""

from .derive import UnsupportedOperation, spec_from_module
from .permutation import permute
from .spec import PermutationSpec
from .canonical import canonicalize, rescale
from .scale import ScaleSymmetry

__all__ = ["PermutationSpec", "ScaleSymmetry", "UnsupportedOperation", "canonicalize", "permute",
           "rescale", "spec_from_module"]
