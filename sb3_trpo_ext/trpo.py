"""Trust Region Policy Optimization for Stable-Baselines3."""

import io
import math
import pathlib
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, NamedTuple, TypeVar, cast

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common import utils as sb3_utils
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import (
    ActorCriticCnnPolicy,
    ActorCriticPolicy,
    BaseModel,
    BasePolicy,
    MultiInputActorCriticPolicy,
)
from stable_baselines3.common.save_util import load_from_zip_file
from stable_baselines3.common.type_aliases import (
    DictRolloutBufferSamples,
    GymEnv,
    MaybeCallback,
    PyTorchObs,
    RolloutBufferSamples,
    Schedule,
)
from stable_baselines3.common.utils import explained_variance
from stable_baselines3.common.vec_env import VecEnv
from torch import nn
from torch.nn import functional as F

from sb3_trpo_ext.common.checkpoints import (
    CONTRIB_TRPO,
    PPO,
    checkpoint_keys,
    checkpoint_writer,
    critic_optimizer_state,
    translated_checkpoint,
)
from sb3_trpo_ext.common.critic import regress_mlp
from sb3_trpo_ext.common.faults import (
    NonFiniteObservationCheck,
    ParameterSnapshot,
    non_finite_tensors,
    optimizer_tensors,
    rollout_fault,
)
from sb3_trpo_ext.common.mlp import LinearChain, actor_chain, critic_chain, single_threaded_blas, uses_standard_methods
from sb3_trpo_ext.common.rollout import collect_rollouts, fused_forward
from sb3_trpo_ext.common.trust_region import (
    TrustRegionConfig,
    TrustRegionStats,
    chain_fisher_vector_product,
    distribution_statistics,
    trust_region_update,
)
from sb3_trpo_ext.common.validation import (
    check_bool,
    check_device,
    check_float,
    check_int,
    check_no_foreign_arguments,
    check_optional_dict,
    check_optional_int,
    check_optional_path,
    check_optional_subclass,
    check_policy_fits_env,
    check_schedule,
    check_target_kl,
)

SelfTRPO = TypeVar("SelfTRPO", bound="TRPO")

SUPPORTED_ACTION_SPACES = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)


def subsample(observations: PyTorchObs, step: int) -> PyTorchObs:
    """
    Every ``step``-th sample of a batch of (possibly dict) observations.

    :param observations: Batch of observations
    :param step: Stride
    :return: The strided batch (a view)
    """
    if isinstance(observations, dict):
        return {key: value[::step] for key, value in observations.items()}
    return observations[::step]


def subsample_indices(batch: PyTorchObs, indices: th.Tensor) -> PyTorchObs:
    """
    The rows ``indices`` of a batch of (possibly dict) tensors.

    :param batch: Batch of tensors
    :param indices: Row indices
    :return: The selected rows
    """
    if isinstance(batch, dict):
        return {key: value[indices] for key, value in batch.items()}
    return batch[indices]


def subsample_rollout(rollout: NamedTuple, step: int) -> NamedTuple:
    """
    Every ``step``-th sample of every field of a rollout batch whose fields are all per-sample tensors (or dicts
    of them): SB3's rollout samples and sb3-contrib's maskable ones, whose action masks are then strided with
    the observations they belong to.

    :param rollout: Rollout batch (a named tuple of per-sample fields)
    :param step: Stride
    :return: A batch of the same type holding strided views
    """
    if step == 1:
        return rollout
    return rollout._replace(**{name: subsample(field, step) for name, field in rollout._asdict().items()})


def split_actor_critic(module: nn.Module, distribution: Distribution) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """
    Split trainable parameters by the autograd graph: the actor is whatever ``distribution`` depends on.

    This needs no naming convention, so custom policies, shared features extractors (which then belong to the
    actor: moving them moves the action distribution) and renamed modules are all handled.

    :param module: Policy owning the parameters
    :param distribution: Action distribution computed by ``module`` with gradients enabled
    :return: ``(actor parameters, critic parameters)`` in ``module.parameters()`` order
    """
    outputs = distribution_statistics(distribution)
    if outputs is None:
        outputs = [distribution.log_prob(distribution.get_actions().detach())]
    params = [p for p in module.parameters() if p.requires_grad]
    grads = th.autograd.grad(sum(o.sum() for o in outputs), params, allow_unused=True)  # type: ignore[arg-type]
    actor = [p for p, g in zip(params, grads, strict=True) if g is not None]
    critic = [p for p, g in zip(params, grads, strict=True) if g is None]
    return actor, critic


