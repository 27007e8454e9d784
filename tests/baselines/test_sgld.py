"""SGLD / cSGLD sample a correlated 2-D Gaussian; the cyclical schedule follows Zhang et al. (2020), Eq. 1."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fpbma.baselines import _sgld as sgld_lib
from tests.baselines.mcmc_utils import check_gaussian_moments

SIGMA = np.array([[1.0, 0.8], [0.8, 1.0]])
PRECISION = np.linalg.inv(SIGMA)
MEAN = np.array([1.0, -0.5])
CHAINS = 256


def grad_u(x):
    return jnp.asarray(PRECISION, jnp.float32) @ (x - jnp.asarray(MEAN, jnp.float32))


def run_chains(tx, num_steps, record):
    """Runs CHAINS independent chains from x = 0; returns the iterates where ``record(state)`` holds."""
    x0 = jnp.zeros(2)
    keys = jax.random.split(jax.random.PRNGKey(0), CHAINS)
    states = jax.vmap(lambda k: tx.init(x0)._replace(key=k))(keys)

    def step(carry, _):
        x, s = carry
        u, s = tx.update(grad_u(x), s, x)
        x = optax.apply_updates(x, u)
        return (x, s), (x, record(s))

    @jax.jit
    def run(states):
        return jax.vmap(lambda s: jax.lax.scan(step, (x0, s), None, length=num_steps)[1])(states)

    xs, keep = run(states)
    xs, keep = np.asarray(xs), np.asarray(keep)
    assert np.all(keep == keep[0])  # same schedule in every chain
    return xs[:, keep[0]]


def test_cyclical_cosine_schedule_matches_formula():
    lr, k_total, m = 0.3, 10, 3
    sched = sgld_lib.cyclical_cosine_schedule(lr, k_total, m)
    length = int(np.ceil(k_total / m))
    for k in range(k_total):
        expected = lr / 2 * (np.cos(np.pi * (k % length) / length) + 1)
        np.testing.assert_allclose(float(sched(k)), expected, rtol=1e-6)
    ends = [int(c) for c in range(1, k_total + 1) if sgld_lib.is_cycle_end(c, k_total, m)]
    assert ends == [4, 8]


def test_csgld_step_has_no_noise_in_exploration_and_sqrt_2_alpha_t_noise_in_sampling():
    lr, temp = 0.1, 0.5
    tx = sgld_lib.csgld(lr, num_steps=4, n_cycle=1, exploration_ratio=0.5, temp=temp)
    sched = sgld_lib.cyclical_cosine_schedule(lr, 4, 1)
    state = tx.init(jnp.zeros(20000))
    g = jnp.ones(20000)
    steps = []
    for _ in range(4):
        u, state = tx.update(g, state)
        steps.append(np.asarray(u))
    for k in (0, 1):  # exploration: r(k) = k/4 < 0.5 → exactly −α_k g
        np.testing.assert_allclose(steps[k], -float(sched(k)) * np.ones(20000), rtol=1e-6)
    for k in (2, 3):  # sampling: mean −α_k g, std √(2 α_k T), estimated on 20000 draws
        alpha = float(sched(k))
        assert abs(steps[k].mean() + alpha) < 5 * np.sqrt(2 * alpha * temp / 20000)
        np.testing.assert_allclose(steps[k].std(), np.sqrt(2 * alpha * temp), rtol=0.05)


def test_sgld_samples_correlated_gaussian():
    alpha = 0.02
    burn, keep_every, total = 1000, 20, 5000
    tx = sgld_lib.sgld(alpha, temp=1.0)
    samples = run_chains(tx, total, lambda s: (s.count > burn) & (s.count % keep_every == 0))
    # Euler–Maruyama's stationary covariance is 2/(λ(2 − αλ)) per eigen-direction: its bias must be far
    # below the Monte-Carlo tolerance, so the check is against the true posterior.
    lam = np.linalg.eigvalsh(PRECISION)
    assert np.max(np.abs(2 / (lam * (2 - alpha * lam)) - 1 / lam)) < 0.02
    ess = check_gaussian_moments(samples, MEAN, SIGMA)
    assert min(ess.values()) > 1000


def test_csgld_samples_at_cycle_ends_match_gaussian():
    num_steps, n_cycle = 4000, 10
    tx = sgld_lib.csgld(0.04, num_steps=num_steps, n_cycle=n_cycle, exploration_ratio=0.25, temp=1.0)
    samples = run_chains(tx, num_steps, lambda s: sgld_lib.is_cycle_end(s.count, num_steps, n_cycle))
    assert samples.shape == (CHAINS, n_cycle, 2)
    check_gaussian_moments(samples, MEAN, SIGMA)


def test_temperature_zero_is_gradient_descent():
    tx = sgld_lib.sgld(0.1, temp=0.0)
    u, _ = tx.update(jnp.array([1.0, -2.0]), tx.init(jnp.zeros(2)))
    np.testing.assert_allclose(np.asarray(u), [-0.1, 0.2], rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(learning_rate=0.0, num_steps=10), "learning_rate"),
    (dict(learning_rate=0.1, num_steps=10, n_cycle=0), "n_cycle"),
    (dict(learning_rate=0.1, num_steps=3, n_cycle=4), "n_cycle=4 exceeds"),
    (dict(learning_rate=0.1, num_steps=10, exploration_ratio=1.0), "exploration_ratio"),
    (dict(learning_rate=0.1, num_steps=10, temp=-1.0), "temp"),
])
def test_csgld_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sgld_lib.csgld(**kwargs)
