"""FP-BMA optax transforms: SAM as the identity-metric special case, shared noise, skipping, jit/vmap/grad/pmean."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
from jax.flatten_util import ravel_pytree

import fpbma
from tests.posterior_utils import random_diag, random_low_rank


def _quadratic(params):
    a = jnp.array([[3.0, 0.5], [0.5, 1.0]])
    return 0.5 * params["x"] @ a @ params["x"] + jnp.sum(params["y"] ** 2 * jnp.array([2.0, 0.1, 1.0]))


def test_identity_metric_perturbation_matches_optax_sam():
    rho, lr = 0.1, 0.05
    params0 = {"x": jnp.array([1.0, -2.0]), "y": jnp.array([0.5, 1.5, -1.0])}
    grad = jax.grad(_quadratic)
    ours = optax.chain(fpbma.perturb_along_metric(rho, lambda p, g: g), optax.sgd(lr))
    ref = optax.contrib.sam(optax.sgd(lr), optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
                            sync_period=2, opaque_mode=True)
    p_ours, p_ref = params0, params0
    s_ours, s_ref = ours.init(params0), ref.init(params0)
    for _ in range(10):
        u, s_ours = ours.update(grad(p_ours), s_ours, p_ours, grad_fn=grad)
        p_ours = optax.apply_updates(p_ours, u)
        u, s_ref = ref.update(grad(p_ref), s_ref, p_ref, grad_fn=lambda p, i: grad(p))
        p_ref = optax.apply_updates(p_ref, u)
        np.testing.assert_allclose(ravel_pytree(p_ours)[0], ravel_pytree(p_ref)[0], rtol=1e-6)
    assert _quadratic(p_ours) < _quadratic(params0)


def _data(key, n=32, d=3):
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (n, d))
    return x, x @ jax.random.normal(kw, (d,)) + 0.1


def _loss_fn(x, y):
    return lambda w: jnp.mean((x @ w["w"] + w["b"] - y) ** 2)


def _posterior(family, dtype=jnp.float32):
    params = {"w": jnp.zeros(3, dtype), "b": jnp.zeros((), dtype)}
    return fpbma.DiagGaussian.from_point(params, 0.3) if family == "diag" else \
        fpbma.LowRankGaussian(params, jax.tree.map(lambda p: jnp.full_like(p, -1.0), params),
                              jax.tree.map(lambda p: 0.1 * jnp.ones((3,) + p.shape, dtype), params))


@pytest.mark.parametrize("family", ["diag", "lowrank"])
def test_both_passes_use_the_same_noise(family):
    """The perturbed pass sees the same ε: (w̃ − μ̃)/σ̃ equals (w − μ)/σ for the diagonal part."""
    x, y = _data(jax.random.PRNGKey(0))
    q = _posterior(family)
    noise = fpbma.sample_noise(q, jax.random.PRNGKey(1))
    seen = []

    def grad_fn(q_):
        seen.append((q_, fpbma.sample_from_noise(q_, noise)))
        return jax.grad(lambda t: fpbma.negative_elbo(t, noise, _loss_fn(x, y)))(q_)

    tx = fpbma.fpbma(0.1, rho=0.5, momentum=0.0)
    state = tx.init(q)
    updates, state = tx.update(grad_fn(q), state, q, grad_fn=grad_fn)
    (q0, w0), (q1, w1) = seen
    assert not np.allclose(ravel_pytree(q0)[0], ravel_pytree(q1)[0])  # really perturbed
    if family == "diag":
        for m0, s0, x0, m1, s1, x1 in zip(*map(jax.tree.leaves, (q0.mean, q0.log_std, w0, q1.mean, q1.log_std, w1))):
            np.testing.assert_allclose((x0 - m0) / jnp.exp(s0), (x1 - m1) / jnp.exp(s1), rtol=1e-5, atol=1e-6)
    # The update is −lr · ∇L(θ + Δ*) with the same noise, computed by hand.
    g = jax.grad(lambda t: fpbma.negative_elbo(t, noise, _loss_fn(x, y)))(q)
    delta = fpbma.fisher_perturbation(q, g, 0.5, damping=1e-3)
    g_adv = jax.grad(lambda t: fpbma.negative_elbo(t, noise, _loss_fn(x, y)))(jax.tree.map(jnp.add, q, delta))
    np.testing.assert_allclose(ravel_pytree(updates)[0], -0.1 * ravel_pytree(g_adv)[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("where", ["first", "perturbed"])
def test_non_finite_step_is_skipped_bit_identically(where):
    x, y = _data(jax.random.PRNGKey(2))
    q = _posterior("diag")
    noise = fpbma.sample_noise(q, jax.random.PRNGKey(3))
    good = jax.grad(lambda t: fpbma.negative_elbo(t, noise, _loss_fn(x, y)))
    tx = fpbma.fpbma(0.1, rho=0.1, momentum=0.9)
    state = tx.init(q)
    u, state = tx.update(good(q), state, q, grad_fn=good)  # one real step so momentum is non-zero
    q = optax.apply_updates(q, u)
    nan_tree = lambda t: jax.tree.map(lambda a: a * jnp.nan, t)
    first = nan_tree(good(q)) if where == "first" else good(q)
    grad_fn = good if where == "first" else (lambda t: nan_tree(good(t)))
    step = jax.jit(lambda q_, s_, g_: tx.update(g_, s_, q_, grad_fn=grad_fn))
    u, new_state = step(q, state, first)
    q_new = optax.apply_updates(q, u)
    for a, b in zip(jax.tree.leaves(q_new), jax.tree.leaves(q)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(new_state.inner_state), jax.tree.leaves(state.inner_state)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert int(new_state.num_skipped) == int(state.num_skipped) + 1 == 1


def test_jit_vmap_and_grad_pass_through_a_step():
    x, y = _data(jax.random.PRNGKey(4))
    # Eight radius evaluations converge τ to round-off, where the final Newton step's derivative is the
    # exact implicit derivative of the root (with the default four, τ is within 0.2 % and so is dτ/dθ).
    tx = fpbma.fpbma(0.05, rho=0.2, momentum=0.5, natural_gradient=True, radius_steps=8)

    def one_step(q, key):
        noise = fpbma.sample_noise(q, key)
        grad_fn = jax.grad(lambda t: fpbma.negative_elbo(t, noise, _loss_fn(x, y)))
        u, _ = tx.update(grad_fn(q), tx.init(q), q, grad_fn=grad_fn)
        return optax.apply_updates(q, u)

    with jax.enable_x64(True):
        q = _posterior("lowrank", jnp.float64)
        key = jax.random.PRNGKey(5)
        eager = one_step(q, key)
        np.testing.assert_allclose(ravel_pytree(jax.jit(one_step)(q, key))[0], ravel_pytree(eager)[0], rtol=1e-10)
        keys = jax.random.split(key, 3)
        batched = jax.vmap(one_step, in_axes=(None, 0))(q, keys)
        np.testing.assert_allclose(ravel_pytree(jax.tree.map(lambda a: a[1], batched))[0],
                                   ravel_pytree(one_step(q, keys[1]))[0], rtol=1e-10)
        # Meta-gradient through a whole step, against central finite differences.
        post_loss = lambda shift: fpbma.negative_elbo(one_step(q._replace(mean={"w": q.mean["w"] + shift, "b": q.mean["b"]}), key),
                                                      fpbma.sample_noise(q, key), _loss_fn(x, y))
        shift = jnp.array([0.1, -0.2, 0.05])
        g = jax.grad(post_loss)(shift)
        eps = 1e-6
        fd = np.array([(post_loss(shift + eps * e) - post_loss(shift - eps * e)) / (2 * eps) for e in np.eye(3)])
        np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-8)


def test_batch_axis_name_averages_like_one_big_batch():
    """4 shards under vmap(axis_name) + pmean give the same step as the full batch on one device."""
    x, y = _data(jax.random.PRNGKey(6), n=32)
    q = _posterior("diag")
    noise = fpbma.sample_noise(q, jax.random.PRNGKey(7))
    grad_of = lambda xb, yb: jax.grad(lambda t: fpbma.negative_elbo(t, noise, _loss_fn(xb, yb)))

    tx_full = fpbma.fpbma(0.1, rho=0.3)
    gf = grad_of(x, y)
    u_full, _ = tx_full.update(gf(q), tx_full.init(q), q, grad_fn=gf)

    tx_dp = fpbma.fpbma(0.1, rho=0.3, batch_axis_name="devices")

    def shard_step(xb, yb):
        g = grad_of(xb, yb)
        return tx_dp.update(g(q), tx_dp.init(q), q, grad_fn=g)[0]

    u_dp = jax.vmap(shard_step, axis_name="devices")(x.reshape(4, 8, 3), y.reshape(4, 8))
    for i in range(4):
        np.testing.assert_allclose(ravel_pytree(jax.tree.map(lambda a: a[i], u_dp))[0], ravel_pytree(u_full)[0],
                                   rtol=2e-5, atol=1e-7)


def test_rho_zero_is_plain_vi_and_momentum_matches_optax():
    """ρ = 0: FP-BMA is SGD-with-momentum on the negative ELBO (optax.sgd as the independent reference)."""
    x, y = _data(jax.random.PRNGKey(8))
    q = _posterior("diag")
    ours, ref = fpbma.fpbma(0.05, rho=0.0, momentum=0.9), optax.sgd(0.05, momentum=0.9)
    so, sr, qo, qr = ours.init(q), ref.init(q), q, q
    for i in range(5):
        noise = fpbma.sample_noise(q, jax.random.PRNGKey(10 + i))
        g = jax.grad(lambda t: fpbma.negative_elbo(t, noise, _loss_fn(x, y)))
        u, so = ours.update(g(qo), so, qo, grad_fn=g)
        qo = optax.apply_updates(qo, u)
        u, sr = ref.update(g(qr), sr, qr)
        qr = optax.apply_updates(qr, u)
    np.testing.assert_allclose(ravel_pytree(qo)[0], ravel_pytree(qr)[0], rtol=1e-6)


def test_natural_gradient_preconditions_by_inverse_fisher():
    q = random_diag(jax.random.PRNGKey(9), {"a": (4,)}, jnp.float32)
    g = jax.tree.map(jnp.ones_like, q)
    u, _ = fpbma.scale_by_inverse_fisher().update(g, optax.EmptyState(), q)
    np.testing.assert_allclose(u.mean["a"], jnp.exp(2 * q.log_std["a"]), rtol=1e-6)
    np.testing.assert_allclose(u.log_std["a"], 0.5, rtol=1e-6)


def test_weight_decay_acts_on_means_only():
    q = _posterior("diag")._replace(mean={"w": jnp.ones(3), "b": jnp.asarray(2.0)})
    zero = jax.tree.map(jnp.zeros_like, q)
    tx = fpbma.fpbma(1.0, rho=0.0, momentum=0.0, weight_decay=0.1)
    u, _ = tx.update(zero, tx.init(q), q, grad_fn=lambda _: zero)
    np.testing.assert_allclose(u.mean["w"], -0.1, rtol=1e-6)
    np.testing.assert_allclose(u.mean["b"], -0.2, rtol=1e-6)
    assert np.all(np.asarray(u.log_std["w"]) == 0)


@pytest.mark.parametrize("family", ["diag", "lowrank"])
def test_covariance_lr_scale_is_a_per_block_learning_rate(family):
    """c·η on (log σ, D), η on μ: equal to two optax.sgd runs with rates η and c·η on the same gradients."""
    x, y = _data(jax.random.PRNGKey(8))
    q = _posterior(family)
    ours, ref_mean, ref_cov = (fpbma.fpbma(0.05, rho=0.0, momentum=0.9, covariance_lr_scale=0.1),
                               optax.sgd(0.05, momentum=0.9), optax.sgd(0.005, momentum=0.9))
    so, sm, sc, qo = ours.init(q), ref_mean.init(q), ref_cov.init(q), q
    for i in range(4):
        noise = fpbma.sample_noise(q, jax.random.PRNGKey(20 + i))
        g = jax.grad(lambda t: fpbma.negative_elbo(t, noise, _loss_fn(x, y)))
        grads = g(qo)
        u, so = ours.update(grads, so, qo, grad_fn=g)
        um, sm = ref_mean.update(grads, sm, qo)
        uc, sc = ref_cov.update(grads, sc, qo)
        np.testing.assert_allclose(ravel_pytree(u.mean)[0], ravel_pytree(um.mean)[0], rtol=1e-6)
        np.testing.assert_allclose(ravel_pytree(u[1:])[0], ravel_pytree(uc[1:])[0], rtol=1e-5, atol=1e-10)
        qo = optax.apply_updates(qo, u)


@pytest.mark.parametrize("kwargs,match", [
    (dict(learning_rate=0.1, covariance_lr_scale=0.0), "covariance_lr_scale"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(learning_rate=0.1, rho=-0.1), "rho"),
    (dict(learning_rate=0.1, momentum=1.0), "momentum"),
    (dict(learning_rate=0.1, damping=float("nan")), "damping"),
    (dict(learning_rate=0.1, weight_decay=-1), "weight_decay"),
])
def test_invalid_hyperparameters_fail_at_build_time(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fpbma.fpbma(**kwargs)


def test_missing_grad_fn_is_a_clear_error():
    q = _posterior("diag")
    tx = fpbma.fpbma(0.1)
    with pytest.raises(ValueError, match="grad_fn"):
        tx.update(q, tx.init(q), q)


# ------------------------------------------------------------------------------------------------
# Plain VI (the ρ = 0 ablation) and the released code's perturbation.


@pytest.mark.parametrize("family", ["diag", "lowrank"])
def test_vi_equals_fpbma_at_rho_zero_step_for_step(family):
    """One gradient pass per step, the same parameters after every step as FP-BMA with ρ = 0 (two passes)."""
    x, y = _data(jax.random.PRNGKey(30))
    q = _posterior(family)
    kw = dict(momentum=0.9, weight_decay=0.01, covariance_lr_scale=0.1)
    plain, zero = fpbma.vi(0.05, **kw), fpbma.fpbma(0.05, rho=0.0, **kw)
    sv, sf, qv, qf = plain.init(q), zero.init(q), q, q
    calls = []
    for i in range(6):
        noise = fpbma.sample_noise(q, jax.random.PRNGKey(40 + i))
        g = jax.grad(lambda t: fpbma.negative_elbo(t, noise, _loss_fn(x, y)))
        u, sv = plain.update(g(qv), sv, qv, grad_fn=lambda t: calls.append(1) or g(t))
        qv = optax.apply_updates(qv, u)
        u, sf = zero.update(g(qf), sf, qf, grad_fn=g)
        qf = optax.apply_updates(qf, u)
        np.testing.assert_allclose(ravel_pytree(qv)[0], ravel_pytree(qf)[0], rtol=1e-6, atol=1e-8)
    assert not calls  # VI never evaluates a second gradient
    assert float(jnp.max(jnp.abs(ravel_pytree(qv)[0] - ravel_pytree(q)[0]))) > 1e-2


def test_vi_skips_a_non_finite_gradient():
    q = _posterior("diag")
    tx = fpbma.vi(0.1)
    state = tx.init(q)
    bad = jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), q)
    u, new = tx.update(bad, state, q)
    assert all(np.all(np.asarray(a) == 0) for a in jax.tree_util.tree_leaves(u))
    assert int(new.num_skipped) == 1


def _dense_score(q, w):
    """∇_θ log N(w; μ(θ), Σ(θ)) by jax.scipy's dense density (an independent route to fpbma.log_prob)."""
    from jax.flatten_util import ravel_pytree as rp
    from tests.posterior_utils import dense_cov, dense_mean

    return jax.grad(lambda q_: jax.scipy.stats.multivariate_normal.logpdf(rp(w)[0], dense_mean(q_), dense_cov(q_)))(q)


