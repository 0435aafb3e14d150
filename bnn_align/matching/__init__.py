"""The match stage: the permutations that bring one posterior next to another.

* :mod:`~bnn_align.matching.weights`: :func:`match` and its :class:`Alignment` result; weight
  matching (the expected squared distance, W2 for Gaussians) over the arrays of two posteriors.
* :mod:`~bnn_align.matching.many`: :func:`match_many` (many posteriors to one reference,
  cycle-consistent), :func:`merge`, :func:`repair`, and :func:`align_samples` (sample sets,
  one permutation per sample).
* :mod:`~bnn_align.matching.learned`: the learned methods (``"ste"``, ``"sinkhorn"``) that
  minimise the loss along the path itself, started from weight matching.
* ``_descent`` and ``_gemm``: the solver core (assignment steps, coordinate descent, products),
  which knows nothing about posteriors.
"""

from .weights import LEARNED_METHODS, METHODS, Alignment, alignment_cost, match
from .many import (MultiAlignment, SampleAlignment, align_samples, match_many, merge,
                   repair)

__all__ = ["Alignment", "LEARNED_METHODS", "METHODS", "MultiAlignment", "SampleAlignment",
           "align_samples", "alignment_cost", "match", "match_many", "merge", "repair"]
