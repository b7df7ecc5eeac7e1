"""
A lean replacement for ``ActorCriticPolicy.forward`` during rollouts.

SB3 spends most of a rollout step in the policy call at batch size ``n_envs``: about a dozen module calls and
the construction and validation of a ``torch.distributions`` object, for a few tiny matrix products. For the
standard MLP policy, :func:`fused_forward` evaluates the actor and critic towers together as block-diagonal
matrix products (weights assembled once per rollout) and samples with the same random-number calls as the
distributions SB3 builds, so the same seed gives the same actions, values and log-probabilities (to float
rounding). Anything else keeps SB3's own ``forward``.
"""

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch as th
from stable_baselines3.common.distributions import (
    BernoulliDistribution,
    CategoricalDistribution,
    DiagGaussianDistribution,
    MultiCategoricalDistribution,
    StateDependentNoiseDistribution,
)
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.preprocessing import preprocess_obs
from stable_baselines3.common.torch_layers import FlattenExtractor, MlpExtractor
from torch import nn
from torch.nn import functional as F

Forward = Callable[..., tuple[th.Tensor, th.Tensor, th.Tensor]]
_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))
# Activations applied elementwise, so one call serves both towers.
_ELEMENTWISE = (nn.Tanh, nn.ReLU, nn.ELU, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Softplus, nn.Identity)


def _tower(sequential: nn.Module) -> list[tuple[nn.Linear, nn.Module | None]] | None:
    """A tower as (linear layer, the activation module after it); ``None`` if it is not Linear/activation pairs."""
    if not isinstance(sequential, nn.Sequential):
        return None
    layers: list[tuple[nn.Linear, nn.Module | None]] = []
    for module in sequential:
        if type(module) is nn.Linear:
            layers.append((module, None))
        elif isinstance(module, _ELEMENTWISE) and layers and layers[-1][1] is None:
            layers[-1] = (layers[-1][0], module)
        else:
            return None
    return layers


def _same_activation(a: nn.Module | None, b: nn.Module | None) -> bool:
    return (a is None and b is None) or (
        a is not None and b is not None and type(a) is type(b) and a.extra_repr() == b.extra_repr()
    )


def _gaussian_log_prob(actions: th.Tensor, mean: th.Tensor, std: th.Tensor) -> th.Tensor:
    # torch.distributions.Normal.log_prob, summed over action dimensions
    return (-((actions - mean) ** 2) / (2 * std**2) - std.log() - _LOG_SQRT_2PI).sum(dim=1)


def _categorical(logits: th.Tensor, deterministic: bool) -> tuple[th.Tensor, th.Tensor]:
    # torch.distributions.Categorical: normalised logits, softmax probabilities, one multinomial draw per row
    logits = logits - logits.logsumexp(dim=-1, keepdim=True)
    probs = F.softmax(logits, dim=-1)
    actions = probs.argmax(dim=1) if deterministic else th.multinomial(probs, 1, True).T.reshape(-1)
    return actions, logits.gather(-1, actions.unsqueeze(-1)).squeeze(-1)


Sampler = Callable[[th.Tensor, th.Tensor, bool], tuple[th.Tensor, th.Tensor]]


def _sampler(policy: ActorCriticPolicy) -> Sampler | None:
    """
    ``(head output, last hidden layer, deterministic) -> (actions, log_prob)`` for the policy's distribution, drawing
    random numbers exactly as the ``torch.distributions`` object SB3 would build; ``None`` if unsupported.
    """
    distribution = policy.action_dist
    latent_pi_dim = policy.mlp_extractor.latent_dim_pi  # the actor's half of the fused hidden layer comes first
    if isinstance(distribution, StateDependentNoiseDistribution):
        if distribution.bijector is not None:
            return None
        sde = distribution
        variance_weights = sde.get_std(policy.log_std) ** 2

        def sample_sde(head: th.Tensor, hidden: th.Tensor, deterministic: bool) -> tuple[th.Tensor, th.Tensor]:
            latent_sde = hidden[:, :latent_pi_dim]
            std = th.sqrt(th.mm(latent_sde**2, variance_weights) + sde.epsilon)
            actions = head if deterministic else head + sde.get_noise(latent_sde)
            return actions, _gaussian_log_prob(actions, head, std)

        return sample_sde
    if type(distribution) is DiagGaussianDistribution:
        std_row = policy.log_std.exp()

        def sample_gaussian(head: th.Tensor, hidden: th.Tensor, deterministic: bool) -> tuple[th.Tensor, th.Tensor]:
            std = std_row.expand_as(head)
            actions = head if deterministic else th.normal(head, std)
            return actions, _gaussian_log_prob(actions, head, std)

        return sample_gaussian
    if isinstance(distribution, CategoricalDistribution):
        return lambda head, hidden, deterministic: _categorical(head, deterministic)
    if isinstance(distribution, MultiCategoricalDistribution):
        dims = list(distribution.action_dims)

        def sample_multi(head: th.Tensor, hidden: th.Tensor, deterministic: bool) -> tuple[th.Tensor, th.Tensor]:
            pairs = [_categorical(logits, deterministic) for logits in th.split(head, dims, dim=1)]
            return th.stack([a for a, _ in pairs], dim=1), th.stack([lp for _, lp in pairs], dim=1).sum(dim=1)

        return sample_multi
    if isinstance(distribution, BernoulliDistribution):

        def sample_bernoulli(head: th.Tensor, hidden: th.Tensor, deterministic: bool) -> tuple[th.Tensor, th.Tensor]:
            probs = th.sigmoid(head)
            actions = th.round(probs) if deterministic else th.bernoulli(probs)
            return actions, -F.binary_cross_entropy_with_logits(head, actions, reduction="none").sum(dim=1)

        return sample_bernoulli
    return None


