"""Curvature of the training loss with respect to the weights: HVPs, Lanczos, power iteration, Hutchinson.

Every estimator here needs only Hessian-vector products H v = ∇²_w ℓ(w) v of the mean training loss ℓ,
computed forward-over-reverse (``jax.jvp`` of ``jax.grad``: one forward and one backward pass, never
the P × P Hessian). The loss is given in one of two ways:

* ``loss_fn(params) -> scalar``: the whole training loss (a small data set, or one batch);
* ``loss_fn(params, batch) -> scalar`` together with ``batches``: the mean loss of one batch, and the
  batches of a loader. ``H v`` is then accumulated batch by batch, weighted by each batch's number of
  real examples (:func:`batched_loss_hvp`), so it equals the full-batch product without ever building
  one giant batch.

BatchNorm models: differentiate with respect to ``params`` only and close the loss over the
evaluation-mode statistics, ``model.apply({"params": p, "batch_stats": stats}, x, train=False)``;
:func:`classifier_loss_per_batch` builds exactly that loss for a flax classifier. The statistics are then
constants of the loss, as the paper's flatness measure assumes (the Hessian of the trained network's
loss, not of its training-mode batch statistics).

Parameters may be any pytree; vectors are raveled internally with ``jax.flatten_util.ravel_pytree``.
The iterations run in Python around jit-compiled Hessian-vector products and jit-compiled
re-orthogonalisation steps, so the same code serves a loss that traces in one program and a loader
that does not; results depend only on ``key``.

References:
  Lim et al., "Flat Posterior Does Matter For Bayesian Model Averaging", arXiv:2406.15664 (flatness of a
  posterior as the Hessian eigenvalues and trace of the loss at its samples).
  Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 1994.
  Lanczos, 1950; Golub & Van Loan, "Matrix Computations" §10.1 (full re-orthogonalisation).
  Hutchinson, "A stochastic estimator of the trace of the influence matrix", 1990.
"""

from __future__ import annotations

import collections.abc
import math
import numbers
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fpbma import metrics

PyTree = Any

__all__ = [
    "hvp",
    "batched_loss_hvp",
    "batched_loss",
    "classifier_loss_per_batch",
    "hessian_top_eigenvalues",
    "hessian_max_eigenvalue",
    "hessian_trace",
    "TraceEstimate",
]


class TraceEstimate(NamedTuple):
    """Hutchinson's estimate of tr(H).

    Attributes:
      trace: the mean of zᵀ H z over the probes.
      stderr: its standard error, std(zᵀ H z) / √n (sample std, ddof = 1).
      samples: the n per-probe values zᵀ H z.
    """

    trace: float
    stderr: float
    samples: np.ndarray


# ----------------------------------------------------------------------------------------------
# Hessian-vector products.


def hvp(loss_fn: Callable[[PyTree], jax.Array], params: PyTree, v: PyTree) -> PyTree:
    """H v with H = ∇² loss_fn(params), forward-over-reverse: d/dt ∇loss(params + t v) at t = 0.

    Args:
      loss_fn: ``params -> scalar``.
      params: the point w.
      v: a tangent shaped like ``params``.

    Returns:
      H v, a tree shaped like ``params``.
    """
    return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


def _check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} must be an integer >= {low}.")
    if int(value) < low:
        raise ValueError(f"{name}={value!r} is invalid: it must be an integer >= {low}.")
    return int(value)


def _default_weight(batch) -> float:
    """The number of real examples: ``batch["mask"].sum()`` when present, else the leading axis."""
    if isinstance(batch, collections.abc.Mapping) and "mask" in batch:
        return float(np.sum(np.asarray(batch["mask"])))
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves or np.ndim(leaves[0]) == 0:
        raise ValueError("cannot infer a batch's size: its first leaf has no leading axis; pass weight_fn=.")
    return float(np.shape(leaves[0])[0])


def _batch_source(batches):
    """A zero-argument function returning a fresh iterator over the batches (they are read many times)."""
    if isinstance(batches, collections.abc.Iterator):
        raise TypeError(
            "batches is a one-shot iterator (e.g. a generator), but the Hessian estimators read the data once "
            "per Hessian-vector product; pass a list of batches, a re-iterable loader, or a zero-argument "
            "function returning a fresh iterator (e.g. lambda: fpbma.data.pipeline.batches(src, 128, train=False)).")
    if isinstance(batches, collections.abc.Iterable):
        return lambda: iter(batches)
    if callable(batches):
        return lambda: iter(batches())
    raise TypeError(f"batches must be a re-iterable of batches or a function returning an iterator; got "
                    f"{type(batches).__name__}.")


