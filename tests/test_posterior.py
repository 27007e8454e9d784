"""Posterior families against distrax's dense MultivariateNormalFullCovariance (an independent code path)."""

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import fpbma
from tests.posterior_utils import dense_cov, dense_mean, random_diag, random_low_rank, random_tree, ravel, SHAPES

SMALL = {"a": (3,), "b": (2, 2)}
BIG = {"a": (5, 6), "b": (20,)}  # P = 50


def _reference(q):
    return distrax.MultivariateNormalFullCovariance(dense_mean(q), dense_cov(q))


def _families():
    cases = [("diag", None, SHAPES), ("diag", None, BIG)]
    cases += [("lowrank", k, SHAPES) for k in range(2, 7)]
    cases += [("lowrank", 5, BIG)]
    return cases


def _make(family, k, shapes, key):
    return random_diag(key, shapes) if family == "diag" else random_low_rank(key, k, shapes)


@pytest.mark.parametrize("family,k,shapes", _families())
def test_log_prob_matches_dense_reference(family, k, shapes):
    with jax.enable_x64(True):
        q = _make(family, k, shapes, jax.random.PRNGKey(1))
        w = random_tree(jax.random.PRNGKey(2), shapes)
        expected = _reference(q).log_prob(ravel_pytree(w)[0])
        np.testing.assert_allclose(fpbma.log_prob(q, w), expected, rtol=1e-9)


@pytest.mark.parametrize("family,k,shapes", _families())
def test_kl_matches_dense_reference(family, k, shapes):
    with jax.enable_x64(True):
        q = _make(family, k, shapes, jax.random.PRNGKey(3))
        p = _make(family, k, shapes, jax.random.PRNGKey(4))
        expected = _reference(q).kl_divergence(_reference(p))
        got = fpbma.kl_divergence(q, p)
        np.testing.assert_allclose(got, expected, rtol=1e-8)
        assert got > 0
        np.testing.assert_allclose(fpbma.kl_divergence(q, q), 0.0, atol=1e-9)


def test_kl_between_different_ranks_matches_dense_reference():
    with jax.enable_x64(True):
        q = random_low_rank(jax.random.PRNGKey(5), 2)
        p = random_low_rank(jax.random.PRNGKey(6), 4)
        expected = _reference(q).kl_divergence(_reference(p))
        np.testing.assert_allclose(fpbma.kl_divergence(q, p), expected, rtol=1e-8)


@pytest.mark.parametrize("k_q,k_p,shapes", [(3, 3, SHAPES), (5, 2, BIG), (9, 10, SMALL)])
def test_low_rank_kl_gradients_match_dense_reference(k_q, k_p, shapes):
    """The hand-derived q-gradient (and the autodiff p-gradient) of the low-rank KL equal jax.grad of distrax's
    dense KL with Σ built from the same parameters; K = 9, 10 take the matmul branch of the K-mixing."""
    def dense_kl(q, p):
        return _reference(q).kl_divergence(_reference(p))

    with jax.enable_x64(True):
        q = random_low_rank(jax.random.PRNGKey(20), k_q, shapes)
        p = random_low_rank(jax.random.PRNGKey(21), k_p, shapes)
        got = jax.jit(jax.grad(fpbma.kl_divergence, (0, 1)))(q, p)
        expected = jax.jit(jax.grad(dense_kl, (0, 1)))(q, p)
        for argnum in (0, 1):
            for field in ("mean", "log_std", "cov_factor"):
                np.testing.assert_allclose(ravel(getattr(got[argnum], field)), ravel(getattr(expected[argnum], field)),
                                           rtol=1e-7, atol=1e-10, err_msg=f"d/d{'qp'[argnum]}.{field}")
        # Forward mode agrees with reverse mode (the custom JVP is one linear map for both).
        direction = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size, dtype=x.dtype)).reshape(x.shape), q)
        _, forward = jax.jit(lambda q_, d: jax.jvp(lambda x: fpbma.kl_divergence(x, p), (q_,), (d,)))(q, direction)
        np.testing.assert_allclose(forward, ravel(got[0]) @ ravel(direction), rtol=1e-9)


