"""Short learning runs with fixed seeds and budgets (the full comparisons are benchmarks, not tests)."""

from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

from sb3_trpo_ext import TRPO


def evaluate(model: TRPO, env_id: str, seed: int) -> float:
    mean_return, _ = evaluate_policy(model, make_vec_env(env_id, seed=seed), n_eval_episodes=10, deterministic=True)
    return mean_return


def test_cartpole_reaches_475():
    # RL Zoo's tuned TRPO hyperparameters for CartPole-v1 (rl_zoo3 2.9.2, hyperparams/trpo.yml); about 20 s a seed.
    # A single seed's last evaluation is chaotic in float rounding: with the current code seed 0 evaluates at 281 at
    # this budget (315 at 81,920, 451 at 102,400) while seeds 1-5 evaluate at 500. Two of three seeds must make it.
    returns = []
    for seed in range(3):
        model = TRPO(
            "MlpPolicy",
            make_vec_env("CartPole-v1", n_envs=2, seed=seed),
            n_steps=512,
            batch_size=512,
            cg_damping=1e-3,
            gae_lambda=0.98,
            n_critic_updates=20,
            seed=seed,
        )
        model.learn(61_440)
        returns.append(evaluate(model, "CartPole-v1", seed=1000))
    assert sorted(returns)[1] >= 475, returns


def test_pendulum_clearly_improves():
    # RL Zoo's tuned TRPO hyperparameters for Pendulum-v1 (gSDE); about 20 s.
    model = TRPO(
        "MlpPolicy",
        make_vec_env("Pendulum-v1", n_envs=2, seed=0),
        n_steps=1024,
        gamma=0.9,
        n_critic_updates=15,
        use_sde=True,
        sde_sample_freq=4,
        seed=0,
    )
    initial = evaluate(model, "Pendulum-v1", seed=1000)
    model.learn(49_152)
    final = evaluate(model, "Pendulum-v1", seed=1000)
    assert initial < -800, initial
    assert final > -400 and final > initial + 500, (initial, final)
