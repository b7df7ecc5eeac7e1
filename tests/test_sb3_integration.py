"""TRPO behaves like every other SB3 algorithm: save/load, VecNormalize, callbacks, logging, seeding, input checks."""

import subprocess
import sys

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.callbacks import BaseCallback, EvalCallback, StopTrainingOnMaxEpisodes
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize

from sb3_trpo_ext import TRPO
from tests.envs import TargetEnv


@pytest.mark.parametrize("env_id, kwargs", [("CartPole-v1", {}), ("Pendulum-v1", {"use_sde": True})])
def test_save_load_predict_identical_and_learning_continues(tmp_path, env_id, kwargs):
    model = TRPO("MlpPolicy", env_id, n_steps=64, batch_size=32, seed=0, **kwargs).learn(128)
    observations = np.stack([model.observation_space.sample() for _ in range(16)])
    expected, _ = model.predict(observations, deterministic=True)
    model.save(tmp_path / "model.zip")

    loaded = TRPO.load(tmp_path / "model.zip", env=make_vec_env(env_id, n_envs=1))
    actual, _ = loaded.predict(observations, deterministic=True)
    np.testing.assert_array_equal(actual, expected)
    for a, b in zip(model.policy.state_dict().values(), loaded.policy.state_dict().values(), strict=False):
        assert th.equal(a, b)
    assert loaded.policy.optimizer.state_dict()["state"].keys() == model.policy.optimizer.state_dict()["state"].keys()

    before = [p.detach().clone() for p in loaded._actor_params]
    loaded.learn(128, reset_num_timesteps=False)
    assert loaded.num_timesteps == 256
    assert any(not th.equal(b, p) for b, p in zip(before, loaded._actor_params, strict=False))
    # The reloaded critic optimizer still only holds critic parameters.
    actor_ids = {id(p) for p in loaded._actor_params}
    assert not any(id(p) in actor_ids for group in loaded.policy.optimizer.param_groups for p in group["params"])


def test_vec_normalize(tmp_path):
    env = VecNormalize(make_vec_env(TargetEnv, n_envs=2, seed=0))
    model = TRPO("MlpPolicy", env, n_steps=64, batch_size=64, seed=0).learn(256)
    assert env.obs_rms.count > 256
    env.save(tmp_path / "vecnormalize.pkl")
    model.save(tmp_path / "model.zip")
    eval_env = VecNormalize.load(tmp_path / "vecnormalize.pkl", make_vec_env(TargetEnv, n_envs=1))
    eval_env.training = False
    loaded = TRPO.load(tmp_path / "model.zip", env=eval_env)
    observation = eval_env.reset()
    np.testing.assert_allclose(observation, eval_env.normalize_obs(eval_env.get_original_obs()))
    action, _ = loaded.predict(observation, deterministic=True)
    assert action.shape == (1, 3)


class CountingCallback(BaseCallback):
    def __init__(self):
        super().__init__()
        self.calls = {"training_start": 0, "rollout_start": 0, "step": 0, "rollout_end": 0, "training_end": 0}

    def _on_training_start(self):
        self.calls["training_start"] += 1

    def _on_rollout_start(self):
        self.calls["rollout_start"] += 1

    def _on_step(self):
        self.calls["step"] += 1
        return True

    def _on_rollout_end(self):
        self.calls["rollout_end"] += 1

    def _on_training_end(self):
        self.calls["training_end"] += 1


def test_callbacks_are_called_and_can_stop_training(tmp_path):
    callback = CountingCallback()
    eval_callback = EvalCallback(make_vec_env("CartPole-v1"), n_eval_episodes=2, eval_freq=64, log_path=str(tmp_path))
    TRPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=32, seed=0).learn(192, callback=[callback, eval_callback])
    assert callback.calls == {"training_start": 1, "rollout_start": 3, "step": 192, "rollout_end": 3, "training_end": 1}
    assert len(np.load(tmp_path / "evaluations.npz")["timesteps"]) == 3

    model = TRPO("MlpPolicy", "CartPole-v1", n_steps=512, batch_size=64, seed=0)
    model.learn(10_000, callback=StopTrainingOnMaxEpisodes(max_episodes=2))
    assert model.num_timesteps < 512  # stopped inside the first rollout


def test_progress_bar():
    TRPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=32).learn(128, progress_bar=True)


LOGGER_KEYS = {
    "train/policy_objective",
    "train/value_loss",
    "train/kl_divergence",
    "train/explained_variance",
    "train/is_line_search_success",
    "train/line_search_backtracks",
    "train/cg_steps",
    "train/cg_residual",
    "train/step_size",
    "train/entropy_loss",
    "train/numerical_fault",
    "train/learning_rate",
    "train/n_updates",
}


