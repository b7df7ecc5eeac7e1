"""
Re-evaluate the final policies of the learning benchmark with many more episodes.

``benchmarks/learning.py`` judges a run by its last evaluation: 10 deterministic episodes. With three seeds,
that number moves by more than the gaps it is asked to decide (Acrobot-v1's final policies differ by a few
steps per episode). This script loads the final model that rl_zoo3 saved at the end of each finished run
(``<env>.zip`` and its frozen ``VecNormalize`` statistics) and evaluates it again, the way ``rl_zoo3 enjoy``
builds its environment (``create_test_env`` with the run's saved hyperparameters), deterministic, with
``--episodes`` episodes (default 50) on an environment seeded with ``--seed-offset + seed`` (default 10,000 +
seed), so that no episode repeats the benchmark's own evaluation. It adds a second, more precise measurement of
the same final policies; it does not replace the benchmark's protocol or its verdicts.

The one command (from the repository root, after the benchmark's runs exist)::

    python benchmarks/reevaluate.py                       # every finished run under benchmarks/runs/

Options: ``--envs`` (evaluate only these), ``--episodes``, ``--seed-offset``, ``--runs-dir``, ``--out``. The rows
of an earlier ``reevaluation.csv`` in ``--out`` made with the same ``--episodes`` and ``--seed-offset`` are kept
for every run (environment, algorithm, seed) this call does not evaluate: other environments, the algorithm whose
runs ``--runs-dir`` does not hold (e.g. after rerunning only ours), or seeds whose run files are gone (e.g. after
adding seeds 3-4 on a machine that holds only those). A run that ``learning.md``'s report has since replaced (its
last benchmark evaluation there differs from the earlier row's) loses its earlier row instead, and
``reevaluation.md`` names it as not re-evaluated: that row measured a policy the table no longer holds. Writes
``reevaluation.csv`` (one row per run: env, algo, seed, episodes, seed offset, mean and std of the episode
returns, the run's last benchmark evaluation for comparison) and ``reevaluation.md`` (mean ± std over seeds, per algorithm,
beside the published figure, with the same verdict rule as ``learning.md``) into ``--out``.
"""

import argparse
import contextlib
import csv
import io
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch as th

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning import (  # the sibling module, found by the path above
    ALGO_LABELS,
    ALGOS,
    ENVS,
    PUBLISHED_SOURCE,
    REPO,
    Run,
    evaluations_file,
    format_result,
    load_evaluations,
    recorded_runs,
    reported_runs,
    verdicts,
    write_csv,
)


def final_model(run: Run, runs_dir: Path) -> tuple[Path, Path]:
    """The final model rl_zoo3 saved for ``run`` and the folder of its saved hyperparameters and statistics."""
    evaluations = evaluations_file(run, runs_dir)
    if evaluations is None:
        raise FileNotFoundError(f"no rl_zoo3 log folder for {run} under {runs_dir}")
    log_folder = evaluations.parent  # rl_zoo3 writes evaluations.npz, the model and its stats folder side by side
    return log_folder / f"{run.env}.zip", log_folder / run.env


def reevaluate(run: Run, runs_dir: Path, episodes: int, seed: int) -> list[float]:
    """
    Deterministic returns of ``episodes`` episodes of the run's final policy, in ``rl_zoo3 enjoy``'s environment.

    :param run: A finished run
    :param runs_dir: Where the runs are
    :param episodes: Number of episodes
    :param seed: Seed of the evaluation environment
    :return: The episode returns (true returns: the environment is Monitor-wrapped, rewards unnormalised)
    """
    from rl_zoo3.utils import ALGOS as ZOO_ALGOS
    from rl_zoo3.utils import create_test_env, get_saved_hyperparams
    from stable_baselines3.common.evaluation import evaluate_policy

    model_path, stats_path = final_model(run, runs_dir)
    hyperparams, stats = get_saved_hyperparams(str(stats_path), norm_reward=False, test_mode=True)
    with contextlib.redirect_stdout(io.StringIO()):  # rl_zoo3 prints what it loads; the table says it once
        env = create_test_env(run.env, n_envs=1, stats_path=stats, seed=seed, should_render=False, hyperparams=hyperparams)
    try:
        model = ZOO_ALGOS[run.algo].load(model_path, device="cpu")
        returns, _ = evaluate_policy(model, env, n_eval_episodes=episodes, deterministic=True, return_episode_rewards=True)
    finally:
        env.close()
    assert isinstance(returns, list)  # return_episode_rewards=True: one return per episode
    return [float(r) for r in returns]


def kept_rows(
    path: Path,
    evaluated: set[tuple[str, str, int]],
    episodes: int,
    seed_offset: int,
    reported: dict[tuple[str, str, int], float] | None = None,
) -> tuple[list[dict[str, Any]], list[tuple[str, str, int]]]:
    """
    The rows of an earlier ``reevaluation.csv`` for the runs (environment, algorithm, seed) this call did not
    evaluate, so that a call with ``--envs``, on a runs directory holding only one algorithm's reruns, or holding
    only the new seeds of an algorithm whose older run files are gone, updates what it evaluated and keeps the
    rest of the table: the rule ``learning.py`` follows for its report. Rows made with another number of episodes
    or seed offset are dropped: one table, one protocol. So are the rows of runs that the benchmark's report has
    since replaced (a rerun whose model this call could not load): their policies are no longer the table's.

    :param path: The earlier CSV (may be missing)
    :param evaluated: The runs (environment, algorithm, seed) this call evaluated
    :param episodes: This call's ``--episodes``
    :param seed_offset: This call's ``--seed-offset``
    :param reported: Each run's last benchmark evaluation in the current report (:func:`reported_finals`);
        ``None`` when there is no report to check against
    :return: The earlier rows to keep, typed as ``main`` writes them, and the runs whose rows were dropped as
        replaced
    """
    if not path.exists():
        return [], []
    kept, replaced = [], []
    with open(path, newline="") as file:
        for row in csv.DictReader(file):
            key = (row["env"], row["algo"], int(row["seed"]))
            same_protocol = int(row["episodes"]) == episodes and int(row.get("seed_offset", -1)) == seed_offset
            if key in evaluated or not same_protocol:
                continue
            # A run's final evaluation identifies it: a rerun of the same seed draws another curve.
            if reported is not None and (
                key not in reported or not math.isclose(reported[key], float(row["benchmark_return"]), rel_tol=1e-9)
            ):
                replaced.append(key)
                continue
            kept.append(
                {
                    **row,
                    "seed": int(row["seed"]),
                    "episodes": int(row["episodes"]),
                    "seed_offset": int(row["seed_offset"]),
                    **{field: float(row[field]) for field in ("mean_return", "std_return", "benchmark_return")},
                }
            )
    return kept, replaced


def reported_finals(out: Path) -> dict[tuple[str, str, int], float] | None:
    """Each run's last benchmark evaluation in the learning report in ``out``; ``None`` when there is none."""
    runs = reported_runs(out)
    if not runs:
        return None
    finals = {}
    for run, _, curve in runs:
        if curve:
            finals[(run.env, run.algo, run.seed)] = max(curve, key=lambda row: row["timesteps"])["mean_return"]
    return finals


def replaced_note(replaced: list[tuple[str, str, int]]) -> str:
    """One sentence naming the runs whose earlier rows :func:`kept_rows` dropped as replaced, or ``""``."""
    if not replaced:
        return ""
    seeds: dict[tuple[str, str], list[int]] = {}
    for env, algo, seed in replaced:
        seeds.setdefault((env, algo), []).append(seed)
    groups = "; ".join(
        f"{ALGO_LABELS[algo]} on {env}, seeds {', '.join(map(str, sorted(found)))}" for (env, algo), found in seeds.items()
    )
    return (
        f". Not re-evaluated: {len(replaced)} runs that the benchmark has rerun since the earlier call, whose final "
        f"models this call did not have ({groups}); their earlier rows measured the replaced runs and are dropped"
    )


