"""Fisher products and the Fisher-weighted perturbation against brute force (jax.hessian of the KL, Monte Carlo)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import fpbma
from tests.posterior_utils import random_diag, random_low_rank

SHAPES = {"a": (3,), "b": (2,)}  # P = 5, small enough for dense Hessians over θ


def _kl_hessian(q):
    """∇²_Δ KL(q_{θ+Δ} ‖ q_θ) at Δ = 0 on the flattened θ (the exact Fisher of q)."""
    theta, unravel = ravel_pytree(q)
    return jax.hessian(lambda d: fpbma.kl_divergence(unravel(theta + d), q))(jnp.zeros_like(theta)), unravel


def _ours_dense(q, fn, damping=0.0):
    theta, unravel = ravel_pytree(q)
    basis = jnp.eye(theta.size, dtype=theta.dtype)
    return jax.vmap(lambda e: ravel_pytree(fn(q, unravel(e), damping))[0])(basis).T


def _blocks(q):
    """Index masks of θ's mean block and covariance block in ravel_pytree(q) order."""
    mask = type(q)(*[jax.tree.map(lambda x, j=j: jnp.full(x.shape, j), f) for j, f in enumerate(q)])
    ids = np.asarray(ravel_pytree(mask)[0])
    return ids == 0, ids != 0


