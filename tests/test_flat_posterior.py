"""The posterior algebra on flat buffers, on a parameter tree of many differently shaped leaves.

Every O(P) computation concatenates the leaves (μ, log σ as P-vectors, D as one K × P matrix) and splits the
result back. These tests use a tree whose leaves have different ranks and sizes (a scalar, vectors, matrices,
a 4-d kernel, nested dicts) so that a wrong leaf order, offset or reshape shows up as a wrong number, and
compare against dense float64 references computed from ``ravel_pytree`` (an independent code path).
"""

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import fpbma
from fpbma import posterior as post
from tests.posterior_utils import dense_cov, dense_mean, random_low_rank, random_tree, ravel

MANY = {
    "stem": {"kernel": (3, 3, 2, 4), "bias": (4,)},
    "block": [{"scale": (4,), "w": (4, 5)}, {"scale": (), "w": (5, 1, 2)}],
    "head": {"w": (10, 3), "b": (3,)},
    "tail": (1,),
}
K = 4


def _dense(q):
    return distrax.MultivariateNormalFullCovariance(dense_mean(q), dense_cov(q))


def _dense_fisher_diagonal(q):
    """(diag Σ⁻¹, F[log σ], F[D]) from the dense Σ: ½σ⁴Sᵢᵢ² and (c²/4)[(S d_k)ᵢ² + Sᵢᵢ d_kᵀ S d_k]."""
    s = jnp.linalg.inv(dense_cov(q))
    s_diag = jnp.diag(s)
    var = ravel(jax.tree.map(lambda x: jnp.exp(2 * x), q.log_std))
    d = jnp.stack([ravel_pytree(jax.tree.map(lambda c: c[i], q.cov_factor))[0] for i in range(K)])
    c = 1.0 / (K - 1)
    sd = d @ s                                               # rows S d_k
    f_cov = (c * c / 4) * (sd ** 2 + s_diag[None] * jnp.sum(sd * d, axis=1, keepdims=True))
    return s_diag, 0.5 * var ** 2 * s_diag ** 2, f_cov


def _rows(tree):
    """A (K, ...) tree as the K × P matrix of its rows in ravel_pytree order."""
    return np.stack([ravel(jax.tree.map(lambda c: c[i], tree)) for i in range(K)])


def test_layout_roundtrip_keeps_every_leaf():
    with jax.enable_x64(True):
        q = random_low_rank(jax.random.PRNGKey(0), K, MANY)
        layout, flat = post._flatten(q)
        assert flat.mean.shape == (fpbma.num_parameters(q.mean),) and flat.cov_factor.shape == (K, flat.mean.shape[0])
        back = post._unflatten(layout, flat)
        for a, b in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(back)):
            assert a.shape == b.shape
            np.testing.assert_array_equal(a, b)


def test_kl_and_its_gradient_match_dense_reference_on_many_leaves():
    with jax.enable_x64(True):
        q = random_low_rank(jax.random.PRNGKey(1), K, MANY)
        p = random_low_rank(jax.random.PRNGKey(2), K, MANY)
        np.testing.assert_allclose(fpbma.kl_divergence(q, p), _dense(q).kl_divergence(_dense(p)), rtol=1e-9)
        got = jax.grad(fpbma.kl_divergence)(q, p)
        want = jax.grad(lambda q_: _dense(q_).kl_divergence(_dense(p)))(q)
        for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            assert g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=1e-7, atol=1e-10)


