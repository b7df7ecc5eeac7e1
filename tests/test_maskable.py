"""MaskableTRPO: masked Fisher and KL, masks in rollouts, predict and evaluation, learning, faults, save/load."""

from collections import namedtuple

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from sb3_contrib.common.envs import InvalidActionEnvDiscrete, InvalidActionEnvMultiBinary, InvalidActionEnvMultiDiscrete
from sb3_contrib.common.maskable.evaluation import evaluate_policy
from sb3_contrib.common.maskable.utils import get_action_masks
from stable_baselines3.common.envs import IdentityEnv

from sb3_trpo_ext import TRPO, MaskableTRPO
from sb3_trpo_ext.common.trust_region import analytic_fisher_vector_product, kl_hessian_vector_product, unflatten_like
from tests.test_trpo_step import assert_actor_unchanged, one_update

ENVS = {
    "Discrete": lambda: InvalidActionEnvDiscrete(dim=6, n_invalid_actions=3),
    "MultiDiscrete": lambda: InvalidActionEnvMultiDiscrete(dims=[3, 4, 2], n_invalid_actions=3),
    "MultiBinary": lambda: InvalidActionEnvMultiBinary(dims=4, n_invalid_actions=2),
}


def action_dims(space: spaces.Space) -> list[int]:
    if isinstance(space, spaces.Discrete):
        return [int(space.n)]
    if isinstance(space, spaces.MultiDiscrete):
        return [int(n) for n in space.nvec]
    return [2] * int(space.n)


def random_masks(dims: list[int], n: int, generator: np.random.Generator) -> np.ndarray:
    """Random masks with at least one valid outcome per action dimension."""
    blocks = []
    for dim in dims:
        block = generator.random((n, dim)) < 0.6
        block[np.arange(n), generator.integers(dim, size=n)] = True
        blocks.append(block)
    return np.concatenate(blocks, axis=1)


def reference_masked_kl_hessian_vector_product(policy, params, observations, masks, dims, vector):
    """H v, H the Hessian of the mean joint KL of the masked policy, written from the logits and the masks alone."""

    def masked_log_probs():
        latent = policy.mlp_extractor.forward_actor(policy.extract_features(observations))
        logits = policy.action_net(latent).masked_fill(~masks, -th.inf)
        return [th.log_softmax(block, dim=-1) for block in th.split(logits, dims, dim=1)]

    with th.no_grad():
        old = masked_log_probs()
    new = masked_log_probs()
    valid = [block for block in th.split(masks, dims, dim=1)]
    kl = sum(
        th.where(v, o.exp() * (o - n), th.zeros_like(o)).sum(dim=1) for o, n, v in zip(old, new, valid, strict=True)
    ).mean()
    grads = th.autograd.grad(kl, params, create_graph=True, allow_unused=True)
    grad_dot_v = sum((g * v).sum() for g, v in zip(grads, unflatten_like(vector, params), strict=True) if g is not None)
    hessian = th.autograd.grad(grad_dot_v, params, allow_unused=True)
    return th.cat([(th.zeros_like(p) if h is None else h).reshape(-1) for h, p in zip(hessian, params, strict=True)])


