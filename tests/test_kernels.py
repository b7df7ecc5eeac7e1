"""The compiled pieces: the float32 tanh, the matrix product behind every layer, the chain on its workspace."""

import numba
import numpy as np
import pytest
import torch as th

from sb3_trpo_ext.common import kernels, mlp


def test_float32_tanh_is_within_seven_ulps_of_the_exact_one():
    grid = np.linspace(-10, 10, 2_000_001, dtype=np.float32)
    tiny = np.float32(10.0) ** -np.arange(1, 38, dtype=np.float32)
    for x, bound in ((grid, "ulps"), (np.concatenate([tiny, -tiny]), "relative")):
        approximate = np.empty_like(x)
        kernels.tanh_array(x, approximate)
        exact = np.tanh(x.astype(np.float64))
        error = np.abs(approximate - exact)
        if bound == "ulps":
            assert (error / np.spacing(np.abs(exact).astype(np.float32))).max() <= 7
            assert error.max() <= 4e-7
        else:
            assert (error / np.abs(exact)).max() <= 2e-6
        assert (np.sign(approximate) == np.sign(exact)).all()


def test_tanh_keeps_nan_and_saturates_at_infinity():
    for dtype in (np.float32, np.float64):
        x = np.array([np.nan, np.inf, -np.inf, 0.0, 50.0, -50.0], dtype=dtype)
        out = np.empty_like(x)
        kernels.tanh_array(x, out)
        assert np.isnan(out[0])
        np.testing.assert_array_equal(out[1:], [1, -1, 0, 1, -1])


def test_float64_tanh_is_the_c_librarys():
    x = np.random.default_rng(0).standard_normal(10_000) * 3
    out = np.empty_like(x)
    kernels.tanh_array(x, out)
    np.testing.assert_allclose(out, np.tanh(x), rtol=5e-16, atol=0)  # NumPy's own rounds differently, by an ulp


@numba.njit
def _matmul(gemm, a, b, out):  # the kernels' product, callable from Python for the test
    kernels._matmul(gemm, a, b, out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("a_transposed", [False, True])
@pytest.mark.parametrize("b_transposed", [False, True])
@pytest.mark.parametrize("shape", [(5, 7, 3), (1, 7, 3), (5, 1, 3), (5, 7, 1)])
def test_matmul_takes_row_major_and_transposed_operands(dtype, a_transposed, b_transposed, shape):
    m, k, n = shape
    rng = np.random.default_rng(0)
    # a transposed operand: the transpose of a row-major array, as the kernels pass it
    a = rng.standard_normal((k, m)).astype(dtype).T if a_transposed else rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((n, k)).astype(dtype).T if b_transposed else rng.standard_normal((k, n)).astype(dtype)
    out = np.full((m, n), np.nan, dtype=dtype)
    _matmul(kernels.gemm_for(np.dtype(dtype)), a, b, out)
    np.testing.assert_allclose(out, a.astype(np.float64) @ b.astype(np.float64), rtol=1e-5 if dtype == np.float32 else 1e-12)


def test_compiled_chain_matches_the_array_calls_in_float32():
    th.manual_seed(0)
    net = th.nn.Sequential(th.nn.Linear(17, 64), th.nn.Tanh(), th.nn.Linear(64, 64), th.nn.ReLU(), th.nn.Linear(64, 6))
    chain = mlp.linear_chain([net])
    weights = th.cat([p.detach().reshape(-1) for p in chain.parameters])[chain.augmented_order()]
    inputs = mlp.array_view(mlp.with_ones_row(th.randn(410, 17)))
    tangent = np.random.default_rng(1).standard_normal(len(weights)).astype(np.float32)
    upstream = np.random.default_rng(2).standard_normal((6, 410)).astype(np.float32)
    compiled, calls = mlp.CompiledChain(chain, weights, 410), mlp.BoundChain(chain, weights, 410)
    assert isinstance(chain.bind(weights, 410), mlp.CompiledChain)
    gradients = []
    for bound in (compiled, calls):
        output = bound.forward(inputs).copy()
        jvp = bound.jvp(tangent).copy()
        gradient = np.empty_like(tangent)
        bound.vjp(upstream, gradient)
        gradients.append((output, jvp, gradient))
    for ours, reference in zip(*gradients, strict=True):
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5)
