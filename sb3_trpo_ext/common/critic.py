"""
The critic regression without per-minibatch overhead.

The critic takes hundreds of small Adam steps per update (RL Zoo's MuJoCo settings: 20 epochs of 16 minibatches).
Through ``nn.Module`` calls, autograd and ``Optimizer.step`` each step costs several times its arithmetic. For the
standard critic, a chain of ``nn.Linear`` layers with elementwise activations (:class:`LinearChain`),
:func:`regress_mlp` runs the same computation by hand on one flat parameter vector: the forward pass, the backward
pass of the mean squared error and Adam as ``torch.optim.Adam`` defines it, on the same shuffled minibatches. For
float32 and float64 CPU tensors the whole regression is one call of a compiled loop
(:func:`sb3_trpo_ext.common.kernels.regress_chain`); elsewhere it runs as array-library calls
(:class:`BoundChain`). The optimizer's own state is read before and written back after, so saving, loading and the
autograd path stay interchangeable.
"""

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch as th

from sb3_trpo_ext.common import kernels
from sb3_trpo_ext.common.mlp import (
    Array,
    BoundChain,
    CompiledChain,
    LinearChain,
    array_module,
    array_view,
    empty_like_array,
    with_ones_row,
)
from sb3_trpo_ext.common.trust_region import flat_concat, set_flat_params


@dataclass
class AdamSettings:
    """The hyperparameters of ``torch.optim.Adam`` that :func:`regress_mlp` implements."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float

    @classmethod
    def of(cls, optimizer: th.optim.Optimizer) -> "AdamSettings | None":
        """
        The settings of a plain single-group ``Adam``; ``None`` for any other optimizer or an Adam variant
        (AMSGrad, maximize, ...) this module does not implement.

        :param optimizer: The critic's optimizer
        :return: Its settings, or ``None``
        """
        if type(optimizer) is not th.optim.Adam or len(optimizer.param_groups) != 1:
            return None
        group = optimizer.param_groups[0]
        if group.get("amsgrad") or group.get("maximize") or group.get("differentiable") or group.get("capturable"):
            return None
        beta1, beta2 = group["betas"]
        return cls(float(group["lr"]), float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]))


class FlatAdamState:
    """
    ``Adam``'s moments for a list of parameters as flat vectors, loaded from and stored into the optimizer.

    :param optimizer: The optimizer holding ``params``
    :param params: Parameters, in the order of the flat vectors
    """

    def __init__(self, optimizer: th.optim.Optimizer, params: Sequence[th.Tensor]):
        self.optimizer, self.params = optimizer, list(params)
        states = [optimizer.state.get(p, {}) for p in self.params]
        if all(s.get("exp_avg") is not None for s in states):
            self.exp_avg = th.cat([s["exp_avg"].reshape(-1) for s in states])
            self.exp_avg_sq = th.cat([s["exp_avg_sq"].reshape(-1) for s in states])
            steps = {float(s["step"]) for s in states}
            # The autograd path steps all critic parameters together, so their counters agree.
            self.step = int(steps.pop()) if len(steps) == 1 else None
        else:
            self.exp_avg = th.cat([th.zeros_like(p).reshape(-1) for p in self.params])
            self.exp_avg_sq = th.zeros_like(self.exp_avg)
            self.step = 0 if not any(states) else None

    def store(self) -> None:
        """Write the moments and the step counter back into the optimizer's per-parameter state."""
        offset = 0
        for p in self.params:
            n = p.numel()
            old_step = self.optimizer.state.get(p, {}).get("step")
            step = th.tensor(float(self.step or 0), dtype=th.float32, device=p.device)
            if isinstance(old_step, th.Tensor):
                step = step.to(dtype=old_step.dtype, device=old_step.device)
            self.optimizer.state[p] = {
                "step": step,
                "exp_avg": self.exp_avg[offset : offset + n].view_as(p).clone(),
                "exp_avg_sq": self.exp_avg_sq[offset : offset + n].view_as(p).clone(),
            }
            offset += n


