"""E-MCMC samples the joint p(θ, θ_a) ∝ exp(−U(θ) − ‖θ − θ_a‖²/(2η)) of a correlated 2-D Gaussian.

For U(θ) = ½(θ − μ)ᵀΣ⁻¹(θ − μ): θ ~ N(μ, Σ) and θ_a | θ ~ N(θ, ηI), so θ_a ~ N(μ, Σ + ηI) and
Cov(θ, θ_a) = Σ.
"""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.baselines.mcmc_utils import check_gaussian_moments

from fpbma.baselines import _emcmc as emcmc_lib

SIGMA = np.array([[1.0, 0.8], [0.8, 1.0]])
PRECISION = np.linalg.inv(SIGMA)
MEAN = np.array([1.0, -0.5])
ETA = 0.5
CHAINS = 256


def test_emcmc_joint_samples_match_gaussian_marginals():
    alpha, burn, keep_every, total = 0.02, 1500, 20, 7500
    tx = emcmc_lib.emcmc(alpha, eta=ETA, temp=1.0)
    x0 = jnp.zeros(2)
    keys = jax.random.split(jax.random.PRNGKey(0), CHAINS)
    states = jax.vmap(lambda k: tx.init(x0)._replace(key=k))(keys)
    prec = jnp.asarray(PRECISION, jnp.float32)
    mean = jnp.asarray(MEAN, jnp.float32)

    def step(carry, _):
        x, s = carry
        u, s = tx.update(prec @ (x - mean), s, x)
        x = optax.apply_updates(x, u)
        return (x, s), jnp.concatenate([x, emcmc_lib.guiding_params(s)])

    @jax.jit
    def run(states):
        return jax.vmap(lambda s: jax.lax.scan(step, (x0, s), None, length=total)[1])(states)

    joint = np.asarray(run(states))[:, burn::keep_every]  # (chains, samples, 4) = (θ, θ_a)
    joint_cov = np.block([[SIGMA, SIGMA], [SIGMA, SIGMA + ETA * np.eye(2)]])
    ess = check_gaussian_moments(joint, np.concatenate([MEAN, MEAN]), joint_cov)
    assert min(ess.values()) > 500
    # The guiding variable is measurably wider than θ (the smoothed, flatter marginal).
    var_theta, var_guide = joint[..., 0].var(), joint[..., 2].var()
    assert var_guide - var_theta > 0.3


def test_emcmc_one_step_by_hand_without_noise():
    tx = emcmc_lib.emcmc(0.1, eta=0.5, temp=0.0)
    theta = jnp.array([1.0, 2.0])
    state = tx.init(theta)._replace(guide=jnp.array([0.0, 1.0]))
    g = jnp.array([0.5, -1.0])
    u, state = tx.update(g, state, theta)
    np.testing.assert_allclose(np.asarray(u), -0.1 * (np.array([0.5, -1.0]) + np.array([1.0, 1.0]) / 0.5), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state.guide), np.array([0.0, 1.0]) + 0.1 * np.array([1.0, 1.0]) / 0.5,
                               rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(learning_rate=0.1, eta=0.05), "smaller than eta"),
    (dict(learning_rate=0.01, eta=0.0), "eta"),
    (dict(learning_rate=0.01, eta=0.1, temp=-1.0), "temp"),
])
def test_emcmc_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        emcmc_lib.emcmc(**kwargs)
