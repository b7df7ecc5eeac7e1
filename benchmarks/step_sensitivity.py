"""
How much one TRPO update moves when its arithmetic rounds differently.

A learning run is a chain of hundreds of updates. If an update amplifies rounding, any change to the order of
floating-point operations (a faster product, another BLAS) turns a rerun with the same seed into a fresh draw
from the run-to-run distribution. This script measures that amplification on one realistic update: our TRPO with
the shipped ``HalfCheetah-v5`` entry of ``zoo_configs/trpo_ext.yml`` (built by rl_zoo3, as our zoo command builds
it), after ``--warmup`` steps of training, one rollout collected, then ``train()`` repeated from that exact state
(weights, optimizer state, rollout, random seeds) under:

- float64 arithmetic (the reference);
- float64 with the advantages multiplied by ``1 + 1e-14 * N(0, 1)`` (a perturbation near float64 rounding);
- float32 (what training uses);
- float32 with the advantages multiplied by ``1 + 1e-7 * N(0, 1)`` (near float32 rounding).

For each, the change of the actor's and the critic's parameters by the update, compared with the reference
update: ``||delta - delta_ref|| / ||delta_ref||``.

The one command (from the repository root, after ``pip install -e ".[benchmarks]"``)::

    python benchmarks/step_sensitivity.py

Writes ``benchmarks/results/step_sensitivity.{md,csv}``.
"""

import argparse
import copy
import csv
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import stable_baselines3.common.policies as sb3_policies
import torch as th
from rl_zoo3.exp_manager import ExperimentManager
from stable_baselines3.common.logger import Logger

from sb3_trpo_ext import TRPO
from sb3_trpo_ext.common.trust_region import flat_concat
from sb3_trpo_ext.zoo import config_file, register

th.set_num_threads(1)
RESULTS = Path(__file__).parent / "results"
ENV_ID = "HalfCheetah-v5"
BUFFER_FIELDS = ("observations", "actions", "rewards", "returns", "episode_starts", "values", "log_probs", "advantages")


def zoo_model(env_id: str, seed: int, folder: str) -> TRPO:
    """Our TRPO with the shipped zoo entry for ``env_id``, built by rl_zoo3 as ``python -m sb3_trpo_ext.zoo train``
    builds it (wrappers, ``VecNormalize``, ``policy_kwargs``)."""
    register()
    manager = ExperimentManager(
        argparse.Namespace(), "trpo_ext", env_id, folder, config=str(config_file("trpo_ext")), seed=seed, verbose=0
    )
    experiment = manager.setup_experiment()
    assert experiment is not None  # None only for hyperparameter optimisation
    model = experiment[0]
    assert isinstance(model, TRPO)
    return model


def one_update(model: TRPO, state: dict[str, Any], dtype: th.dtype, noise: float) -> tuple[th.Tensor, th.Tensor, float]:
    """
    ``train()`` once from ``state`` in ``dtype``, the advantages scaled by ``1 + noise * N(0, 1)``.

    :return: The actor's and the critic's parameter change (float64), and CG's final relative residual
    """
    policy = model.policy.to(dtype)
    policy.load_state_dict(state["policy"])
    policy.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
    buffer = copy.deepcopy(state["buffer"])
    np_dtype = np.float64 if dtype == th.float64 else np.float32
    for field in BUFFER_FIELDS:
        setattr(buffer, field, getattr(buffer, field).astype(np_dtype))
    relative_noise = noise * np.random.default_rng(1).standard_normal(buffer.advantages.shape)
    buffer.advantages = (buffer.advantages * (1 + relative_noise)).astype(np_dtype)
    model.rollout_buffer = buffer
    logger = Logger(folder=None, output_formats=[])
    model.set_logger(logger)
    np.random.seed(3)
    th.manual_seed(5)
    groups = (model._actor_params, model._critic_params)
    before = [flat_concat(params).double() for params in groups]
    model.train()
    actor, critic = (flat_concat(params).double() - b for params, b in zip(groups, before, strict=True))
    return actor, critic, float(logger.name_to_value["train/cg_residual"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=20_480, help="training steps before the measured update")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    start = time.perf_counter()
    folder = tempfile.TemporaryDirectory()  # rl_zoo3's log folder; nothing in it is kept
    model = zoo_model(ENV_ID, seed=0, folder=folder.name)
    model.learn(args.warmup)
    model._setup_learn(10**9, None, reset_num_timesteps=False)
    env = model.get_env()
    assert env is not None
    model.collect_rollouts(env, model._init_callback(None), model.rollout_buffer, model.n_steps)
    state = dict(
        policy=copy.deepcopy(model.policy.state_dict()),
        optimizer=copy.deepcopy(model.policy.optimizer.state_dict()),
        buffer=copy.deepcopy(model.rollout_buffer),
    )
    # SB3 casts Box observations to float32; the float64 updates need them in float64.
    original_preprocess = sb3_policies.preprocess_obs
    current = {"dtype": th.float32}

    def preprocess_obs(*args: Any, **kwargs: Any) -> Any:
        return original_preprocess(*args, **kwargs).to(current["dtype"])  # type: ignore[union-attr]  # Box: a tensor

    sb3_policies.preprocess_obs = preprocess_obs
    cases = [("float64", th.float64, 0.0), ("float64, advantages x (1 + 1e-14 N(0,1))", th.float64, 1e-14)]
    cases += [("float32", th.float32, 0.0), ("float32, advantages x (1 + 1e-7 N(0,1))", th.float32, 1e-7)]
    updates = {}
    for name, dtype, noise in cases:
        current["dtype"] = dtype
        updates[name] = one_update(model, state, dtype, noise)
    ref_actor, ref_critic, _ = updates["float64"]
    rows = [
        dict(
            case=name,
            actor_relative_difference=float((actor - ref_actor).norm() / ref_actor.norm()),
            critic_relative_difference=float((critic - ref_critic).norm() / ref_critic.norm()),
            cg_relative_residual=residual,
        )
        for name, (actor, critic, residual) in updates.items()
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "step_sensitivity.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# One TRPO update under different rounding",
        "",
        f"Command: `python benchmarks/step_sensitivity.py --warmup {args.warmup}`; {time.perf_counter() - start:.0f} s.",
        f"Our TRPO, the shipped `{ENV_ID}` entry built by rl_zoo3 ({model.cg_max_steps} CG steps, cg_damping",
        f"{model.cg_damping}), after {args.warmup:,} training steps; one rollout, then `train()` from the same",
        "state in each case. Difference: `||delta - delta_float64|| / ||delta_float64||` of the parameter change.",
        "",
        "| case | actor update vs float64 | critic update vs float64 | CG relative residual |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['case']} | {r['actor_relative_difference']:.2e} | {r['critic_relative_difference']:.2e} "
        f"| {r['cg_relative_residual']:.3f} |"
        for r in rows
    ]
    (args.out / "step_sensitivity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
