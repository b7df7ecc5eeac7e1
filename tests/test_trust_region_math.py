"""The pure pieces of the trust-region step: Fisher-vector products, conjugate gradient, line search, flat helpers."""

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.envs import IdentityEnv

from sb3_trpo_ext import TRPO
from sb3_trpo_ext.common import trust_region
from sb3_trpo_ext.common.trust_region import (
    analytic_fisher_vector_product,
    backtracking_line_search,
    conjugate_gradient,
    detached_copy,
    fisher_vector_product,
    flat_concat,
    set_flat_params,
    unflatten_like,
)

ACTION_SPACES = {
    "DiagGaussian": (spaces.Box(-1, 1, (3,), np.float32), {}),
    "gSDE": (spaces.Box(-1, 1, (3,), np.float32), {"use_sde": True}),
    "gSDE-squashed-learn-features": (
        spaces.Box(-1, 1, (2,), np.float32),
        {"use_sde": True, "policy_kwargs": {"squash_output": True, "use_expln": True, "full_std": False}},
    ),
    "Categorical": (spaces.Discrete(5), {}),
    "MultiCategorical": (spaces.MultiDiscrete([3, 4, 2]), {}),
    "Bernoulli": (spaces.MultiBinary(4), {}),
}


def make_float64_policy(space, kwargs, seed=0):
    kwargs = dict(kwargs)
    policy_kwargs = {"net_arch": [16, 16], **kwargs.pop("policy_kwargs", {})}
    if kwargs.get("use_sde"):
        policy_kwargs.setdefault("log_std_init", -0.5)
    observation_space = spaces.Box(-1, 1, (4,), np.float32)
    env = IdentityEnv(space=space)
    env.observation_space = observation_space
    model = TRPO("MlpPolicy", env, n_steps=8, batch_size=8, policy_kwargs=policy_kwargs, seed=seed, **kwargs)
    policy = model.policy.double()
    observation_space.seed(seed)
    observations = th.as_tensor(np.stack([observation_space.sample() for _ in range(64)]), dtype=th.float64)
    return model, policy, observations


def reference_kl_hessian_vector_product(policy, params, observations, vector):
    """H v with H the Hessian of mean_s sum_dims KL(old || new), written independently of the package."""
    with th.no_grad():
        old = detached_copy(policy.get_distribution(observations))
    new = policy.get_distribution(observations)
    from stable_baselines3.common.distributions import kl_divergence

    kl = kl_divergence(old, new)
    kl = (kl.sum(dim=-1) if kl.dim() > 1 else kl).mean()
    grads = th.autograd.grad(kl, params, create_graph=True)
    grad_dot_v = sum((g * v).sum() for g, v in zip(grads, unflatten_like(vector, params), strict=False))
    return th.cat([h.reshape(-1) for h in th.autograd.grad(grad_dot_v, params)])


@pytest.mark.parametrize("kind", list(ACTION_SPACES))
def test_analytic_fisher_vector_product_equals_kl_hessian(kind, float64_policies):
    space, kwargs = ACTION_SPACES[kind]
    model, policy, observations = make_float64_policy(space, kwargs)
    params = model._actor_params
    product = analytic_fisher_vector_product(params, lambda: policy.get_distribution(observations))
    assert product is not None, f"{kind} must use the analytic Fisher-vector product"
    generator = th.Generator().manual_seed(1)
    n_params = sum(p.numel() for p in params)
    for _ in range(3):
        vector = th.randn(n_params, generator=generator, dtype=th.float64)
        expected = reference_kl_hessian_vector_product(policy, params, observations, vector)
        actual = product(vector)
        assert expected.norm() > 1e-6
        assert ((actual - expected).norm() / expected.norm()).item() <= 1e-8


def test_fisher_vector_product_falls_back_to_double_backprop(monkeypatch, float64_policies):
    space, kwargs = ACTION_SPACES["DiagGaussian"]
    model, policy, observations = make_float64_policy(space, kwargs)
    params = model._actor_params
    vector = th.randn(sum(p.numel() for p in params), dtype=th.float64, generator=th.Generator().manual_seed(2))
    analytic = fisher_vector_product(params, lambda: policy.get_distribution(observations), damping=0.1)(vector)
    monkeypatch.setattr(trust_region, "distribution_statistics", lambda distribution: None)
    assert analytic_fisher_vector_product(params, lambda: policy.get_distribution(observations)) is None
    fallback = fisher_vector_product(params, lambda: policy.get_distribution(observations), damping=0.1)(vector)
    assert ((analytic - fallback).norm() / fallback.norm()).item() <= 1e-8


