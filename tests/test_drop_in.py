"""Swapping TRPO in for PPO, loading PPO and sb3-contrib checkpoints, determinism and resuming."""

import csv
import inspect
import warnings

import numpy as np
import pytest
import torch as th
from sb3_contrib import TRPO as ContribTRPO
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import configure

from sb3_trpo_ext import TRPO
from sb3_trpo_ext.common.validation import PPO_ONLY_ARGUMENTS
from tests.envs import TargetEnv

PPO_ONLY_EQUIVALENTS = {
    "n_epochs": "n_critic_updates",
    "clip_range": "target_kl",
    "clip_range_vf": "critic is regressed",
    "vf_coef": "own regression",
    "max_grad_norm": "trust region",
}


def ppo_parameters():
    return inspect.signature(PPO).parameters


def test_every_ppo_keyword_is_either_ours_or_refused_by_name():
    ours = inspect.signature(TRPO).parameters
    for name in ppo_parameters():
        assert name in ours or name in PPO_ONLY_ARGUMENTS, name
    assert set(PPO_ONLY_ARGUMENTS) == set(PPO_ONLY_EQUIVALENTS)


@pytest.mark.parametrize("name", list(PPO_ONLY_EQUIVALENTS))
def test_ppo_only_keyword_raises_type_error_naming_our_equivalent(name):
    value = ppo_parameters()[name].default
    with pytest.raises(TypeError, match=rf"PPO-only argument `{name}`.*{PPO_ONLY_EQUIVALENTS[name]}"):
        TRPO("MlpPolicy", "CartPole-v1", **{name: 0.2 if value is None else value})


def test_unknown_keyword_raises_type_error():
    with pytest.raises(TypeError, match="unexpected keyword argument `n_epoch`"):
        TRPO("MlpPolicy", "CartPole-v1", n_epoch=3)


def test_shared_ppo_keywords_with_ppo_defaults_mean_the_same():
    shared = {
        name: p.default
        for name, p in ppo_parameters().items()
        if name not in PPO_ONLY_ARGUMENTS and p.default is not inspect.Parameter.empty and name != "target_kl"
    }
    # Non-default values, so that a silently ignored argument would show.
    shared |= dict(learning_rate=3e-4, n_steps=128, batch_size=64, gamma=0.98, gae_lambda=0.9, ent_coef=0.01, seed=3)
    shared |= dict(normalize_advantage=False, stats_window_size=7, device="cpu")
    env = make_vec_env("Pendulum-v1", n_envs=2)
    trpo, ppo = TRPO("MlpPolicy", env, **shared), PPO("MlpPolicy", env, **shared)
    for name in ("learning_rate", "n_steps", "batch_size", "gamma", "gae_lambda", "ent_coef", "seed"):
        assert getattr(trpo, name) == getattr(ppo, name), name
    assert trpo.normalize_advantage == ppo.normalize_advantage
    assert trpo.lr_schedule(1.0) == ppo.lr_schedule(1.0)
    assert trpo._stats_window_size == ppo._stats_window_size == 7
    assert trpo.device == ppo.device
    buffers = trpo.rollout_buffer, ppo.rollout_buffer
    described = {(b.buffer_size, b.n_envs, b.gamma, b.gae_lambda, type(b)) for b in buffers}
    assert described == {(128, 2, 0.98, 0.9, type(buffers[1]))}
    # Same architecture and, from the same seed, the same initial weights.
    for a, b in zip(trpo.policy.state_dict().values(), ppo.policy.state_dict().values(), strict=True):
        assert th.equal(a, b)


def test_ppo_target_kl_none_is_refused_with_the_allowed_range():
    with pytest.raises(TypeError, match=r"`target_kl` must be a finite number > 0.0.*leave the argument out"):
        TRPO("MlpPolicy", "CartPole-v1", target_kl=None)
    assert TRPO("MlpPolicy", "CartPole-v1", target_kl=0.02).target_kl == 0.02


def probe_observations(model, n=32):
    model.observation_space.seed(123)
    return np.stack([model.observation_space.sample() for _ in range(n)])


def assert_same_policy(original, loaded):
    observations = probe_observations(original)
    expected, _ = original.predict(observations, deterministic=True)
    actual, _ = loaded.predict(observations, deterministic=True)
    np.testing.assert_array_equal(actual, expected)
    for (name, a), b in zip(original.policy.state_dict().items(), loaded.policy.state_dict().values(), strict=True):
        assert th.equal(a, b), name


