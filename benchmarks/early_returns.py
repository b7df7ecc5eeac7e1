"""
Early-training returns of ours and ``sb3_contrib.TRPO`` at the speed benchmark's ``learn()`` runs, over more seeds.

``benchmarks/speed.py`` reports the final evaluation return of its five timed ``learn()`` runs per environment. At
40,960 steps these are early-training returns whose spread between seeds is as large as the returns themselves;
this script runs the same configurations (RL Zoo hyperparameters, ported for ours, same seed for both algorithms)
on more seeds, tests the paired differences and records what the policy steps did.

Usage (from the repository root)::

    python benchmarks/early_returns.py                      # seeds 0-14, the three speed environments
    python benchmarks/early_returns.py --envs HalfCheetah-v5 --seeds 0 1 2
    python benchmarks/early_returns.py --envs Acrobot-v1 --budget 100000 --eval-episodes 30 --name acrobot_returns
    python benchmarks/early_returns.py --envs HalfCheetah-v5 --seeds $(seq 0 44) --jobs 2 --name halfcheetah_returns

The last form takes any RL Zoo TRPO entry without ``policy_kwargs`` (with its ``n_timesteps`` left to ``--budget``):
the question there is whether the two libraries learn alike at the zoo's full budget.

Results: ``benchmarks/results/early_returns.{md,csv}``. Timing is not reported (other runs may share the machine).
"""

import argparse
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from gymnasium import spaces
from scipy import stats
from stable_baselines3.common.logger import KVWriter, Logger

from sb3_trpo_ext import TRPO

sys.path.insert(0, str(Path(__file__).parent))
import speed  # the speed benchmark's configurations and learn() runs


class StepRecorder(KVWriter):
    """Logger output that keeps what each update logged about its policy step."""

    def __init__(self, dimensions: int) -> None:
        self.dimensions = dimensions  # to turn sb3-contrib's per-dimension KL into the joint one
        self.kl: list[float] = []
        self.success: list[float] = []

    def write(self, key_values: dict[str, Any], key_excluded: Any, step: int = 0) -> None:
        if "train/kl_divergence" in key_values:  # ours: the joint KL
            self.kl.append(float(key_values["train/kl_divergence"]))
        elif "train/kl_divergence_loss" in key_values:  # sb3-contrib: mean over action dimensions
            self.kl.append(float(key_values["train/kl_divergence_loss"]) * self.dimensions)
        if "train/is_line_search_success" in key_values:
            self.success.append(float(key_values["train/is_line_search_success"]))

    def close(self) -> None:
        pass


def zoo_entry(env_id: str) -> dict[str, Any]:
    """
    RL Zoo's TRPO hyperparameters for ``env_id`` from rl_zoo3's own ``trpo.yml``, in ``speed.ZOO``'s format (entries
    with ``policy_kwargs`` or other wrappers are not supported).

    :param env_id: Environment
    :return: ``dict(n_envs=..., normalize=..., kwargs=...)``
    """
    import rl_zoo3
    import yaml

    entry = dict(yaml.safe_load((Path(rl_zoo3.__file__).parent / "hyperparams" / "trpo.yml").read_text())[env_id])
    unsupported = set(entry) - {"normalize", "n_envs", "n_timesteps", "policy", *TRPO.__init__.__code__.co_varnames}
    if entry.pop("policy") != "MlpPolicy" or unsupported:
        raise ValueError(f"RL Zoo's {env_id} entry needs {sorted(unsupported)}, which this script does not handle")
    entry.pop("n_timesteps")
    return dict(n_envs=entry.pop("n_envs", 1), normalize=bool(entry.pop("normalize", False)), kwargs=entry)


