"""The solver's one matrix product, ``x @ y.T`` in float32, and the choice of kernel for it.

Every product runs in torch, on torch's threads: small and odd-shaped ones on MKL, large ones
whose shape repeats (a site's contribution to a similarity matrix, recomputed at the same shape
sweep after sweep) on oneDNN's float32 kernels where the CPU has them. Not numpy for the small
ones: OpenBLAS's workers keep spinning a while after each of its products and torch's threads
then share a core with them, which slowed whole matches that mixed the two. oneDNN: where
OpenBLAS is held to AVX2 kernels (``OPENBLAS_CORETYPE``) and MKL takes its slow path (AMD
CPUs), oneDNN's AVX-512 kernels run the large products clearly faster than numpy, and as
accurately. Measurements: ``benchmarks/NOTES.md``.

torch sends a float32 matmul to oneDNN only while ``torch.backends.mkldnn.matmul.fp32_precision``
is ``"bf16"``; that setting *allows* oneDNN to round the operands to bfloat16, which it does not
do on this machine (the errors above) but may elsewhere (CPUs with AMX). So the setting is held
only for the product and put back, and every product is checked: eight of its entries,
recomputed in float64, must agree to within ``2**-10`` of the scale of bfloat16 rounding's
error on them. float32 kernels stay well inside that bound, while most entries of a product of
bfloat16-rounded operands exceed it, so all eight pass by chance only very rarely. The first
product that fails switches the route off for the process and is redone without oneDNN. oneDNN
builds a kernel for every new shape, which made small odd-shaped products (the low-rank
updates, whose shape is the number of moved units) slower than OpenBLAS's; only large ones go
to oneDNN.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# products smaller than this (multiply-adds) stay off oneDNN, which gains nothing on them
# (benchmarks/NOTES.md)
ONEDNN_MIN_SIZE = 2**23
# the same for a shape not seen before, whose kernel oneDNN must build first: building it
# costs more than oneDNN saves on products below this size
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