def assert_training_continues(loaded, recording_logger, steps):
    loaded.set_logger(recording_logger[0])
    before_actor = [p.detach().clone() for p in loaded._actor_params]
    before_critic = [p.detach().clone() for p in loaded._critic_params]
    start = loaded.num_timesteps
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fault, no other surprise
        loaded.learn(steps, reset_num_timesteps=False)
    assert loaded.num_timesteps == start + steps
    row = recording_logger[0].name_to_value
    assert row["train/is_line_search_success"] == 1.0 and row["train/kl_divergence"] <= loaded.target_kl
    assert any(not th.equal(b, p) for b, p in zip(before_actor, loaded._actor_params, strict=True))
    assert any(not th.equal(b, p) for b, p in zip(before_critic, loaded._critic_params, strict=True))
    # The optimizer still only holds critic parameters.
    optimizer_ids = {id(p) for group in loaded.policy.optimizer.param_groups for p in group["params"]}
    assert optimizer_ids == {id(p) for p in loaded._critic_params}


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_ppo_checkpoint_warm_starts_trpo(tmp_path, env_id, recording_logger):
    ppo = PPO("MlpPolicy", env_id, n_steps=64, batch_size=32, n_epochs=4, seed=0).learn(128)
    ppo.save(tmp_path / "ppo_model.zip")

    with pytest.warns(UserWarning, match="stable_baselines3.PPO checkpoint.*n_epochs=4.*target_kl=None"):
        model = TRPO.load(tmp_path / "ppo_model.zip", env=make_vec_env(env_id, n_envs=1))
    assert isinstance(model, TRPO)
    assert_same_policy(ppo, model)
    # PPO's constructor data is mapped or dropped, ours takes the defaults.
    assert model.n_critic_updates == 4 and model.target_kl == 0.01 and model.cg_max_steps == 15
    assert model.batch_size == 32 and model.learning_rate == ppo.learning_rate
    assert not hasattr(model, "clip_range") and not hasattr(model, "n_epochs")
    # The critic keeps its Adam moments from PPO.
    ppo_state = ppo.policy.optimizer.state_dict()["state"]
    names = [name for name, _ in model.policy.named_parameters()]
    critic_names = [name for name, p in model.policy.named_parameters() if any(p is q for q in model._critic_params)]
    state = model.policy.optimizer.state_dict()["state"]
    assert len(state) == len(critic_names)
    for new_index, name in enumerate(critic_names):
        assert th.equal(state[new_index]["exp_avg"], ppo_state[names.index(name)]["exp_avg"].to(state[new_index]["exp_avg"]))

    assert_training_continues(model, recording_logger, 128)
    assert model.num_timesteps == 256


def test_target_kl_and_other_arguments_can_be_overridden_when_loading_ppo(tmp_path):
    PPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=32, target_kl=0.03).save(tmp_path / "ppo_model.zip")
    with pytest.warns(UserWarning, match="n_epochs"):
        model = TRPO.load(tmp_path / "ppo_model.zip", target_kl=0.05, cg_max_steps=5)
    assert model.target_kl == 0.05 and model.cg_max_steps == 5
    with pytest.warns(UserWarning, match="n_epochs") as record:
        assert TRPO.load(tmp_path / "ppo_model.zip").target_kl == 0.03  # a PPO number is kept
    assert "target_kl" not in str(record[0].message)


CONTRIB_ENVS = [(lambda: make_vec_env("CartPole-v1"), 1), (lambda: make_vec_env(TargetEnv), 3)]


@pytest.mark.parametrize("make_env, scale", CONTRIB_ENVS, ids=["discrete", "box-3d"])
def test_sb3_contrib_checkpoint_loads_and_keeps_its_step_size(tmp_path, make_env, scale, recording_logger):
    contrib = ContribTRPO("MlpPolicy", make_env(), n_steps=64, batch_size=32, target_kl=0.01, seed=0).learn(128)
    contrib.save(tmp_path / "contrib.zip")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = TRPO.load(tmp_path / "contrib.zip", env=make_env())
    messages = [str(w.message) for w in record if "checkpoint" in str(w.message)]
    if scale == 1:
        assert messages == []
    else:
        assert len(messages) == 1 and "became target_kl=0.03 (joint KL over 3 dimensions)" in messages[0]
        assert "became cg_damping=0.3" in messages[0]
    # Both scale with the KL's normalisation: (F/d + λI) s = g and (F + dλI) s = d g give the same step.
    assert model.target_kl == pytest.approx(0.01 * scale)
    assert model.cg_damping == pytest.approx(contrib.cg_damping * scale)
    assert model.n_critic_updates == contrib.n_critic_updates
    assert model.line_search_accept_ratio == 0.1  # new argument, our default
    assert_same_policy(contrib, model)
    assert_training_continues(model, recording_logger, 128)