@pytest.mark.parametrize("kind", list(ENVS))
def test_fisher_vector_product_equals_hessian_of_masked_kl(kind, float64_policies):
    model = MaskableTRPO("MlpPolicy", ENVS[kind](), n_steps=8, batch_size=8, policy_kwargs={"net_arch": [16]}, seed=0)
    policy = model.policy.double()
    params, dims = model._actor_params, action_dims(model.action_space)
    generator = np.random.default_rng(0)
    n_obs = model.observation_space.shape[0] if model.observation_space.shape else 1
    raw = generator.integers(0, 2, (64, n_obs)) if n_obs > 1 else generator.integers(0, 6, (64,))
    observations = th.as_tensor(raw, dtype=th.float64)
    masks = th.as_tensor(random_masks(dims, 64, generator))
    assert not masks.all()

    def distribution():
        return policy.get_distribution(observations, action_masks=masks)

    analytic = analytic_fisher_vector_product(params, distribution)
    assert analytic is not None, "masked distributions must use the analytic Fisher-vector product"
    by_hand = model._fisher_product(namedtuple("Batch", "observations action_masks")(observations, masks))
    assert by_hand is not None, "the maskable MLP actor must use the hand-written product"
    double_backprop = kl_hessian_vector_product(params, distribution)  # through the package's joint_kl
    unmasked = analytic_fisher_vector_product(params, lambda: policy.get_distribution(observations))
    vector_generator = th.Generator().manual_seed(1)
    for _ in range(3):
        vector = th.randn(sum(p.numel() for p in params), generator=vector_generator, dtype=th.float64)
        expected = reference_masked_kl_hessian_vector_product(policy, params, observations, masks, dims, vector)
        assert expected.norm() > 1e-6
        for product in (analytic, double_backprop, by_hand):
            assert ((product(vector) - expected).norm() / expected.norm()).item() <= 1e-8
        # The masks matter: the unmasked Fisher is a different matrix.
        assert ((unmasked(vector) - expected).norm() / expected.norm()).item() > 1e-3


class CountInvalidActions(gym.Wrapper):
    """Counts the steps whose action the env's current mask forbids."""

    def __init__(self, env):
        super().__init__(env)
        self.invalid = 0
        self.steps = 0

    def action_masks(self):
        return self.env.unwrapped.action_masks()

    def step(self, action):
        self.steps += 1
        self.invalid += int(not self.action_masks()[int(action)])
        return self.env.step(action)


def masked_model(**kwargs) -> MaskableTRPO:
    env = CountInvalidActions(InvalidActionEnvDiscrete(dim=10, n_invalid_actions=5))
    kwargs = {"n_steps": 256, "batch_size": 64, "policy_kwargs": {"net_arch": [32]}, "seed": 0, **kwargs}
    return MaskableTRPO("MlpPolicy", env, **kwargs)


def test_learns_invalid_action_env_without_ever_choosing_an_invalid_action():
    model = masked_model()
    model.learn(4096)
    counter = model.get_env().envs[0].env  # Monitor -> CountInvalidActions
    assert counter.steps == 4096 and counter.invalid == 0
    buffer = model.rollout_buffer
    actions = buffer.actions.reshape(-1).astype(int)
    stored_masks = buffer.action_masks.reshape(len(actions), -1)
    assert (stored_masks == 0).any() and stored_masks[np.arange(len(actions)), actions].all()

    eval_env = CountInvalidActions(InvalidActionEnvDiscrete(dim=10, n_invalid_actions=5))
    mean_return, _ = evaluate_policy(model, eval_env, n_eval_episodes=10, deterministic=True, warn=False)
    # 100 steps per episode, reward 1 for the right action; a uniformly random valid action scores about 20.
    assert mean_return >= 90
    assert eval_env.invalid == 0 and eval_env.steps == 1000


def test_predict_with_masks_never_returns_an_invalid_action():
    model = masked_model()  # untrained: the unmasked policy is close to uniform
    env = model.get_env()
    unmasked_invalid = 0
    for _ in range(200):
        observation = env.reset()
        masks = get_action_masks(env)
        for deterministic in (False, True):
            action, _ = model.predict(observation, deterministic=deterministic, action_masks=masks)
            assert masks[0, action[0]]
        action, _ = model.predict(observation)
        unmasked_invalid += int(not masks[0, action[0]])
    assert unmasked_invalid > 20, "without masks the policy does pick invalid actions"


def test_policy_step_subsamples_masks_with_their_observations():
    model = masked_model(n_steps=64, sub_sampling_factor=2, fisher_sub_sampling_factor=3)
    model.learn(64)
    rollout = next(model.rollout_buffer.get(None))
    pairs = {(int(o.argmax()), tuple(m.tolist())) for o, m in zip(rollout.observations, rollout.action_masks, strict=True)}
    seen_sizes = []
    action_distribution = model._action_distribution

    def recording(batch):
        seen_sizes.append(len(batch.action_masks))
        for observation, mask in zip(batch.observations, batch.action_masks, strict=True):
            assert (int(observation.argmax()), tuple(mask.tolist())) in pairs
        return action_distribution(batch)

    model._action_distribution = recording
    model.train()
    assert set(seen_sizes) == {32, 11}


