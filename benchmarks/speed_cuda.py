"""
``train()`` and ``learn()`` on a CUDA GPU against the CPU, ours and ``sb3_contrib.TRPO`` side by side in one process.

Usage (from the repository root, on a machine with a CUDA GPU, after ``pip install -e ".[benchmarks]"``)::

    python benchmarks/speed_cuda.py            # about 9 minutes on a lent H100 (5.4 for the train() part)
    python benchmarks/speed_cuda.py --quick    # smoke run (batch 2048, one repeat, one short learn())

At RL Zoo's HalfCheetah hyperparameters (``speed.py``'s ``ZOO``; ``n_steps`` set to give the batch):

1. ``train()`` of ours (exact Fisher, and Fisher on every 5th sample) and of sb3-contrib on the CPU at 1 torch
   thread (the default of every benchmark here) and on the GPU, all six alternating, medians of ``--repeats``
   after a warm-up round (``speed.train_alone``), for each of ``--batches``;
2. end-to-end ``learn()`` steps per second of both on both devices (``speed.learn_speed``, ``--learn-seeds``
   seeds of ``--learn-budget`` steps).

Results are written after each batch and part, so a run cut short keeps what it finished. That the GPU takes the
same step as the CPU is tested in ``tests/test_cuda.py`` (skipped without a GPU). CPU remains the default device
of the package; CI runs neither.

Results: ``benchmarks/results/speed_cuda.{md,csv,png}`` and ``speed_cuda_learn.csv`` (``--out`` to change).
"""

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch as th
from speed import RESULTS, ZOO, learn_speed, summarise_learn, train_alone, write_csv

ENV_ID = "HalfCheetah-v5"


