"""
Speed of our TRPO against ``sb3_contrib.TRPO``, measured side by side in one process.

Usage (from the repository root, after ``pip install -e ".[benchmarks]"``)::

    python benchmarks/speed.py                 # full run, 6-12 minutes on an idle 2-core machine
    python benchmarks/speed.py --quick         # smoke run with tiny budgets

Parts, each alternating ours / sb3-contrib over ``--repeats`` repeats and reporting medians and ratios:

1. ``train()`` alone, on the same filled rollout buffer and the same initial weights, at RL Zoo's TRPO
   hyperparameters for CartPole-v1, Pendulum-v1 and HalfCheetah (plus an 8192-sample batch);
2. end-to-end ``learn()`` steps per second, with the final deterministic evaluation return of each run;
3. the raw speed of the same vectorised environment with random actions, the ceiling for 2.;
4. where our ``learn()`` spends its time;
5. our ``train()`` and ``learn()`` with 1 and 2 torch threads;
6. our critic regression at the HalfCheetah config against floors on its cost: the torch loop it replaced run by
   TorchScript (no Python between operations) and compiled by ``torch.compile`` (element-wise work fused), and the
   matrix products alone of both loops.

Results: ``benchmarks/results/speed.{md,csv,png}``.
"""

import argparse
import copy
import csv
import platform
import statistics
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib import TRPO as ContribTRPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.vec_env import VecEnv, VecNormalize

import sb3_trpo_ext
from sb3_trpo_ext import TRPO
from sb3_trpo_ext import trpo as trpo_module
from sb3_trpo_ext.common import trust_region
from sb3_trpo_ext.common.critic import AdamSettings, regress_mlp
from sb3_trpo_ext.common.mlp import critic_chain, single_threaded_blas
from sb3_trpo_ext.common.trust_region import flat_concat, unflatten_like

# One thread: on 2 shared cores, 2 threads measured 4-7x slower under load (developers' brief); our own check
# on this machine agreed for batch-2 rollouts. Both algorithms run with the same setting.
th.set_num_threads(1)
warnings.filterwarnings("ignore")

RESULTS = Path(__file__).parent / "results"

# RL Zoo 2.9.2 hyperparams/trpo.yml (HalfCheetah: the MuJoCo -v4 entry, applied to -v5).
ZOO: dict[str, dict[str, Any]] = {
    "CartPole-v1": dict(
        n_envs=2,
        kwargs=dict(n_steps=512, batch_size=512, cg_damping=1e-3, gae_lambda=0.98, gamma=0.99, n_critic_updates=20),
    ),
    "Pendulum-v1": dict(n_envs=2, kwargs=dict(n_steps=1024, gamma=0.9, n_critic_updates=15, use_sde=True, sde_sample_freq=4)),
    "HalfCheetah-v5": dict(
        n_envs=2,
        normalize=True,
        kwargs=dict(
            batch_size=128,
            n_steps=1024,
            gamma=0.99,
            gae_lambda=0.95,
            cg_max_steps=25,
            cg_damping=0.1,
            n_critic_updates=20,
            learning_rate=1e-3,
            target_kl=0.04,
        ),
    ),
}


def make_env(env_id: str, seed: int, n_envs: int | None = None) -> VecEnv:
    config = ZOO[env_id]
    env = make_vec_env(env_id, n_envs=n_envs or config["n_envs"], seed=seed)
    return VecNormalize(env) if config.get("normalize") else env


def median(values: list[float]) -> float:
    return statistics.median(values)


# ----------------------------------------------------------------------------------------------------------------
# 1. train() alone
# ----------------------------------------------------------------------------------------------------------------


