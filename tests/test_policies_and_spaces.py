"""Every action space and SB3 policy family; actor/critic split by structure for custom and shared networks."""

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.envs import (
    FakeImageEnv,
    IdentityEnvMultiBinary,
    IdentityEnvMultiDiscrete,
    SimpleMultiObsEnv,
)
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from sb3_trpo_ext import TRPO
from tests.envs import TargetEnv


def check_learns_and_predicts(model: TRPO, steps: int = 128) -> None:
    before = [p.detach().clone() for p in model._actor_params]
    model.learn(steps)
    assert any(not th.equal(b, p) for b, p in zip(before, model._actor_params, strict=False)), "the actor never moved"
    env = model.get_env()
    observation = env.reset()
    action, _ = model.predict(observation, deterministic=True)
    assert action.shape == (env.num_envs, *model.action_space.shape)
    assert all(model.action_space.contains(a) for a in action)


@pytest.mark.parametrize(
    "env",
    [
        pytest.param(lambda: gym.make("CartPole-v1"), id="Discrete"),
        pytest.param(lambda: TargetEnv(action_dim=2), id="Box"),
        pytest.param(lambda: IdentityEnvMultiDiscrete(dim=3), id="MultiDiscrete"),
        pytest.param(lambda: IdentityEnvMultiBinary(dim=3), id="MultiBinary"),
    ],
)
def test_mlp_policy_on_every_action_space(env):
    check_learns_and_predicts(TRPO("MlpPolicy", env(), n_steps=64, batch_size=32, seed=0))


@pytest.mark.parametrize("discrete", [True, False], ids=["Discrete", "Box"])
def test_cnn_policy_on_image_env(discrete):
    env = FakeImageEnv(screen_height=36, screen_width=36, n_channels=1, discrete=discrete, action_dim=2)
    check_learns_and_predicts(TRPO("CnnPolicy", env, n_steps=32, batch_size=16, seed=0), steps=64)


def test_multi_input_policy_on_dict_env():
    model = TRPO("MultiInputPolicy", SimpleMultiObsEnv(random_start=False), n_steps=64, batch_size=32, seed=0)
    assert type(model.rollout_buffer).__name__ == "DictRolloutBuffer"
    check_learns_and_predicts(model)


@pytest.mark.parametrize("sde_sample_freq", [-1, 4])
def test_gsde(sde_sample_freq):
    model = TRPO("MlpPolicy", "Pendulum-v1", use_sde=True, sde_sample_freq=sde_sample_freq, n_steps=64, batch_size=32)
    check_learns_and_predicts(model)


class TwoTowers(nn.Module):
    """An mlp_extractor whose actor tower has "value" in its name and whose critic tower does not."""

    def __init__(self, features_dim: int):
        super().__init__()
        self.value_features = nn.Sequential(nn.Linear(features_dim, 8), nn.Tanh())  # used by the actor
        self.baseline = nn.Sequential(nn.Linear(features_dim, 8), nn.Tanh())  # used by the critic
        self.latent_dim_pi = self.latent_dim_vf = 8

    def forward(self, features):
        return self.forward_actor(features), self.forward_critic(features)

    def forward_actor(self, features):
        return self.value_features(features)

    def forward_critic(self, features):
        return self.baseline(features)


class RenamedPolicy(ActorCriticPolicy):
    def _build_mlp_extractor(self) -> None:
        self.mlp_extractor = TwoTowers(self.features_dim)


def test_custom_policy_with_renamed_modules_is_split_by_structure():
    model = TRPO(RenamedPolicy, TargetEnv(), n_steps=64, batch_size=32, seed=0)
    names = {id(p): name for name, p in model.policy.named_parameters()}
    actor = sorted(names[id(p)] for p in model._actor_params)
    critic = sorted(names[id(p)] for p in model._critic_params)
    assert actor == [
        "action_net.bias",
        "action_net.weight",
        "log_std",
        "mlp_extractor.value_features.0.bias",
        "mlp_extractor.value_features.0.weight",
    ]
    assert critic == ["mlp_extractor.baseline.0.bias", "mlp_extractor.baseline.0.weight", "value_net.bias", "value_net.weight"]
    check_learns_and_predicts(model)


class LinearExtractor(BaseFeaturesExtractor):
    """A features extractor with parameters (SB3's default for vectors, Flatten, has none)."""

    def __init__(self, observation_space: spaces.Box, features_dim: int = 8):
        super().__init__(observation_space, features_dim)
        self.linear = nn.Sequential(nn.Linear(int(np.prod(observation_space.shape)), features_dim), nn.Tanh())

    def forward(self, observations):
        return self.linear(observations)


@pytest.mark.parametrize("share", [True, False], ids=["shared", "separate"])
def test_shared_and_separate_features_extractors(share):
    policy_kwargs = {"features_extractor_class": LinearExtractor, "share_features_extractor": share}
    model = TRPO("MlpPolicy", TargetEnv(), n_steps=64, batch_size=32, policy_kwargs=policy_kwargs, seed=0)
    policy = model.policy
    actor_ids = {id(p) for p in model._actor_params}
    critic_ids = {id(p) for p in model._critic_params}
    assert all(id(p) in actor_ids for p in policy.pi_features_extractor.parameters())
    if share:
        assert policy.vf_features_extractor is policy.pi_features_extractor
    else:
        assert all(id(p) in critic_ids for p in policy.vf_features_extractor.parameters())
    vf_before = [p.detach().clone() for p in policy.vf_features_extractor.parameters()]
    check_learns_and_predicts(model)
    vf_moved = any(not th.equal(b, p) for b, p in zip(vf_before, policy.vf_features_extractor.parameters(), strict=False))
    assert vf_moved, "the critic's (or the shared actor's) extractor must be trained"


class TupleActionEnv(gym.Env):
    observation_space = spaces.Box(-1, 1, (2,), np.float32)
    action_space = spaces.Tuple((spaces.Discrete(2), spaces.Discrete(3)))

    def reset(self, *, seed=None, options=None):
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


def test_unsupported_action_space_is_a_clear_error():
    with pytest.raises(TypeError, match="does not support the action space Tuple"):
        TRPO("MlpPolicy", TupleActionEnv())


def test_policy_must_be_an_actor_critic():
    from stable_baselines3.dqn.policies import DQNPolicy

    with pytest.raises(TypeError, match="`policy` must be a subclass of ActorCriticPolicy"):
        TRPO(DQNPolicy, "CartPole-v1")
