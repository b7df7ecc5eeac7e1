"""
A lean rollout: SB3's ``collect_rollouts`` loop with the policy call evaluated in NumPy.

SB3 spends most of a rollout step in the policy call at batch size ``n_envs``: about a dozen module calls and the
construction and validation of a ``torch.distributions`` object, for a few tiny matrix products; at that size even
a bare torch operator costs several times its NumPy counterpart. For the standard MLP policy,
:func:`fused_forward` evaluates the actor and critic towers together as block-diagonal matrix products in NumPy
(weights copied once per rollout, when they are fixed) and draws its random numbers with the same torch calls as
the distributions SB3 builds, so the same seed gives the same actions, values and log-probabilities (to float
rounding). :func:`collect_rollouts` is SB3's loop around it, step for step. Anything else keeps SB3's own path.
"""

from collections.abc import Callable
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib.common.maskable.distributions import (
    MaskableCategoricalDistribution,
    MaskableMultiCategoricalDistribution,
)
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.distributions import (
    BernoulliDistribution,
    CategoricalDistribution,
    DiagGaussianDistribution,
    MultiCategoricalDistribution,
    StateDependentNoiseDistribution,
)
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.preprocessing import is_image_space, preprocess_obs
from stable_baselines3.common.torch_layers import FlattenExtractor, MlpExtractor
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv
from torch import nn

from sb3_trpo_ext.common.mlp import linear_layers, uses_standard_methods

# ``(observations, deterministic, action_masks) -> (actions, values, log_prob)``, all NumPy arrays
Forward = Callable[[np.ndarray, bool, np.ndarray | None], tuple[np.ndarray, np.ndarray, np.ndarray]]
Activation = Callable[[np.ndarray], np.ndarray]
_LOG_SQRT_2PI = float(np.log(np.sqrt(2 * np.pi)))
# What sb3-contrib's maskable distributions put in place of a masked logit
_MASKED_LOGIT = -1e8
# Activations applied elementwise, so one call serves both towers; NumPy's own for the common ones.
_ELEMENTWISE = (nn.Tanh, nn.ReLU, nn.ELU, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Softplus)
_NUMPY_ACTIVATIONS: dict[type[nn.Module], Activation] = {
    nn.Tanh: np.tanh,
    nn.ReLU: lambda x: np.maximum(x, 0),
}


def _tower(sequential: nn.Module) -> list[tuple[nn.Linear, nn.Module | None]] | None:
    """A tower as (linear layer, the activation module after it); ``None`` if it is not Linear/activation pairs."""
    if not isinstance(sequential, nn.Sequential):
        return None
    return linear_layers([sequential], lambda module: isinstance(module, _ELEMENTWISE))


def _same_activation(a: nn.Module | None, b: nn.Module | None) -> bool:
    return (a is None and b is None) or (
        a is not None and b is not None and type(a) is type(b) and a.extra_repr() == b.extra_repr()
    )


def _numpy_activation(module: nn.Module | None) -> Activation | None:
    if module is None or type(module) in _NUMPY_ACTIVATIONS:
        return None if module is None else _NUMPY_ACTIVATIONS[type(module)]
    return lambda x: module(th.from_numpy(x)).numpy()


