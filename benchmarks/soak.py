"""
Soak test: train for a long time and record the process's resident memory (RSS) along the way.

Usage (from the repository root, after ``pip install -e ".[benchmarks]"``)::

    nice -n 10 python benchmarks/soak.py                     # 1M CartPole-v1 steps
    python benchmarks/soak.py --timesteps 50000 --out /tmp    # smoke run

A leak (tensors kept alive by the logger, growing autograd graphs, buffers re-allocated per rollout, ...) shows as
RSS that keeps rising once the allocator has reached its steady state. The script samples RSS every
``--sample-every`` steps, treats the first ``--warmup`` fraction of the run as warm-up, and reports the RSS at the
end of warm-up, at the end, the growth between them and the least-squares slope after warm-up.

Results: ``soak.csv`` (every sample), ``soak.md`` (summary) and ``soak.png`` (the curve) in ``--out``
(default ``benchmarks/results``).
"""

import argparse
import csv
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import configure

import sb3_trpo_ext
from sb3_trpo_ext import TRPO

# One thread: the machines this runs on have 2 shared cores (see benchmarks/speed.py).
th.set_num_threads(1)

RESULTS = Path(__file__).parent / "results"


def resident_memory_mib() -> float:
    """Resident set size of this process in MiB, from ``/proc`` (Linux) or ``psutil`` if that is installed."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        pass
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # reported in kB
    raise RuntimeError("cannot read the resident memory: install psutil")


class MemorySampler(BaseCallback):
    """
    Records ``(timesteps, seconds, RSS)`` every ``every`` environment steps.

    :param every: Sampling period in environment steps (summed over environments)
    """

    def __init__(self, every: int):
        super().__init__()
        self.every = every
        self.samples: list[tuple[int, float, float]] = []
        self._next = 0
        self._start = time.perf_counter()

    def _on_step(self) -> bool:
        if self.num_timesteps >= self._next:
            self.samples.append((self.num_timesteps, time.perf_counter() - self._start, resident_memory_mib()))
            self._next += self.every
        return True


def summarize(samples: list[tuple[int, float, float]], warmup: float) -> dict[str, float]:
    """
    RSS after warm-up, at the end, their difference and the fitted slope after warm-up.

    :param samples: ``(timesteps, seconds, RSS MiB)`` rows
    :param warmup: Fraction of the run counted as warm-up
    :return: Summary numbers
    """
    steps = np.array([s[0] for s in samples], dtype=float)
    rss = np.array([s[2] for s in samples])
    after = steps >= warmup * steps[-1]
    slope = np.polyfit(steps[after], rss[after], 1)[0] if after.sum() > 1 else float("nan")
    # Single samples carry a few MiB of allocator noise: compare window means and the fitted trend instead.
    window = max(1, int(after.sum()) // 10)
    return {
        "rss_start": rss[0],
        "rss_after_warmup": rss[after][0],
        "rss_end": rss[-1],
        "rss_min_after_warmup": rss[after].min(),
        "rss_max_after_warmup": rss[after].max(),
        "growth": rss[-1] - rss[after][0],
        "window_growth": rss[after][-window:].mean() - rss[after][:window].mean(),
        "trend_growth": slope * (steps[-1] - steps[after][0]),
        "slope_mib_per_100k": slope * 1e5,
        "warmup_steps": steps[after][0],
    }


def plot(samples: list[tuple[int, float, float]], summary: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([s[0] for s in samples], [s[2] for s in samples], lw=1.2)
    ax.axvline(summary["warmup_steps"], color="grey", ls="--", lw=0.8, label="end of warm-up")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_title("TRPO soak, CartPole-v1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timesteps", type=int, default=1_000_000)
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--n-steps", type=int, default=256, help="steps per environment per update")
    parser.add_argument("--sample-every", type=int, default=10_000)
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of the run counted as warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    env = make_vec_env("CartPole-v1", n_envs=args.n_envs, seed=args.seed)
    model = TRPO("MlpPolicy", env, n_steps=args.n_steps, batch_size=512, n_critic_updates=5, seed=args.seed)
    # A real output format, so that the logger writes every row as in a monitored run.
    log_dir = tempfile.mkdtemp(prefix="soak-")
    model.set_logger(configure(log_dir, ["csv"]))
    sampler = MemorySampler(args.sample_every)
    start = time.perf_counter()
    # log_interval=1 dumps a row after every update: the logger is a usual suspect for slow leaks.
    model.learn(args.timesteps, callback=sampler, log_interval=1)
    wall = time.perf_counter() - start
    model.logger.close()
    shutil.rmtree(log_dir)
    sampler.samples.append((model.num_timesteps, wall, resident_memory_mib()))

    summary = summarize(sampler.samples, args.warmup)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "soak.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["timesteps", "seconds", "rss_mib"])
        writer.writerows([(t, f"{s:.2f}", f"{r:.2f}") for t, s, r in sampler.samples])
    plot(sampler.samples, summary, args.out / "soak.png")

    command = "nice -n 10 python benchmarks/soak.py"
    if args.timesteps != 1_000_000:
        command += f" --timesteps {args.timesteps}"
    lines = [
        "# Soak: resident memory over a long training run",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, 1 torch thread, Python {platform.python_version()}, torch {th.__version__}, "
        f"sb3-trpo-ext {sb3_trpo_ext.__version__}; wall time {wall / 60:.1f} min ({model.num_timesteps / wall:.0f} steps/s, "
        "on 2 cores shared with other jobs).",
        "",
        f"CartPole-v1, {args.n_envs} environments, n_steps={args.n_steps} ({args.n_envs * args.n_steps} samples per "
        f"update, {model._n_updates} updates), {model.num_timesteps} steps, RSS sampled every {args.sample_every} steps "
        f"(logger writing a csv row per update) from `/proc/self/status` (VmRSS) or psutil; "
        f"warm-up = first {args.warmup:.0%} of the run.",
        "",
        "| | RSS (MiB) |",
        "|---|---|",
        f"| first sample | {summary['rss_start']:.1f} |",
        f"| after warm-up ({summary['warmup_steps']:.0f} steps) | {summary['rss_after_warmup']:.1f} |",
        f"| minimum after warm-up | {summary['rss_min_after_warmup']:.1f} |",
        f"| maximum after warm-up | {summary['rss_max_after_warmup']:.1f} |",
        f"| end | {summary['rss_end']:.1f} |",
        f"| growth after warm-up, single samples (end - after warm-up) | {summary['growth']:+.1f} |",
        f"| growth after warm-up, means of the first and last 10% of the samples | {summary['window_growth']:+.1f} |",
        f"| fitted slope after warm-up, per 100k steps | {summary['slope_mib_per_100k']:+.3f} |",
        f"| fitted growth over the run after warm-up | {summary['trend_growth']:+.1f} |",
        "",
        f"After warm-up the RSS moves within a {summary['rss_max_after_warmup'] - summary['rss_min_after_warmup']:.1f} MiB "
        "band (allocator noise between rollouts and updates); "
        + (
            "the fitted trend over the rest of the run is below 1% of the RSS: no leak."
            if summary["trend_growth"] < 0.01 * summary["rss_after_warmup"]
            else "the fitted trend exceeds 1% of the RSS: CHECK FOR A LEAK."
        ),
        "",
        "![soak](soak.png)",
        "",
    ]
    (args.out / "soak.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
