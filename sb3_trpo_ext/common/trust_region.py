"""
The trust-region policy step, as small pure pieces plus one orchestration.

Notation: ``theta`` are the actor parameters, ``g`` the gradient of the surrogate objective, ``F`` the Fisher
information of the *joint* action distribution averaged over states (= Hessian of the mean KL(old||new) at
``theta_old``), ``A = F + damping * I`` the matrix conjugate gradient solves with.

Every algorithm variant (feed-forward, recurrent, maskable) calls :func:`trust_region_update`; only the
closures that evaluate the action distribution differ between them.
"""

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch as th
from sb3_contrib.common.maskable.distributions import (
    MaskableBernoulliDistribution,
    MaskableCategoricalDistribution,
    MaskableMultiCategoricalDistribution,
)
from stable_baselines3.common.distributions import (
    BernoulliDistribution,
    CategoricalDistribution,
    DiagGaussianDistribution,
    Distribution,
    MultiCategoricalDistribution,
    kl_divergence,
)
from torch import nn

from sb3_trpo_ext.common.mlp import LinearChain, array_module, array_view, empty_like_array, with_ones_row

# --------------------------------------------------------------------------------------------------------------
# Flat-parameter helpers
# --------------------------------------------------------------------------------------------------------------


def flat_concat(tensors: Sequence[th.Tensor]) -> th.Tensor:
    """
    Concatenate tensors into one flat vector (a copy, detached from any graph).

    :param tensors: Tensors of arbitrary shapes
    :return: 1-D tensor holding all elements in order
    """
    return th.cat([t.detach().reshape(-1) for t in tensors])


def flat_grad(output: th.Tensor, params: Sequence[nn.Parameter], retain_graph: bool = False) -> th.Tensor:
    """
    Gradient of a scalar w.r.t. ``params`` as one flat vector; parameters the output does not depend on get zeros.

    :param output: Scalar tensor
    :param params: Parameters to differentiate with respect to
    :param retain_graph: Keep the graph for further differentiation
    :return: Flat gradient
    """
    return flatten_grads(th.autograd.grad(output, params, retain_graph=retain_graph, allow_unused=True), params)


def flatten_grads(grads: Sequence[th.Tensor | None], params: Sequence[th.Tensor]) -> th.Tensor:
    """
    Concatenate gradients into one flat vector, with zeros where autograd returned ``None`` (unused parameter).

    :param grads: Output of ``th.autograd.grad(..., allow_unused=True)``
    :param params: The parameters the gradients belong to
    :return: Flat gradient
    """
    return th.cat([(th.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params, strict=True)])


def unflatten_like(vector: th.Tensor, params: Sequence[th.Tensor]) -> list[th.Tensor]:
    """
    Split a flat vector into views shaped like ``params``.

    :param vector: Flat vector with as many elements as ``params`` together
    :param params: Reference tensors
    :return: One view of ``vector`` per parameter
    """
    sizes = [p.numel() for p in params]
    return [chunk.view_as(p) for chunk, p in zip(th.split(vector, sizes), params, strict=True)]


@th.no_grad()
def set_flat_params(params: Sequence[th.Tensor], vector: th.Tensor) -> None:
    """
    Write a flat vector into the parameters in place (storage is kept, so optimizers keep working).

    :param params: Parameters to overwrite
    :param vector: Flat vector, e.g. from :func:`flat_concat`
    """
    for p, value in zip(params, unflatten_like(vector, params), strict=True):
        p.copy_(value)


# --------------------------------------------------------------------------------------------------------------
# Conjugate gradient
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ConjugateGradientResult:
    """Solution of ``A x = b``, its product ``A x`` and how far CG got."""

    x: th.Tensor
    n_steps: int
    relative_residual: float
    # A x as ``b - r`` with CG's running residual r: equal to the product in exact arithmetic (measured within 2e-6
    # relative for x^T A x on a MuJoCo policy in float32), and one product fewer than computing it again.
    product: th.Tensor