def test_conjugate_gradient_solves_spd_system():
    generator = th.Generator().manual_seed(0)
    basis = th.randn(40, 40, generator=generator, dtype=th.float64)
    matrix = basis @ basis.T + 0.1 * th.eye(40, dtype=th.float64)
    b = th.randn(40, generator=generator, dtype=th.float64)
    result = conjugate_gradient(lambda v: matrix @ v, b, max_steps=200, residual_tol=1e-12)
    assert result.relative_residual <= 1e-12
    assert ((matrix @ result.x - b).norm() / b.norm()).item() <= 1e-10
    assert th.allclose(result.x, th.linalg.solve(matrix, b), rtol=1e-8, atol=1e-10)


def test_conjugate_gradient_stops_on_residual_tolerance_and_reports_it():
    matrix = th.diag(th.tensor([1.0, 2.0, 3.0, 4.0], dtype=th.float64))
    b = th.ones(4, dtype=th.float64)
    # Four distinct eigenvalues: exact after four steps, so a loose tolerance must stop earlier.
    loose = conjugate_gradient(lambda v: matrix @ v, b, max_steps=50, residual_tol=0.5)
    assert loose.n_steps < 4 and loose.relative_residual <= 0.5
    exact = conjugate_gradient(lambda v: matrix @ v, b, max_steps=50, residual_tol=1e-12)
    assert exact.n_steps == 4
    capped = conjugate_gradient(lambda v: matrix @ v, b, max_steps=2, residual_tol=0.0)
    assert capped.n_steps == 2 and capped.relative_residual > 1e-3


def test_conjugate_gradient_solves_damped_fisher_system(float64_policies):
    space, kwargs = ACTION_SPACES["Categorical"]
    model, policy, observations = make_float64_policy(space, kwargs)
    params = model._actor_params
    product = fisher_vector_product(params, lambda: policy.get_distribution(observations), damping=0.1)
    g = th.randn(sum(p.numel() for p in params), dtype=th.float64, generator=th.Generator().manual_seed(3))
    result = conjugate_gradient(product, g, max_steps=500, residual_tol=1e-10)
    assert ((product(result.x) - g).norm() / g.norm()).item() <= 1e-9


@pytest.mark.parametrize("max_steps", [3, 10], ids=["stopped-early", "converged"])
def test_conjugate_gradient_reports_the_product_of_its_solution(max_steps):
    # TRPO sizes its step with x^T A x from this product instead of one more A x: it must be A x even when CG
    # stops far from the solution, and in float32 on a Fisher system.
    generator = th.Generator().manual_seed(1)
    basis = th.randn(12, 12, generator=generator, dtype=th.float64)
    matrix = basis @ basis.T + 0.1 * th.eye(12, dtype=th.float64)
    b = th.randn(12, generator=generator, dtype=th.float64)
    result = conjugate_gradient(lambda v: matrix @ v, b, max_steps=max_steps, residual_tol=0.0)
    th.testing.assert_close(result.product, matrix @ result.x, rtol=1e-9, atol=1e-9)
    assert result.x @ result.product == pytest.approx((result.x @ matrix @ result.x).item(), rel=1e-9)

    model = TRPO("MlpPolicy", "Pendulum-v1", n_steps=256, batch_size=256, seed=0)
    model.learn(256)
    observations = th.as_tensor(model.rollout_buffer.observations.reshape(-1, 3))
    params = model._actor_params
    product = fisher_vector_product(params, lambda: model.policy.get_distribution(observations), damping=0.1)
    g = th.randn(sum(p.numel() for p in params), generator=th.Generator().manual_seed(2))
    result = conjugate_gradient(product, g, max_steps=max_steps)
    exact = (result.x @ product(result.x)).item()
    assert (result.x @ result.product).item() == pytest.approx(exact, rel=1e-5)


def test_flat_helpers_round_trip():
    params = [th.nn.Parameter(th.randn(3, 2)), th.nn.Parameter(th.randn(5))]
    storages = [p.data_ptr() for p in params]
    vector = th.arange(11, dtype=th.float32)
    set_flat_params(params, vector)
    assert th.equal(flat_concat(params), vector)
    assert [p.data_ptr() for p in params] == storages, "parameters must be written in place"
    assert [t.shape for t in unflatten_like(vector, params)] == [th.Size([3, 2]), th.Size([5])]


def test_failed_line_search_restores_bit_identical_parameters():
    params = [th.nn.Parameter(th.randn(4, 3) * 1e-3), th.nn.Parameter(th.randn(2) * 1e7)]
    before = [p.detach().clone() for p in params]
    step = th.full((14,), 0.1234567)
    # Never an improvement: every candidate is rejected.
    result = backtracking_line_search(params, step, 1.0, lambda: (-1.0, 0.0), 0.01, 0.5, 6, 0.1)
    assert not result.success and result.n_backtracks == 6
    assert all(th.equal(p, b) for p, b in zip(params, before, strict=False))


