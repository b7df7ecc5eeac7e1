"""
The package on a CUDA device: every algorithm learns, saves and loads there, and the trust-region step on the GPU
is the CPU's. Skipped without a GPU (CI has none); on a machine with one: ``pytest tests/test_cuda.py``.
"""

import copy

import numpy as np
import pytest
import torch as th
from sb3_contrib.common.envs import InvalidActionEnvDiscrete
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import Logger

from sb3_trpo_ext import TRPO, MaskableTRPO, RecurrentTRPO

pytestmark = pytest.mark.skipif(not th.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize(
    "cls, policy, env_id, kwargs",
    [
        (TRPO, "MlpPolicy", "CartPole-v1", {}),
        (TRPO, "MlpPolicy", "Pendulum-v1", dict(use_sde=True, sde_sample_freq=4)),
        (TRPO, "MlpPolicy", "Pendulum-v1", dict(fisher_sub_sampling_factor=5)),
        (RecurrentTRPO, "MlpLstmPolicy", "CartPole-v1", {}),
        (RecurrentTRPO, "MlpLstmPolicy", "Pendulum-v1", {}),
        (MaskableTRPO, "MlpPolicy", None, {}),
    ],
)
def test_learns_saves_and_loads_on_cuda(cls, policy, env_id, kwargs, tmp_path):
    env = env_id or InvalidActionEnvDiscrete(dim=20, n_invalid_actions=10)
    model = cls(policy, env, device="cuda", n_steps=128, seed=0, **kwargs)
    initial = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(256)
    params = list(model.policy.parameters())
    assert all(p.device.type == "cuda" and th.isfinite(p).all() for p in params)
    assert any(not th.equal(p, q) for p, q in zip(params, initial, strict=True)), "no update moved the policy"
    model.save(tmp_path / "model")
    loaded = cls.load(tmp_path / "model", device="cuda")
    assert loaded.device.type == "cuda"
    obs = model.get_env().reset()
    np.testing.assert_array_equal(model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0])


@pytest.mark.parametrize("fisher_sub_sampling_factor", [1, 5])
def test_policy_step_on_cuda_is_the_cpu_step(fisher_sub_sampling_factor):
    env = make_vec_env("Pendulum-v1", n_envs=2, seed=0)
    kwargs = dict(n_steps=1024, seed=0, fisher_sub_sampling_factor=fisher_sub_sampling_factor)
    models = {device: TRPO("MlpPolicy", env, device=device, **kwargs) for device in ("cpu", "cuda")}
    cpu = models["cpu"]
    cpu._setup_learn(10**9, None)
    cpu.collect_rollouts(cpu.env, cpu._init_callback(None), cpu.rollout_buffer, cpu.n_steps)
    initial = copy.deepcopy(cpu.policy.state_dict())
    changes = {}
    for device, model in models.items():
        model.set_logger(Logger(folder=None, output_formats=[]))
        model.rollout_buffer = copy.deepcopy(cpu.rollout_buffer)
        model.rollout_buffer.device = model.device
        model.policy.load_state_dict(initial)
        # SB3's buffer hands out the rollout in a NumPy-random order, and the Fisher takes every 5th sample of it.
        np.random.seed(0)
        model.train()
        after = model.policy.state_dict()
        # Policy parameters only: the critic shuffles its minibatches with each device's own random generator.
        changes[device] = th.cat(
            [(after[k].double().cpu() - v.double()).reshape(-1) for k, v in initial.items() if "value" not in k]
        )
    assert changes["cpu"].norm() > 1e-3, "the update must move the policy for the comparison to mean anything"
    relative = float((changes["cuda"] - changes["cpu"]).norm() / changes["cpu"].norm())
    print(f"relative difference of the policy step, cuda vs cpu: {relative:.1e}")  # shown with pytest -s
    assert relative <= 1e-4
