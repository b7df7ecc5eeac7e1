"""
Loading checkpoints written by ``stable_baselines3.PPO`` and ``sb3_contrib.TRPO``.

Their policies are SB3 ``ActorCriticPolicy`` objects, so the weights load as they are. What differs is the rest of
the zip: their constructor data (PPO's clipping and epochs, sb3-contrib's per-dimension ``target_kl``) and the
optimizer, which holds every policy parameter there but only the critic's here.
"""

import io
import json
import pathlib
import zipfile
from typing import Any

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.save_util import load_from_zip_file, open_path, save_to_zip_file

# Data keys that tell the writers apart (SB3 does not store the algorithm's class in the zip).
OUR_KEYS = frozenset({"fisher_sub_sampling_factor", "line_search_accept_ratio"})
PPO_KEYS = frozenset({"clip_range", "n_epochs"})
CONTRIB_TRPO_KEYS = frozenset({"cg_max_steps", "cg_damping", "n_critic_updates"})

OURS, PPO, CONTRIB_TRPO, UNKNOWN = "sb3_trpo_ext.TRPO", "stable_baselines3.PPO", "sb3_contrib.TRPO", "unknown"


def checkpoint_keys(path: str | pathlib.Path | io.BufferedIOBase) -> set[str]:
    """
    The names stored in a checkpoint's ``data`` file, read without unpickling anything.

    :param path: Checkpoint as accepted by ``BaseAlgorithm.load``
    :return: The top-level keys (empty if the zip has no ``data`` file)
    """
    file = open_path(path, "r", verbose=0, suffix="zip")
    try:
        with zipfile.ZipFile(file) as archive:
            if "data" not in archive.namelist():
                return set()
            return set(json.loads(archive.read("data").decode()))
    finally:
        if isinstance(path, (str, pathlib.Path)):
            file.close()
        else:
            file.seek(0)


def checkpoint_writer(keys: set[str]) -> str:
    """
    Which algorithm wrote a checkpoint, from its data keys.

    :param keys: Output of :func:`checkpoint_keys`
    :return: One of ``OURS``, ``PPO``, ``CONTRIB_TRPO``, ``UNKNOWN``
    """
    if keys >= OUR_KEYS:
        return OURS
    if keys >= PPO_KEYS:
        return PPO
    if keys >= CONTRIB_TRPO_KEYS:
        return CONTRIB_TRPO
    return UNKNOWN


def joint_kl_scale(action_space: spaces.Space) -> int:
    """
    Factor from sb3-contrib's ``target_kl`` (a KL averaged over action dimensions for factorised distributions) to
    ours (the joint KL, summed over them): the number of dimensions for ``Box`` and ``MultiBinary``, else 1.

    :param action_space: The checkpoint's action space
    :return: The factor
    """
    if isinstance(action_space, (spaces.Box, spaces.MultiBinary)):
        return int(np.prod(action_space.shape))
    return 1


def translate_data(data: dict[str, Any], writer: str) -> tuple[dict[str, Any], list[str]]:
    """
    Map a foreign checkpoint's constructor data onto TRPO's.

    - PPO: ``n_epochs`` becomes ``n_critic_updates``; ``clip_range``, ``clip_range_vf`` are dropped;
      ``vf_coef`` and ``max_grad_norm`` are set to 0 as in TRPO (unused there); ``target_kl=None`` (no early
      stopping) falls back to TRPO's default radius, a number is kept (PPO's is a joint KL too).
    - sb3-contrib: ``target_kl`` and ``cg_damping`` are multiplied by :func:`joint_kl_scale`, which gives the same
      step.

    Arguments TRPO has and the writer had not (``fisher_sub_sampling_factor``, ...) keep TRPO's defaults.

    :param data: Deserialized ``data`` of the checkpoint
    :param writer: Output of :func:`checkpoint_writer`
    :return: The translated data and one line per change, for the user
    """
    data = dict(data)
    notes = []
    if writer == PPO:
        data["n_critic_updates"] = data.pop("n_epochs")
        notes.append(f"n_epochs={data['n_critic_updates']} became n_critic_updates")
        for name in ("clip_range", "clip_range_vf"):
            data.pop(name, None)
        data["vf_coef"], data["max_grad_norm"] = 0.0, 0.0
        if data.get("target_kl") is None:
            data.pop("target_kl", None)
            notes.append("target_kl=None (no early stopping) fell back to TRPO's default radius")
    elif writer == CONTRIB_TRPO:
        scale = joint_kl_scale(data["action_space"])
        if scale != 1:
            # sb3-contrib's KL, Fisher and so damping are 1/scale of ours: (F/d + λI) s = g is (F + dλI) s = d g, the
            # same direction, and the same step for d times the radius.
            for name in ("target_kl", "cg_damping"):
                old = data[name]
                data[name] = old * scale
                notes.append(
                    f"{name}={old:g} (sb3-contrib: KL per action dimension) became {name}={data[name]:g} "
                    f"(joint KL over {scale} dimensions), the same step"
                )
    return data, notes


def translated_checkpoint(
    path: str | pathlib.Path | io.BufferedIOBase, writer: str, custom_objects: dict[str, Any] | None
) -> tuple[io.BytesIO, list[str]]:
    """
    Rewrite a foreign checkpoint in memory with :func:`translate_data` applied; weights and optimizer state are
    copied unchanged (the optimizer's are mapped when they are loaded, see ``TRPO.set_parameters``).

    :param path: The foreign checkpoint
    :param writer: Output of :func:`checkpoint_writer`
    :param custom_objects: As for ``BaseAlgorithm.load``
    :return: The rewritten zip and the notes of :func:`translate_data`
    """
    data, params, pytorch_variables = load_from_zip_file(path, device="cpu", custom_objects=custom_objects)
    assert data is not None and params is not None  # load_from_zip_file raises for a zip without them
    data, notes = translate_data(data, writer)
    buffer = io.BytesIO()
    save_to_zip_file(buffer, data=data, params=params, pytorch_variables=pytorch_variables)
    buffer.seek(0)
    return buffer, notes


def critic_optimizer_state(
    state_dict: dict[str, Any], all_params: list[Any], critic_params: list[Any], template: dict[str, Any]
) -> dict[str, Any]:
    """
    Map an optimizer state over every policy parameter (PPO, sb3-contrib) onto one over the critic's only: each
    critic parameter keeps its moments, the actor's are dropped (the trust-region step keeps none).

    :param state_dict: Saved ``optimizer.state_dict()`` of an optimizer over ``all_params``
    :param all_params: ``policy.parameters()``, in order
    :param critic_params: TRPO's critic parameters, a subset of ``all_params`` in the same order
    :param template: ``state_dict()`` of TRPO's critic optimizer, whose hyperparameters (param groups) are kept
    :return: A state dict for the critic optimizer
    """
    index = {id(p): i for i, p in enumerate(all_params)}
    old_state = state_dict["state"]
    state = {new: old_state[index[id(p)]] for new, p in enumerate(critic_params) if index[id(p)] in old_state}
    return {"state": state, "param_groups": template["param_groups"]}
