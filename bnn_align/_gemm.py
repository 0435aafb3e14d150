"""The solver's one matrix product, ``x @ y.T`` in float32, and the choice of kernel for it.

Every product runs in torch, on torch's threads: small and odd-shaped ones on MKL, large ones
whose shape repeats (a site's contribution to a similarity matrix, recomputed at the same shape
sweep after sweep) on oneDNN's float32 kernels where the CPU has them. Not numpy for the small
ones: OpenBLAS's workers spin for about 0.1 s after each of its products and torch's threads then
share a core with them (mixing the two made the independent ResNet-20 x4 match 1.9x as long).
oneDNN: on the 2-core AMD EPYC
benchmark machine, where OpenBLAS is pinned to its AVX2 ("Haswell") kernels by
``OPENBLAS_CORETYPE`` and MKL takes its slow path on AMD, oneDNN's AVX-512 kernels ran the
products of ResNet-20 x16's similarities 1.9-2.0x faster than numpy (1024 x 9216 by
9216 x 1024: 47 ms against 89 ms), as accurate (largest error against float64 1.7e-4 and
1.9e-4 on that product).

torch sends a float32 matmul to oneDNN only while ``torch.backends.mkldnn.matmul.fp32_precision``
is ``"bf16"``; that setting *allows* oneDNN to round the operands to bfloat16, which it does not
do on this machine (the errors above) but may elsewhere (CPUs with AMX). So the setting is held
only for the product and put back, and every product is checked: eight of its entries,
recomputed in float64, must agree to within ``2**-10`` of the scale of bfloat16 rounding's
error on them. float32 kernels stayed below a third of that (below a tenth up to 65 536 terms
per entry), while about 70 % of the entries of a product of bfloat16-rounded operands exceed
it, so all eight pass by chance about once in 10 000 products. The first product that fails
switches the route off for the process and is redone without oneDNN. oneDNN builds a kernel
for every new shape (about 1.5 ms at 256 units), which made small odd-shaped products (the
low-rank updates, whose shape is the number of moved units) slower than OpenBLAS's; only large
ones go to oneDNN.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# products smaller than this (multiply-adds) stay off oneDNN: at 64 x 576 by 576 x 64 (2.4
# million) both took 0.03 ms, at 128 x 1152 by 1152 x 128 (19 million) oneDNN 1.7x less
ONEDNN_MIN_SIZE = 2**23
# the same for a shape not seen before, whose kernel oneDNN must build first: at 256 units
# and 86 million multiply-adds 2.9 ms against OpenBLAS's 1.4, at 512 and 640 million 4.7
# against 7.0
ONEDNN_MIN_SIZE_NEW_SHAPE = 2**28
# largest error of a checked entry ``x_i . y_j``, relative to ``|x_i * y_j|`` (see ``_agrees``)
_CHECK_TOLERANCE = 2.0**-10

_onednn_usable: bool | None = None  # decided at the first large product (see ``_onednn``)


def product(x: np.ndarray, y: np.ndarray, *, repeated: bool = False) -> np.ndarray:
    """``x @ y.T``, float32, shape ``(len(x), len(y))``, for float32 ``x`` ``(m, k)`` and ``y``
    ``(n, k)`` (any strides).

    ``repeated``: the caller computes products of this shape again and again, so a kernel built
    for it is reused (see the module docstring): such products go to oneDNN from
    :data:`ONEDNN_MIN_SIZE` multiply-adds, others from :data:`ONEDNN_MIN_SIZE_NEW_SHAPE`.
    """
    least = ONEDNN_MIN_SIZE if repeated else ONEDNN_MIN_SIZE_NEW_SHAPE
    if x.shape[0] * x.shape[1] * y.shape[0] >= least and _onednn():
        result = _torch_product(x, y, "bf16").numpy()
        if _agrees(result, x, y):
            return result
        global _onednn_usable
        _onednn_usable = False
    return _torch_product(x, y, "ieee").numpy()


def _onednn() -> bool:
    """Whether torch can send float32 products to oneDNN here: only where oneDNN has bfloat16
    kernels does torch route them (elsewhere they would run on MKL all the same, checked for nothing)."""
    global _onednn_usable
    if _onednn_usable is None:
        try:
            _onednn_usable = bool(torch.backends.mkldnn.is_available()
                                  and hasattr(torch.backends.mkldnn, "matmul")
                                  and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            _onednn_usable = False
    return _onednn_usable


def _torch_product(x: np.ndarray, y: np.ndarray, precision: str) -> torch.Tensor:
    """``x @ y.T`` by torch with ``torch.backends.mkldnn.matmul.fp32_precision`` set to
    ``precision`` (``"bf16"``: oneDNN allowed, ``"ieee"``: not), the user's setting put back."""
    flags = torch.backends.mkldnn.matmul
    previous = flags.fp32_precision
    flags.fp32_precision = precision
    try:
        return torch.from_numpy(x) @ torch.from_numpy(y).T
    finally:
        flags.fp32_precision = previous


def _agrees(result: np.ndarray, x: np.ndarray, y: np.ndarray) -> bool:
    """Whether a few entries of ``result`` match their float64 dot products to within
    :data:`_CHECK_TOLERANCE` of ``|x_i * y_j|`` (the norm of the elementwise product, the
    scale of bfloat16 rounding's error on the entry).

    Eight entries, spread over the matrix, cost about ``8 / (len(x) len(y))`` of the product."""
    m, n = result.shape
    rows = np.linspace(0, m - 1, num=8).astype(np.int64)
    columns = (np.linspace(0, n - 1, num=8).astype(np.int64) + np.arange(8) * 7) % n
    for i, j in zip(rows.tolist(), columns.tolist()):
        terms = x[i].astype(np.float64) * y[j]
        error = abs(float(result[i, j]) - float(terms.sum()))
        if not error <= _CHECK_TOLERANCE * math.sqrt(float(np.square(terms).sum())):
            return False
    return True
