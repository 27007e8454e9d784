"""Last-layer Laplace (Daxberger et al., 2021): a full-covariance Gaussian over the classifier head.

With the body frozen at the MAP and features φₙ = body(xₙ), the head θ (kernel and bias, D numbers)
gets the Laplace approximation at the MAP θ* with the generalised Gauss-Newton (GGN) curvature:

    Λ = Σₙ Jₙᵀ Hₙ Jₙ + δ I,      Jₙ = ∂ fₙ/∂θ |θ*,  fₙ = head(θ*, φₙ) the logits,
    Hₙ = diag(pₙ) − pₙpₙᵀ  (categorical, p = softmax f),   Hₙ = pₙ(1 − pₙ)  (Bernoulli, p = σ(f)),
    q(θ) = N(θ*, Λ⁻¹).

For a head linear in θ the GGN equals the exact Hessian of the negative log-likelihood. D is small
(features × classes + classes), so Λ is kept dense: a Cholesky factor gives samples and log-densities.
The prior precision δ is chosen on a grid either by the Laplace log marginal likelihood (MAP held fixed,
eigenvalues λᵢ of the GGN computed once)

    log Z(δ) = −NLL(θ*) − δ/2 ‖θ*‖² + D/2 log δ − ½ Σᵢ log(λᵢ + δ),

or by the NLL of the Monte-Carlo predictive on a validation split. The predictive averages
probabilities over θ_s ~ q: p(y|x) ≈ (1/S) Σ_s softmax(head(θ_s, φ(x))).

Reference: Daxberger, Kristiadi, Immer, Eschenhagen, Bauer & Hennig, "Laplace Redux — Effortless
Bayesian Deep Learning", NeurIPS 2021.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fpbma import metrics
from fpbma.baselines._common import check_int, check_number

PyTree = Any

__all__ = ["FullGaussian", "LaplaceFit", "LastLayerPosterior", "ggn", "log_marginal_likelihood",
           "fit_last_layer_laplace", "mc_predictive", "last_layer_posterior"]

_LIKELIHOODS = ("categorical", "bernoulli")


class FullGaussian(NamedTuple):
    """N(mean, precision⁻¹) over a small pytree (e.g. a classifier head), with a dense precision.

    Attributes:
      mean: pytree of means (flattened in ``jax.flatten_util.ravel_pytree`` order).
      precision: (D, D) symmetric positive-definite precision matrix Λ.
    """

    mean: PyTree
    precision: jax.Array

    def sample(self, key: jax.Array, n: Optional[int] = None) -> PyTree:
        """θ = μ + L⁻ᵀ z with Λ = L Lᵀ, z ~ N(0, I) (covariance L⁻ᵀL⁻¹ = Λ⁻¹); n stacked if given."""
        flat, unravel = ravel_pytree(self.mean)
        chol = jnp.linalg.cholesky(self.precision)
        shape = (flat.shape[0],) if n is None else (int(n), flat.shape[0])
        z = jax.random.normal(key, shape, flat.dtype)
        x = flat + jax.scipy.linalg.solve_triangular(chol.T, z.T, lower=False).T
        return unravel(x) if n is None else jax.vmap(unravel)(x)

    def log_prob(self, value: PyTree) -> jax.Array:
        """log N(θ; μ, Λ⁻¹) = −½ [D log 2π − log|Λ| + (θ − μ)ᵀ Λ (θ − μ)]."""
        flat, _ = ravel_pytree(self.mean)
        r = ravel_pytree(value)[0] - flat
        chol = jnp.linalg.cholesky(self.precision)
        log_det = 2.0 * jnp.sum(jnp.log(jnp.diag(chol)))
        return -0.5 * (flat.shape[0] * math.log(2.0 * math.pi) - log_det + r @ self.precision @ r)


@flax.struct.dataclass
class LastLayerPosterior:
    """Full-network weight samples: the MAP everywhere except the head, which is drawn from ``head``.

    Attributes:
      params: the MAP weight pytree (nested dicts).
      head: :class:`FullGaussian` over the subtree ``params[head_path[0]][head_path[1]]…``.
      head_path: keys leading to the head subtree (static).
    """

    params: PyTree
    head: FullGaussian
    head_path: Sequence[str] = flax.struct.field(pytree_node=False, default=())

    def sample(self, key: jax.Array, n: int) -> PyTree:
        """n full weight pytrees stacked on a leading axis (non-head leaves repeated)."""
        heads = self.head.sample(key, int(n))
        tiled = jax.tree.map(lambda x: jnp.broadcast_to(x, (int(n),) + jnp.shape(x)), self.params)
        return _replace_at(tiled, tuple(self.head_path), heads)


def _get_at(tree, path):
    for k in path:
        if k not in tree:
            raise KeyError(f"head_path {path!r}: key {k!r} not found; available keys: {sorted(tree)}.")
        tree = tree[k]
    return tree


def _replace_at(tree, path, value):
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = _replace_at(tree[path[0]], path[1:], value)
    return type(tree)(out) if not isinstance(tree, dict) else out


def last_layer_posterior(params: PyTree, head_path: Sequence[str], head: FullGaussian) -> LastLayerPosterior:
    """Wraps a head posterior into full-network samples; checks the head's structure matches."""
    head_path = tuple(head_path)
    current = _get_at(params, head_path)
    if jax.tree.structure(current) != jax.tree.structure(head.mean):
        raise ValueError(f"the head posterior's tree does not match params at {head_path!r}: "
                         f"{jax.tree.structure(head.mean)} vs {jax.tree.structure(current)}.")
    return LastLayerPosterior(params=params, head=head, head_path=head_path)


