"""Last-layer Laplace: precision = exact Hessian at the MAP + prior precision; marginal likelihood; sampling."""


import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from fpbma.types import draw

from fpbma.baselines import _laplace as laplace


def _data(num_classes, n=40, h=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, h)).astype(np.float32)
    y = rng.integers(0, num_classes, size=n)
    return jnp.asarray(x), jnp.asarray(y)


def _head(params, phi):
    return phi @ params["w"] + params["b"]


def _nll(params, x, y, likelihood):
    f = _head(params, x)
    if likelihood == "bernoulli":
        f = f[:, 0]
        return jnp.sum(jax.nn.softplus(f) - y * f)
    return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(f), y[:, None], axis=1))


def _map(x, y, likelihood, delta, out):
    """MAP of NLL + δ/2‖θ‖² by Newton's method with the exact Hessian."""
    theta0 = {"w": jnp.zeros((x.shape[1], out)), "b": jnp.zeros((out,))}
    flat, unravel = ravel_pytree(theta0)
    obj = lambda t: _nll(unravel(t), x, y, likelihood) + 0.5 * delta * t @ t  # noqa: E731
    newton = jax.jit(lambda t: t - jnp.linalg.solve(jax.hessian(obj)(t), jax.grad(obj)(t)))
    for _ in range(12):
        flat = newton(flat)
    assert float(jnp.max(jnp.abs(jax.grad(obj)(flat)))) < 1e-4
    return unravel(flat), obj


@pytest.mark.parametrize("likelihood, out, classes", [("bernoulli", 1, 2), ("categorical", 3, 3)])
def test_precision_is_exact_hessian_at_map_plus_prior(likelihood, out, classes):
    x, y = _data(classes)
    delta = 0.7
    theta, _ = _map(x, y, likelihood, delta, out)
    fit = laplace.fit_last_layer_laplace(_head, theta, x, y, likelihood=likelihood, prior_precision=delta)
    flat, unravel = ravel_pytree(theta)
    hessian = jax.hessian(lambda t: _nll(unravel(t), x, y, likelihood))(flat)
    expected = np.asarray(hessian) + delta * np.eye(flat.shape[0])
    np.testing.assert_allclose(np.asarray(fit.posterior.precision), expected, rtol=1e-4, atol=1e-4)
    assert fit.prior_precision == delta


def test_marginal_likelihood_selection_matches_brute_force():
    x, y = _data(2, n=60, seed=1)
    theta, _ = _map(x, y, "bernoulli", 1.0, 1)
    grid = np.logspace(-2, 2, 9)
    fit = laplace.fit_last_layer_laplace(_head, theta, x, y, likelihood="bernoulli", prior_precision_grid=grid)
    flat, unravel = ravel_pytree(theta)
    h = np.asarray(jax.hessian(lambda t: _nll(unravel(t), x, y, "bernoulli"))(flat), np.float64)
    nll = float(_nll(theta, x, y, "bernoulli"))
    d = flat.shape[0]
    th = np.asarray(flat, np.float64)
    # log p(D|θ*) + log N(θ*; 0, δ⁻¹I) + D/2 log 2π − ½ log|H + δI|, with a dense slogdet.
    brute = np.array([-nll + (-0.5 * d * np.log(2 * np.pi) + 0.5 * d * np.log(g) - 0.5 * g * th @ th)
                      + 0.5 * d * np.log(2 * np.pi) - 0.5 * np.linalg.slogdet(h + g * np.eye(d))[1] for g in grid])
    np.testing.assert_allclose(fit.scores, brute, rtol=1e-4, atol=1e-3)
    assert fit.prior_precision == grid[np.argmax(brute)]


def test_validation_selection_picks_lowest_val_nll():
    x, y = _data(3, n=50, seed=2)
    xv, yv = _data(3, n=30, seed=3)
    theta, _ = _map(x, y, "categorical", 1.0, 3)
    grid = [1e-3, 1.0, 1e3]
    key = jax.random.PRNGKey(0)
    fit = laplace.fit_last_layer_laplace(_head, theta, x, y, prior_precision_grid=grid, selection="val",
                                         val_features=xv, val_labels=yv, key=key, num_samples=50)
    nlls = []
    for g in grid:
        post = laplace.fit_last_layer_laplace(_head, theta, x, y, prior_precision=g).posterior
        p = laplace.mc_predictive(_head, post, xv, key, 50)
        nlls.append(-np.mean(np.log(np.asarray(p)[np.arange(30), np.asarray(yv)])))
    np.testing.assert_allclose(-fit.scores, nlls, rtol=1e-4)
    assert fit.prior_precision == grid[int(np.argmin(nlls))]


def test_full_gaussian_sampling_and_log_density():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(4, 4))
    precision = jnp.asarray(a @ a.T + 2 * np.eye(4), jnp.float32)
    mean = {"w": jnp.asarray([[1.0, -1.0], [0.5, 0.0]]) }
    q = laplace.FullGaussian(mean, precision)
    ref = distrax.MultivariateNormalFullCovariance(jnp.ravel(mean["w"]), jnp.linalg.inv(precision))
    value = {"w": jnp.asarray([[0.3, 0.1], [-0.2, 0.4]])}
    np.testing.assert_allclose(float(q.log_prob(value)), float(ref.log_prob(jnp.ravel(value["w"]))), rtol=1e-4)
    n = 40000
    s = np.asarray(draw(q, jax.random.PRNGKey(1), n)["w"]).reshape(n, 4)
    cov = np.linalg.inv(np.asarray(precision, np.float64))
    sd = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov ** 2) / n)
    assert np.all(np.abs(np.cov(s.T) - cov) < 5 * sd)


def test_last_layer_posterior_replaces_only_the_head():
    params = {"body": {"k": jnp.ones(3)}, "head": {"w": jnp.zeros((2, 1)), "b": jnp.zeros(1)}}
    head = laplace.FullGaussian(params["head"], jnp.eye(3))
    posterior = laplace.last_layer_posterior(params, ("head",), head)
    w = draw(posterior, jax.random.PRNGKey(0), 5)
    np.testing.assert_array_equal(np.asarray(w["body"]["k"]), np.ones((5, 3)))
    assert np.asarray(w["head"]["w"]).shape == (5, 2, 1) and np.std(np.asarray(w["head"]["w"])) > 0.1
    with pytest.raises(KeyError, match="classifier"):
        laplace.last_layer_posterior(params, ("classifier",), head)


def test_laplace_rejects_bad_inputs():
    x, y = _data(2)
    theta = {"w": jnp.zeros((3, 1)), "b": jnp.zeros(1)}
    with pytest.raises(ValueError, match="likelihood"):
        laplace.fit_last_layer_laplace(_head, theta, x, y, likelihood="gaussian")
    with pytest.raises(ValueError, match="prior_precision"):
        laplace.fit_last_layer_laplace(_head, theta, x, y, likelihood="bernoulli", prior_precision=0.0)
    with pytest.raises(ValueError, match="val_features"):
        laplace.fit_last_layer_laplace(_head, theta, x, y, likelihood="bernoulli", selection="val")