def conjugate_gradient(
    matrix_vector_product: Callable[[th.Tensor], th.Tensor],
    b: th.Tensor,
    max_steps: int,
    residual_tol: float = 1e-10,
) -> ConjugateGradientResult:
    """
    Solve ``A x = b`` for a symmetric positive-definite ``A`` given only ``v -> A v``.

    Starts from ``x = 0`` (so the first iterate is the steepest-ascent direction) and stops after ``max_steps``
    products or once ``||b - A x|| <= residual_tol * ||b||``.

    :param matrix_vector_product: Function computing ``A v``
    :param b: Right-hand side
    :param max_steps: Maximum number of matrix-vector products
    :param residual_tol: Relative residual at which to stop early
    :return: The solution, the number of products used and the final relative residual
    """
    x = th.zeros_like(b)
    r = b.clone()
    p = b.clone()
    r_dot_r = th.dot(r, r)
    b_norm = math.sqrt(r_dot_r.item())
    if b_norm == 0.0:
        return ConjugateGradientResult(x, 0, 0.0, th.zeros_like(b))
    n_steps = 0
    while n_steps < max_steps:
        n_steps += 1
        a_p = matrix_vector_product(p)
        p_a_p = th.dot(p, a_p)
        alpha = r_dot_r / p_a_p
        x += alpha * p
        r -= alpha * a_p
        new_r_dot_r = th.dot(r, r)
        if not math.isfinite(new_r_dot_r.item()) or math.sqrt(new_r_dot_r.item()) <= residual_tol * b_norm:
            r_dot_r = new_r_dot_r
            break
        p = r + (new_r_dot_r / r_dot_r) * p
        r_dot_r = new_r_dot_r
    return ConjugateGradientResult(x, n_steps, math.sqrt(r_dot_r.item()) / b_norm, b - r)


# --------------------------------------------------------------------------------------------------------------
# KL divergence and Fisher information of SB3 distributions
# --------------------------------------------------------------------------------------------------------------


def categorical_blocks(distribution: Distribution) -> list[th.distributions.Categorical] | None:
    """
    The independent categorical factors of a categorical-like distribution, ``None`` for any other.

    sb3-contrib's maskable distributions are included: masking only replaces the logits of invalid outcomes by a
    large negative number, so they are ordinary categoricals whose masked outcomes have (numerically) zero
    probability. ``MaskableBernoulliDistribution`` is a ``MaskableMultiCategoricalDistribution`` of 2-way factors.

    :param distribution: An SB3 or sb3-contrib distribution after ``proba_distribution``
    :return: One ``torch`` categorical per action dimension
    """
    if isinstance(distribution, MultiCategoricalDistribution):
        return list(distribution.distribution)
    if isinstance(distribution, MaskableMultiCategoricalDistribution):
        return list(distribution.distributions)
    if isinstance(distribution, (CategoricalDistribution, MaskableCategoricalDistribution)):
        return [distribution.distribution]
    return None


def joint_kl(old: Distribution, new: Distribution) -> th.Tensor:
    """
    KL(old || new) of the joint action distribution, one value per state.

    SB3's ``kl_divergence`` returns one value per action dimension for factorised distributions (Gaussian,
    Bernoulli); the joint KL of independent dimensions is their sum.

    :param old: Distribution the data was collected with
    :param new: Distribution being evaluated
    :return: Tensor of shape (batch,)
    """
    old_blocks = categorical_blocks(old)
    if old_blocks is not None:
        # SB3's kl_divergence does not know sb3-contrib's maskable distributions; the categorical KL does, and masked
        # outcomes (probability 0 under both distributions, the masks being the same) contribute nothing to it.
        new_blocks = categorical_blocks(new)
        assert new_blocks is not None and len(new_blocks) == len(old_blocks)
        return sum(th.distributions.kl_divergence(p, q) for p, q in zip(old_blocks, new_blocks, strict=True))  # type: ignore[return-value]
    kl = kl_divergence(old, new)
    return kl.sum(dim=tuple(range(1, kl.dim()))) if kl.dim() > 1 else kl


def detached_copy(distribution: Distribution) -> Distribution:
    """
    Freeze a distribution: a shallow copy that survives the policy re-populating its ``action_dist``.

    SB3 policies reuse one ``Distribution`` object and *re-assign* its attributes on every forward pass, so
    a shallow copy keeps the old values. A distribution computed with gradients shares its graph with the copy:
    read such a copy under ``th.no_grad()`` only, or it is differentiated too.

    :param distribution: Distribution to copy
    :return: The copy
    """
    return copy.copy(distribution)