@pytest.mark.parametrize("family", ["diag", "lowrank"])
def test_released_perturbation_is_the_score_normalised_per_block(family):
    with jax.enable_x64(True):
        key = jax.random.PRNGKey(50)
        q = (random_diag(key) if family == "diag" else random_low_rank(key, rank=3))
        w = fpbma.sample(q, jax.random.PRNGKey(51))
        rho = 0.3
        eps = jax.jit(fpbma.released_perturbation)(q, w, rho)
        score = _dense_score(q, w)
        for name, e_block, s_block in zip(q._fields, eps, score):
            e, s = ravel_pytree(e_block)[0], ravel_pytree(s_block)[0]
            assert float(jnp.linalg.norm(s)) > 1e-3, name
            np.testing.assert_allclose(float(jnp.linalg.norm(e)), rho, rtol=1e-10, err_msg=name)
            np.testing.assert_allclose(e, rho * s / jnp.linalg.norm(s), rtol=1e-7, atol=1e-12, err_msg=name)


def test_released_perturbation_of_a_zero_score_block_is_zero():
    """At w = μ the mean score Σ⁻¹(w − μ) vanishes: ε_μ = 0 (the 1e-12 guard), the other blocks keep norm ρ."""
    q = random_diag(jax.random.PRNGKey(52), dtype=jnp.float32)
    eps = fpbma.released_perturbation(q, q.mean, 0.2)
    assert all(np.all(np.asarray(a) == 0) for a in jax.tree_util.tree_leaves(eps.mean))
    np.testing.assert_allclose(float(jnp.linalg.norm(ravel_pytree(eps.log_std)[0])), 0.2, rtol=1e-5)