def train_alone(
    env_id: str, repeats: int, n_steps: int | None = None, label: str | None = None, devices: Sequence[str] = ("cpu",)
) -> list[dict]:
    """
    Time ``train()`` of ours (exact Fisher and Fisher on every 5th sample) and of sb3-contrib, alternating, on one
    rollout buffer filled by our model and the same initial weights.

    :param env_id: A key of ``ZOO``
    :param repeats: Timed repeats, after one warm-up round
    :param n_steps: Overrides the zoo's ``n_steps`` (batch = ``n_steps`` times the number of environments)
    :param label: Name of the case in the results (default: ``env_id``)
    :param devices: Torch devices to run every algorithm on, in the same alternation; speed-ups are against
        sb3-contrib on the same device
    :return: One row per algorithm and device
    """
    kwargs = dict(ZOO[env_id]["kwargs"])
    if n_steps is not None:
        kwargs["n_steps"] = n_steps
    env = make_env(env_id, seed=0)
    variants: dict[tuple[str, str], Any] = {}
    for device in devices:
        variants[("ours", device)] = TRPO("MlpPolicy", env, seed=0, device=device, **kwargs)
        variants[("ours-fisher/5", device)] = TRPO(
            "MlpPolicy", env, seed=0, device=device, fisher_sub_sampling_factor=5, **kwargs
        )
        variants[("sb3-contrib", device)] = ContribTRPO("MlpPolicy", env, seed=0, device=device, **kwargs)
    reference = TRPO("MlpPolicy", env, seed=0, device="cpu", **kwargs)
    initial = copy.deepcopy(reference.policy.state_dict())
    reference._setup_learn(10**9, None)
    callback = reference._init_callback(None)
    assert reference.env is not None
    reference.collect_rollouts(reference.env, callback, reference.rollout_buffer, reference.n_steps)
    for model in variants.values():
        model.set_logger(Logger(folder=None, output_formats=[]))
        model.rollout_buffer = copy.deepcopy(reference.rollout_buffer)
        model.rollout_buffer.device = model.device  # the buffer hands out tensors on this device
    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    critic_times: dict[tuple[str, str], list[float]] = defaultdict(list)  # ours: the critic regression's part
    for _ in range(repeats + 1):  # the first round warms up
        for key, model in variants.items():
            # same architecture and names: SB3's ActorCriticPolicy in all three
            model.policy.load_state_dict(initial)
            totals: dict[str, float] = defaultdict(float)
            with timed(model, "_critic_step", totals, "critic") if isinstance(model, TRPO) else nullcontext():
                synchronize(model.device)
                start = time.perf_counter()
                model.train()
                synchronize(model.device)
                times[key].append(time.perf_counter() - start)
            critic_times[key].append(totals["critic"])
    batch = reference.n_steps * reference.n_envs
    return [
        dict(
            part="train",
            case=label or env_id,
            batch=batch,
            algorithm=name,
            device=device,
            median_s=median(values[1:]),
            speedup_vs_contrib=median(times[("sb3-contrib", device)][1:]) / median(values[1:]),
            critic_median_s=median(critic_times[(name, device)][1:]) if name != "sb3-contrib" else float("nan"),
        )
        for (name, device), values in times.items()
    ]


def synchronize(device: th.device) -> None:
    """Wait for the device's queued work, so that a host clock times it (CUDA runs asynchronously)."""
    if device.type == "cuda":
        th.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------------
# 2. + 3. learn() steps/s, final returns, raw environment speed
# ----------------------------------------------------------------------------------------------------------------


def raw_env_speed(env_id: str, steps: int) -> float:
    env = make_env(env_id, seed=0)
    env.reset()
    rng = np.random.default_rng(0)
    space, n = env.action_space, env.num_envs
    if isinstance(space, spaces.Discrete):
        actions = rng.integers(0, int(space.n), size=(steps, n))
    elif isinstance(space, spaces.Box):
        actions = rng.uniform(space.low, space.high, size=(steps, n, *space.shape)).astype(np.float32)
    else:
        raise TypeError(f"raw_env_speed: unsupported action space {space}")
    start = time.perf_counter()
    for i in range(steps):
        env.step(actions[i])
    return steps * n / (time.perf_counter() - start)


def evaluate(model, env_id: str, seed: int, n_episodes: int = 10) -> float:
    eval_env = make_env(env_id, seed=seed + 10_000, n_envs=1)
    if isinstance(eval_env, VecNormalize):
        train_env = model.get_env()
        eval_env.obs_rms = copy.deepcopy(train_env.obs_rms)
        eval_env.training = False  # frozen statistics
        eval_env.norm_reward = False
    mean_return, _ = evaluate_policy(model, eval_env, n_eval_episodes=n_episodes, deterministic=True)
    assert isinstance(mean_return, float)  # not the per-episode list
    return float(mean_return)


def ported(kwargs: dict[str, Any], env: VecEnv) -> dict[str, Any]:
    """
    sb3-contrib's hyperparameters for our TRPO: the same values, with ``target_kl`` and ``cg_damping`` times the
    action dimension for Box actions (README, "Coming from sb3_contrib.TRPO"), so both take the same step.
    """
    if isinstance(env.action_space, spaces.Box):
        d = int(np.prod(env.action_space.shape))
        kwargs = {**kwargs, "target_kl": kwargs.get("target_kl", 0.01) * d, "cg_damping": kwargs.get("cg_damping", 0.1) * d}
    return kwargs


