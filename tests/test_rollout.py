"""The lean rollout forward gives SB3's actions, values and log-probabilities for the same seed and observations."""

import numpy as np
import pytest
import torch as th
from sb3_contrib.common.envs import InvalidActionEnvDiscrete, InvalidActionEnvMultiBinary, InvalidActionEnvMultiDiscrete
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import (
    FakeImageEnv,
    IdentityEnv,
    IdentityEnvMultiBinary,
    IdentityEnvMultiDiscrete,
    SimpleMultiObsEnv,
)
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.vec_env import VecNormalize
from torch import nn

from sb3_trpo_ext import TRPO, MaskableTRPO
from sb3_trpo_ext.common.rollout import fused_forward
from tests.envs import TargetEnv
from tests.test_maskable import action_dims, random_masks


class LeakyReLU02(nn.LeakyReLU):
    def __init__(self):
        super().__init__(negative_slope=0.2)


CASES = {
    "Discrete": (lambda: IdentityEnv(5, ep_length=10), {}),
    "Box": (lambda: TargetEnv(action_dim=3), {}),
    "Box-gSDE": (lambda: TargetEnv(action_dim=3), {"use_sde": True, "sde_sample_freq": 2}),
    "Box-gSDE-learn-features": (
        lambda: TargetEnv(action_dim=2),
        {"use_sde": True, "policy_kwargs": {"use_expln": True, "full_std": False}},
    ),
    "MultiDiscrete": (lambda: IdentityEnvMultiDiscrete(3, ep_length=10), {}),
    "MultiBinary": (lambda: IdentityEnvMultiBinary(4, ep_length=10), {}),
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


def forward_both_ways(policy, observations, deterministic, masks=None):
    """``policy.forward`` and the fused forward on the same observations (and masks) and random numbers."""
    policy.set_training_mode(False)
    fused = fused_forward(policy)
    assert fused is not None, "the MLP policy must take the fused path"
    kwargs = {} if masks is None else {"action_masks": masks}
    with th.no_grad():
        th.manual_seed(7)
        expected = policy(th.as_tensor(observations), deterministic=deterministic, **kwargs)
    th.manual_seed(7)
    return expected, fused(observations, deterministic, masks)


def assert_same_forward(expected, actual) -> None:
    """``policy.forward``'s tensors against the fused forward's arrays."""
    for name, e, a in zip(("actions", "values", "log_prob"), expected, actual, strict=True):
        e = e.numpy().reshape(-1) if name == "values" else e.numpy()
        assert e.shape == a.shape and e.dtype == a.dtype, name
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("deterministic", [False, True], ids=["stochastic", "deterministic"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_forward_matches_policy_forward(case, deterministic):
    model = make(case)
    if model.use_sde:
        model.policy.reset_noise(4)
    observations = np.stack([model.observation_space.sample() for _ in range(4)])
    assert_same_forward(*forward_both_ways(model.policy, observations, deterministic))


MASKED_CASES = {
    "Discrete": lambda: InvalidActionEnvDiscrete(dim=6, ep_length=10, n_invalid_actions=3),
    "MultiDiscrete": lambda: InvalidActionEnvMultiDiscrete(dims=[3, 4], ep_length=10, n_invalid_actions=3),
    "MultiBinary": lambda: InvalidActionEnvMultiBinary(dims=4, ep_length=10, n_invalid_actions=2),
}


def make_masked(case, n_envs=2, seed=0):
    return MaskableTRPO("MlpPolicy", make_vec_env(MASKED_CASES[case], n_envs=n_envs, seed=seed), n_steps=32,
                        batch_size=32, seed=seed)  # fmt: skip


@pytest.mark.parametrize("deterministic", [False, True], ids=["stochastic", "deterministic"])
@pytest.mark.parametrize("case", list(MASKED_CASES))
def test_fused_forward_matches_maskable_policy_forward(case, deterministic):
    model = make_masked(case)
    observations = np.stack([model.observation_space.sample() for _ in range(16)])
    masks = random_masks(action_dims(model.action_space), 16, np.random.default_rng(0))
    expected, actual = forward_both_ways(model.policy, observations, deterministic, masks)
    assert_same_forward(expected, actual)
    valid = np.split(masks, np.cumsum(action_dims(model.action_space))[:-1], axis=1)
    chosen = actual[0].reshape(16, -1)
    assert all(block[np.arange(16), chosen[:, i]].all() for i, block in enumerate(valid))


def as_array(value) -> np.ndarray:
    return value.detach().numpy().copy() if isinstance(value, th.Tensor) else np.array(value)


class StopAfter(BaseCallback):
    """Records what SB3 exposes to callbacks at every step; stops the rollout after ``n_calls`` steps."""

    def __init__(self, n_calls: int | None = None):
        super().__init__()
        self.stop_at, self.seen = n_calls, []

    def _on_step(self) -> bool:
        keys = ("actions", "clipped_actions", "values", "log_probs", "rewards", "dones", "n_steps")
        self.seen.append({k: as_array(self.locals[k]) for k in keys})
        return self.stop_at is None or self.n_calls < self.stop_at

    def _on_rollout_end(self) -> None:
        self.seen.append({"last_values": as_array(self.locals["values"])})


ROLLOUT_CASES = {
    **{case: (case, False) for case in ("Discrete", "Box", "Box-gSDE", "MultiDiscrete", "MultiBinary")},
    "Box-gSDE-expln": ("Box-gSDE-learn-features", False),
    "Box-VecNormalize": ("Box", True),
    "gSDE-VecNormalize": ("Box-gSDE", True),
}


def recorded_rollout(model, collect, stop_at):
    """Run one rollout with ``collect``: the buffer, counters and what the callback saw."""
    model._setup_learn(64, None)
    callback = StopAfter(stop_at)
    callback.init_callback(model)
    complete = collect(model.env, callback, model.rollout_buffer, model.n_steps)
    buffer = model.rollout_buffer
    arrays = [buffer.observations, buffer.actions, buffer.rewards, buffer.episode_starts, buffer.values]
    arrays += [buffer.log_probs, buffer.returns, buffer.advantages, model._last_obs, model._last_episode_starts]
    if hasattr(buffer, "action_masks"):
        arrays.append(buffer.action_masks)
    if model.use_sde:  # the noise the next rollout step would use
        sde = model.policy.action_dist
        arrays += [as_array(sde.exploration_mat), as_array(sde.exploration_matrices)]
    counters = (complete, model.num_timesteps, buffer.pos, [e["r"] for e in model.ep_info_buffer])
    return arrays, counters, callback.seen


def assert_same_rollouts(lean, reference) -> None:
    (lean_arrays, lean_counters, lean_seen), (arrays, counters, seen) = lean, reference
    assert lean_counters[:3] == counters[:3]  # completed, num_timesteps, buffer position
    assert lean_counters[3] == pytest.approx(counters[3])  # episode returns
    assert any(counters[-1]), "episodes must end (by truncation) within the rollout"
    for i, (a, b) in enumerate(zip(lean_arrays, arrays, strict=True)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"buffer array {i}")
    assert len(lean_seen) == len(seen)
    for step, (a, b) in enumerate(zip(lean_seen, seen, strict=True)):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, (step, key)
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=f"{key} at step {step}")


@pytest.mark.parametrize("stop_at", [None, 21], ids=["whole", "callback-stops-early"])
@pytest.mark.parametrize("case", list(ROLLOUT_CASES))
def test_rollout_trajectories_match_sb3_rollout(case, stop_at):
    """Same buffer, counters, episode statistics and callback view as SB3's loop; TargetEnv truncates episodes
    (timeout bootstrapping) and Box actions leave the bounds (clipping)."""
    env_case, normalize = ROLLOUT_CASES[case]

    def rollout(lean: bool):
        env_fn, kwargs = CASES[env_case]
        env = make_vec_env(env_fn, n_envs=2, seed=3)
        # (Box-gSDE resamples its noise every 2 steps.)
        model = TRPO("MlpPolicy", VecNormalize(env) if normalize else env, n_steps=32, batch_size=32, seed=3, **kwargs)
        return recorded_rollout(model, model.collect_rollouts if lean else super(TRPO, model).collect_rollouts, stop_at)

    assert_same_rollouts(rollout(True), rollout(False))


@pytest.mark.parametrize("stop_at", [None, 21], ids=["whole", "callback-stops-early"])
@pytest.mark.parametrize("case", list(MASKED_CASES))
def test_masked_rollout_trajectories_match_sb3_rollout(case, stop_at, monkeypatch):
    """MaskableTRPO's lean loop: the same buffer (masks included) as SB3's loop under the same masks."""
    lean_model = make_masked(case, seed=3)
    lean = recorded_rollout(lean_model, lean_model.collect_rollouts, stop_at)
    assert not lean_model.rollout_buffer.action_masks.all(), "some actions must be masked"
    monkeypatch.setattr("sb3_trpo_ext.maskable.fused_forward", lambda policy: None)  # SB3's loop
    reference_model = make_masked(case, seed=3)
    assert_same_rollouts(lean, recorded_rollout(reference_model, reference_model.collect_rollouts, stop_at))


def test_policies_off_the_cpu_keep_sb3_sampling(monkeypatch):
    # SB3 draws on the policy's device with that device's generator: the NumPy path would change the actions.
    model = make("Box")
    assert fused_forward(model.policy) is not None
    monkeypatch.setattr(type(model.policy), "device", property(lambda self: th.device("cuda")))
    assert fused_forward(model.policy) is None


def test_sb3_loop_for_policies_the_fused_forward_does_not_cover():
    image = TRPO("CnnPolicy", FakeImageEnv(screen_height=36, screen_width=36), n_steps=8, batch_size=8)
    assert fused_forward(image.policy) is None
    squashed = TRPO("MlpPolicy", TargetEnv(), n_steps=8, batch_size=8, use_sde=True, policy_kwargs={"squash_output": True})
    assert fused_forward(squashed.policy) is None
    # Dict observations go through SB3's own loop, and so into its DictRolloutBuffer.
    multi = TRPO("MultiInputPolicy", SimpleMultiObsEnv(random_start=False), n_steps=8, batch_size=8)
    assert fused_forward(multi.policy) is None
    for model in (image, squashed, multi):
        model.learn(16)
        assert model.num_timesteps == 16


class RecordingBuffer(RolloutBuffer):
    """A user's buffer that overrides ``add``: the lean loop must go through it."""

    def add(self, *args, **kwargs) -> None:
        self.added = getattr(self, "added", 0) + 1
        super().add(*args, **kwargs)


def test_rollout_buffer_subclasses_keep_their_own_add():
    lean = make("Box")
    lean.rollout_buffer_class = RecordingBuffer
    lean._setup_model()
    lean.learn(64)
    assert lean.rollout_buffer.added == 32
    reference = make("Box")
    reference.learn(64)
    for name in ("observations", "actions", "rewards", "values", "log_probs", "advantages"):
        np.testing.assert_allclose(getattr(lean.rollout_buffer, name), getattr(reference.rollout_buffer, name), err_msg=name)


class CountingNoisePolicy(ActorCriticPolicy):
    def reset_noise(self, n_envs: int = 1) -> None:
        self.resamplings = getattr(self, "resamplings", 0) + 1
        super().reset_noise(n_envs)


def test_policies_that_redefine_noise_resampling_keep_it():
    model = TRPO(CountingNoisePolicy, TargetEnv(), n_steps=32, batch_size=32, use_sde=True, sde_sample_freq=4)
    assert fused_forward(model.policy) is not None
    model.policy.resamplings = 0
    model.learn(32)
    assert model.policy.resamplings == 1 + 32 // 4  # at the rollout's start, then every 4 steps