def test_logger_keys_in_csv_and_tensorboard_style(tmp_path):
    from stable_baselines3.common.logger import configure

    model = TRPO("MlpPolicy", "Pendulum-v1", n_steps=64, batch_size=32, seed=0)
    model.set_logger(configure(str(tmp_path), ["csv"]))
    model.learn(192)
    header = (tmp_path / "progress.csv").read_text().splitlines()[0].split(",")
    assert LOGGER_KEYS | {"train/std"} <= set(header)


def test_same_seed_gives_identical_parameters():
    def train(seed):
        model = TRPO("MlpPolicy", "Pendulum-v1", n_steps=64, batch_size=32, seed=seed, use_sde=True).learn(128)
        return [p.detach().clone() for p in model.policy.parameters()]

    first, second, other = train(3), train(3), train(4)
    assert all(th.equal(a, b) for a, b in zip(first, second, strict=False))
    assert not all(th.equal(a, b) for a, b in zip(first, other, strict=False))


def test_device_argument():
    model = TRPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=32, device="cpu")
    assert model.device == th.device("cpu") and next(model.policy.parameters()).device == th.device("cpu")


def test_readme_one_liner_runs():
    code = "from sb3_trpo_ext import TRPO; TRPO('MlpPolicy', 'CartPole-v1').learn(2048)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


BAD_ARGUMENTS = [
    ("learning_rate", 0.0, ValueError),
    ("learning_rate", "fast", TypeError),
    ("n_steps", 0, ValueError),
    ("n_steps", 2048.0, TypeError),
    ("batch_size", 0, ValueError),
    ("gamma", 1.5, ValueError),
    ("gamma", float("nan"), ValueError),
    ("cg_max_steps", 0, ValueError),
    ("cg_damping", -0.1, ValueError),
    ("line_search_shrinking_factor", 1.0, ValueError),
    ("line_search_shrinking_factor", 0.0, ValueError),
    ("line_search_max_iter", 0, ValueError),
    ("n_critic_updates", -1, ValueError),
    ("gae_lambda", -0.1, ValueError),
    ("use_sde", "yes", TypeError),
    ("sde_sample_freq", -2, ValueError),
    ("normalize_advantage", 1, TypeError),
    ("target_kl", 0.0, ValueError),
    ("target_kl", -0.01, ValueError),
    ("target_kl", float("inf"), ValueError),
    ("sub_sampling_factor", 0, ValueError),
    ("ent_coef", -0.01, ValueError),
    ("fisher_sub_sampling_factor", 0, ValueError),
    ("cg_residual_tol", -1e-3, ValueError),
    ("line_search_accept_ratio", 1.0, ValueError),
    ("line_search_accept_ratio", -0.1, ValueError),
    ("stats_window_size", 0, ValueError),
    ("verbose", 3, ValueError),
    ("policy_kwargs", [1], TypeError),
]


@pytest.mark.parametrize("name, value, error", BAD_ARGUMENTS, ids=[f"{n}={v!r}" for n, v, _ in BAD_ARGUMENTS])
def test_bad_argument_is_rejected_at_construction_naming_it(name, value, error):
    with pytest.raises(error, match=f"`{name}`"):
        TRPO("MlpPolicy", "CartPole-v1", **{name: value})


def test_error_message_gives_value_and_allowed_range():
    with pytest.raises(ValueError, match=r"`target_kl` must be a finite number > 0.0, got -0.01"):
        TRPO("MlpPolicy", "CartPole-v1", target_kl=-0.01)
    with pytest.raises(ValueError, match=r"`line_search_shrinking_factor` must be a finite number > 0.0 and < 1.0"):
        TRPO("MlpPolicy", "CartPole-v1", line_search_shrinking_factor=1.2)


def test_single_sample_batch_with_advantage_normalization_is_rejected():
    with pytest.raises(ValueError, match=r"`n_steps \* n_envs` must be > 1"):
        TRPO("MlpPolicy", "CartPole-v1", n_steps=1)
    TRPO("MlpPolicy", "CartPole-v1", n_steps=1, batch_size=1, normalize_advantage=False)


def test_numpy_integers_and_floats_are_accepted():
    model = TRPO("MlpPolicy", "CartPole-v1", n_steps=np.int64(64), batch_size=np.int32(32), target_kl=np.float32(0.02))
    assert model.n_steps == 64
