"""The fault matrix: each fault either skips the whole update bit-identically or stops with a clear error."""

import copy
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.save_util import load_from_zip_file
from stable_baselines3.common.vec_env import VecCheckNan

from sb3_trpo_ext import TRPO
from sb3_trpo_ext.common.faults import NonFiniteObservationError
from tests.envs import NonFiniteAt, TargetEnv

N_STEPS = 64


class StateBeforeTrain(BaseCallback):
    """Copies every parameter and the optimizer state when a rollout is complete, just before `train()`."""

    def __init__(self):
        super().__init__()
        self.states = []

    def _on_rollout_end(self):
        self.states.append(model_state(self.model))

    def _on_step(self):
        return True


def model_state(model):
    return copy.deepcopy(model.policy.state_dict()), copy.deepcopy(model.policy.optimizer.state_dict()["state"])


def assert_state_equal(before, after):
    (params_before, optimizer_before), (params_after, optimizer_after) = before, after
    assert params_before.keys() == params_after.keys()
    for name in params_before:
        assert th.equal(params_before[name], params_after[name]), name
    assert optimizer_before.keys() == optimizer_after.keys()
    for index, state in optimizer_before.items():
        for key, value in state.items():
            assert th.equal(value, optimizer_after[index][key]), (index, key)


def assert_saved_weights_finite(model, path):
    model.save(path)
    _, params, _ = load_from_zip_file(path)
    tensors = list(params["policy"].values())
    tensors += [v for s in params["policy.optimizer"]["state"].values() for v in s.values() if isinstance(v, th.Tensor)]
    assert all(th.isfinite(t).all() for t in tensors)


def faulty_env(field, at, value=float("nan"), env_cls=TargetEnv):
    return make_vec_env(lambda: NonFiniteAt(env_cls(), field, at, value), n_envs=1)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_reward_skips_the_update_bit_identically(tmp_path, value, recording_logger):
    # The fault comes in the second rollout: the first update moves an optimizer with state to protect.
    model = TRPO("MlpPolicy", faulty_env("reward", N_STEPS + 10, value), n_steps=N_STEPS, batch_size=32, seed=0)
    logger, _ = recording_logger
    model.set_logger(logger)
    before = StateBeforeTrain()
    with pytest.warns(UserWarning, match=r"skipped update 2 \(non-finite (rewards|returns)"):
        model.learn(2 * N_STEPS, callback=before)
    assert_state_equal(before.states[1], model_state(model))
    assert logger.name_to_value["train/numerical_fault"] == 1.0  # SB3 dumps before train(): the last update is here

    # The next, clean rollout trains as usual.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.learn(N_STEPS, callback=before, reset_num_timesteps=False)
    assert logger.name_to_value["train/numerical_fault"] == 0.0
    assert not th.equal(before.states[2][0]["action_net.weight"], model.policy.action_net.weight)
    assert_saved_weights_finite(model, tmp_path / "model.zip")


@pytest.mark.parametrize("at", [10, 20], ids=["step", "terminal-observation"])  # TargetEnv truncates after 20 steps
def test_non_finite_observation_stops_learning_with_a_clear_error(tmp_path, at):
    model = TRPO("MlpPolicy", faulty_env("observation", N_STEPS + at), n_steps=N_STEPS, batch_size=32, seed=0)
    model.learn(N_STEPS)
    state = model_state(model)
    with pytest.raises(NonFiniteObservationError, match=r"non-finite observation.*VecCheckNan"):
        model.learn(N_STEPS, reset_num_timesteps=False)
    assert_state_equal(state, model_state(model))
    assert_saved_weights_finite(model, tmp_path / "model.zip")


def test_non_finite_observation_is_refused_before_a_discrete_policy_samples_from_it():
    model = TRPO("MlpPolicy", faulty_env("observation", 5, env_cls=lambda: gym.make("CartPole-v1")))
    with pytest.raises(NonFiniteObservationError, match="from a step, after 5 steps"):
        model.learn(N_STEPS)


def test_diverging_critic_is_rolled_back_with_actor_and_optimizer(tmp_path, recording_logger):
    # A learning rate of 1e30 sends the critic's weights to ~1e30 after one Adam step; the next loss overflows.
    model = TRPO("MlpPolicy", TargetEnv(), n_steps=N_STEPS, batch_size=16, learning_rate=1e30, seed=0)
    logger, _ = recording_logger
    model.set_logger(logger)
    before = StateBeforeTrain()
    with pytest.warns(UserWarning, match=r"skipped update 1 \(non-finite (value loss|critic)"):
        model.learn(N_STEPS, callback=before)
    row = logger.name_to_value
    assert row["train/numerical_fault"] == 1.0 and row["train/critic_fault"] == 1.0
    assert row["train/is_line_search_success"] == 0.0 and row["train/kl_divergence"] == 0.0
    assert_state_equal(before.states[0], model_state(model))  # the accepted policy step is undone too
    assert_saved_weights_finite(model, tmp_path / "model.zip")


def test_vec_check_nan_raises_at_the_source():
    env = VecCheckNan(faulty_env("reward", 7), raise_exception=True)
    model = TRPO("MlpPolicy", env, n_steps=N_STEPS, batch_size=32, seed=0)
    with pytest.raises(ValueError, match="nan"):
        model.learn(N_STEPS)
    assert model.num_timesteps < 7 + 1


def test_finite_training_is_not_affected_by_the_checks(recording_logger):
    model = TRPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=2), n_steps=N_STEPS, batch_size=32, seed=0)
    logger, writer = recording_logger
    model.set_logger(logger)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.learn(8 * N_STEPS)
    rows = [*writer.rows, logger.name_to_value]
    faults = [row["train/numerical_fault"] for row in rows if "train/numerical_fault" in row]
    assert faults == [0.0] * 4
    assert np.isfinite([row["train/value_loss"] for row in rows if "train/value_loss" in row]).all()


def test_candidate_steps_that_make_the_distribution_invalid_are_rejected_not_raised():
    # Found by tests/test_bad_inputs.py: a huge trust region lets candidate steps drive the Gaussian's standard
    # deviation to 0, which torch refuses to build a distribution from.
    model = TRPO("MlpPolicy", "Pendulum-v1", n_steps=16, batch_size=8, normalize_advantage=False, target_kl=21135.0, seed=0)
    model.learn(5 * 16)
    assert all(th.isfinite(p).all() for p in model.policy.parameters())
