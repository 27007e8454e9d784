"""The KL ball of FP-BMA's perturbation: q_{θ+Δ*} lies on KL(q_{θ+Δ*} ‖ q_θ) = ρ²/2 for every posterior.

The reference is the closed-form KL of :func:`fpbma.kl_divergence` at float64 (itself tested against
distrax's dense Gaussian); the cases are the ones the public API builds: DiagGaussian, and
LowRankGaussian with zero (``from_point``), tiny, partly zero (transfer init: body columns from SWAG,
head rows zero), ordinary and large deviation columns.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import fpbma
from tests.posterior_utils import random_diag, random_low_rank

CASES = ["diag", "zero", "tiny", "partly_zero", "ordinary", "large"]
RHOS = [0.01, 0.05, 0.5, 2.0, 10.0]


def _posterior(case, seed, dtype=jnp.float64, std=1e-2, rank=4):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    shapes = {"body": (20, 6), "head": (48, 7)}
    mean = {n: 0.1 * jax.random.normal(k[i], s, dtype) for i, (n, s) in enumerate(shapes.items())}
    log_std = jax.tree.map(lambda m: jnp.full(m.shape, np.log(std), dtype), mean)
    if case == "diag":
        return fpbma.DiagGaussian(mean, log_std)
    scale = {"zero": (0.0, 0.0), "tiny": (1e-5, 1e-5), "partly_zero": (std, 0.0),
             "ordinary": (std, std), "large": (10 * std, 10 * std)}[case]
    factor = {n: c * jax.random.normal(k[2 + i], (rank,) + s, dtype)
              for i, ((n, s), c) in enumerate(zip(shapes.items(), scale))}
    return fpbma.LowRankGaussian(mean, log_std, factor)


def _random_like(q, key):
    theta, unravel = ravel_pytree(q)
    return unravel(jax.random.normal(key, theta.shape, theta.dtype))


def _true_kl(q, delta):
    return float(fpbma.kl_divergence(jax.tree.map(jnp.add, q, delta), q))


@pytest.mark.parametrize("case", CASES)
def test_perturbed_posterior_lies_on_the_true_kl_ball(case):
    with jax.enable_x64(True):
        for seed in range(2):
            q = _posterior(case, seed)
            g = _random_like(q, jax.random.PRNGKey(100 + seed))
            for rho in RHOS:
                delta = fpbma.fisher_perturbation(q, g, rho, damping=1e-3)
                ratio = _true_kl(q, delta) / (rho ** 2 / 2)
                assert 0.5 <= ratio <= 2.0, (case, seed, rho, ratio)
                # The default four KL evaluations land within 1 % on all of them.
                assert abs(ratio - 1) < 1e-2, (case, seed, rho, ratio)


def test_random_posteriors_lie_on_the_ball():
    with jax.enable_x64(True):
        for seed in range(6):
            key = jax.random.PRNGKey(seed)
            q = random_diag(key) if seed % 3 == 0 else random_low_rank(key, 2 + seed % 3)
            g = _random_like(q, jax.random.fold_in(key, 1))
            for rho in RHOS:
                ratio = _true_kl(q, fpbma.fisher_perturbation(q, g, rho, damping=1e-3)) / (rho ** 2 / 2)
                # Within a factor 2 always; within 1 % below ρ = 2. At ρ ≥ 2 on these 16-parameter posteriors the
                # log σ step makes the KL grow like e^{2τr}, the hardest case for a four-evaluation search
                # (worst seen: 1.25 at ρ = 10).
                assert 0.5 <= ratio <= 2.0, (seed, rho, ratio)
                assert abs(ratio - 1) < (1e-2 if rho < 2 else 0.3), (seed, rho, ratio)


@pytest.mark.parametrize("case", ["zero", "tiny"])
def test_second_order_formula_leaves_the_ball_where_deviations_vanish(case):
    """The paper's Δ* (kept as radius='second_order') is ~10⁵–10⁶ γ away at D ≈ 0: what the default fixes."""
    with jax.enable_x64(True):
        q = _posterior(case, 0)
        g = _random_like(q, jax.random.PRNGKey(1))
        delta = fpbma.fisher_perturbation(q, g, 0.5, damping=1e-3, radius="second_order")
        assert _true_kl(q, delta) / (0.5 ** 2 / 2) > 1e3
        # ... and it is exactly ρ F⁻¹g/√(gᵀF⁻¹g), the second-order formula.
        fig = fpbma.inverse_fisher_vp(q, g, 1e-3)
        expected = fpbma.adversarial_perturbation(g, 0.5, fig)
        np.testing.assert_allclose(ravel_pytree(delta)[0], ravel_pytree(expected)[0], rtol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_direction_is_the_second_order_one_and_radius_agrees_where_the_ball_is_quadratic(case):
    with jax.enable_x64(True):
        q = _posterior(case, 3)
        g = _random_like(q, jax.random.PRNGKey(4))
        fig = ravel_pytree(fpbma.inverse_fisher_vp(q, g, 1e-3))[0]
        for rho in [0.01, 0.5]:
            d = ravel_pytree(fpbma.fisher_perturbation(q, g, rho, damping=1e-3))[0]
            cosine = d @ fig / (np.linalg.norm(d) * np.linalg.norm(fig))
            np.testing.assert_allclose(cosine, 1.0, atol=1e-12)
            if case in ("diag", "ordinary", "large") and rho == 0.01:
                # Here KL is quadratic over the step: both radius rules give the same Δ* to O(ρ).
                d2 = ravel_pytree(fpbma.fisher_perturbation(q, g, rho, damping=1e-3, radius="second_order"))[0]
                np.testing.assert_allclose(np.linalg.norm(d) / np.linalg.norm(d2), 1.0, rtol=0.05)


def test_from_point_posterior_at_large_rho_is_finite_and_on_the_ball():
    """The case that gave NaN: from_point, 150 weights, σ = 0.01, ρ = 2 (and up to 10), in float32."""
    q = fpbma.LowRankGaussian.from_point({"w": jnp.zeros((30, 5), jnp.float32)}, std=0.01, rank=4)
    g = _random_like(q, jax.random.PRNGKey(0))
    for rho in [2.0, 10.0]:
        delta = fpbma.fisher_perturbation(q, g, rho, damping=1e-3)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(delta))
        with jax.enable_x64(True):
            q64, d64 = (jax.tree.map(lambda x: x.astype(jnp.float64), t) for t in (q, delta))
            ratio = _true_kl(q64, d64) / (rho ** 2 / 2)
        assert 0.5 <= ratio <= 2.0, (rho, ratio)


