"""
Learning results: our TRPO (``trpo_ext``, ``zoo_configs/trpo_ext.yml``) against sb3-contrib's TRPO (``trpo``,
RL Zoo's own ``hyperparams/trpo.yml``) on the same environments, seeds and budgets, with the published RL Zoo
numbers beside them.

The one command (from the repository root, after ``pip install -e ".[benchmarks]"``)::

    python benchmarks/learning.py                       # every environment, seeds 0 1 2 3 4, both algorithms

Useful options: ``--envs CartPole-v1 Hopper-v5``, ``--seeds 0 1 2``, ``--algos trpo_ext``, ``--budget N``
(overrides every environment's budget), ``--eval-freq``/``--eval-episodes`` (override the protocol), ``--jobs``
(parallel runs, default 2 for a 2-core machine), ``--runs-dir`` (raw runs, default ``benchmarks/runs/``, ignored
by git), ``--out`` (aggregated results, default ``benchmarks/results/``), ``--report-only`` (aggregate what is
there, train nothing), ``--force`` (rerun finished runs), ``--conf-file`` (a candidate YAML for ``trpo_ext``: how
tuning candidates are measured with exactly this protocol, into their own ``--runs-dir`` and ``--out``).

How a run is made: one subprocess per (environment, algorithm, seed)::

    python -m sb3_trpo_ext.zoo train --algo ALGO --env ENV --seed S -n BUDGET --conf-file FILE
        --eval-freq F --eval-episodes N --n-eval-envs 1 --num-threads 1 --device cpu -f RUNDIR

that is, rl_zoo3's ``train`` with our algorithms registered, with ``OMP_NUM_THREADS=MKL_NUM_THREADS=1``. For
``trpo_ext`` FILE is the package's ``zoo_configs/trpo_ext.yml``. For ``trpo`` FILE is ``zoo_trpo.yml`` written into
the run directory: the installed rl_zoo3's ``hyperparams/trpo.yml`` read with PyYAML (``safe_load``, as rl_zoo3
reads it, so ``<<: *anchor`` merges are resolved) and reduced to the one entry for ENV; where the zoo only has an
older id of the environment (its MuJoCo entries are ``-v4``) that entry is used under today's id (``-v5``), see
``ZOO_ALIASES``. Every run trains for the same BUDGET whatever its YAML says (``-n``).

Evaluation protocol (rl_zoo3's ``ExperimentManager`` with ``--eval-freq > 0``, checked in rl_zoo3 2.x's
``exp_manager.py``): an SB3 ``EvalCallback`` on a separate eval env (``create_envs(n_eval_envs, eval_env=True)``,
seeded with the run's seed, Monitor-wrapped so returns are the true episode returns), deterministic actions (all
environments here are neither Atari nor MiniGrid), every ``F`` total environment steps (rl_zoo3 divides
``--eval-freq`` by ``n_envs``), ``N`` episodes each time. When the config normalises observations, the eval env's
``VecNormalize`` has ``training=False`` and ``norm_reward=False`` and receives the training env's statistics
(``sync_envs_normalization``) just before each evaluation: frozen during evaluation. Results land in the run's
``evaluations.npz``. Defaults: 10 episodes, every 5,000 steps at budgets up to 100k, every 10,000 at 200k, every
20,000 for the 1M-step MuJoCo tasks (``ENVS``). The final return of a run is its last evaluation.

Resuming: a run is finished when its directory holds ``done.json`` (written after the subprocess exits with 0)
and an ``evaluations.npz`` whose last evaluation is within one eval period of the budget. Finished runs are
skipped, so rerunning the same command after an interruption only trains what is missing; unfinished run
directories are wiped and restarted. ``--force`` reruns everything selected.

Writes into ``--out``, from every finished run under ``--runs-dir`` (not only the current selection, so the
environments can be run in batches) and every run of the report already there that ``--runs-dir`` lacks (so a
fresh checkout, with the committed results and no run files, can rerun one environment without losing the
others):

- ``learning_curves.csv``: env, algo, seed, timesteps, mean_return, std_return (every evaluation of every run);
- ``learning_<env>.png``: mean ± std over seeds of the evaluation return against steps, per algorithm, with the
  published anchor as a dashed line;
- ``learning.md``: final evaluation return, mean ± std over seeds, per algorithm and environment, the published
  anchor and the verdicts (see ``verdicts``);
- ``learning_runs.csv``: every run's exact command, return code, wall time and the versions of Python, torch,
  Gymnasium, SB3, sb3-contrib, rl_zoo3 and this package, the commit of this checkout when the run started, and the
  CPU model and torch's CPU instruction set (runs repeat bit for bit only where all of these match).
"""

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    # This checkout's sb3_trpo_ext (and its zoo_configs/), as in the training subprocesses, not another install.
    sys.path.insert(0, str(REPO))
