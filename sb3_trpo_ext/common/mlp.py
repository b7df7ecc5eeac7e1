"""
Multilayer perceptrons differentiated by hand.

SB3's standard actor and critic heads are chains of ``nn.Linear`` layers with elementwise activations. Their
derivatives are a few matrix products each, which autograd computes too, but with a graph, module calls and
per-tensor bookkeeping that cost more than the arithmetic at the sizes of the critic's minibatch steps (hundreds
per update, at batch sizes around 128) and of the conjugate gradient's Fisher-vector products (one forward-mode
and one backward pass each). :class:`LinearChain` describes such a chain; :meth:`LinearChain.bind` evaluates it at
given weights, with its Jacobian-vector and vector-Jacobian products in closed form.

The evaluation is laid out so that each layer costs one matrix product and nothing else: activations are
feature-major, ``(features, batch)``, with a row of ones appended to every layer's input, and each layer's weights
are one ``[W | b]`` block. The bias is then part of the product, and so is its gradient (no bias sums or
broadcasts), and every result is written into memory allocated once. Two implementations share that layout:
:class:`CompiledChain`, for float32 and float64 CPU tensors, calls the loops of :mod:`sb3_trpo_ext.common.kernels`
(compiled by Numba), one call per pass; :class:`BoundChain` writes the passes as array-library calls, NumPy on views
of CPU tensors of other dtypes, torch on other devices. At these sizes a NumPy operator costs a fraction of a torch
one, and a compiled pass a fraction of its NumPy calls (README, "Speed").
"""

import functools
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import threadpoolctl
import torch as th
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import MlpExtractor
from torch import nn

from sb3_trpo_ext.common import kernels

# A NumPy array for CPU tensors, the torch tensor itself elsewhere (see array_view)
Array = Any

# The activations a chain may hold (the derivative of each is known from its output alone)
_ACTIVATIONS = (nn.Tanh, nn.ReLU)


def array_view(tensor: th.Tensor) -> Array:
    """
    What :class:`BoundChain` computes on: a NumPy view of a CPU tensor (the same memory, so writes go through), the
    tensor itself on other devices.

    :param tensor: A tensor (detached here)
    :return: The array
    """
    tensor = tensor.detach()
    return tensor.numpy() if tensor.device.type == "cpu" else tensor


@functools.cache
def _thread_pools() -> threadpoolctl.ThreadpoolController:
    # Inspecting the loaded libraries takes about half a millisecond: once per process (NumPy's BLAS is loaded by
    # the time anything here runs).
    return threadpoolctl.ThreadpoolController()


def single_threaded_blas() -> AbstractContextManager:
    """
    Within the block, the BLAS libraries loaded by the time it first runs (NumPy's OpenBLAS and the one
    :mod:`sb3_trpo_ext.common.kernels` calls among them) run on one thread; the previous setting is restored on exit.
    The products here are too small to gain from more, and OpenBLAS's own worker threads
    fight torch's OpenMP workers, which spin between torch operations: on 2 cores with torch on 2 threads, a
    HalfCheetah ``train()`` took 2.8 s with OpenBLAS on 2 threads and 73 ms with it on one (78 ms with both on
    one). With torch on one thread, OpenBLAS's second thread made identical products vary 1x-2.5x in time.

    :return: The context manager
    """
    return _thread_pools().limit(limits=1, user_api="blas")


def array_module(array: Array) -> Any:
    """``numpy`` or ``torch``: the library whose functions (``matmul``, ``multiply``, ``tanh``, ...) take ``array``."""
    return np if isinstance(array, np.ndarray) else th


def empty_like_array(array: Array, shape: tuple[int, ...]) -> Array:
    """An uninitialised array of ``shape`` with the dtype (and device) of ``array``."""
    if isinstance(array, np.ndarray):
        return np.empty(shape, dtype=array.dtype)
    return th.empty(shape, dtype=array.dtype, device=array.device)


def with_ones_row(inputs: th.Tensor) -> th.Tensor:
    """
    A batch of chain inputs, ``(batch, features)``, as :meth:`BoundChain.forward` takes it: feature-major, with a row
    of ones under the features (the first layer's bias input).

    :param inputs: The batch
    :return: Tensor of shape ``(features + 1, batch)``
    """
    ones = th.ones(1, inputs.shape[0], dtype=inputs.dtype, device=inputs.device)
    return th.cat([inputs.detach().T, ones])