@pytest.mark.parametrize("std", [1e-8, 1e-4])
@pytest.mark.parametrize("case", CASES)
def test_float32_finite_for_tiny_variances(case, std):
    q = _posterior(case, 5, jnp.float32, std=std)
    g = _random_like(q, jax.random.PRNGKey(6))
    for rho in [0.01, 10.0]:
        delta = jax.jit(lambda q_, g_: fpbma.fisher_perturbation(q_, g_, rho, damping=1e-3))(q, g)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(delta)), (case, std, rho)
        assert np.isfinite(float(fpbma.perturbation_kl(q, delta)))


@pytest.mark.parametrize("case", ["diag", "partly_zero", "large"])
def test_kl_along_line_equals_the_closed_form(case):
    """kl_along_line (the stable form the radius is solved on) against kl_divergence, float64."""
    with jax.enable_x64(True):
        q = _posterior(case, 7)
        d = jax.tree.map(lambda x: 0.3 * x, _random_like(q, jax.random.PRNGKey(8)))
        line = fpbma.kl_along_line(q, d)
        for tau in [1e-3, 0.05, 0.5, 2.0]:
            ref = fpbma.kl_divergence(jax.tree.map(lambda a, b: a + tau * b, q, d), q)
            # 1e-4: steps with |2τr| ≤ 0.1 take the K × K matrices from a third-order series (≤ 1e-3 by
            # construction, ~1e-5 here); larger ones are exact to round-off.
            np.testing.assert_allclose(line(tau), ref, rtol=1e-4 if tau < 0.5 else 1e-9)


