"""The solver's matrix product: same numbers whatever kernel runs it, never a rounded one."""

import numpy as np
import pytest
import torch

from bnn_align.matching import _gemm


@pytest.fixture
def route(monkeypatch):
    """The oneDNN route forced on (whatever the CPU), from sizes the tests can afford."""
    monkeypatch.setattr(_gemm, "_onednn_usable", True)
    monkeypatch.setattr(_gemm, "ONEDNN_MIN_SIZE", 2**23)
    monkeypatch.setattr(_gemm, "ONEDNN_MIN_SIZE_NEW_SHAPE", 2**28)
    return monkeypatch


def _operands(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((m, k), dtype=np.float32),
            rng.standard_normal((n, k), dtype=np.float32))


@pytest.mark.parametrize("transposed", [False, True])
def test_large_repeated_product_matches_float64(route, transposed):
    x, y = _operands(96, 1100, 80)
    if transposed:  # the strided views the solver passes for a tensor's second axis
        x, y = np.ascontiguousarray(x.T).T, np.ascontiguousarray(y.T).T
    exact = x.astype(np.float64) @ y.astype(np.float64).T
    result = _gemm.product(x, y, repeated=True)
    assert result.dtype == np.float32 and result.shape == (96, 80)
    np.testing.assert_allclose(result, exact, rtol=0, atol=1e-3)
    assert _gemm._onednn_usable  # its check passed


def test_the_users_precision_setting_is_put_back(route):
    flags = torch.backends.mkldnn.matmul
    before = flags.fp32_precision
    _gemm.product(*_operands(96, 1100, 80), repeated=True)
    assert flags.fp32_precision == before


def test_a_product_rounded_through_bfloat16_is_caught_and_redone(route):
    """A kernel that rounds the operands (what oneDNN may do on CPUs with AMX) fails the check:
    the product is redone exactly and the route is switched off."""
    calls = []
    exact = _gemm._torch_product

    def rounded(x, y, precision):
        if precision != "bf16":
            return exact(x, y, precision)
        calls.append(x.shape)
        return torch.from_numpy(x).bfloat16().float() @ torch.from_numpy(y).bfloat16().float().T

    route.setattr(_gemm, "_torch_product", rounded)
    x, y = _operands(96, 1100, 80, seed=1)
    result = _gemm.product(x, y, repeated=True)
    np.testing.assert_allclose(result, x.astype(np.float64) @ y.astype(np.float64).T,
                               rtol=0, atol=1e-3)
    assert calls and _gemm._onednn_usable is False
    _gemm.product(x, y, repeated=True)
    assert len(calls) == 1  # not tried again


def test_small_and_new_shaped_products_stay_with_numpy(route):
    used = []
    exact = _gemm._torch_product

    def recorded(x, y, precision):
        used.append(precision)
        return exact(x, y, precision)

    route.setattr(_gemm, "_torch_product", recorded)
    for x, y, repeated in [(*_operands(16, 64, 16), True),
                           (*_operands(96, 1100, 80), False)]:  # large only when repeated
        np.testing.assert_allclose(_gemm.product(x, y, repeated=repeated),
                                   x.astype(np.float64) @ y.astype(np.float64).T,
                                   rtol=0, atol=1e-3)
    assert "bf16" not in used
    _gemm.product(*_operands(96, 1100, 80), repeated=True)
    assert used[-1] == "bf16"


def test_check_accepts_float32_kernels_and_rejects_rounded_operands():
    for seed, scale in [(0, 1.0), (1, 0.05)]:
        x, y = _operands(64, 3000, 64, seed)
        x, y = np.abs(x) * scale, np.abs(y) * scale  # positive: no cancellation to hide in
        assert _gemm._agrees(x @ y.T, x, y)
        rounded = (torch.from_numpy(x).bfloat16().float()
                   @ torch.from_numpy(y).bfloat16().float().T).numpy()
        assert not _gemm._agrees(rounded, x, y)
