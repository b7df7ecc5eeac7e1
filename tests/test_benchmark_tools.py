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
    kept = reevaluate.kept_rows(path, evaluated, episodes=50, seed_offset=10_000)
    assert [(row["env"], row["algo"], row["seed"]) for row in kept] == [
        ("CartPole-v1", "trpo_ext", 1),
        ("CartPole-v1", "trpo", 0),
        ("Acrobot-v1", "trpo_ext", 0),
    ]
    assert kept[0]["mean_return"] == 1.0


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
