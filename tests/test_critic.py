"""The hand-written critic regression equals the autograd + `torch.optim.Adam` one it replaces."""

import copy
from pathlib import Path

import pytest
import torch as th
from sb3_contrib.common.envs import InvalidActionEnvDiscrete
from stable_baselines3.common.env_util import make_vec_env
from torch import nn
from torch.nn import functional as F

from sb3_trpo_ext import TRPO, MaskableTRPO
from sb3_trpo_ext.common import critic
from sb3_trpo_ext.common.critic import regress_mlp
from sb3_trpo_ext.common.mlp import linear_chain
from tests.envs import TargetEnv


def autograd_regression(net, optimizer, inputs, targets, n_epochs, batch_size) -> float:
    """The straightforward reference: module forward, autograd, `optimizer.step()`."""
    losses = []
    for _ in range(n_epochs):
        for indices in th.randperm(len(targets)).split(batch_size):
            optimizer.zero_grad()
            loss = F.mse_loss(net(inputs[indices]).flatten(), targets[indices])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return sum(losses) / len(losses)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-adam", "adam-by-formula"])
@pytest.mark.parametrize("activation", [nn.Tanh, nn.ReLU])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_regress_mlp_matches_autograd_and_adam(activation, weight_decay, fused, monkeypatch, array_backend):
    # torch < 2.4 has no fused Adam on the CPU: the formula path must give the same result.
    monkeypatch.setattr(critic, "_fused_adam_available", lambda dtype: fused)
    th.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), activation(), nn.Linear(16, 8), activation(), nn.Linear(8, 1)).double()
    reference = copy.deepcopy(net)
    inputs, targets = th.randn(100, 5, dtype=th.float64), th.randn(100, dtype=th.float64)
    kwargs = dict(lr=3e-3, eps=1e-5, weight_decay=weight_decay)
    optimizer, reference_optimizer = th.optim.Adam(net.parameters(), **kwargs), th.optim.Adam(reference.parameters(), **kwargs)

    for call in range(3):  # the optimizer state carries over between calls, as between updates
        th.manual_seed(call)
        loss = regress_mlp(linear_chain([net]), inputs, targets, optimizer, n_epochs=4, batch_size=32)  # 100 % 32 != 0
        th.manual_seed(call)
        reference_loss = autograd_regression(reference, reference_optimizer, inputs, targets, 4, 32)
        assert loss == pytest.approx(reference_loss, rel=1e-10)
        for p, q in zip(net.parameters(), reference.parameters(), strict=True):
            th.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
        for p, q in zip(net.parameters(), reference.parameters(), strict=True):
            state, reference_state = optimizer.state[p], reference_optimizer.state[q]
            assert float(state["step"]) == float(reference_state["step"]) == 16 * (call + 1)  # 4 epochs of 4 minibatches
            th.testing.assert_close(state["exp_avg"], reference_state["exp_avg"], rtol=1e-10, atol=1e-14)
            th.testing.assert_close(state["exp_avg_sq"], reference_state["exp_avg_sq"], rtol=1e-10, atol=1e-14)


def test_linear_chain_accepts_only_what_regress_mlp_implements():
    assert linear_chain([nn.Sequential(nn.Linear(3, 4), nn.Tanh()), nn.Linear(4, 1)]) is not None
    assert linear_chain([nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU()), nn.Linear(4, 1)]) is None
    assert linear_chain([nn.Linear(3, 4, bias=False), nn.Linear(4, 1)]) is None
    assert linear_chain([nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Tanh())]) is None


