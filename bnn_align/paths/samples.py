"""The path between two sample sets: the optimal coupling of their samples, moved linearly.

Two sample sets of equal size ``S`` are two empirical distributions with equal weights ``1/S``.
The 2-Wasserstein-optimal coupling between them is a permutation of the samples (Birkhoff: the
optimal transport plan between uniform measures of equal size has a permutation among its
optima), found exactly by :func:`scipy.optimize.linear_sum_assignment` on the matrix of squared
distances ``||theta0_i - theta1_j||^2``. Moving every coupled pair linearly,
``theta_t = (1 - t) theta0_i + t theta1_sigma(i)``, is the W2 geodesic between the two sets
(displacement interpolation). ``"mixture"`` takes a sample of either set.

Sets of different sizes are refused: a rectangular assignment would drop samples of the larger
set, and the path would not end at it (subsample it first with ``select``-like indexing of
``samples``, e.g. ``SamplePosterior.from_mcmc({k: v[:S] ...})``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..posterior import paired_views
from ..samples import SamplePosterior
from .interpolation import BasePath, Mixture, Noise, _check_t

__all__ = ["SamplePath", "optimal_coupling"]


def optimal_coupling(q0: SamplePosterior, q1: SamplePosterior) -> torch.Tensor:
    """The permutation ``sigma`` of ``q1``'s samples minimising
    ``sum_i ||theta0_i - theta1_sigma(i)||^2`` (exact assignment), as a LongTensor ``(S,)``.

    Raises
    ------
    ValueError
        Sets of different sizes.
    """
    if q0.num_samples != q1.num_samples:
        raise ValueError(f"the sample sets must have one size to be coupled sample by sample: "
                         f"q0 has {q0.num_samples} samples, q1 {q1.num_samples}; subsample the "
                         f"larger one first")
    if q0 is q1:
        return torch.arange(q0.num_samples)
    flat0 = torch.cat([v.reshape(len(v), -1) for v in q0.samples.values()], 1).double()
    flat1 = torch.cat([q1.samples[s].reshape(len(v), -1) for s, v in q0.samples.items()],
                      1).double()
    cost = torch.cdist(flat0.cpu(), flat1.cpu()).pow(2).numpy()
    rows, cols = linear_sum_assignment(cost)
    sigma = np.empty(len(rows), dtype=np.int64)
    sigma[rows] = cols
    return torch.from_numpy(sigma)


class SamplePath(BasePath):
    """The path between two sample sets of one size (see the module docstring).

    Build it with :func:`~bnn_align.interpolate`. Attributes as
    :class:`~bnn_align.paths.BasePath`; ``view0`` and ``view1`` are the sets' moments;
    ``coupling`` is the permutation pairing sample ``i`` of ``q0`` with sample
    ``coupling[i]`` of ``q1``.

    A draw of ``n`` weights at ``t`` takes ``n`` coupled pairs: all of them, in order, for
    ``n = S``, a seeded random subset for fewer; more than ``S`` is refused.

    Examples
    --------
    >>> import torch
    >>> import bnn_align as ba
    >>> q0 = ba.SamplePosterior({"w": torch.tensor([[0.0], [10.0]])})
    >>> q1 = ba.SamplePosterior({"w": torch.tensor([[11.0], [1.0]])})
    >>> path = ba.interpolate(q0, q1)
    >>> path.coupling.tolist()                     # 0 -> 1.0 and 10 -> 11.0
    [1, 0]
    >>> path.at(0.5).samples["w"].flatten().tolist()
    [0.5, 10.5]
    """

    def __init__(self, q0: SamplePosterior, q1: SamplePosterior, kind: str = "wasserstein"):
        for label, q in (("q0", q0), ("q1", q1)):
            if not isinstance(q, SamplePosterior):
                name = type(q).__name__
                article = "an" if name[0] in "AEIOU" else "a"
                raise TypeError(f"a path between sample sets needs two SamplePosteriors; {label} "
                                f"is {article} {name} (make one with SamplePosterior."
                                f"from_modules or draw from it)")
        if kind not in ("wasserstein", "mixture"):
            raise ValueError(f"kind must be one of ('wasserstein', 'mixture'), got {kind!r}")
        self.kind = kind
        self.q0, self.q1 = q0, q1
        self.view0, self.view1 = paired_views(q0.moments(), q1.moments(), ("q0", "q1"))
        self.coupling = optimal_coupling(q0, q1)
        self.models = (q0.model, q1.model)
        self._buffers = (None, None)
        self._paired = {s: v.index_select(0, self.coupling.to(v.device))
                        for s, v in q1.samples.items()}

    def view_at(self, t: float):
        raise ValueError("a path between sample sets is not Gaussian: use path.at(t) (a "
                         "SamplePosterior) or path.draw")

    def at(self, t: float) -> Any:
        """The sample set at ``t`` (every coupled pair moved), or a :class:`Mixture`."""
        t = _check_t(t)
        if self.kind == "mixture":
            return Mixture(self, t)
        if t == 0.0:
            return self.q0
        if t == 1.0:
            return self.q1
        return self.q0.with_samples({s: torch.lerp(v, self._paired[s], t)
                                     for s, v in self.q0.samples.items()})

    def noise(self, num_samples: int, generator: torch.Generator | None = None) -> Noise:
        """Which coupled pairs ``num_samples`` draws take (``Noise.index``), and the uniform
        draws of the mixture."""
        index = self.q0.indices(num_samples, generator)
        u = torch.rand(num_samples, generator=generator)
        device = self.device
        return Noise(torch.empty(num_samples, 0, device=device), None, u.to(device),
                     index.to(device))

    def _pairs(self, noise: Noise) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        if noise.index is None:
            raise ValueError("this noise was not made by a SamplePath: use path.noise")
        index = noise.index
        return ({s: v.index_select(0, index) for s, v in self.q0.samples.items()},
                {s: v.index_select(0, index) for s, v in self._paired.items()})

    def view0_draw(self, noise: Noise) -> dict[str, torch.Tensor]:
        return self._pairs(noise)[0]

    def view1_draw(self, noise: Noise) -> dict[str, torch.Tensor]:
        return self._pairs(noise)[1]

    def draw(self, t: float, noise: Noise) -> dict[str, torch.Tensor]:
        """Weights at ``t`` of the coupled pairs ``noise.index``: ``(S, *site_shape)``."""
        t = _check_t(t)
        first, second = self._pairs(noise)
        if self.kind == "wasserstein":
            return {s: torch.lerp(v, second[s], t) for s, v in first.items()}
        pick = noise.u < t
        return {s: torch.where(pick.view(-1, *([1] * (v.dim() - 1))), second[s], v)
                for s, v in first.items()}

    def buffers_at(self, t: float) -> None:
        _check_t(t)
        return None