def test_kl_nonnegative_on_many_random_pairs():
    with jax.enable_x64(True):
        for seed in range(10):
            q = random_low_rank(jax.random.PRNGKey(100 + seed), 3)
            p = q._replace(mean=jax.tree.map(lambda m: m + 1e-3 * seed, q.mean))
            kl = fpbma.kl_divergence(q, p)
            assert kl >= 0
            # Same covariance: KL = ½ δᵀ Σ⁻¹ δ exactly.
            delta = ravel_pytree(jax.tree.map(jnp.subtract, p.mean, q.mean))[0]
            np.testing.assert_allclose(kl, 0.5 * delta @ jnp.linalg.solve(dense_cov(q), delta), rtol=1e-6, atol=1e-14)


@pytest.mark.parametrize("family", ["diag", "lowrank"])
def test_sample_moments_match_covariance(family):
    """Empirical mean/covariance of many samples match μ and Σ (Wishart standard error bound)."""
    shapes = {"a": (3,), "b": (2,)}
    q = random_diag(jax.random.PRNGKey(7), shapes, jnp.float32) if family == "diag" else \
        random_low_rank(jax.random.PRNGKey(7), 3, shapes, jnp.float32)
    n = 40000
    w = fpbma.sample(q, jax.random.PRNGKey(8), n)
    flat = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(w), np.float64)
    cov = np.asarray(dense_cov(q), np.float64)
    mean_se = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(flat.mean(0) - np.asarray(dense_mean(q))) < 5 * mean_se)
    emp = np.cov(flat.T)
    cov_se = np.sqrt((cov ** 2 + np.outer(np.diag(cov), np.diag(cov))) / n)  # Var of a sample covariance entry
    assert np.all(np.abs(emp - cov) < 5 * cov_se)


def test_tree_normal_like_shapes_dtypes_and_independent_leaves():
    """One flat draw cut into leaves: shapes kept, ≥ float32, leaves uncorrelated with unit variance."""
    tree = {"w": jnp.zeros((300, 200)), "b": jnp.zeros((), jnp.bfloat16), "c": [jnp.zeros((4, 1, 3), jnp.int32)]}
    z = fpbma.posterior.tree_normal_like(jax.random.PRNGKey(0), tree)
    assert jax.tree.structure(z) == jax.tree.structure(tree)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(z)] == [((), jnp.float32), ((4, 1, 3), jnp.float32),
                                                                  ((300, 200), jnp.float32)]
    w = np.asarray(z["w"], np.float64)
    n = w.size
    assert abs(w.mean()) < 5 / np.sqrt(n) and abs(w.var() - 1) < 5 * np.sqrt(2 / n)
    # adjacent leaves come from adjacent slices of one draw: they must not repeat or correlate
    halves = w.reshape(2, -1)
    assert abs(np.corrcoef(halves)[0, 1]) < 5 / np.sqrt(n / 2)
    z2 = fpbma.posterior.tree_normal_like(jax.random.PRNGKey(1), tree)
    assert not np.array_equal(z["w"], z2["w"])
    assert fpbma.posterior.tree_normal_like(jax.random.PRNGKey(0), {}) == {}


def test_sample_from_noise_is_deterministic_and_linear():
    q = random_low_rank(jax.random.PRNGKey(9), 3, dtype=jnp.float32)
    noise = fpbma.sample_noise(q, jax.random.PRNGKey(10))
    w1, w2 = fpbma.sample_from_noise(q, noise), fpbma.sample_from_noise(q, noise)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(w1), jax.tree.leaves(w2)))
    zero = fpbma.LowRankNoise(jax.tree.map(jnp.zeros_like, noise.diag), jnp.zeros_like(noise.rank))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(fpbma.sample_from_noise(q, zero)),
                                                    jax.tree.leaves(q.mean)))