# A "metric" maps tangents of the distribution statistics to M @ tangent, where M is the Fisher information of
# the joint action distribution in those statistics' coordinates.
Metric = Callable[[Sequence[th.Tensor]], list[th.Tensor]]


def distribution_statistics(distribution: Distribution) -> list[th.Tensor] | None:
    """
    The tensors that fully determine an SB3 distribution and for which the Fisher metric is known in closed form.

    Gaussian-based distributions (``DiagGaussian``, gSDE, squashed variants; the tanh bijection leaves the KL
    unchanged) are described by their mean and standard deviation, categorical-like ones (sb3-contrib's maskable
    distributions included) by their logits.

    :param distribution: An SB3 distribution after ``proba_distribution``
    :return: The statistics, or ``None`` when no analytic Fisher metric is available
    """
    blocks = categorical_blocks(distribution)
    if blocks is not None:
        return [block.logits for block in blocks]
    if isinstance(distribution, BernoulliDistribution):
        return [distribution.distribution.logits]
    inner = getattr(distribution, "distribution", None)
    if type(inner) is th.distributions.Normal:
        return [inner.mean, inner.stddev]
    return None


def fisher_metric(distribution: Distribution, statistics: Sequence[th.Tensor]) -> Metric:
    """
    Closed-form Fisher metric for :func:`distribution_statistics`, averaged over the batch.

    - Normal(mu, sigma), per dimension: ``diag(1 / sigma^2, 2 / sigma^2)``
    - Categorical(logits): ``diag(p) - p p^T``, per categorical block (sb3-contrib's maskable ones included)
    - Bernoulli(logits): ``p (1 - p)``, per dimension

    :param distribution: The distribution the statistics came from (selects the formula)
    :param statistics: Detached statistics at the old parameters
    :return: Function mapping statistic tangents to ``M @ tangent / batch_size``
    """
    batch_size = statistics[0].shape[0]
    if categorical_blocks(distribution) is not None:
        # With action masks, masked outcomes have p = 0: their rows and columns of the metric vanish, which is the
        # exact Fisher of the masked distribution (their logits are constants, not functions of the parameters).
        probs = [th.softmax(logits, dim=-1) for logits in statistics]

        def categorical_metric(tangents: Sequence[th.Tensor]) -> list[th.Tensor]:
            return [p * (u - (p * u).sum(dim=-1, keepdim=True)) / batch_size for p, u in zip(probs, tangents, strict=True)]

        return categorical_metric
    if isinstance(distribution, BernoulliDistribution):
        p = th.sigmoid(statistics[0])
        weight = p * (1 - p) / batch_size
        return lambda tangents: [weight * tangents[0]]
    inv_var = statistics[1].pow(-2) / batch_size
    return lambda tangents: [inv_var * tangents[0], 2 * inv_var * tangents[1]]


def analytic_fisher_vector_product(
    params: Sequence[nn.Parameter],
    distribution_fn: Callable[[], Distribution],
) -> Callable[[th.Tensor], th.Tensor] | None:
    """
    Build ``v -> F v`` as ``J^T M J v``, with ``J`` the Jacobian of the distribution statistics w.r.t. ``params``
    and ``M`` the closed-form Fisher metric (:func:`fisher_metric`). The KL is never differentiated.

    ``J^T u`` is built once, with its graph, for a placeholder ``u``; being linear in ``u``, its derivative in the
    direction ``v`` is ``J v`` (the "double-vjp" trick). Each product is then two backward passes through graphs
    kept across calls, with no forward pass: measured faster than forward-mode AD on SB3's MLPs, whose
    forward-mode ``linear`` cost about four primal passes.

    :param params: Parameters to differentiate with respect to
    :param distribution_fn: Evaluates the action distribution on the Fisher batch
    :return: The product function, or ``None`` if the distribution has no analytic metric
    """
    distribution = distribution_fn()
    statistics = distribution_statistics(distribution)
    if statistics is None:
        return None
    metric = fisher_metric(distribution, [s.detach() for s in statistics])
    placeholders = [th.zeros_like(s, requires_grad=True) for s in statistics]
    transposed = th.autograd.grad(statistics, params, placeholders, create_graph=True, allow_unused=True)
    # Parameters the statistics do not depend on contribute nothing to J v.
    used = [i for i, g in enumerate(transposed) if g is not None]

    def fisher_vector_product(vector: th.Tensor) -> th.Tensor:
        tangents = unflatten_like(vector, params)
        jv = th.autograd.grad(
            [transposed[i] for i in used], placeholders, [tangents[i] for i in used], retain_graph=True, allow_unused=True
        )
        jv_full = [th.zeros_like(s) if j is None else j for j, s in zip(jv, statistics, strict=True)]
        weighted = metric(jv_full)
        return flatten_grads(th.autograd.grad(statistics, params, weighted, retain_graph=True, allow_unused=True), params)

    return fisher_vector_product