def test_regress_mlp_leaves_other_optimizers_to_autograd():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    before = copy.deepcopy(net.state_dict())
    others = (th.optim.SGD(net.parameters(), lr=0.1), th.optim.Adam(net.parameters(), amsgrad=True))
    # A learning rate whose step-size scalar overflows float32: torch's fused Adam computes it in double.
    for optimizer in (*others, th.optim.Adam(net.parameters(), lr=1e39)):
        assert regress_mlp(linear_chain([net]), th.randn(8, 3), th.randn(8), optimizer, 1, 4) is None
    assert all(th.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize(
    "algorithm, policy_kwargs, hand_written",
    [
        (TRPO, {}, True),
        (TRPO, {"share_features_extractor": False}, True),
        (TRPO, {"optimizer_class": th.optim.RMSprop}, False),
        (TRPO, {"activation_fn": nn.ELU}, False),
        (MaskableTRPO, {}, True),
    ],
    ids=["standard", "separate-extractors", "rmsprop", "elu", "maskable"],
)
def test_critic_step_equals_the_autograd_critic_step(algorithm, policy_kwargs, hand_written, monkeypatch):
    env = (lambda: InvalidActionEnvDiscrete(dim=6, n_invalid_actions=3)) if algorithm is MaskableTRPO else TargetEnv
    model = algorithm("MlpPolicy", make_vec_env(env, n_envs=2, seed=0), n_steps=64, batch_size=48, seed=0,
                      policy_kwargs=policy_kwargs)  # fmt: skip
    model.learn(128)  # a rollout in the buffer and some optimizer state
    rollout = next(model.rollout_buffer.get(batch_size=None))
    state, optimizer_state = copy.deepcopy(model.policy.state_dict()), copy.deepcopy(model.policy.optimizer.state_dict())

    results = []

    def spy(*args, **kwargs):
        results.append(regress_mlp(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr("sb3_trpo_ext.trpo.regress_mlp", spy)
    th.manual_seed(7)
    loss = model._critic_step(rollout)
    fast, fast_optimizer = copy.deepcopy(model.policy.state_dict()), copy.deepcopy(model.policy.optimizer.state_dict())
    model.policy.load_state_dict(state)
    model.policy.optimizer.load_state_dict(optimizer_state)
    th.manual_seed(7)
    reference_loss = model._critic_step_autograd(*model._critic_inputs(rollout.observations), rollout.returns)

    assert loss == pytest.approx(reference_loss, rel=1e-5)
    for key, value in model.policy.state_dict().items():
        th.testing.assert_close(fast[key], value, rtol=1e-5, atol=1e-6)
    for index, entry in model.policy.optimizer.state_dict()["state"].items():
        for name, value in entry.items():
            th.testing.assert_close(fast_optimizer["state"][index][name], value, rtol=1e-4, atol=1e-7)
    # The standard MLP critic takes the hand-written path; anything it does not implement falls back.
    assert any(r is not None for r in results) == hand_written


@pytest.mark.parametrize(
    ("batch_size", "message"),
    [(48, "does not divide .* truncated minibatch of 32 samples"), (256, "exceeds .* one minibatch of 128 samples")],
)
def test_minibatch_size_that_does_not_tile_the_rollout_warns_with_what_happens(batch_size, message):
    with pytest.warns(UserWarning, match=message):
        TRPO("MlpPolicy", make_vec_env(TargetEnv, n_envs=2, seed=0), n_steps=64, batch_size=batch_size)


def test_train_runs_the_blas_it_calls_on_one_thread(monkeypatch):
    import threadpoolctl

    from sb3_trpo_ext.common import kernels

    model = TRPO("MlpPolicy", make_vec_env(TargetEnv, n_envs=2, seed=0), n_steps=64, batch_size=32, seed=0)
    model.learn(128)
    # NumPy's OpenBLAS and the one the compiled kernels call (other BLAS libraries in the process are not ours)
    ours = {Path(kernels._OPENBLAS._name).resolve()}
    ours |= {Path(p["filepath"]).resolve() for p in threadpoolctl.threadpool_info() if "numpy" in p["filepath"]}
    assert len(ours) == 2

    def threads() -> list[int]:
        pools = threadpoolctl.threadpool_info()
        return [p["num_threads"] for p in pools if p["user_api"] == "blas" and Path(p["filepath"]).resolve() in ours]

    seen = []
    original = model._critic_step

    def spy(rollout):
        seen.append(threads())
        return original(rollout)

    monkeypatch.setattr(model, "_critic_step", spy)
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):  # as NumPy starts on a 2-core machine
        model.train()
        after = threads()
    assert seen == [[1, 1]]
    assert after == [2, 2]  # restored