def test_diag_fisher_equals_kl_hessian():
    with jax.enable_x64(True):
        q = random_diag(jax.random.PRNGKey(0), SHAPES)
        h, _ = _kl_hessian(q)
        np.testing.assert_allclose(_ours_dense(q, fpbma.fisher_vp), h, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rank", [2, 3, 5])
def test_low_rank_fisher_blocks_equal_kl_hessian(rank):
    """Mean block: exactly Σ⁻¹. Cross blocks: 0. Covariance block: its exact diagonal (the promise)."""
    with jax.enable_x64(True):
        q = random_low_rank(jax.random.PRNGKey(rank), rank, SHAPES)
        h, _ = _kl_hessian(q)
        ours = _ours_dense(q, fpbma.fisher_vp)
        m, c = _blocks(q)
        np.testing.assert_allclose(ours[np.ix_(m, m)], h[np.ix_(m, m)], rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(h[np.ix_(m, c)], 0.0, atol=1e-10)  # Fisher-orthogonal blocks
        np.testing.assert_allclose(np.diag(ours[np.ix_(c, c)]), np.diag(h[np.ix_(c, c)]), rtol=1e-9, atol=1e-12)
        off = ours[np.ix_(c, c)] - np.diag(np.diag(ours[np.ix_(c, c)]))
        np.testing.assert_allclose(off, 0.0, atol=0)
        # The exact covariance block is singular (D ↦ D R invariance); ours is positive definite.
        assert np.linalg.eigvalsh(h[np.ix_(c, c)]).min() < 1e-8 * np.abs(h).max()
        assert np.diag(ours[np.ix_(c, c)]).min() > 0


@pytest.mark.parametrize("family", ["diag", "lowrank"])
def test_fisher_matches_monte_carlo_score_outer_product(family):
    """F = E[s sᵀ], s = ∇_θ log q_θ(w), w ~ q held fixed; within 5 standard errors per entry."""
    with jax.enable_x64(True):
        q = random_diag(jax.random.PRNGKey(3), SHAPES) if family == "diag" else \
            random_low_rank(jax.random.PRNGKey(3), 2, SHAPES, factor_scale=0.4)
        theta, unravel = ravel_pytree(q)
        n = 20000
        w = fpbma.sample(q, jax.random.PRNGKey(4), n)
        scores = jax.vmap(lambda wi: jax.grad(lambda t: fpbma.log_prob(unravel(t), wi))(theta))(w)
        outer = scores[:, :, None] * scores[:, None, :]
        mc, se = outer.mean(0), outer.std(0) / np.sqrt(n)
        ours = _ours_dense(q, fpbma.fisher_vp)
        if family == "diag":
            assert np.all(np.abs(mc - ours) < 5 * se + 1e-9)
        else:
            m, c = _blocks(q)
            assert np.all(np.abs(mc - ours)[np.ix_(m, m)] < 5 * se[np.ix_(m, m)])
            cd = np.where(c)[0]
            assert np.all(np.abs(mc[cd, cd] - ours[cd, cd]) < 5 * se[cd, cd])


@pytest.mark.parametrize("family,damping", [("diag", 0.0), ("diag", 0.3), ("lowrank", 0.0), ("lowrank", 1e-2)])
def test_inverse_fisher_inverts_fisher(family, damping):
    with jax.enable_x64(True):
        q = random_diag(jax.random.PRNGKey(5), SHAPES) if family == "diag" else random_low_rank(jax.random.PRNGKey(5), 3, SHAPES)
        theta, unravel = ravel_pytree(q)
        v = unravel(jax.random.normal(jax.random.PRNGKey(6), theta.shape, theta.dtype))
        back = fpbma.inverse_fisher_vp(q, fpbma.fisher_vp(q, v, damping), damping)
        np.testing.assert_allclose(ravel_pytree(back)[0], ravel_pytree(v)[0], rtol=1e-8, atol=1e-10)
        fwd = fpbma.fisher_vp(q, fpbma.inverse_fisher_vp(q, v, damping), damping)
        np.testing.assert_allclose(ravel_pytree(fwd)[0], ravel_pytree(v)[0], rtol=1e-8, atol=1e-10)


def _random_grad(q, key):
    theta, unravel = ravel_pytree(q)
    return unravel(jax.random.normal(key, theta.shape, theta.dtype))


@pytest.mark.parametrize("family", ["diag", "lowrank"])
def test_perturbation_lies_on_the_fisher_ellipsoid_and_is_optimal(family):
    with jax.enable_x64(True):
        q = random_diag(jax.random.PRNGKey(7), SHAPES) if family == "diag" else random_low_rank(jax.random.PRNGKey(7), 3, SHAPES)
        g = _random_grad(q, jax.random.PRNGKey(8))
        rho, damping = 0.05, 1e-3
        delta = fpbma.fisher_perturbation(q, g, rho, damping, radius="second_order")
        f_delta = fpbma.fisher_vp(q, delta, damping)
        d, fd, gv = ravel_pytree(delta)[0], ravel_pytree(f_delta)[0], ravel_pytree(g)[0]
        np.testing.assert_allclose(0.5 * d @ fd, rho ** 2 / 2, rtol=1e-10)
        best = gv @ d
        theta, unravel = ravel_pytree(q)
        for i in range(50):
            z = unravel(jax.random.normal(jax.random.PRNGKey(100 + i), theta.shape, theta.dtype))
            zv, fz = ravel_pytree(z)[0], ravel_pytree(fpbma.fisher_vp(q, z, damping))[0]
            other = rho * zv / np.sqrt(zv @ fz)
            assert gv @ other <= best + 1e-12
        # Closed-form optimum: gᵀΔ* = ρ √(gᵀ F⁻¹ g).
        fig = ravel_pytree(fpbma.inverse_fisher_vp(q, g, damping))[0]
        np.testing.assert_allclose(best, rho * np.sqrt(gv @ fig), rtol=1e-10)


def test_small_rho_perturbation_has_kl_rho_squared_over_two():
    """The exact closed-form KL(q_{θ+Δ*} ‖ q_θ) → ρ²/2 as ρ → 0 (relative error O(ρ))."""
    with jax.enable_x64(True):
        q = random_diag(jax.random.PRNGKey(9), SHAPES)
        g = _random_grad(q, jax.random.PRNGKey(10))
        for rho in [1e-2, 1e-3]:
            delta = fpbma.fisher_perturbation(q, g, rho)
            kl = fpbma.kl_divergence(jax.tree.map(jnp.add, q, delta), q)
            np.testing.assert_allclose(kl, rho ** 2 / 2, rtol=3 * rho)
        # Low-rank: exact on the mean block (where F is exact) ...
        lq = random_low_rank(jax.random.PRNGKey(11), 3, SHAPES)
        g = _random_grad(lq, jax.random.PRNGKey(12))
        g_mean = g._replace(log_std=jax.tree.map(jnp.zeros_like, g.log_std),
                            cov_factor=jax.tree.map(jnp.zeros_like, g.cov_factor))
        rho = 1e-3
        delta = fpbma.fisher_perturbation(lq, g_mean, rho)
        np.testing.assert_allclose(fpbma.kl_divergence(jax.tree.map(jnp.add, lq, delta), lq), rho ** 2 / 2, rtol=1e-6)
        # ... and in general KL ≈ ½ Δᵀ H Δ with the exact (brute-force) Hessian H.
        delta = fpbma.fisher_perturbation(lq, g, rho, damping=1e-3)
        h, _ = _kl_hessian(lq)
        dv = ravel_pytree(delta)[0]
        kl = fpbma.kl_divergence(jax.tree.map(jnp.add, lq, delta), lq)
        np.testing.assert_allclose(kl, 0.5 * dv @ h @ dv, rtol=10 * rho)


def test_perturbation_of_zero_gradient_is_zero():
    q = random_diag(jax.random.PRNGKey(13), SHAPES, jnp.float32)
    zero = jax.tree.map(jnp.zeros_like, q)
    assert all(np.all(x == 0) for x in jax.tree.leaves(fpbma.fisher_perturbation(q, zero, 0.1)))


def test_negative_damping_is_rejected():
    q = random_diag(jax.random.PRNGKey(14), SHAPES, jnp.float32)
    with pytest.raises(ValueError, match="damping"):
        fpbma.fisher_vp(q, q, damping=-1.0)