# Categorical-like distributions whose logits can be the output of an actor chain. The maskable ones overwrite
# the logits of masked outcomes by a constant, so those outcomes have probability 0 and drop out of the metric.
CHAIN_CATEGORICALS = (
    CategoricalDistribution,
    MultiCategoricalDistribution,
    MaskableCategoricalDistribution,
    MaskableMultiCategoricalDistribution,
    MaskableBernoulliDistribution,
)


def matching_log_probabilities(logits: th.Tensor, block: th.distributions.Categorical) -> tuple[th.Tensor, th.Tensor]:
    """
    The log-probabilities that ``logits`` and one categorical factor of a distribution give to the factor's
    possible outcomes (those its action mask allows; all when it has none), zero elsewhere: equal when the factor
    was computed from these logits.

    :param logits: Raw logits, shape (batch, n)
    :param block: The factor (torch keeps its logits normalised, with masked ones replaced)
    :return: The two tensors to compare
    """
    masks = getattr(block, "masks", None)
    if masks is None:
        return logits.log_softmax(-1), block.logits.log_softmax(-1)
    masks = masks.to(dtype=th.bool).reshape(logits.shape)
    ours = logits.masked_fill(~masks, -math.inf).log_softmax(-1)
    zero = th.zeros((), dtype=logits.dtype, device=logits.device)
    return th.where(masks, ours, zero), th.where(masks, block.logits.log_softmax(-1), zero)