def linear_layers(
    modules: Sequence[nn.Module], is_activation: Callable[[nn.Module], bool]
) -> list[tuple[nn.Linear, nn.Module | None]] | None:
    """
    Parse modules applied in order as ``Linear`` layers (with bias), each followed by at most one activation.
    ``nn.Sequential`` containers are expanded and ``nn.Identity`` is skipped.

    :param modules: The modules
    :param is_activation: Which modules count as an activation
    :return: ``(layer, activation after it or None)`` pairs, or ``None`` if the modules hold anything else
    """
    layers: list[tuple[nn.Linear, nn.Module | None]] = []
    for module in modules:
        for child in list(module) if isinstance(module, nn.Sequential) else [module]:
            if type(child) is nn.Linear and child.bias is not None:
                layers.append((child, None))
            elif type(child) is nn.Identity:
                continue
            elif is_activation(child) and layers and layers[-1][1] is None:
                layers[-1] = (layers[-1][0], child)
            else:
                return None
    return layers


def linear_chain(modules: Sequence[nn.Module]) -> "LinearChain | None":
    """
    The modules as a :class:`LinearChain`: ``Linear`` layers (with bias), each followed by at most one supported
    activation.

    :param modules: Modules applied in order (``nn.Sequential`` containers are expanded)
    :return: The chain, or ``None`` if the modules hold anything else
    """
    layers = linear_layers(modules, lambda module: type(module) in _ACTIVATIONS)
    if not layers:
        return None
    return LinearChain([linear for linear, _ in layers], [activation for _, activation in layers])


class LinearChain:
    """
    The structure of ``x -> a_L(W_L ... a_1(W_1 x + b_1) ... + b_L)``: its parameters, layer shapes and activations.
    Evaluate it at given weights with :meth:`bind`.

    :param linears: The layers
    :param activations: The activation after each layer (``None``: none), ``nn.Tanh`` or ``nn.ReLU``
    """

    def __init__(self, linears: Sequence[nn.Linear], activations: Sequence[nn.Module | None]):
        self.parameters: list[th.Tensor] = [p for linear in linears for p in (linear.weight, linear.bias)]
        self.shapes = [(linear.out_features, linear.in_features) for linear in linears]
        self.activations = [None if a is None else type(a) for a in activations]

    def augmented_order(self) -> th.Tensor:
        """
        The augmented layout of the weights that :class:`BoundChain` uses: layer by layer, the ``[W | b]`` block in
        row-major order, as indices into ``[W_1, b_1, W_2, b_2, ...]`` flattened (the parameters' own layout).

        :return: ``order`` such that ``flat[order]`` is ``flat`` in the augmented layout
        """
        index = th.arange(sum(p.numel() for p in self.parameters))
        blocks, offset = [], 0
        for out_features, in_features in self.shapes:
            weight = index[offset : offset + out_features * in_features].view(out_features, in_features)
            offset += out_features * in_features
            bias = index[offset : offset + out_features]
            offset += out_features
            blocks.append(th.cat([weight, bias[:, None]], dim=1).reshape(-1))
        return th.cat(blocks)

    def blocks(self, flat: Array) -> list[Array]:
        """
        :param flat: A flat array in the augmented layout (weights, a tangent, a gradient)
        :return: Its ``[W | b]`` block of every layer, as views
        """
        views, offset = [], 0
        for out_features, in_features in self.shapes:
            size = out_features * (in_features + 1)
            views.append(flat[offset : offset + size].reshape(out_features, in_features + 1))
            offset += size
        return views

    def bind(self, weights: th.Tensor, batch_size: int) -> "BoundChain | CompiledChain":
        """
        :param weights: All weights as one flat vector in the augmented layout (:meth:`augmented_order`); held by
            reference, so later calls see in-place updates
        :param batch_size: The number of samples of every batch it will evaluate
        :return: The chain at these weights: compiled for float32 and float64 CPU tensors, array-library calls
            otherwise (same methods, same results to rounding)
        """
        if CompiledChain.runs_on(weights):
            return CompiledChain(self, weights, batch_size)
        return BoundChain(self, weights, batch_size)

    @property
    def activation_codes(self) -> np.ndarray:
        """The activations as :mod:`sb3_trpo_ext.common.kernels` numbers them."""
        codes: dict[type[nn.Module] | None, int] = {None: kernels.IDENTITY, nn.Tanh: kernels.TANH, nn.ReLU: kernels.RELU}
        return np.array([codes[activation] for activation in self.activations], dtype=np.int64)


