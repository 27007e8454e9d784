"""SWAG statistics, posterior and samples against a NumPy computation on a given trajectory."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fpbma
from fpbma.types import draw

from fpbma.baselines import _swag as swag_lib
from fpbma.baselines import _sam as sam_lib


def _trajectory(num_steps, seed=0):
    rng = np.random.default_rng(seed)
    return [{"a": rng.normal(size=3).astype(np.float32), "b": rng.normal(size=(2, 2)).astype(np.float32)}
            for _ in range(num_steps + 1)]


def _run_swag(traj, **kwargs):
    """Feeds updates w_{t+1} − w_t through swag(identity) so the iterates are exactly ``traj``."""
    tx = swag_lib.swag(optax.identity(), **kwargs)
    params = jax.tree.map(jnp.asarray, traj[0])
    state = tx.init(params)
    step = jax.jit(tx.update)
    for nxt in traj[1:]:
        g = jax.tree.map(lambda a, b: jnp.asarray(a) - b, nxt, params)
        u, state = step(g, state, params)
        params = optax.apply_updates(params, u)
    return state


def _numpy_swag(traj, swa_start, collect_every, rank):
    flat = [np.concatenate([w["a"].ravel(), w["b"].ravel()]).astype(np.float64) for w in traj]
    collected = [flat[t] for t in range(1, len(flat)) if t > swa_start and (t - swa_start) % collect_every == 0]
    mean = np.zeros_like(flat[0])
    sq = np.zeros_like(flat[0])
    devs = []
    for n, w in enumerate(collected):
        mean = (n * mean + w) / (n + 1)
        sq = (n * sq + w * w) / (n + 1)
        devs.append(w - mean)
    return mean, sq, np.stack(devs[-rank:]), len(collected)


def _flat(tree):
    return np.concatenate([np.asarray(tree["a"]).reshape(-1), np.asarray(tree["b"]).reshape(-1)])


def _flat_cols(tree):
    k = tree["a"].shape[0]
    return np.concatenate([np.asarray(tree["a"]).reshape(k, -1), np.asarray(tree["b"]).reshape(k, -1)], axis=1)


@pytest.mark.parametrize("rank", [3, 8])  # ring buffer wrapped (6 models > 3) and partly filled (6 < 8)
def test_swag_moments_deviations_and_samples_equal_numpy(rank):
    traj = _trajectory(20)
    state = _run_swag(traj, swa_start=2, collect_every=3, max_num_models=rank)
    mean, sq, devs, n = _numpy_swag(traj, 2, 3, rank)
    assert int(state.num_models) == n == 6
    np.testing.assert_allclose(_flat(state.mean), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_flat(state.sq_mean), sq, rtol=1e-5, atol=1e-6)
    q = swag_lib.swag_posterior(state)
    k = devs.shape[0]
    assert q.rank == k == min(rank, n)
    np.testing.assert_allclose(_flat_cols(q.cov_factor), devs, rtol=1e-4, atol=1e-5)
    var = np.maximum(sq - mean ** 2, 1e-30)
    np.testing.assert_allclose(np.exp(2 * _flat(q.log_std)), var, rtol=1e-3, atol=1e-5)
    # A sample for given noise: w = w̄ + (σ ε₁ + D ε₂/√(K−1))/√2.
    noise = fpbma.sample_noise(q, jax.random.PRNGKey(3))
    w = fpbma.sample_from_noise(q, noise)
    expected = mean + (np.sqrt(var) * _flat(noise.diag) + devs.T @ np.asarray(noise.rank) / np.sqrt(k - 1)) / np.sqrt(2)
    np.testing.assert_allclose(_flat(w), expected, rtol=1e-4, atol=1e-5)


def test_swag_sample_covariance_matches_low_rank_formula():
    traj = _trajectory(12, seed=1)
    state = _run_swag(traj, swa_start=0, collect_every=2, max_num_models=3)
    q = swag_lib.swag_posterior(state)
    mean, sq, devs, _ = _numpy_swag(traj, 0, 2, 3)
    cov = 0.5 * (np.diag(sq - mean ** 2) + devs.T @ devs / (devs.shape[0] - 1))
    n = 40000
    w = draw(q, jax.random.PRNGKey(0), n)
    x = np.concatenate([np.asarray(w["a"]).reshape(n, -1), np.asarray(w["b"]).reshape(n, -1)], axis=1)
    emp = np.cov(x.T)
    sd = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov ** 2) / n)  # sd of each entry (Gaussian)
    assert np.all(np.abs(emp - cov) < 5 * sd + 1e-7), np.max(np.abs(emp - cov) / sd)
    np.testing.assert_array_less(np.abs(x.mean(0) - mean), 5 * np.sqrt(np.diag(cov) / n) + 1e-7)


def test_fswag_collects_the_sam_trajectory():
    target = jnp.array([1.0, -2.0, 0.5])
    loss = lambda w: jnp.sum((w - target) ** 2 * jnp.array([1.0, 3.0, 0.2]))  # noqa: E731
    grad = jax.grad(loss)
    w0 = jnp.zeros(3)
    fs = swag_lib.fswag(0.05, rho=0.1, momentum=0.0, swa_start=1, collect_every=1, max_num_models=4)
    plain = sam_lib.sam(0.05, rho=0.1, momentum=0.0)
    s1, s2 = fs.init(w0), plain.init(w0)
    w1 = w2 = w0
    sam_iterates = []
    for t in range(5):
        u1, s1 = fs.update(grad(w1), s1, w1, grad_fn=grad)
        u2, s2 = plain.update(grad(w2), s2, w2, grad_fn=grad)
        w1, w2 = w1 + u1, w2 + u2
        if t >= 1:
            sam_iterates.append(np.asarray(w2))
    np.testing.assert_allclose(np.asarray(w1), np.asarray(w2), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s1.mean), np.mean(sam_iterates, axis=0), rtol=1e-5)


def test_swag_samples_applies_refresh_hook_per_sample():
    traj = _trajectory(6, seed=2)
    q = swag_lib.swag_posterior(_run_swag(traj, swa_start=0, collect_every=1, max_num_models=3))
    refreshed = swag_lib.swag_samples(q, jax.random.PRNGKey(1), 4,
                                      refresh_fn=lambda w: {"params": w, "stat": jnp.sum(w["a"])})
    raw = swag_lib.swag_samples(q, jax.random.PRNGKey(1), 4)
    np.testing.assert_allclose(np.asarray(refreshed.samples["stat"]), np.asarray(raw.samples["a"]).sum(axis=1),
                               rtol=1e-5)


def test_swag_rejects_bad_inputs():
    with pytest.raises(ValueError, match="max_num_models"):
        swag_lib.swag(optax.identity(), max_num_models=1)
    with pytest.raises(ValueError, match="collect_every"):
        swag_lib.swag(optax.identity(), collect_every=0)
    state = _run_swag(_trajectory(3), swa_start=2, collect_every=1, max_num_models=3)
    with pytest.raises(ValueError, match="collected 1 model"):
        swag_lib.swag_posterior(state)