LEARNERS = {"ours": TRPO, "sb3-contrib": ContribTRPO}


def make_learner(name: str, env_id: str, seed: int, device: str = "cpu") -> Any:
    """
    :param name: A key of ``LEARNERS``
    :param env_id: A key of ``ZOO``
    :param seed: Seed of the model and its environment
    :param device: Torch device of the model (explicit: SB3's ``"auto"`` would pick a GPU where there is one)
    :return: The model at the zoo's hyperparameters (ported for ours)
    """
    cls = LEARNERS[name]
    env = make_env(env_id, seed=seed)
    kwargs = ZOO[env_id]["kwargs"]
    return cls("MlpPolicy", env, seed=seed, device=device, **(ported(kwargs, env) if cls is TRPO else kwargs))


def learn_speed(env_id: str, seeds: Iterable[int], budget: int, devices: Sequence[str] = ("cpu",)) -> list[dict]:
    """
    :param env_id: A key of ``ZOO``
    :param seeds: One run of each algorithm on each device per seed, alternating
    :param budget: Steps per run
    :param devices: Torch devices
    :return: One row per run: steps/s and the final deterministic evaluation return
    """
    rows = []
    for seed in seeds:
        for device in devices:
            for name in LEARNERS:
                model = make_learner(name, env_id, seed, device)
                synchronize(model.device)
                start = time.perf_counter()
                model.learn(budget)
                synchronize(model.device)
                elapsed = time.perf_counter() - start
                rows.append(
                    dict(
                        part="learn",
                        case=env_id,
                        algorithm=name,
                        device=device,
                        seed=seed,
                        steps=budget,
                        seconds=elapsed,
                        steps_per_s=budget / elapsed,
                        final_return=evaluate(model, env_id, seed),
                    )
                )
                print(f"  learn {env_id} {name} on {device}, seed={seed}: {budget / elapsed:.0f} steps/s", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# 4. Profile of our learn()
# ----------------------------------------------------------------------------------------------------------------


@contextmanager
def timed(owner: Any, attribute: str, totals: dict[str, float], key: str):
    """
    Accumulate the wall time of every call of ``owner.attribute`` into ``totals[key]``; for ``fused_forward``, of
    every call of the forward function it builds (the rollout's policy call).
    """
    original = getattr(owner, attribute)
    own = attribute in vars(owner)  # else a method found on the class, to be un-shadowed afterwards

    def timing(fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[key] += time.perf_counter() - start

        return wrapper

    if attribute == "fused_forward":

        def wrapper(policy):
            forward = original(policy)
            return None if forward is None else timing(forward)

    else:
        wrapper = timing(original)

    setattr(owner, attribute, wrapper)
    try:
        yield
    finally:
        if own:
            setattr(owner, attribute, original)
        else:
            delattr(owner, attribute)


def profile(env_id: str, budget: int) -> list[dict]:
    model = TRPO("MlpPolicy", make_env(env_id, seed=0), seed=0, **ZOO[env_id]["kwargs"])
    totals: dict[str, float] = defaultdict(float)
    env = model.get_env()
    patches: list[tuple[Any, str, str]] = [
        (trpo_module, "fused_forward", "rollout: policy call"),
        (env, "step", "rollout: env step (incl. VecEnv wrappers)"),
        (trust_region, "conjugate_gradient", "train: FVP + conjugate gradient"),
        (trust_region, "backtracking_line_search", "train: line search"),
        (model, "_critic_step", "train: critic regression"),
        (model, "train", "train: total"),
        (model, "collect_rollouts", "rollout: total"),
    ]
    with ExitStack() as stack:
        for owner, attribute, key in patches:
            stack.enter_context(timed(owner, attribute, totals, key))
        start = time.perf_counter()
        model.learn(budget)
    total = time.perf_counter() - start
    rows = [
        dict(part="profile", case=env_id, component=key, seconds=value, share=value / total) for key, value in totals.items()
    ]
    rows.append(dict(part="profile", case=env_id, component="learn: total", seconds=total, share=1.0))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# 5. torch threads
# ----------------------------------------------------------------------------------------------------------------


def thread_scaling(repeats: int, budget: int) -> list[dict]:
    """Our ``train()`` (HalfCheetah config, batches 2048 and 8192) and ``learn()`` (CartPole) at 1 and 2 threads."""
    rows = []
    for n_steps in (1024, 4096):
        env = make_env("HalfCheetah-v5", seed=0)
        model = TRPO("MlpPolicy", env, seed=0, **{**ZOO["HalfCheetah-v5"]["kwargs"], "n_steps": n_steps})
        model.set_logger(Logger(folder=None, output_formats=[]))
        model._setup_learn(10**9, None)
        assert model.env is not None
        model.collect_rollouts(model.env, model._init_callback(None), model.rollout_buffer, model.n_steps)
        initial = copy.deepcopy(model.policy.state_dict())
        times: dict[int, list[float]] = defaultdict(list)
        for _ in range(repeats + 1):
            for threads in (1, 2):
                th.set_num_threads(threads)
                model.policy.load_state_dict(initial)
                start = time.perf_counter()
                model.train()
                times[threads].append(time.perf_counter() - start)
        for threads, values in times.items():
            rows.append(dict(part="threads", case=f"train(), HalfCheetah-v5, batch {2 * n_steps}", threads=threads,
                             median_s=median(values[1:])))  # fmt: skip
    times = defaultdict(list)
    for _ in range(max(1, repeats // 2)):
        for threads in (1, 2):
            th.set_num_threads(threads)
            model = TRPO("MlpPolicy", make_env("CartPole-v1", seed=0), seed=0, **ZOO["CartPole-v1"]["kwargs"])
            start = time.perf_counter()
            model.learn(budget)
            times[threads].append(time.perf_counter() - start)
    for threads, values in times.items():
        rows.append(dict(part="threads", case=f"learn({budget}), CartPole-v1", threads=threads, median_s=median(values)))
    th.set_num_threads(1)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# 6. How far the critic regression is from its floor
# ----------------------------------------------------------------------------------------------------------------


def _scripted_regression() -> Any:
    """
    The arithmetic of :func:`regress_mlp` for a tanh chain (forward, backward of the squared error, fused Adam), as
    a TorchScript loop over the minibatches of one epoch: the cost without Python between the operations (plus
    three small copies). A measuring device only (``torch.jit.script`` is deprecated); ``None`` where this torch
    cannot script it.
    """

    def epoch(
        inputs: list[th.Tensor], targets: list[th.Tensor], weights: list[th.Tensor], grads: list[th.Tensor],
        flat: th.Tensor, grad: th.Tensor, exp_avg: th.Tensor, exp_avg_sq: th.Tensor, step: th.Tensor, lr: float,
        beta1: float, beta2: float, eps: float, weight_decay: float,
    ) -> None:  # fmt: skip
        n_layers = len(weights) // 2
        for k in range(len(inputs)):
            outputs = [inputs[k]]
            for i in range(n_layers):
                h = th.addmm(weights[2 * i + 1], outputs[-1], weights[2 * i].t())
                outputs.append(th.tanh(h) if i < n_layers - 1 else h)
            upstream = (outputs[-1] - targets[k]) * (2.0 / targets[k].size(0))
            for j in range(n_layers):
                i = n_layers - 1 - j
                if i < n_layers - 1:
                    upstream = th.ops.aten.tanh_backward(upstream, outputs[i + 1])
                th.mm(upstream.t(), outputs[i], out=grads[2 * i])
                th.sum(upstream, dim=0, out=grads[2 * i + 1])
                if i > 0:
                    upstream = th.mm(upstream, weights[2 * i])
            step.add_(1)
            # The functional kernel, written back: TorchScript drops the in-place ``_fused_adam_`` as dead code.
            updated = th.ops.aten._fused_adam(
                [flat], [grad], [exp_avg], [exp_avg_sq], [], [step], amsgrad=False, lr=lr, beta1=beta1, beta2=beta2,
                weight_decay=weight_decay, eps=eps, maximize=False,
            )  # fmt: skip
            flat.copy_(updated[0][0])
            exp_avg.copy_(updated[2][0])
            exp_avg_sq.copy_(updated[3][0])

    try:
        return th.jit.script(epoch)
    except Exception:  # any failure to script only drops this row from the table
        return None


def _compiled_regression(shapes: list[th.Size]) -> Any:
    """
    The same arithmetic as a pure function of one epoch (weights, Adam moments and step in, updated ones out),
    compiled by ``torch.compile``: TorchInductor fuses the element-wise work (tanh and its derivative, bias sums,
    Adam) into generated C++ loops and leaves the matrix products to the BLAS. Written without ``out=`` or
    in-place updates, which is what Inductor fuses best; the TorchScript twin writes in place, which is what keeps
    it fast. A measuring device only; it needs a C++ compiler when first called.
    """
    sizes = [shape.numel() for shape in shapes]

    def epoch(
        inputs: list[th.Tensor], targets: list[th.Tensor], flat: th.Tensor, exp_avg: th.Tensor,
        exp_avg_sq: th.Tensor, step: th.Tensor, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor, th.Tensor]:  # fmt: skip
        n_layers = len(shapes) // 2
        for x, y in zip(inputs, targets, strict=True):
            weights = [part.view(shape) for part, shape in zip(flat.split(sizes), shapes, strict=True)]
            outputs = [x]
            for i in range(n_layers):
                h = th.addmm(weights[2 * i + 1], outputs[-1], weights[2 * i].t())
                outputs.append(th.tanh(h) if i < n_layers - 1 else h)
            upstream = (outputs[-1] - y) * (2.0 / y.shape[0])
            grads: list[th.Tensor] = []
            for i in range(n_layers - 1, -1, -1):
                if i < n_layers - 1:
                    upstream = upstream * (1 - outputs[i + 1] * outputs[i + 1])
                grads[:0] = [(upstream.t() @ outputs[i]).reshape(-1), upstream.sum(0)]
                if i > 0:
                    upstream = upstream @ weights[2 * i]
            grad = th.cat(grads) + weight_decay * flat
            step = step + 1
            exp_avg = exp_avg.lerp(grad, 1 - beta1)
            exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * grad * grad
            denominator = exp_avg_sq.sqrt() / (1 - beta2**step).sqrt() + eps
            flat = flat - lr / (1 - beta1**step) * exp_avg / denominator
        return flat, exp_avg, exp_avg_sq, step

    return th.compile(epoch, fullgraph=True, dynamic=False)


def critic_floor(repeats: int, train_rows: list[dict]) -> list[dict]:
    """
    Our critic regression at the HalfCheetah config (20 epochs of 16 minibatches of 128, a 64x64 tanh critic),
    TorchScript and ``torch.compile`` twins of the torch loop it replaced, and the matrix products alone of both
    loops, each with the ``train()`` speed-up over
    sb3-contrib it would allow: if the critic cost that and the rest of our ``train()`` (Fisher on every 5th sample)
    what it costs now.
    """
    kwargs = ZOO["HalfCheetah-v5"]["kwargs"]
    model = TRPO("MlpPolicy", make_env("HalfCheetah-v5", seed=0), seed=0, **kwargs)
    chain, adam = critic_chain(model.policy), AdamSettings.of(model.policy.optimizer)
    # SB3's MlpPolicy: a chain of tanh-activated linear layers on the flattened observation, and a plain Adam
    assert chain is not None and adam is not None
    generator = th.Generator().manual_seed(0)
    batch = model.n_steps * model.n_envs
    inputs = th.randn(batch, chain.parameters[0].shape[1], generator=generator)
    targets = th.randn(batch, generator=generator)
    n_epochs, batch_size = model.n_critic_updates, model.batch_size
    weights = [p.detach().clone() for p in chain.parameters]

    def shipped() -> None:
        regress_mlp(chain, inputs, targets, model.policy.optimizer, n_epochs, batch_size)

    def minibatches() -> tuple[list[th.Tensor], list[th.Tensor]]:
        """One epoch's shuffled minibatches, drawn as ``regress_mlp`` draws them."""
        permutation = th.randperm(batch)
        return list(inputs[permutation].split(batch_size)), list(targets[permutation].unsqueeze(1).split(batch_size))

    epoch = _scripted_regression()
    flat = flat_concat(weights)
    grad, exp_avg, exp_avg_sq, step = th.zeros_like(flat), th.zeros_like(flat), th.zeros_like(flat), th.zeros(())
    views, grad_views = unflatten_like(flat, weights), unflatten_like(grad, weights)

    def scripted(epochs: int = n_epochs) -> None:
        for _ in range(epochs):
            epoch(
                *minibatches(), views, grad_views, flat, grad, exp_avg, exp_avg_sq, step, adam.lr, adam.beta1,
                adam.beta2, adam.eps, adam.weight_decay,
            )  # fmt: skip

    compiled_epoch = _compiled_regression([w.shape for w in weights])
    state = [flat.clone(), th.zeros_like(flat), th.zeros_like(flat), th.zeros(())]  # weights, moments, step

    def compiled(epochs: int = n_epochs) -> None:
        for _ in range(epochs):
            state[:] = compiled_epoch(
                *minibatches(), *state, adam.lr, adam.beta1, adam.beta2, adam.eps, adam.weight_decay,
            )  # fmt: skip

    # Every twin must do the shipped work: one epoch of each from the same weights and permutation agree.
    th.manual_seed(0)
    regress_mlp(chain, inputs, targets, model.policy.optimizer, 1, batch_size)
    one_epoch = flat_concat(chain.parameters)
    twins = {"the torch loop, TorchScript": (scripted, lambda: flat)} if epoch is not None else {}
    twins["the torch loop, torch.compile"] = (compiled, lambda: state[0])
    for name, (twin, weights_after) in list(twins.items()):
        th.manual_seed(0)
        try:
            with th.no_grad():
                twin(1)  # torch.compile compiles here
        except Exception:  # e.g. no C++ compiler for TorchInductor: only this row is dropped
            del twins[name]
            continue
        th.testing.assert_close(weights_after(), one_epoch)

    x = inputs[:batch_size]
    layers = [(w, w.t()) for w in weights[::2]]
    n_steps = n_epochs * (batch // batch_size)

    def products_only() -> None:
        """The eight products of a step of the batch-major torch loop that ``regress_mlp`` ran before NumPy."""
        for _ in range(n_steps):
            outputs = [x]
            for _, weight_t in layers:
                outputs.append(th.mm(outputs[-1], weight_t))
            upstream = outputs[-1]
            for i in range(len(layers) - 1, -1, -1):
                th.mm(upstream.t(), outputs[i])
                if i > 0:
                    upstream = th.mm(upstream, layers[i][0])

    # The shipped loop's products, laid out as it lays them out (feature-major, biases folded in by a row of ones,
    # results into fixed memory), through NumPy's matmul: NumPy's OpenBLAS (0.3.31 here) has the small-matrix
    # kernels of the one the compiled loop calls.
    pairs = zip(weights[::2], weights[1::2], strict=True)
    blocks = [np.ascontiguousarray(th.cat([w, b[:, None]], 1).numpy()) for w, b in pairs]
    layer_inputs = [np.ones((len(block[0]), batch_size), dtype=np.float32) for block in blocks]
    layer_outputs = [np.empty((len(block), batch_size), dtype=np.float32) for block in blocks]
    block_grads = [np.empty_like(block) for block in blocks]

    def numpy_products_only() -> None:
        """The products of a step of the shipped loop (the one-unit layer's W^T product excepted)."""
        for _ in range(n_steps):
            for block, layer_input, output in zip(blocks, layer_inputs, layer_outputs, strict=True):
                np.matmul(block, layer_input, out=output)
            for i in range(len(blocks) - 1, -1, -1):
                np.matmul(layer_outputs[i], layer_inputs[i].T, out=block_grads[i])
                if i > 0 and len(blocks[i]) > 1:
                    np.matmul(blocks[i][:, :-1].T, layer_outputs[i], out=layer_outputs[i - 1])

    variants = {"ours (shipped)": shipped, **{name: twin for name, (twin, _) in twins.items()}}
    variants["matrix products alone, the torch loop"] = products_only
    variants["matrix products alone, the shipped loop's layout"] = numpy_products_only
    times: dict[str, list[float]] = defaultdict(list)
    with th.no_grad(), single_threaded_blas():
        for _ in range(repeats + 1):  # the first round warms up (TorchScript's profiling runs included)
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    by = {r["algorithm"]: r for r in train_rows if r["case"] == "HalfCheetah-v5"}
    contrib, sub = by["sb3-contrib"]["median_s"], by["ours-fisher/5"]
    rest = sub["median_s"] - sub["critic_median_s"]
    rows = []
    for name, values in times.items():
        critic = median(values[1:])
        rows.append(
            dict(part="critic_floor", case="HalfCheetah-v5", variant=name, median_s=critic,
                 bound_critic_only=contrib / critic, bound_with_rest=contrib / (critic + rest))
        )  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def write_csv(rows: list[dict], path: Path) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def summarise_learn(rows: list[dict], raw: dict[str, float] | None = None) -> list[dict]:
    """
    :param rows: ``learn_speed`` rows
    :param raw: Raw environment steps/s per env id, where measured
    :return: Per env: median steps/s of each algorithm, their ratio, mean ± std of the final returns
    """
    summary = []
    for env_id in dict.fromkeys(r["case"] for r in rows):
        by_algo = {a: [r for r in rows if r["case"] == env_id and r["algorithm"] == a] for a in ("ours", "sb3-contrib")}
        ours = median([r["steps_per_s"] for r in by_algo["ours"]])
        contrib = median([r["steps_per_s"] for r in by_algo["sb3-contrib"]])
        summary.append(
            dict(
                env=env_id,
                ours=ours,
                contrib=contrib,
                ratio=ours / contrib,
                raw=(raw or {}).get(env_id, float("nan")),
                ours_return=np.mean([r["final_return"] for r in by_algo["ours"]]),
                ours_return_std=np.std([r["final_return"] for r in by_algo["ours"]]),
                contrib_return=np.mean([r["final_return"] for r in by_algo["sb3-contrib"]]),
                contrib_return_std=np.std([r["final_return"] for r in by_algo["sb3-contrib"]]),
            )
        )
    return summary


def plot(train_rows: list[dict], learn_summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    cases = list(dict.fromkeys(r["case"] for r in train_rows))
    width = 0.38
    for offset, name in ((-width / 2, "ours"), (width / 2, "ours-fisher/5")):
        values = [
            next(r["speedup_vs_contrib"] for r in train_rows if r["case"] == c and r["algorithm"] == name) for c in cases
        ]
        axes[0].bar(np.arange(len(cases)) + offset, values, width, label=name)
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_xticks(range(len(cases)), cases, rotation=15)
    axes[0].set_ylabel("train() speed-up vs sb3-contrib (x)")
    axes[0].legend()
    envs = [s["env"] for s in learn_summary]
    axes[1].bar(np.arange(len(envs)) - width / 2, [s["ours"] for s in learn_summary], width, label="ours")
    axes[1].bar(np.arange(len(envs)) + width / 2, [s["contrib"] for s in learn_summary], width, label="sb3-contrib")
    for i, s in enumerate(learn_summary):
        axes[1].text(i, max(s["ours"], s["contrib"]) * 1.02, f"{s['ratio']:.2f}x", ha="center")
    axes[1].set_xticks(range(len(envs)), envs)
    axes[1].set_ylabel("learn() steps/s (median)")
    axes[1].legend()
    fig.suptitle("sb3-trpo-ext vs sb3-contrib TRPO: one process, same seeds, RL Zoo hyperparameters")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_markdown(
    command: str, train_rows, learn_summary, profile_rows, thread_rows, floor_rows, elapsed: float, path: Path
) -> None:
    import sb3_contrib
    import stable_baselines3

    lines = [
        "# Speed: sb3-trpo-ext vs sb3-contrib TRPO",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {th.get_num_threads()} torch thread, "
        f"Python {platform.python_version()}, torch {th.__version__}, SB3 {stable_baselines3.__version__}, "
        f"sb3-contrib {sb3_contrib.__version__}, sb3-trpo-ext {sb3_trpo_ext.__version__}; wall time {elapsed / 60:.1f} min.",
        "",
        "Medians over alternated repeats in one process; RL Zoo's TRPO hyperparameters; the same seeds, initial",
        "weights and (for `train()`) the same filled rollout buffer for every algorithm. `train()` runs with",
        "identical values; `learn()` gives ours `target_kl` and `cg_damping` times the action dimension (Box",
        "actions; HalfCheetah: 0.04 -> 0.24 and 0.1 -> 0.6), the porting rule of the README: our KL is the joint",
        "one, sb3-contrib's a per-dimension average, and with these values both take the same step.",
        "",
        "## `train()` alone",
        "",
        "| case | batch | sb3-contrib (ms) | ours (ms) | speed-up | ours, Fisher on every 5th sample (ms) | speed-up "
        "| of which critic (ms) | speed-up bound |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in dict.fromkeys(r["case"] for r in train_rows):
        by = {r["algorithm"]: r for r in train_rows if r["case"] == case}
        ours, sub, contrib = by["ours"], by["ours-fisher/5"], by["sb3-contrib"]
        lines.append(
            f"| {case} | {ours['batch']} | {contrib['median_s'] * 1e3:.1f} | {ours['median_s'] * 1e3:.1f} "
            f"| {ours['speedup_vs_contrib']:.2f}x | {sub['median_s'] * 1e3:.1f} "
            f"| {sub['speedup_vs_contrib']:.2f}x | {sub['critic_median_s'] * 1e3:.1f} "
            f"| {contrib['median_s'] / sub['critic_median_s']:.1f}x |"
        )
    lines += [
        "",
        '"Of which critic": the critic regression\'s share of our `train()` with the subsampled Fisher (the same',
        'full-batch regression in both columns). "Speed-up bound": sb3-contrib\'s `train()` over that share alone,',
        "the speed-up if everything else in the update took no time.",
        "",
        "## End-to-end `learn()`",
        "",
        "| env | sb3-contrib (steps/s) | ours (steps/s) | speed-up | raw env (steps/s) | ours, % of raw env "
        "| final return, sb3-contrib | final return, ours |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in learn_summary:
        lines.append(
            f"| {s['env']} | {s['contrib']:.0f} | {s['ours']:.0f} | {s['ratio']:.2f}x | {s['raw']:.0f} | "
            f"{100 * s['ours'] / s['raw']:.1f}% | {s['contrib_return']:.1f} ± {s['contrib_return_std']:.1f} | "
            f"{s['ours_return']:.1f} ± {s['ours_return_std']:.1f} |"
        )
    lines += [
        "",
        "Final return: deterministic policy, 10 episodes on a separate environment (frozen `VecNormalize`",
        "statistics), mean ± std over the repeats' seeds, after the same budget for both algorithms.",
        "",
        "## Where our `learn()` spends its time",
        "",
        "| env | component | seconds | share |",
        "|---|---|---|---|",
    ]
    for r in profile_rows:
        lines.append(f"| {r['case']} | {r['component']} | {r['seconds']:.2f} | {100 * r['share']:.0f}% |")
    lines += [
        "",
        "## torch threads (ours)",
        "",
        "| case | 1 thread (s) | 2 threads (s) | 2 threads vs 1 |",
        "|---|---|---|---|",
    ]
    for case in dict.fromkeys(r["case"] for r in thread_rows):
        one, two = (next(r["median_s"] for r in thread_rows if r["case"] == case and r["threads"] == n) for n in (1, 2))
        lines.append(f"| {case} | {one:.3f} | {two:.3f} | {one / two:.2f}x |")
    lines += [
        "",
        "## The critic regression against its floor (HalfCheetah-v5, batch 2048)",
        "",
        "| critic regression | ms | `train()` speed-up bound, critic alone | with the rest of our `train()` (Fisher/5) |",
        "|---|---|---|---|",
    ]
    for r in floor_rows:
        bounds = f"{r['bound_critic_only']:.1f}x | {r['bound_with_rest']:.1f}x"
        lines.append(f"| {r['variant']} | {r['median_s'] * 1e3:.1f} | {bounds} |")
    lines += [
        "",
        "20 epochs of 16 minibatches, timed outside `train()` on random inputs, NumPy's BLAS on one thread like",
        "torch. Ours runs as one compiled loop, feature-major (`sb3_trpo_ext/common/kernels.py`). The TorchScript and",
        "torch.compile rows run the arithmetic of the batch-major torch loop that the package used before its NumPy",
        "and compiled loops: the first with no Python between",
        "the operations (plus three small copies that write Adam's update back), the second as one compiled",
        "function per epoch with its element-wise work (tanh and its derivative, bias sums, Adam) fused into",
        "generated C++ loops; compiling is not timed. Both are measuring devices, not shipped; one epoch of each is",
        "checked against ours before timing. The last two rows run only the matrix products of each step, of that",
        "torch loop and of ours (in our layout, through NumPy). The last column adds the rest of our `train()` with",
        "the Fisher on every 5th",
        "sample, as measured in the first table.",
        "",
        "![speed](speed.png)",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=int, default=40_960, help="learn() steps per run")
    parser.add_argument("--quick", action="store_true", help="tiny budgets, for checking the script")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.budget = 1, 4096
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    train_rows: list[dict] = []
    for env_id in ZOO:
        print(f"train() {env_id}", flush=True)
        train_rows += train_alone(env_id, args.repeats)
    train_rows += train_alone("HalfCheetah-v5", args.repeats, n_steps=4096, label="HalfCheetah-v5, batch 8192")

    raw = {env_id: raw_env_speed(env_id, 5_000 if args.quick else 20_000) for env_id in ZOO}
    learn_rows: list[dict] = []
    for env_id in ZOO:
        learn_rows += learn_speed(env_id, range(args.repeats), args.budget)
    learn_summary = summarise_learn(learn_rows, raw)
    profile_rows: list[dict] = []
    for env_id in ZOO:
        profile_rows += profile(env_id, args.budget)
    thread_rows = thread_scaling(args.repeats, args.budget)
    floor_rows = critic_floor(args.repeats, train_rows)

    elapsed = time.perf_counter() - started
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    write_csv(train_rows, args.out / "speed_train.csv")
    write_csv(learn_rows, args.out / "speed_learn.csv")
    write_csv(profile_rows, args.out / "speed_profile.csv")
    write_csv(thread_rows, args.out / "speed_threads.csv")
    write_csv(floor_rows, args.out / "speed_critic_floor.csv")
    plot(train_rows, learn_summary, args.out / "speed.png")
    write_markdown(command, train_rows, learn_summary, profile_rows, thread_rows, floor_rows, elapsed, args.out / "speed.md")
    print((args.out / "speed.md").read_text())


if __name__ == "__main__":
    main()