class TRPO(OnPolicyAlgorithm):
    """
    Trust Region Policy Optimization (TRPO) with an exact, analytic Fisher-vector product.

    Paper: https://arxiv.org/abs/1502.05477 (Schulman et al., 2015)

    Each update maximises the surrogate ``mean(ratio * advantage) + ent_coef * entropy`` subject to
    ``mean_s KL(pi_old(.|s) || pi_new(.|s)) <= target_kl``, where the KL is that of the *joint* action
    distribution (summed over action dimensions), as in the paper and PPO's ``target_kl``. The natural gradient
    direction comes from conjugate gradient on the damped Fisher, the step is scaled to the trust-region
    boundary and shrunk by a backtracking line search. The critic is then regressed on the returns; it never
    moves a parameter that influences the action distribution, so the KL bound holds after the whole update.

    :param policy: The policy model to use (MlpPolicy, CnnPolicy, MultiInputPolicy or an ``ActorCriticPolicy``
        subclass)
    :param env: The environment to learn from (if registered in Gym, can be str)
    :param learning_rate: Learning rate of the critic's optimizer, a float or a schedule of the remaining progress
        (from 1 to 0). The actor is moved by the trust-region step, not by this learning rate.
    :param n_steps: Number of steps to run for each environment per update (the batch is ``n_steps * n_envs``)
    :param batch_size: Minibatch size of the critic regression
    :param gamma: Discount factor
    :param cg_max_steps: Maximum number of conjugate gradient iterations (Fisher-vector products) per update
    :param cg_damping: Damping ``lambda`` added to the Fisher: conjugate gradient solves ``(F + lambda I) x = g``
    :param line_search_shrinking_factor: Step-fraction multiplier per backtracking iteration, in (0, 1)
    :param line_search_max_iter: Maximum number of candidate steps tried by the line search
    :param n_critic_updates: Number of epochs of critic minibatch updates per policy update
    :param gae_lambda: Bias/variance trade-off of the Generalized Advantage Estimator
    :param use_sde: Whether to use generalized State Dependent Exploration (gSDE)
    :param sde_sample_freq: Sample a new gSDE noise matrix every n steps (-1: only at the start of each rollout)
    :param rollout_buffer_class: Rollout buffer class to use. If ``None``, it is selected from the observation space.
    :param rollout_buffer_kwargs: Keyword arguments to pass to the rollout buffer on creation
    :param normalize_advantage: Whether to normalize the advantages of each batch
    :param target_kl: Trust-region radius: bound on the mean joint KL(old || new) of an accepted step
    :param sub_sampling_factor: Use every n-th sample of the batch for the whole policy step (gradient, Fisher and
        line search), as ``sb3_contrib.TRPO`` does; the critic always uses the full batch
    :param ent_coef: Entropy bonus coefficient of the surrogate objective
    :param fisher_sub_sampling_factor: Use every n-th sample of the policy batch for the Fisher-vector products
        only (the gradient and the line search keep the full batch), e.g. 5 as in OpenAI Baselines
    :param cg_residual_tol: Stop conjugate gradient once ``||g - A x|| <= cg_residual_tol * ||g||``
    :param line_search_accept_ratio: Accept a candidate step only if its surrogate improvement is at least this
        fraction of the first-order prediction ``g^T step``, in [0, 1)
    :param stats_window_size: Window size for the rollout logging, specifying the number of episodes to average
        the reported success rate, mean episode length, and mean reward over
    :param tensorboard_log: the log location for tensorboard (if None, no logging)
    :param policy_kwargs: additional arguments to be passed to the policy on creation
    :param verbose: Verbosity level: 0 for no output, 1 for info messages, 2 for debug messages
    :param seed: Seed for the pseudo random generators
    :param device: Device (cpu, cuda, ...) on which the code should be run.
        Setting it to auto, the code will be run on the GPU if possible.
    :param _init_setup_model: Whether or not to build the network at the creation of the instance
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": ActorCriticPolicy,
        "CnnPolicy": ActorCriticCnnPolicy,
        "MultiInputPolicy": MultiInputActorCriticPolicy,
    }
    policy: ActorCriticPolicy
    # What ``policy`` must subclass, and the action spaces it handles; variants narrow them.
    policy_base: ClassVar[type[BasePolicy]] = ActorCriticPolicy
    supported_action_spaces: ClassVar[tuple[type[spaces.Space], ...]] = SUPPORTED_ACTION_SPACES

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 1e-3,
        n_steps: int = 2048,
        batch_size: int = 128,
        gamma: float = 0.99,
        cg_max_steps: int = 15,
        cg_damping: float = 0.1,
        line_search_shrinking_factor: float = 0.8,
        line_search_max_iter: int = 10,
        n_critic_updates: int = 10,
        gae_lambda: float = 0.95,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        normalize_advantage: bool = True,
        target_kl: float = 0.01,
        sub_sampling_factor: int = 1,
        ent_coef: float = 0.0,
        fisher_sub_sampling_factor: int = 1,
        cg_residual_tol: float = 1e-10,
        line_search_accept_ratio: float = 0.1,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
        **kwargs: Any,
    ):
        # Keyword arguments only PPO takes end up here: refuse them by name instead of ignoring them. The checks
        # return plain Python numbers, so that NumPy scalars reach neither SB3 nor a saved checkpoint.
        check_no_foreign_arguments(kwargs)
        self._check_policy_argument(policy)
        learning_rate = check_schedule("learning_rate", learning_rate)
        n_steps = check_int("n_steps", n_steps, low=1)
        batch_size = check_int("batch_size", batch_size, low=1)
        gamma = check_float("gamma", gamma, 0.0, 1.0)
        cg_max_steps = check_int("cg_max_steps", cg_max_steps, low=1)
        cg_damping = check_float("cg_damping", cg_damping, low=0.0)
        line_search_shrinking_factor = check_float(
            "line_search_shrinking_factor", line_search_shrinking_factor, 0.0, 1.0, low_open=True, high_open=True
        )
        line_search_max_iter = check_int("line_search_max_iter", line_search_max_iter, low=1)
        n_critic_updates = check_int("n_critic_updates", n_critic_updates, low=0)
        gae_lambda = check_float("gae_lambda", gae_lambda, 0.0, 1.0)
        use_sde = check_bool("use_sde", use_sde)
        sde_sample_freq = check_int("sde_sample_freq", sde_sample_freq, low=-1)
        normalize_advantage = check_bool("normalize_advantage", normalize_advantage)
        target_kl = check_target_kl(target_kl)
        sub_sampling_factor = check_int("sub_sampling_factor", sub_sampling_factor, low=1)
        ent_coef = check_float("ent_coef", ent_coef, low=0.0)
        fisher_sub_sampling_factor = check_int("fisher_sub_sampling_factor", fisher_sub_sampling_factor, low=1)
        cg_residual_tol = check_float("cg_residual_tol", cg_residual_tol, low=0.0)
        line_search_accept_ratio = check_float("line_search_accept_ratio", line_search_accept_ratio, 0.0, 1.0, high_open=True)
        stats_window_size = check_int("stats_window_size", stats_window_size, low=1, high=sys.maxsize)  # a deque's maxlen
        verbose = check_int("verbose", verbose, low=0, high=2)
        check_optional_dict("policy_kwargs", policy_kwargs)
        check_optional_dict("rollout_buffer_kwargs", rollout_buffer_kwargs)
        check_optional_subclass("rollout_buffer_class", rollout_buffer_class, RolloutBuffer)
        check_optional_int("seed", seed, low=0, high=2**32 - 1)  # NumPy's seed range
        check_optional_path("tensorboard_log", tensorboard_log)
        if tensorboard_log is not None and sb3_utils.SummaryWriter is None:
            # SB3 would only fail at the start of learn().
            raise ValueError("`tensorboard_log` is set but tensorboard is not installed: `pip install tensorboard`")
        check_device(device)

        try:
            super().__init__(
                policy,
                env,
                learning_rate=learning_rate,
                n_steps=n_steps,
                gamma=gamma,
                gae_lambda=gae_lambda,
                ent_coef=ent_coef,
                vf_coef=0.0,  # the critic has its own regression, not a weighted term of one loss
                max_grad_norm=0.0,  # the trust region bounds the actor step; no gradient clipping
                use_sde=use_sde,
                sde_sample_freq=sde_sample_freq,
                rollout_buffer_class=rollout_buffer_class,
                rollout_buffer_kwargs=rollout_buffer_kwargs,
                stats_window_size=stats_window_size,
                tensorboard_log=tensorboard_log,
                policy_kwargs=policy_kwargs,
                verbose=verbose,
                device=device,
                seed=seed,
                _init_setup_model=False,
            )
        except ValueError as error:
            # Name the argument in SB3's own checks of the environment.
            if use_sde and "gSDE" in str(error):
                raise ValueError(f"`use_sde=True` needs a Box action space, got {self.action_space}") from error
            if "MultiInputPolicy" in str(error):
                raise ValueError(f"`policy`: {error}") from error
            raise

        if self.env is not None:
            check_policy_fits_env(policy, self.observation_space, policy_kwargs or {}, rollout_buffer_class)
            if not isinstance(self.action_space, self.supported_action_spaces):
                raise TypeError(
                    f"{type(self).__name__} does not support the action space {self.action_space}: the env's action "
                    f"space must be one of {', '.join(s.__name__ for s in self.supported_action_spaces)}"
                )
            buffer_size = self.n_envs * n_steps
            for name, factor in (
                ("sub_sampling_factor", sub_sampling_factor),
                ("fisher_sub_sampling_factor", fisher_sub_sampling_factor),
            ):
                # Beyond the rollout size every factor keeps one sample; torch's slicing overflows for huge ones.
                check_int(name, factor, low=1, high=buffer_size)
            if normalize_advantage and buffer_size <= 1:
                raise ValueError(
                    f"`n_steps * n_envs` must be > 1 when `normalize_advantage=True` (the advantage std is undefined "
                    f"for one sample), got n_steps={n_steps} and n_envs={self.n_envs}"
                )
            if batch_size > buffer_size:
                warnings.warn(
                    f"The critic minibatch size `batch_size={batch_size}` exceeds the rollout size "
                    f"`n_steps * n_envs = {buffer_size}`: every epoch is one minibatch of {buffer_size} samples.",
                    stacklevel=2,
                )
            elif buffer_size % batch_size > 0:
                warnings.warn(
                    f"The critic minibatch size `batch_size={batch_size}` does not divide the rollout size "
                    f"`n_steps * n_envs = {buffer_size}`: every epoch ends with a truncated minibatch of "
                    f"{buffer_size % batch_size} samples.",
                    stacklevel=2,
                )

        self.batch_size = batch_size
        self.cg_max_steps = cg_max_steps
        self.cg_damping = cg_damping
        self.cg_residual_tol = cg_residual_tol
        self.line_search_shrinking_factor = line_search_shrinking_factor
        self.line_search_max_iter = line_search_max_iter
        self.line_search_accept_ratio = line_search_accept_ratio
        self.n_critic_updates = n_critic_updates
        self.normalize_advantage = normalize_advantage
        self.target_kl = target_kl
        self.sub_sampling_factor = sub_sampling_factor
        self.fisher_sub_sampling_factor = fisher_sub_sampling_factor

        if _init_setup_model:
            self._setup_model()

    @classmethod
    def _check_policy_argument(cls, policy: Any) -> None:
        """
        Check ``policy``: one of the aliases or a subclass of ``policy_base``.

        :param policy: The ``policy`` argument
        """
        allowed = f"a subclass of {cls.policy_base.__name__} or one of {list(cls.policy_aliases)}"
        if isinstance(policy, str):
            if policy not in cls.policy_aliases:
                raise ValueError(f"`policy` must be {allowed}, got {policy!r}")
        elif not (isinstance(policy, type) and issubclass(policy, cls.policy_base)):
            raise TypeError(f"`policy` must be {allowed}, got {policy!r}")

    def _setup_model(self) -> None:
        super()._setup_model()
        self._actor_params, self._critic_params = split_actor_critic(self.policy, self._probe_distribution())
        if not self._actor_params:
            raise ValueError("The policy's action distribution depends on no trainable parameter")
        if not self._critic_params:
            raise ValueError("The policy has no trainable critic parameter that leaves the action distribution unchanged")
        # The critic's optimizer must never see actor parameters: any move of theirs would break the KL bound.
        optimizer_kwargs = dict(self.policy.optimizer_kwargs)
        if self.policy.optimizer_class is th.optim.Adam and not {"fused", "foreach"} & optimizer_kwargs.keys():
            # One kernel per step instead of a loop over tensors: the critic takes many small steps.
            optimizer_kwargs["fused"] = True
        self.policy.optimizer = self.policy.optimizer_class(
            self._critic_params,
            lr=self.lr_schedule(1),
            **optimizer_kwargs,  # type: ignore[call-arg]
        )

    def _probe_distribution(self) -> Distribution:
        """Action distribution on one sample observation, with gradients, used to find the actor parameters."""
        training = self.policy.training
        self.policy.set_training_mode(False)  # batch norm etc. cannot run in train mode on a single sample
        try:
            observation, _ = self.policy.obs_to_tensor(self.observation_space.sample())
            return self._first_step_distribution(observation)
        finally:
            self.policy.set_training_mode(training)

    def _first_step_distribution(self, observation: PyTorchObs) -> Distribution:
        """
        Hook: the action distribution on a batch of observations, each the first of an episode.

        :param observation: Batch of observations
        :return: The distribution, with gradients
        """
        return self.policy.get_distribution(observation)

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_actor_params", "_critic_params"]

    @classmethod
    def load(  # type: ignore[override]
        cls: type[SelfTRPO],
        path: str | pathlib.Path | io.BufferedIOBase,
        env: GymEnv | None = None,
        device: th.device | str = "auto",
        custom_objects: dict[str, Any] | None = None,
        print_system_info: bool = False,
        force_reset: bool = True,
        **kwargs: Any,
    ) -> SelfTRPO:
        """
        Load a model from a zip file written by this class, by ``stable_baselines3.PPO`` or by ``sb3_contrib.TRPO``.

        A foreign checkpoint's weights load unchanged (same ``predict``); its constructor data is mapped (see
        :func:`sb3_trpo_ext.common.checkpoints.translate_data`, each change is reported in a ``UserWarning``) and
        the optimizer keeps the critic's part of its state. Keyword arguments override the stored values, as in SB3.

        :param path: Path to the file (or a file-like object)
        :param env: Environment the model will run on (may be ``None`` for prediction only)
        :param device: Device on which the code should run
        :param custom_objects: Objects to substitute when unpickling, as in SB3
        :param print_system_info: Print the system info of the saved model and of this machine
        :param force_reset: Reset the environment before the next ``learn()``
        :param kwargs: Attributes to set on the model, overriding the stored ones
        :return: The model
        """
        writer = checkpoint_writer(checkpoint_keys(path))
        notes: list[str] = []
        if writer in (PPO, CONTRIB_TRPO):
            path, notes = translated_checkpoint(path, writer, custom_objects)
        model = super().load(path, env, device, custom_objects, print_system_info, force_reset, **kwargs)
        notes = [note for note in notes if note.split("=")[0] not in kwargs]  # the caller chose those values
        if notes:
            warnings.warn(f"Loaded a {writer} checkpoint into TRPO: {'; '.join(notes)}.", stacklevel=2)
        return model

    def set_parameters(
        self,
        load_path_or_dict: str | pathlib.Path | io.BufferedIOBase | dict[str, Any],
        exact_match: bool = True,
        device: th.device | str = "auto",
    ) -> None:
        """
        As SB3's, and also accepts the optimizer state of PPO and ``sb3_contrib.TRPO``, whose optimizer holds every
        policy parameter: each critic parameter keeps its state, the actor's is dropped.

        :param load_path_or_dict: Checkpoint or the dict of its parameters
        :param exact_match: Require an entry for every module and optimizer
        :param device: Device to load the parameters to
        """
        params: dict[str, Any]
        if isinstance(load_path_or_dict, dict):
            params = load_path_or_dict
        else:
            _, loaded, _ = load_from_zip_file(load_path_or_dict, device=device, load_data=False)
            assert loaded is not None
            params = loaded
        saved = cast("dict[str, Any] | None", params.get("policy.optimizer"))
        all_params = list(self.policy.parameters())
        n_saved = 0 if saved is None else sum(len(group["params"]) for group in saved["param_groups"])
        if saved is not None and n_saved == len(all_params) != len(self._critic_params):
            template = self.policy.optimizer.state_dict()
            params = {**params, "policy.optimizer": critic_optimizer_state(saved, all_params, self._critic_params, template)}
        super().set_parameters(params, exact_match=exact_match, device=device)

    def _init_callback(self, callback: MaybeCallback, progress_bar: bool = False) -> BaseCallback:
        # The observation check runs first, so that neither the user's callbacks nor the policy see a NaN.
        callbacks = [] if callback is None else list(callback) if isinstance(callback, list) else [callback]
        return super()._init_callback([NonFiniteObservationCheck(), *callbacks], progress_bar)

    @property
    def trust_region_config(self) -> TrustRegionConfig:
        """The trust-region hyperparameters as currently set on the model."""
        return TrustRegionConfig(
            target_kl=self.target_kl,
            cg_max_steps=self.cg_max_steps,
            cg_damping=self.cg_damping,
            cg_residual_tol=self.cg_residual_tol,
            line_search_shrinking_factor=self.line_search_shrinking_factor,
            line_search_max_iter=self.line_search_max_iter,
            line_search_accept_ratio=self.line_search_accept_ratio,
        )

    def surrogate_objective(
        self, actions: th.Tensor, old_log_prob: th.Tensor, advantages: th.Tensor
    ) -> Callable[[Distribution], th.Tensor]:
        """
        The function maximised by the policy step: ``mean(ratio * A) + ent_coef * entropy``.

        :param actions: Actions of the policy batch
        :param old_log_prob: Their log-probabilities under the policy that collected them
        :param advantages: Their (normalized) advantages
        :return: Objective as a function of the new action distribution
        """

        def objective(distribution: Distribution) -> th.Tensor:
            log_prob = distribution.log_prob(actions)
            value = (th.exp(log_prob - old_log_prob) * advantages).mean()
            if self.ent_coef > 0:
                entropy = distribution.entropy()
                value = value + self.ent_coef * (-log_prob.mean() if entropy is None else entropy.mean())
            return value

        return objective

    def _policy_batch(self, rollout: NamedTuple, step: int) -> NamedTuple:
        """
        Hook: the part of a rollout batch the policy step uses, every ``step``-th sample (``sub_sampling_factor``,
        then ``fisher_sub_sampling_factor`` on the result).

        :param rollout: Rollout batch
        :param step: Stride
        :return: A batch of the same type
        """
        return subsample_rollout(rollout, step)

    def _action_distribution(self, batch: NamedTuple) -> Distribution:
        """
        Hook: the action distribution of the current policy on a batch from :meth:`_policy_batch`, one row per
        sample of :meth:`_surrogate_samples`. The surrogate, the KL and the Fisher all evaluate it.

        :param batch: Policy batch
        :return: The distribution, with gradients
        """
        return self.policy.get_distribution(batch.observations)  # type: ignore[attr-defined]

    def _surrogate_samples(self, batch: NamedTuple) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """
        Hook: the per-sample tensors of the surrogate, aligned with the rows of :meth:`_action_distribution`.

        :param batch: Policy batch
        :return: ``(actions, old log-probabilities, advantages)``
        """
        return batch.actions, batch.old_log_prob, batch.advantages  # type: ignore[attr-defined]

    def _policy_step(self, rollout: NamedTuple) -> TrustRegionStats:
        """
        Trust-region step of the actor.

        :param rollout: The whole rollout as one batch
        :return: Statistics of the step
        """
        batch = self._policy_batch(rollout, self.sub_sampling_factor)
        fisher_batch = self._policy_batch(batch, self.fisher_sub_sampling_factor)
        actions, old_log_prob, advantages = self._surrogate_samples(batch)
        if isinstance(self.action_space, spaces.Discrete):
            actions = actions.long().flatten()
        if self.normalize_advantage and len(advantages) > 1:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

        stats = trust_region_update(
            self._actor_params,
            self.surrogate_objective(actions, old_log_prob, advantages),
            distribution_fn=lambda: self._action_distribution(batch),
            fisher_distribution_fn=lambda: self._action_distribution(fisher_batch),
            config=self.trust_region_config,
            fisher_product_fn=lambda: self._fisher_product(fisher_batch),
        )
        self.logger.record("train/entropy_loss", -stats.entropy)
        return stats

    def _fisher_product(self, batch: NamedTuple) -> Callable[[th.Tensor], th.Tensor] | None:
        """
        Hook: ``v -> F v`` on a Fisher batch computed by hand (:func:`chain_fisher_vector_product`) when the actor is
        SB3's standard MLP head on parameter-free features; ``None`` lets the generic autograd product run.

        :param batch: Fisher batch from :meth:`_policy_batch`
        :return: The product at the current parameters, or ``None``
        """
        policy = self.policy
        chain = actor_chain(policy)
        actor_ids = {id(p) for p in self._actor_params}
        if chain is None or any(id(p) in actor_ids for p in policy.pi_features_extractor.parameters()):
            return None
        with th.no_grad():
            features = BaseModel.extract_features(policy, batch.observations, policy.pi_features_extractor)  # type: ignore[attr-defined]
            distribution = self._action_distribution(batch)
        if not isinstance(features, th.Tensor):
            return None
        return chain_fisher_vector_product(self._actor_params, chain, features, distribution, getattr(policy, "log_std", None))

    def _critic_inputs(self, observations: PyTorchObs) -> tuple[PyTorchObs, Callable[[PyTorchObs], th.Tensor]]:
        """
        What the critic regression iterates over, and the value function of it.

        When nothing the critic trains computes the critic's features (a parameter-free extractor, or one shared
        with the actor and therefore frozen here), they are the same in every minibatch step: compute them once.

        :param observations: The whole rollout's observations
        :return: Per-sample inputs and the function mapping a minibatch of them to values
        """
        policy = self.policy
        if self._critic_reads_fixed_features():
            with th.no_grad():
                features = BaseModel.extract_features(policy, observations, policy.vf_features_extractor)
            return features, lambda batch: policy.value_net(policy.mlp_extractor.forward_critic(batch))
        return observations, policy.predict_values

    def _critic_reads_fixed_features(self) -> bool:
        """Whether the critic is SB3's value head on features of an extractor that the critic does not train."""
        policy = self.policy
        critic_ids = {id(p) for p in self._critic_params}
        return uses_standard_methods(policy, ("predict_values",)) and not any(
            id(p) in critic_ids for p in policy.vf_features_extractor.parameters()
        )

    def _critic_chain(self) -> LinearChain | None:
        """The critic as a chain of linear layers on fixed features, when :func:`regress_mlp` can train it."""
        return critic_chain(self.policy) if self._critic_reads_fixed_features() else None

    @contextmanager
    def _frozen_actor(self) -> Iterator[None]:
        """
        Within the block, the actor's parameters do not require gradients: shared parts of the network are
        forwarded by the critic regression but never moved (the critic's optimizer does not hold them either).
        """
        for param in self._actor_params:
            param.requires_grad_(False)
        try:
            yield
        finally:
            for param in self._actor_params:
                param.requires_grad_(True)

    def _critic_gradient_step(self, loss: th.Tensor) -> None:
        """
        One optimizer step of the critic's parameters on ``loss`` (gradients of the critic only, by autograd).

        :param loss: Scalar critic loss
        """
        params = self._critic_params
        for param, grad in zip(params, th.autograd.grad(loss, params, allow_unused=True), strict=True):
            param.grad = grad
        self.policy.optimizer.step()

    def _critic_step(self, rollout: RolloutBufferSamples | DictRolloutBufferSamples) -> float:
        """
        Regress the critic on the returns: ``n_critic_updates`` epochs of ``batch_size`` minibatches, by hand for
        the standard MLP critic (:func:`regress_mlp`), through autograd otherwise.

        :param rollout: The whole rollout as one batch
        :return: Mean value loss
        """
        inputs, value_fn = self._critic_inputs(rollout.observations)
        chain = self._critic_chain()
        if chain is not None:
            assert isinstance(inputs, th.Tensor)
            loss = regress_mlp(chain, inputs, rollout.returns, self.policy.optimizer, self.n_critic_updates, self.batch_size)
            if loss is not None:
                return loss
        return self._critic_step_autograd(inputs, value_fn, rollout.returns)

    def _critic_step_autograd(
        self, inputs: PyTorchObs, value_fn: Callable[[PyTorchObs], th.Tensor], returns: th.Tensor
    ) -> float:
        """
        The critic regression through autograd and the critic's optimizer: any critic architecture and optimizer.

        :param inputs: Per-sample inputs of ``value_fn``
        :param value_fn: Maps a minibatch of inputs to values
        :param returns: Regression targets
        :return: Mean value loss
        """
        losses = []
        with self._frozen_actor():
            for _ in range(self.n_critic_updates):
                for indices in th.randperm(len(returns), device=returns.device).split(self.batch_size):
                    loss = F.mse_loss(value_fn(subsample_indices(inputs, indices)).flatten(), returns[indices])
                    self._critic_gradient_step(loss)
                    losses.append(loss.detach())
        return th.stack(losses).mean().item() if losses else float("nan")

    def _critic_fault(self, value_loss: float) -> str | None:
        """
        Why the critic regression that just ran must be undone, or ``None``.

        :param value_loss: What :meth:`_critic_step` returned
        :return: The cause
        """
        if self.n_critic_updates > 0 and not math.isfinite(value_loss):
            return f"non-finite value loss ({value_loss})"
        if non_finite_tensors(self._critic_params):
            return "non-finite critic parameters after the critic regression"
        if non_finite_tensors(optimizer_tensors(self.policy.optimizer)):
            return "non-finite critic optimizer state after the critic regression"
        return None

    def collect_rollouts(
        self,
        env: VecEnv,
        callback: BaseCallback,
        rollout_buffer: RolloutBuffer,
        n_rollout_steps: int,
    ) -> bool:
        """
        SB3's rollout loop, with the policy call evaluated in NumPy where the policy allows it (see
        :mod:`sb3_trpo_ext.common.rollout`): the same actions, values and log-probabilities for the same seed.
        """
        forward = fused_forward(self.policy)
        if forward is None:
            return super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)
        return collect_rollouts(self, forward, env, callback, rollout_buffer, n_rollout_steps)

    def train(self) -> None:
        """
        Update the actor with one trust-region step, then regress the critic. The update is all or nothing: a
        numerical fault anywhere (see :mod:`sb3_trpo_ext.common.faults`) leaves every parameter and the critic
        optimizer's state as they were, with a warning and ``train/numerical_fault = 1``.
        """
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)

        with single_threaded_blas():  # the hand-written MLP arithmetic calls OpenBLAS on the CPU
            rollout = next(self.rollout_buffer.get(batch_size=None))
            value_loss, critic_fault = float("nan"), False
            fault = rollout_fault(self.rollout_buffer)
            if fault is not None:
                stats = TrustRegionStats(objective=float("nan"), fault=fault)
            else:
                snapshot = ParameterSnapshot.take([*self._actor_params, *self._critic_params], self.policy.optimizer)
                stats = self._policy_step(rollout)  # leaves the actor bit-identical itself on a fault
                if stats.fault is None:
                    value_loss = self._critic_step(rollout)
                    fault = self._critic_fault(value_loss)
                    if fault is not None:
                        snapshot.restore()
                        critic_fault = True
                        stats = TrustRegionStats(objective=float("nan"), fault=fault)
                fault = stats.fault
        if fault is not None:
            warnings.warn(
                f"TRPO skipped update {self._n_updates + 1} ({fault}): every parameter and the optimizer state are unchanged",
                stacklevel=2,
            )
        self._n_updates += 1

        buffer = self.rollout_buffer
        self.logger.record("train/policy_objective", stats.objective)
        self.logger.record("train/kl_divergence", stats.kl)
        self.logger.record("train/is_line_search_success", float(stats.success))
        self.logger.record("train/line_search_backtracks", stats.n_backtracks)
        self.logger.record("train/cg_steps", stats.cg_steps)
        self.logger.record("train/cg_residual", stats.cg_residual)
        self.logger.record("train/step_size", stats.step_size)
        self.logger.record("train/numerical_fault", float(stats.fault is not None))
        self.logger.record("train/critic_fault", float(critic_fault))
        self.logger.record("train/value_loss", value_loss)
        finite = np.isfinite(buffer.returns).all()  # NumPy would warn on a faulty rollout's returns
        ev = explained_variance(buffer.values.flatten(), buffer.returns.flatten()) if finite else float("nan")
        self.logger.record("train/explained_variance", ev)
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", th.exp(self.policy.log_std).mean().item())
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")

    def learn(
        self: SelfTRPO,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str | None = None,
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfTRPO:
        """
        SB3's ``learn``; ``tb_log_name`` defaults to the class name (``TRPO``, ``RecurrentTRPO``, ``MaskableTRPO``).
        """
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=type(self).__name__ if tb_log_name is None else tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )
