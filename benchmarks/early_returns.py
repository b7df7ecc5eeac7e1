"""
Early-training returns of ours and ``sb3_contrib.TRPO`` at the speed benchmark's ``learn()`` runs, over more seeds.

``benchmarks/speed.py`` reports the final evaluation return of its five timed ``learn()`` runs per environment. At
40,960 steps these are early-training returns whose spread between seeds is as large as the returns themselves;
this script runs the same configurations (``speed.learn_speed``: RL Zoo hyperparameters, ported for ours, same seed
for both algorithms) on more seeds and tests the paired differences.

Usage (from the repository root)::

    python benchmarks/early_returns.py                      # seeds 0-14, the three speed environments
    python benchmarks/early_returns.py --envs HalfCheetah-v5 --seeds 0 1 2

Results: ``benchmarks/results/early_returns.{md,csv}``. Timing is not reported (other runs may share the machine).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

from scipy import stats

sys.path.insert(0, str(Path(__file__).parent))
import speed  # the speed benchmark's configurations and learn() runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=list(speed.ZOO))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(15)))
    parser.add_argument("--budget", type=int, default=40_960)
    parser.add_argument("--out", type=Path, default=speed.RESULTS)
    args = parser.parse_args()
    started = time.perf_counter()
    rows: list[dict] = []
    for env_id in args.envs:
        for row in speed.learn_speed(env_id, args.seeds, args.budget):
            rows.append({k: v for k, v in row.items() if k not in ("seconds", "steps_per_s")})
    args.out.mkdir(parents=True, exist_ok=True)
    speed.write_csv(rows, args.out / "early_returns.csv")

    command = "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    lines = [
        "# Early-training returns: ours vs sb3-contrib",
        "",
        f"Command: `{command}`; wall time {(time.perf_counter() - started) / 60:.1f} min.",
        "",
        f"Each run: `learn({args.budget})` at the speed benchmark's configuration, then 10 deterministic episodes on a",
        "separate environment (frozen `VecNormalize` statistics). Same seed for both algorithms; p-values of the",
        "paired differences (ours - sb3-contrib) over seeds.",
        "",
        "| env | seeds | ours | sb3-contrib | mean difference | paired t-test p | Wilcoxon p |",
        "|---|---|---|---|---|---|---|",
    ]
    for env_id in args.envs:
        ours = [r["final_return"] for r in rows if r["case"] == env_id and r["algorithm"] == "ours"]
        contrib = [r["final_return"] for r in rows if r["case"] == env_id and r["algorithm"] == "sb3-contrib"]
        differences = [a - b for a, b in zip(ours, contrib, strict=True)]
        ttest = stats.ttest_rel(ours, contrib).pvalue if len(ours) > 1 else float("nan")
        wilcoxon = stats.wilcoxon(differences).pvalue if any(differences) else 1.0
        lines.append(
            f"| {env_id} | {len(ours)} | {statistics.mean(ours):.1f} ± {statistics.pstdev(ours):.1f} "
            f"| {statistics.mean(contrib):.1f} ± {statistics.pstdev(contrib):.1f} | {statistics.mean(differences):+.1f} "
            f"| {ttest:.2f} | {wilcoxon:.2f} |"
        )
    lines += ["", "Per seed: `early_returns.csv`.", ""]
    (args.out / "early_returns.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
