"""SWAG (Maddox et al., 2019) and F-SWAG (Nguyen et al., 2023) as an optax wrapper plus a posterior builder.

From step ``swa_start`` on, every c = ``collect_every`` steps the iterate wᵢ (after the update) is
added to running moments and a ring buffer of the last K = ``max_num_models`` deviations:

    w̄ₙ   = (n w̄ₙ₋₁ + wₙ)/(n + 1),        \\overline{w²}ₙ = (n \\overline{w²}ₙ₋₁ + wₙ²)/(n + 1),
    dₙ   = wₙ − w̄ₙ                       (deviation from the *updated* mean, as in SWAG's code),

and the posterior is the K-rank Gaussian

    q = N(w̄, ½ (diag σ² + D Dᵀ/(K − 1))),   σ² = \\overline{w²} − w̄²,   D = [d_{n−K+1}, …, dₙ],

returned as a :class:`fpbma.LowRankGaussian` (``LowRankGaussian.from_swag_moments``). With fewer than
K collected models the columns collected so far are used (at least 2).

F-SWAG is SWAG collected along a sharpness-aware trajectory: the wrapped optimizer is SAM.

BatchNorm statistics depend on the sampled weights; :func:`swag_samples` takes an optional
``refresh_fn(weights) -> variables`` (e.g. one pass over training data in train mode) applied to every
sample, and returns a :class:`~fpbma.types.SampleSet` of its results.

References:
  Maddox, Izmailov, Garipov, Vetrov & Wilson, "A Simple Baseline for Bayesian Uncertainty in Deep
  Learning", NeurIPS 2019.
  Nguyen, Pham, Truong, Le & Ho (F-SWAG): "Flat Seeking Bayesian Neural Networks", NeurIPS 2023.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fpbma import posterior as post
from fpbma.baselines._common import check_int, check_number, find_state
from fpbma.baselines._sam import sam
from fpbma.types import SampleSet, stack_samples

PyTree = Any

__all__ = ["SWAGState", "swag", "fswag", "swag_posterior", "swag_samples"]


class SWAGState(NamedTuple):
    """State of :func:`swag`.

    Attributes:
      inner_state: the wrapped optimizer's state.
      step: int32 number of updates seen.
      num_models: int32 n, models collected so far.
      mean: w̄.
      sq_mean: \\overline{w²}.
      deviations: ring buffer, leaves shaped ``(K, *param.shape)``; model n goes to row n mod K.
    """

    inner_state: Any
    step: jax.Array
    num_models: jax.Array
    mean: PyTree
    sq_mean: PyTree
    deviations: PyTree


def swag(optimizer: optax.GradientTransformation, swa_start: int = 0, collect_every: int = 1,
         max_num_models: int = 20) -> optax.GradientTransformationExtraArgs:
    """Wraps ``optimizer`` and collects SWAG statistics of the iterates.

    The updates are the wrapped optimizer's, unchanged; extra arguments of ``update`` (``grad_fn`` for
    SAM) are passed through. The model after update t (t = 1, 2, …) is collected when
    t > swa_start and (t − swa_start) mod c == 0.

    Args:
      optimizer: the base optimizer (SGD for SWAG, SAM for F-SWAG).
      swa_start: number of updates before collection starts, ≥ 0.
      collect_every: c ≥ 1.
      max_num_models: K ≥ 2, the rank (deviation columns kept).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`SWAGState`.

    >>> import fpbma, jax, jax.numpy as jnp
    >>> grad_fn = jax.grad(lambda w: 0.5 * jnp.sum((w - 1.0) ** 2))
    >>> tx = swag(optax.sgd(0.1), swa_start=0, collect_every=1, max_num_models=3)
    >>> w = jnp.zeros(2)
    >>> state = tx.init(w)
    >>> for _ in range(4):                      # iterates 0.1, 0.19, 0.271, 0.3439
    ...     updates, state = tx.update(grad_fn(w), state, w)
    ...     w = optax.apply_updates(w, updates)
    >>> q = swag_posterior(state)               # K = 3 deviation columns, the last three
    >>> int(state.num_models), q.rank, [round(float(v), 4) for v in q.mean]   # w̄ of the 4 iterates
    (4, 3, [0.2262, 0.2262])
    >>> fpbma.sample(q, jax.random.PRNGKey(0), 5).shape
    (5, 2)

    References:
      Maddox et al., "A Simple Baseline for Bayesian Uncertainty in Deep Learning", NeurIPS 2019.
    """
    swa_start = check_int(swa_start, "swa_start", low=0)
    collect_every = check_int(collect_every, "collect_every", low=1)
    rank = check_int(max_num_models, "max_num_models", low=2)
    inner = optax.with_extra_args_support(optimizer)

    def init_fn(params):
        zeros = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.result_type(x, jnp.float32)), params)
        return SWAGState(inner.init(params), jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32), zeros, zeros,
                         jax.tree.map(lambda z: jnp.zeros((rank,) + z.shape, z.dtype), zeros))

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("swag needs the current parameters: call update(grads, state, params).")
        new_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        step = state.step + 1
        collect = jnp.logical_and(step > swa_start, jnp.mod(step - swa_start, collect_every) == 0)
        w = optax.apply_updates(params, new_updates)
        n = state.num_models.astype(jnp.float32)
        mean = jax.tree.map(lambda m, x: (n * m + x) / (n + 1.0), state.mean, w)
        sq_mean = jax.tree.map(lambda m, x: (n * m + x * x) / (n + 1.0), state.sq_mean, w)
        row = jnp.mod(state.num_models, rank)
        deviations = jax.tree.map(lambda d, x, m: d.at[row].set(x - m), state.deviations, w, mean)
        pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(collect, a, b), new, old)  # noqa: E731
        new_state = SWAGState(inner_state, step, state.num_models + collect.astype(jnp.int32),
                              pick(mean, state.mean), pick(sq_mean, state.sq_mean),
                              pick(deviations, state.deviations))
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def fswag(learning_rate, rho: float = 0.05, momentum: float = 0.9, weight_decay: float = 0.0,
          swa_start: int = 0, collect_every: int = 1, max_num_models: int = 20) -> optax.GradientTransformationExtraArgs:
    """F-SWAG: :func:`swag` around SAM (:func:`fpbma.baselines.sam`); ``update`` needs ``grad_fn``.

    References:
      Nguyen et al., "Flat Seeking Bayesian Neural Networks", NeurIPS 2023.
    """
    return swag(sam(learning_rate, rho=rho, momentum=momentum, weight_decay=weight_decay),
                swa_start=swa_start, collect_every=collect_every, max_num_models=max_num_models)


def swag_posterior(state, min_var: float = 1e-30) -> post.LowRankGaussian:
    """The SWAG posterior N(w̄, ½(diag σ² + DDᵀ/(K − 1))) from a (concrete) :class:`SWAGState`.

    Deviation columns are returned oldest first. Raises if fewer than 2 models were collected.
    """
    state = find_state(state, SWAGState, "swag_posterior")
    check_number(min_var, "min_var", low=0.0, low_open=True)
    n = int(state.num_models)
    rank = jax.tree_util.tree_leaves(state.deviations)[0].shape[0]
    if n < 2:
        raise ValueError(f"SWAG collected {n} model(s); at least 2 are needed for the deviation matrix. "
                         "Train past swa_start for more steps or lower collect_every.")
    if n < rank:
        deviations = jax.tree.map(lambda d: d[:n], state.deviations)
    else:
        # Row n mod K holds the next model to be overwritten, i.e. the oldest one.
        deviations = jax.tree.map(lambda d: jnp.roll(d, -(n % rank), axis=0), state.deviations)
    return post.LowRankGaussian.from_swag_moments(state.mean, state.sq_mean, deviations, min_var=min_var)


def swag_samples(q: post.LowRankGaussian, key: jax.Array, num_samples: int,
                 refresh_fn: Optional[Callable[[PyTree], PyTree]] = None) -> SampleSet:
    """Draws weight samples from a SWAG posterior, optionally refreshing BatchNorm statistics per sample.

    Args:
      q: the SWAG posterior.
      key: PRNG key.
      num_samples: S ≥ 1.
      refresh_fn: ``weights -> variables`` run on every sample (e.g. recompute ``batch_stats`` with a pass
        over training data and return ``{"params": weights, "batch_stats": ...}``), or None.

    Returns:
      A :class:`SampleSet` of the S samples (or of ``refresh_fn``'s results).
    """
    num_samples = check_int(num_samples, "num_samples", low=1)
    stacked = post.sample(q, key, num_samples)
    if refresh_fn is None:
        return SampleSet(stacked)
    return stack_samples([refresh_fn(jax.tree.map(lambda x: x[i], stacked)) for i in range(num_samples)])
