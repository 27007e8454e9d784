"""Bayesian transfer learning: SWAG prior → Bayesian subset → any method → BMA sampler.

The scheme of Lim et al. (arXiv 2406.15664, §4):

1. a pre-trained network with weights w₀ (all parameters but the classifier ``head``);
2. a SWAG prior p(w) = N(w̄, ½(diag σ² + D Dᵀ/(K − 1))) over those weights, collected along SGD on
   the source data (:func:`fit_swag_prior`, a :class:`fpbma.LowRankGaussian`);
3. a Bayesian subset S chosen by a partition scheme of :mod:`fpbma.models.partition` (``"nl_ll"``:
   normalisation layers + head, the default; ``"last_layer"``; ``"full"``); every other weight is
   *frozen*: not trained, but still drawn from the prior's marginal at every forward pass and in BMA;
4. q initialised from the prior restricted to S — restricting the leaves of a LowRankGaussian gives its
   exact marginal, N(w̄_S, ½(diag σ_S² + D_S D_Sᵀ/(K − 1))) — except the *new* head, which gets mean 0,
   variance α (log σ = ½ log α) and zero low-rank columns;
5. training with any method of :mod:`fpbma.methods` (FP-BMA by default) on S, with the
   per-example loss E_q[ℓ(w_S, w_F)] + β KL(q_{S∖head} ‖ p_{S∖head}) / N (the head has no informative
   prior, so the KL covers S minus the head), w_F ~ p_F the frozen rest;
6. BMA with a sampler ``sample_weights(key)`` that draws w_S from the trained posterior (or its
   samples) and w_F from the prior and merges them.

How each method fits the scheme (:func:`make_problem` is the scheme as a problem; each method's
module of :mod:`fpbma.methods` says what it trains; :func:`make_trainer` looks the method up):

* ``fpbma``: q is the LowRankGaussian of step 4, trained by :func:`fpbma.fpbma` on the loss of step 5.
* ``moped``: q a DiagGaussian, q₀ and its prior from the prior mean (:func:`fpbma.baselines.moped_init`),
  head as in step 4; KL to the MOPED prior over S minus the head; Adam.
* ``sgd``, ``sam``, ``fsam``: a point estimate of w_S started at the prior mean (head 0); BMA varies
  only the frozen weights.
* ``bsam``: the bSAM mean started at the prior mean; the posterior is :func:`fpbma.baselines.bsam_posterior`.
* ``swag``, ``fswag``: SWAG collected over the second half of SGD/SAM on w_S → a LowRankGaussian over S.
* ``sgld`` (cyclical SGLD), ``emcmc``: Langevin on U(w_S) = N ℓ(w_S, w_F) − log p_{S∖head}(w_S∖head)
  (flat prior on the head), samples collected at the end of every cycle into a fixed buffer held in the
  state (E-MCMC keeps θ and the guide θ_a).
* ``laplace``: the SGD point estimate, then a last-layer Laplace (GGN, prior precision by marginal
  likelihood) over the head, with features taken at the trained subset and the prior mean of the frozen
  weights.

BatchNorm running statistics are kept from the source model and every forward pass (training and BMA)
runs in eval mode with them; :func:`fpbma.bma.make_batchnorm_refresh` can recompute them per sample
during BMA as an option.

Every train step is a pure function ``(state, batch, key) -> state`` over explicit pytrees
(:class:`TrainState`), so it can be jitted, checkpointed and resumed bit-identically.

References:
  Lim et al., "Flat Posterior Does Matter For Bayesian Model Averaging", arXiv:2406.15664, §4.
  Maddox et al., "A Simple Baseline for Bayesian Uncertainty in Deep Learning", NeurIPS 2019.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from fpbma import _trees, metrics
from fpbma import posterior as post
from fpbma.baselines._swag import swag_posterior
from fpbma.models import partition
from fpbma.types import HEAD, Problem, SubsetLaplace, Trainer, TrainState, sample_one

PyTree = Any

__all__ = [
    "HEAD", "TransferScheme", "TrainState", "Trainer", "SubsetLaplace",
    "fit_swag_prior", "swag_prior_trainer", "restrict", "make_scheme", "init_posterior", "init_point", "kl_to_prior",
    "log_prior", "sample_frozen", "frozen_mean", "full_params", "sample_subset", "sample_weights",
    "make_problem", "make_trainer", "head_features", "cross_entropy",
]


# Restricting pytrees and posteriors to a set of leaf paths (:mod:`fpbma._trees`).

restrict = _trees.restrict
_flat, _keep, _is_head, _split_head, _empty = (_trees.flat, _trees.keep, _trees.is_head, _trees.split_head,
                                              _trees.empty)


# ----------------------------------------------------------------------------------------------
# The SWAG prior.


def swag_prior_trainer(loss_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, *, num_steps: int,
                       learning_rate: float = 0.01, momentum: float = 0.9, rank: int = 5, collect_every: int = 10,
                       min_var: float = 1e-6, exclude_head: bool = True) -> Trainer:
    """The SWAG prior as a method's :class:`fpbma.types.Trainer`: the ``swag`` method from ``params``.

    Every step is θ ← SGD-momentum(θ, ∇ loss_fn(θ, batch)) at a constant rate; the models after steps
    c, 2c, … give the moments w̄, \\overline{w²} and the last K deviations (``swag`` with
    ``swa_start_fraction = 0``); ``finalize`` returns N(w̄, ½(diag max(σ², v_min) + D Dᵀ/(K − 1))),
    without the ``head`` when ``exclude_head``. The floor v_min keeps the prior precision bounded for
    coordinates that barely move (the KL and SGLD gradients scale with 1/σ²). Being a trainer, the prior
    fit runs in the same jitted, data-parallel, checkpointed loop as every other stage.

    Args:
      loss_fn: ``(params, batch) -> scalar`` source training loss.
      params: the pre-trained weights (``variables["params"]``).
      num_steps: the steps of the fit (≥ 2c, so at least two models are collected).
      learning_rate, momentum: SGD hyperparameters (a small constant rate, as SWAG's).
      rank: K ≥ 2.
      collect_every: c ≥ 1.
      min_var: v_min > 0.
      exclude_head: drop the source ``head`` from the prior (the target gets a new head).

    Returns:
      A :class:`fpbma.types.Trainer` whose ``finalize`` gives a :class:`fpbma.LowRankGaussian`.

    >>> import jax.numpy as jnp
    >>> loss = lambda p, batch: jnp.sum((p["w"] - batch) ** 2)
    >>> trainer = swag_prior_trainer(loss, {"w": jnp.zeros(2)}, num_steps=4, rank=2, collect_every=2,
    ...                              exclude_head=False)
    >>> state = trainer.init()
    >>> for t in range(4):
    ...     state = trainer.step(state, jnp.ones(2) * t, None)
    >>> trainer.finalize(state).mean["w"].shape
    (2,)
    """
    from fpbma import methods

    if int(num_steps) < 2 * int(collect_every):
        raise ValueError(f"num_steps={num_steps} collects fewer than 2 SWAG models with collect_every="
                         f"{collect_every}; use num_steps >= {2 * int(collect_every)}.")
    problem = methods.plain_problem(lambda p, batch, key: loss_fn(p, batch), params, num_data=1)
    base = methods.get("swag").trainer(problem, learning_rate=learning_rate, num_steps=int(num_steps),
                                       momentum=momentum, weight_decay=0.0, collect_every=int(collect_every),
                                       max_num_models=int(rank), swa_start_fraction=0.0)

    def finalize(state):
        q = swag_posterior(state.opt_state, min_var=min_var)
        if exclude_head:
            body, _ = _split_head(params)
            q = restrict(q, body)
        return q

    return Trainer(base.init, base.step, finalize)


def fit_swag_prior(loss_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, batches, *,
                   learning_rate: float = 0.01, momentum: float = 0.9, rank: int = 5, collect_every: int = 10,
                   min_var: float = 1e-6, exclude_head: bool = True, progress: Optional[Callable] = None):
    """A SWAG prior over pre-trained weights: :func:`swag_prior_trainer` run over ``batches``.

    Args:
      loss_fn: ``(params, batch) -> scalar`` source training loss.
      params: the pre-trained weights (``variables["params"]``).
      batches: a sized iterable of batches (e.g. a list); its length sets the number of steps (≥ 2c).
      learning_rate, momentum, rank, collect_every, min_var, exclude_head: as in :func:`swag_prior_trainer`.
      progress: optional callable ``(step) -> None`` called after every step (progress bars).

    Returns:
      A :class:`fpbma.LowRankGaussian` over ``params`` (without ``head`` if ``exclude_head``).
    """
    batches = list(batches)
    trainer = swag_prior_trainer(loss_fn, params, num_steps=len(batches), learning_rate=learning_rate,
                                 momentum=momentum, rank=rank, collect_every=collect_every, min_var=min_var,
                                 exclude_head=exclude_head)
    step = jax.jit(trainer.step)
    state, key = trainer.init(), jax.random.PRNGKey(0)
    for i, batch in enumerate(batches):
        state = step(state, batch, key)
        if progress is not None:
            progress(i)
    return trainer.finalize(state)


# ----------------------------------------------------------------------------------------------
# The scheme.


@flax.struct.dataclass
class TransferScheme:
    """The prior split by a partition scheme (a pytree; ``scheme`` and ``alpha`` are static).

    Attributes:
      prior: the SWAG prior over every non-head weight.
      kl_prior: the prior restricted to the Bayesian subset minus the head (``{}``-valued fields if empty).
      frozen_prior: the prior restricted to the frozen weights (empty for ``"full"``).
      head: zeros shaped like the new head (kernel, bias).
      scheme: ``"nl_ll"``, ``"last_layer"`` or ``"full"``.
      alpha: α, the initial variance of the new head.
    """

    prior: post.LowRankGaussian
    kl_prior: post.LowRankGaussian
    frozen_prior: post.LowRankGaussian
    head: PyTree
    scheme: str = flax.struct.field(pytree_node=False, default="nl_ll")
    alpha: float = flax.struct.field(pytree_node=False, default=1e-4)


def make_scheme(prior: post.LowRankGaussian, params_like: PyTree, scheme: str = "nl_ll",
                alpha: float = 1e-4, kl_min_var: Optional[float] = None) -> TransferScheme:
    """Splits ``prior`` into the Bayesian subset and the frozen rest of a target network.

    Args:
      prior: the SWAG prior over the non-head weights (:func:`fit_swag_prior`).
      params_like: the target network's ``params`` (only shapes matter; its ``head`` is the new head).
      scheme: partition scheme, one of :data:`fpbma.models.partition.SCHEMES`.
      alpha: α > 0, variance of the new head at initialisation.
      kl_min_var: optional floor v_min on the diagonal variances σ² of the prior over the trained subset
        (the KL term, the SGLD prior and q's initialisation use it). SWAG variances of a converged network
        can be ~1e-8, which makes the KL gradient Σ_p⁻¹(μ_q − μ_p)/N too stiff for a first-order optimizer
        (stable only while η·β·2/(v_min·N) ≲ 2(1 + momentum)); frozen weights are still drawn from the
        unfloored prior.

    Returns:
      A :class:`TransferScheme`.
    """
    if scheme not in partition.SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {partition.SCHEMES}.")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha={alpha!r} must be a positive finite number (the new head's variance).")
    body, head = _split_head(params_like)
    if _empty(head):
        raise ValueError("the target network has no 'head' module; the transfer scheme replaces the head.")
    prior_paths = set(_flat(prior.mean))
    body_paths = set(_flat(body))
    if prior_paths != body_paths:
        missing = sorted("/".join(p) for p in body_paths - prior_paths)[:5]
        extra = sorted("/".join(p) for p in prior_paths - body_paths)[:5]
        raise ValueError(f"the prior does not describe the target network's non-head weights: missing {missing}, "
                         f"unexpected {extra}. Fit the prior on the same architecture.")
    for path, (m, w) in {p: (_flat(prior.mean)[p], _flat(body)[p]) for p in body_paths}.items():
        if jnp.shape(m) != jnp.shape(w):
            raise ValueError(f"prior leaf {'/'.join(path)} has shape {jnp.shape(m)}, the network's {jnp.shape(w)}.")
    subset, rest = partition.split(params_like, scheme)
    subset_body, _ = _split_head(subset)
    zeros = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), head)
    kl_prior = restrict(prior, subset_body)
    if kl_min_var is not None:
        if not (isinstance(kl_min_var, (int, float)) and kl_min_var > 0):
            raise ValueError(f"kl_min_var={kl_min_var!r} must be a positive number or None.")
        floor = 0.5 * math.log(kl_min_var)
        kl_prior = kl_prior._replace(log_std=jax.tree.map(lambda x: jnp.maximum(x, floor), kl_prior.log_std))
    return TransferScheme(prior=prior, kl_prior=kl_prior, frozen_prior=restrict(prior, rest),
                          head=zeros, scheme=scheme, alpha=float(alpha))


def init_posterior(scheme: TransferScheme) -> post.LowRankGaussian:
    """q₀ over the subset: the prior's marginal on S∖head; the head N(0, α) with zero deviation columns."""
    kp = scheme.kl_prior
    rank = jax.tree_util.tree_leaves(scheme.prior.cov_factor)[0].shape[0]
    half_log_alpha = 0.5 * math.log(scheme.alpha)
    head = post.LowRankGaussian(
        mean=scheme.head,
        log_std=jax.tree.map(lambda z: jnp.full_like(z, half_log_alpha), scheme.head),
        cov_factor=jax.tree.map(lambda z: jnp.zeros((rank,) + z.shape, z.dtype), scheme.head))
    return post.LowRankGaussian(*[partition.merge(a, b) for a, b in zip(kp, head)])


def init_point(scheme: TransferScheme) -> PyTree:
    """The subset's starting point for point-estimate methods: the prior mean, the head at 0."""
    return init_posterior(scheme).mean


def kl_to_prior(scheme: TransferScheme, q) -> jax.Array:
    """KL(q_{S∖head} ‖ p_{S∖head}) — the head is excluded; 0 when the subset is the head only."""
    if _empty(scheme.kl_prior.mean):
        return jnp.zeros([], jnp.float32)
    return post.kl_divergence(restrict(q, scheme.kl_prior.mean), scheme.kl_prior)


def log_prior(scheme: TransferScheme, subset_weights: PyTree) -> jax.Array:
    """log p_{S∖head}(w_{S∖head}) (the head has a flat prior); 0 for a head-only subset."""
    if _empty(scheme.kl_prior.mean):
        return jnp.zeros([], jnp.float32)
    return post.log_prob(scheme.kl_prior, restrict(subset_weights, scheme.kl_prior.mean))


def sample_frozen(scheme: TransferScheme, key: jax.Array) -> PyTree:
    """w_F ~ p_F, the frozen weights drawn from the prior's marginal (``{}`` for the full scheme)."""
    if _empty(scheme.frozen_prior.mean):
        return {}
    return post.sample(scheme.frozen_prior, key)


def frozen_mean(scheme: TransferScheme) -> PyTree:
    """The prior mean of the frozen weights."""
    return scheme.frozen_prior.mean


def full_params(subset_weights: PyTree, frozen_weights: PyTree) -> dict:
    """The network's ``params`` from the subset and the frozen rest (:func:`fpbma.models.partition.merge`)."""
    return partition.merge(subset_weights, frozen_weights) if frozen_weights else dict(subset_weights)


def sample_subset(posterior, key: jax.Array) -> PyTree:
    """One draw of the subset weights from a trained method's result (:func:`fpbma.types.sample_one`).

    * DiagGaussian / LowRankGaussian: a sample;
    * :class:`fpbma.types.SampleSet` (MCMC samples, a point mass): a uniformly random stored sample;
    * :class:`fpbma.types.SubsetLaplace`: the point with the head drawn from the Laplace posterior.
    """
    return sample_one(posterior, key)


def _sample_variables(scheme, posterior, extra, key):
    k_subset, k_frozen = jax.random.split(key)
    return {**extra, "params": full_params(sample_subset(posterior, k_subset), sample_frozen(scheme, k_frozen))}


def _sample_variables_frozen_mean(scheme, posterior, extra, key):
    k_subset, _ = jax.random.split(key)
    return {**extra, "params": full_params(sample_subset(posterior, k_subset), frozen_mean(scheme))}


def sample_weights(scheme: TransferScheme, posterior, extra_variables: Optional[dict] = None,
                   sample_frozen_weights: bool = True) -> Partial:
    """``key -> variables``: w_S from ``posterior``, w_F ~ p_F, merged; for :func:`fpbma.bma.predict`.

    Args:
      scheme: the :class:`TransferScheme`.
      posterior: a trained method's result (see :func:`sample_subset`).
      extra_variables: other collections to pass to the model, e.g. ``{"batch_stats": ...}``.
      sample_frozen_weights: draw frozen weights from the prior (the scheme) or use its mean.

    Returns:
      A ``jax.tree_util.Partial`` (arrays travel as arguments, so BMA compiles once).
    """
    fn = _sample_variables if sample_frozen_weights else _sample_variables_frozen_mean
    return Partial(fn, scheme, posterior, dict(extra_variables or {}))


# ----------------------------------------------------------------------------------------------
# Training any method on the subset.


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy (1/B) Σᵢ −log softmax(logitsᵢ)_{yᵢ} (of :func:`fpbma.metrics.softmax_cross_entropy`).

    >>> round(float(cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]))), 6)  # log 4
    1.386294
    """
    return jnp.mean(metrics.softmax_cross_entropy(logits, labels))


def make_problem(scheme: TransferScheme, apply_fn: Callable[[dict, jax.Array], jax.Array], *, num_data: int,
                 sample_frozen_weights: bool = True, features_fn: Optional[Callable] = None,
                 train_data: Optional[tuple] = None) -> Problem:
    """The transfer scheme as a :class:`fpbma.types.Problem` any method of :mod:`fpbma.methods` trains on.

    * loss ℓ(w_S, batch, key) = cross-entropy of ``apply_fn(full_params(w_S, w_F), batch["image"])`` with
      ``batch["label"]``, w_F ~ p_F drawn from ``key`` (or the prior mean);
    * start: the prior mean with the head at 0 (:func:`init_point`); posterior start :func:`init_posterior`;
    * KL(q_{S∖head} ‖ p_{S∖head}) (:func:`kl_to_prior`) and log p_{S∖head} (:func:`log_prior`);
    * head features of the training set at w_S and the prior mean of the frozen weights (``features_fn``
      and ``train_data``, for last-layer Laplace).

    Args:
      scheme: the :class:`TransferScheme`.
      apply_fn: ``(params, images) -> logits`` (closes over BatchNorm statistics; eval mode).
      num_data: N, the training-set size.
      sample_frozen_weights: draw frozen weights from the prior at every step (the scheme) or use the mean.
      features_fn: ``(params, images) -> head inputs``, or None.
      train_data: ``(images, labels)`` of the whole training set, or None.

    Returns:
      A :class:`fpbma.types.Problem`.
    """

    def frozen_for(key):
        return sample_frozen(scheme, key) if sample_frozen_weights else frozen_mean(scheme)

    def loss(w_subset, batch, key):
        return cross_entropy(apply_fn(full_params(w_subset, frozen_for(key)), batch["image"]), batch["label"])

    features = labels = None
    if features_fn is not None and train_data is not None:
        features = lambda w: features_fn(full_params(w, frozen_mean(scheme)), train_data[0])  # noqa: E731
        labels = jnp.asarray(train_data[1])
    q0 = init_posterior(scheme)
    return Problem(loss=loss, init_params=q0.mean, num_data=int(num_data), init_posterior=q0,
                   kl=lambda q: kl_to_prior(scheme, q), log_prior=lambda w: log_prior(scheme, w),
                   features=features, labels=labels, head=HEAD, head_variance=scheme.alpha)


def make_trainer(method: str, scheme: TransferScheme, apply_fn: Callable[[dict, jax.Array], jax.Array], *,
                 num_data: int, num_steps: int, learning_rate: float, kl_weight: float = 1.0,
                 sample_frozen_weights: bool = True, features_fn: Optional[Callable] = None,
                 train_data: Optional[tuple] = None, hyperparameters: Optional[dict] = None,
                 schedule: str = "constant", warmup_steps: int = 0) -> Trainer:
    """A :class:`fpbma.types.Trainer` for a registered method (:func:`fpbma.methods.names`) on the scheme.

    ``fpbma.methods.get(method).trainer(make_problem(...), ...)``: the method owns its objective and
    defaults; ``hyperparameters`` overrides them by name (an unknown name raises, naming the valid ones).

    Args:
      method: a name of :func:`fpbma.methods.names`.
      scheme: the :class:`TransferScheme`.
      apply_fn: ``(params, images) -> logits`` (closes over BatchNorm statistics; eval mode).
      num_data: N, the training-set size.
      num_steps: total steps of the run (schedules, SWAG start, SGLD cycles).
      learning_rate: η of the method (SGLD/E-MCMC use η/N on the summed potential, i.e. η on the mean loss).
      kl_weight: β on KL/N (variational methods).
      sample_frozen_weights: draw frozen weights from the prior at every step (the scheme) or use the mean.
      features_fn: ``(params, images) -> head inputs``, required by ``laplace``.
      train_data: ``(images, labels)`` of the whole training set, required by ``laplace``.
      hyperparameters: method-specific values overriding the defaults (e.g. ``{"rho": 0.1}``).
      schedule, warmup_steps: the learning-rate schedule (``"constant"`` or ``"cosine"``, after a linear
        warm-up of ``warmup_steps``), for methods that take one (:func:`fpbma.methods.learning_rate_schedule`).

    Returns:
      A :class:`fpbma.types.Trainer`.

    >>> from fpbma import methods
    >>> "fpbma" in methods.names()
    True
    """
    from fpbma import methods

    m = methods.get(method)
    problem = make_problem(scheme, apply_fn, num_data=num_data, sample_frozen_weights=sample_frozen_weights,
                           features_fn=features_fn, train_data=train_data)
    return m.trainer(problem, learning_rate=learning_rate, num_steps=num_steps, kl_weight=kl_weight,
                     schedule=schedule, warmup_steps=warmup_steps, **dict(hyperparameters or {}))


def head_features(model: nn.Module, variables: dict, images: jax.Array) -> jax.Array:
    """The input of the ``head`` module (penultimate features) for ``images``, eval mode."""
    captured = []

    def interceptor(next_fun, args, kwargs, context):
        if context.module.name == HEAD and context.method_name == "__call__":
            captured.append(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        model.apply(variables, images, train=False)
    if not captured:
        raise ValueError("the model has no submodule named 'head' whose input could be captured.")
    return captured[-1]
