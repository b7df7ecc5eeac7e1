"""
The hand-written MLP arithmetic as compiled loops, for float32 and float64 CPU tensors.

The critic regression takes hundreds of small Adam steps per update, and the conjugate gradient a few dozen
Fisher-vector products. Written as NumPy calls (:class:`sb3_trpo_ext.common.mlp.BoundChain`), each step is dozens of
library calls on arrays of a few thousand numbers, whose call overhead costs as much as their arithmetic. Here the
same arithmetic, in the same layout, is compiled by Numba: :func:`chain_forward`, :func:`chain_jvp` and
:func:`chain_vjp` are one call each, and :func:`regress_chain` runs the whole regression, every epoch and minibatch,
in one call. The matrix products go to OpenBLAS; the activations, the loss and Adam are loops that LLVM vectorises.
Nothing here holds Python's global interpreter lock.

Numba's ``tanh`` is the C library's scalar one, which LLVM cannot vectorise (16 ns per number on this project's
machines). For float32 the loops use :func:`tanh` instead, a rational approximation that vectorises; float64 keeps
the C library's, so that float64 runs reproduce autograd to rounding (``tests/test_critic.py``).

Compiled functions are cached on disk (``__pycache__`` beside this file, or Numba's user-wide cache where that is
not writable): the first process on a machine compiles them, in about 10 s, and later ones load them.
"""

import ctypes
import functools
import math
import os
from collections.abc import Callable

import numba
import numpy as np
import scipy_openblas32
from numba import types
from numba.extending import overload
from numba.np.numpy_support import as_dtype

# Activation codes of regress_chain's ``activations``
IDENTITY, TANH, RELU = 0, 1, 2

# ----------------------------------------------------------------------------------------------------------------
# Matrix products
# ----------------------------------------------------------------------------------------------------------------
# The products call OpenBLAS's cblas_?gemm through a function pointer, from the scipy-openblas32 wheel (the build
# NumPy and SciPy ship). Numba's own np.dot goes through the OpenBLAS that SciPy bundles, which may be older:
# SciPy 1.17's 0.3.30 has no small-matrix kernels, and at the critic's sizes (64x65 by 65x128, one thread) it took
# 17.0 us where 0.3.34 took 13.2 (medians of 5 rounds of 1000, same process, on this project's AMD EPYC machine).
# Loading the library here, at import, also puts it in the list threadpoolctl makes when train() first limits the
# BLAS libraries to one thread (sb3_trpo_ext.common.mlp.single_threaded_blas).

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


def _openblas() -> ctypes.CDLL:
    lib_dir = scipy_openblas32.get_lib_dir()
    names = [n for n in os.listdir(lib_dir) if n.startswith("libscipy_openblas") and n.endswith((".so", ".dylib", ".dll"))]
    return ctypes.CDLL(os.path.join(lib_dir, sorted(names)[0]))


_OPENBLAS = _openblas()


@functools.cache
def gemm_for(dtype: np.dtype) -> Callable[..., None]:
    """
    OpenBLAS's ``cblas_sgemm`` or ``cblas_dgemm`` as a ctypes function, which compiled functions take as an argument.

    :param dtype: ``float32`` or ``float64``
    :return: The function
    """
    real = {np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}[np.dtype(dtype)]
    name = "scipy_cblas_sgemm" if real is ctypes.c_float else "scipy_cblas_dgemm"
    integer, pointer = ctypes.c_int, ctypes.c_void_p
    # order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc
    prototype = ctypes.CFUNCTYPE(None, *[integer] * 6, real, pointer, integer, pointer, integer, real, pointer, integer)
    address = ctypes.cast(getattr(_OPENBLAS, name), ctypes.c_void_p).value
    assert address is not None
    return prototype(address)


# tanh(x) = x P(x^2) / Q(x^2) on [-CLAMP, CLAMP], and +-1 to float32 precision beyond: the coefficients of Eigen's
# float32 tanh (Eigen 3.4, MathFunctionsImpl.h, generic_fast_tanh_float). Measured against float64 tanh on 2M
# points of [-10, 10]: at most 7 float32 ulps and 4e-7 off (tests/test_kernels.py).
_CLAMP = 7.90531110763549805
_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
      1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)  # fmt: skip