def test_fisher_products_and_perturbation_match_dense_reference_on_many_leaves():
    with jax.enable_x64(True):
        q = random_low_rank(jax.random.PRNGKey(3), K, MANY)
        g = fpbma.LowRankGaussian(*[random_tree(k, shapes) for k, shapes in zip(
            jax.random.split(jax.random.PRNGKey(4), 3),
            [MANY, MANY, jax.tree.map(lambda s: (K,) + s, MANY, is_leaf=lambda s: isinstance(s, tuple))])])
        damping = 1e-3
        s_diag, f_log_std, f_cov = _dense_fisher_diagonal(q)
        fd = fpbma.fisher_diagonal(q)
        np.testing.assert_allclose(ravel(fd.mean), s_diag, rtol=1e-8)
        np.testing.assert_allclose(ravel(fd.log_std), f_log_std, rtol=1e-8)
        np.testing.assert_allclose(_rows(fd.cov_factor), f_cov, rtol=1e-7, atol=1e-12)
        # F_λ⁻¹ g: Σ g_μ, g_logσ / (F + λ), g_D / (F + λ).
        d = fpbma.inverse_fisher_vp(q, g, damping)
        want_mean = dense_cov(q) @ ravel(g.mean)
        want_log_std = ravel(g.log_std) / (f_log_std + damping)
        want_cov = _rows(g.cov_factor) / (f_cov + damping)
        np.testing.assert_allclose(ravel(d.mean), want_mean, rtol=1e-8)
        np.testing.assert_allclose(ravel(d.log_std), want_log_std, rtol=1e-8)
        np.testing.assert_allclose(_rows(d.cov_factor), want_cov, rtol=1e-7)
        fv = fpbma.fisher_vp(q, d, damping)
        for a, b in zip(jax.tree_util.tree_leaves(fv), jax.tree_util.tree_leaves(g)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
        # Second-order Δ* = ρ F⁻¹g / √(gᵀF⁻¹g), and the exact-KL Δ* lies on the ball KL = ρ²/2.
        rho = 0.1
        quad = ravel(g.mean) @ want_mean + ravel(g.log_std) @ want_log_std + np.sum(_rows(g.cov_factor) * want_cov)
        delta = fpbma.fisher_perturbation(q, g, rho, damping, radius="second_order")
        np.testing.assert_allclose(ravel(delta.mean), rho * want_mean / np.sqrt(quad), rtol=1e-7)
        np.testing.assert_allclose(_rows(delta.cov_factor), rho * want_cov / np.sqrt(quad), rtol=1e-7)
        exact = fpbma.fisher_perturbation(q, g, rho, damping)
        shifted = jax.tree.map(jnp.add, q, exact)
        np.testing.assert_allclose(_dense(shifted).kl_divergence(_dense(q)), rho ** 2 / 2, rtol=1e-4)
        # The exact step is a multiple of F⁻¹g, leaf for leaf.
        tau = ravel(exact.mean) / want_mean
        np.testing.assert_allclose(tau, tau[0], rtol=1e-8)


def test_mixed_dtypes_keep_the_leafwise_path():
    with jax.enable_x64(True):
        q = random_low_rank(jax.random.PRNGKey(5), K, MANY)
        p = random_low_rank(jax.random.PRNGKey(6), K, MANY)
        q32 = q._replace(mean={**q.mean, "tail": q.mean["tail"].astype(jnp.float32)})
        assert post._flatten(q32)[0] is None
        np.testing.assert_allclose(fpbma.kl_divergence(q32, p), _dense(q32).kl_divergence(_dense(p)), rtol=1e-6)


def test_tree_normal_like_equals_one_flat_draw():
    key = jax.random.PRNGKey(7)
    tree = random_tree(key, MANY, dtype=jnp.float32)
    want = jax.random.normal(key, (fpbma.num_parameters(tree),), jnp.float32)
    np.testing.assert_array_equal(ravel(post.tree_normal_like(key, tree)), want)
    np.testing.assert_array_equal(ravel(jax.jit(post.tree_normal_like)(key, tree)), want)
    typed = jax.random.key(7)
    np.testing.assert_array_equal(ravel(post.tree_normal_like(typed, tree)),
                                  jax.random.normal(typed, want.shape, jnp.float32))


@pytest.mark.parametrize("std", [1e-6, 1e-4])
def test_float32_tiny_variances_stay_finite_on_many_leaves(std):
    key = jax.random.PRNGKey(8)
    mean = random_tree(key, MANY, dtype=jnp.float32)
    q = fpbma.LowRankGaussian.from_point(mean, std, rank=K)
    cov = jax.tree.map(lambda x: std * jax.random.normal(key, x.shape, jnp.float32), q.cov_factor)
    q = q._replace(cov_factor=cov)
    p = q._replace(mean=jax.tree.map(lambda m: m + std, q.mean))
    g = jax.tree.map(jnp.ones_like, q)
    step = jax.jit(lambda q, p, g: (fpbma.kl_divergence(q, p), jax.grad(fpbma.kl_divergence)(q, p),
                                    fpbma.fisher_perturbation(q, g, 0.05, 1e-3),
                                    fpbma.inverse_fisher_vp(q, g, 1e-3)))
    kl, grad, delta, direction = step(q, p, g)
    for x in [kl, *jax.tree_util.tree_leaves((grad, delta, direction))]:
        assert np.all(np.isfinite(np.asarray(x)))
    # δ = std on every coordinate: the KL is dominated by ½ δᵀΣ_p⁻¹δ, of the order of P.
    assert 0.0 < float(kl) < 1e3 * fpbma.num_parameters(q.mean)
    np.testing.assert_allclose(fpbma.perturbation_kl(q, delta), 0.05 ** 2 / 2, rtol=0.05)