ALGOS = ("trpo_ext", "trpo")
ALGO_LABELS = {"trpo_ext": "ours (trpo_ext)", "trpo": "sb3-contrib (trpo)"}
PUBLISHED_SOURCE = (
    "RL Baselines3 Zoo, benchmark.md, TRPO rows (sb3-contrib TRPO, final mean return; "
    "https://github.com/DLR-RM/rl-baselines3-zoo/blob/master/benchmark.md)"
)


@dataclass(frozen=True)
class EnvSpec:
    """
    One benchmark environment.

    :param budget: Training steps (the zoo's budget, the same for both algorithms)
    :param eval_freq: Default evaluation period in environment steps
    :param published: Published RL Zoo TRPO return (``PUBLISHED_SOURCE``)
    :param published_env: Environment id under which it was published
    :param target: Extra target the issue demands, if any
    """

    budget: int
    eval_freq: int
    published: float
    published_env: str
    target: float | None = None


ENVS: dict[str, EnvSpec] = {
    "CartPole-v1": EnvSpec(100_000, 5_000, 500.0, "CartPole-v1"),
    "Acrobot-v1": EnvSpec(100_000, 5_000, -83.1, "Acrobot-v1"),
    "MountainCar-v0": EnvSpec(100_000, 5_000, -107.3, "MountainCar-v0"),
    "MountainCarContinuous-v0": EnvSpec(50_000, 5_000, 92.5, "MountainCarContinuous-v0"),
    "Pendulum-v1": EnvSpec(100_000, 5_000, -174.6, "Pendulum-v1"),
    "LunarLander-v3": EnvSpec(200_000, 10_000, 133.2, "LunarLander-v2"),
    "LunarLanderContinuous-v3": EnvSpec(200_000, 10_000, 262.4, "LunarLanderContinuous-v2"),
    "HalfCheetah-v5": EnvSpec(1_000_000, 20_000, 1785.0, "HalfCheetah-v3", target=4500.0),
    "Hopper-v5": EnvSpec(1_000_000, 20_000, 3618.0, "Hopper-v3"),
    "Walker2d-v5": EnvSpec(1_000_000, 20_000, 4933.0, "Walker2d-v3"),
    "Swimmer-v5": EnvSpec(1_000_000, 20_000, 365.7, "Swimmer-v3"),
}
# Today's id -> older ids to look up in rl_zoo3's trpo.yml when it has no entry under today's id.
ZOO_ALIASES: dict[str, tuple[str, ...]] = {
    "LunarLander-v3": ("LunarLander-v2",),
    "LunarLanderContinuous-v3": ("LunarLanderContinuous-v2",),
    "HalfCheetah-v5": ("HalfCheetah-v4", "HalfCheetah-v3"),
    "Hopper-v5": ("Hopper-v4", "Hopper-v3"),
    "Walker2d-v5": ("Walker2d-v4", "Walker2d-v3"),
    "Swimmer-v5": ("Swimmer-v4", "Swimmer-v3"),
}
# mujoco and numba were added on 2026-12-04: earlier rows leave them empty
VERSION_PACKAGES = ("torch", "gymnasium", "mujoco", "stable-baselines3", "sb3-contrib", "rl_zoo3", "sb3-trpo-ext", "numba")