@functools.cache
def _fused_adam_available(dtype: th.dtype) -> bool:
    # torch's single-kernel Adam runs on the CPU since torch 2.4; older versions raise for CPU tensors.
    try:
        one = [th.zeros(1, dtype=dtype)]
        th._fused_adam_(  # type: ignore[attr-defined]
            one, [th.ones(1, dtype=dtype)], [th.zeros(1, dtype=dtype)], [th.zeros(1, dtype=dtype)], [], [th.zeros(())],
            amsgrad=False, lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, maximize=False,
        )  # fmt: skip
        return True
    except (AttributeError, NotImplementedError, RuntimeError):
        return False


def adam_steps(
    param: th.Tensor,
    grad: th.Tensor,
    exp_avg: th.Tensor,
    exp_avg_sq: th.Tensor,
    steps_taken: int,
    settings: AdamSettings,
) -> Callable[[], None]:
    """
    Adam steps in place, one per call of the returned function, with ``torch.optim.Adam``'s formulas
    (bias-corrected moments, ``eps`` added after the square root, L2 ``weight_decay`` added to the gradient).

    :param param: Flat parameters
    :param grad: Their gradient (read at each call)
    :param exp_avg: First moment
    :param exp_avg_sq: Second moment
    :param steps_taken: Number of steps taken before the first call
    :param settings: Hyperparameters
    :return: The step function
    """
    counts = itertools.count(steps_taken + 1)  # torch.optim.Adam counts a step before taking it
    if param.device.type == "cpu" and _fused_adam_available(param.dtype):
        # One kernel instead of six, its arguments bound once: the difference is most of a step's cost at the
        # critic's sizes.
        fused = functools.partial(
            th._fused_adam_,  # type: ignore[attr-defined]
            [param], [grad], [exp_avg], [exp_avg_sq], [], amsgrad=False, lr=settings.lr, beta1=settings.beta1,
            beta2=settings.beta2, weight_decay=settings.weight_decay, eps=settings.eps, maximize=False,
        )  # fmt: skip
        return lambda: fused([th.tensor(float(next(counts)))])

    def step() -> None:
        n = next(counts)
        gradient = grad if settings.weight_decay == 0.0 else grad.add(param, alpha=settings.weight_decay)
        exp_avg.lerp_(gradient, 1 - settings.beta1)
        exp_avg_sq.mul_(settings.beta2).addcmul_(gradient, gradient, value=1 - settings.beta2)
        # lr / c1 * m / (sqrt(v) / sqrt(c2) + eps), with both bias corrections moved into scalars (one tensor op less)
        sqrt_c2 = math.sqrt(1 - settings.beta2**n)
        denominator = exp_avg_sq.sqrt().add_(settings.eps * sqrt_c2)
        param.addcdiv_(exp_avg, denominator, value=-settings.lr * sqrt_c2 / (1 - settings.beta1**n))

    return step


