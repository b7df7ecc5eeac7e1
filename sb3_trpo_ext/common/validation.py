"""Constructor argument checks: fail at construction with a message naming the argument and its allowed range."""

import math
import numbers
import os
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import DictRolloutBuffer
from stable_baselines3.common.preprocessing import is_image_space


def _describe_range(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    return " and ".join(parts)


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """
    Check that ``value`` is an integer (not a bool) within ``[low, high]``.

    :param name: Argument name used in the error message
    :param value: Value to check
    :param low: Inclusive lower bound (``None``: unbounded)
    :param high: Inclusive upper bound (``None``: unbounded)
    :return: The value as a Python ``int``
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer, got {value!r} of type {type(value).__name__}")
    integer = int(value)
    if (low is not None and integer < low) or (high is not None and integer > high):
        raise ValueError(f"`{name}` must be an integer {_describe_range(low, high, False, False)}, got {value!r}")
    return integer


def check_float(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """
    Check that ``value`` is a finite real number (not a bool) within the given bounds.

    :param name: Argument name used in the error message
    :param value: Value to check
    :param low: Lower bound (``None``: unbounded)
    :param high: Upper bound (``None``: unbounded)
    :param low_open: Exclude ``low`` itself
    :param high_open: Exclude ``high`` itself
    :return: The value as a Python ``float``
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {value!r} of type {type(value).__name__}")
    value = float(value)
    allowed = _describe_range(low, high, low_open, high_open)
    out_of_range = (
        not math.isfinite(value)
        or (low is not None and (value <= low if low_open else value < low))
        or (high is not None and (value >= high if high_open else value > high))
    )
    if out_of_range:
        raise ValueError(f"`{name}` must be a finite number{' ' + allowed if allowed else ''}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """
    Check that ``value`` is a bool (NumPy bools included).

    :param name: Argument name used in the error message
    :param value: Value to check
    :return: The value as a Python ``bool``
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be True or False, got {value!r} of type {type(value).__name__}")
    return bool(value)


def check_schedule(name: str, value: Any) -> Any:
    """
    Check a learning-rate-like argument: a positive finite number or a callable of the remaining progress.

    :param name: Argument name used in the error message
    :param value: Value to check
    :return: The value, a number as a Python ``float``
    """
    if callable(value):
        # A schedule that fails or returns garbage would only show up at the first update: call it now.
        try:
            initial = value(1.0)
        except Exception as error:
            raise ValueError(f"`{name}` is callable but failed on the initial progress 1.0: {error!r}") from error
        check_float(f"{name}(1.0)", initial, low=0.0)
        return value
    return check_float(name, value, low=0.0, low_open=True)


# Constructor arguments of ``stable_baselines3.PPO`` that TRPO has no use for, and what to use instead. Silently
# ignoring them would change a swapped-in script's behaviour without a word.
PPO_ONLY_ARGUMENTS: dict[str, str] = {
    "n_epochs": "use `n_critic_updates` (epochs of critic regression per update); the policy takes one trust-region "
    "step per update",
    "clip_range": "use `target_kl`, the trust-region radius that bounds how far one update moves the policy",
    "clip_range_vf": "TRPO has no equivalent: the critic is regressed on the returns, not clipped",
    "vf_coef": "TRPO has no equivalent: the critic has its own regression (tune it with `learning_rate`, `batch_size` "
    "and `n_critic_updates`), not a weighted term of one loss",
    "max_grad_norm": "TRPO has no equivalent: the trust region (`target_kl`) bounds the policy step",
}


def check_no_foreign_arguments(kwargs: dict[str, Any], owner: str = "TRPO") -> None:
    """
    Reject keyword arguments the constructor does not take, naming the equivalent for PPO's.

    :param kwargs: The keyword arguments left over after the constructor's own parameters
    :param owner: Class name used in the message
    """
    for name in kwargs:
        if name in PPO_ONLY_ARGUMENTS:
            raise TypeError(f"{owner} got the PPO-only argument `{name}`: {PPO_ONLY_ARGUMENTS[name]}")
        raise TypeError(f"{owner}.__init__() got an unexpected keyword argument `{name}`")


def check_target_kl(value: Any) -> float:
    """
    Check the trust-region radius; ``None`` (PPO's "no early stopping") has no TRPO meaning and is refused.

    :param value: Value to check
    :return: The value as a Python ``float``
    """
    if value is None:
        raise TypeError(
            "`target_kl` must be a finite number > 0.0 (TRPO's trust-region radius), got None: PPO's `target_kl=None` "
            "(no early stopping) has no TRPO equivalent; leave the argument out for the default 0.01"
        )
    return check_float("target_kl", value, low=0.0, low_open=True)


def check_optional_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> None:
    """
    Check an argument that is ``None`` or an integer within ``[low, high]``.

    :param name: Argument name used in the error message
    :param value: Value to check
    :param low: Inclusive lower bound (``None``: unbounded)
    :param high: Inclusive upper bound (``None``: unbounded)
    """
    if value is not None:
        check_int(name, value, low, high)


def check_optional_path(name: str, value: Any) -> None:
    """
    Check an argument that is ``None`` or a filesystem path.

    :param name: Argument name used in the error message
    :param value: Value to check
    """
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"`{name}` must be a path (str or os.PathLike) or None, got {value!r} of type {type(value).__name__}")


def check_optional_dict(name: str, value: Any) -> None:
    """
    Check an argument that is ``None`` or a dict.

    :param name: Argument name used in the error message
    :param value: Value to check
    """
    if value is not None and not isinstance(value, dict):
        raise TypeError(f"`{name}` must be a dict or None, got {value!r} of type {type(value).__name__}")


def check_optional_subclass(name: str, value: Any, base: type) -> None:
    """
    Check an argument that is ``None`` or a subclass of ``base``.

    :param name: Argument name used in the error message
    :param value: Value to check
    :param base: Required base class
    """
    if value is not None and not (isinstance(value, type) and issubclass(value, base)):
        raise TypeError(f"`{name}` must be a subclass of {base.__name__} or None, got {value!r}")


def check_device(value: Any) -> None:
    """
    Check a torch device argument: a ``torch.device`` or a string ``torch.device`` parses (``"auto"`` included).

    :param value: Value to check
    """
    if isinstance(value, th.device) or value == "auto":
        return
    if not isinstance(value, str):
        raise TypeError(f"`device` must be a torch.device or a string such as 'cpu' or 'cuda', got {value!r}")
    try:
        th.device(value)
    except RuntimeError as error:
        raise ValueError(f"`device` is not a valid torch device: {value!r} ({error})") from None


def check_policy_fits_env(
    policy: Any, observation_space: spaces.Space, policy_kwargs: dict[str, Any], rollout_buffer_class: type | None
) -> None:
    """
    Check the choices that depend on the observation space, which SB3 would otherwise reject with an assertion
    deep inside the policy or buffer constructors.

    :param policy: The ``policy`` argument (already checked on its own)
    :param observation_space: The environment's observation space
    :param policy_kwargs: The ``policy_kwargs`` argument (``{}`` for ``None``)
    :param rollout_buffer_class: The ``rollout_buffer_class`` argument
    """
    is_dict = isinstance(observation_space, spaces.Dict)
    if policy == "MultiInputPolicy" and not is_dict:
        raise ValueError(f"`policy='MultiInputPolicy'` needs a Dict observation space, got {observation_space}")
    if policy == "CnnPolicy":
        normalized = not policy_kwargs.get("normalize_images", True)
        if not is_image_space(observation_space, check_channels=False, normalized_image=normalized):
            raise ValueError(f"`policy='CnnPolicy'` needs an image observation space, got {observation_space}")
    if rollout_buffer_class is not None and issubclass(rollout_buffer_class, DictRolloutBuffer) != is_dict:
        raise ValueError(
            f"`rollout_buffer_class={rollout_buffer_class.__name__}` does not fit the observation space "
            f"{observation_space}: use a DictRolloutBuffer subclass exactly for Dict observations"
        )