class BoundChain:
    """
    A :class:`LinearChain` at given weights, on batches of a fixed size: forward pass and closed-form derivatives
    w.r.t. the weights, all feature-major (see the module's docstring). Results are written into memory allocated
    here, which the next call overwrites.

    :param chain: The structure
    :param weights: Flat weights in the augmented layout
    :param batch_size: Samples per batch
    """

    def __init__(self, chain: LinearChain, weights: th.Tensor, batch_size: int):
        flat = array_view(weights)
        self.chain = chain
        self.xp = array_module(flat)
        self.activations = chain.activations
        self.weights = chain.blocks(flat)
        # W of every layer without its bias column, and W^T: views made once, since jvp and vjp multiply by them
        self.linear = [block[:, :-1] for block in self.weights]
        self.transposed = [weight.T for weight in self.linear]
        # Per layer: its output with a row of ones under it (the next layer's bias input), the activation's
        # derivative there, and a buffer for the derivative w.r.t. the layer's output (jvp and vjp).
        self.outputs: list[Array] = []
        self.slopes: list[Array | None] = []
        self.deltas: list[Array] = []
        for (out_features, _), activation in zip(chain.shapes, self.activations, strict=True):
            output = empty_like_array(flat, (out_features + 1, batch_size))
            output[-1] = 1
            self.outputs.append(output)
            self.slopes.append(None if activation is None else empty_like_array(flat, (out_features, batch_size)))
            self.deltas.append(empty_like_array(flat, (out_features, batch_size)))
        self.one, self.zero = empty_like_array(flat, ()), empty_like_array(flat, ())
        self.one[...], self.zero[...] = 1, 0
        self.layer_inputs: list[Array] = []

    def forward(self, inputs: Array) -> Array:
        """
        Evaluate the chain; :meth:`jvp` and :meth:`vjp` then differentiate it at this point.

        :param inputs: ``(in_features + 1, batch)``, ones in the last row (:func:`with_ones_row`); held by reference
        :return: The chain's output, ``(out_features, batch)``
        """
        xp, layer_input = self.xp, inputs
        for weight, activation, output, slope in zip(self.weights, self.activations, self.outputs, self.slopes, strict=True):
            value = output[:-1]
            xp.matmul(weight, layer_input, out=value)
            if activation is nn.Tanh:
                xp.tanh(value, out=value)
                xp.multiply(value, value, out=slope)
                xp.subtract(self.one, slope, out=slope)  # tanh' = 1 - tanh^2
            elif activation is nn.ReLU:
                xp.maximum(value, self.zero, out=value)
                xp.greater(value, self.zero, out=slope)
            layer_input = output
        self.layer_inputs = [inputs, *self.outputs[:-1]]
        return self.outputs[-1][:-1]

    def jvp(self, tangent: Array) -> Array:
        """
        Derivative of the output of the last :meth:`forward` when the weights move along ``tangent`` (the inputs
        held fixed): ``d(W h + b) = [dW | db] [h; 1] + W dh`` layer by layer.

        :param tangent: Flat, in the augmented layout
        :return: ``(out_features, batch)``
        """
        xp, derivative = self.xp, None
        for i, (tangent_block, layer_input) in enumerate(zip(self.chain.blocks(tangent), self.layer_inputs, strict=True)):
            delta, slope = self.deltas[i], self.slopes[i]
            xp.matmul(tangent_block, layer_input, out=delta)
            if derivative is not None:
                delta += xp.matmul(self.linear[i], derivative)
            if slope is not None:
                delta *= slope  # the activations act elementwise: their Jacobian is this diagonal
            derivative = delta
        assert derivative is not None  # a chain has at least one layer
        return derivative

    def vjp(self, upstream: Array, gradient: Array) -> None:
        """
        Gradient of ``sum(upstream * output)`` w.r.t. the weights at the last :meth:`forward`.

        :param upstream: Derivative w.r.t. the chain's output, ``(out_features, batch)`` (not modified)
        :param gradient: Receives the gradient, flat, in the augmented layout
        """
        xp, layer_inputs, gradients = self.xp, self.layer_inputs, self.chain.blocks(gradient)
        for i in range(len(self.weights) - 1, -1, -1):
            slope, delta = self.slopes[i], self.deltas[i]
            if slope is not None:
                xp.multiply(upstream, slope, out=delta)
                upstream = delta
            xp.matmul(upstream, layer_inputs[i].T, out=gradients[i])
            if i > 0:
                below = self.deltas[i - 1]
                if len(self.weights[i]) == 1:
                    # one output unit: W^T upstream is an outer product, which a broadcast multiply computes at a
                    # fraction of a matrix product's cost
                    xp.multiply(self.transposed[i], upstream, out=below)
                else:
                    xp.matmul(self.transposed[i], upstream, out=below)
                upstream = below


