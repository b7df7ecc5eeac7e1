"""The lean rollout forward gives SB3's actions, values and log-probabilities for the same seed and observations."""

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import FakeImageEnv, IdentityEnv, IdentityEnvMultiBinary, IdentityEnvMultiDiscrete
from torch import nn

from sb3_trpo_ext import TRPO
from sb3_trpo_ext.common.rollout import fused_forward, lean_rollout_forward
from tests.envs import TargetEnv


class LeakyReLU02(nn.LeakyReLU):
    def __init__(self):
        super().__init__(negative_slope=0.2)


CASES = {
    "Discrete": (lambda: IdentityEnv(5), {}),
    "Box": (lambda: TargetEnv(action_dim=3), {}),
    "Box-gSDE": (lambda: TargetEnv(action_dim=3), {"use_sde": True, "sde_sample_freq": 2}),
    "Box-gSDE-learn-features": (
        lambda: TargetEnv(action_dim=2),
        {"use_sde": True, "policy_kwargs": {"use_expln": True, "full_std": False}},
    ),
    "MultiDiscrete": (lambda: IdentityEnvMultiDiscrete(3), {}),
    "MultiBinary": (lambda: IdentityEnvMultiBinary(4), {}),
    "uneven-towers-relu": (
        lambda: TargetEnv(action_dim=2),
        {"policy_kwargs": {"net_arch": {"pi": [32, 16], "vf": [8, 24]}, "activation_fn": nn.ReLU}},
    ),
    "leaky-relu-non-default-slope": (
        lambda: IdentityEnvMultiDiscrete(2),
        {"policy_kwargs": {"activation_fn": LeakyReLU02}},
    ),
    "no-hidden-layers": (lambda: IdentityEnv(3), {"policy_kwargs": {"net_arch": []}}),
}


def make(case, n_envs=2, seed=0):
    env_fn, kwargs = CASES[case]
    env = make_vec_env(env_fn, n_envs=n_envs, seed=seed)
    return TRPO("MlpPolicy", env, n_steps=32, batch_size=32, seed=seed, **kwargs)


@pytest.mark.parametrize("deterministic", [False, True], ids=["stochastic", "deterministic"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_forward_matches_policy_forward(case, deterministic):
    model = make(case)
    policy = model.policy
    policy.set_training_mode(False)
    if model.use_sde:
        policy.reset_noise(4)
    observations = th.as_tensor(np.stack([model.observation_space.sample() for _ in range(4)]))
    fused = fused_forward(policy)
    assert fused is not None, "the standard MLP policy must take the fused path"
    with th.no_grad():
        th.manual_seed(7)
        expected = policy(observations, deterministic=deterministic)
        th.manual_seed(7)
        actual = fused(observations, deterministic=deterministic)
    for name, e, a in zip(("actions", "values", "log_prob"), expected, actual, strict=True):
        assert e.shape == a.shape and e.dtype == a.dtype, name
        th.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", ["Discrete", "Box", "Box-gSDE", "MultiDiscrete", "MultiBinary"])
def test_rollout_trajectories_match_sb3_rollout(case):
    def rollout(lean: bool):
        model = make(case, seed=3)
        model._setup_learn(64, None)
        callback = model._init_callback(None)
        collect = model.collect_rollouts if lean else super(TRPO, model).collect_rollouts
        collect(model.env, callback, model.rollout_buffer, model.n_steps)
        buffer = model.rollout_buffer
        return [buffer.observations, buffer.actions, buffer.rewards, buffer.values, buffer.log_probs, buffer.returns]

    for name, lean, plain in zip(
        ("observations", "actions", "rewards", "values", "log_probs", "returns"), rollout(True), rollout(False), strict=True
    ):
        np.testing.assert_allclose(lean, plain, rtol=1e-4, atol=1e-5, err_msg=name)


def test_lean_forward_is_removed_after_the_rollout():
    model = make("Box")
    with lean_rollout_forward(model.policy) as lean:
        assert lean and "forward" in vars(model.policy)
    assert "forward" not in vars(model.policy)
    # Not a standard MLP policy: SB3's own forward is kept.
    image = TRPO("CnnPolicy", FakeImageEnv(screen_height=36, screen_width=36), n_steps=8, batch_size=8)
    with lean_rollout_forward(image.policy) as lean:
        assert not lean and "forward" not in vars(image.policy)
