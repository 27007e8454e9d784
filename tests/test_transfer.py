"""Tests of the Bayesian transfer scheme (fpbma.transfer): partition, prior marginals, head init, KL.

Every method on the scheme: tests/test_methods.py (the shared harness)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fpbma import posterior as post
from fpbma import transfer
from tests.method_utils import tiny_transfer_problem as _tiny_problem
from fpbma.types import point_mass

K = 3


def _params():
    """A tiny parameter tree with a convolution, two normalisation layers and a head."""
    shapes = {"conv1": {"kernel": (3, 3, 1, 2)}, "bn1": {"scale": (2,), "bias": (2,)},
              "layer1_0": {"conv1": {"kernel": (3, 3, 2, 2)}, "bn1": {"scale": (2,), "bias": (2,)}},
              "head": {"kernel": (2, 3), "bias": (3,)}}
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, s) for k, s in zip(keys, leaves)])


def _prior(params, key=jax.random.PRNGKey(1)):
    body, _ = transfer._split_head(params)
    k1, k2, k3 = jax.random.split(key, 3)
    leaves, treedef = jax.tree.flatten(body)
    n = len(leaves)
    mean = jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape)
                                        for k, x in zip(jax.random.split(k1, n), leaves)])
    log_std = jax.tree.unflatten(treedef, [-1.0 + 0.3 * jax.random.normal(k, x.shape)
                                           for k, x in zip(jax.random.split(k2, n), leaves)])
    cov = jax.tree.unflatten(treedef, [0.2 * jax.random.normal(k, (K,) + x.shape)
                                       for k, x in zip(jax.random.split(k3, n), leaves)])
    return post.LowRankGaussian(mean, log_std, cov)


def _paths(tree):
    return set(traverse_util.flatten_dict(tree)) if tree else set()


@pytest.mark.parametrize("scheme", ["nl_ll", "last_layer", "full"])
def test_partition_covers_every_leaf_exactly_once(scheme):
    params = _params()
    s = transfer.make_scheme(_prior(params), params, scheme)
    kl, frozen, head = _paths(s.kl_prior.mean), _paths(s.frozen_prior.mean), _paths(s.head)
    assert not (kl & frozen) and not (kl & head) and not (frozen & head)
    assert kl | frozen | head == _paths(params)
    expected_subset = {"nl_ll": {p for p in _paths(params) if "bn1" in p or p[0] == "head"},
                       "last_layer": {p for p in _paths(params) if p[0] == "head"},
                       "full": _paths(params)}[scheme]
    assert kl | head == expected_subset
    # The merged network of a draw has exactly the network's leaves and shapes.
    sampler = transfer.sample_weights(s, point_mass(transfer.init_point(s)))
    merged = sampler(jax.random.PRNGKey(2))["params"]
    assert jax.tree.map(jnp.shape, merged) == jax.tree.map(jnp.shape, params)


def _marginal(q, path):
    """Mean and variance ½(σ² + Σ_k D_k²/(K−1)) of one leaf of a LowRankGaussian, by the formula."""
    m = traverse_util.flatten_dict(q.mean)[path]
    s = traverse_util.flatten_dict(q.log_std)[path]
    d = traverse_util.flatten_dict(q.cov_factor)[path]
    return np.asarray(m), 0.5 * (np.exp(2 * np.asarray(s)) + np.sum(np.asarray(d) ** 2, 0) / (d.shape[0] - 1))


def test_frozen_weights_are_drawn_from_the_prior_marginal():
    params = _params()
    prior = _prior(params)
    s = transfer.make_scheme(prior, params, "nl_ll")
    point = transfer.init_point(s)
    sampler = jax.jit(jax.vmap(transfer.sample_weights(s, point_mass(point))))
    draws = sampler(jax.random.split(jax.random.PRNGKey(3), 20000))["params"]
    path = ("layer1_0", "conv1", "kernel")  # frozen under nl_ll
    x = np.asarray(traverse_util.flatten_dict(draws)[path])
    mean, var = _marginal(prior, path)
    n = x.shape[0]
    # Sample mean within 5 standard errors; sample variance within 5 standard errors of a Gaussian's (√(2/n) var).
    assert np.all(np.abs(x.mean(0) - mean) < 5 * np.sqrt(var / n))
    assert np.all(np.abs(x.var(0) - var) < 5 * np.sqrt(2.0 / n) * var)
    # Draws of one frozen leaf vary (sampled every time), subset leaves equal the point estimate.
    assert x.std(0).min() > 0.1 * np.sqrt(var.min())
    bn = np.asarray(traverse_util.flatten_dict(draws)[("bn1", "scale")])
    np.testing.assert_array_equal(bn, np.broadcast_to(traverse_util.flatten_dict(point)[("bn1", "scale")], bn.shape))
    # The correlation between coordinates of the frozen leaf follows the low-rank prior covariance.
    d = np.asarray(traverse_util.flatten_dict(prior.cov_factor)[path]).reshape(K, -1)
    cov01 = 0.5 * d[:, 0] @ d[:, 1] / (K - 1)
    flat = x.reshape(n, -1)
    emp = np.mean((flat[:, 0] - flat[:, 0].mean()) * (flat[:, 1] - flat[:, 1].mean()))
    assert abs(emp - cov01) < 5 * np.sqrt(var.ravel()[0] * var.ravel()[1] / n)


def test_posterior_init_is_the_prior_marginal_with_a_fresh_head():
    params = _params()
    prior = _prior(params)
    alpha = 3e-4
    s = transfer.make_scheme(prior, params, "nl_ll", alpha=alpha)
    q = transfer.init_posterior(s)
    head_mean = traverse_util.flatten_dict(q.mean)
    for p in (("head", "kernel"), ("head", "bias")):
        np.testing.assert_array_equal(head_mean[p], 0.0)
        np.testing.assert_allclose(np.exp(2 * traverse_util.flatten_dict(q.log_std)[p]), alpha, rtol=1e-6)
        np.testing.assert_array_equal(traverse_util.flatten_dict(q.cov_factor)[p], 0.0)
        assert traverse_util.flatten_dict(q.cov_factor)[p].shape == (K,) + params["head"][p[1]].shape
    for p in (("bn1", "scale"), ("layer1_0", "bn1", "bias")):
        for field_q, field_p in zip(q, prior):
            np.testing.assert_array_equal(traverse_util.flatten_dict(field_q)[p], traverse_util.flatten_dict(field_p)[p])


def _dense(q, paths):
    m = np.concatenate([np.ravel(traverse_util.flatten_dict(q.mean)[p]) for p in paths])
    s2 = np.concatenate([np.ravel(np.exp(2 * traverse_util.flatten_dict(q.log_std)[p])) for p in paths])
    d = np.concatenate([np.asarray(traverse_util.flatten_dict(q.cov_factor)[p]).reshape(K, -1) for p in paths], 1)
    return m.astype(np.float64), 0.5 * (np.diag(s2) + d.T @ d / (K - 1))


def _kl_dense(mq, sq, mp, sp):
    sp_inv = np.linalg.inv(sp)
    delta = mp - mq
    return 0.5 * (np.trace(sp_inv @ sq) + delta @ sp_inv @ delta - mq.size
                  + np.linalg.slogdet(sp)[1] - np.linalg.slogdet(sq)[1])


def test_kl_excludes_the_head_and_matches_brute_force():
    params = _params()
    prior = _prior(params)
    s = transfer.make_scheme(prior, params, "nl_ll")
    q = transfer.init_posterior(s)
    # Move q away from the prior everywhere, head included.
    q = post.LowRankGaussian(*[jax.tree.map(lambda x, k=i: x + 0.1 * jnp.sin(jnp.arange(x.size).reshape(x.shape) + k),
                                            field) for i, field in enumerate(q)])
    body_paths = sorted(_paths(s.kl_prior.mean))
    mq, sq = _dense(q, body_paths)
    mp, sp = _dense(prior, body_paths)
    expected = _kl_dense(mq, sq, mp, sp)
    np.testing.assert_allclose(float(transfer.kl_to_prior(s, q)), expected, rtol=1e-4)
    # Changing the head leaves the KL unchanged; changing a normalisation leaf changes it.
    moved_head = q._replace(mean={**q.mean, "head": jax.tree.map(lambda x: x + 5.0, q.mean["head"])})
    assert float(transfer.kl_to_prior(s, moved_head)) == pytest.approx(float(transfer.kl_to_prior(s, q)), rel=1e-6)
    moved_bn = q._replace(mean={**q.mean, "bn1": jax.tree.map(lambda x: x + 1.0, q.mean["bn1"])})
    assert float(transfer.kl_to_prior(s, moved_bn)) > float(transfer.kl_to_prior(s, q)) + 1.0
    # A head-only subset has no KL term.
    assert float(transfer.kl_to_prior(transfer.make_scheme(prior, params, "last_layer"), q)) == 0.0


def test_head_features_are_the_head_input():
    model, stats, scheme, apply_fn, features, x, y = _tiny_problem()
    params = transfer.full_params(transfer.init_point(scheme), transfer.frozen_mean(scheme))
    params = {**params, "head": {"kernel": jnp.ones((6, 3)), "bias": jnp.arange(3.0)}}
    phi = features(params, x)
    np.testing.assert_allclose(apply_fn(params, x), phi @ params["head"]["kernel"] + params["head"]["bias"],
                               rtol=1e-5, atol=1e-5)


def test_bad_arguments_fail_with_clear_errors():
    params = _params()
    prior = _prior(params)
    with pytest.raises(ValueError, match="unknown scheme"):
        transfer.make_scheme(prior, params, "everything")
    with pytest.raises(ValueError, match="alpha"):
        transfer.make_scheme(prior, params, "nl_ll", alpha=-1.0)
    with pytest.raises(ValueError, match="unknown method"):
        transfer.make_trainer("adam", transfer.make_scheme(prior, params), lambda p, x: x, num_data=1,
                              num_steps=1, learning_rate=0.1)
    other = {**params, "extra": {"kernel": jnp.zeros(2)}}
    with pytest.raises(ValueError, match="does not describe"):
        transfer.make_scheme(prior, other)