class CompiledChain:
    """
    :class:`BoundChain`'s methods for float32 and float64 CPU tensors, each one call of a function compiled by Numba
    (:mod:`sb3_trpo_ext.common.kernels`) instead of a few array-library calls per layer.

    :param chain: The structure
    :param weights: Flat weights in the augmented layout (a CPU tensor)
    :param batch_size: Samples per batch
    """

    def __init__(self, chain: LinearChain, weights: th.Tensor, batch_size: int):
        self.weights = array_view(weights)
        self.shapes = np.array(chain.shapes, dtype=np.int64)
        self.activations = chain.activation_codes
        self.gemm = kernels.gemm_for(self.weights.dtype)
        self.workspace = kernels.new_workspace(self.weights, self.shapes, batch_size)
        self.output, self.derivative = kernels.chain_results(self.workspace, self.shapes, batch_size)
        self.inputs = self.workspace[:0].reshape(0, batch_size)

    @staticmethod
    def runs_on(weights: th.Tensor) -> bool:
        """Whether the compiled functions take these weights: a float32 or float64 CPU tensor, viewed by NumPy."""
        return isinstance(array_view(weights), np.ndarray) and weights.dtype in (th.float32, th.float64)

    def forward(self, inputs: Array) -> Array:
        """As :meth:`BoundChain.forward`."""
        self.inputs = np.ascontiguousarray(inputs, dtype=self.weights.dtype)
        kernels.chain_forward(self.gemm, self.weights, self.shapes, self.activations, self.inputs, self.workspace)
        return self.output

    def jvp(self, tangent: Array) -> Array:
        """As :meth:`BoundChain.jvp`."""
        kernels.chain_jvp(self.gemm, self.weights, self.shapes, self.activations, self.inputs, self.workspace, tangent)
        return self.derivative

    def vjp(self, upstream: Array, gradient: Array) -> None:
        """As :meth:`BoundChain.vjp`."""
        upstream = np.ascontiguousarray(upstream, dtype=self.weights.dtype)
        kernels.chain_vjp(
            self.gemm, self.weights, self.shapes, self.activations, self.inputs, self.workspace, upstream, gradient
        )


# Policy classes whose own methods compute the action distribution (the maskable one then applies the masks) and
# the value from an ``MlpExtractor``'s two chains and the ``action_net``/``value_net`` heads.
_STANDARD_POLICIES = (ActorCriticPolicy, MaskableActorCriticPolicy)


def uses_standard_methods(policy: ActorCriticPolicy | MaskableActorCriticPolicy, names: Sequence[str]) -> bool:
    """
    Whether the policy's class keeps the methods ``names`` of SB3's ``ActorCriticPolicy`` or sb3-contrib's
    ``MaskableActorCriticPolicy`` (whichever it derives from), so that what they compute is known.

    :param policy: The policy
    :param names: Method names
    :return: ``True`` when none of them is overridden
    """
    cls = type(policy)
    return any(
        isinstance(policy, base) and all(getattr(cls, name) is getattr(base, name) for name in names)
        for base in _STANDARD_POLICIES
    )


def actor_chain(policy: ActorCriticPolicy | MaskableActorCriticPolicy) -> LinearChain | None:
    """
    The map from the policy's actor features to its action-distribution head (mean or logits) as a chain, when the
    policy computes its distribution with SB3's (or the maskable policy's) own ``get_distribution`` and
    ``MlpExtractor``.

    :param policy: The policy
    :return: The chain ``mlp_extractor.policy_net`` then ``action_net``, or ``None``
    """
    standard = uses_standard_methods(policy, ("get_distribution", "extract_features", "_get_action_dist_from_latent"))
    if not standard or type(policy.mlp_extractor) is not MlpExtractor:
        return None
    return linear_chain([policy.mlp_extractor.policy_net, policy.action_net])


def critic_chain(policy: ActorCriticPolicy | MaskableActorCriticPolicy) -> LinearChain | None:
    """
    The map from the policy's critic features to its value as a chain, when the policy computes values with SB3's
    (or the maskable policy's) own ``predict_values`` and ``MlpExtractor``.

    :param policy: The policy
    :return: The chain ``mlp_extractor.value_net`` then ``value_net``, or ``None``
    """
    if not uses_standard_methods(policy, ("predict_values",)) or type(policy.mlp_extractor) is not MlpExtractor:
        return None
    return linear_chain([policy.mlp_extractor.value_net, policy.value_net])
