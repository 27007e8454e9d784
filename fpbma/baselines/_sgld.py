"""SGLD (Welling & Teh, 2011) and cyclical SGLD (cSGLD; Zhang et al., ICLR 2020).

Both act on the potential U(w) = −log p(w | D), whose stochastic gradient the caller passes as
``grads`` (N × the mean mini-batch loss gradient, plus the prior's gradient). At temperature T:

    SGLD:   w ← w − α_k ∇U(w) + √(2 α_k T) ξ,        ξ ~ N(0, I).

cSGLD splits the K steps into M = n_cycle cosine cycles of length L = ⌈K/M⌉,

    α_k = α₀/2 · [cos(π · mod(k, L)/L) + 1],       r(k) = mod(k, L)/L,

and in each cycle runs an *exploration* phase (r(k) < β = exploration_ratio: plain gradient steps,
no noise) followed by a *sampling* phase (r(k) ≥ β: the SGLD step above). Samples are collected at
the end of each cycle (:func:`is_cycle_end`) and stacked into a
:class:`~fpbma.types.SampleSet`.

Preconditioned SGLD (pSGLD; Li et al., AAAI 2016), ``preconditioner="rmsprop"``: an RMSprop estimate of
the gradient's scale sets a diagonal preconditioner P. It is defined on the mean-scaled gradient
g̃ = ∇U/N (N = ``num_data``), so the step size keeps the units of a learning rate on the mean loss:

    V ← a V + (1 − a) g̃²,     P = 1/(ε + √V),                       a = precond_decay, ε = precond_eps,
    w ← w − α_k P ∇U(w) + √(2 α_k P T) ξ.

With α_k = lr_k/N this is Δ = −lr_k P g̃ + √(2 lr_k P T/N) ξ. For a constant P it is Langevin dynamics
dw = −P∇U dt + √(2PT) dB, whose stationary law is exp(−U/T) exactly; a P that moves with w needs the
correction term Γ(w) = T Σ_j ∂P_ij/∂w_j in the drift, which is dropped here as in the paper's practical
algorithm. That bias is small when V averages gradient noise but can be large when V follows the
position: with full-batch gradients on N(0, diag(10⁻⁴, 10⁻¹)) at α = 3·10⁻⁴, a = 0.99 inflates the variances by
about 16 % and 74 % (a = 0.999: 3 % and 32 %). A frozen P (a = 1; e.g. a second transform carrying the
state after an adaptive warm-up) samples exactly up to the step-size bias. V starts at the first step's
g̃² (so the first step is not scaled by 1/ε); a = 1 from the start freezes P at the first gradient's.
ε = 10⁻⁵ (the paper's λ) only bounds P ≤ 1/ε where a coordinate's gradient vanishes.

References:
  Welling & Teh, "Bayesian Learning via Stochastic Gradient Langevin Dynamics", ICML 2011.
  Zhang, Li, Zhang, Chen & Wilson, "Cyclical Stochastic Gradient MCMC for Bayesian Deep Learning",
  ICLR 2020.
  Li, Chen, Carlson & Carin, "Preconditioned Stochastic Gradient Langevin Dynamics for Deep Neural
  Networks", AAAI 2016.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fpbma.baselines._common import check_int, check_number
from fpbma.posterior import tree_normal_like

PyTree = Any

__all__ = ["SGLDState", "PSGLDState", "PRECONDITIONERS", "sgld", "csgld", "cyclical_cosine_schedule", "is_cycle_end",
           "cycle_length"]


class SGLDState(NamedTuple):
    """State of :func:`sgld` / :func:`csgld`: the step counter k and the noise key."""

    count: jax.Array
    key: jax.Array


class PSGLDState(NamedTuple):
    """State of :func:`sgld` / :func:`csgld` with ``preconditioner="rmsprop"``: k, the key and V."""

    count: jax.Array
    key: jax.Array
    square_avg: PyTree


PRECONDITIONERS = ("none", "rmsprop")
"""The preconditioners of :func:`sgld` / :func:`csgld`: none (plain SGLD) and RMSprop (pSGLD)."""


def cycle_length(num_steps: int, n_cycle: int) -> int:
    """L = ⌈K/M⌉, the number of steps per cycle."""
    num_steps = check_int(num_steps, "num_steps", low=1)
    n_cycle = check_int(n_cycle, "n_cycle", low=1)
    if n_cycle > num_steps:
        raise ValueError(f"n_cycle={n_cycle} exceeds num_steps={num_steps}; every cycle needs at least one step.")
    return math.ceil(num_steps / n_cycle)


def cyclical_cosine_schedule(learning_rate: float, num_steps: int, n_cycle: int) -> optax.Schedule:
    """α_k = α₀/2 [cos(π mod(k, L)/L) + 1] with L = ⌈K/M⌉ (Zhang et al., 2020, Eq. 1)."""
    check_number(learning_rate, "learning_rate", low=0.0, low_open=True)
    length = cycle_length(num_steps, n_cycle)
    return lambda k: 0.5 * learning_rate * (jnp.cos(jnp.pi * jnp.mod(k, length) / length) + 1.0)


def is_cycle_end(count, num_steps: int, n_cycle: int) -> jax.Array:
    """True when the step just taken closed a cycle (``count`` = steps taken so far, i.e. state.count)."""
    length = cycle_length(num_steps, n_cycle)
    return jnp.logical_and(count > 0, jnp.mod(count, length) == 0)


def _langevin(step_size, noise_on, temp, seed):
    def init_fn(params):
        del params
        return SGLDState(jnp.zeros([], jnp.int32), jax.random.PRNGKey(seed))

    def update_fn(updates, state, params=None):
        del params
        key, noise_key = jax.random.split(state.key)
        alpha = step_size(state.count)
        scale = jnp.where(noise_on(state.count), jnp.sqrt(2.0 * alpha * temp), 0.0)
        noise = tree_normal_like(noise_key, updates)
        new = jax.tree.map(lambda g, z: (-alpha * g + scale * z).astype(jnp.result_type(g)), updates, noise)
        return new, SGLDState(state.count + 1, key)

    return optax.GradientTransformation(init_fn, update_fn)


def _preconditioned_langevin(step_size, noise_on, temp, seed, decay, eps, num_data):
    def init_fn(params):
        square_avg = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.result_type(x, jnp.float32)), params)
        return PSGLDState(jnp.zeros([], jnp.int32), jax.random.PRNGKey(seed), square_avg)

    def update_fn(updates, state, params=None):
        del params
        key, noise_key = jax.random.split(state.key)
        alpha = step_size(state.count)
        temp_on = jnp.where(noise_on(state.count), temp, 0.0)
        first = state.count == 0
        square_avg = jax.tree.map(
            lambda v, g: jnp.where(first, (g / num_data) ** 2, decay * v + (1.0 - decay) * (g / num_data) ** 2),
            state.square_avg, updates)
        noise = tree_normal_like(noise_key, updates)

        def step(g, v, z):
            p = 1.0 / (eps + jnp.sqrt(v))
            return (-alpha * p * g + jnp.sqrt(2.0 * alpha * p * temp_on) * z).astype(jnp.result_type(g))

        new = jax.tree.map(step, updates, square_avg, noise)
        return new, PSGLDState(state.count + 1, key, square_avg)

    return optax.GradientTransformation(init_fn, update_fn)


def _transform(step_size, noise_on, temp, seed, preconditioner, precond_decay, precond_eps, num_data):
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(f"preconditioner={preconditioner!r} is not a preconditioner; use one of {PRECONDITIONERS}.")
    check_number(precond_decay, "precond_decay", low=0.0, high=1.0)
    check_number(precond_eps, "precond_eps", low=0.0, low_open=True)
    num_data = check_int(num_data, "num_data", low=1)
    if preconditioner == "none":
        return _langevin(step_size, noise_on, temp, seed)
    return _preconditioned_langevin(step_size, noise_on, temp, seed, float(precond_decay), float(precond_eps),
                                    num_data)


def sgld(learning_rate, temp: float = 1.0, seed: int = 0, preconditioner: str = "none",
         precond_decay: float = 0.99, precond_eps: float = 1e-5, num_data: int = 1) -> optax.GradientTransformation:
    """SGLD: ``update(∇U, state)`` returns −α_k ∇U + √(2 α_k T) ξ; pSGLD −α_k P ∇U + √(2 α_k P T) ξ.

    Args:
      learning_rate: α > 0, a float or an optax schedule of the step k.
      temp: temperature T ≥ 0 (T = 1 samples the posterior; T = 0 is gradient descent).
      seed: integer seed of the noise key kept in the state.
      preconditioner: ``"none"`` (plain SGLD) or ``"rmsprop"`` (pSGLD, P = 1/(ε + √V), see the module).
      precond_decay: a in [0, 1], the decay of V (1 freezes P at the first gradient's).
      precond_eps: ε > 0, which bounds P by 1/ε where the gradient vanishes.
      num_data: N ≥ 1; V averages (∇U/N)², the squared gradient of the mean loss.

    >>> import jax.numpy as jnp
    >>> tx = sgld(1e-4, temp=1.0)
    >>> ptx = sgld(1e-4, preconditioner="rmsprop", num_data=100)
    >>> updates, state = ptx.update(jnp.array([100.0, -1.0]), ptx.init(jnp.zeros(2)))
    >>> [round(float(v), 6) for v in state.square_avg]  # (∇U/N)² at the first step
    [1.0, 0.0001]

    References:
      Welling & Teh, "Bayesian Learning via Stochastic Gradient Langevin Dynamics", ICML 2011.
      Li et al., "Preconditioned Stochastic Gradient Langevin Dynamics for Deep Neural Networks", AAAI 2016.
    """
    check_number(learning_rate, "learning_rate", low=0.0, low_open=True)
    check_number(temp, "temp", low=0.0)
    seed = check_int(seed, "seed", low=0)
    step_size = learning_rate if callable(learning_rate) else (lambda _: learning_rate)
    return _transform(step_size, lambda k: True, temp, seed, preconditioner, precond_decay, precond_eps, num_data)


def csgld(learning_rate: float, num_steps: int, n_cycle: int = 4, exploration_ratio: float = 0.8,
          temp: float = 1.0, seed: int = 0, preconditioner: str = "none", precond_decay: float = 0.99,
          precond_eps: float = 1e-5, num_data: int = 1) -> optax.GradientTransformation:
    """Cyclical SGLD with the cosine schedule, an exploration phase and a sampling phase per cycle.

    Args:
      learning_rate: α₀ > 0, the step size at the start of every cycle.
      num_steps: K, the total number of steps of the run.
      n_cycle: M ≥ 1 cycles.
      exploration_ratio: β in [0, 1), the fraction of each cycle run without noise.
      temp: temperature T ≥ 0.
      seed: integer seed of the noise key.
      preconditioner: ``"none"`` or ``"rmsprop"`` (pSGLD; exploration steps are −α_k P ∇U, no noise).
      precond_decay: a in [0, 1], the decay of the RMSprop average V.
      precond_eps: ε > 0 in P = 1/(ε + √V).
      num_data: N ≥ 1; V averages (∇U/N)².

    Returns:
      An ``optax.GradientTransformation``; collect ``params`` after each update for which
      ``is_cycle_end(state.count, num_steps, n_cycle)`` holds.

    >>> import jax, jax.numpy as jnp, optax
    >>> from fpbma.types import stack_samples
    >>> [round(float(cyclical_cosine_schedule(0.1, 8, 2)(k)), 4) for k in range(5)]  # 2 cycles of 4 steps
    [0.1, 0.0854, 0.05, 0.0146, 0.1]
    >>> grad_u = jax.grad(lambda w: 0.5 * jnp.sum(w ** 2))    # U = ½‖w‖²: the posterior is N(0, I)
    >>> tx = csgld(0.1, num_steps=8, n_cycle=2, exploration_ratio=0.5, temp=1.0)
    >>> w = jnp.zeros(2)
    >>> state = tx.init(w)
    >>> samples = []
    >>> for _ in range(8):
    ...     updates, state = tx.update(grad_u(w), state, w)
    ...     w = optax.apply_updates(w, updates)
    ...     if is_cycle_end(state.count, 8, 2):   # one sample at the end of every cycle
    ...         samples.append(w)
    >>> stack_samples(samples).samples.shape
    (2, 2)

    References:
      Zhang et al., "Cyclical Stochastic Gradient MCMC for Bayesian Deep Learning", ICLR 2020.
    """
    schedule = cyclical_cosine_schedule(learning_rate, num_steps, n_cycle)
    length = cycle_length(num_steps, n_cycle)
    check_number(exploration_ratio, "exploration_ratio", low=0.0, high=1.0, high_open=True)
    check_number(temp, "temp", low=0.0)
    seed = check_int(seed, "seed", low=0)
    return _transform(schedule, lambda k: jnp.mod(k, length) / length >= exploration_ratio, temp, seed,
                      preconditioner, precond_decay, precond_eps, num_data)