def write_markdown(command: str, rows: list[dict], learn_rows: list[dict], elapsed: float, path: Path) -> None:
    import sb3_contrib
    import stable_baselines3

    import sb3_trpo_ext

    gpu = th.cuda.get_device_name()
    lines = [
        "# `train()` on CUDA against the CPU",
        "",
        f"Command: `{command}`  ",
        f"Machine: {gpu}, {os.cpu_count()} CPU cores ({platform.machine()}); Python {platform.python_version()}, "
        f"torch {th.__version__} (CUDA {th.version.cuda}), SB3 {stable_baselines3.__version__}, "
        f"sb3-contrib {sb3_contrib.__version__}, sb3-trpo-ext {sb3_trpo_ext.__version__}; wall time "
        f"{elapsed / 60:.1f} min.",
        "",
        f"RL Zoo's TRPO hyperparameters for HalfCheetah (2 environments, critic minibatches of "
        f"{ZOO[ENV_ID]['kwargs']['batch_size']}, {ZOO[ENV_ID]['kwargs']['n_critic_updates']} critic epochs), "
        "`n_steps` set to give the batch. Identical values for both libraries, the same filled rollout buffer and",
        "initial weights; medians over alternated repeats in one process, GPU work synchronised before each clock",
        "reading. The CPU runs 1 torch thread. Speed-ups in a row are against sb3-contrib on the same device.",
        "",
        "| batch | device | sb3-contrib (ms) | ours (ms) | speed-up | ours, Fisher/5 (ms) | speed-up "
        "| ours: of which critic (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (batch, device), group in _groups(rows).items():
        by = {r["algorithm"]: r for r in group}
        ours, sub, contrib = by["ours"], by["ours-fisher/5"], by["sb3-contrib"]
        lines.append(
            f"| {batch} | {device} | {contrib['median_s'] * 1e3:.1f} | {ours['median_s'] * 1e3:.1f} "
            f"| {ours['speedup_vs_contrib']:.2f}x | {sub['median_s'] * 1e3:.1f} | {sub['speedup_vs_contrib']:.2f}x "
            f"| {ours['critic_median_s'] * 1e3:.1f} |"
        )
    lines += [
        "",
        "## GPU against CPU, same algorithm",
        "",
        "| batch | algorithm | cpu time / cuda time |",
        "|---|---|---|",
    ]
    for batch in dict.fromkeys(r["batch"] for r in rows):
        for name in ("ours", "ours-fisher/5", "sb3-contrib"):
            time_on = {r["device"]: r["median_s"] for r in rows if r["batch"] == batch and r["algorithm"] == name}
            lines.append(f"| {batch} | {name} | {time_on['cpu'] / time_on['cuda']:.2f}x |")
    if learn_rows:
        seeds = sorted({r["seed"] for r in learn_rows})
        lines += [
            "",
            f"## End-to-end `learn()`, {learn_rows[0]['steps']} steps, seeds {seeds[0]}-{seeds[-1]}",
            "",
            "Our `learn()` gets the ported `target_kl` and `cg_damping` (as in `speed.py`). Final return:",
            "deterministic policy, 10 episodes, mean ± std over the seeds.",
            "",
            "| device | sb3-contrib (steps/s) | ours (steps/s) | speed-up | final return, sb3-contrib | final return, ours |",
            "|---|---|---|---|---|---|",
        ]
        for device in dict.fromkeys(r["device"] for r in learn_rows):
            (summary,) = summarise_learn([r for r in learn_rows if r["device"] == device])
            lines.append(
                f"| {device} | {summary['contrib']:.0f} | {summary['ours']:.0f} | {summary['ratio']:.2f}x "
                f"| {summary['contrib_return']:.1f} ± {summary['contrib_return_std']:.1f} "
                f"| {summary['ours_return']:.1f} ± {summary['ours_return_std']:.1f} |"
            )
    path.write_text("\n".join(lines) + "\n")


def _groups(rows: list[dict]) -> dict[tuple[int, str], list[dict]]:
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["batch"], r["device"]), []).append(r)
    return groups


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    batches = list(dict.fromkeys(r["batch"] for r in rows))
    devices = list(dict.fromkeys(r["device"] for r in rows))
    names = ("sb3-contrib", "ours", "ours-fisher/5")
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    width = 0.8 / len(names)
    for ax, batch in zip(axes[0], batches, strict=True):
        for i, name in enumerate(names):
            values = [
                next(r["median_s"] for r in rows if (r["batch"], r["device"], r["algorithm"]) == (batch, d, name))
                for d in devices
            ]
            ax.bar(np.arange(len(devices)) + (i - 1) * width, values, width, label=name)
        ax.set_xticks(range(len(devices)), devices)
        ax.set_yscale("log")
        ax.set_ylabel("train() time (s, median, log scale)")
        ax.set_title(f"HalfCheetah config, batch {batch}")
        ax.legend()
    fig.suptitle(f"train() on {th.cuda.get_device_name()} and on the CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[8192, 65536])
    parser.add_argument("--learn-budget", type=int, default=20_480, help="learn() steps per run")
    parser.add_argument("--learn-seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="batch 2048, one repeat, for checking the script")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not th.cuda.is_available():
        sys.exit("speed_cuda.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    if args.quick:
        args.repeats, args.batches, args.learn_budget, args.learn_seeds = 1, [2048], 2048, 1
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    n_envs = ZOO[ENV_ID]["n_envs"]
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    rows: list[dict] = []
    learn_rows: list[dict] = []

    def report() -> None:
        write_csv(rows, args.out / "speed_cuda.csv")
        plot(rows, args.out / "speed_cuda.png")
        if learn_rows:
            write_csv(learn_rows, args.out / "speed_cuda_learn.csv")
        write_markdown(command, rows, learn_rows, time.perf_counter() - started, args.out / "speed_cuda.md")

    for batch in args.batches:
        rows += train_alone(ENV_ID, args.repeats, n_steps=batch // n_envs, devices=("cpu", "cuda"))
        for r in rows[-6:]:
            print(f"  {r['batch']} {r['device']:>4} {r['algorithm']:>14}: {r['median_s'] * 1e3:9.1f} ms", flush=True)
        report()
    learn_rows = learn_speed(ENV_ID, range(args.learn_seeds), args.learn_budget, devices=("cpu", "cuda"))
    report()
    print((args.out / "speed_cuda.md").read_text())


if __name__ == "__main__":
    main()