def _check_stacked(batches) -> int:
    leaves = jax.tree_util.tree_leaves(batches)
    sizes = {int(np.shape(x)[0]) if np.ndim(x) else None for x in leaves}
    if not leaves or None in sizes or len(sizes) != 1:
        raise ValueError("stacked=True needs one pytree whose leaves all share a leading batch-index axis; got "
                         f"leading sizes {sorted(map(str, sizes))}.")
    return sizes.pop()


def _stacked_weights(batches, weight_fn) -> jax.Array:
    n = _check_stacked(batches)
    fn = weight_fn or _default_weight
    return jnp.asarray([fn(jax.tree.map(lambda x, i=i: x[i], batches)) for i in range(n)], jnp.float32)


class _Operator(NamedTuple):
    """A jitted loss Hessian as a linear map on raveled vectors: ``matvec(params, v_flat) -> (H v)_flat``."""

    matvec: Callable[[PyTree, jax.Array], jax.Array]


def _flat_hvp(loss_fn, params, v_flat):
    flat, unravel = ravel_pytree(params)
    hv = hvp(loss_fn, params, unravel(v_flat.astype(flat.dtype)))
    return ravel_pytree(hv)[0]


def _make_operator(loss_fn, batches=None, weight_fn=None, stacked=False) -> _Operator:
    """The Hessian of the (batch-weighted mean) loss as a jitted ``matvec``; built once, reused per sample."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
    if batches is None:
        if weight_fn is not None or stacked:
            raise ValueError("weight_fn / stacked only apply with batches=; pass batches or drop them.")
        return _Operator(jax.jit(lambda p, v: _flat_hvp(loss_fn, p, v)))
    if stacked:
        weights = _stacked_weights(batches, weight_fn)
        if float(jnp.sum(weights)) <= 0:
            raise ValueError("the batches hold no real examples (all weights are 0).")

        @jax.jit
        def stacked_matvec(p, v):
            def body(acc, xs):
                batch, w = xs
                return acc + w * _flat_hvp(lambda q: loss_fn(q, batch), p, v), None
            acc, _ = jax.lax.scan(body, jnp.zeros_like(v), (batches, weights))
            return acc / jnp.sum(weights)

        return _Operator(stacked_matvec)

    source = _batch_source(batches)
    per_batch = jax.jit(lambda p, v, batch: _flat_hvp(lambda q: loss_fn(q, batch), p, v))
    fn = weight_fn or _default_weight

    def loader_matvec(p, v):
        acc, total = jnp.zeros_like(v), 0.0
        for batch in source():
            w = float(fn(batch))
            if w > 0:
                acc = acc + w * per_batch(p, v, batch)
                total += w
        if total <= 0:
            raise ValueError("the batches hold no real examples (every batch has weight 0, or there are none).")
        return acc / total

    return _Operator(loader_matvec)


def batched_loss_hvp(loss_per_batch: Callable[[PyTree, Any], jax.Array], params: PyTree, batches,
                     weight_fn: Optional[Callable[[Any], float]] = None, stacked: bool = False
                     ) -> Callable[[PyTree], PyTree]:
    """The full-data Hessian-vector product, accumulated over the batches of a loader.

    With ℓ_b(w) the mean loss of batch b over its n_b real examples,

        ℓ(w) = Σ_b n_b ℓ_b(w) / Σ_b n_b,        H v = Σ_b n_b ∇²ℓ_b(w) v / Σ_b n_b,

    which equals the Hessian-vector product of the loss of one batch holding every example.

    Args:
      loss_per_batch: ``(params, batch) -> scalar``, the mean loss over the batch's real examples
        (masked examples excluded, as :func:`classifier_loss_per_batch` does).
      params: the point w.
      batches: a list of batches, a re-iterable loader, or a zero-argument function returning a fresh
        iterator; with ``stacked=True``, one pytree whose leaves carry a leading batch-index axis (the
        product then runs in one ``lax.scan`` and can be traced inside jit).
      weight_fn: ``batch -> n_b``; default ``batch["mask"].sum()`` if the batch has a ``"mask"``, else
        the leading axis of its first leaf.
      stacked: see ``batches``.

    Returns:
      ``hvp_fn(v) -> H v`` for trees ``v`` shaped like ``params``.
    """
    op = _make_operator(loss_per_batch, batches, weight_fn, stacked)
    _, unravel = ravel_pytree(params)

    def hvp_fn(v):
        return unravel(op.matvec(params, ravel_pytree(v)[0]))

    return hvp_fn


def batched_loss(loss_per_batch, params: PyTree, batches, weight_fn=None, stacked: bool = False) -> float:
    """Σ_b n_b ℓ_b(w) / Σ_b n_b, the full-data mean loss accumulated over a loader (see :func:`batched_loss_hvp`)."""
    if stacked:
        weights = _stacked_weights(batches, weight_fn)
        losses = jax.jit(lambda p, b: jax.lax.map(lambda x: loss_per_batch(p, x), b))(params, batches)
        return float(jnp.sum(weights * losses) / jnp.sum(weights))
    fn, per_batch = weight_fn or _default_weight, jax.jit(loss_per_batch)
    acc = total = 0.0
    for batch in _batch_source(batches)():
        w = float(fn(batch))
        if w > 0:
            acc += w * float(per_batch(params, batch))
            total += w
    if total <= 0:
        raise ValueError("the batches hold no real examples (every batch has weight 0, or there are none).")
    return acc / total


def classifier_loss_per_batch(apply_fn: Callable, variables: PyTree, *, image_key: str = "image",
                              label_key: str = "label", mask_key: str = "mask", **apply_kwargs):
    """Mean cross-entropy of a flax classifier in evaluation mode, as a function of its ``params`` only.

        ℓ_b(params) = Σᵢ mᵢ CE(f(xᵢ; params, state), yᵢ) / Σᵢ mᵢ,

    where ``state`` is every collection of ``variables`` other than ``"params"`` (BatchNorm's
    ``batch_stats``), held fixed (``lax.stop_gradient``), and m the batch's mask (all ones without one).

    Args:
      apply_fn: ``model.apply``.
      variables: ``{"params": ..., "batch_stats": ...}``; only the non-``params`` collections are used.
      image_key, label_key, mask_key: the batch's fields (those of :mod:`fpbma.data.pipeline`).
      **apply_kwargs: passed to ``apply_fn``; default ``train=False``.

    Returns:
      ``loss_per_batch(params, batch) -> scalar`` for :func:`batched_loss_hvp` and the estimators.
    """
    if not isinstance(variables, collections.abc.Mapping) or "params" not in variables:
        raise ValueError("variables must be a flax variable dict with a 'params' collection, e.g. "
                         "{'params': ..., 'batch_stats': ...}.")
    state = {k: jax.lax.stop_gradient(v) for k, v in variables.items() if k != "params"}
    kwargs = {"train": False, **apply_kwargs}

    def loss_per_batch(params, batch):
        logits = apply_fn({"params": params, **state}, batch[image_key], **kwargs)
        labels = batch[label_key]
        ce = metrics.softmax_cross_entropy(logits, labels)
        mask = batch[mask_key].astype(ce.dtype) if mask_key in batch else jnp.ones_like(ce)
        return jnp.sum(mask * ce) / jnp.maximum(jnp.sum(mask), 1.0)

    return loss_per_batch


# ----------------------------------------------------------------------------------------------
# Lanczos, power iteration, Hutchinson on raveled vectors.


@jax.jit
def _lanczos_step(basis, i, w, beta_prev):
    """One Lanczos step with full re-orthogonalisation (twice, "twice is enough") against rows 0..i."""
    v = basis[i]
    alpha = jnp.vdot(w, v)
    prev = jnp.where(i > 0, beta_prev, 0.0) * basis[jnp.maximum(i - 1, 0)]
    w = w - alpha * v - prev
    mask = (jnp.arange(basis.shape[0]) <= i).astype(w.dtype)
    # Full precision: TF32 matmuls on GPUs would leave O(1e-3) components along earlier basis vectors.
    hi = jax.lax.Precision.HIGHEST
    for _ in range(2):
        w = w - jnp.matmul(basis.T, mask * jnp.matmul(basis, w, precision=hi), precision=hi)
    beta = jnp.linalg.norm(w)
    basis = basis.at[i + 1].set(jnp.where(beta > 0, w / jnp.where(beta > 0, beta, 1.0), 0.0))
    return basis, alpha, beta


def _lanczos(matvec, params, dim: int, num_iterations: int, key, dtype, mask=None):
    """α, β of the Lanczos tridiagonal T_m and the basis V (m + 1 rows; rows ≥ m unused)."""
    m = min(num_iterations, dim)
    v0 = jax.random.normal(key, (dim,), dtype)
    if mask is not None:
        v0 = v0 * mask
    basis = jnp.zeros((m + 1, dim), dtype).at[0].set(v0 / jnp.linalg.norm(v0))
    alphas, betas = [], []
    beta = jnp.zeros((), dtype)
    for i in range(m):
        basis, alpha, beta = _lanczos_step(basis, i, matvec(params, basis[i]), beta)
        alphas.append(float(alpha))
        betas.append(float(beta))
        # An invariant subspace: T's eigenvalues are exact eigenvalues of H; further steps add only noise.
        if betas[-1] <= 1e-6 * max(abs(a) for a in alphas) or betas[-1] == 0.0:
            break
    return np.asarray(alphas, np.float64), np.asarray(betas[:len(alphas) - 1], np.float64), basis


def _check_key(key):
    if key is None:
        raise ValueError("key is required: pass a jax.random.PRNGKey for the random start vector / probes.")


def _resolve(loss_fn, hvp_fn, batches, weight_fn, stacked):
    if hvp_fn is not None:
        if loss_fn is not None or batches is not None:
            raise ValueError("pass either loss_fn (with optional batches) or hvp_fn, not both.")
        if not callable(hvp_fn):
            raise TypeError("hvp_fn must be a function v -> H v (e.g. from batched_loss_hvp).")

        def matvec(p, v_flat):
            _, unravel = ravel_pytree(p)
            return ravel_pytree(hvp_fn(unravel(v_flat)))[0]

        return _Operator(matvec)
    if loss_fn is None:
        raise ValueError("pass loss_fn (params -> scalar, or (params, batch) -> scalar with batches=) or hvp_fn.")
    return _make_operator(loss_fn, batches, weight_fn, stacked)


def _masked(op: _Operator, mask):
    """The block of H on the coordinates where ``mask`` is 1: v ↦ M H M v (M = diag(mask))."""
    if mask is None:
        return op
    return _Operator(lambda p, v: mask * op.matvec(p, mask * v))


def _top_eigen(op: _Operator, params, k, key, num_iterations, return_eigenvectors, mask=None):
    flat, unravel = ravel_pytree(params)
    dim = int(flat.size) if mask is None else int(np.sum(np.asarray(mask) != 0))
    if k > dim:
        raise ValueError(f"k={k} eigenvalues requested but params have only {dim} entries.")
    m = num_iterations if num_iterations is not None else max(4 * k, 40)
    _check_int(m, "num_iterations", k)
    dtype = jnp.result_type(flat.dtype, jnp.float32)
    # A masked start vector keeps the whole Krylov space inside the block, so the rest contributes no zeros.
    alphas, betas, basis = _lanczos(_masked(op, mask).matvec, params, int(flat.size), min(m, dim), key, dtype,
                                    mask)
    if len(alphas) < k:
        raise ValueError(f"Lanczos found an invariant subspace of dimension {len(alphas)} < k={k} (the start "
                         "vector or the Hessian has too few directions); lower k or change the key.")
    tri = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
    evals, evecs = np.linalg.eigh(tri)
    order = np.argsort(evals)[::-1][:k]
    eigenvalues = evals[order]
    if not return_eigenvectors:
        return eigenvalues
    ritz = jnp.matmul(jnp.asarray(evecs[:, order].T, basis.dtype), basis[:len(alphas)],
                      precision=jax.lax.Precision.HIGHEST)
    return eigenvalues, jax.vmap(unravel)(ritz)


def hessian_top_eigenvalues(loss_fn: Optional[Callable], params: PyTree, k: int = 5, *, key: jax.Array,
                            num_iterations: Optional[int] = None, batches=None, weight_fn=None,
                            stacked: bool = False, hvp_fn: Optional[Callable] = None,
                            return_eigenvectors: bool = False):
    """The k algebraically largest eigenvalues of H = ∇²_w ℓ(w), by Lanczos with full re-orthogonalisation.

    From a random unit start v₁ (drawn with ``key``), m Lanczos steps build an orthonormal basis V_m of
    the Krylov space span{v₁, H v₁, …, H^{m−1} v₁} and the tridiagonal T_m = V_mᵀ H V_m; the top k
    eigenvalues of T_m (Ritz values) converge to H's top k from below, fastest for well-separated
    ones. Each step is re-orthogonalised against all earlier basis vectors, so no spurious copies
    appear; memory is O(m P).

    Args:
      loss_fn: ``params -> scalar`` (or ``(params, batch) -> scalar`` with ``batches``); None with hvp_fn.
      params: the point w, any pytree.
      k: number of eigenvalues.
      key: PRNG key for the start vector; the result depends only on it.
      num_iterations: Lanczos steps m ≥ k (default max(4k, 40), capped at P).
      batches, weight_fn, stacked: accumulate ℓ over a loader, see :func:`batched_loss_hvp`.
      hvp_fn: alternatively, a function ``v -> H v`` on trees shaped like params.
      return_eigenvectors: also return the Ritz vectors.

    Returns:
      A float64 numpy array of k eigenvalues in descending order; with ``return_eigenvectors`` also a
      tree of unit Ritz vectors stacked on a leading axis of size k.

    >>> loss = lambda w: jnp.sum(jnp.arange(1.0, 11.0) * w ** 2)         # H = diag(2, 4, ..., 20)
    >>> eig = hessian_top_eigenvalues(loss, jnp.ones(10), k=2, key=jax.random.PRNGKey(0))
    >>> eig.round(4).tolist()
    [20.0, 18.0]
    """
    _check_key(key)
    k = _check_int(k, "k", 1)
    op = _resolve(loss_fn, hvp_fn, batches, weight_fn, stacked)
    return _top_eigen(op, params, k, key, num_iterations, return_eigenvectors)


@jax.jit
def _power_step(w):
    return w / jnp.linalg.norm(w)


def hessian_max_eigenvalue(loss_fn: Optional[Callable], params: PyTree, *, key: jax.Array,
                           num_iterations: int = 200, tol: float = 1e-7, batches=None, weight_fn=None,
                           stacked: bool = False, hvp_fn: Optional[Callable] = None):
    """λ_max of H = ∇²_w ℓ(w) by power iteration: v ← H v / ‖H v‖, λ = vᵀ H v.

    Power iteration converges to the eigenvalue of largest *magnitude* at rate (|λ₂|/|λ₁|)^{2t} in the
    Rayleigh quotient; at a minimum of ℓ this is λ_max. It stops when λ changes by less than
    ``tol·|λ|`` between steps, or after ``num_iterations``.

    Args:
      loss_fn, params, key, batches, weight_fn, stacked, hvp_fn: as in :func:`hessian_top_eigenvalues`.
      num_iterations: the most Hessian-vector products.
      tol: relative change of λ that stops the iteration.

    Returns:
      ``(eigenvalue, eigenvector)``: a float and a unit tree shaped like params.
    """
    _check_key(key)
    num_iterations = _check_int(num_iterations, "num_iterations", 1)
    if not tol >= 0:
        raise ValueError(f"tol={tol} must be >= 0.")
    op = _resolve(loss_fn, hvp_fn, batches, weight_fn, stacked)
    flat, unravel = ravel_pytree(params)
    v = _power_step(jax.random.normal(key, flat.shape, jnp.result_type(flat.dtype, jnp.float32)))
    lam = None
    for _ in range(num_iterations):
        w = op.matvec(params, v)
        new = float(jnp.vdot(v, w))
        norm = float(jnp.linalg.norm(w))
        if norm == 0.0:
            return 0.0, unravel(v)
        v = _power_step(w)
        if lam is not None and abs(new - lam) <= tol * abs(new):
            lam = new
            break
        lam = new
    return lam, unravel(v)


# One compiled probe per (shape, dtype), shared by every call (a fresh jit per call recompiled per sample).
_rademacher = jax.jit(jax.random.rademacher, static_argnums=(1, 2))


def _hutchinson(op: _Operator, params, num_samples, key, mask=None) -> TraceEstimate:
    flat, _ = ravel_pytree(params)
    dtype = jnp.result_type(flat.dtype, jnp.float32)
    values = []
    for k in jax.random.split(key, num_samples):
        z = _rademacher(k, flat.shape, dtype)
        z = z if mask is None else z * mask
        values.append(float(jnp.vdot(z, op.matvec(params, z))))
    values = np.asarray(values, np.float64)
    return TraceEstimate(float(values.mean()), float(values.std(ddof=1) / math.sqrt(num_samples)), values)


def hessian_trace(loss_fn: Optional[Callable], params: PyTree, *, key: jax.Array, num_samples: int = 100,
                  batches=None, weight_fn=None, stacked: bool = False,
                  hvp_fn: Optional[Callable] = None) -> TraceEstimate:
    """Hutchinson's estimate of tr(H) with Rademacher probes and its standard error.

        tr(H) ≈ (1/n) Σᵢ zᵢᵀ H zᵢ,   zᵢ ∈ {−1, +1}^P,   Var(zᵀ H z) = 2 Σ_{i≠j} H_ij²,

    so the estimate is exact for a diagonal H and its standard error is std(zᵀHz)/√n.

    Args:
      loss_fn, params, key, batches, weight_fn, stacked, hvp_fn: as in :func:`hessian_top_eigenvalues`.
      num_samples: n ≥ 2 probes.

    Returns:
      A :class:`TraceEstimate` ``(trace, stderr, samples)``.
    """
    _check_key(key)
    num_samples = _check_int(num_samples, "num_samples", 2)
    op = _resolve(loss_fn, hvp_fn, batches, weight_fn, stacked)
    return _hutchinson(op, params, num_samples, key)
