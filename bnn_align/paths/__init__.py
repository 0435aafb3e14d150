"""The path stage: families of posteriors ``q_t``, ``t`` in ``[0, 1]``, between two endpoints.

* :mod:`~bnn_align.paths.interpolation`: :func:`interpolate` and its :class:`Path` (the
  Wasserstein geodesic and the mixture), and :class:`BasePath`, what every path offers to
  :func:`~bnn_align.marginal_loss`.
* :mod:`~bnn_align.paths.samples`: :class:`SamplePath`, between two sample sets (their
  samples coupled optimally, each pair moved linearly).
* :mod:`~bnn_align.paths.geodesic`: :class:`GeodesicPath`, great circles between canonical
  posteriors (``interpolate(..., kind="geodesic")``).
* :mod:`~bnn_align.paths.curves`: :func:`fit_curve` and its :class:`Curve`, learned Bezier curves
  and polygonal chains whose every point is a posterior.
"""

from .interpolation import KINDS, BasePath, Path, interpolate
from .curves import Curve, fit_curve
from .geodesic import GeodesicPath
from .samples import SamplePath

__all__ = ["BasePath", "Curve", "GeodesicPath", "KINDS", "Path", "SamplePath", "fit_curve",
           "interpolate"]
