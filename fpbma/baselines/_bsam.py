"""Bayesian SAM (bSAM; Möllenhoff & Khan, ICLR 2023): Adam-like natural-gradient VI with SAM's perturbation.

The posterior is q(w) = N(m, diag(σ²)) with σ² = 1/(N s) (precision vector s, N training examples).
One step (Algorithm 1 of the paper; all operations elementwise):

    e   ~ N(0, c² / (N s))                         c = noise_scale (1 in the paper)
    g   = ∇ℓ(m + e)                                gradient at a noisy sample
    ε   = ρ g / s                                  precision-scaled SAM perturbation
    g_ε = ∇ℓ(m + ε)                                gradient at the perturbed mean
    g_m ← β₁ g_m + (1 − β₁)(g_ε + δ m)             δ = weight_decay (L2 / prior precision per datum)
    s   ← β₂ s + (1 − β₂)(√s ⊙ |g| + δ + γ)        γ = damping
    m   ← m − α g_m / s

The precision of the mean step is the *updated* s, as in the paper's algorithm box; the authors' JAX
code (team-approx-bayes/bayesian-sam) divides by the s of the previous step instead — the two agree
to first order in (1 − β₂). m-sharpness (splitting the batch) is left to the caller's ``grad_fn``.

Reference: Möllenhoff & Khan, "SAM as an Optimal Relaxation of Bayes", ICLR 2023, arXiv:2210.01620.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fpbma import posterior as post
from fpbma.baselines._common import check_int, check_number, find_state
from fpbma.posterior import tree_normal_like

PyTree = Any

__all__ = ["BSAMState", "bsam", "bsam_posterior"]


class BSAMState(NamedTuple):
    """State of :func:`bsam`.

    Attributes:
      momentum: g_m, shaped like the parameters.
      precision: s, shaped like the parameters (σ² = 1/(N s)).
      key: PRNG key for the noisy sample, split at every step.
      count: int32 step counter.
    """

    momentum: PyTree
    precision: PyTree
    key: jax.Array
    count: jax.Array


def bsam(learning_rate, num_data: int, rho: float = 0.05, beta1: float = 0.9, beta2: float = 0.999,
         weight_decay: float = 0.0, damping: float = 0.1, s_init: float = 1.0, noise_scale: float = 1.0,
         seed: int = 0) -> optax.GradientTransformationExtraArgs:
    """The bSAM optimizer for the posterior mean m (the params); the precision s lives in the state.

    ``update(grads, state, params, *, grad_fn)`` calls ``grad_fn`` twice — at the noisy sample m + e and
    at the perturbed mean m + ε — and ignores ``grads`` (accepted for the optax signature; pass the
    gradient at m or zeros). Returns the update −α g_m/s for m.

    Args:
      learning_rate: α > 0 (float or schedule).
      num_data: N ≥ 1, the training-set size (sets σ² = 1/(N s)).
      rho: ρ > 0, the perturbation radius.
      beta1: β₁ in [0, 1), momentum of the gradient.
      beta2: β₂ in [0, 1), decay of the precision average.
      weight_decay: δ ≥ 0, L2 regulariser (prior precision per datum).
      damping: γ ≥ 0 added to the precision update.
      s_init: initial precision s₀ > 0.
      noise_scale: c ≥ 0 multiplying the sampling std (0 evaluates g at the mean).
      seed: integer seed of the noise key kept in the state.

    Returns:
      An ``optax.GradientTransformationExtraArgs``. :func:`bsam_posterior` turns (m, state) into a
      ``DiagGaussian``.

    >>> import jax, jax.numpy as jnp, optax
    >>> grad_fn = jax.grad(lambda w: 0.5 * jnp.sum((w - 1.0) ** 2))
    >>> tx = bsam(0.1, num_data=100, rho=0.05, s_init=1.0)
    >>> m = jnp.zeros(2)
    >>> state = tx.init(m)
    >>> for _ in range(50):                     # grads are ignored: grad_fn is called at m + e and m + ε
    ...     updates, state = tx.update(jnp.zeros(2), state, m, grad_fn=grad_fn)
    ...     m = optax.apply_updates(m, updates)
    >>> q = bsam_posterior(m, state, num_data=100)
    >>> [round(float(v), 1) for v in q.mean], [round(float(v), 2) for v in jnp.exp(q.log_std)]  # σ = 1/√(N s)
    ([1.0, 1.0], [0.1, 0.1])

    References:
      Möllenhoff & Khan, "SAM as an Optimal Relaxation of Bayes", ICLR 2023.
    """
    check_number(learning_rate, "learning_rate", low=0.0, low_open=True)
    num_data = check_int(num_data, "num_data", low=1)
    check_number(rho, "rho", low=0.0, low_open=True)
    check_number(beta1, "beta1", low=0.0, high=1.0, high_open=True)
    check_number(beta2, "beta2", low=0.0, high=1.0, high_open=True)
    check_number(weight_decay, "weight_decay", low=0.0)
    check_number(damping, "damping", low=0.0)
    check_number(s_init, "s_init", low=0.0, low_open=True)
    check_number(noise_scale, "noise_scale", low=0.0)
    seed = check_int(seed, "seed", low=0)
    lr = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def init_fn(params):
        zeros = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.result_type(x, jnp.float32)), params)
        precision = jax.tree.map(lambda z: jnp.full_like(z, s_init), zeros)
        return BSAMState(zeros, precision, jax.random.PRNGKey(seed), jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
        del updates, extra_args
        if params is None or grad_fn is None:
            raise ValueError("bsam evaluates gradients itself: call update(grads, state, params, "
                             "grad_fn=lambda params: <gradient of the mean loss at params>).")
        key, noise_key = jax.random.split(state.key)
        e = tree_normal_like(noise_key, params)
        noisy = jax.tree.map(lambda m, s, z: m + noise_scale * z / jnp.sqrt(num_data * s),
                             params, state.precision, e)
        g = grad_fn(noisy)
        perturbed = jax.tree.map(lambda m, gi, s: m + rho * gi / s, params, g, state.precision)
        g_eps = grad_fn(perturbed)
        momentum = jax.tree.map(lambda gm, ge, m: beta1 * gm + (1 - beta1) * (ge + weight_decay * m),
                                state.momentum, g_eps, params)
        precision = jax.tree.map(
            lambda s, gi: beta2 * s + (1 - beta2) * (jnp.sqrt(s) * jnp.abs(gi) + weight_decay + damping),
            state.precision, g)
        alpha = lr(state.count)
        new_updates = jax.tree.map(lambda gm, s, m: (-alpha * gm / s).astype(jnp.result_type(m)),
                                   momentum, precision, params)
        return new_updates, BSAMState(momentum, precision, key, state.count + 1)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def bsam_posterior(params: PyTree, state: BSAMState, num_data: int) -> post.DiagGaussian:
    """q = N(m, 1/(N s)) as a :class:`fpbma.DiagGaussian` (log σ = −½ log(N s))."""
    num_data = check_int(num_data, "num_data", low=1)
    state = find_state(state, BSAMState, "bsam_posterior")
    log_std = jax.tree.map(lambda s: -0.5 * (jnp.log(s) + math.log(num_data)), state.precision)
    return post.DiagGaussian(mean=params, log_std=log_std)