def run(env_id: str, seed: int, budget: int, eval_episodes: int) -> list[dict]:
    """``learn(budget)`` with ours and sb3-contrib on one seed, as ``speed.learn_speed`` does, recording the steps."""
    if env_id not in speed.ZOO:  # a worker process starts from speed's own entries
        speed.ZOO[env_id] = zoo_entry(env_id)
    rows = []
    for name in speed.LEARNERS:
        model = speed.make_learner(name, env_id, seed)
        space = model.action_space
        recorder = StepRecorder(int(np.prod(space.shape)) if isinstance(space, spaces.Box) else 1)
        model.set_logger(Logger(folder=None, output_formats=[recorder]))
        model.learn(budget)
        rows.append(
            dict(
                case=env_id,
                algorithm=name,
                seed=seed,
                steps=budget,
                final_return=speed.evaluate(model, env_id, seed, eval_episodes),
                mean_joint_kl=float(np.mean(recorder.kl)),
                line_search_success=float(np.mean(recorder.success)),
            )
        )
        print(f"  {env_id} {name} seed={seed}: {rows[-1]['final_return']:.1f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=list(speed.ZOO), help="also any RL Zoo TRPO entry without policy_kwargs")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(15)))
    parser.add_argument("--budget", type=int, default=40_960)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--name", default="early_returns", help="results file name, without extension")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (each seed's pair is one job)")
    parser.add_argument("--out", type=Path, default=speed.RESULTS)
    args = parser.parse_args()
    started = time.perf_counter()
    for env_id in args.envs:
        if env_id not in speed.ZOO:
            speed.ZOO[env_id] = zoo_entry(env_id)
    jobs = [(env_id, seed, args.budget, args.eval_episodes) for env_id in args.envs for seed in args.seeds]
    if args.jobs > 1:
        # A run is deterministic given its seed, so the rows do not depend on how the jobs are spread.
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = [row for rows_of_job in pool.map(run, *zip(*jobs, strict=True)) for row in rows_of_job]
    else:
        rows = [row for job in jobs for row in run(*job)]
    args.out.mkdir(parents=True, exist_ok=True)
    speed.write_csv(rows, args.out / f"{args.name}.csv")

    command = "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    lines = [
        f"# Returns after {args.budget} steps: ours vs sb3-contrib",
        "",
        f"Command: `{command}`; wall time {(time.perf_counter() - started) / 60:.1f} min.",
        "",
        f"Each run: `learn({args.budget})` at the speed benchmark's configuration (RL Zoo's TRPO entry for other",
        f"environments), then {args.eval_episodes} deterministic episodes on a",
        "separate environment (frozen `VecNormalize` statistics). Same seed for both algorithms; p-values of the",
        "paired differences (ours - sb3-contrib) over seeds. The step columns average over every update of every",
        "seed: the KL of the accepted step (sb3-contrib's per-dimension KL times the action dimension, so both are",
        "the joint KL) and the fraction of line searches that accepted a step.",
        "",
        "| env | seeds | ours | sb3-contrib | mean difference | paired t-test p | Wilcoxon p "
        "| mean KL per update, ours / sb3-contrib | line searches accepted, ours / sb3-contrib |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for env_id in args.envs:
        by = {a: [r for r in rows if r["case"] == env_id and r["algorithm"] == a] for a in ("ours", "sb3-contrib")}
        ours, contrib = ([r["final_return"] for r in by[a]] for a in ("ours", "sb3-contrib"))
        differences = [a - b for a, b in zip(ours, contrib, strict=True)]
        ttest = stats.ttest_rel(ours, contrib).pvalue if len(ours) > 1 else float("nan")
        wilcoxon = stats.wilcoxon(differences).pvalue if any(differences) else 1.0
        kl, accepted = ({a: np.mean([r[key] for r in by[a]]) for a in by} for key in ("mean_joint_kl", "line_search_success"))
        lines.append(
            f"| {env_id} | {len(ours)} | {statistics.mean(ours):.1f} ± {statistics.pstdev(ours):.1f} "
            f"| {statistics.mean(contrib):.1f} ± {statistics.pstdev(contrib):.1f} | {statistics.mean(differences):+.1f} "
            f"| {ttest:.2f} | {wilcoxon:.2f} | {kl['ours']:.4f} / {kl['sb3-contrib']:.4f} "
            f"| {accepted['ours']:.3f} / {accepted['sb3-contrib']:.3f} |"
        )
    lines += ["", f"Per seed: `{args.name}.csv`.", ""]
    (args.out / f"{args.name}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
