"""Small environments for the tests."""

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class TargetEnv(gym.Env):
    """
    Continuous control in a few dimensions: the reward is minus the distance between the action and a target that
    is part of the observation. Quick to learn, so it exercises multi-dimensional Gaussian policies.
    """

    def __init__(self, action_dim: int = 3, ep_length: int = 20):
        self.observation_space = spaces.Box(-1.0, 1.0, (action_dim + 1,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (action_dim,), np.float32)
        self.ep_length = ep_length

    def _observe(self) -> np.ndarray:
        return np.append(self.target, self.t / self.ep_length).astype(np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        self.target = self.np_random.uniform(-1, 1, self.action_space.shape).astype(np.float32)
        return self._observe(), {}

    def step(self, action):
        reward = -float(np.abs(np.clip(action, -1, 1) - self.target).sum())
        self.t += 1
        self.target = self.np_random.uniform(-1, 1, self.action_space.shape).astype(np.float32)
        return self._observe(), reward, False, self.t >= self.ep_length, {}


class NonFiniteAt(gym.Wrapper):
    """
    Returns ``value`` (NaN by default) as the reward or in the observation of the ``at``-th step (counted from 1 over
    the wrapper's life, across episodes), once; every other step is the wrapped env's.
    """

    def __init__(self, env: gym.Env, field: str, at: int, value: float = float("nan")):
        super().__init__(env)
        assert field in ("reward", "observation")
        self.field, self.at, self.value = field, at, value
        self.steps = 0

    def step(self, action):
        observation, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        if self.steps == self.at:
            if self.field == "reward":
                reward = self.value
            else:
                observation = np.full_like(observation, self.value)
        return observation, reward, terminated, truncated, info