def test_loading_our_own_checkpoint_changes_nothing(tmp_path):
    model = TRPO("MlpPolicy", TargetEnv(), n_steps=64, batch_size=32, target_kl=0.02, seed=0).learn(64)
    model.save(tmp_path / "model.zip")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = TRPO.load(tmp_path / "model.zip")
    assert loaded.target_kl == 0.02
    for key, value in model.policy.optimizer.state_dict()["state"].items():
        assert th.equal(value["exp_avg"], loaded.policy.optimizer.state_dict()["state"][key]["exp_avg"])


def full_state(model):
    tensors = list(model.policy.state_dict().values())
    for state in model.policy.optimizer.state_dict()["state"].values():
        tensors.extend(v for v in state.values() if isinstance(v, th.Tensor))
    return tensors


@pytest.mark.parametrize("env_id, kwargs", [("CartPole-v1", {}), ("Pendulum-v1", {"use_sde": True, "sde_sample_freq": 4})])
def test_same_seed_same_calls_give_bit_identical_state_on_cpu(env_id, kwargs):
    def run(seed):
        model = TRPO("MlpPolicy", make_vec_env(env_id, n_envs=2), n_steps=32, batch_size=16, seed=seed, device="cpu", **kwargs)
        model.learn(128)
        model.learn(64, reset_num_timesteps=False)
        return full_state(model)

    first, second, other = run(5), run(5), run(6)
    assert len(first) == len(second) and all(th.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(th.equal(a, b) for a, b in zip(first, other, strict=True))


def logged_column(path, key):
    with open(path / "progress.csv") as file:
        return [float(row[key]) for row in csv.DictReader(file) if row.get(key)]


class ScheduleRecorder(BaseCallback):
    """(timesteps, updates, critic learning rate) after every train() and at the end of learn()."""

    def __init__(self):
        super().__init__()
        self.points = []

    def _record(self):
        model = self.model
        self.points.append((model.num_timesteps, model._n_updates, model.policy.optimizer.param_groups[0]["lr"]))

    def _on_rollout_start(self):
        self._record()

    def _on_training_end(self):
        self._record()

    def _on_step(self):
        return True


def test_save_load_resume_continues_counters_schedule_and_logging(tmp_path):
    def schedule(progress):
        return 1e-3 * progress

    def make():
        env = make_vec_env("CartPole-v1", n_envs=2)
        return TRPO("MlpPolicy", env, n_steps=32, batch_size=32, learning_rate=schedule, seed=0)

    # Reference: the same two learn() calls without saving in between.
    reference, recorded = make(), ScheduleRecorder()
    reference.set_logger(configure(str(tmp_path / "reference"), ["csv"]))
    reference.learn(128, callback=recorded).learn(128, reset_num_timesteps=False, callback=recorded)

    model, resumed = make(), ScheduleRecorder()
    model.set_logger(configure(str(tmp_path / "first"), ["csv"]))
    model.learn(128, callback=resumed)
    episodes = len(model.ep_info_buffer)
    model.save(tmp_path / "model.zip")
    loaded = TRPO.load(tmp_path / "model.zip", env=make_vec_env("CartPole-v1", n_envs=2))
    assert (loaded.num_timesteps, loaded._n_updates, len(loaded.ep_info_buffer)) == (128, 2, episodes)
    loaded.set_logger(configure(str(tmp_path / "resumed"), ["csv"]))
    loaded.learn(128, reset_num_timesteps=False, callback=resumed)

    assert (loaded.num_timesteps, loaded._n_updates) == (256, 4)
    np.testing.assert_allclose(resumed.points, recorded.points)
    assert [p[1] for p in resumed.points] == [0, 1, 2, 2, 3, 4]
    key = "time/total_timesteps"
    logged = logged_column(tmp_path / "first", key) + logged_column(tmp_path / "resumed", key)
    assert logged == logged_column(tmp_path / "reference", key) == [64, 128, 192, 256]
    n_updates = logged_column(tmp_path / "resumed", "train/n_updates")
    assert n_updates == logged_column(tmp_path / "reference", "train/n_updates")[-len(n_updates) :] == [3]