def regress_mlp(
    chain: LinearChain,
    inputs: th.Tensor,
    targets: th.Tensor,
    optimizer: th.optim.Optimizer,
    n_epochs: int,
    batch_size: int,
) -> float | None:
    """
    Minimise ``mean((chain(inputs) - targets)^2)`` with Adam on shuffled minibatches, by hand: the same result as
    ``n_epochs`` of ``th.randperm(...).split(batch_size)`` minibatches through autograd and ``optimizer.step()``
    (to float rounding), on the same random numbers.

    :param chain: The critic; its last layer has one output
    :param inputs: Inputs of the chain, shape (n, in_features)
    :param targets: Regression targets, shape (n,)
    :param optimizer: The ``Adam`` holding exactly the chain's parameters (its state is used and updated)
    :param n_epochs: Passes over the data
    :param batch_size: Minibatch size
    :return: Mean loss over the minibatches (``nan`` if there were none), or ``None`` when the optimizer is not a
        plain Adam over these parameters or its learning rate is out of the parameters' float range (nothing was
        changed then)
    """
    settings = AdamSettings.of(optimizer)
    params = chain.parameters
    if settings is None or {id(p) for p in optimizer.param_groups[0]["params"]} != {id(p) for p in params}:
        return None
    # Adam's step-size scalar is at most lr / (1 - beta1); past the parameters' float range the in-place update
    # cannot take it (torch's fused Adam, computing in double, can), so leave such settings to the optimizer.
    if settings.lr / (1 - settings.beta1) > th.finfo(params[0].dtype).max:
        return None
    adam = FlatAdamState(optimizer, params)
    if adam.step is None:
        return None

    with th.no_grad():
        # Everything in the chain's augmented layout; Adam acts elementwise, so the order of the entries is free.
        order = chain.augmented_order().to(params[0].device)
        flat, exp_avg, exp_avg_sq = flat_concat(params)[order], adam.exp_avg[order], adam.exp_avg_sq[order]
        n = len(targets)
        errors = th.empty(n_epochs, n, dtype=flat.dtype, device=flat.device)  # the loss is only reported
        # Drawn up front: the same random numbers, in the same order, as one randperm per epoch in the loop.
        permutations = [th.randperm(n, device=targets.device) for _ in range(n_epochs)]
        if CompiledChain.runs_on(flat):
            kernels.regress_chain(
                kernels.gemm_for(array_view(flat).dtype), array_view(flat), array_view(exp_avg), array_view(exp_avg_sq),
                np.array(chain.shapes, dtype=np.int64), chain.activation_codes,
                array_view(inputs.to(flat.dtype).contiguous()), array_view(targets.to(flat.dtype).contiguous()),
                array_view(th.stack(permutations) if permutations else th.empty(0, n, dtype=th.int64)), batch_size,
                settings.lr, settings.beta1, settings.beta2, settings.eps, settings.weight_decay, adam.step,
                array_view(errors),
            )  # fmt: skip
        else:
            _regress_by_array_calls(chain, flat, exp_avg, exp_avg_sq, inputs, targets, permutations, batch_size,
                                    settings, adam.step, errors)  # fmt: skip
        adam.exp_avg[order], adam.exp_avg_sq[order] = exp_avg, exp_avg_sq
        adam.step += n_epochs * math.ceil(n / batch_size)
        adam.store()
        params_flat = th.empty_like(flat)
        params_flat[order] = flat
        set_flat_params(params, params_flat)
        if errors.numel() == 0:
            return float("nan")
        # mean over minibatches of each minibatch's mean squared error
        return th.cat([chunk.square().mean(dim=1) for chunk in errors.split(batch_size, dim=1)]).mean().item()


def _regress_by_array_calls(
    chain: LinearChain,
    flat: th.Tensor,
    exp_avg: th.Tensor,
    exp_avg_sq: th.Tensor,
    inputs: th.Tensor,
    targets: th.Tensor,
    permutations: list[th.Tensor],
    batch_size: int,
    settings: AdamSettings,
    steps_taken: int,
    errors: th.Tensor,
) -> None:
    """
    :func:`regress_mlp`'s loop as array-library calls (:class:`BoundChain` and :func:`adam_steps`), for devices
    and dtypes :func:`sb3_trpo_ext.common.kernels.regress_chain` does not run on. Arguments as that function's, in
    the chain's augmented layout; ``permutations`` holds one sample order per epoch.
    """
    grad = th.empty_like(flat)
    gradient = array_view(grad)
    n = len(targets)
    features = with_ones_row(inputs.to(flat.dtype))
    error_rows = array_view(errors)
    xp = array_module(gradient)
    bound: dict[int, tuple[BoundChain | CompiledChain, Array]] = {}  # per minibatch size: the chain, the upstream derivative
    adam_step = adam_steps(flat, grad, exp_avg, exp_avg_sq, steps_taken, settings)
    for epoch, permutation in enumerate(permutations):
        # One gather per epoch, then contiguous column ranges: the same rows as indexing every minibatch.
        x = array_view(th.index_select(features, 1, permutation))  # a fifth of the time of features[:, permutation]
        y = array_view(targets[permutation].to(flat.dtype))
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            if stop - start not in bound:
                bound[stop - start] = (chain.bind(flat, stop - start), empty_like_array(gradient, (1, stop - start)))
            minibatch_chain, upstream = bound[stop - start]
            error = error_rows[epoch, start:stop]
            xp.subtract(minibatch_chain.forward(x[:, start:stop])[0], y[start:stop], out=error)
            xp.multiply(error, 2 / (stop - start), out=upstream[0])  # derivative of the mean squared error
            minibatch_chain.vjp(upstream, gradient)
            adam_step()