def test_kl_along_line_is_accurate_in_float32_where_the_closed_form_is_not():
    """SWAG-like columns next to a small σ: the closed form gives KL(q ‖ q) ≈ 1 nat in float32."""
    p, k = 100_000, 5
    key = jax.random.split(jax.random.PRNGKey(0), 3)

    def build(dtype):
        return fpbma.LowRankGaussian({"w": 0.1 * jax.random.normal(key[0], (p,), dtype)},
                                     {"w": jnp.full((p,), np.log(1e-3), dtype)},
                                     {"w": 1e-2 * jax.random.normal(key[1], (k, p), dtype)})

    q32 = build(jnp.float32)
    g32 = jax.tree.map(lambda x: jax.random.normal(key[2], x.shape, x.dtype), q32)
    d32 = fpbma.inverse_fisher_vp(q32, g32, 1e-3)
    mq32 = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g32.mean), jax.tree.leaves(d32.mean)))
    assert float(fpbma.kl_divergence(q32, q32)) > 1e-2   # the closed form's round-off in float32
    with jax.enable_x64(True):
        q64 = build(jnp.float64)
        g64 = jax.tree.map(lambda x: x.astype(jnp.float64), g32)
        d64 = fpbma.inverse_fisher_vp(q64, g64, 1e-3)
        mq64 = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g64.mean), jax.tree.leaves(d64.mean)))
        for tau in [1e-5, 1e-3]:
            ref = float(fpbma.kl_along_line(q64, d64, mq64)(tau))
            ours = float(fpbma.kl_along_line(q32, d32, mq32)(jnp.float32(tau)))
            np.testing.assert_allclose(ours, ref, rtol=0.03)


def test_radius_search_traces_under_jit_vmap_and_pmean():
    q = _posterior("partly_zero", 9, jnp.float32)
    gs = jax.vmap(lambda k: _random_like(q, k))(jax.random.split(jax.random.PRNGKey(10), 3))
    batched = jax.jit(jax.vmap(lambda g: fpbma.fisher_perturbation(q, g, 0.5, damping=1e-3)))(gs)
    for i in range(3):
        one = fpbma.fisher_perturbation(q, jax.tree.map(lambda x: x[i], gs), 0.5, damping=1e-3)
        np.testing.assert_allclose(ravel_pytree(jax.tree.map(lambda x: x[i], batched))[0], ravel_pytree(one)[0],
                                   rtol=2e-4, atol=1e-9)
    # Under an axis name (as pmap runs it) the averaged gradient is perturbed identically on every device.
    tx = fpbma.perturb_in_kl_ball(0.5, damping=1e-3, batch_axis_name="d")
    grad_fn = lambda q_: jax.tree.map(jnp.ones_like, q_)
    out = jax.vmap(lambda g: tx.update(g, tx.init(q), q, grad_fn=grad_fn)[0], axis_name="d")(gs)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))