def _check_likelihood(likelihood):
    if likelihood not in _LIKELIHOODS:
        raise ValueError(f"likelihood={likelihood!r}; use one of {_LIKELIHOODS}.")


def _nll_and_curvature(logits, labels, likelihood):
    if likelihood == "categorical":
        p = jnp.exp(jax.nn.log_softmax(logits))
        return metrics.softmax_cross_entropy(logits, labels), \
            jax.vmap(lambda pi: jnp.diag(pi) - jnp.outer(pi, pi))(p)
    f = logits.reshape(logits.shape[0])
    y = labels.astype(f.dtype)
    p = jax.nn.sigmoid(f)
    nll = jax.nn.softplus(f) - y * f
    return nll, (p * (1.0 - p))[:, None, None]


def ggn(head_fn: Callable[[PyTree, jax.Array], jax.Array], head_params: PyTree, features: jax.Array,
        labels: jax.Array, likelihood: str = "categorical"):
    """(Σₙ Jₙᵀ Hₙ Jₙ, Σₙ NLLₙ) at ``head_params``; Jacobians by forward-mode autodiff, per example.

    Args:
      head_fn: ``(head_params, features) -> logits``, logits (B, C) (categorical) or (B,)/(B, 1) (Bernoulli).
      head_params: θ*.
      features: φ, (B, H).
      labels: (B,) integer classes (categorical) or {0, 1} (Bernoulli).
      likelihood: "categorical" or "bernoulli".
    """
    _check_likelihood(likelihood)
    flat, unravel = ravel_pytree(head_params)

    def logits_one(theta, phi):
        return jnp.reshape(head_fn(unravel(theta), phi[None]), (-1,))

    jac = jax.vmap(jax.jacfwd(logits_one), in_axes=(None, 0))(flat, features)  # (B, C, D)
    logits = jnp.reshape(head_fn(head_params, features), (features.shape[0], -1))
    nll, h = _nll_and_curvature(logits if likelihood == "categorical" else logits[:, 0], labels, likelihood)
    return jnp.einsum("bcd,bce,bef->df", jac, h, jac), jnp.sum(nll)


_ggn_jit = jax.jit(ggn, static_argnums=(0, 4))


def log_marginal_likelihood(prior_precision, nll_sum, mean_sq_norm, ggn_eigenvalues, num_params):
    """Laplace log Z(δ) = −NLL − δ/2‖θ*‖² + D/2 log δ − ½ Σ log(λᵢ + δ) (vectorised over δ)."""
    delta = jnp.asarray(prior_precision)[..., None]
    return (-nll_sum - 0.5 * delta[..., 0] * mean_sq_norm + 0.5 * num_params * jnp.log(delta[..., 0])
            - 0.5 * jnp.sum(jnp.log(jnp.maximum(ggn_eigenvalues, 0.0) + delta), axis=-1))


