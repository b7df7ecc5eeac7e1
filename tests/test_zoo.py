"""RL Zoo integration: shipped hyperparameters, the zoo command, tuning locally and through PostgreSQL."""

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import gymnasium as gym
import pytest
import yaml

pytest.importorskip("rl_zoo3", reason="the zoo extra is not installed")

from sb3_trpo_ext import TRPO
from sb3_trpo_ext.callbacks import TargetKLSchedule
from sb3_trpo_ext.zoo import CONFIG_DIR, config_file, prepare_arguments, register, sample_trpo_ext_params

ROOT = Path(__file__).resolve().parents[1]
YAML_FILES = sorted(CONFIG_DIR.glob("*.yml"))
FLOAT_KEYS = {"learning_rate", "target_kl", "cg_damping", "gamma", "gae_lambda", "n_timesteps", "ent_coef"}


def zoo(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "sb3_trpo_ext.zoo", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def entries():
    for path in YAML_FILES:
        for env_id in yaml.safe_load(path.read_text()):
            yield path, env_id


# ----------------------------------------------------------------------------------------------------------------
# Shipped hyperparameter files
# ----------------------------------------------------------------------------------------------------------------


def test_config_files_ship_at_the_repo_root_and_in_the_package():
    assert (ROOT / "zoo_configs" / "trpo_ext.yml").read_text() == config_file("trpo_ext").read_text()
    assert config_file("trpo_ext").is_relative_to(Path(__import__("sb3_trpo_ext").__file__).parent)


def test_non_editable_wheel_contains_the_config_files(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("sb3_trpo_ext-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"sb3_trpo_ext/zoo_configs/{p.name}" for p in YAML_FILES} <= set(names)


def test_shipped_file_covers_every_rl_zoo_trpo_entry():
    import rl_zoo3

    def unversioned(env_id: str) -> str:
        return re.sub(r"-v\d+$", "", env_id)

    ours = yaml.safe_load(config_file("trpo_ext").read_text())
    zoo_entries = yaml.safe_load((Path(rl_zoo3.__file__).parent / "hyperparams" / "trpo.yml").read_text())
    # (the zoo's MuJoCo entries are -v4, ours -v5)
    assert not {unversioned(e) for e in zoo_entries} - {unversioned(e) for e in ours}
    # and ours beyond the zoo's: MuJoCo tasks it has no TRPO entry for, Atari
    assert {"Reacher-v5", "InvertedPendulum-v5", "InvertedDoublePendulum-v5", "atari"} <= ours.keys()


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_yaml_entries_are_marked_and_typed(path):
    text = path.read_text()
    for env_id, entry in yaml.safe_load(text).items():
        # Every entry's first line is a comment saying whether it is tuned, verified or untuned.
        first_line = re.search(rf"^{re.escape(env_id)}:[^\n]*\n\s+#([^\n]*)", text, flags=re.M)
        assert first_line and re.search(r"\b(untuned|tuned|verified)\b", first_line.group(1)), env_id
        for key in FLOAT_KEYS & entry.keys():
            assert isinstance(entry[key], (int, float)), f"{env_id}.{key} = {entry[key]!r} is read as a string"


def _installed(env_id: str) -> bool:
    import rl_zoo3.import_envs  # noqa: F401  (registers PyBullet and Atari envs when installed)

    return env_id in gym.registry


ATARI_ID = "PongNoFrameskip-v4"
DEFAULT_ID = "FrozenLake-v1"  # has no entry of its own


@pytest.mark.parametrize("path, env_id", list(entries()), ids=[f"{p.stem}:{e}" for p, e in entries()])
def test_every_shipped_entry_builds_a_model(path, env_id, tmp_path):
    from rl_zoo3.exp_manager import ExperimentManager

    target = {"atari": ATARI_ID, "default": DEFAULT_ID}.get(env_id, env_id)
    if not _installed(target):
        pytest.skip(f"{target} is not installed (the envs extra provides it)")
    register()
    manager = ExperimentManager(
        argparse.Namespace(),
        path.stem,
        target,
        str(tmp_path),
        config=str(path),
        n_eval_episodes=1,
        eval_freq=-1,
        verbose=0,
    )
    model, _ = manager.setup_experiment()
    assert isinstance(model, TRPO)
    spec = yaml.safe_load(path.read_text())[env_id]
    for key in ("target_kl", "n_steps", "batch_size", "gamma", "use_sde", "n_critic_updates"):
        if key in spec:
            assert getattr(model, key) == pytest.approx(spec[key]), key
    # An entry's `callback` reaches training: the zoo builds it and hands it to learn().
    schedules = [callback for callback in manager.callbacks if isinstance(callback, TargetKLSchedule)]
    assert len(schedules) == len([name for name in spec.get("callback", []) if "TargetKLSchedule" in str(name)])
    model.get_env().close()


# ----------------------------------------------------------------------------------------------------------------
# The zoo command
# ----------------------------------------------------------------------------------------------------------------


def test_arguments_get_our_defaults_and_pass_through_unchanged():
    assert prepare_arguments("train", ["--env", "CartPole-v1"]) == [
        "--algo",
        "trpo_ext",
        "--env",
        "CartPole-v1",
        "--conf-file",
        str(config_file("trpo_ext")),
    ]
    assert prepare_arguments("train", ["--algo", "trpo", "--env", "X"]) == ["--algo", "trpo", "--env", "X"]
    assert prepare_arguments("train", ["--algo", "trpo_ext", "-conf", "my.yml"]) == ["--algo", "trpo_ext", "-conf", "my.yml"]
    assert prepare_arguments("enjoy", ["--env", "X", "--no-render"]) == ["--algo", "trpo_ext", "--env", "X", "--no-render"]
    assert prepare_arguments("plot_train", ["-a", "trpo_ext"]) == ["-a", "trpo_ext"]


def test_registration_keeps_sb3_contrib_trpo():
    from rl_zoo3 import ALGOS
    from rl_zoo3.hyperparams_opt import HYPERPARAMS_CONVERTER, HYPERPARAMS_SAMPLER
    from sb3_contrib import TRPO as ContribTRPO

    register()
    assert ALGOS["trpo_ext"] is TRPO and ALGOS["trpo"] is ContribTRPO
    assert HYPERPARAMS_SAMPLER["trpo_ext"] is sample_trpo_ext_params and "trpo_ext" in HYPERPARAMS_CONVERTER


def test_recurrent_and_maskable_variants_are_registered_with_their_own_configs():
    from rl_zoo3 import ALGOS

    from sb3_trpo_ext import MaskableTRPO, RecurrentTRPO

    register()
    assert ALGOS["recurrent_trpo_ext"] is RecurrentTRPO and ALGOS["maskable_trpo_ext"] is MaskableTRPO
    assert "InvalidActionDiscrete-v0" in gym.registry
    for algo, env_id in (("recurrent_trpo_ext", "CartPoleNoVel-v1"), ("maskable_trpo_ext", "InvalidActionDiscrete-v0")):
        assert env_id in yaml.safe_load(config_file(algo).read_text())
        assert prepare_arguments("train", ["--algo", algo, "--env", env_id])[-2:] == ["--conf-file", str(config_file(algo))]


def test_sampler_covers_new_hyperparameters_and_builds_valid_models():
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        params = sample_trpo_ext_params(study.ask(), n_actions=0, n_envs=2, additional_args={})
        assert {"ent_coef", "fisher_sub_sampling_factor", "line_search_accept_ratio", "cg_damping"} <= params.keys()
        TRPO("MlpPolicy", "CartPole-v1", **params)


def test_train_enjoy_and_load_cartpole(tmp_path):
    zoo("train", "--env", "CartPole-v1", "-n", "4096", "-f", str(tmp_path), "--eval-freq", "1024", "--seed", "0")
    run = tmp_path / "trpo_ext" / "CartPole-v1_1"
    # --eval-freq counts calls of the 2-env VecEnv after the zoo divides it by n_envs: every 1024 steps.
    assert len(__import__("numpy").load(run / "evaluations.npz")["timesteps"]) == 4
    enjoyed = zoo("enjoy", "--env", "CartPole-v1", "-f", str(tmp_path), "--no-render", "-n", "300")
    assert "Loading" in enjoyed.stdout
    model = TRPO.load(run / "CartPole-v1.zip")
    assert model.num_timesteps == 4096 and model.n_steps == 512  # the shipped CartPole-v1 entry


def test_record_video(tmp_path):
    pytest.importorskip("pygame", reason="rendering CartPole needs pygame (the envs extra installs it)")
    zoo("train", "--env", "CartPole-v1", "-n", "1024", "-f", str(tmp_path / "logs"), "--seed", "0")
    zoo("record_video", "--env", "CartPole-v1", "-f", str(tmp_path / "logs"), "-n", "50", "-o", str(tmp_path / "videos"))
    (video,) = (tmp_path / "videos").glob("*trpo_ext-CartPole-v1*.mp4")
    assert video.stat().st_size > 1000


def test_train_enjoy_and_load_mujoco_with_normalization(tmp_path):
    if not _installed("InvertedPendulum-v5"):
        pytest.skip("MuJoCo is not installed (the envs extra provides it)")
    zoo("train", "--env", "InvertedPendulum-v5", "-n", "2048", "-f", str(tmp_path), "--eval-freq", "1024", "--seed", "0")
    run = tmp_path / "trpo_ext" / "InvertedPendulum-v5_1"
    assert (run / "InvertedPendulum-v5" / "vecnormalize.pkl").exists()
    zoo("enjoy", "--env", "InvertedPendulum-v5", "-f", str(tmp_path), "--no-render", "-n", "200")
    assert TRPO.load(run / "InvertedPendulum-v5.zip").target_kl == pytest.approx(0.01)


def test_plots_are_written_headless(tmp_path):
    zoo("train", "--env", "CartPole-v1", "-n", "2048", "-f", str(tmp_path / "logs"), "--seed", "0")
    zoo("plot_train", "-a", "trpo_ext", "-e", "CartPole-v1", "-f", str(tmp_path / "logs"), "--save-figures", str(tmp_path))
    (figure,) = tmp_path.glob("plot_train-*.png")
    assert figure.stat().st_size > 10_000


OPTIMIZE = ["--env", "CartPole-v1", "-n", "1024", "-optimize", "--n-trials", "2", "--n-jobs", "1", "--sampler", "random"]
OPTIMIZE += ["--pruner", "none", "--n-evaluations", "1", "--eval-episodes", "2"]


def finished_trials(storage, study_name: str) -> int:
    import optuna

    study = optuna.load_study(storage=storage, study_name=study_name)
    return len(study.get_trials(states=[optuna.trial.TrialState.COMPLETE]))


def test_optimize_two_trials_locally(tmp_path):
    import optuna

    log = str(tmp_path / "study.log")
    zoo("train", *OPTIMIZE, "-f", str(tmp_path), "--storage", log, "--study-name", "local", "--seed", "0")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(log))
    assert finished_trials(storage, "local") == 2


# ----------------------------------------------------------------------------------------------------------------
# Distributed tuning on a real PostgreSQL server
# ----------------------------------------------------------------------------------------------------------------


def postgres_binaries() -> Path | None:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


@pytest.fixture
def postgres_url():
    binaries = postgres_binaries()
    if binaries is None:
        pytest.skip("no PostgreSQL server binary (initdb) on this machine; .ci/run installs one")
    # PostgreSQL refuses to run as root; the Debian package's "postgres" user runs it then.
    as_user: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None or subprocess.run(["id", "postgres"], capture_output=True).returncode:
            pytest.skip("running as root without a 'postgres' user to run the server as")
        as_user = ["runuser", "-u", "postgres", "--"]
    directory = Path(tempfile.mkdtemp(prefix="sb3-trpo-pg-"))
    directory.chmod(0o777)
    data = directory / "data"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    subprocess.run(
        [*as_user, binaries / "initdb", "-D", data, "-U", "postgres", "--auth=trust"], check=True, capture_output=True
    )
    options = f"-p {port} -k {directory} -c listen_addresses=127.0.0.1"
    pg_ctl = [*as_user, binaries / "pg_ctl", "-D", data]
    subprocess.run([*pg_ctl, "-o", options, "-l", directory / "server.log", "-w", "start"], check=True, capture_output=True)
    try:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True) as connection:
            connection.execute("CREATE DATABASE optuna")
        yield f"postgresql://postgres@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)


def test_two_workers_tune_one_study_on_postgresql(postgres_url, tmp_path):
    import optuna

    # Create the schema and the study once, so the two workers only ever load it.
    optuna.create_study(storage=postgres_url, study_name="shared", direction="maximize")
    command = [sys.executable, "-m", "sb3_trpo_ext.zoo", "train", *OPTIMIZE, "--storage", postgres_url]
    command += ["--study-name", "shared"]
    workers = [
        subprocess.Popen(
            [*command, "-f", str(tmp_path / f"worker{i}"), "--seed", str(i)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert all(worker.returncode == 0 for worker in workers), "\n".join(o[-2000:] for o in outputs)
    # Each worker runs 2 trials: 4 finished trials can only come from both.
    assert finished_trials(postgres_url, "shared") == 4
    for output in outputs:
        assert len(re.findall(r"Trial \d+ finished", output)) == 2
