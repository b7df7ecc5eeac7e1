"""The bookkeeping of the learning benchmark's scripts (no training here)."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import learning  # the benchmark scripts are not a package
import reevaluate


def test_reevaluation_keeps_the_rows_of_every_run_it_did_not_evaluate(tmp_path: Path) -> None:
    # Re-evaluating our CartPole seed 0 and sb3-contrib's new seed 3 (its seeds 0-2 run files gone) must keep
    # our other CartPole seeds, sb3-contrib's CartPole seeds 0-2 and every Acrobot row.
    path = tmp_path / "reevaluation.csv"
    fields = ["env", "algo", "seed", "episodes", "seed_offset", "mean_return", "std_return", "benchmark_return"]
    rows = [
        ("CartPole-v1", "trpo_ext", 0, 50, 10_000),
        ("CartPole-v1", "trpo_ext", 1, 50, 10_000),
        ("CartPole-v1", "trpo", 0, 50, 10_000),
        ("CartPole-v1", "trpo", 3, 50, 10_000),
        ("Acrobot-v1", "trpo_ext", 0, 50, 10_000),
        ("Acrobot-v1", "trpo", 0, 20, 10_000),  # another protocol: dropped
    ]
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(fields)
        writer.writerows([[*row, 1.0, 0.0, 1.0] for row in rows])
    evaluated = {("CartPole-v1", "trpo_ext", 0), ("CartPole-v1", "trpo", 3)}
    kept, replaced = reevaluate.kept_rows(path, evaluated, episodes=50, seed_offset=10_000)
    assert replaced == []
    assert [(row["env"], row["algo"], row["seed"]) for row in kept] == [
        ("CartPole-v1", "trpo_ext", 1),
        ("CartPole-v1", "trpo", 0),
        ("Acrobot-v1", "trpo_ext", 0),
    ]
    assert kept[0]["mean_return"] == 1.0


def test_reevaluation_drops_the_rows_of_runs_the_benchmark_replaced(tmp_path: Path) -> None:
    # Our Hopper seed 1 was rerun (its final benchmark evaluation in the report changed) and its new model is
    # not here: the earlier 50-episode row measured the replaced policy and must not stay in the table.
    path = tmp_path / "reevaluation.csv"
    fields = ["env", "algo", "seed", "episodes", "seed_offset", "mean_return", "std_return", "benchmark_return"]
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(fields)
        writer.writerow(["Hopper-v5", "trpo_ext", 0, 50, 10_000, 3500.0, 10.0, 3600.25])
        writer.writerow(["Hopper-v5", "trpo_ext", 1, 50, 10_000, 3400.0, 10.0, 3550.5])
        writer.writerow(["Hopper-v5", "trpo", 0, 50, 10_000, 3000.0, 10.0, 2900.0])
    reported = {
        ("Hopper-v5", "trpo_ext", 0): 3600.25,
        ("Hopper-v5", "trpo_ext", 1): 2811.0,
        ("Hopper-v5", "trpo", 0): 2900.0,
    }
    kept, replaced = reevaluate.kept_rows(path, set(), episodes=50, seed_offset=10_000, reported=reported)
    assert [(row["algo"], row["seed"]) for row in kept] == [("trpo_ext", 0), ("trpo", 0)]
    assert replaced == [("Hopper-v5", "trpo_ext", 1)]
    note = reevaluate.replaced_note(replaced)
    assert "ours (trpo_ext) on Hopper-v5, seeds 1" in note
    # A run the report no longer holds at all is not the table's either.
    kept, replaced = reevaluate.kept_rows(path, set(), 50, 10_000, reported={("Hopper-v5", "trpo", 0): 2900.0})
    assert [(row["algo"], row["seed"]) for row in kept] == [("trpo", 0)]
    assert len(replaced) == 2


def test_reported_finals_are_each_runs_last_evaluation(tmp_path: Path) -> None:
    with open(tmp_path / "learning_curves.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["env", "algo", "seed", "timesteps", "mean_return", "std_return"])
        writer.writerows([["Swimmer-v5", "trpo_ext", 0, 40000, 350.5, 1.0], ["Swimmer-v5", "trpo_ext", 0, 20000, 90.0, 1.0]])
    assert reevaluate.reported_finals(tmp_path) is None  # no runs file: no report to check against
    with open(tmp_path / "learning_runs.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["env", "algo", "seed", "budget", "eval_freq", "eval_episodes"])
        writer.writerow(["Swimmer-v5", "trpo_ext", 0, 40000, 20000, 10])
    assert reevaluate.reported_finals(tmp_path) == {("Swimmer-v5", "trpo_ext", 0): 350.5}


def test_run_commit_is_dirty_for_code_changes_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def git(*args: str) -> None:
        command = ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args]
        subprocess.run(command, cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("a = 1\n")
    (tmp_path / "benchmarks" / "results" / "learning.md").write_text("old\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "init")
    monkeypatch.setattr(learning, "REPO", tmp_path)
    assert not learning.git_commit().endswith("-dirty")
    (tmp_path / "benchmarks" / "results" / "learning.md").write_text("regenerated\n")
    assert not learning.git_commit().endswith("-dirty")
    (tmp_path / "code.py").write_text("a = 2\n")
    assert learning.git_commit().endswith("-dirty")


def test_cpu_model_names_family_and_model_numbers() -> None:
    # A cloud CPU's name can be just "AMD EPYC": the family and model numbers tell such CPUs apart.
    cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
    other = cpuinfo.replace("model\t\t: 17", "model\t\t: 1")
    assert learning.cpu_model(cpuinfo) == "AMD EPYC (family 25, model 17)"
    assert learning.cpu_model(cpuinfo + "\n" + other) == "AMD EPYC (family 25, model 17)"  # first processor's
    assert learning.cpu_model(other) != learning.cpu_model(cpuinfo)
    assert learning.cpu_model("model name\t: Some CPU\n") == "Some CPU"


def test_each_run_records_the_cpu_and_torch_instruction_set() -> None:
    import torch

    found = learning.versions()
    assert found["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert found["cpu"] == learning.cpu_model()
    assert found["cpu"] not in ("", "unknown")
