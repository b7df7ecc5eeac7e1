"""
RL Baselines3 Zoo with sb3-trpo-ext's algorithms registered.

``python -m sb3_trpo_ext.zoo COMMAND [ARGS]`` (or ``sb3-trpo-zoo COMMAND [ARGS]``) runs rl_zoo3's own
``COMMAND`` after adding our algorithms to its registries. Arguments go to rl_zoo3 unchanged, except that:

- without ``--algo``, ``train``/``enjoy``/``record_video``/``record_training`` use ``trpo_ext`` (rl_zoo3's
  default is ``ppo``); sb3-contrib's ``trpo`` stays available for side-by-side runs;
- our algorithms are ``trpo_ext`` (``TRPO``), ``recurrent_trpo_ext`` (``RecurrentTRPO``) and
  ``maskable_trpo_ext`` (``MaskableTRPO``); the masked env ``InvalidActionDiscrete-v0`` of :mod:`sb3_trpo_ext.envs`
  is registered with Gymnasium;
- ``train`` with one of our algorithms and no ``--conf-file`` reads the hyperparameter file shipped with this
  package (``zoo_configs/<algo>.yml``);
- the plot commands accept ``--save-figures DIR``: every figure is written to ``DIR`` as PNG instead of being
  shown, which works without a display.

Commands: train, enjoy, record_video, record_training, plot_train, plot_from_file, all_plots.
"""

import os
import runpy
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sb3_trpo_ext.envs import register_envs
from sb3_trpo_ext.maskable import MaskableTRPO
from sb3_trpo_ext.recurrent import RecurrentTRPO
from sb3_trpo_ext.trpo import TRPO

CONFIG_DIR = Path(__file__).parent / "zoo_configs"
ALGORITHMS: dict[str, type] = {"trpo_ext": TRPO, "recurrent_trpo_ext": RecurrentTRPO, "maskable_trpo_ext": MaskableTRPO}
DEFAULT_ALGORITHM = "trpo_ext"
_ALGO_COMMANDS = ("train", "enjoy", "record_video", "record_training")
_PLOT_COMMANDS = ("plot_train", "plot_from_file", "all_plots")


def config_file(algo: str) -> Path:
    """
    The hyperparameter file shipped for one of our algorithms.

    :param algo: Zoo name of the algorithm, e.g. ``"trpo_ext"``
    :return: Path of its YAML file
    """
    return CONFIG_DIR / f"{algo}.yml"


def sample_trpo_ext_params(trial: Any, n_actions: int, n_envs: int, additional_args: dict) -> dict[str, Any]:
    """
    Optuna search space for ``-optimize``: the usual on-policy ranges plus the arguments sb3-contrib's TRPO lacks.

    ``target_kl`` is sampled as a joint KL (summed over action dimensions), hence a wider range than a
    per-dimension one.

    :param trial: Optuna trial
    :param n_actions: Action dimension for Box spaces, 0 otherwise (rl_zoo3's convention)
    :param n_envs: Number of environments
    :param additional_args: rl_zoo3's extra arguments (unused)
    :return: Keyword arguments for ``TRPO``
    """
    from rl_zoo3.hyperparams_opt import convert_onpolicy_params

    sampled = {
        "n_steps_pow": trial.suggest_int("n_steps_pow", 6, 12),
        "batch_size_pow": trial.suggest_int("batch_size_pow", 5, 10),
        "one_minus_gamma": trial.suggest_float("one_minus_gamma", 1e-4, 0.05, log=True),
        "one_minus_gae_lambda": trial.suggest_float("one_minus_gae_lambda", 1e-3, 0.1, log=True),
        "learning_rate": trial.suggest_float("learning_rate", 1e-4, 3e-3, log=True),
        "n_critic_updates": trial.suggest_int("n_critic_updates", 5, 30),
        "cg_max_steps": trial.suggest_int("cg_max_steps", 5, 30),
        "cg_damping": trial.suggest_float("cg_damping", 1e-3, 0.2, log=True),
        "target_kl": trial.suggest_float("target_kl", 2e-3, 0.5, log=True),
        "ent_coef": trial.suggest_float("ent_coef", 1e-8, 1e-2, log=True),
        "fisher_sub_sampling_factor": trial.suggest_categorical("fisher_sub_sampling_factor", [1, 2, 5]),
        "line_search_accept_ratio": trial.suggest_categorical("line_search_accept_ratio", [0.0, 0.1, 0.5]),
        "net_arch": trial.suggest_categorical("net_arch", ["small", "medium"]),
        "activation_fn": trial.suggest_categorical("activation_fn", ["tanh", "relu"]),
    }
    trial.set_user_attr("gamma", 1 - sampled["one_minus_gamma"])
    trial.set_user_attr("n_steps", 2 ** sampled["n_steps_pow"])
    trial.set_user_attr("batch_size", 2 ** sampled["batch_size_pow"])
    return convert_onpolicy_params(sampled)