def chain_fisher_vector_product(
    params: Sequence[nn.Parameter],
    chain: LinearChain,
    inputs: th.Tensor,
    distribution: Distribution,
    log_std: th.Tensor | None = None,
) -> Callable[[th.Tensor], th.Tensor] | None:
    """
    Build ``v -> F v`` as ``J^T M J v`` for an actor whose distribution head is a :class:`LinearChain` on fixed
    inputs: ``J v`` by the chain's forward-mode derivative, ``J^T u`` by its vector-Jacobian product, ``M`` the
    closed-form metric (:func:`fisher_metric`). The chain is evaluated once, here; each product is then a few
    matrix products into memory allocated once, with nothing recorded for autograd.

    Supported: categorical, multi-categorical and Bernoulli heads, masked or not (the chain outputs the logits), and
    the diagonal Gaussian with a state-independent ``log_std`` (the chain outputs the mean; ``std = exp(log_std)``,
    whose Fisher block is exactly ``2 I``: the metric ``2 / std^2`` of the standard deviation times
    ``(d std / d log_std)^2 = std^2``).

    :param params: Actor parameters, the order of the flat vectors: exactly the chain's (plus ``log_std``)
    :param chain: The actor's head, from its (parameter-free) features to the mean or the logits
    :param inputs: The chain's inputs on the Fisher batch
    :param distribution: The action distribution on that batch at the current parameters
    :param log_std: The Gaussian's log standard deviation parameter (ignored for the other distributions)
    :return: The product function, or ``None`` if the actor does not have this structure (checked on the values)
    """
    gaussian = type(distribution) is DiagGaussianDistribution
    bernoulli = type(distribution) is BernoulliDistribution
    if not (gaussian or bernoulli or type(distribution) in CHAIN_CATEGORICALS):
        return None
    if gaussian and log_std is None:
        return None
    covered = [*chain.parameters, *([log_std] if gaussian else [])]
    # Tied weights would need their gradients summed; leave them (and any other parameter set) to autograd.
    if len({id(p) for p in covered}) != len(covered) or {id(p) for p in covered} != {id(p) for p in params}:
        return None
    statistics = distribution_statistics(distribution)
    assert statistics is not None  # every distribution accepted above has them
    with th.no_grad():
        statistics = [s.detach() for s in statistics]
        # Where the chain's weights sit in the flat parameter vector, listed in the chain's augmented layout
        positions = unflatten_like(th.arange(sum(p.numel() for p in params), device=inputs.device), params)
        position = {id(p): where.reshape(-1) for p, where in zip(params, positions, strict=True)}
        index = th.cat([position[id(p)] for p in chain.parameters])[chain.augmented_order().to(inputs.device)]
        bound = chain.bind(flat_concat(params)[index], len(inputs))
        head = th.as_tensor(bound.forward(array_view(with_ones_row(inputs)))).T
        widths = [s.shape[-1] for s in statistics]
        if gaussian:
            assert log_std is not None
            std = log_std.detach().exp().expand_as(head)
            pairs = [(head, statistics[0]), (std, statistics[1])]
        elif bernoulli:
            pairs = [(head, statistics[0])]
        else:
            pairs = [
                matching_log_probabilities(b, block)
                for b, block in zip(head.split(widths, dim=1), categorical_blocks(distribution) or [], strict=False)
            ]
        if (not gaussian and head.shape[-1] != sum(widths)) or not all(
            a.shape == b.shape and th.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in pairs
        ):
            return None  # the policy does not compute its distribution the standard way
        # The product's buffers: the chain's part of the vector and its part of the result
        tangent, gradient = th.empty(len(index), dtype=head.dtype, device=head.device), th.empty_like(index, dtype=head.dtype)
        tangent_array, gradient_array = array_view(tangent), array_view(gradient)
        if gaussian:
            # the mean's metric, 1 / (std^2 batch), as a column: it multiplies the feature-major head tangent
            mean_metric = array_view(statistics[1][0].pow(-2).div(len(inputs)).reshape(-1, 1).to(head.dtype))
            upstream = empty_like_array(mean_metric, tuple(head.T.shape))
            where = position[id(log_std)]
            log_std_slice = slice(int(where[0]), int(where[-1]) + 1)  # one parameter: a contiguous range
        else:
            metric = fisher_metric(distribution, statistics)

    @th.no_grad()
    def fisher_vector_product(vector: th.Tensor) -> th.Tensor:
        th.index_select(vector, 0, index, out=tangent)
        head_tangent = bound.jvp(tangent_array)
        result = th.empty_like(vector)
        if gaussian:
            array_module(upstream).multiply(head_tangent, mean_metric, out=upstream)
            bound.vjp(upstream, gradient_array)
            th.mul(vector[log_std_slice], 2, out=result[log_std_slice])
        else:
            weighted = metric(list(th.as_tensor(head_tangent).T.split(widths, dim=1)))
            bound.vjp(array_view(th.cat(weighted, dim=1).T.contiguous()), gradient_array)
        return result.index_copy_(0, index, gradient)

    return fisher_vector_product


def kl_hessian_vector_product(
    params: Sequence[nn.Parameter],
    distribution_fn: Callable[[], Distribution],
) -> Callable[[th.Tensor], th.Tensor]:
    """
    Build ``v -> H v`` with ``H`` the Hessian of the mean joint KL(old||new) at the current parameters, by double
    backpropagation. Works for any distribution SB3's ``kl_divergence`` supports; the generic fallback.

    :param params: Parameters to differentiate with respect to
    :param distribution_fn: Evaluates the action distribution on the Fisher batch
    :return: The product function
    """
    with th.no_grad():
        old = detached_copy(distribution_fn())
    kl = joint_kl(old, distribution_fn()).mean()
    kl_grad = flatten_grads(th.autograd.grad(kl, params, create_graph=True, allow_unused=True), params)

    def hessian_vector_product(vector: th.Tensor) -> th.Tensor:
        return flat_grad(th.dot(kl_grad, vector), params, retain_graph=True)

    return hessian_vector_product


