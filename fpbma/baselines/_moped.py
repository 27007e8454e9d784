"""MOPED (Krishnan et al., AAAI 2020): mean-field Gaussian VI with priors and init from pre-trained weights.

Given pre-trained (MLE/MAP) weights w, MOPED sets

    prior      p(v) = Πᵢ N(vᵢ; wᵢ, σ_pᵢ²),       σ_p = δ|w|  (or a fixed prior_std)
    initial q  q₀(v) = Πᵢ N(vᵢ; wᵢ, (δ|wᵢ|)²),   δ = moped_delta,

(σ floored at ``min_std`` so that zero weights keep a valid Gaussian) and fits q by minimising the
per-example negative ELBO with KL weight β = kl_beta:

    L(θ) = E_{q_θ}[ℓ(v)] + β KL(q_θ ‖ p) / N,

estimated with the reparameterisation v = μ + σ ⊙ ε (:func:`fpbma.negative_elbo`); the mean and
log σ are trained with Adam, as in the paper.

Reference: Krishnan, Subedar & Tickoo, "Specifying Weight Priors in Bayesian Deep Neural Networks with
Empirical Bayes", AAAI 2020, arXiv:1906.05323.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fpbma import posterior as post
from fpbma import transforms
from fpbma.baselines._common import check_number

PyTree = Any

__all__ = ["MOPED", "moped", "moped_init"]


def moped_init(pretrained: PyTree, moped_delta: float = 0.1, prior_std: Optional[float] = None,
               min_std: float = 1e-6):
    """(q₀, p): the MOPED initial posterior and prior from pre-trained weights.

    Args:
      pretrained: weights w (pytree).
      moped_delta: δ > 0; q₀ has std δ|w|.
      prior_std: fixed prior std, or None for the empirical-Bayes prior std δ|w| of the paper.
      min_std: floor > 0 on every std (zero weights).

    Returns:
      ``(q0, prior)``, both :class:`fpbma.DiagGaussian` with mean w.
    """
    check_number(moped_delta, "moped_delta", low=0.0, low_open=True)
    check_number(min_std, "min_std", low=0.0, low_open=True)
    if prior_std is not None:
        check_number(prior_std, "prior_std", low=0.0, low_open=True)
    mean = jax.tree.map(lambda x: jnp.asarray(x, jnp.result_type(x, jnp.float32)), pretrained)
    log_std = jax.tree.map(lambda x: jnp.log(jnp.maximum(moped_delta * jnp.abs(x), min_std)), mean)
    q0 = post.DiagGaussian(mean=mean, log_std=log_std)
    if prior_std is None:
        prior = post.DiagGaussian(mean=mean, log_std=log_std)
    else:
        prior = post.DiagGaussian(mean=mean, log_std=jax.tree.map(
            lambda x: jnp.full(jnp.shape(x), jnp.log(jnp.maximum(prior_std, min_std)), x.dtype), mean))
    return q0, prior


class MOPED(NamedTuple):
    """A configured MOPED run: ``init`` builds (q₀, p), ``loss`` is the negative ELBO, ``tx`` the optimizer."""

    init: Callable
    loss: Callable
    tx: optax.GradientTransformation


def moped(learning_rate, moped_delta: float = 0.1, kl_beta: float = 1.0, prior_std: Optional[float] = None,
          min_std: float = 1e-6) -> MOPED:
    """MOPED mean-field VI.

    Args:
      learning_rate: Adam step size > 0 (float or schedule).
      moped_delta: δ > 0 (initial std δ|w|).
      kl_beta: β ≥ 0, the KL weight.
      prior_std: fixed prior std, or None for δ|w|.
      min_std: floor on stds.

    Returns:
      :class:`MOPED` with ``init(pretrained) -> (q0, prior)``,
      ``loss(q, noise, loss_fn, prior, num_data) -> L(θ)`` and ``tx`` (Adam on (μ, log σ)).

    >>> import fpbma, jax, jax.numpy as jnp, optax
    >>> m = moped(1e-2, moped_delta=0.1, kl_beta=1.0)
    >>> q, prior = m.init({"w": jnp.array([1.0, -2.0])})    # pre-trained w = (1, −2)
    >>> [round(float(s), 4) for s in jnp.exp(q.log_std["w"])]   # q₀'s std δ|w|
    [0.1, 0.2]
    >>> loss_fn = lambda v: 0.5 * jnp.sum((v["w"] - 1.0) ** 2)  # the target data prefer v = (1, 1)
    >>> state = m.tx.init(q)
    >>> for key in jax.random.split(jax.random.PRNGKey(0), 200):
    ...     g = jax.grad(m.loss)(q, fpbma.sample_noise(q, key), loss_fn, prior, 10)
    ...     updates, state = m.tx.update(g, state, q)
    ...     q = optax.apply_updates(q, updates)
    >>> [round(float(v), 1) for v in q.mean["w"]]               # the tight prior at −2 holds w₂ back
    [1.0, -1.1]

    References:
      Krishnan et al., "Specifying Weight Priors in Bayesian Deep Neural Networks with Empirical Bayes",
      AAAI 2020.
    """
    check_number(learning_rate, "learning_rate", low=0.0, low_open=True)
    check_number(kl_beta, "kl_beta", low=0.0)
    moped_init({}, moped_delta, prior_std, min_std)  # validates the remaining flags now

    def init(pretrained):
        return moped_init(pretrained, moped_delta, prior_std, min_std)

    def loss(q, noise, loss_fn, prior, num_data):
        return transforms.negative_elbo(q, noise, loss_fn, prior, num_data, kl_weight=kl_beta)

    return MOPED(init=init, loss=loss, tx=optax.adam(learning_rate))
