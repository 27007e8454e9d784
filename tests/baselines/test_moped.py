"""MOPED: the initial q and prior follow Krishnan et al. (2020); training lowers the negative ELBO."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fpbma

from fpbma.baselines import _moped as moped_lib


def test_initial_posterior_and_prior_match_definition():
    w = {"k": jnp.array([[0.5, -2.0], [0.0, 1e-3]]), "b": jnp.array([3.0])}
    delta = 0.1
    q, prior = moped_lib.moped_init(w, moped_delta=delta, min_std=1e-5)
    for tree in (q.mean, prior.mean):
        np.testing.assert_array_equal(np.asarray(tree["k"]), np.asarray(w["k"]))
    expected_std = np.maximum(delta * np.abs(np.asarray(w["k"])), 1e-5)  # zero weight → floor
    np.testing.assert_allclose(np.exp(np.asarray(q.log_std["k"])), expected_std, rtol=1e-6)
    np.testing.assert_allclose(np.exp(np.asarray(prior.log_std["k"])), expected_std, rtol=1e-6)
    np.testing.assert_allclose(np.exp(np.asarray(q.log_std["b"])), [0.3], rtol=1e-6)
    _, fixed = moped_lib.moped_init(w, moped_delta=delta, prior_std=0.7)
    np.testing.assert_allclose(np.exp(np.asarray(fixed.log_std["k"])), np.full((2, 2), 0.7), rtol=1e-6)
    assert float(fpbma.kl_divergence(q, prior)) == pytest.approx(0.0, abs=1e-6)


def test_training_lowers_the_negative_elbo_on_linear_regression():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 4)), jnp.float32)
    w_true = np.array([1.0, -2.0, 0.5, 0.0])
    y = x @ jnp.asarray(w_true, jnp.float32) + 0.1 * jnp.asarray(rng.normal(size=64), jnp.float32)
    w_map = {"w": jnp.linalg.lstsq(x, y)[0]}
    loss_fn = lambda p: 0.5 * jnp.mean((x @ p["w"] - y) ** 2) / 0.01  # noqa: E731  Gaussian NLL, σ = 0.1
    m = moped_lib.moped(1e-2, moped_delta=0.5, kl_beta=1.0)
    q, prior = m.init(w_map)
    eval_noise = jax.vmap(fpbma.sample_noise, (None, 0))(q, jax.random.split(jax.random.PRNGKey(1), 512))
    neg_elbo = jax.jit(lambda q, p: m.loss(q, eval_noise, loss_fn, p, 64))

    @jax.jit
    def train(q, p):
        def step(carry, key):
            q, s = carry
            g = jax.grad(m.loss)(q, fpbma.sample_noise(q, key), loss_fn, p, 64)
            u, s = m.tx.update(g, s, q)
            return (optax.apply_updates(q, u), s), None
        return jax.lax.scan(step, (q, m.tx.init(q)), jax.random.split(jax.random.PRNGKey(2), 300))[0][0]

    before = float(neg_elbo(q, prior))
    q_fit = train(q, prior)
    after = float(neg_elbo(q_fit, prior))
    assert after < 0.5 * before, (before, after)
    # The fit shrinks the std from δ|w| toward the posterior's (≈ σ_noise/√N per weight, far below δ|w|).
    assert np.all(np.exp(np.asarray(q_fit.log_std["w"]))[:3] < np.exp(np.asarray(q.log_std["w"]))[:3])


@pytest.mark.parametrize("kwargs, match", [(dict(moped_delta=0.0), "moped_delta"), (dict(kl_beta=-1.0), "kl_beta"),
                                           (dict(prior_std=0.0), "prior_std")])
def test_moped_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        moped_lib.moped(1e-3, **kwargs)
