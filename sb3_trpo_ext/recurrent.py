"""TRPO with recurrent (LSTM) policies, on sb3-contrib's recurrent policies and rollout buffers."""

from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib.common.recurrent.buffers import RecurrentDictRolloutBuffer, RecurrentRolloutBuffer
from sb3_contrib.common.recurrent.policies import (
    RecurrentActorCriticCnnPolicy,
    RecurrentActorCriticPolicy,
    RecurrentMultiInputActorCriticPolicy,
)
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import BaseModel, BasePolicy
from stable_baselines3.common.type_aliases import PyTorchObs
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv
from torch.nn import functional as F

from sb3_trpo_ext.common.rollout import bootstrap_truncated
from sb3_trpo_ext.common.trust_region import TrustRegionStats
from sb3_trpo_ext.trpo import TRPO

RECURRENT_BUFFERS = (RecurrentRolloutBuffer, RecurrentDictRolloutBuffer)
LSTMStates = tuple[th.Tensor, th.Tensor]


def valid_steps(batch: NamedTuple) -> th.Tensor:
    """
    Which rows of a padded recurrent batch are real steps (sb3-contrib pads every sequence to the longest one).

    :param batch: Recurrent rollout samples
    :return: Boolean tensor, one entry per padded step
    """
    return batch.mask > 0.5  # type: ignore[attr-defined]


def subsample_sequences(batch: NamedTuple, step: int) -> NamedTuple:
    """
    Every ``step``-th *sequence* of a padded recurrent batch, with the LSTM states those sequences start from.

    sb3-contrib lays a batch out as ``n_seq`` sequences of equal padded length, one after the other; striding
    single steps would cut sequences and desynchronise them from their initial LSTM states.

    :param batch: Recurrent rollout samples
    :param step: Stride over sequences
    :return: A batch of the same type
    """
    if step == 1:
        return batch
    n_seq = batch.lstm_states.pi[0].shape[1]  # type: ignore[attr-defined]

    def per_step(tensor: th.Tensor) -> th.Tensor:
        return tensor.reshape(n_seq, -1, *tensor.shape[1:])[::step].reshape(-1, *tensor.shape[1:])

    def per_sequence(states: LSTMStates) -> LSTMStates:
        return states[0][:, ::step].contiguous(), states[1][:, ::step].contiguous()

    fields: dict[str, Any] = {}
    for name, value in batch._asdict().items():  # type: ignore[attr-defined]
        if name == "lstm_states":
            fields[name] = RNNStates(per_sequence(value.pi), per_sequence(value.vf))
        elif isinstance(value, dict):
            fields[name] = {key: per_step(tensor) for key, tensor in value.items()}
        else:
            fields[name] = per_step(value)
    return batch._replace(**fields)


def fold_episode_starts(batch: NamedTuple) -> NamedTuple:
    """
    The same batch with each sequence's episode start folded into its initial LSTM states.

    sb3-contrib cuts sequences at episode starts, so an episode can only start at the head of a sequence. Zeroing
    the initial states of the sequences that start an episode, and clearing ``episode_starts``, then describes
    the same computation, and lets sb3-contrib's ``_process_sequence`` run each LSTM in one call over the whole
    sequence instead of one call per step (its fallback whenever an episode start is set). Batches with a start
    elsewhere are returned unchanged.

    :param batch: Recurrent rollout samples
    :return: The equivalent batch
    """
    n_seq = batch.lstm_states.pi[0].shape[1]  # type: ignore[attr-defined]
    starts = batch.episode_starts.reshape(n_seq, -1)  # type: ignore[attr-defined]
    if starts[:, 1:].any():
        return batch
    keep = (1.0 - starts[:, 0]).view(1, n_seq, 1)

    def fold(states: LSTMStates) -> LSTMStates:
        return states[0] * keep, states[1] * keep

    states = batch.lstm_states  # type: ignore[attr-defined]
    return batch._replace(  # type: ignore[attr-defined]
        episode_starts=th.zeros_like(batch.episode_starts),  # type: ignore[attr-defined]
        lstm_states=RNNStates(fold(states.pi), fold(states.vf)),
    )