@dataclass(frozen=True)
class Run:
    """One training run: an algorithm on an environment with a seed, budget and evaluation protocol."""

    env: str
    algo: str
    seed: int
    budget: int
    eval_freq: int
    eval_episodes: int

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "Run":
        """The run that a record describes: a ``done.json``, or a row of ``learning_runs.csv`` (strings)."""
        keys = ("budget", "eval_freq", "eval_episodes")
        return cls(record["env"], record["algo"], int(record["seed"]), *(int(record[key]) for key in keys))

    def directory(self, runs_dir: Path) -> Path:
        """Directory of this run's files."""
        return runs_dir / self.env / self.algo / f"seed{self.seed}"


def git_commit() -> str:
    """
    Commit of this checkout, with ``-dirty`` when tracked files have uncommitted changes. The results directory does
    not count: the report rewrites it while later runs of the same benchmark start, and it holds no code.
    """
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        outside_results = ["--", ".", ":(exclude)benchmarks/results"]
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", *outside_results], cwd=REPO).returncode != 0
    except OSError:
        return "unknown"
    return (commit or "unknown") + ("-dirty" if dirty else "")


def cpu_model(cpuinfo: str | None = None) -> str:
    """
    The CPU model as ``/proc/cpuinfo`` names it, with its family and model numbers: a cloud machine's model name can
    be as vague as "AMD EPYC", and the same command gave different runs on two machines of one kind whose CPUs were
    not recorded (``tuning.md``, ninth round of 2026-12-07). ``platform.processor()`` without ``/proc/cpuinfo``.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return platform.processor() or "unknown"
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first processor's entry; the others repeat it
    name = fields.get("model name") or platform.processor() or "unknown"
    if "cpu family" in fields and "model" in fields:
        return f"{name} (family {fields['cpu family']}, model {fields['model']})"
    return name


def torch_cpu_capability() -> str:
    """The instruction set torch's CPU kernels dispatch to ("AVX512", "AVX2", ...): it changes floating-point results."""
    import torch  # here, not at the top: the report-only path needs no torch until a run is launched

    return str(torch.backends.cpu.get_cpu_capability())


def versions() -> dict[str, str]:
    """
    Versions of Python and the packages that determine the results, the CPU they ran on, and the commit of this
    checkout. Runs repeat bit for bit only when all of these match.
    """
    found = {"python": platform.python_version()}
    for package in VERSION_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    found["commit"] = git_commit()
    # added on 2026-12-07, after the table's rows were made: their rows leave both empty
    found["cpu"] = cpu_model()
    found["cpu_capability"] = torch_cpu_capability()
    return found


def zoo_trpo_file() -> Path:
    """rl_zoo3's own hyperparameter file for sb3-contrib's TRPO."""
    import rl_zoo3

    return Path(rl_zoo3.__file__).parent / "hyperparams" / "trpo.yml"


def contrib_config(env: str) -> tuple[dict[str, Any], str]:
    """
    rl_zoo3's ``trpo.yml`` entry for ``env``, looking up older ids of the environment when needed.

    :param env: Environment id
    :return: The entry (anchors resolved) and the id it was found under
    """
    with open(zoo_trpo_file()) as file:
        hyperparams = yaml.safe_load(file)
    for name in (env, *ZOO_ALIASES.get(env, ())):
        if name in hyperparams:
            return hyperparams[name], name
    raise KeyError(f"no entry for {env} (or {ZOO_ALIASES.get(env, ())}) in {zoo_trpo_file()}")


