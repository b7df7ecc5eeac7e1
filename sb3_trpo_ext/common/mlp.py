"""
Multilayer perceptrons differentiated by hand.

SB3's standard actor and critic heads are chains of ``nn.Linear`` layers with elementwise activations. Their
derivatives are a few matrix products each, which autograd computes too, but with a graph, module calls and
per-tensor bookkeeping that cost more than the arithmetic at the sizes of the critic's minibatch steps (hundreds
per update, at batch sizes around 128). :class:`LinearChain` evaluates such a chain on explicit weight tensors
and gives its vector-Jacobian product in closed form.
"""

from collections.abc import Callable, Sequence

import torch as th
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import MlpExtractor
from torch import nn

# Supported activations: the function, and the chain rule through it given the incoming derivative and the
# activation's output y (so no pre-activation needs keeping): tanh' = 1 - y^2, relu' = [y > 0]. The aten kernels
# are the ones autograd itself runs for these derivatives, one operator each.
_ACTIVATIONS: dict[type[nn.Module], tuple[Callable | None, Callable | None]] = {
    nn.Tanh: (th.tanh, th.ops.aten.tanh_backward),
    nn.ReLU: (th.relu, lambda d, y: th.ops.aten.threshold_backward(d, y, 0)),
}


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
    ``x -> a_L(W_L ... a_1(W_1 x + b_1) ... + b_L)`` on given weight tensors.

    The weights are passed explicitly (``[W_1, b_1, W_2, b_2, ...]``, e.g. views of one flat vector) so that
    callers can update them in place or evaluate derivatives at fixed values.

    :param linears: The layers
    :param activations: The activation after each layer (``None``: none), of a type in ``_ACTIVATIONS``
    """

    def __init__(self, linears: Sequence[nn.Linear], activations: Sequence[nn.Module | None]):
        self.parameters: list[th.Tensor] = [p for linear in linears for p in (linear.weight, linear.bias)]
        self.activations = [(None, None) if a is None else _ACTIVATIONS[type(a)] for a in activations]

    def forward(self, weights: Sequence[th.Tensor], x: th.Tensor) -> list[th.Tensor]:
        """
        :param weights: ``[W_1, b_1, ...]``
        :param x: Input batch
        :return: The input and every layer's output (after its activation); the last one is the chain's output
        """
        outputs = [x]
        for i, (activation, _) in enumerate(self.activations):
            h = th.addmm(weights[2 * i + 1], outputs[-1], weights[2 * i].T)
            outputs.append(h if activation is None else activation(h))
        return outputs

    def vjp(
        self, weights: Sequence[th.Tensor], outputs: Sequence[th.Tensor], upstream: th.Tensor, out: Sequence[th.Tensor]
    ) -> None:
        """
        Gradient of ``sum(upstream * chain(x))`` w.r.t. the weights, written into ``out``.

        :param weights: ``[W_1, b_1, ...]``
        :param outputs: :meth:`forward`'s result at these weights
        :param upstream: Derivative w.r.t. the chain's output
        :param out: Tensors shaped like ``weights`` that receive the gradient
        """
        for i in range(len(self.activations) - 1, -1, -1):
            backward = self.activations[i][1]
            if backward is not None:
                upstream = backward(upstream, outputs[i + 1])
            th.mm(upstream.T, outputs[i], out=out[2 * i])
            th.sum(upstream, dim=0, out=out[2 * i + 1])
            if i > 0:
                upstream = upstream @ weights[2 * i]


def critic_chain(policy: ActorCriticPolicy) -> LinearChain | None:
    """
    The map from the policy's critic features to its value as a chain, when the policy computes values with SB3's
    own ``predict_values`` and ``MlpExtractor``.

    :param policy: The policy
    :return: The chain ``mlp_extractor.value_net`` then ``value_net``, or ``None``
    """
    standard = type(policy).predict_values is ActorCriticPolicy.predict_values
    if not standard or type(policy.mlp_extractor) is not MlpExtractor:
        return None
    return linear_chain([policy.mlp_extractor.value_net, policy.value_net])
