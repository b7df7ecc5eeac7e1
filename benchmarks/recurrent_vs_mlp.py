"""
RecurrentTRPO (LSTM) against TRPO with an MLP on CartPole-v1 without velocities (rl_zoo3's CartPoleNoVel-v1:
the observation keeps the cart position and the pole angle, the velocities are zeroed), same budget, seeds and
shared hyperparameters.

Run from the repository root (single thread, a few minutes per seed)::

    python benchmarks/recurrent_vs_mlp.py

Writes ``benchmarks/results/recurrent_vs_mlp.{md,csv,png}``: the return of the deterministic policy over
``--eval-episodes`` episodes of a separate evaluation env every ``--eval-freq`` steps, per algorithm and seed,
and a summary of the final evaluations.
"""

import argparse
import csv
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from rl_zoo3.wrappers import MaskVelocityWrapper
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import VecEnv

from sb3_trpo_ext import TRPO, RecurrentTRPO

RESULTS = Path(__file__).parent / "results"
# Shared by both algorithms (the CartPole-v1 entry of zoo_configs/trpo_ext.yml, smaller rollouts).
COMMON: dict[str, Any] = dict(n_steps=256, batch_size=256, gamma=0.99, gae_lambda=0.98, cg_damping=1e-3, learning_rate=1e-3)
ALGORITHMS: dict[str, tuple[type[BaseAlgorithm], str, dict[str, Any]]] = {
    "TRPO MlpPolicy": (TRPO, "MlpPolicy", dict(n_critic_updates=20, policy_kwargs=dict(net_arch=[64, 64]))),
    "RecurrentTRPO MlpLstmPolicy": (
        RecurrentTRPO,
        "MlpLstmPolicy",
        dict(n_critic_updates=10, policy_kwargs=dict(lstm_hidden_size=32, net_arch=[64])),
    ),
}


def make_env(n_envs: int, seed: int) -> VecEnv:
    """CartPole-v1 with the velocities hidden (the observation wrapper of rl_zoo3's CartPoleNoVel-v1)."""
    return make_vec_env("CartPole-v1", n_envs=n_envs, seed=seed, wrapper_class=MaskVelocityWrapper)


class PeriodicEvaluation(BaseCallback):
    """Deterministic evaluation every ``freq`` steps (and at the end), recorded as (timesteps, mean, std)."""

    def __init__(self, env: VecEnv, freq: int, n_episodes: int):
        super().__init__()
        self.env, self.freq, self.n_episodes = env, freq, n_episodes
        self.records: list[tuple[int, float, float]] = []
        self._next = 0

    def evaluate(self) -> None:
        mean, std = evaluate_policy(self.model, self.env, n_eval_episodes=self.n_episodes, deterministic=True, warn=False)
        assert isinstance(mean, float) and isinstance(std, float)  # not the per-episode lists
        self.records.append((self.num_timesteps, float(mean), float(std)))

    def _on_step(self) -> bool:
        if self.num_timesteps >= self._next:
            self.evaluate()
            self._next += self.freq
        return True


def run(name: str, seed: int, args: argparse.Namespace) -> tuple[list[tuple[int, float, float]], float]:
    cls, policy, kwargs = ALGORITHMS[name]
    model: BaseAlgorithm = cls(policy, make_env(args.n_envs, seed), seed=seed, **COMMON, **kwargs)
    callback = PeriodicEvaluation(make_env(1, seed + 1000), args.eval_freq, args.eval_episodes)
    start = time.perf_counter()
    model.learn(args.timesteps, callback=callback)
    elapsed = time.perf_counter() - start
    callback.evaluate()
    return callback.records, elapsed


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for index, name in enumerate(ALGORITHMS):
        for seed in sorted({row["seed"] for row in rows}):
            points = [(row["timesteps"], row["eval_mean"]) for row in rows if row["algorithm"] == name and row["seed"] == seed]
            x, y = zip(*points, strict=True)
            axes.plot(x, y, color=f"C{index}", alpha=0.7, label=name if seed == rows[0]["seed"] else None)
    axes.set_xlabel("timesteps")
    axes.set_ylabel("deterministic eval return")
    axes.set_title("CartPole-v1 without velocities")
    axes.legend()
    figure.savefig(path, bbox_inches="tight", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--timesteps", type=int, default=60_000)
    parser.add_argument("--n-envs", type=int, default=2)
    parser.add_argument("--eval-freq", type=int, default=10_000)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS / "recurrent_vs_mlp")
    args = parser.parse_args()
    th.set_num_threads(1)

    rows, summary = [], []
    for name in ALGORITHMS:
        finals, times = [], []
        for seed in args.seeds:
            records, elapsed = run(name, seed, args)
            rows += [dict(algorithm=name, seed=seed, timesteps=t, eval_mean=m, eval_std=s) for t, m, s in records]
            finals.append(records[-1][1])
            times.append(elapsed)
            print(f"{name} seed {seed}: final {records[-1][1]:.1f} in {elapsed:.0f}s", flush=True)
        summary.append((name, finals, float(np.mean(times))))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.with_suffix(".csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out.with_suffix(".png"))
    command = shlex.join(["python", "benchmarks/recurrent_vs_mlp.py", *sys.argv[1:]])
    lines = [
        "# RecurrentTRPO vs TRPO (MLP) on CartPole-v1 without velocities",
        "",
        f"Command: `{command}` (single thread, torch {th.__version__}).",
        "",
        f"Env: CartPole-v1 with rl_zoo3's `MaskVelocityWrapper` (= CartPoleNoVel-v1), {args.n_envs} envs; budget "
        f"{args.timesteps} steps; seeds {args.seeds}; return of the deterministic policy over {args.eval_episodes} "
        f"episodes of a separate env (seed + 1000), every {args.eval_freq} steps and at the end.",
        "",
        f"Shared hyperparameters: `{COMMON}`.",
        "",
        "| algorithm | extra hyperparameters | final return per seed | mean | train time per run (s) |",
        "|---|---|---|---|---|",
    ]
    for name, finals, seconds in summary:
        extra = ALGORITHMS[name][2]
        per_seed = ", ".join(f"{value:.1f}" for value in finals)
        lines.append(f"| {name} | `{extra}` | {per_seed} | {np.mean(finals):.1f} | {seconds:.0f} |")
    lines += [
        "",
        f"Learning curves: `{args.out.with_suffix('.png').name}`; every evaluation: `{args.out.with_suffix('.csv').name}`.",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