def test_line_search_rejects_non_finite_kl_and_insufficient_improvement():
    params = [th.nn.Parameter(th.zeros(2))]
    step = th.ones(2)
    outcomes = iter([(float("nan"), 0.0), (1.0, float("inf")), (1.0, 0.5), (0.01, 0.0), (0.3, 0.001)])
    result = backtracking_line_search(params, step, 1.0, lambda: next(outcomes), 0.01, 0.5, 5, 0.5)
    # Candidate 3 (index 3) has improvement 0.01 < 0.5 * 0.125; candidate 4 qualifies: 0.3 >= 0.5 * 0.0625.
    assert result.success and result.n_backtracks == 4
    assert th.allclose(params[0].detach(), th.full((2,), 0.0625))


def test_joint_kl_sums_action_dimensions():
    from stable_baselines3.common.distributions import DiagGaussianDistribution

    old = DiagGaussianDistribution(3).proba_distribution(th.zeros(2, 3), th.zeros(3))
    old = detached_copy(old)
    new = DiagGaussianDistribution(3).proba_distribution(th.ones(2, 3), th.zeros(3))
    # KL(N(0,1) || N(1,1)) = 1/2 per dimension, 3/2 jointly.
    assert th.allclose(trust_region.joint_kl(old, new), th.full((2,), 1.5))


def test_make_float64_policy_helper_is_float64(float64_policies):
    _, policy, observations = make_float64_policy(*ACTION_SPACES["DiagGaussian"])
    assert policy.get_distribution(observations).distribution.mean.dtype == th.float64


def test_fisher_vector_product_keeps_parameter_objects_of_shared_and_tied_modules(float64_policies):
    from stable_baselines3.common.envs import FakeImageEnv

    model = TRPO("CnnPolicy", FakeImageEnv(screen_height=36, screen_width=36), n_steps=8, batch_size=8)
    policy = model.policy
    assert policy.pi_features_extractor is policy.features_extractor  # one module under several names
    before = {name: p for name, p in policy.named_parameters(remove_duplicate=False)}
    observations = th.as_tensor(np.stack([policy.observation_space.sample() for _ in range(4)]))
    product = analytic_fisher_vector_product(model._actor_params, lambda: policy.get_distribution(observations))
    product(th.ones(sum(p.numel() for p in model._actor_params)))
    after = dict(policy.named_parameters(remove_duplicate=False))
    assert all(after[name] is param for name, param in before.items())


def test_analytic_fisher_vector_product_handles_parameters_tied_across_modules(float64_policies):
    from sb3_trpo_ext.trpo import split_actor_critic

    space, kwargs = ACTION_SPACES["Categorical"]
    _, policy, observations = make_float64_policy(space, kwargs)
    first, second = th.nn.Linear(16, 16), th.nn.Linear(16, 16)
    second.weight = first.weight  # one Parameter in two distinct modules, both on the actor's path
    layers = [*policy.mlp_extractor.policy_net, first, th.nn.Tanh(), second, th.nn.Tanh()]
    policy.mlp_extractor.policy_net = th.nn.Sequential(*layers).double()
    params, _ = split_actor_critic(policy, policy.get_distribution(observations))
    assert sum(p is first.weight for p in params) == 1
    product = analytic_fisher_vector_product(params, lambda: policy.get_distribution(observations))
    vector = th.randn(sum(p.numel() for p in params), dtype=th.float64, generator=th.Generator().manual_seed(4))
    expected = reference_kl_hessian_vector_product(policy, params, observations, vector)
    assert ((product(vector) - expected).norm() / expected.norm()).item() <= 1e-8


CHAIN_KINDS = ["DiagGaussian", "Categorical", "MultiCategorical", "Bernoulli"]


def chain_product(model, observations):
    """The hand-written product the model builds for a Fisher batch of ``observations``."""
    from collections import namedtuple

    return model._fisher_product(namedtuple("Batch", "observations")(observations))


@pytest.mark.parametrize("kind", CHAIN_KINDS)
@pytest.mark.parametrize("activation", [th.nn.Tanh, th.nn.ReLU])
def test_chain_fisher_vector_product_equals_kl_hessian(kind, activation, float64_policies, array_backend):
    space, kwargs = ACTION_SPACES[kind]
    kwargs = {**kwargs, "policy_kwargs": {"activation_fn": activation, "net_arch": [16, 8]}}
    model, policy, observations = make_float64_policy(space, kwargs)
    params = model._actor_params
    product = chain_product(model, observations)
    assert product is not None, f"{kind} must use the chain Fisher-vector product"
    generator = th.Generator().manual_seed(5)
    for _ in range(3):
        vector = th.randn(sum(p.numel() for p in params), generator=generator, dtype=th.float64)
        expected = reference_kl_hessian_vector_product(policy, params, observations, vector)
        assert ((product(vector) - expected).norm() / expected.norm()).item() <= 1e-10