def markdown(
    rows: list[dict[str, Any]],
    episodes: int,
    seed_offset: int,
    command: str,
    merged: bool,
    replaced: list[tuple[str, str, int]],
) -> str:
    """
    The table of ``reevaluation.md``; ``merged``: some rows were kept from an earlier call; ``replaced``: the runs
    whose earlier rows were dropped (both from :func:`kept_rows`).
    """
    kept = " (the rows of the runs it did not evaluate kept from an earlier call with the same protocol)" if merged else ""
    kept += replaced_note(replaced)
    lines = [
        "# Learning results, final policies re-evaluated",
        "",
        f"Command: `{command}`{kept}. Each finished run's final model (rl_zoo3's `<env>.zip`, frozen `VecNormalize`",
        f"statistics) evaluated again: {episodes} deterministic episodes on an environment seeded with",
        f"{seed_offset} + the run's seed, built as `rl_zoo3 enjoy` builds it. Per run, the mean episode return; then",
        "mean ± std over seeds. The benchmark's own figure (last evaluation, 10 episodes; `learning.md`) is",
        "beside it. Verdicts use `learning.md`'s rule on these means; `learning.md` remains the benchmark's result.",
        "",
        f"Published anchor: {PUBLISHED_SOURCE}.",
        "",
        "| env | ours, re-evaluated | sb3-contrib, re-evaluated | ours, benchmark | sb3-contrib, benchmark "
        "| published | ours vs published | ours vs sb3-contrib |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for env in dict.fromkeys(row["env"] for row in rows):

        def column(algo: str, key: str, env: str = env) -> list[float]:
            return [row[key] for row in rows if row["env"] == env and row["algo"] == algo]

        ours, contrib = column("trpo_ext", "mean_return"), column("trpo", "mean_return")
        anchor, versus = verdicts(ours, contrib, ENVS[env])
        lines.append(
            f"| {env} | {format_result(ours)} | {format_result(contrib)} "
            f"| {format_result(column('trpo_ext', 'benchmark_return'))} | {format_result(column('trpo', 'benchmark_return'))} "
            f"| {ENVS[env].published:g} | {anchor} | {versus} |"
        )
    lines += ["", "Per run:", "", "| env | algo | seed | re-evaluated (mean ± std over episodes) | benchmark |"]
    lines.append("|---|---|---|---|---|")
    for row in rows:
        lines.append(
            f"| {row['env']} | {ALGO_LABELS[row['algo']]} | {row['seed']} "
            f"| {row['mean_return']:.1f} ± {row['std_return']:.1f} | {row['benchmark_return']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=None, help="Environments (default: every finished one)")
    parser.add_argument("--episodes", type=int, default=50, help="Evaluation episodes per run")
    parser.add_argument("--seed-offset", type=int, default=10_000, help="Evaluation env seed = offset + run seed")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "benchmarks" / "runs")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    if args.episodes < 1:
        parser.error(f"--episodes must be >= 1, got {args.episodes}")
    th.set_num_threads(1)

    from sb3_trpo_ext.zoo import register

    register()
    rows = []
    for run, _ in recorded_runs(args.runs_dir):
        if (args.envs is not None and run.env not in args.envs) or run.env not in ENVS or run.algo not in ALGOS:
            continue
        path = evaluations_file(run, args.runs_dir)
        assert path is not None  # recorded runs finished
        start = time.perf_counter()
        returns = reevaluate(run, args.runs_dir, args.episodes, args.seed_offset + run.seed)
        row = {
            "env": run.env,
            "algo": run.algo,
            "seed": run.seed,
            "episodes": len(returns),
            "seed_offset": args.seed_offset,
            "mean_return": statistics.fmean(returns),
            "std_return": statistics.pstdev(returns),
            "benchmark_return": float(np.mean(load_evaluations(path)[1][-1])),
        }
        rows.append(row)
        print(
            f"{run.env} {run.algo} seed {run.seed}: {row['mean_return']:.1f} over {len(returns)} episodes "
            f"(benchmark {row['benchmark_return']:.1f}) in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    evaluated = {(row["env"], row["algo"], row["seed"]) for row in rows}
    kept, replaced = kept_rows(
        args.out / "reevaluation.csv", evaluated, args.episodes, args.seed_offset, reported_finals(args.out)
    )
    rows = kept + rows
    order = {env: i for i, env in enumerate(ENVS)}
    rows.sort(key=lambda row: (order[row["env"]], ALGOS.index(row["algo"]), row["seed"]))
    write_csv(args.out / "reevaluation.csv", rows)
    command = "python benchmarks/reevaluate.py " + " ".join(sys.argv[1:])
    merged = any((row["env"], row["algo"], row["seed"]) not in evaluated for row in rows)
    (args.out / "reevaluation.md").write_text(
        markdown(rows, args.episodes, args.seed_offset, command.strip(), merged, replaced)
    )
    print(f"Wrote {args.out / 'reevaluation.md'} and {args.out / 'reevaluation.csv'}")


if __name__ == "__main__":
    main()