def register() -> None:
    """Add our algorithms, samplers and converters to rl_zoo3's registries (idempotent)."""
    from rl_zoo3 import hyperparams_opt, utils

    register_envs()  # InvalidActionDiscrete-v0, the masked env of maskable_trpo_ext.yml
    for name, cls in ALGORITHMS.items():
        utils.ALGOS[name] = cls
        hyperparams_opt.HYPERPARAMS_SAMPLER[name] = sample_trpo_ext_params
        hyperparams_opt.HYPERPARAMS_CONVERTER[name] = hyperparams_opt.convert_onpolicy_params


def _option(args: Sequence[str], *names: str) -> str | None:
    """Value of the first of ``names`` in ``args`` (``--name value`` or ``--name=value``), else ``None``."""
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def _pop_option(args: Sequence[str], name: str) -> tuple[str | None, list[str]]:
    """Remove our own option ``name`` (and its value) from ``args``; return its value and the rest."""
    value, rest, i = None, [], 0
    while i < len(args):
        if args[i] == name and i + 1 < len(args):
            value, i = args[i + 1], i + 2
        elif args[i].startswith(name + "="):
            value, i = args[i].split("=", 1)[1], i + 1
        else:
            rest.append(args[i])
            i += 1
    return value, rest


def prepare_arguments(command: str, args: Sequence[str]) -> list[str]:
    """
    rl_zoo3's arguments for ``command``: ``args`` plus our defaults (``--algo``, ``--conf-file``).

    :param command: Zoo command
    :param args: User's arguments
    :return: The arguments to hand to rl_zoo3
    """
    args = list(args)
    if command in _ALGO_COMMANDS:
        algo = _option(args, "--algo")
        if algo is None:
            algo = DEFAULT_ALGORITHM
            args = ["--algo", algo, *args]
        if command == "train" and algo in ALGORITHMS and _option(args, "--conf-file", "-conf") is None:
            args += ["--conf-file", str(config_file(algo))]
    return args


def _save_figures_instead_of_showing(directory: Path, prefix: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    counter = iter(range(1, 10**6))

    def save_all(*args: Any, **kwargs: Any) -> None:
        for number in plt.get_fignums():
            plt.figure(number).savefig(directory / f"{prefix}-{next(counter)}.png", bbox_inches="tight")
        plt.close("all")

    plt.show = save_all


def _commands() -> dict[str, Callable[[], Any]]:
    from rl_zoo3.enjoy import enjoy
    from rl_zoo3.plots import all_plots, plot_from_file, plot_train
    from rl_zoo3.train import train

    return {
        "train": train,
        "enjoy": enjoy,
        "record_video": lambda: runpy.run_module("rl_zoo3.record_video", run_name="__main__"),
        "record_training": lambda: runpy.run_module("rl_zoo3.record_training", run_name="__main__"),
        "plot_train": plot_train,
        "plot_from_file": plot_from_file,
        "all_plots": all_plots,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """
    Entry point of ``python -m sb3_trpo_ext.zoo`` and ``sb3-trpo-zoo``.

    :param argv: ``[COMMAND, *ARGS]``; defaults to ``sys.argv[1:]``
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _ALGO_COMMANDS + _PLOT_COMMANDS
    if not argv or argv[0] not in commands:
        raise SystemExit(f"usage: python -m sb3_trpo_ext.zoo {{{','.join(commands)}}} [ARGS]\n\n{__doc__}")
    command, args = argv[0], argv[1:]
    if command in _PLOT_COMMANDS:
        directory, args = _pop_option(args, "--save-figures")
        if directory is not None:
            _save_figures_instead_of_showing(Path(directory), command)
        elif not os.environ.get("DISPLAY"):
            import matplotlib

            matplotlib.use("Agg")
    register()
    sys.argv = [f"sb3_trpo_ext.zoo {command}", *prepare_arguments(command, args)]
    _commands()[command]()


if __name__ == "__main__":
    main()