def test_bound_chain_matches_autodiff(array_backend):
    from sb3_trpo_ext.common import mlp

    th.manual_seed(0)
    net = th.nn.Sequential(th.nn.Linear(5, 7), th.nn.ReLU(), th.nn.Linear(7, 6), th.nn.Tanh(), th.nn.Linear(6, 3)).double()
    chain = mlp.linear_chain([net])
    names = [name for name, _ in net.named_parameters()]  # the chain's order: weight, bias, layer by layer
    weights = tuple(p.detach() for p in chain.parameters)
    inputs = th.randn(11, 5, dtype=th.float64)

    def function(*w):
        return th.func.functional_call(net, dict(zip(names, w, strict=True)), (inputs,))

    tangents = tuple(th.randn_like(w) for w in weights)
    expected_output, expected_jvp = th.func.jvp(function, weights, tangents)
    upstream = th.randn_like(expected_output)
    expected_vjp = flat_concat(th.func.vjp(function, *weights)[1](upstream))

    order = chain.augmented_order()
    bound = chain.bind(flat_concat(weights)[order], len(inputs))
    output = th.as_tensor(bound.forward(mlp.array_view(mlp.with_ones_row(inputs))))
    th.testing.assert_close(output.T, expected_output, rtol=1e-12, atol=1e-12)
    jvp = th.as_tensor(bound.jvp(mlp.array_view(flat_concat(tangents)[order])))
    th.testing.assert_close(jvp.T, expected_jvp, rtol=1e-12, atol=1e-12)
    gradient = th.empty(len(order), dtype=th.float64)
    bound.vjp(mlp.array_view(upstream.T), mlp.array_view(gradient))
    th.testing.assert_close(gradient, expected_vjp[order], rtol=1e-12, atol=1e-12)
    assert isinstance(bound, mlp.CompiledChain) == (array_backend == "compiled")
    assert isinstance(bound.weights[0], th.Tensor) == (array_backend == "torch")


def test_chain_fisher_vector_product_declines_other_actors(float64_policies):
    from sb3_trpo_ext.common.mlp import actor_chain

    # gSDE: the standard deviation depends on the state
    model, policy, observations = make_float64_policy(*ACTION_SPACES["gSDE"])
    assert chain_product(model, observations) is None
    # a parameter the chain does not hold (tied into a second module): autograd handles it
    model, policy, observations = make_float64_policy(*ACTION_SPACES["Categorical"])
    chain = actor_chain(policy)
    features = policy.extract_features(observations)
    distribution = policy.get_distribution(observations)
    extra = th.nn.Parameter(th.zeros(1, dtype=th.float64))
    assert trust_region.chain_fisher_vector_product([*model._actor_params, extra], chain, features, distribution) is None
    # a distribution that the chain does not compute (here: other inputs)
    assert trust_region.chain_fisher_vector_product(model._actor_params, chain, features + 1, distribution) is None

    # a policy whose get_distribution is not SB3's
    class CustomPolicy(type(policy)):
        def get_distribution(self, obs):
            return super().get_distribution(obs * 2)

    policy.__class__ = CustomPolicy
    assert actor_chain(policy) is None


def test_trpo_uses_the_chain_product_for_mlp_actors_only(monkeypatch):
    from sb3_contrib.common.envs import InvalidActionEnvDiscrete
    from stable_baselines3.common.envs import FakeImageEnv

    from sb3_trpo_ext import MaskableTRPO, RecurrentTRPO
    from sb3_trpo_ext import trpo as trpo_module

    built = []
    original = trpo_module.chain_fisher_vector_product

    def spy(*args, **kwargs):
        built.append(original(*args, **kwargs) is not None)
        return None  # the generic product then runs: the step must not depend on which one was built

    monkeypatch.setattr(trpo_module, "chain_fisher_vector_product", spy)
    TRPO("MlpPolicy", IdentityEnv(space=spaces.Discrete(3)), n_steps=8, batch_size=8).learn(16)
    assert built == [True, True]
    built.clear()
    # the maskable MLP policy is the same chain, its logits masked afterwards
    MaskableTRPO("MlpPolicy", InvalidActionEnvDiscrete(dim=4, n_invalid_actions=1), n_steps=8, batch_size=8).learn(8)
    assert built == [True]
    built.clear()
    # a trainable shared CNN extractor, an LSTM: not a chain on fixed features
    TRPO("CnnPolicy", FakeImageEnv(screen_height=36, screen_width=36), n_steps=4, batch_size=4).learn(4)
    RecurrentTRPO("MlpLstmPolicy", IdentityEnv(space=spaces.Discrete(3)), n_steps=8, batch_size=8).learn(8)
    assert built == []