def _numpy(tensor: th.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def _gaussian_log_prob(actions: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    # torch.distributions.Normal.log_prob, summed over action dimensions
    return (-((actions - mean) ** 2) / (2 * std**2) - np.log(std) - _LOG_SQRT_2PI).sum(axis=1)


def _categorical(logits: np.ndarray, deterministic: bool) -> tuple[np.ndarray, np.ndarray]:
    # torch.distributions.Categorical: normalised logits, their softmax, one multinomial draw per row
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    log_probs = shifted - np.log(total)
    if deterministic:
        actions = log_probs.argmax(axis=1)
    else:
        # torch.multinomial draws one sample per row as argmax(p / q) with q ~ Exp(1) from ``exponential_`` on a
        # tensor shaped like p; the same draw here skips its input checks, which cost ten times the sampling.
        # The rollout tests compare the actions with SB3's own sampling, so a change in torch would show there.
        probs = exp / total
        q = th.from_numpy(np.empty_like(probs)).exponential_(1).numpy()
        actions = (probs / q).argmax(axis=1)
    return actions, log_probs[np.arange(len(actions)), actions]


Sampler = Callable[[np.ndarray, np.ndarray, bool], tuple[np.ndarray, np.ndarray]]


def _sampler(policy: ActorCriticPolicy | MaskableActorCriticPolicy) -> Sampler | None:
    """
    ``(head output, last hidden layer, deterministic) -> (actions, log_prob)`` for the policy's distribution, drawing
    random numbers exactly as the ``torch.distributions`` object SB3 would build; ``None`` if unsupported.
    """
    distribution = policy.action_dist
    latent_pi_dim = policy.mlp_extractor.latent_dim_pi  # the actor's half of the fused hidden layer comes first
    if isinstance(distribution, StateDependentNoiseDistribution):
        assert isinstance(policy, ActorCriticPolicy)  # maskable policies have discrete actions only
        if distribution.bijector is not None:
            return None
        sde = distribution
        variance_weights = _numpy(sde.get_std(policy.log_std) ** 2)
        # NumPy views of the noise matrices, refreshed when gSDE resamples them (it assigns new tensors).
        noise_source: list[th.Tensor | None] = [None, None]
        noise_arrays: list[np.ndarray] = [np.empty(0), np.empty(0)]

        def noise(latent_sde: np.ndarray) -> np.ndarray:
            # StateDependentNoiseDistribution.get_noise: one matrix per env when there is one per row, else the
            # single matrix for every row
            if noise_source[0] is not sde.exploration_mat or noise_source[1] is not sde.exploration_matrices:
                noise_source[:] = [sde.exploration_mat, sde.exploration_matrices]
                noise_arrays[:] = [_numpy(sde.exploration_mat), _numpy(sde.exploration_matrices)]
            single, per_row = noise_arrays
            if len(latent_sde) == 1 or len(latent_sde) != len(per_row):
                return latent_sde @ single
            return np.matmul(latent_sde[:, None, :], per_row)[:, 0, :]

        def sample_sde(head: np.ndarray, hidden: np.ndarray, deterministic: bool) -> tuple[np.ndarray, np.ndarray]:
            latent_sde = hidden[:, :latent_pi_dim]
            std = np.sqrt((latent_sde**2) @ variance_weights + sde.epsilon)
            actions = head if deterministic else head + noise(latent_sde)
            return actions, _gaussian_log_prob(actions, head, std)

        return sample_sde
    if type(distribution) is DiagGaussianDistribution:
        assert isinstance(policy, ActorCriticPolicy)
        std_row = _numpy(policy.log_std.exp())

        def sample_gaussian(head: np.ndarray, hidden: np.ndarray, deterministic: bool) -> tuple[np.ndarray, np.ndarray]:
            std = np.broadcast_to(std_row, head.shape)
            if deterministic:
                actions = head
            else:
                # Normal.rsample: loc + eps * scale, eps drawn by normal_() on a tensor of the batch's shape
                actions = head + th.empty(head.shape, dtype=policy.log_std.dtype).normal_().numpy() * std
            return actions, _gaussian_log_prob(actions, head, std)

        return sample_gaussian
    if isinstance(distribution, (CategoricalDistribution, MaskableCategoricalDistribution)):
        return lambda head, hidden, deterministic: _categorical(head, deterministic)
    # (sb3-contrib's maskable Bernoulli is a multi-categorical of 2-way factors, and samples like one)
    if isinstance(distribution, (MultiCategoricalDistribution, MaskableMultiCategoricalDistribution)):
        boundaries = np.cumsum(distribution.action_dims)[:-1]

        def sample_multi(head: np.ndarray, hidden: np.ndarray, deterministic: bool) -> tuple[np.ndarray, np.ndarray]:
            pairs = [_categorical(logits, deterministic) for logits in np.split(head, boundaries, axis=1)]
            return np.stack([a for a, _ in pairs], axis=1), np.stack([lp for _, lp in pairs], axis=1).sum(axis=1)

        return sample_multi
    if isinstance(distribution, BernoulliDistribution):

        def sample_bernoulli(head: np.ndarray, hidden: np.ndarray, deterministic: bool) -> tuple[np.ndarray, np.ndarray]:
            probs = 1 / (1 + np.exp(-head))
            actions = np.round(probs) if deterministic else th.bernoulli(th.from_numpy(probs)).numpy()
            # minus binary cross-entropy with logits, in its stable form
            log_prob = -(np.maximum(head, 0) - head * actions + np.log1p(np.exp(-np.abs(head))))
            return actions, log_prob.sum(axis=1)

        return sample_bernoulli
    return None


def fused_forward(policy: ActorCriticPolicy | MaskableActorCriticPolicy) -> Forward | None:
    """
    A forward pass equivalent to ``policy.forward`` on NumPy arrays, built from the policy's current weights, or
    ``None`` when the policy is not a standard MLP actor-critic on the CPU (custom forward or extractor, dict
    observations, squashed or unknown distribution, another device). sb3-contrib's maskable MLP policy is one, and
    its ``action_masks`` are applied as it applies them.

    The returned function is only valid while the weights do not change (one rollout).

    :param policy: The policy
    :return: ``forward(obs, deterministic=False, action_masks=None) -> (actions, values, log_prob)``
    """
    standard_methods = uses_standard_methods(policy, ("forward", "extract_features", "_get_action_dist_from_latent"))
    extractor = policy.mlp_extractor
    space = policy.observation_space
    if not (
        standard_methods
        # On another device SB3 samples with that device's generator, and gSDE's noise matrices live there.
        and policy.device.type == "cpu"
        and not isinstance(space, spaces.Dict)
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
        layers: list[tuple[np.ndarray, np.ndarray, Activation | None]] = []
        for depth, ((pi, activation), (vf, _)) in enumerate(zip(pi_tower, vf_tower, strict=True)):
            weight = th.cat([pi.weight, vf.weight]) if depth == 0 else th.block_diag(pi.weight, vf.weight)
            layers.append((_numpy(weight.T).copy(), _numpy(th.cat([pi.bias, vf.bias])), _numpy_activation(activation)))
        action_net, value_net = policy.action_net, policy.value_net
        heads = (action_net.weight, value_net.weight)
        head_weight = th.block_diag(*heads) if layers else th.cat(heads)
        head_weight_t, head_bias = _numpy(head_weight.T).copy(), _numpy(th.cat([action_net.bias, value_net.bias]))
    dtype = head_bias.dtype
    action_size = head_bias.shape[0] - 1
    action_shape: tuple[int, ...] = policy.action_space.shape or ()
    if isinstance(space, spaces.Box) and not is_image_space(space):
        # SB3's preprocessing of a non-image Box is a cast to the network's dtype
        def features(obs: np.ndarray) -> np.ndarray:
            return np.asarray(obs, dtype=dtype)
    else:  # one-hot encodings, image scaling: SB3's own preprocessing

        def features(obs: np.ndarray) -> np.ndarray:
            preprocessed = preprocess_obs(th.as_tensor(obs), space, normalize_images=policy.normalize_images)
            assert isinstance(preprocessed, th.Tensor)  # not a dict space (checked above)
            return _numpy(preprocessed)

    def forward(
        obs: np.ndarray, deterministic: bool = False, action_masks: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        hidden = features(obs).reshape(len(obs), -1)  # FlattenExtractor
        for weight_t, bias, activation in layers:
            hidden = hidden @ weight_t + bias
            if activation is not None:
                hidden = activation(hidden)
        output = hidden @ head_weight_t + head_bias
        head, values = output[:, :action_size], output[:, action_size]
        if action_masks is not None:
            head = np.where(np.reshape(action_masks, head.shape), head, head.dtype.type(_MASKED_LOGIT))
        actions, log_prob = sample(head, hidden, deterministic)
        return actions.reshape((-1, *action_shape)), values, log_prob

    return forward


def noise_resampler(policy: ActorCriticPolicy) -> Callable[[int], None]:
    """
    ``policy.reset_noise`` for a gSDE policy whose weights are fixed (one rollout): the same two draws into the same
    attributes, without rebuilding the weight distribution and its autograd graph at every resampling, which cost
    several policy calls each time. Policies or distributions that redefine the resampling keep their own.

    :param policy: A policy with a ``StateDependentNoiseDistribution``
    :return: ``resample(n_envs)``
    """
    sde = policy.action_dist
    if not (
        type(policy).reset_noise is ActorCriticPolicy.reset_noise
        and type(sde) is StateDependentNoiseDistribution
        and policy.device.type == "cpu"
    ):
        return policy.reset_noise
    with th.no_grad():
        std = sde.get_std(policy.log_std)
        sde.weights_dist = th.distributions.Normal(th.zeros_like(std), std)

    def resample(n_envs: int) -> None:
        # Normal(0, std).rsample(shape): loc + eps * scale with eps from normal_() on a tensor of the sample's shape
        with th.no_grad():
            sde.exploration_mat = th.empty_like(std).normal_() * std
            sde.exploration_matrices = th.empty((n_envs, *std.shape), dtype=std.dtype).normal_() * std

    return resample


def bootstrap_truncated(
    rewards: np.ndarray,
    dones: np.ndarray,
    infos: list[dict[str, Any]],
    gamma: float,
    terminal_value: Callable[[int, Any], float],
) -> None:
    """
    Timeouts are not terminations: add ``gamma * V(terminal observation)`` to the reward of every episode a time
    limit cut, as SB3's rollout loop does.

    :param rewards: Rewards of the step, changed in place
    :param dones: Episode ends of the step
    :param infos: Infos of the step (``terminal_observation``, ``TimeLimit.truncated``)
    :param gamma: Discount factor
    :param terminal_value: ``(env index, terminal observation as the env returned it) -> value``, called without
        gradients
    """
    for index, (done, info) in enumerate(zip(dones, infos, strict=True)):
        if done and info.get("terminal_observation") is not None and info.get("TimeLimit.truncated", False):
            with th.no_grad():
                rewards[index] += gamma * terminal_value(index, info["terminal_observation"])


def collect_rollouts(
    model: OnPolicyAlgorithm,
    forward: Forward,
    env: VecEnv,
    callback: BaseCallback,
    rollout_buffer: RolloutBuffer,
    n_rollout_steps: int,
    action_masks: Callable[[], np.ndarray] | None = None,
) -> bool:
    """
    ``OnPolicyAlgorithm.collect_rollouts`` step for step (gSDE resampling, action clipping, callbacks and their
    ``locals``, episode statistics, timeout bootstrapping, the buffer's ``add`` and returns), with the policy call
    replaced by ``forward`` from :func:`fused_forward`.

    :param model: The algorithm whose policy ``forward`` was built from
    :param forward: The fused policy call
    :param env: The training environment
    :param callback: Callback called at each step and at the start and end of the rollout
    :param rollout_buffer: Buffer to fill
    :param n_rollout_steps: Number of experiences to collect per environment
    :param action_masks: Called once per step, before the policy call: the masks to sample under (``None``: no
        masking)
    :return: ``False`` if a callback stopped the rollout early
    """
    assert model._last_obs is not None, "No previous observation was provided"
    policy = model.policy
    policy.set_training_mode(False)
    n_steps = 0
    rollout_buffer.reset()
    reset_noise = noise_resampler(policy) if model.use_sde else None
    if reset_noise is not None:
        reset_noise(env.num_envs)
    callback.on_rollout_start()
    action_space = model.action_space
    clip = isinstance(action_space, spaces.Box)
    if clip:  # np.clip's dispatch costs more than the two ufuncs it ends in
        low, high = action_space.low, action_space.high  # type: ignore[attr-defined]
    discrete = isinstance(action_space, spaces.Discrete)
    # RolloutBuffer.add, written directly: its copies and tensor round trips cost as much as the policy call. A
    # subclass may override add, so it keeps its own.
    plain_buffer = type(rollout_buffer) is RolloutBuffer
    buffer_obs_shape = (rollout_buffer.n_envs, *rollout_buffer.obs_shape)
    buffer_action_shape = (rollout_buffer.n_envs, rollout_buffer.action_dim)

    while n_steps < n_rollout_steps:
        if reset_noise is not None and model.sde_sample_freq > 0 and n_steps % model.sde_sample_freq == 0:
            reset_noise(env.num_envs)
        obs = model._last_obs
        masks = None if action_masks is None else action_masks()
        actions, values, log_probs = forward(obs, False, masks)  # type: ignore[arg-type]
        clipped_actions = np.minimum(np.maximum(actions, low), high) if clip else actions
        new_obs, rewards, dones, infos = env.step(clipped_actions)
        model.num_timesteps += env.num_envs

        # What SB3's loop exposes to callbacks, under the same names and types.
        locals_: dict[str, Any] = {
            "self": model,
            "env": env,
            "callback": callback,
            "rollout_buffer": rollout_buffer,
            "n_rollout_steps": n_rollout_steps,
            "n_steps": n_steps,
            "obs_tensor": th.from_numpy(np.asarray(obs)),
            "actions": actions,
            "values": th.from_numpy(values).unsqueeze(1),
            "log_probs": th.from_numpy(log_probs),
            "clipped_actions": clipped_actions,
            "new_obs": new_obs,
            "rewards": rewards,
            "dones": dones,
            "infos": infos,
        }
        callback.update_locals(locals_)
        if not callback.on_step():
            return False
        model._update_info_buffer(infos, dones)
        n_steps += 1
        if discrete:
            actions = actions.reshape(-1, 1)

        bootstrap_truncated(
            rewards, dones, infos, model.gamma, lambda _, obs: policy.predict_values(policy.obs_to_tensor(obs)[0]).item()
        )

        if plain_buffer:
            pos = rollout_buffer.pos
            rollout_buffer.observations[pos] = np.reshape(obs, buffer_obs_shape)  # type: ignore[arg-type]
            rollout_buffer.actions[pos] = actions.reshape(buffer_action_shape)
            rollout_buffer.rewards[pos] = rewards
            rollout_buffer.episode_starts[pos] = model._last_episode_starts
            rollout_buffer.values[pos] = values
            rollout_buffer.log_probs[pos] = log_probs
            rollout_buffer.pos += 1
            rollout_buffer.full = rollout_buffer.pos == rollout_buffer.buffer_size
        else:
            rollout_buffer.add(
                obs,  # type: ignore[arg-type]
                actions,
                rewards,
                model._last_episode_starts,  # type: ignore[arg-type]
                locals_["values"],
                locals_["log_probs"],
            )
        model._last_obs = new_obs  # type: ignore[assignment]
        model._last_episode_starts = dones

    with th.no_grad():
        last_values = policy.predict_values(obs_as_tensor(new_obs, model.device))  # type: ignore[arg-type]
    rollout_buffer.compute_returns_and_advantage(last_values=last_values, dones=dones)
    callback.update_locals({**locals_, "values": last_values})
    callback.on_rollout_end()
    return True
