"""The policy update inside `TRPO.train()`: KL bound, actor/critic separation, numerical faults."""

import copy

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.distributions import kl_divergence
from stable_baselines3.common.envs import FakeImageEnv, IdentityEnvMultiDiscrete

from sb3_trpo_ext import TRPO
from sb3_trpo_ext.common import trust_region
from tests.envs import TargetEnv


class BeforeTrain(BaseCallback):
    """Snapshots the policy when the rollout is complete (just before `train()`), optionally tampering with it."""

    def __init__(self, tamper=None):
        super().__init__()
        self.tamper = tamper

    def _on_rollout_end(self) -> None:
        # A fresh copy: SB3's gSDE keeps non-leaf tensors on the policy, which deepcopy rejects.
        policy = self.model.policy
        self.policy_before = type(policy)(**policy._get_constructor_parameters()).to(policy.device)
        self.policy_before.load_state_dict(policy.state_dict())
        self.critic_optimizer_state = copy.deepcopy(self.model.policy.optimizer.state_dict())
        if self.tamper is not None:
            self.tamper(self.model)

    def _on_step(self) -> bool:
        return True


def one_update(model: TRPO, tamper=None) -> BeforeTrain:
    callback = BeforeTrain(tamper)
    model.learn(model.n_steps * model.n_envs, callback=callback)
    return callback


def mean_joint_kl(old_policy, new_policy, observations) -> float:
    with th.no_grad():
        kl = kl_divergence(old_policy.get_distribution(observations), new_policy.get_distribution(observations))
    return (kl.sum(dim=-1) if kl.dim() > 1 else kl).mean().item()


def mean_entropy(policy, observations) -> float:
    with th.no_grad():
        return policy.get_distribution(observations).entropy().mean().item()


def buffer_observations(model):
    buffer = model.rollout_buffer
    return th.as_tensor(buffer.observations.reshape(-1, *buffer.obs_shape), device=model.device)