def test_fpbma_transform_uses_the_exact_radius_by_default():
    q = _posterior("zero", 11, jnp.float32)
    g = _random_like(q, jax.random.PRNGKey(12))
    seen = []

    def grad_fn(q_):
        seen.append(q_)
        return g

    for radius in ["exact_kl", "second_order"]:
        tx = fpbma.fpbma(0.1, rho=0.5, **({} if radius == "exact_kl" else {"radius": radius}))
        tx.update(g, tx.init(q), q, grad_fn=grad_fn)
    exact = fpbma.fisher_perturbation(q, g, 0.5, damping=1e-3)
    second = fpbma.fisher_perturbation(q, g, 0.5, 1e-3, "second_order")
    for perturbed, delta in zip(seen, [exact, second]):
        np.testing.assert_allclose(ravel_pytree(perturbed)[0], ravel_pytree(jax.tree.map(jnp.add, q, delta))[0],
                                   rtol=1e-6, atol=1e-9)
    assert float(fpbma.perturbation_kl(q, exact)) < 2 * 0.125 < float(fpbma.perturbation_kl(q, second))
    # A step still trains: the update is −lr · g at the perturbed point.
    tx = fpbma.fpbma(0.1, rho=0.5, momentum=0.0)
    updates, _ = tx.update(g, tx.init(q), q, grad_fn=lambda q_: g)
    np.testing.assert_allclose(ravel_pytree(optax.apply_updates(q, updates))[0],
                               ravel_pytree(q)[0] - 0.1 * ravel_pytree(g)[0], rtol=1e-6)


def test_bad_radius_rule_is_rejected_when_built():
    with pytest.raises(ValueError, match="radius='exact'.*exact_kl"):
        fpbma.fpbma(0.1, radius="exact")
    with pytest.raises(ValueError, match="radius_steps"):
        fpbma.perturb_in_kl_ball(0.1, radius_steps=0)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("radius", ["exact_kl", "second_order"])
def test_mean_only_ball_moves_the_means_by_a_mahalanobis_step_exactly_on_the_ball(case, radius):
    from tests.posterior_utils import dense_cov, ravel

    with jax.enable_x64(True):
        q = _posterior(case, 0)
        g = _random_like(q, jax.random.PRNGKey(7))
        for rho in (0.05, 2.0):
            delta = fpbma.fisher_perturbation(q, g, rho, damping=1e-3, radius=radius, blocks="mean")
            # Only the means move; the KL of a pure mean shift is ½ ΔμᵀΣ⁻¹Δμ, so the ball is met exactly.
            for name in delta._fields[1:]:
                assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree_util.tree_leaves(getattr(delta, name)))
            assert _true_kl(q, delta) == pytest.approx(rho ** 2 / 2, rel=1e-6)
            # Direction Σ g_μ with Σ the dense covariance built independently; length ρ/√(g_μᵀΣg_μ).
            cov, g_mu = dense_cov(q), ravel(g.mean)
            expected = rho * cov @ g_mu / np.sqrt(g_mu @ cov @ g_mu)
            np.testing.assert_allclose(ravel(delta.mean), expected, rtol=1e-6, atol=1e-12)


def test_mean_only_ball_is_a_documented_option_of_the_transform():
    q = _posterior("ordinary", 0, dtype=jnp.float32)
    loss = lambda q_: jnp.sum(q_.mean["body"] ** 2) + jnp.sum(jnp.exp(q_.log_std["head"]))  # noqa: E731
    g = jax.grad(loss)(q)
    tx = fpbma.perturb_in_kl_ball(0.5, damping=1e-3, blocks="mean")
    seen = []
    tx.update(g, tx.init(q), q, grad_fn=lambda p: seen.append(p) or jax.grad(loss)(p))
    moved = jax.tree.map(jnp.subtract, seen[0], q)
    np.testing.assert_allclose(jax.tree_util.tree_leaves(moved.mean)[0],
                               jax.tree_util.tree_leaves(fpbma.fisher_perturbation(q, g, 0.5, 1e-3, blocks="mean").mean)[0],
                               rtol=1e-3, atol=1e-8)  # float32: (θ + Δ) − θ loses the low bits of Δ
    assert float(jnp.abs(moved.log_std["head"]).max()) == 0.0
    with pytest.raises(ValueError, match=r"blocks='cov' is not a perturbation block choice; use one of \('all', 'mean'\)"):
        fpbma.fpbma(0.1, blocks="cov")
    with pytest.raises(ValueError, match="applies to the Fisher perturbation"):
        fpbma.fpbma(0.1, perturbation="released", blocks="mean")
