"""Property: construction succeeds or raises ValueError/TypeError naming the argument, and never fails later in learn()."""

import math
import os
import tempfile
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.policies import ActorCriticPolicy

from sb3_trpo_ext import TRPO

# Integer arguments whose large values are legitimate but slow (or allocate n_steps-sized buffers) stay small;
# the others also get values beyond any sensible range.
SMALL_INTS = st.integers(-3, 40)
ANY_INTS = st.one_of(SMALL_INTS, st.sampled_from([2**31, 2**32 - 1, 2**32, 2**63, -(2**31)]))
ANY = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=6),
    st.none(),
    st.sampled_from([np.float32(0.5), np.int64(3), np.bool_(True), [], {}, (1,), 1j]),
)


def mixed(ints=SMALL_INTS, *extra):
    # Plausible numbers next to the junk, so that a good share of the drawn models builds and trains.
    plausible = st.one_of(ints, st.floats(0.0, 1.0), st.booleans())
    return st.one_of(plausible, plausible, ANY, *(st.sampled_from(e) for e in extra))


ARGUMENTS = {
    "policy": mixed(SMALL_INTS, ["MlpPolicy", "CnnPolicy", "MultiInputPolicy", ActorCriticPolicy, RolloutBuffer]),
    "learning_rate": mixed(),
    "n_steps": mixed(),
    "batch_size": mixed(),
    "gamma": mixed(),
    "cg_max_steps": mixed(),
    "cg_damping": mixed(),
    "line_search_shrinking_factor": mixed(),
    "line_search_max_iter": mixed(),
    "n_critic_updates": mixed(),
    "gae_lambda": mixed(),
    "use_sde": mixed(),
    "sde_sample_freq": mixed(ANY_INTS),
    "rollout_buffer_class": mixed(SMALL_INTS, [RolloutBuffer, DictRolloutBuffer, ActorCriticPolicy]),
    "rollout_buffer_kwargs": mixed(),
    "normalize_advantage": mixed(),
    "target_kl": mixed(),
    "sub_sampling_factor": mixed(ANY_INTS),
    "ent_coef": mixed(),
    "fisher_sub_sampling_factor": mixed(ANY_INTS),
    "cg_residual_tol": mixed(),
    "line_search_accept_ratio": mixed(),
    "stats_window_size": mixed(ANY_INTS),
    "tensorboard_log": mixed(),
    "policy_kwargs": mixed(),
    "verbose": mixed(ANY_INTS),
    "seed": mixed(ANY_INTS),
    "device": mixed(SMALL_INTS, ["cpu", "auto", "cuda", "cpu:0", "gpu"]),
}
# Small defaults for the arguments not drawn, so that a model that builds can be trained quickly.
BASE = {"n_steps": 16, "batch_size": 8, "n_critic_updates": 2, "cg_max_steps": 5, "device": "cpu"}


@pytest.fixture(scope="module")
def in_temporary_directory():
    """A drawn `tensorboard_log` path must not litter the repository."""
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as directory:
        os.chdir(directory)
        yield
        os.chdir(cwd)


def learn_cost(kwargs):
    """Minibatch steps of one update: the drawn arguments include some that make it legitimately slow."""
    return kwargs["n_critic_updates"] * math.ceil(kwargs["n_steps"] / kwargs["batch_size"]) + kwargs["cg_max_steps"]


@st.composite
def some_arguments(draw):
    """One to three arguments with drawn values: few enough that many models build and train."""
    names = draw(st.permutations(sorted(ARGUMENTS)))[: draw(st.integers(1, 3))]
    return {name: draw(ARGUMENTS[name]) for name in names}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn=some_arguments())
def test_construction_succeeds_or_names_the_bad_argument_and_learn_never_fails_later(drawn, in_temporary_directory):
    kwargs = {**BASE, **drawn}
    policy = kwargs.pop("policy", "MlpPolicy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. batch_size not dividing the rollout
        try:
            model = TRPO(policy, "Pendulum-v1", **kwargs)
        except (ValueError, TypeError) as error:
            names = [name for name in drawn if name in str(error)]
            assert names, f"{type(error).__name__} names none of {sorted(drawn)}: {error}"
            event("rejected")
            return
        event("built")
        if learn_cost(kwargs) <= 300:
            event("built and trained")
            # One update, and the start of a second rollout: everything learn() touches has run once.
            model.learn(model.n_steps + 1)
            assert np.isfinite(np.concatenate([p.detach().numpy().ravel() for p in model.policy.parameters()])).all()
