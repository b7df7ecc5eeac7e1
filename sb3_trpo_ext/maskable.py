"""TRPO with invalid-action masking, on sb3-contrib's maskable policies and rollout buffers."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib.common.maskable.buffers import MaskableDictRolloutBuffer, MaskableRolloutBuffer
from sb3_contrib.common.maskable.distributions import MaskableDistribution
from sb3_contrib.common.maskable.policies import (
    MaskableActorCriticCnnPolicy,
    MaskableActorCriticPolicy,
    MaskableMultiInputActorCriticPolicy,
)
from sb3_contrib.common.maskable.utils import get_action_masks, is_masking_supported
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.vec_env import VecEnv

from sb3_trpo_ext.common.rollout import collect_rollouts, fused_forward
from sb3_trpo_ext.trpo import TRPO

MASKABLE_BUFFERS = (MaskableRolloutBuffer, MaskableDictRolloutBuffer)


@contextmanager
def masked_rollout_steps(
    policy: MaskableActorCriticPolicy, env: VecEnv, rollout_buffer: RolloutBuffer
) -> Iterator[Callable[[], np.ndarray]]:
    """
    Within the block, SB3's rollout loop samples every action under the env's current action masks and stores
    those masks with the step.

    SB3's loop calls ``policy(obs)`` once per step, right after the previous ``env.step``, then
    ``rollout_buffer.add``: the forward fetches the masks, the ``add`` that follows records them. Nothing else of
    the loop needs to change, so it is not re-implemented here. A loop that calls the policy another way fetches
    the masks with the function the block yields.

    :param policy: The maskable policy
    :param env: The environment the rollout steps (must provide ``action_masks()``)
    :param rollout_buffer: A maskable rollout buffer
    :return: ``fetch()``: the env's current masks, which the next ``add`` then records
    """
    current_masks: list[np.ndarray] = []

    def fetch() -> np.ndarray:
        current_masks[:] = [get_action_masks(env)]
        return current_masks[0]

    def forward(obs: th.Tensor, deterministic: bool = False) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        return type(policy).forward(policy, obs, deterministic=deterministic, action_masks=fetch())

    def add(*args: Any, **kwargs: Any) -> None:
        type(rollout_buffer).add(rollout_buffer, *args, action_masks=current_masks[0], **kwargs)  # type: ignore[call-arg]

    policy.forward = forward  # type: ignore[method-assign, assignment]
    rollout_buffer.add = add  # type: ignore[method-assign]
    try:
        yield fetch
    finally:
        del policy.forward
        del rollout_buffer.add


class MaskableTRPO(TRPO):
    """
    TRPO with invalid-action masking (Huang & Ontañón, 2020: https://arxiv.org/abs/2006.14171).

    The environment provides ``action_masks()`` (directly or through sb3-contrib's ``ActionMasker`` wrapper).
    Rollouts sample under the current masks, which the rollout buffer stores with each step; the policy step then
    evaluates every distribution (surrogate, KL of the line search, Fisher-vector products, on the sub-sampled
    batches too) with the masks of its samples, so masked actions have zero probability throughout and the
    trust region is that of the masked policy. ``predict(..., action_masks=...)`` and sb3-contrib's
    ``sb3_contrib.common.maskable.evaluation.evaluate_policy`` / ``MaskableEvalCallback`` honour masks at
    evaluation.

    Arguments are those of :class:`sb3_trpo_ext.TRPO`; ``policy`` is ``"MlpPolicy"``, ``"CnnPolicy"``,
    ``"MultiInputPolicy"`` (sb3-contrib's maskable policies) or a ``MaskableActorCriticPolicy`` subclass, the action
    space is ``Discrete``, ``MultiDiscrete`` or ``MultiBinary``, and ``rollout_buffer_class`` (if given) must be
    one of sb3-contrib's maskable rollout buffers.
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": MaskableActorCriticPolicy,
        "CnnPolicy": MaskableActorCriticCnnPolicy,
        "MultiInputPolicy": MaskableMultiInputActorCriticPolicy,
    }
    policy_base: ClassVar[type[BasePolicy]] = MaskableActorCriticPolicy
    supported_action_spaces: ClassVar[tuple[type[spaces.Space], ...]] = (
        spaces.Discrete,
        spaces.MultiDiscrete,
        spaces.MultiBinary,
    )
    policy: MaskableActorCriticPolicy  # type: ignore[assignment]

    def _setup_model(self) -> None:
        if self.rollout_buffer_class is None:
            dict_observations = isinstance(self.observation_space, spaces.Dict)
            self.rollout_buffer_class = MaskableDictRolloutBuffer if dict_observations else MaskableRolloutBuffer
        elif not (isinstance(self.rollout_buffer_class, type) and issubclass(self.rollout_buffer_class, MASKABLE_BUFFERS)):
            raise ValueError(
                f"`rollout_buffer_class` must subclass MaskableRolloutBuffer or MaskableDictRolloutBuffer (the action "
                f"masks are stored with the rollout), got {self.rollout_buffer_class!r}"
            )
        if self.env is not None and not is_masking_supported(self.env):
            raise ValueError("`env` must provide action masks: an `action_masks()` method (or sb3-contrib's ActionMasker)")
        # SB3's setup passes `use_sde` to the policy; maskable policies take no such argument (their actions are
        # discrete, where SB3 already rejects gSDE).
        policy_class = self.policy_class
        self.policy_class = lambda *args, use_sde=False, **kwargs: policy_class(*args, **kwargs)  # type: ignore[assignment]
        try:
            super()._setup_model()
        finally:
            self.policy_class = policy_class

    def _action_distribution(self, batch: NamedTuple) -> MaskableDistribution:
        return self.policy.get_distribution(batch.observations, action_masks=batch.action_masks)  # type: ignore[attr-defined]

    def collect_rollouts(
        self,
        env: VecEnv,
        callback: BaseCallback,
        rollout_buffer: RolloutBuffer,
        n_rollout_steps: int,
    ) -> bool:
        """
        SB3's rollout loop, sampling under the env's action masks and storing them (:func:`masked_rollout_steps`),
        with the policy call evaluated in NumPy where the policy allows it, as :meth:`TRPO.collect_rollouts` does.
        """
        if not is_masking_supported(env):
            raise ValueError("The environment must provide action masks: an `action_masks()` method (or ActionMasker)")
        forward = fused_forward(self.policy)
        with masked_rollout_steps(self.policy, env, rollout_buffer) as fetch_masks:
            if forward is None:
                return OnPolicyAlgorithm.collect_rollouts(self, env, callback, rollout_buffer, n_rollout_steps)
            return collect_rollouts(self, forward, env, callback, rollout_buffer, n_rollout_steps, fetch_masks)

    def predict(  # type: ignore[override]
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
        action_masks: np.ndarray | None = None,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """
        The policy's action for an observation, restricted to the valid actions when ``action_masks`` is given.

        :param observation: The input observation
        :param state: Unused (no recurrent state), kept for SB3's signature
        :param episode_start: Unused, kept for SB3's signature
        :param deterministic: Whether to return the most likely valid action instead of sampling
        :param action_masks: Boolean masks of the valid actions (``True``: allowed), e.g. from
            ``sb3_contrib.common.maskable.utils.get_action_masks(env)``; ``None`` leaves the policy unmasked
        :return: The action and the (unchanged) state
        """
        return self.policy.predict(observation, state, episode_start, deterministic, action_masks=action_masks)