def config_for(run: Run, directory: Path, ours: Path | None = None) -> Path:
    """
    The hyperparameter file of ``run``: ours (as shipped, or ``ours``), or the zoo's entry written under ``run.env``.

    :param run: The run
    :param directory: Its directory, where a derived file is written
    :param ours: A candidate file for ``trpo_ext`` runs instead of the shipped one (tuning); copied into ``directory``
        so the run stays reproducible after the candidate is edited or deleted
    :return: Path of the YAML file to pass as ``--conf-file``
    """
    if run.algo == "trpo_ext":
        if ours is not None:
            return Path(shutil.copy(ours, directory / "trpo_ext_candidate.yml"))
        from sb3_trpo_ext.zoo import config_file

        return config_file("trpo_ext")
    entry, source = contrib_config(run.env)
    path = directory / "zoo_trpo.yml"
    header = f"# rl_zoo3 {zoo_trpo_file()} entry {source}, written under {run.env}\n"
    path.write_text(header + yaml.safe_dump({run.env: entry}, sort_keys=False))
    return path


def command_for(run: Run, directory: Path, conf_file: Path) -> list[str]:
    """The training command of ``run`` (rl_zoo3's ``train`` through ``python -m sb3_trpo_ext.zoo``)."""
    return [
        sys.executable,
        "-m",
        "sb3_trpo_ext.zoo",
        "train",
        "--algo",
        run.algo,
        "--env",
        run.env,
        "--seed",
        str(run.seed),
        "-n",
        str(run.budget),
        "--conf-file",
        str(conf_file),
        "--eval-freq",
        str(run.eval_freq),
        "--eval-episodes",
        str(run.eval_episodes),
        "--n-eval-envs",
        "1",
        "--num-threads",
        "1",
        "--device",
        "cpu",
        "--verbose",
        "1",
        "-f",
        str(directory / "zoo"),
    ]


def evaluations_file(run: Run, runs_dir: Path) -> Path | None:
    """The ``evaluations.npz`` rl_zoo3 wrote for ``run`` (its log folder is ``zoo/<algo>/<env>_<id>/``)."""
    found = sorted((run.directory(runs_dir) / "zoo" / run.algo).glob(f"{run.env}_*/evaluations.npz"))
    return found[-1] if found else None


def load_evaluations(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """
    Evaluation steps and per-evaluation episode returns from an ``evaluations.npz``.

    :param path: The file
    :return: ``timesteps`` (n_evals,) and ``results`` (n_evals, n_episodes)
    """
    with np.load(path) as data:
        return data["timesteps"], data["results"]


def is_finished(run: Run, runs_dir: Path) -> bool:
    """Whether ``run`` completed: done marker present and evaluations up to the end of the budget."""
    if not (run.directory(runs_dir) / "done.json").exists():
        return False
    path = evaluations_file(run, runs_dir)
    if path is None:
        return False
    timesteps, _ = load_evaluations(path)
    return len(timesteps) > 0 and timesteps[-1] + run.eval_freq >= run.budget


def execute(run: Run, runs_dir: Path, force: bool, ours: Path | None = None) -> str:
    """
    Train ``run`` in a subprocess unless it is finished (or ``force``); record command, versions and wall time.

    :param run: The run
    :param runs_dir: Root of the run directories
    :param force: Rerun even if finished
    :param ours: Candidate hyperparameter file for ``trpo_ext`` (see ``config_for``), default the shipped one
    :return: A one-line status
    """
    directory = run.directory(runs_dir)
    if not force and is_finished(run, runs_dir):
        return f"skip  {run.env} {run.algo} seed {run.seed} (finished)"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    command = command_for(run, directory, config_for(run, directory, ours))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    launched_with = versions()  # the code the subprocess imports is the checkout's at launch, not at exit
    start = time.perf_counter()
    with open(directory / "train.log", "w") as log:
        returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    wall = time.perf_counter() - start
    record = {
        "env": run.env,
        "algo": run.algo,
        "seed": run.seed,
        "budget": run.budget,
        "eval_freq": run.eval_freq,
        "eval_episodes": run.eval_episodes,
        "command": " ".join(command),
        "returncode": returncode,
        "wall_s": round(wall, 1),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **launched_with,
    }
    (directory / "run.json").write_text(json.dumps(record, indent=2))
    if returncode == 0:
        (directory / "done.json").write_text(json.dumps(record, indent=2))
        return f"done  {run.env} {run.algo} seed {run.seed} in {wall:.0f} s"
    return f"FAIL  {run.env} {run.algo} seed {run.seed} (exit {returncode}, see {directory / 'train.log'})"


def curve_rows(runs: list[Run], runs_dir: Path) -> list[dict[str, Any]]:
    """Every evaluation of every run that has an ``evaluations.npz``, as CSV rows."""
    rows = []
    for run in runs:
        path = evaluations_file(run, runs_dir)
        if path is None:
            continue
        timesteps, results = load_evaluations(path)
        for step, returns in zip(timesteps, results, strict=True):
            rows.append(
                {
                    "env": run.env,
                    "algo": run.algo,
                    "seed": run.seed,
                    "timesteps": int(step),
                    "mean_return": float(np.mean(returns)),
                    "std_return": float(np.std(returns)),
                }
            )
    return rows


def final_returns(rows: list[dict[str, Any]], env: str, algo: str) -> list[float]:
    """Each seed's last evaluation return for ``env`` and ``algo``."""
    last: dict[int, dict[str, Any]] = {}
    for row in rows:
        is_later = row["seed"] not in last or row["timesteps"] > last[row["seed"]]["timesteps"]
        if row["env"] == env and row["algo"] == algo and is_later:
            last[row["seed"]] = row
    return [last[seed]["mean_return"] for seed in sorted(last)]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.pstdev(values)


def format_result(values: list[float]) -> str:
    """``mean ± std (n seeds)``, or ``-`` when there are none."""
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.1f} ± {std:.1f} ({len(values)})"