def mc_predictive(head_fn, posterior: FullGaussian, features: jax.Array, key: jax.Array, num_samples: int = 30,
                  likelihood: str = "categorical") -> jax.Array:
    """(1/S) Σ_s p(y | head(θ_s, φ)), θ_s ~ q: class probabilities (B, C); Bernoulli gives (B, 2)."""
    _check_likelihood(likelihood)
    num_samples = check_int(num_samples, "num_samples", low=1)
    thetas = posterior.sample(key, num_samples)

    def probs(theta):
        f = head_fn(theta, features)
        if likelihood == "categorical":
            return jax.nn.softmax(f, axis=-1)
        p1 = jax.nn.sigmoid(jnp.reshape(f, (features.shape[0],)))
        return jnp.stack([1.0 - p1, p1], axis=-1)

    return jnp.mean(jax.vmap(probs)(thetas), axis=0)


class LaplaceFit(NamedTuple):
    """Result of :func:`fit_last_layer_laplace`: the head posterior, the chosen δ and the grid scores."""

    posterior: FullGaussian
    prior_precision: float
    grid: np.ndarray
    scores: np.ndarray


def fit_last_layer_laplace(head_fn, head_params: PyTree, features, labels, *, likelihood: str = "categorical",
                           prior_precision: Optional[float] = None, prior_precision_grid=None,
                           selection: str = "marglik", val_features=None, val_labels=None,
                           key: Optional[jax.Array] = None, num_samples: int = 30) -> LaplaceFit:
    """Last-layer Laplace at the MAP head ``head_params`` with a tuned (or given) prior precision.

    Args:
      head_fn: ``(head_params, features) -> logits``.
      head_params: MAP head θ*.
      features, labels: training features φ(x) (B, H) and labels.
      likelihood: "categorical" or "bernoulli".
      prior_precision: fixed δ > 0, or None to select it on ``prior_precision_grid``.
      prior_precision_grid: candidate δ values (> 0); default logspace(−4, 4, 33).
      selection: "marglik" (Laplace log marginal likelihood) or "val" (MC-predictive NLL on
        ``val_features``/``val_labels`` with ``key`` and ``num_samples``).

    Returns:
      :class:`LaplaceFit` with ``posterior`` = N(θ*, (GGN + δI)⁻¹) as a :class:`FullGaussian`.
    """
    _check_likelihood(likelihood)
    if selection not in ("marglik", "val"):
        raise ValueError(f"selection={selection!r}; use 'marglik' or 'val'.")
    if prior_precision is not None:
        check_number(prior_precision, "prior_precision", low=0.0, low_open=True)
        grid = np.asarray([float(prior_precision)])
    else:
        grid = np.logspace(-4, 4, 33) if prior_precision_grid is None else np.asarray(prior_precision_grid, float)
        if grid.ndim != 1 or grid.size == 0 or not np.all(np.isfinite(grid) & (grid > 0)):
            raise ValueError("prior_precision_grid must be a non-empty 1-D sequence of positive finite numbers.")
    if selection == "val" and grid.size > 1 and (val_features is None or val_labels is None or key is None):
        raise ValueError("selection='val' needs val_features, val_labels and key.")
    features, labels = jnp.asarray(features), jnp.asarray(labels)
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"features ({features.shape[0]}) and labels ({labels.shape[0]}) differ in length.")

    curvature, nll_sum = _ggn_jit(head_fn, head_params, features, labels, likelihood)
    flat, _ = ravel_pytree(head_params)
    d = flat.shape[0]
    eye = jnp.eye(d, dtype=curvature.dtype)
    if grid.size == 1:
        scores = np.zeros(1)
    elif selection == "marglik":
        eig = jnp.linalg.eigvalsh(0.5 * (curvature + curvature.T))
        scores = np.asarray(log_marginal_likelihood(jnp.asarray(grid), nll_sum, flat @ flat, eig, d))
    else:
        vf, vl = jnp.asarray(val_features), jnp.asarray(val_labels)

        def val_nll(delta):
            p = mc_predictive(head_fn, FullGaussian(head_params, curvature + delta * eye), vf, key, num_samples,
                              likelihood)
            return jnp.mean(-jnp.log(jnp.take_along_axis(p, vl.astype(jnp.int32)[:, None], axis=-1)[:, 0] + 1e-12))

        scores = -np.asarray([float(val_nll(delta)) for delta in grid])
    best = float(grid[int(np.argmax(scores))])
    return LaplaceFit(FullGaussian(head_params, curvature + best * eye), best, grid, scores)
