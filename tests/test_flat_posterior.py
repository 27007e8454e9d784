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


# ----------------------------------------------------------------------------------------------
# The step on flat buffers: FlatLayout, on_flat_posterior, make_train_step and the variational adapter
# against the same computation on the tree (an independent path: no flattening anywhere).


def _tree_fpbma(lr, rho, momentum=0.9, weight_decay=0.0):
    """fpbma.fpbma's chain without on_flat_posterior: every operation leaf by leaf on the tree."""
    from fpbma import transforms as T
    import optax

    parts = [T.perturb_in_kl_ball(rho, 1e-3)]
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask=T._mean_only_mask))
    parts += [optax.trace(decay=momentum), optax.scale_by_learning_rate(lr)]
    return T.skip_non_finite(optax.chain(*parts))


def _quadratic_loss(w):
    """A loss that couples every leaf: ½‖A·ravel(w) − 1‖² with a fixed random A."""
    flat = ravel_pytree(w)[0]
    a = jax.random.normal(jax.random.PRNGKey(7), (6, flat.shape[0])) / np.sqrt(flat.shape[0])
    return 0.5 * jnp.sum((a @ flat - 1.0) ** 2)


def test_flat_layout_leaves_and_their_gradient_equal_unravel():
    q = random_low_rank(jax.random.PRNGKey(1), K, MANY, dtype=jnp.float32)
    layout = fpbma.FlatLayout(q.mean)
    flat = layout.ravel(q.mean)
    leaves = jax.jit(layout.leaves)(flat)
    for a, b in zip(jax.tree_util.tree_leaves(leaves), jax.tree_util.tree_leaves(q.mean), strict=True):
        np.testing.assert_array_equal(a, b)
    # the conditional that keeps the leaves materialised is differentiated through like unravel
    g_leaves = jax.jit(jax.grad(lambda f: _quadratic_loss(layout.leaves(f))))(flat)
    g_tree = ravel(jax.grad(_quadratic_loss)(q.mean))
    np.testing.assert_allclose(g_leaves, g_tree, rtol=1e-5, atol=1e-6)
    back = layout.unflatten(layout.flatten(q))
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(q), strict=True):
        np.testing.assert_array_equal(a, b)


def test_on_flat_posterior_fpbma_follows_the_tree_chain_step_by_step():
    """Five FP-BMA steps (exact-KL radius, momentum, weight decay) with the optimizer on flat buffers equal
    the same chain run leaf by leaf, and the momentum is held as one buffer per field."""
    import optax

    q0 = random_low_rank(jax.random.PRNGKey(2), K, MANY, dtype=jnp.float32)
    prior = random_low_rank(jax.random.PRNGKey(3), K, MANY, dtype=jnp.float32)
    flat_tx, tree_tx = fpbma.fpbma(0.05, rho=0.1, weight_decay=1e-3), _tree_fpbma(0.05, 0.1, weight_decay=1e-3)
    runs = {}
    for name, tx in (("flat", flat_tx), ("tree", tree_tx)):
        q, state = q0, tx.init(q0)
        for key in jax.random.split(jax.random.PRNGKey(4), 5):
            noise = fpbma.sample_noise(q, key)
            grad_fn = jax.grad(lambda t: fpbma.negative_elbo(t, noise, _quadratic_loss, prior, num_data=20))
            updates, state = jax.jit(lambda g, s, q_: tx.update(g, s, q_, grad_fn=grad_fn))(grad_fn(q), state, q)
            q = optax.apply_updates(q, updates)
        runs[name] = (q, state)
    (q_flat, s_flat), (q_tree, _) = runs["flat"], runs["tree"]
    assert int(s_flat.num_skipped) == 0
    assert len(jax.tree_util.tree_leaves(s_flat.inner_state)) == 3        # μ, log σ, D momentum buffers
    for a, b in zip(jax.tree_util.tree_leaves(q_flat), jax.tree_util.tree_leaves(q_tree), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    assert float(jnp.max(jnp.abs(ravel(q_flat.mean) - ravel(q0.mean)))) > 1e-2      # the steps moved θ


def test_make_train_step_on_flat_buffers_equals_the_tree_step():
    """The library step holds θ flat for fpbma.fpbma (a transform that takes flat posteriors) and leaf by
    leaf for the same chain without the wrapper; three steps agree, and the state keeps its tree."""
    from fpbma import parallel

    q0 = random_low_rank(jax.random.PRNGKey(5), K, MANY, dtype=jnp.float32)
    prior = random_low_rank(jax.random.PRNGKey(6), K, MANY, dtype=jnp.float32)

    def loss_fn(w, model_state, batch, key):
        return _quadratic_loss(w) * batch["scale"], model_state

    out = {}
    for name, tx in (("flat", fpbma.fpbma(0.05, rho=0.1)), ("tree", _tree_fpbma(0.05, 0.1))):
        step = jax.jit(parallel.make_train_step(loss_fn, tx, prior=prior, num_data=20))
        state = parallel.TrainState.create(q0, tx, {})
        for i in range(3):
            state, metrics = step(state, {"scale": jnp.float32(1.0)}, jax.random.PRNGKey(i))
        out[name] = (state, metrics)
    (flat, m_flat), (tree, m_tree) = out["flat"], out["tree"]
    assert jax.tree.structure(flat.params) == jax.tree.structure(q0)
    assert float(m_flat["loss"]) == pytest.approx(float(m_tree["loss"]), rel=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(flat.params), jax.tree_util.tree_leaves(tree.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_the_variational_adapter_on_flat_buffers_equals_the_tree_step():
    """The method interface's FP-BMA trainer (θ flat inside the step) against a hand-written tree step."""
    import optax

    from fpbma import methods

    q0 = random_low_rank(jax.random.PRNGKey(8), K, MANY, dtype=jnp.float32)
    prior = random_low_rank(jax.random.PRNGKey(9), K, MANY, dtype=jnp.float32)
    kl = lambda q: post.kl_divergence(q, prior)  # noqa: E731
    loss = lambda w, batch, key: _quadratic_loss(w)  # noqa: E731
    problem = methods.plain_problem(loss, q0.mean, 20, posterior=q0, kl=kl)
    trainer = methods.get("fpbma").trainer(problem, learning_rate=0.05, num_steps=3, rho=0.1, momentum=0.9,
                                           covariance_lr_scale=1.0)
    state = trainer.init()
    tx = _tree_fpbma(0.05, 0.1)
    q, opt = q0, tx.init(q0)
    step = jax.jit(trainer.step)
    for i in range(3):
        key = jax.random.PRNGKey(10 + i)
        state = step(state, None, key)
        k_noise, _ = jax.random.split(key)
        noise = fpbma.sample_noise(q, k_noise)
        grad_fn = jax.grad(lambda t: _quadratic_loss(fpbma.sample_from_noise(t, noise)) + kl(t) / 20)
        updates, opt = tx.update(grad_fn(q), opt, q, grad_fn=grad_fn)
        q = optax.apply_updates(q, updates)
    result = trainer.finalize(state)
    for a, b in zip(jax.tree_util.tree_leaves(result), jax.tree_util.tree_leaves(q), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