def test_accepted_step_keeps_masked_kl_bound_after_whole_train(recording_logger):
    model = masked_model(target_kl=0.02)
    model.set_logger(recording_logger[0])
    snapshot = one_update(model)
    assert recording_logger[0].name_to_value["train/is_line_search_success"] == 1.0
    rollout = next(model.rollout_buffer.get(None))
    with th.no_grad():
        old = snapshot.policy_before.get_distribution(rollout.observations, action_masks=rollout.action_masks).distribution
        new = model.policy.get_distribution(rollout.observations, action_masks=rollout.action_masks).distribution
        valid = rollout.action_masks.bool()
        kl = th.where(valid, old.probs * (old.logits - new.logits), th.zeros_like(old.logits)).sum(dim=1).mean().item()
    assert 0.0 < kl <= model.target_kl * (1 + 1e-4)


def test_numerical_fault_skips_masked_policy_step_bit_identically(recording_logger):
    model = masked_model()
    model.set_logger(recording_logger[0])

    def nan_advantage(model):
        model.rollout_buffer.advantages[3, 0] = np.nan

    with pytest.warns(UserWarning, match="skipped update"):
        snapshot = one_update(model, nan_advantage)
    assert recording_logger[0].name_to_value["train/numerical_fault"] == 1.0
    assert_actor_unchanged(snapshot, model)


def test_save_load_keeps_predictions_and_masking(tmp_path):
    model = masked_model(n_steps=64)
    model.learn(64)
    model.save(tmp_path / "maskable")
    loaded = MaskableTRPO.load(tmp_path / "maskable", env=model.get_env())
    observation = model.get_env().reset()
    masks = get_action_masks(model.get_env())
    assert (
        loaded.predict(observation, deterministic=True, action_masks=masks)[0]
        == model.predict(observation, deterministic=True, action_masks=masks)[0]
    ).all()
    for before, after in zip(model.policy.parameters(), loaded.policy.parameters(), strict=True):
        assert th.equal(before, after)
    loaded.learn(64)  # the loaded model keeps collecting masked rollouts


def test_invalid_inputs_are_rejected_at_construction():
    from stable_baselines3.common.buffers import RolloutBuffer
    from stable_baselines3.common.policies import ActorCriticPolicy

    with pytest.raises(TypeError, match="`policy` must be a subclass of MaskableActorCriticPolicy"):
        MaskableTRPO(ActorCriticPolicy, InvalidActionEnvDiscrete(dim=3, n_invalid_actions=1))
    with pytest.raises(ValueError, match="`env` must provide action masks"):
        MaskableTRPO("MlpPolicy", IdentityEnv(3))
    with pytest.raises(ValueError, match="`rollout_buffer_class`"):
        MaskableTRPO("MlpPolicy", InvalidActionEnvDiscrete(dim=3, n_invalid_actions=1), rollout_buffer_class=RolloutBuffer)
    with pytest.raises(TypeError, match="MaskableTRPO does not support the action space"):
        MaskableTRPO("MlpPolicy", "Pendulum-v1")
    with pytest.raises(ValueError, match="`target_kl`"):
        MaskableTRPO("MlpPolicy", InvalidActionEnvDiscrete(dim=3, n_invalid_actions=1), target_kl=0.0)


def test_logs_runs_under_its_own_class_name(monkeypatch):
    # The tensorboard run name, as RecurrentPPO and MaskablePPO default theirs.
    names = []
    setup_learn = TRPO._setup_learn

    def spy(self, total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar):
        names.append(tb_log_name)
        return setup_learn(self, total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar)

    monkeypatch.setattr(TRPO, "_setup_learn", spy)
    masked_model(n_steps=8).learn(8)
    masked_model(n_steps=8).learn(8, tb_log_name="mine")
    TRPO("MlpPolicy", "CartPole-v1", n_steps=8, batch_size=8).learn(8)
    assert names == ["MaskableTRPO", "mine", "TRPO"]