def fisher_vector_product(
    params: Sequence[nn.Parameter],
    distribution_fn: Callable[[], Distribution],
    damping: float = 0.0,
    product: Callable[[th.Tensor], th.Tensor] | None = None,
) -> Callable[[th.Tensor], th.Tensor]:
    """
    ``v -> (F + damping I) v``: ``product`` when given, else analytic where the distribution allows it, double
    backpropagation otherwise.

    :param params: Actor parameters
    :param distribution_fn: Evaluates the action distribution on the Fisher batch
    :param damping: Tikhonov damping added to the Fisher
    :param product: An undamped ``v -> F v`` the caller built for its actor (e.g. :func:`chain_fisher_vector_product`)
    :return: The (damped) product function
    """
    if product is None:
        product = analytic_fisher_vector_product(params, distribution_fn)
    if product is None:
        product = kl_hessian_vector_product(params, distribution_fn)
    if damping == 0.0:
        return product
    return lambda vector: product(vector) + damping * vector


# --------------------------------------------------------------------------------------------------------------
# Line search
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LineSearchResult:
    """Outcome of :func:`backtracking_line_search`."""

    success: bool
    n_backtracks: int
    step_fraction: float
    improvement: float
    kl: float


def backtracking_line_search(
    params: Sequence[nn.Parameter],
    full_step: th.Tensor,
    expected_improvement: float,
    evaluate: Callable[[], tuple[float, float]],
    max_kl: float,
    shrinking_factor: float,
    max_iter: int,
    accept_ratio: float,
) -> LineSearchResult:
    """
    Try ``theta_old + shrinking_factor^i * full_step`` for ``i = 0 .. max_iter - 1`` and keep the first candidate
    whose objective is finite, whose improvement is at least ``accept_ratio`` times the first-order prediction
    (``shrinking_factor^i * expected_improvement``) and whose KL is at most ``max_kl``.
    If none qualifies, the old parameters are written back exactly.

    :param params: Parameters to move (left at the accepted candidate, or bit-identical to the start)
    :param full_step: Flat step at fraction 1
    :param expected_improvement: ``g^T full_step``
    :param evaluate: Returns ``(objective improvement, KL(old||new))`` at the parameters' current values
    :param max_kl: Trust-region radius
    :param shrinking_factor: Step fraction multiplier per backtrack, in (0, 1)
    :param max_iter: Number of candidates tried
    :param accept_ratio: Fraction of the predicted improvement required, in [0, 1)
    :return: What was accepted, or ``success=False``
    """
    old = flat_concat(params)
    fraction = 1.0
    for i in range(max_iter):
        set_flat_params(params, old + fraction * full_step)
        improvement, kl = evaluate()
        if (
            math.isfinite(improvement)
            and math.isfinite(kl)
            and kl <= max_kl
            and improvement > 0
            and improvement >= accept_ratio * fraction * expected_improvement
        ):
            return LineSearchResult(True, i, fraction, improvement, kl)
        fraction *= shrinking_factor
    set_flat_params(params, old)
    return LineSearchResult(False, max_iter, 0.0, 0.0, 0.0)


# --------------------------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TrustRegionConfig:
    """Hyperparameters of one trust-region step (see ``TRPO`` for their meaning)."""

    target_kl: float
    cg_max_steps: int
    cg_damping: float
    cg_residual_tol: float
    line_search_shrinking_factor: float
    line_search_max_iter: int
    line_search_accept_ratio: float


@dataclass
class TrustRegionStats:
    """What happened during one trust-region step, for logging."""

    objective: float
    improvement: float = 0.0
    kl: float = 0.0
    success: bool = False
    n_backtracks: int = 0
    cg_steps: int = 0
    cg_residual: float = float("nan")
    step_size: float = 0.0
    fault: str | None = None
    entropy: float = float("nan")  # mean entropy of the policy the step leaves (nan: not available)