def verdicts(ours: list[float], contrib: list[float], spec: EnvSpec) -> tuple[str, str]:
    """
    Our result against the published anchor and against sb3-contrib, as the issue states them: *pass* when our
    mean over seeds is at least the published number (and ``spec.target`` where there is one), and at least
    sb3-contrib's mean in the same benchmark. No tolerance: a near miss is a miss, reported with its numbers.

    :return: The two verdicts as Markdown cells
    """
    if not ours:
        return "-", "-"
    mean = statistics.fmean(ours)
    anchor = "pass" if mean >= spec.published else "FAIL"
    if spec.target is not None:
        anchor += f"; target {spec.target:g}: " + ("pass" if mean >= spec.target else "FAIL")
    if not contrib:
        return anchor, "-"
    return anchor, "pass" if mean >= statistics.fmean(contrib) else "FAIL"


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` as CSV: the columns of all of them, in order of appearance, empty where a row lacks one."""
    if not rows:
        return
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(dict.fromkeys(key for row in rows for key in row)), restval="")
        writer.writeheader()
        writer.writerows(rows)


def plot_env(path: Path, env: str, rows: list[dict[str, Any]], algos: list[str]) -> None:
    """Learning curves of ``env``: mean ± std over seeds per algorithm, and the published anchor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for algo in algos:
        by_step: dict[int, list[float]] = {}
        for row in rows:
            if row["env"] == env and row["algo"] == algo:
                by_step.setdefault(row["timesteps"], []).append(row["mean_return"])
        if not by_step:
            continue
        steps = np.array(sorted(by_step))
        means = np.array([np.mean(by_step[s]) for s in steps])
        stds = np.array([np.std(by_step[s]) for s in steps])
        seeds = max(len(v) for v in by_step.values())
        (line,) = axis.plot(steps, means, label=f"{ALGO_LABELS[algo]}, {seeds} seeds")
        axis.fill_between(steps, means - stds, means + stds, color=line.get_color(), alpha=0.2)
    spec = ENVS.get(env)
    if spec is not None:
        axis.axhline(spec.published, color="gray", linestyle="--", label=f"RL Zoo TRPO ({spec.published_env})")
    axis.set_title(f"{env}: deterministic evaluation return")
    axis.set_xlabel("environment steps")
    axis.set_ylabel("mean episode return")
    axis.legend(loc="best", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def markdown(rows: list[dict[str, Any]], envs: list[str], runs: list[Run], run_records: list[dict[str, Any]]) -> str:
    """The Markdown report: final returns per algorithm, the anchor and the verdicts."""
    lines = [
        "# Learning results",
        "",
        "Final deterministic evaluation return (last evaluation of each run, mean over its episodes), "
        "mean ± std over seeds (number of seeds). Protocol and command: `benchmarks/learning.py`.",
        "",
        f"Published anchor: {PUBLISHED_SOURCE}. Verdicts: see `verdicts` in the script "
        "(our mean over seeds ≥ the published number, and ≥ sb3-contrib's mean).",
        "",
        "| env | budget | eval every / episodes | ours (trpo_ext) | sb3-contrib (trpo) | published (env) "
        "| ours vs published | ours vs sb3-contrib |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for env in envs:
        spec = ENVS[env]
        env_runs = [run for run in runs if run.env == env]
        if not env_runs:
            continue
        protocols = {(run.budget, run.eval_freq, run.eval_episodes) for run in env_runs}
        mixed = " (MIXED budgets/protocols)" if len(protocols) > 1 else ""
        ours = final_returns(rows, env, "trpo_ext")
        contrib = final_returns(rows, env, "trpo")
        versus_anchor, versus_contrib = verdicts(ours, contrib, spec)
        lines.append(
            f"| {env} | {env_runs[0].budget:,}{mixed} | {env_runs[0].eval_freq:,} / {env_runs[0].eval_episodes} "
            f"| {format_result(ours)} | {format_result(contrib)} | {spec.published:g} ({spec.published_env}) "
            f"| {versus_anchor} | {versus_contrib} |"
        )
    if run_records:
        total = sum(float(record["wall_s"]) for record in run_records)
        values = {
            name: ", ".join(sorted({str(record.get(name) or "?") for record in run_records}))
            for name in ("python", *VERSION_PACKAGES, "commit")
        }
        lines += [
            "",
            f"{len(run_records)} runs, {total / 3600:.2f} h of training wall time in all "
            "(per run: `learning_runs.csv`). Versions: "
            + "; ".join(f"{name} {value}" for name, value in values.items())
            + ".",
        ]
    return "\n".join(lines) + "\n"


def table_order(item: tuple["Run", Any]) -> tuple[int, int, int]:
    """Sort key of ``(run, ...)`` pairs: environments as in ``ENVS``, then algorithm, then seed."""
    run, order = item[0], {env: i for i, env in enumerate(ENVS)}
    return order.get(run.env, len(order)), ALGOS.index(run.algo), run.seed


def recorded_runs(runs_dir: Path) -> list[tuple[Run, dict[str, Any]]]:
    """Every finished run under ``runs_dir`` (its ``done.json``), whatever the current selection, in table order."""
    found = []
    for path in runs_dir.glob("*/*/seed*/done.json"):
        record = json.loads(path.read_text())
        run = Run.from_record(record)
        found.append((run, record))
    return sorted(found, key=table_order)


def reported_runs(out: Path) -> list[tuple[Run, dict[str, Any], list[dict[str, Any]]]]:
    """
    The runs of the report already in ``out`` (its ``learning_runs.csv`` and ``learning_curves.csv``), each with its
    evaluation rows: all that a fresh checkout, whose runs directory is empty, knows of them.
    """
    runs_file, curves_file = out / "learning_runs.csv", out / "learning_curves.csv"
    if not (runs_file.exists() and curves_file.exists()):
        return []
    curves: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    with open(curves_file, newline="") as file:
        for row in csv.DictReader(file):
            key = (row["env"], row["algo"], int(row["seed"]))
            typed = {
                "env": key[0],
                "algo": key[1],
                "seed": key[2],
                "timesteps": int(row["timesteps"]),
                "mean_return": float(row["mean_return"]),
                "std_return": float(row["std_return"]),
            }
            curves.setdefault(key, []).append(typed)
    with open(runs_file, newline="") as file:
        records = list(csv.DictReader(file))
    found = []
    for record in records:
        run = Run.from_record(record)
        found.append((run, record, curves.get((run.env, run.algo, run.seed), [])))
    return found


def report(runs_dir: Path, out: Path) -> None:
    """
    Aggregate every finished run under ``runs_dir`` into CSVs, PNGs and Markdown in ``out``.

    The report covers all finished runs, not only those of the current ``--envs``/``--seeds``/``--algos``, so
    environments can be run in batches without losing earlier ones from the tables. Runs that the report already in
    ``out`` lists and ``runs_dir`` does not hold (a fresh checkout has the committed results but no run files) are
    kept as that report recorded them; a run under ``runs_dir`` replaces its namesake (same environment, algorithm
    and seed).
    """
    out.mkdir(parents=True, exist_ok=True)
    found = recorded_runs(runs_dir)
    rows = curve_rows([run for run, _ in found], runs_dir)
    fresh = {(run.env, run.algo, run.seed) for run, _ in found}
    for run, record, curve in reported_runs(out):
        if (run.env, run.algo, run.seed) not in fresh:
            found.append((run, record))
            rows += curve
    found.sort(key=table_order)
    runs = [run for run, _ in found]
    records = [record for _, record in found]
    order = {(run.env, run.algo, run.seed): i for i, run in enumerate(runs)}
    rows.sort(key=lambda row: (order[(row["env"], row["algo"], row["seed"])], row["timesteps"]))
    write_csv(out / "learning_curves.csv", rows)
    write_csv(out / "learning_runs.csv", records)
    envs = list(dict.fromkeys(run.env for run in runs))
    algos = [algo for algo in ALGOS if any(run.algo == algo for run in runs)]
    for env in envs:
        plot_env(out / f"learning_{env}.png", env, rows, algos)
    (out / "learning.md").write_text(markdown(rows, envs, runs, records))
    print(f"Wrote {out / 'learning.md'}, {out / 'learning_curves.csv'}, {out / 'learning_runs.csv'} and the curves")


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=list(ENVS), choices=list(ENVS), metavar="ENV")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--algos", nargs="+", default=list(ALGOS), choices=list(ALGOS))
    parser.add_argument("--budget", type=int, default=None, help="training steps for every env (default: ENVS)")
    parser.add_argument("--eval-freq", type=int, default=None, help="evaluation period in steps (default: ENVS)")
    parser.add_argument("--eval-episodes", type=int, default=10, help="episodes per evaluation")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (one process each)")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "benchmarks" / "runs")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument(
        "--conf-file",
        type=Path,
        default=None,
        help="hyperparameter YAML for trpo_ext instead of zoo_configs/trpo_ext.yml (tuning candidates; "
        "give them their own --runs-dir and --out)",
    )
    parser.add_argument("--force", action="store_true", help="rerun finished runs")
    parser.add_argument("--report-only", action="store_true", help="aggregate existing runs, train nothing")
    return parser.parse_args()


def main() -> None:
    """Train what is missing, in parallel, then write the report."""
    args = parse_args()
    runs = [
        Run(
            env,
            algo,
            seed,
            args.budget or ENVS[env].budget,
            args.eval_freq or ENVS[env].eval_freq,
            args.eval_episodes,
        )
        for env in args.envs
        for algo in args.algos
        for seed in args.seeds
    ]
    if not args.report_only:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(execute, run, args.runs_dir, args.force, args.conf_file) for run in runs]
            for future in as_completed(futures):
                print(future.result(), flush=True)
    report(args.runs_dir, args.out)


if __name__ == "__main__":
    main()