_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)


def tanh(x: float) -> float:
    """
    ``tanh`` for compiled code: the vectorisable rational approximation for float32, the C library's otherwise.
    Callable only from functions compiled by Numba.

    :param x: A number
    :return: Its hyperbolic tangent
    """
    raise TypeError("sb3_trpo_ext.common.kernels.tanh runs only inside Numba-compiled functions")


@overload(tanh)
def _tanh_for(x):  # type: ignore[no-untyped-def]
    if not (isinstance(x, types.Float) and x.bitwidth == 32):
        return lambda x: math.tanh(x)
    clamp = np.float32(_CLAMP)
    p0, p1, p2, p3, p4, p5, p6 = (np.float32(c) for c in _P)
    q0, q1, q2, q3 = (np.float32(c) for c in _Q)

    def rational(x):  # type: ignore[no-untyped-def]
        x = min(max(x, -clamp), clamp)
        x2 = x * x
        p = ((((((p0 * x2 + p1) * x2 + p2) * x2 + p3) * x2 + p4) * x2 + p5) * x2 + p6) * x
        q = ((q0 * x2 + q1) * x2 + q2) * x2 + q3
        return p / q

    return rational


@numba.njit(cache=True, nogil=True, error_model="numpy")
def tanh_array(values: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """
    :func:`tanh` of every element, for tests and measurements.

    :param values: Input array
    :param out: Output array of the same shape and dtype
    """
    flat_in, flat_out = values.reshape(-1), out.reshape(-1)
    for k in range(flat_in.size):
        flat_out[k] = tanh(flat_in[k])


def _one(array: np.ndarray) -> float:
    """1 in the dtype of ``array`` (compiled code only): a bare ``1`` would promote float32 arithmetic to float64."""
    raise TypeError("sb3_trpo_ext.common.kernels._one runs only inside Numba-compiled functions")


@overload(_one)
def _one_for(array):  # type: ignore[no-untyped-def]
    one = as_dtype(array.dtype).type(1)
    return lambda array: one


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _activate(values: np.ndarray, slopes: np.ndarray, activation: int) -> None:  # pragma: no cover - compiled
    # In place, with the activation's derivative at each point.
    one = _one(values)
    for k in range(values.size):
        if activation == TANH:
            t = tanh(values[k])
            values[k] = t
            slopes[k] = one - t * t
        elif activation == RELU:
            positive = values[k] > 0
            values[k] = values[k] if positive else 0
            slopes[k] = one if positive else 0


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _multiply(values: np.ndarray, factors: np.ndarray) -> None:  # pragma: no cover - compiled
    for k in range(values.size):
        values[k] *= factors[k]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _multiply_into(values: np.ndarray, factors: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    for k in range(values.size):
        out[k] = values[k] * factors[k]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _add(values: np.ndarray, terms: np.ndarray) -> None:  # pragma: no cover - compiled
    for k in range(values.size):
        values[k] += terms[k]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _adam_step(
    weights: np.ndarray,
    gradient: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    scalars: np.ndarray,
) -> None:  # pragma: no cover - compiled
    # torch.optim.Adam's single-tensor formulas. The scalars come in the weights' dtype, so that float32 weights
    # are updated in float32 arithmetic, as torch does, and LLVM vectorises eight at a time.
    step_size, sqrt_correction, beta2, eps, weight_decay, one_minus_beta1, one_minus_beta2 = scalars
    for k in range(weights.size):
        g = gradient[k] + weight_decay * weights[k]
        m = exp_avg[k] + one_minus_beta1 * (g - exp_avg[k])
        v = beta2 * exp_avg_sq[k] + one_minus_beta2 * g * g
        exp_avg[k], exp_avg_sq[k] = m, v
        weights[k] -= step_size * m / (np.sqrt(v) / sqrt_correction + eps)


# ----------------------------------------------------------------------------------------------------------------
# A chain of dense layers: forward pass, Jacobian-vector and vector-Jacobian products
# ----------------------------------------------------------------------------------------------------------------
# The layout is sb3_trpo_ext.common.mlp.BoundChain's: activations feature-major, (features, batch), each layer's
# weights one [W | b] block, row-major, the blocks one after the other in one flat vector. A workspace holds, per
# layer and for one batch size: the output with a row of ones under it (the next layer's bias input), the
# activation's derivative there, the derivative w.r.t. the layer's input with a spare row (the product with
# [W | b]^T fills it: both operands stay contiguous), the forward-mode derivative of the output with a row of zeros
# under it (so that [W | b] times it is W times it), and a scratch array of the output's shape.


@numba.njit(cache=True, nogil=True)
def _matmul(gemm, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:  # type: ignore[no-untyped-def] # pragma: no cover
    # out = a @ b for row-major (C-contiguous) or transposed (F-contiguous) a and b, into row-major out
    m, k, n = a.shape[0], a.shape[1], b.shape[1]
    trans_a = _NO_TRANS if a.flags.c_contiguous else _TRANS
    trans_b = _NO_TRANS if b.flags.c_contiguous else _TRANS
    lda = max(1, k if trans_a == _NO_TRANS else m)
    ldb = max(1, n if trans_b == _NO_TRANS else k)
    one = _one(out)
    zero = one - one
    gemm(_ROW_MAJOR, trans_a, trans_b, m, n, k, one, a.ctypes.data, lda, b.ctypes.data, ldb, zero, out.ctypes.data, max(1, n))


@numba.njit(cache=True, nogil=True)
def _offsets(shapes: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    offsets = np.zeros(shapes.shape[0] + 1, np.int64)
    for layer in range(shapes.shape[0]):
        offsets[layer + 1] = offsets[layer] + shapes[layer, 0] * (shapes[layer, 1] + 1)
    return offsets


@numba.njit(cache=True, nogil=True)
def _block(flat: np.ndarray, shapes: np.ndarray, offsets: np.ndarray, layer: int) -> np.ndarray:  # pragma: no cover
    return flat[offsets[layer] : offsets[layer + 1]].reshape(shapes[layer, 0], shapes[layer, 1] + 1)


@numba.njit(cache=True, nogil=True)
def workspace_size(shapes: np.ndarray, batch: int) -> int:  # pragma: no cover - compiled
    """
    :param shapes: ``(out_features, in_features)`` per layer
    :param batch: Samples per batch
    :return: Numbers a workspace for this chain and batch size holds
    """
    size = 0
    for layer in range(shapes.shape[0]):
        n_out, n_in = shapes[layer, 0], shapes[layer, 1]
        size += ((n_out + 1) + n_out + (n_in + 1) + (n_out + 1) + n_out) * batch
    return size


@numba.njit(cache=True, nogil=True)
def _views(workspace: np.ndarray, shapes: np.ndarray, batch: int) -> tuple:  # pragma: no cover - compiled
    outputs = []
    slopes = []
    below = []
    derivatives = []
    scratch = []
    offset = 0
    for layer in range(shapes.shape[0]):
        n_out, n_in = shapes[layer, 0], shapes[layer, 1]
        outputs.append(workspace[offset : offset + (n_out + 1) * batch].reshape(n_out + 1, batch))
        offset += (n_out + 1) * batch
        slopes.append(workspace[offset : offset + n_out * batch].reshape(n_out, batch))
        offset += n_out * batch
        below.append(workspace[offset : offset + (n_in + 1) * batch].reshape(n_in + 1, batch))
        offset += (n_in + 1) * batch
        derivatives.append(workspace[offset : offset + (n_out + 1) * batch].reshape(n_out + 1, batch))
        offset += (n_out + 1) * batch
        scratch.append(workspace[offset : offset + n_out * batch].reshape(n_out, batch))
        offset += n_out * batch
    return outputs, slopes, below, derivatives, scratch


@numba.njit(cache=True, nogil=True)
def new_workspace(weights: np.ndarray, shapes: np.ndarray, batch: int) -> np.ndarray:  # pragma: no cover - compiled
    """
    :param weights: The chain's flat weights (gives the dtype)
    :param shapes: ``(out_features, in_features)`` per layer
    :param batch: Samples per batch
    :return: A workspace for :func:`chain_forward`, :func:`chain_jvp` and :func:`chain_vjp`
    """
    workspace = np.empty(workspace_size(shapes, batch), weights.dtype)
    outputs, _, _, derivatives, _ = _views(workspace, shapes, batch)
    for layer in range(shapes.shape[0]):
        outputs[layer][shapes[layer, 0]] = 1
        derivatives[layer][shapes[layer, 0]] = 0
    return workspace


@numba.njit(cache=True, nogil=True)
def chain_results(workspace: np.ndarray, shapes: np.ndarray, batch: int) -> tuple:  # pragma: no cover - compiled
    """
    :return: Views of where :func:`chain_forward` writes the chain's output and :func:`chain_jvp` its derivative,
        each ``(out_features, batch)``
    """
    outputs, _, _, derivatives, _ = _views(workspace, shapes, batch)
    last, n_out = shapes.shape[0] - 1, shapes[-1, 0]
    return outputs[last][:n_out], derivatives[last][:n_out]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def chain_forward(  # type: ignore[no-untyped-def] # pragma: no cover - compiled
    gemm, weights: np.ndarray, shapes: np.ndarray, activations: np.ndarray, inputs: np.ndarray, workspace: np.ndarray
) -> None:
    """
    Evaluate the chain into the workspace (its output: :func:`chain_results`).

    :param gemm: :func:`gemm_for` the weights' dtype
    :param weights: Flat weights, ``[W | b]`` blocks
    :param shapes: ``(out_features, in_features)`` per layer
    :param activations: Per layer, ``IDENTITY``, ``TANH`` or ``RELU``
    :param inputs: ``(in_features + 1, batch)``, ones in the last row
    :param workspace: From :func:`new_workspace` for this batch size
    """
    offsets, batch = _offsets(shapes), inputs.shape[1]
    outputs, slopes, _, _, _ = _views(workspace, shapes, batch)
    layer_input = inputs
    for layer in range(shapes.shape[0]):
        value = outputs[layer][: shapes[layer, 0]]
        _matmul(gemm, _block(weights, shapes, offsets, layer), layer_input, value)
        if activations[layer] != IDENTITY:
            _activate(value.reshape(-1), slopes[layer].reshape(-1), activations[layer])
        layer_input = outputs[layer]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def chain_jvp(  # type: ignore[no-untyped-def] # pragma: no cover - compiled
    gemm,
    weights: np.ndarray,
    shapes: np.ndarray,
    activations: np.ndarray,
    inputs: np.ndarray,
    workspace: np.ndarray,
    tangent: np.ndarray,
) -> None:
    """
    Derivative of the output of the last :func:`chain_forward` when the weights move along ``tangent`` (the inputs
    held fixed), into the workspace (:func:`chain_results`): ``d(W h + b) = [dW | db] [h; 1] + W dh``, layer by
    layer.

    :param tangent: Flat, in the weights' layout; the other arguments as :func:`chain_forward`'s
    """
    offsets, batch = _offsets(shapes), inputs.shape[1]
    outputs, slopes, _, derivatives, scratch = _views(workspace, shapes, batch)
    layer_input = inputs
    for layer in range(shapes.shape[0]):
        n_out = shapes[layer, 0]
        derivative = derivatives[layer][:n_out]
        _matmul(gemm, _block(tangent, shapes, offsets, layer), layer_input, derivative)
        if layer > 0:
            _matmul(gemm, _block(weights, shapes, offsets, layer), derivatives[layer - 1], scratch[layer])
            _add(derivative.reshape(-1), scratch[layer].reshape(-1))
        if activations[layer] != IDENTITY:
            _multiply(derivative.reshape(-1), slopes[layer].reshape(-1))
        layer_input = outputs[layer]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def chain_vjp(  # type: ignore[no-untyped-def] # pragma: no cover - compiled
    gemm,
    weights: np.ndarray,
    shapes: np.ndarray,
    activations: np.ndarray,
    inputs: np.ndarray,
    workspace: np.ndarray,
    upstream: np.ndarray,
    gradient: np.ndarray,
) -> None:
    """
    Gradient of ``sum(upstream * output)`` w.r.t. the weights at the last :func:`chain_forward`.

    :param upstream: Derivative w.r.t. the chain's output, ``(out_features, batch)``, C-contiguous (not modified)
    :param gradient: Receives the gradient, flat, in the weights' layout; the other arguments as
        :func:`chain_forward`'s
    """
    offsets, batch = _offsets(shapes), inputs.shape[1]
    outputs, slopes, below, _, scratch = _views(workspace, shapes, batch)
    delta = upstream
    for layer in range(shapes.shape[0] - 1, -1, -1):
        if activations[layer] != IDENTITY:
            _multiply_into(delta.reshape(-1), slopes[layer].reshape(-1), scratch[layer].reshape(-1))
            delta = scratch[layer]
        layer_input = inputs if layer == 0 else outputs[layer - 1]
        _matmul(gemm, delta, layer_input.T, _block(gradient, shapes, offsets, layer))
        if layer > 0:
            _matmul(gemm, _block(weights, shapes, offsets, layer).T, delta, below[layer])
            delta = below[layer][: shapes[layer, 1]]


# ----------------------------------------------------------------------------------------------------------------
# The critic regression
# ----------------------------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True, error_model="numpy")
def regress_chain(  # type: ignore[no-untyped-def] # pragma: no cover - compiled; tested against autograd
    gemm,
    weights: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    shapes: np.ndarray,
    activations: np.ndarray,
    inputs: np.ndarray,
    targets: np.ndarray,
    permutations: np.ndarray,
    batch_size: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    steps_taken: int,
    errors: np.ndarray,
) -> None:
    """
    Adam on the mean squared error of the chain, minibatch by minibatch, in place: what ``regress_mlp`` specifies.

    :param gemm: :func:`gemm_for` the weights' dtype
    :param weights: Flat weights, ``[W | b]`` blocks (updated)
    :param exp_avg: Adam's first moment, same layout (updated)
    :param exp_avg_sq: Adam's second moment (updated)
    :param shapes: ``(out_features, in_features)`` per layer, int64; the last layer has one output
    :param activations: Per layer, ``IDENTITY``, ``TANH`` or ``RELU``
    :param inputs: ``(n, in_features)`` samples
    :param targets: ``(n,)`` regression targets
    :param permutations: ``(n_epochs, n)`` int64: each epoch's sample order; minibatches are its consecutive
        ``batch_size`` slices, the last one shorter when ``batch_size`` does not divide ``n``
    :param batch_size: Minibatch size
    :param lr: Adam's learning rate
    :param beta1: Adam's first-moment decay
    :param beta2: Adam's second-moment decay
    :param eps: Adam's denominator term, added after the square root
    :param weight_decay: L2 penalty added to the gradient
    :param steps_taken: Adam steps taken before this call (the bias corrections continue from there)
    :param errors: ``(n_epochs, n)``: receives prediction minus target, in minibatch order
    """
    n, n_features = inputs.shape
    gradient = np.empty_like(weights)
    # torch computes the bias corrections in float64 and the update in the weights' dtype: scalars in that dtype
    scalars = np.array([0.0, 0.0, beta2, eps, weight_decay, 1 - beta1, 1 - beta2]).astype(weights.dtype)
    step = steps_taken
    batch = -1
    for epoch in range(permutations.shape[0]):
        order = permutations[epoch]
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            if m != batch:  # first minibatch, or the shorter last one
                batch = m
                workspace = new_workspace(weights, shapes, m)
                features = np.empty((n_features + 1, m), weights.dtype)
                features[n_features] = 1
                prediction = chain_results(workspace, shapes, m)[0][0]
                upstream = np.empty((1, m), weights.dtype)
            # gathered feature-major: every product then reads contiguous memory
            for k in range(m):
                row = order[start + k]
                for j in range(n_features):
                    features[j, k] = inputs[row, j]
            chain_forward(gemm, weights, shapes, activations, features, workspace)
            for k in range(m):  # derivative of the minibatch's mean squared error w.r.t. the predictions
                error = prediction[k] - targets[order[start + k]]
                errors[epoch, start + k] = error
                upstream[0, k] = error * 2 / m
            chain_vjp(gemm, weights, shapes, activations, features, workspace, upstream, gradient)
            step += 1
            scalars[0] = lr / (1 - beta1**step)
            scalars[1] = math.sqrt(1 - beta2**step)
            _adam_step(weights, gradient, exp_avg, exp_avg_sq, scalars)