def test_constructors():
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(2)}
    q = fpbma.DiagGaussian.from_point(params, 0.1)
    np.testing.assert_allclose(jnp.exp(q.log_std["w"]), 0.1, rtol=1e-6)
    lr = fpbma.LowRankGaussian.from_point(params, 0.1, rank=3)
    assert lr.cov_factor["w"].shape == (3, 2, 3) and lr.rank == 3
    # SWAG moments: σ² = E[w²] − E[w]² (clamped), D = deviations.
    traj = np.random.default_rng(0).normal(size=(8, 5))
    mean, sq = traj.mean(0), (traj ** 2).mean(0)
    dev = traj[-4:] - mean
    sw = fpbma.LowRankGaussian.from_swag_moments({"w": jnp.asarray(mean)}, {"w": jnp.asarray(sq)}, {"w": jnp.asarray(dev)})
    np.testing.assert_allclose(np.exp(2 * np.asarray(sw.log_std["w"])), traj.var(0), rtol=1e-4)
    np.testing.assert_allclose(sw.cov_factor["w"], dev, rtol=1e-6)


def test_bad_inputs_raise_clear_errors():
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="K >= 2"):
        fpbma.LowRankGaussian.from_point(params, 0.1, rank=1)
    q1 = fpbma.LowRankGaussian(params, {"w": jnp.zeros(3)}, {"w": jnp.ones((1, 3))})
    with pytest.raises(ValueError, match="K >= 2"):
        fpbma.log_prob(q1, params)
    with pytest.raises(ValueError, match="non-finite"):
        fpbma.DiagGaussian.from_point({"w": jnp.array([1.0, jnp.nan])}, 0.1)
    with pytest.raises(ValueError, match="non-finite"):
        fpbma.kl_divergence(fpbma.DiagGaussian(params, {"w": jnp.array([0.0, jnp.inf, 0.0])}),
                            fpbma.DiagGaussian.from_point(params, 1.0))
    with pytest.raises(ValueError, match="different tree structures"):
        fpbma.kl_divergence(fpbma.DiagGaussian.from_point(params, 1.0),
                            fpbma.DiagGaussian.from_point({"v": jnp.ones(3)}, 1.0))
    with pytest.raises(ValueError, match="differ in shape"):
        fpbma.kl_divergence(fpbma.DiagGaussian.from_point(params, 1.0),
                            fpbma.DiagGaussian.from_point({"w": jnp.ones(4)}, 1.0))
    with pytest.raises(TypeError, match="same family"):
        fpbma.kl_divergence(fpbma.DiagGaussian.from_point(params, 1.0),
                            fpbma.LowRankGaussian.from_point(params, 1.0, rank=2))
    with pytest.raises(ValueError, match="positive finite"):
        fpbma.DiagGaussian.from_point(params, -1.0)
    with pytest.raises(ValueError, match=r"expected \(K, \*"):
        fpbma.log_prob(fpbma.LowRankGaussian(params, {"w": jnp.zeros(3)}, {"w": jnp.ones((2, 4))}), params)


def test_jit_vmap_grad_pass_through():
    q = random_low_rank(jax.random.PRNGKey(11), 3, dtype=jnp.float32)
    p = random_low_rank(jax.random.PRNGKey(12), 3, dtype=jnp.float32)
    kl_eager = fpbma.kl_divergence(q, p)
    np.testing.assert_allclose(jax.jit(fpbma.kl_divergence)(q, p), kl_eager, rtol=1e-5)
    w = fpbma.sample(q, jax.random.PRNGKey(13), 4)
    lps = jax.vmap(lambda wi: fpbma.log_prob(q, wi))(w)
    np.testing.assert_allclose(lps[2], fpbma.log_prob(q, jax.tree.map(lambda x: x[2], w)), rtol=1e-5)
    g = jax.grad(fpbma.kl_divergence)(q, p)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g))
