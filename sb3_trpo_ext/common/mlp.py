"""
Multilayer perceptrons differentiated by hand.

SB3's standard actor and critic heads are chains of ``nn.Linear`` layers with elementwise activations. Their
derivatives are a few matrix products each, which autograd computes too, but with a graph, module calls and
per-tensor bookkeeping that cost more than the arithmetic at the sizes of the critic's minibatch steps (hundreds
per update, at batch sizes around 128) and of the conjugate gradient's Fisher-vector products (one forward-mode
and one backward pass each). :class:`LinearChain` evaluates such a chain on explicit weight tensors and gives its
Jacobian-vector and vector-Jacobian products in closed form.
"""

from collections.abc import Callable, Sequence

import torch as th
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
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
    The structure of ``x -> a_L(W_L ... a_1(W_1 x + b_1) ... + b_L)``: its parameters and activations. Evaluate
    it on explicit weight tensors with :meth:`at`.

    :param linears: The layers
    :param activations: The activation after each layer (``None``: none), of a type in ``_ACTIVATIONS``
    """

    def __init__(self, linears: Sequence[nn.Linear], activations: Sequence[nn.Module | None]):
        self.parameters: list[th.Tensor] = [p for linear in linears for p in (linear.weight, linear.bias)]
        self.activations = [(None, None) if a is None else _ACTIVATIONS[type(a)] for a in activations]

    def at(self, weights: Sequence[th.Tensor]) -> "BoundChain":
        """
        :param weights: ``[W_1, b_1, ...]`` (e.g. views of one flat vector, updated in place by the caller)
        :return: The chain evaluated at these weights
        """
        return BoundChain(self, weights)


class BoundChain:
    """
    A :class:`LinearChain` at given weights: forward pass and closed-form derivatives w.r.t. the weights. The
    weights are held by reference, so in-place updates of them are seen by later calls.

    :param chain: The structure
    :param weights: ``[W_1, b_1, ...]``
    """

    def __init__(self, chain: LinearChain, weights: Sequence[th.Tensor]):
        # Per layer: W, W^T (a view, made once: these methods run hundreds of times per update), b, activation and
        # its backward rule.
        self.layers = [
            (weights[2 * i], weights[2 * i].T, weights[2 * i + 1], activation, backward)
            for i, (activation, backward) in enumerate(chain.activations)
        ]

    def forward(self, x: th.Tensor) -> list[th.Tensor]:
        """
        :param x: Input batch
        :return: The input and every layer's output (after its activation); the last one is the chain's output
        """
        outputs = [x]
        for _, weight_t, bias, activation, _ in self.layers:
            h = th.addmm(bias, outputs[-1], weight_t)
            outputs.append(h if activation is None else activation(h))
        return outputs

    def jvp(self, outputs: Sequence[th.Tensor], tangents: Sequence[th.Tensor]) -> th.Tensor:
        """
        Derivative of the chain's output when the weights move along ``tangents`` (the input held fixed).

        :param outputs: :meth:`forward`'s result
        :param tangents: Directions shaped like the weights
        :return: Tensor shaped like the chain's output
        """
        derivative: th.Tensor | None = None
        for i, (_, weight_t, _, _, backward) in enumerate(self.layers):
            # d(W h + b) = dW h + db + W dh; the first layer's input is fixed, so its dh is zero.
            pre = th.addmm(tangents[2 * i + 1], outputs[i], tangents[2 * i].T)
            if derivative is not None:
                pre.addmm_(derivative, weight_t)
            # The activations act elementwise: their Jacobian is diagonal, so the backward rule is also the forward one.
            derivative = pre if backward is None else backward(pre, outputs[i + 1])
        assert derivative is not None  # a chain has at least one layer
        return derivative

    def vjp(self, outputs: Sequence[th.Tensor], upstream: th.Tensor, out: Sequence[th.Tensor]) -> None:
        """
        Gradient of ``sum(upstream * chain(x))`` w.r.t. the weights, written into ``out``.

        :param outputs: :meth:`forward`'s result
        :param upstream: Derivative w.r.t. the chain's output
        :param out: Tensors shaped like the weights that receive the gradient
        """
        for i in range(len(self.layers) - 1, -1, -1):
            weight, _, _, _, backward = self.layers[i]
            if backward is not None:
                upstream = backward(upstream, outputs[i + 1])
            th.mm(upstream.T, outputs[i], out=out[2 * i])
            th.sum(upstream, dim=0, out=out[2 * i + 1])
            if i > 0:
                upstream = th.mm(upstream, weight)  # not ``@``: Tensor.__matmul__ is a Python wrapper


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