def trust_region_update(
    params: Sequence[nn.Parameter],
    objective_fn: Callable[[Distribution], th.Tensor],
    distribution_fn: Callable[[], Distribution],
    fisher_distribution_fn: Callable[[], Distribution],
    config: TrustRegionConfig,
    fisher_product_fn: Callable[[], Callable[[th.Tensor], th.Tensor] | None] | None = None,
) -> TrustRegionStats:
    """
    One natural-gradient step with a KL trust region. Numerical faults skip the step and leave ``params``
    bit-identical; ``TrustRegionStats.fault`` then says why.

    :param params: Actor parameters (everything that influences the action distribution)
    :param objective_fn: Surrogate objective to maximise, given the distribution on the policy batch
    :param distribution_fn: Action distribution on the policy batch at the current parameters
    :param fisher_distribution_fn: Action distribution on the (possibly subsampled) Fisher batch
    :param config: Step hyperparameters
    :param fisher_product_fn: Builds an undamped ``v -> F v`` on the Fisher batch at the current parameters, or
        returns ``None``; when absent or ``None``, :func:`fisher_vector_product` builds one from
        ``fisher_distribution_fn``
    :return: Statistics of the step
    """
    try:
        distribution = distribution_fn()
    except ValueError as error:
        # torch validates distribution parameters (e.g. a standard deviation that underflowed to 0).
        return TrustRegionStats(objective=float("nan"), fault=f"invalid action distribution: {str(error)[:120]}")
    # The old distribution is this one, frozen: one forward pass for both. Its tensors stay in the objective's
    # graph, but it is only read under no_grad (the line search's KL, the entropy), never differentiated.
    old_distribution = detached_copy(distribution)
    objective = objective_fn(distribution)
    old_objective = objective.item()
    stats = TrustRegionStats(objective=old_objective, entropy=mean_entropy(old_distribution))
    if not math.isfinite(old_objective):
        stats.fault = "non-finite surrogate objective"
        return stats
    gradient = flat_grad(objective, params)
    if not th.isfinite(gradient).all():
        stats.fault = "non-finite policy gradient"
        return stats

    product = None if fisher_product_fn is None else fisher_product_fn()
    fvp = fisher_vector_product(params, fisher_distribution_fn, config.cg_damping, product)
    cg = conjugate_gradient(fvp, gradient, config.cg_max_steps, config.cg_residual_tol)
    stats.cg_steps, stats.cg_residual = cg.n_steps, cg.relative_residual
    direction = cg.x
    if not th.isfinite(direction).all():
        stats.fault = "non-finite search direction"
        return stats
    curvature = th.dot(direction, cg.product).item()  # s^T (F + damping I) s
    if not (math.isfinite(curvature) and curvature > 0.0):
        stats.fault = f"non-positive or non-finite s^T F s ({curvature:.3g})"
        return stats

    full_step = math.sqrt(2.0 * config.target_kl / curvature) * direction
    expected_improvement = th.dot(gradient, full_step).item()

    last_candidate: Distribution | None = None  # an accepted candidate ends the search, so it is the last one

    def evaluate() -> tuple[float, float]:
        nonlocal last_candidate
        with th.no_grad():
            try:
                distribution = distribution_fn()
            except ValueError:  # the candidate makes the distribution invalid: reject it like a non-finite one
                return float("nan"), float("nan")
            last_candidate = distribution
            return objective_fn(distribution).item() - old_objective, joint_kl(old_distribution, distribution).mean().item()

    result = backtracking_line_search(
        params,
        full_step,
        expected_improvement,
        evaluate,
        max_kl=config.target_kl,
        shrinking_factor=config.line_search_shrinking_factor,
        max_iter=config.line_search_max_iter,
        accept_ratio=config.line_search_accept_ratio,
    )
    stats.success, stats.n_backtracks = result.success, result.n_backtracks
    if result.success:
        stats.objective = old_objective + result.improvement
        stats.improvement, stats.kl = result.improvement, result.kl
        stats.step_size = result.step_fraction * full_step.norm().item()
        assert last_candidate is not None  # a successful search evaluated at least one candidate
        stats.entropy = mean_entropy(last_candidate)
    return stats


def mean_entropy(distribution: Distribution) -> float:
    """Mean entropy over the batch; ``nan`` for distributions without a closed form (squashed Gaussians)."""
    with th.no_grad():
        entropy = distribution.entropy()
    return float("nan") if entropy is None else entropy.mean().item()
