"""TargetKLSchedule: the radius each update uses, its reset at the end, its checks."""

import pytest
from sb3_contrib.common.envs import InvalidActionEnvDiscrete
from stable_baselines3 import PPO

from sb3_trpo_ext import TRPO, MaskableTRPO, RecurrentTRPO
from sb3_trpo_ext.callbacks import TargetKLSchedule


def recording(algorithm_class, seen: list[float]):
    """``algorithm_class`` that appends the ``target_kl`` of every update to ``seen``."""

    class Recording(algorithm_class):  # type: ignore[valid-type, misc]
        def train(self) -> None:
            seen.append(self.target_kl)
            super().train()

    return Recording


def radii_used(algorithm_class, policy, final_fraction, env="CartPole-v1", total_timesteps=512, n_steps=64):
    """Learn with the schedule and return the ``target_kl`` every update saw, and the model."""
    seen: list[float] = []
    model = recording(algorithm_class, seen)(policy, env, n_steps=n_steps, batch_size=64, target_kl=0.04, seed=0)
    model.learn(total_timesteps, callback=TargetKLSchedule(final_fraction=final_fraction))
    return seen, model


@pytest.mark.parametrize(
    "algorithm_class, policy, env",
    [
        (TRPO, "MlpPolicy", "CartPole-v1"),
        (RecurrentTRPO, "MlpLstmPolicy", "CartPole-v1"),
        (MaskableTRPO, "MlpPolicy", InvalidActionEnvDiscrete(dim=3, n_invalid_actions=1)),
    ],
)
def test_linear_radius_per_update_and_restored_after(algorithm_class, policy, env):
    seen, model = radii_used(algorithm_class, policy, final_fraction=0.25, env=env)
    # 8 updates of 64 steps: update k follows step 64 k of 512.
    expected = [0.04 * (1 - 0.75 * 64 * k / 512) for k in range(1, 9)]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert seen[-1] == pytest.approx(0.01)
    assert model.target_kl == 0.04


def test_final_fraction_one_keeps_the_radius():
    seen, _ = radii_used(TRPO, "MlpPolicy", final_fraction=1.0, total_timesteps=192)
    assert seen == [0.04, 0.04, 0.04]


def test_continued_learning_follows_sb3_progress():
    seen: list[float] = []
    model = recording(TRPO, seen)("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64, target_kl=0.04, seed=0)
    model.learn(128)
    seen.clear()
    model.learn(128, callback=TargetKLSchedule(final_fraction=0.5), reset_num_timesteps=False)
    # Progress counts all 256 steps, as SB3's own schedules do after reset_num_timesteps=False.
    assert seen == pytest.approx([0.04 * (1 - 0.5 * 192 / 256), 0.04 * (1 - 0.5)], rel=1e-12)
    assert model.target_kl == 0.04


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_final_fraction_out_of_range(bad):
    with pytest.raises(ValueError, match=r"final_fraction.*> 0\.0"):
        TargetKLSchedule(final_fraction=bad)


def test_final_fraction_wrong_type():
    with pytest.raises(TypeError, match="final_fraction"):
        TargetKLSchedule(final_fraction="0.2")  # type: ignore[arg-type]


def test_refuses_a_model_without_a_trust_region():
    with pytest.raises(TypeError, match="TargetKLSchedule needs a TRPO model"):
        PPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64).learn(64, callback=TargetKLSchedule())