@pytest.mark.parametrize("family", ["diag", "lowrank"])
def test_released_option_takes_the_gradient_at_the_score_perturbed_point(family):
    """fpbma(perturbation="released"), jitted: g̃ = ∇L(θ + ε(θ, w)), w = sample_from_noise(θ, noise), then −η g̃."""
    x, y = _data(jax.random.PRNGKey(53))
    q = _posterior(family)
    noise = fpbma.sample_noise(q, jax.random.PRNGKey(54))
    g = jax.grad(lambda t: fpbma.negative_elbo(t, noise, _loss_fn(x, y)))
    tx = fpbma.fpbma(0.1, rho=0.2, momentum=0.0, perturbation="released")
    u, _ = jax.jit(lambda q_, n_: tx.update(g(q_), tx.init(q_), q_, grad_fn=g, noise=n_))(q, noise)
    eps = fpbma.released_perturbation(q, fpbma.sample_from_noise(q, noise), 0.2)
    expected = jax.tree.map(lambda a: -0.1 * a, g(jax.tree.map(jnp.add, q, eps)))
    np.testing.assert_allclose(ravel_pytree(u)[0], ravel_pytree(expected)[0], rtol=1e-5, atol=1e-7)
    # It differs from FP-BMA's own step (the direction ignores the loss gradient).
    fisher = fpbma.fpbma(0.1, rho=0.2, momentum=0.0)
    u_f, _ = fisher.update(g(q), fisher.init(q), q, grad_fn=g)
    assert not np.allclose(ravel_pytree(u)[0], ravel_pytree(u_f)[0], rtol=1e-3)


def test_released_option_needs_the_noise_and_a_known_name():
    q = _posterior("diag")
    tx = fpbma.fpbma(0.1, perturbation="released")
    with pytest.raises(ValueError, match="pass noise="):
        tx.update(q, tx.init(q), q, grad_fn=lambda t: t)
    with pytest.raises(ValueError, match=r"perturbation='score' is not a perturbation; use one of \('fisher', "
                                         r"'released'\)"):
        fpbma.fpbma(0.1, perturbation="score")
