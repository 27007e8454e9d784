"""Test helpers: random posteriors over small pytrees and their dense (P × P) covariance."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import fpbma

SHAPES = {"conv": (2, 3), "bias": (4,), "head": {"w": (3, 2)}}


def random_tree(key, shapes=SHAPES, scale=1.0, dtype=jnp.float64):
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, s, dtype) for k, s in zip(keys, leaves)])


def random_diag(key, shapes=SHAPES, dtype=jnp.float64):
    k1, k2 = jax.random.split(key)
    return fpbma.DiagGaussian(mean=random_tree(k1, shapes, dtype=dtype),
                              log_std=random_tree(k2, shapes, scale=0.5, dtype=dtype))


def random_low_rank(key, rank, shapes=SHAPES, dtype=jnp.float64, factor_scale=0.7):
    k1, k2, k3 = jax.random.split(key, 3)
    mean = random_tree(k1, shapes, dtype=dtype)
    log_std = random_tree(k2, shapes, scale=0.5, dtype=dtype)
    factor_shapes = jax.tree.map(lambda s: (rank,) + s, shapes, is_leaf=lambda s: isinstance(s, tuple))
    return fpbma.LowRankGaussian(mean=mean, log_std=log_std,
                                 cov_factor=random_tree(k3, factor_shapes, scale=factor_scale, dtype=dtype))


def dense_cov(q):
    """Σ as a dense matrix in ravel_pytree(q.mean) order."""
    var = ravel_pytree(jax.tree.map(lambda s: jnp.exp(2 * s), q.log_std))[0]
    if isinstance(q, fpbma.DiagGaussian):
        return jnp.diag(var)
    k = q.rank
    d = jnp.stack([ravel_pytree(jax.tree.map(lambda c: c[i], q.cov_factor))[0] for i in range(k)])  # (K, P)
    return 0.5 * (jnp.diag(var) + d.T @ d / (k - 1))


def dense_mean(q):
    return ravel_pytree(q.mean)[0]


def ravel(tree):
    return np.asarray(ravel_pytree(tree)[0])
