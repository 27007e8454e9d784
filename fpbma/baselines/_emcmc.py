"""Entropy-MCMC (Li & Zhang, ICLR 2024): Langevin sampling jointly with a guiding variable θ_a.

The joint target couples the weights θ to an auxiliary guiding variable θ_a,

    p(θ, θ_a) ∝ exp(−U(θ) − ‖θ − θ_a‖² / (2η)),       U(θ) = −log p(θ | D),

whose θ-marginal is the posterior itself and whose θ_a-marginal is the posterior smoothed by a
Gaussian of variance η (the local-entropy distribution, free of sharp modes), which pulls θ toward
flat basins. Both variables move by one SGLD step on the joint energy (temperature T):

    θ   ← θ   − α_k [∇U(θ) + (θ − θ_a)/η] + √(2 α_k T) ξ,
    θ_a ← θ_a − α_k (θ_a − θ)/η             + √(2 α_k T) ξ_a.

The step is explicit in the coupling, so it needs α_k < η (checked when the step size is a float).
The transform updates θ (the params); θ_a lives in the state (:func:`guiding_params`). With
``num_steps`` and ``n_cycle`` the step size follows cSGLD's cyclical cosine schedule, with its
exploration phase; samples are collected as for cSGLD (:func:`fpbma.baselines.is_cycle_end`).

Units: ``grads`` is ∇U with U the *summed* negative log posterior. The authors' released code works with
the mean loss ℓ̄ = U/N and a step ``lr`` on it; that is this update with α = lr/N and the same η, T.
Their code keeps both θ and θ_a at the end of every cycle for BMA (e.g.
``stack_samples([theta, guiding_params(state)])``).

Reference: Li & Zhang, "Entropy-MCMC: Sampling from Flat Basins with Ease", ICLR 2024,
arXiv:2310.05401.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fpbma.baselines._common import check_int, check_number, find_state
from fpbma.posterior import tree_normal_like
from fpbma.baselines._sgld import cycle_length, cyclical_cosine_schedule

PyTree = Any

__all__ = ["EMCMCState", "emcmc", "guiding_params"]


class EMCMCState(NamedTuple):
    """State of :func:`emcmc`: the guiding variable θ_a, the step counter and the noise key."""

    guide: PyTree
    count: jax.Array
    key: jax.Array


def emcmc(learning_rate: float, eta: float = 1e-2, temp: float = 1.0, num_steps: Optional[int] = None,
          n_cycle: int = 1, exploration_ratio: float = 0.0, seed: int = 0) -> optax.GradientTransformation:
    """Entropy-MCMC: ``update(∇U(θ), state, θ)`` returns the θ update and moves θ_a in the state.

    Args:
      learning_rate: α (> 0, < η), constant, or the peak of the cyclical schedule when ``num_steps``
        is given.
      eta: η > 0, the coupling variance (larger η: smoother guiding distribution).
      temp: temperature T ≥ 0.
      num_steps: total steps K for the cyclical schedule, or None for a constant step size.
      n_cycle: M ≥ 1 cosine cycles (with ``num_steps``).
      exploration_ratio: β in [0, 1), noise-free fraction of each cycle (with ``num_steps``).
      seed: integer seed of the noise key.

    Returns:
      An ``optax.GradientTransformation``; θ_a is ``guiding_params(state)``, initialised to θ.

    >>> import jax, jax.numpy as jnp, optax
    >>> grad_u = jax.grad(lambda w: 50.0 * jnp.sum((w - 1.0) ** 2))  # U(θ) = 50 ‖θ − 1‖²
    >>> tx = emcmc(1e-3, eta=1e-2, temp=0.0)    # T = 0: noise-free, both variables descend
    >>> theta = jnp.zeros(2)
    >>> state = tx.init(theta)
    >>> for _ in range(100):
    ...     updates, state = tx.update(grad_u(theta), state, theta)
    ...     theta = optax.apply_updates(theta, updates)
    >>> [round(float(v), 2) for v in theta], [round(float(v), 2) for v in guiding_params(state)]  # θ_a trails θ
    ([0.99, 0.99], [0.98, 0.98])

    References:
      Li & Zhang, "Entropy-MCMC: Sampling from Flat Basins with Ease", ICLR 2024.
    """
    if callable(learning_rate):
        raise TypeError("emcmc takes a float learning_rate (the peak step size); pass num_steps and n_cycle "
                        "for the cyclical schedule instead of a schedule function.")
    check_number(learning_rate, "learning_rate", low=0.0, low_open=True)
    check_number(eta, "eta", low=0.0, low_open=True)
    check_number(temp, "temp", low=0.0)
    check_number(exploration_ratio, "exploration_ratio", low=0.0, high=1.0, high_open=True)
    seed = check_int(seed, "seed", low=0)
    if not float(learning_rate) < float(eta):
        raise ValueError(f"learning_rate={learning_rate} must be smaller than eta={eta}: the explicit coupling "
                         "step (θ − θ_a)·α/η diverges otherwise. Lower learning_rate or raise eta.")
    if num_steps is None:
        step_size = lambda k: learning_rate  # noqa: E731
        noise_on = lambda k: True  # noqa: E731
    else:
        step_size = cyclical_cosine_schedule(learning_rate, num_steps, n_cycle)
        length = cycle_length(num_steps, n_cycle)
        noise_on = lambda k: jnp.mod(k, length) / length >= exploration_ratio  # noqa: E731

    def init_fn(params):
        return EMCMCState(jax.tree.map(jnp.asarray, params), jnp.zeros([], jnp.int32), jax.random.PRNGKey(seed))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("emcmc needs the current parameters θ: call update(grads, state, params).")
        key, k_theta, k_guide = jax.random.split(state.key, 3)
        alpha = step_size(state.count)
        scale = jnp.where(noise_on(state.count), jnp.sqrt(2.0 * alpha * temp), 0.0)
        xi, xi_a = tree_normal_like(k_theta, params), tree_normal_like(k_guide, params)
        new_updates = jax.tree.map(
            lambda g, th, ga, z: (-alpha * (g + (th - ga) / eta) + scale * z).astype(jnp.result_type(th)),
            updates, params, state.guide, xi)
        guide = jax.tree.map(lambda ga, th, z: ga - alpha * (ga - th) / eta + scale * z, state.guide, params, xi_a)
        return new_updates, EMCMCState(guide, state.count + 1, key)

    return optax.GradientTransformation(init_fn, update_fn)


def guiding_params(state) -> PyTree:
    """θ_a from an :class:`EMCMCState` (searched inside a chained optimizer state)."""
    return find_state(state, EMCMCState, "guiding_params").guide