def fused_forward(policy: ActorCriticPolicy) -> Forward | None:
    """
    A forward pass equivalent to ``policy.forward`` built from the policy's current weights, or ``None`` when the
    policy is not a standard MLP actor-critic (custom forward or extractor, squashed or unknown distribution).

    The returned function is only valid while the weights do not change (one rollout).

    :param policy: The policy
    :return: ``forward(obs, deterministic=False) -> (actions, values, log_prob)``
    """
    cls = type(policy)
    standard_methods = all(
        getattr(cls, name) is getattr(ActorCriticPolicy, name)
        for name in ("forward", "extract_features", "_get_action_dist_from_latent")
    )
    extractor = policy.mlp_extractor
    if not (
        standard_methods
        and type(policy.pi_features_extractor) is FlattenExtractor
        and type(policy.vf_features_extractor) is FlattenExtractor
        and type(extractor) is MlpExtractor
        and type(policy.action_net) is nn.Linear
        and type(policy.value_net) is nn.Linear
        and not policy.squash_output
    ):
        return None
    pi_tower, vf_tower = _tower(extractor.policy_net), _tower(extractor.value_net)
    if pi_tower is None or vf_tower is None or len(pi_tower) != len(vf_tower):
        return None
    if not all(_same_activation(a_pi, a_vf) for (_, a_pi), (_, a_vf) in zip(pi_tower, vf_tower, strict=True)):
        return None
    with th.no_grad():
        sample = _sampler(policy)
        if sample is None:
            return None
        # Hidden layers: the first one reads the shared features (stacked rows), the next ones are block-diagonal.
        layers: list[tuple[th.Tensor, th.Tensor, nn.Module | None]] = []
        for depth, ((pi, activation), (vf, _)) in enumerate(zip(pi_tower, vf_tower, strict=True)):
            weight = th.cat([pi.weight, vf.weight]) if depth == 0 else th.block_diag(pi.weight, vf.weight)
            layers.append((weight.T.contiguous(), th.cat([pi.bias, vf.bias]), activation))
        action_net, value_net = policy.action_net, policy.value_net
        heads = (action_net.weight, value_net.weight)
        head_weight = th.block_diag(*heads) if layers else th.cat(heads)
        head_weight_t, head_bias = head_weight.T.contiguous(), th.cat([action_net.bias, value_net.bias])
    action_size = head_bias.shape[0] - 1
    action_shape: tuple[int, ...] = policy.action_space.shape or ()

    def forward(obs: th.Tensor, deterministic: bool = False) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        features = preprocess_obs(obs, policy.observation_space, normalize_images=policy.normalize_images)
        assert isinstance(features, th.Tensor)  # FlattenExtractor: not a dict observation space
        hidden = features.flatten(1)
        for weight_t, bias, activation in layers:
            hidden = th.addmm(bias, hidden, weight_t)
            if activation is not None:
                hidden = activation(hidden)
        output = th.addmm(head_bias, hidden, head_weight_t)
        head, values = output[:, :action_size], output[:, action_size:]

        actions, log_prob = sample(head, hidden, deterministic)
        return actions.reshape((-1, *action_shape)), values, log_prob

    return forward


@contextmanager
def lean_rollout_forward(policy: ActorCriticPolicy) -> Iterator[bool]:
    """
    Within the block, ``policy(obs)`` runs :func:`fused_forward` when the policy allows it.

    :param policy: The policy, whose weights must not change inside the block
    :return: Whether the lean forward is in use
    """
    forward = fused_forward(policy)
    if forward is None:
        yield False
        return
    policy.forward = forward  # type: ignore[method-assign]
    try:
        yield True
    finally:
        del policy.forward