CASES = {
    "discrete": lambda: TRPO("MlpPolicy", "CartPole-v1", n_steps=256, batch_size=64, target_kl=0.02, seed=1),
    "gaussian-3d": lambda: TRPO("MlpPolicy", TargetEnv(), n_steps=256, batch_size=64, target_kl=0.05, seed=1),
    "gsde": lambda: TRPO("MlpPolicy", TargetEnv(), n_steps=256, batch_size=64, use_sde=True, target_kl=0.05, seed=1),
    "multidiscrete": lambda: TRPO("MlpPolicy", IdentityEnvMultiDiscrete(3), n_steps=256, batch_size=64, seed=1),
    "fisher-subsampled": lambda: TRPO(
        "MlpPolicy", TargetEnv(), n_steps=256, batch_size=64, fisher_sub_sampling_factor=5, seed=1
    ),
    "cnn-shared-extractor": lambda: TRPO(
        "CnnPolicy", FakeImageEnv(screen_height=36, screen_width=36), n_steps=64, batch_size=32, seed=1
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_accepted_step_satisfies_kl_bound_after_whole_train(case, recording_logger):
    model = CASES[case]()
    model.set_logger(recording_logger[0])
    snapshot = one_update(model)
    row = dict(recording_logger[0].name_to_value)  # SB3 dumps before train(): the last update is still here
    assert row["train/is_line_search_success"] == 1.0
    kl = mean_joint_kl(snapshot.policy_before, model.policy, buffer_observations(model))
    # Measured after the critic regression too: the critic must not have moved the action distribution.
    assert 0.0 < kl <= model.target_kl * (1 + 1e-4)
    assert kl == pytest.approx(row["train/kl_divergence"], rel=1e-3)
    # The entropy is logged for the policy the step leaves (the accepted line-search candidate).
    assert row["train/entropy_loss"] == pytest.approx(-mean_entropy(model.policy, buffer_observations(model)), rel=1e-5)
    for before, after in zip(snapshot.policy_before.parameters(), model.policy.parameters(), strict=False):
        if any(after is p for p in model._critic_params):
            assert not th.equal(before, after), "every critic parameter is regressed"


def actor_state(policy, model):
    return [p.detach().clone() for p in model._actor_params]


def assert_actor_unchanged(snapshot, model):
    actor_ids = {id(p) for p in model._actor_params}
    for (name, before), after in zip(snapshot.policy_before.named_parameters(), model.policy.parameters(), strict=False):
        if id(after) in actor_ids:
            assert th.equal(before, after), f"{name} changed"


def test_forced_line_search_failure_leaves_actor_bit_identical(monkeypatch, recording_logger):
    model = CASES["gaussian-3d"]()
    model.set_logger(recording_logger[0])
    monkeypatch.setattr(trust_region, "joint_kl", lambda old, new: th.full((1,), float("inf")))
    snapshot = one_update(model)
    row = dict(recording_logger[0].name_to_value)  # SB3 dumps before train(): the last update is still here
    assert row["train/is_line_search_success"] == 0.0
    assert row["train/line_search_backtracks"] == model.line_search_max_iter
    assert row["train/kl_divergence"] == 0.0
    assert_actor_unchanged(snapshot, model)
    assert row["train/entropy_loss"] == pytest.approx(-mean_entropy(model.policy, buffer_observations(model)), rel=1e-5)


def nan_advantage(model):
    model.rollout_buffer.advantages[3, 0] = np.nan


def nan_fisher(monkeypatch):
    original = trust_region.fisher_vector_product

    def poisoned(*args, **kwargs):
        product = original(*args, **kwargs)
        return lambda vector: product(vector) * float("nan")

    monkeypatch.setattr(trust_region, "fisher_vector_product", poisoned)


def negative_fisher(monkeypatch):
    monkeypatch.setattr(trust_region, "fisher_vector_product", lambda *args, **kwargs: lambda v: -v)


def nan_objective_after_step(monkeypatch):
    original = TRPO.surrogate_objective

    def surrogate(self, *args):
        objective = original(self, *args)
        calls = []

        def poisoned(distribution):
            calls.append(1)
            value = objective(distribution)
            return value if len(calls) == 1 else value * float("nan")

        return poisoned

    monkeypatch.setattr(TRPO, "surrogate_objective", surrogate)


def poisoned_surrogate(monkeypatch, poison):
    original = TRPO.surrogate_objective

    def surrogate(self, actions, old_log_prob, advantages):
        objective = original(self, actions, old_log_prob, advantages)
        return lambda distribution: poison(objective(distribution), distribution.log_prob(actions))

    monkeypatch.setattr(TRPO, "surrogate_objective", surrogate)


def nan_objective(monkeypatch):
    poisoned_surrogate(monkeypatch, lambda value, log_prob: value * float("nan"))


def nan_gradient(monkeypatch):
    # sqrt at 0: the value stays finite, its derivative is infinite, and 0 * inf is NaN.
    poisoned_surrogate(monkeypatch, lambda value, log_prob: value + 0.0 * th.sqrt(log_prob.mean() - log_prob.mean().detach()))


FAULTS = {
    "nan-objective": ("non-finite surrogate objective", None, nan_objective),
    "nan-gradient": ("non-finite policy gradient", None, nan_gradient),
    "nan-advantage": ("non-finite advantages in the rollout", nan_advantage, None),
    "nan-fisher": ("non-finite search direction", None, nan_fisher),
    "non-positive-sFs": ("non-positive", None, negative_fisher),
    "nan-new-objective": (None, None, nan_objective_after_step),
}


def assert_critic_and_optimizer_unchanged(snapshot, model):
    for before, after in zip(snapshot.policy_before.state_dict().values(), model.policy.state_dict().values(), strict=True):
        assert th.equal(before, after)
    before, after = snapshot.critic_optimizer_state["state"], model.policy.optimizer.state_dict()["state"]
    assert before.keys() == after.keys()
    for key in before:
        assert all(th.equal(before[key][name], after[key][name]) for name in before[key])


@pytest.mark.parametrize("fault", list(FAULTS))
def test_numerical_fault_skips_whole_update_bit_identically(fault, monkeypatch, recording_logger):
    message, tamper, patch = FAULTS[fault]
    if patch is not None:
        patch(monkeypatch)
    model = CASES["gaussian-3d"]()
    model.set_logger(recording_logger[0])
    with pytest.warns(UserWarning, match=f"skipped update 1 \\({message}") if message else _no_warning():
        snapshot = one_update(model, tamper)
    row = dict(recording_logger[0].name_to_value)  # SB3 dumps before train(): the last update is still here
    assert row["train/is_line_search_success"] == 0.0
    assert row["train/numerical_fault"] == (1.0 if message else 0.0)
    assert_actor_unchanged(snapshot, model)
    if message:
        # All or nothing: the critic is not regressed either, its optimizer state included.
        assert_critic_and_optimizer_unchanged(snapshot, model)
    assert all(th.isfinite(p).all() for p in model.policy.parameters())


class _no_warning:
    """A failed line search (every candidate non-finite) is an ordinary rejection, not a fault."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_critic_never_moves_shared_features_extractor():
    model = CASES["cnn-shared-extractor"]()
    extractor = list(model.policy.features_extractor.parameters())
    actor_ids = {id(p) for p in model._actor_params}
    assert extractor and all(id(p) in actor_ids for p in extractor)
    optimizer_ids = {id(p) for group in model.policy.optimizer.param_groups for p in group["params"]}
    assert not optimizer_ids & actor_ids
    assert optimizer_ids == {id(p) for p in model._critic_params}


def test_train_uses_learning_rate_schedule(recording_logger):
    model = TRPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64, learning_rate=lambda progress: 0.01 * progress)
    model.set_logger(recording_logger[0])
    model.learn(128)
    rows = [*recording_logger[1].rows, recording_logger[0].name_to_value]
    rates = [row["train/learning_rate"] for row in rows if "train/learning_rate" in row]
    assert len(rates) == 2
    # SB3 updates the progress after each rollout: half-way, then at the end.
    assert rates == pytest.approx([0.005, 0.0])
    assert model.policy.optimizer.param_groups[0]["lr"] == pytest.approx(rates[-1])


def test_accepts_every_sb3_contrib_trpo_argument_with_its_default():
    import inspect

    from sb3_contrib import TRPO as ContribTRPO

    ours = inspect.signature(TRPO).parameters
    for name, parameter in inspect.signature(ContribTRPO).parameters.items():
        assert name in ours, name
        assert ours[name].default == parameter.default, name


def test_fisher_subsampling_keeps_full_batch_for_gradient_and_line_search():
    model = TRPO("MlpPolicy", TargetEnv(), n_steps=100, batch_size=50, fisher_sub_sampling_factor=5, seed=0)
    model.learn(100)  # fills the buffer; train() below reuses it
    sizes = []
    get_distribution = model.policy.get_distribution

    def recording(observations):
        sizes.append(len(observations))
        return get_distribution(observations)

    model.policy.get_distribution = recording
    model.train()
    assert set(sizes) == {100, 20}
    assert sizes.count(100) >= 3  # old distribution, gradient, line search


def test_sub_sampling_factor_subsamples_the_whole_policy_step():
    model = TRPO("MlpPolicy", TargetEnv(), n_steps=100, batch_size=50, sub_sampling_factor=2, seed=0)
    model.learn(100)
    sizes = []
    get_distribution = model.policy.get_distribution
    model.policy.get_distribution = lambda observations: sizes.append(len(observations)) or get_distribution(observations)
    model.train()
    assert set(sizes) == {50}


def test_entropy_bonus_enters_the_surrogate():
    model = TRPO("MlpPolicy", TargetEnv(), n_steps=64, batch_size=64, ent_coef=0.5)
    observations = th.as_tensor(np.stack([model.observation_space.sample() for _ in range(8)]))
    distribution = model.policy.get_distribution(observations)
    actions = distribution.get_actions().detach()
    old_log_prob = distribution.log_prob(actions).detach()
    objective = model.surrogate_objective(actions, old_log_prob, th.zeros(8))(distribution)
    # Zero advantages: only the bonus is left, 0.5 * mean entropy.
    assert objective.item() == pytest.approx(0.5 * distribution.entropy().mean().item(), rel=1e-6)
    advantages = th.linspace(-1, 1, 8)
    model.ent_coef = 0.0
    assert model.surrogate_objective(actions, old_log_prob, advantages)(distribution).item() == pytest.approx(
        advantages.mean().item(), abs=1e-6
    )