class RecurrentTRPO(TRPO):
    """
    TRPO with recurrent (LSTM) policies.

    Rollouts carry the LSTM states from step to step and store them in sb3-contrib's recurrent rollout buffer.
    The policy step then evaluates the whole rollout as sequences: each starts from its stored LSTM state and is
    reset at episode starts, exactly as during the rollout. Sequences are padded to one length; the surrogate,
    the KL of the line search and the Fisher-vector products only see the real (unpadded) steps, so ``target_kl``
    bounds the mean KL over real steps and the analytic Fisher is the Hessian of that mean. The critic is
    regressed on minibatches of sequences (``rollout_buffer.get(batch_size)``) with its own LSTM states.

    Arguments are those of :class:`sb3_trpo_ext.TRPO`, except:

    - ``policy``: ``"MlpLstmPolicy"``, ``"CnnLstmPolicy"``, ``"MultiInputLstmPolicy"`` (sb3-contrib's recurrent
      policies) or a ``RecurrentActorCriticPolicy`` subclass; the LSTM is configured through ``policy_kwargs``
      (``lstm_hidden_size``, ``n_lstm_layers``, ``shared_lstm``, ``enable_critic_lstm``, ``lstm_kwargs``).
      With ``shared_lstm=True`` the LSTM belongs to the actor: the critic reads its (detached) output and the
      critic regression never moves it.
    - ``batch_size``: number of steps (before padding) per critic minibatch; the buffer cuts minibatches into
      sequences at episode starts.
    - ``sub_sampling_factor`` / ``fisher_sub_sampling_factor``: stride over whole *sequences*, not steps.
    - ``rollout_buffer_class``: a subclass of sb3-contrib's recurrent rollout buffers (default: chosen from the
      observation space).
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpLstmPolicy": RecurrentActorCriticPolicy,
        "CnnLstmPolicy": RecurrentActorCriticCnnPolicy,
        "MultiInputLstmPolicy": RecurrentMultiInputActorCriticPolicy,
    }
    policy_base: ClassVar[type[BasePolicy]] = RecurrentActorCriticPolicy
    policy: RecurrentActorCriticPolicy

    def _setup_model(self) -> None:
        check_lstm_policy_kwargs(self.policy_kwargs)
        buffer_class = self.rollout_buffer_class
        if buffer_class is None:
            dict_observations = isinstance(self.observation_space, spaces.Dict)
            buffer_class = RecurrentDictRolloutBuffer if dict_observations else RecurrentRolloutBuffer
        elif not (isinstance(buffer_class, type) and issubclass(buffer_class, RECURRENT_BUFFERS)):
            raise ValueError(
                f"`rollout_buffer_class` must subclass RecurrentRolloutBuffer or RecurrentDictRolloutBuffer (the LSTM "
                f"states are stored with the rollout), got {buffer_class!r}"
            )
        # SB3 builds the rollout buffer before the policy, but a recurrent buffer's shape depends on the policy's
        # LSTM: let SB3 build a feed-forward placeholder, replaced below.
        buffer_kwargs, self.rollout_buffer_class, self.rollout_buffer_kwargs = self.rollout_buffer_kwargs, None, {}
        try:
            super()._setup_model()
        finally:
            self.rollout_buffer_class, self.rollout_buffer_kwargs = buffer_class, buffer_kwargs
        lstm = self.policy.lstm_actor
        self.rollout_buffer = buffer_class(
            self.n_steps,
            self.observation_space,  # type: ignore[arg-type]
            self.action_space,
            (self.n_steps, lstm.num_layers, self.n_envs, lstm.hidden_size),
            self.device,
            gamma=self.gamma,
            gae_lambda=self.gae_lambda,
            n_envs=self.n_envs,
            **self.rollout_buffer_kwargs,
        )
        self._last_lstm_states = self._initial_lstm_states(self.n_envs)

    def _initial_lstm_states(self, n_envs: int) -> RNNStates:
        """Zero LSTM states (hidden and cell, actor and critic) for ``n_envs`` environments."""
        lstm = self.policy.lstm_actor
        shape = (lstm.num_layers, n_envs, lstm.hidden_size)
        return RNNStates(
            (th.zeros(shape, device=self.device), th.zeros(shape, device=self.device)),
            (th.zeros(shape, device=self.device), th.zeros(shape, device=self.device)),
        )

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_last_lstm_states"]

    def _first_step_distribution(self, observation: PyTorchObs) -> Distribution:
        n_envs = len(next(iter(observation.values()))) if isinstance(observation, dict) else len(observation)
        episode_starts = th.ones(n_envs, device=self.device)
        states = self._initial_lstm_states(n_envs).pi
        # The actor/critic split differentiates this distribution with the policy in eval mode, and cuDNN's LSTM
        # has no backward in eval mode: run PyTorch's own kernels, whose graph differentiates in either mode.
        with th.backends.cudnn.flags(enabled=False):
            distribution, _ = self.policy.get_distribution(observation, states, episode_starts)  # type: ignore[arg-type]
        return distribution

    # ---- policy step hooks ------------------------------------------------------------------------------------

    def _policy_step(self, rollout: NamedTuple) -> TrustRegionStats:
        # cuDNN's LSTM has no double backward, which the Fisher-vector products need: use PyTorch's own kernels.
        with th.backends.cudnn.flags(enabled=False):
            return super()._policy_step(rollout)

    def _policy_batch(self, rollout: NamedTuple, step: int) -> NamedTuple:
        return fold_episode_starts(subsample_sequences(rollout, step))

    def _action_distribution(self, batch: NamedTuple) -> Distribution:
        """
        The action distribution at the real steps of a padded batch of sequences.

        The LSTM runs over the padded sequences (padding only follows real steps, so it cannot influence them);
        the padded rows are dropped before the action head, so every mean the trust-region step takes (surrogate,
        KL, Fisher metric) is over real steps only.
        """
        policy = self.policy
        features = BaseModel.extract_features(policy, batch.observations, policy.pi_features_extractor)  # type: ignore[attr-defined]
        latent, _ = policy._process_sequence(
            features,
            batch.lstm_states.pi,  # type: ignore[attr-defined]
            batch.episode_starts,  # type: ignore[attr-defined]
            policy.lstm_actor,
        )
        latent = policy.mlp_extractor.forward_actor(latent[valid_steps(batch)])
        return policy._get_action_dist_from_latent(latent)

    def _surrogate_samples(self, batch: NamedTuple) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        valid = valid_steps(batch)
        return tuple(tensor[valid] for tensor in super()._surrogate_samples(batch))  # type: ignore[return-value]

    # ---- critic -----------------------------------------------------------------------------------------------

    def _critic_step(self, rollout: NamedTuple) -> float:
        """
        Regress the critic on the returns over sequences: ``n_critic_updates`` epochs of the buffer's minibatches,
        each forwarded from the critic's stored LSTM states; padded steps are left out of the loss.

        :param rollout: The whole rollout (unused: the buffer cuts its own minibatches of sequences)
        :return: Mean value loss
        """
        losses = []
        with self._frozen_actor():
            for _ in range(self.n_critic_updates):
                for minibatch in self.rollout_buffer.get(self.batch_size):
                    batch: Any = fold_episode_starts(minibatch)
                    valid = valid_steps(batch)
                    values = self.policy.predict_values(batch.observations, batch.lstm_states.vf, batch.episode_starts)
                    loss = F.mse_loss(values.flatten()[valid], batch.returns[valid])
                    self._critic_gradient_step(loss)
                    losses.append(loss.detach())
        return th.stack(losses).mean().item() if losses else float("nan")

    # ---- rollouts ---------------------------------------------------------------------------------------------

    def _env_actions(self, actions: np.ndarray) -> np.ndarray:
        """What the env is stepped with: Box actions rescaled (squashed policies) or clipped to the bounds."""
        if not isinstance(self.action_space, spaces.Box):
            return actions
        if self.policy.squash_output:
            return self.policy.unscale_action(actions)
        return np.clip(actions, self.action_space.low, self.action_space.high)

    def _bootstrap_truncated(self, rewards: np.ndarray, dones: np.ndarray, infos: list[dict], lstm_states: RNNStates) -> None:
        """
        Add ``gamma * V(terminal observation)`` to the reward of episodes cut by a time limit, the value taken
        from the critic's LSTM state after the last step of that episode.
        """

        def terminal_value(index: int, observation: Any) -> float:
            state = tuple(s[:, index : index + 1].contiguous() for s in lstm_states.vf)
            terminal_obs = self.policy.obs_to_tensor(observation)[0]
            return self.policy.predict_values(terminal_obs, state, th.zeros(1, device=self.device)).item()  # type: ignore[arg-type]

        bootstrap_truncated(rewards, dones, infos, self.gamma, terminal_value)

    def collect_rollouts(
        self,
        env: VecEnv,
        callback: BaseCallback,
        rollout_buffer: RolloutBuffer,
        n_rollout_steps: int,
    ) -> bool:
        """
        Fill the recurrent rollout buffer: SB3's rollout loop, with the LSTM states fed to the policy, carried
        from step to step (reset at episode starts) and stored with each step.

        :param env: The training environment
        :param callback: Callback called at each step and at the start and end of the rollout
        :param rollout_buffer: A recurrent rollout buffer
        :param n_rollout_steps: Number of steps to collect per environment
        :return: False if the callback stopped the rollout early
        """
        assert isinstance(rollout_buffer, RECURRENT_BUFFERS), "RecurrentTRPO needs a recurrent rollout buffer"
        assert self._last_obs is not None, "No previous observation was provided"
        self.policy.set_training_mode(False)
        rollout_buffer.reset()
        if self.use_sde:
            self.policy.reset_noise(env.num_envs)
        callback.on_rollout_start()
        for n_steps in range(n_rollout_steps):
            if self.use_sde and self.sde_sample_freq > 0 and n_steps % self.sde_sample_freq == 0:
                self.policy.reset_noise(env.num_envs)
            with th.no_grad():
                obs_tensor = obs_as_tensor(self._last_obs, self.device)  # type: ignore[arg-type]
                episode_starts = th.as_tensor(self._last_episode_starts, dtype=th.float32, device=self.device)
                actions, values, log_probs, lstm_states = self.policy(obs_tensor, self._last_lstm_states, episode_starts)
            actions = actions.cpu().numpy()
            new_obs, rewards, dones, infos = env.step(self._env_actions(actions))
            self.num_timesteps += env.num_envs
            callback.update_locals(locals())
            if not callback.on_step():
                return False
            self._update_info_buffer(infos, dones)
            if isinstance(self.action_space, spaces.Discrete):
                actions = actions.reshape(-1, 1)
            self._bootstrap_truncated(rewards, dones, infos, lstm_states)
            rollout_buffer.add(
                self._last_obs,  # type: ignore[arg-type]
                actions,
                rewards,
                self._last_episode_starts,  # type: ignore[arg-type]
                values,
                log_probs,
                lstm_states=self._last_lstm_states,  # the states the step started from
            )
            self._last_obs, self._last_episode_starts, self._last_lstm_states = new_obs, dones, lstm_states  # type: ignore[assignment]
        with th.no_grad():
            episode_starts = th.as_tensor(dones, dtype=th.float32, device=self.device)
            values = self.policy.predict_values(obs_as_tensor(new_obs, self.device), lstm_states.vf, episode_starts)  # type: ignore[arg-type]
        rollout_buffer.compute_returns_and_advantage(last_values=values, dones=dones)
        callback.on_rollout_end()
        return True


def check_lstm_policy_kwargs(policy_kwargs: dict[str, Any]) -> None:
    """
    Reject LSTM options sb3-contrib's recurrent policy cannot combine, with an error naming the argument
    (sb3-contrib itself only asserts).

    :param policy_kwargs: The algorithm's ``policy_kwargs``
    """
    shared = policy_kwargs.get("shared_lstm", False)
    if shared and policy_kwargs.get("enable_critic_lstm", True):
        raise ValueError("`policy_kwargs`: `shared_lstm=True` needs `enable_critic_lstm=False` (one LSTM, or a critic LSTM)")
    if shared and not policy_kwargs.get("share_features_extractor", True):
        raise ValueError("`policy_kwargs`: `shared_lstm=True` needs `share_features_extractor=True`")
