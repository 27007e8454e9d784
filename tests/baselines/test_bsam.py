"""bSAM: steps on a quadratic equal Algorithm 1 of Möllenhoff & Khan (2023) computed by hand."""


import jax.numpy as jnp
import numpy as np
import pytest

import fpbma

from fpbma.baselines import _bsam as bsam_lib

A = np.array([[2.0, 0.5], [0.5, 1.0]])
B = np.array([1.0, -1.0])


def grad_fn(w):
    return jnp.asarray(A, jnp.float32) @ w - jnp.asarray(B, jnp.float32)


def test_two_steps_on_quadratic_equal_the_algorithm_box():
    hp = dict(learning_rate=0.05, num_data=10, rho=0.1, beta1=0.9, beta2=0.99, weight_decay=0.01, damping=0.1,
              s_init=2.0, noise_scale=0.0)
    tx = bsam_lib.bsam(**hp)
    m = jnp.array([0.3, -0.2])
    state = tx.init(m)
    # By hand (noise_scale = 0: the noisy sample is the mean itself).
    m_np, s_np, gm_np = np.array([0.3, -0.2]), np.full(2, 2.0), np.zeros(2)
    for _ in range(2):
        u, state = tx.update(jnp.zeros(2), state, m, grad_fn=grad_fn)
        m = m + u
        g = A @ m_np - B
        eps = hp["rho"] * g / s_np
        g_eps = A @ (m_np + eps) - B
        gm_np = hp["beta1"] * gm_np + (1 - hp["beta1"]) * (g_eps + hp["weight_decay"] * m_np)
        s_np = hp["beta2"] * s_np + (1 - hp["beta2"]) * (np.sqrt(s_np) * np.abs(g) + hp["weight_decay"] + hp["damping"])
        m_np = m_np - hp["learning_rate"] * gm_np / s_np
        np.testing.assert_allclose(np.asarray(m), m_np, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(state.precision), s_np, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(state.momentum), gm_np, rtol=1e-5)
    q = bsam_lib.bsam_posterior(m, state, hp["num_data"])
    assert isinstance(q, fpbma.DiagGaussian)
    np.testing.assert_allclose(np.exp(2 * np.asarray(q.log_std)), 1 / (hp["num_data"] * s_np), rtol=1e-5)


def test_noisy_sample_has_variance_one_over_n_s():
    # ℓ = ½‖w‖², m = 0, δ = 0: g = e and g_m = (1 − β₁) ρ e / s₀, so e is read back from the momentum.
    n_data, s0, rho, beta1, beta2, gamma, c = 10, 4.0, 0.5, 0.9, 0.99, 0.1, 1.5
    tx = bsam_lib.bsam(0.1, num_data=n_data, rho=rho, beta1=beta1, beta2=beta2, damping=gamma, s_init=s0,
                       noise_scale=c, seed=3)
    size = 20000
    _, state = tx.update(jnp.zeros(size), tx.init(jnp.zeros(size)), jnp.zeros(size), grad_fn=lambda w: w)
    e = np.asarray(state.momentum) * s0 / ((1 - beta1) * rho)
    np.testing.assert_allclose(e.var(), c * c / (n_data * s0), rtol=0.06)  # sd of the estimate ≈ 1 %
    assert abs(e.mean()) < 5 * np.sqrt(c * c / (n_data * s0) / size)
    expected_s = beta2 * s0 + (1 - beta2) * (np.sqrt(s0) * np.abs(e) + gamma)
    np.testing.assert_allclose(np.asarray(state.precision), expected_s, rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rho=0.0), "rho"),
    (dict(beta2=1.0), "beta2"),
    (dict(s_init=0.0), "s_init"),
    (dict(damping=-0.1), "damping"),
    (dict(noise_scale=-1.0), "noise_scale"),
    (dict(num_data=0), "num_data"),
])
def test_bsam_rejects_bad_hyperparameters(kwargs, match):
    base = dict(learning_rate=0.1, num_data=100)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        bsam_lib.bsam(**base)


def test_bsam_needs_grad_fn():
    tx = bsam_lib.bsam(0.1, num_data=10)
    with pytest.raises(ValueError, match="grad_fn"):
        tx.update(jnp.zeros(2), tx.init(jnp.zeros(2)), jnp.zeros(2))
