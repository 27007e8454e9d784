"""Loss landscapes: 1-D and 2-D slices of the training loss around a point, and PNG plots.

A slice evaluates ℓ(w₀ + Σⱼ cⱼ dⱼ) on a grid of coefficients c along one or two directions dⱼ:

* :func:`filter_normalized_direction` — Li et al. (2018): a Gaussian direction rescaled filter by filter
  to the norm of the weights' filter, so slices of networks with different weight scales compare;
* :func:`posterior_directions` — the posterior's own principal directions, scaled to one posterior
  standard deviation (so c = ±2 spans ±2 std of q along them).

References:
  Li, Xu, Taylor, Studer, Goldstein, "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018.
  Maddox et al., "A Simple Baseline for Bayesian Uncertainty in Deep Learning", NeurIPS 2019 (SWAG's
  low-rank directions).
  Lim et al., "Flat Posterior Does Matter For Bayesian Model Averaging", arXiv:2406.15664.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fpbma import posterior as post
from fpbma.flatness import hessian as hs

PyTree = Any

__all__ = [
    "filter_normalized_direction",
    "posterior_directions",
    "loss_landscape_1d",
    "loss_landscape_2d",
    "plot_landscape_1d",
    "plot_landscape_2d",
]


def filter_normalized_direction(key: jax.Array, params: PyTree, *, bias_bn: str = "zero",
                                filter_axis: int = -1) -> PyTree:
    """A random direction normalised filter by filter to the weights (Li et al., 2018, §4).

    Each leaf d ~ N(0, I) of ndim ≥ 2 is split into filters along ``filter_axis`` — the output channel
    (last axis) of a flax conv kernel (H, W, I, O) or dense kernel (I, O), i.e. the same slices as a
    PyTorch conv filter ``weight[o]`` or linear unit ``weight[o]`` — and every filter is rescaled,

        d_f ← d_f · ‖w_f‖ / (‖d_f‖ + 1e-10).

    Leaves of ndim ≤ 1 (biases, BatchNorm scales and offsets) follow the paper's ``ignore='biasbn'``
    convention: ``bias_bn="zero"`` (default) sets their direction to 0, ``bias_bn="copy"`` sets it to
    the weights themselves (the authors' option when not ignoring them).

    Args:
      key: PRNG key.
      params: the weights w (the centre of the slice), any pytree.
      bias_bn: "zero" or "copy", for leaves of ndim ≤ 1.
      filter_axis: the output-channel axis of ndim ≥ 2 leaves (-1 for flax layouts).

    Returns:
      A tree shaped like ``params``.
    """
    if bias_bn not in ("zero", "copy"):
        raise ValueError(f"bias_bn={bias_bn!r}: use 'zero' (Li et al.'s default, ignore biases/BN) or 'copy'.")
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, max(len(leaves), 1))
    out = []
    for k, w in zip(keys, leaves):
        w = jnp.asarray(w)
        if w.ndim <= 1:
            out.append(jnp.zeros_like(w) if bias_bn == "zero" else w)
            continue
        d = jax.random.normal(k, w.shape, jnp.result_type(w.dtype, jnp.float32))
        axes = tuple(a for a in range(w.ndim) if a != filter_axis % w.ndim)
        d_norm = jnp.sqrt(jnp.sum(d * d, axis=axes, keepdims=True))
        w_norm = jnp.sqrt(jnp.sum(w * w, axis=axes, keepdims=True))
        out.append((d * w_norm / (d_norm + 1e-10)).astype(w.dtype))
    return jax.tree.unflatten(treedef, out)


def posterior_directions(q, num: int = 2, *, key: Optional[jax.Array] = None) -> Tuple[PyTree, ...]:
    """Directions of a posterior's own spread, each scaled to one posterior standard deviation.

    * LowRankGaussian, Σ = ½(diag σ² + D Dᵀ/(K − 1)): the top ``num`` eigenvectors u_j of the low-rank
      part D Dᵀ, found from the K × K Gram matrix G = D Dᵀ (rows of D are the K deviation columns):
      G a_j = μ_j a_j ⇒ u_j = Dᵀ a_j / √μ_j. Each is returned as √(u_jᵀ Σ u_j) · u_j (exact variance of
      q along u_j, including the diagonal part). These are SWAG's principal deviation directions, not
      exactly Σ's eigenvectors unless σ is constant.
    * DiagGaussian: σ-scaled random directions σ ⊙ ε, ε ~ N(0, I) (``key`` required).

    Args:
      q: a DiagGaussian or LowRankGaussian.
      num: number of directions (≤ K for LowRankGaussian).
      key: PRNG key (DiagGaussian only).

    Returns:
      A tuple of ``num`` trees shaped like ``q.mean``.
    """
    num = hs._check_int(num, "num", 1)
    if isinstance(q, post.LowRankGaussian):
        rank = q.rank
        if num > rank:
            raise ValueError(f"num={num} directions requested but the LowRankGaussian has rank K={rank}.")
        flat_d = jnp.concatenate([jnp.reshape(x, (rank, -1)) for x in jax.tree_util.tree_leaves(q.cov_factor)], 1)
        gram = np.asarray(flat_d @ flat_d.T, np.float64)
        mu, a = np.linalg.eigh(gram)
        order = np.argsort(mu)[::-1][:num]
        if mu[order[-1]] <= 1e-12 * max(mu.max(), 1e-30):
            raise ValueError(f"cov_factor spans fewer than num={num} directions (Gram eigenvalues "
                             f"{np.sort(mu)[::-1].tolist()}); lower num or use filter_normalized_direction.")
        out = []
        for j in order:
            coeffs = jnp.asarray(a[:, j] / math.sqrt(mu[j]), flat_d.dtype)
            u = jax.tree.map(lambda d: jnp.tensordot(coeffs, d, axes=1), q.cov_factor)
            diag_var = sum(jnp.sum(jnp.exp(2 * s) * x * x) for s, x in
                           zip(jax.tree_util.tree_leaves(q.log_std), jax.tree_util.tree_leaves(u)))
            proj = sum(jnp.tensordot(d, x, axes=x.ndim) for d, x in
                       zip(jax.tree_util.tree_leaves(q.cov_factor), jax.tree_util.tree_leaves(u)))
            low_var = jnp.sum(proj ** 2) / (rank - 1)
            std = jnp.sqrt(0.5 * (diag_var + low_var))
            out.append(jax.tree.map(lambda x: std * x, u))
        return tuple(out)
    if isinstance(q, post.DiagGaussian):
        if key is None:
            raise ValueError("posterior_directions of a DiagGaussian draws random σ-scaled directions: pass key=.")
        return tuple(jax.tree.map(lambda s, e: jnp.exp(s) * e, q.log_std,
                                  post.tree_normal_like(k, q.mean)) for k in jax.random.split(key, num))
    raise TypeError(f"posterior_directions needs a DiagGaussian or LowRankGaussian, got {type(q).__name__}.")


def _check_direction(params, d, name):
    if jax.tree.structure(d) != jax.tree.structure(params):
        raise ValueError(f"{name} must have the tree structure of params; got {jax.tree.structure(d)}.")
    for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(d)):
        if jnp.shape(x) != jnp.shape(y):
            raise ValueError(f"{name} has a leaf of shape {jnp.shape(y)} where params has {jnp.shape(x)}.")


def _grid_losses(loss_fn, params, directions, coeffs, batches, weight_fn, stacked):
    """ℓ(w₀ + Σⱼ cⱼ dⱼ) for every row c of ``coeffs`` (G, J); sequential over the grid (lax.map)."""
    stacked_dirs = jax.tree.map(lambda *ds: jnp.stack(ds), *directions)

    def point(p, dirs, c):
        return jax.tree.map(lambda x, d: x + jnp.tensordot(c.astype(d.dtype), d, axes=1), p, dirs)

    coeffs = jnp.asarray(coeffs, jnp.float32)
    if batches is None:
        f = jax.jit(lambda p, dirs, cs: jax.lax.map(lambda c: loss_fn(point(p, dirs, c)), cs))
        return np.asarray(f(params, stacked_dirs, coeffs), np.float64)
    if stacked:
        weights = hs._stacked_weights(batches, weight_fn)
        f = jax.jit(lambda p, dirs, cs, b: jax.lax.map(
            lambda c: jnp.sum(weights * jax.lax.map(lambda x: loss_fn(point(p, dirs, c), x), b)) / jnp.sum(weights),
            cs))
        return np.asarray(f(params, stacked_dirs, coeffs, batches), np.float64)
    f = jax.jit(lambda p, dirs, cs, b: jax.lax.map(lambda c: loss_fn(point(p, dirs, c), b), cs))
    fn = weight_fn or hs._default_weight
    acc, total = np.zeros(coeffs.shape[0]), 0.0
    for batch in hs._batch_source(batches)():
        w = float(fn(batch))
        if w > 0:
            acc += w * np.asarray(f(params, stacked_dirs, coeffs, batch), np.float64)
            total += w
    if total <= 0:
        raise ValueError("the batches hold no real examples (every batch has weight 0, or there are none).")
    return acc / total


def _check_grid(x, name):
    x = np.asarray(x, np.float64)
    if x.ndim != 1 or x.size < 2 or not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be a 1-D array of at least 2 finite coefficients, e.g. np.linspace(-1, 1, 41).")
    return x


def loss_landscape_1d(loss_fn: Callable, params: PyTree, direction: PyTree, alphas, *, batches=None,
                      weight_fn=None, stacked: bool = False) -> np.ndarray:
    """ℓ(w₀ + α d) for each α in ``alphas``.

    Args:
      loss_fn: ``params -> scalar`` (or ``(params, batch) -> scalar`` with ``batches``).
      params: the centre w₀ (a posterior mean or a sample).
      direction: d, shaped like params (:func:`filter_normalized_direction`, :func:`posterior_directions`).
      alphas: 1-D grid of coefficients.
      batches, weight_fn, stacked: accumulate ℓ over a loader (see :func:`fpbma.flatness.batched_loss_hvp`).

    Returns:
      float64 array of shape (len(alphas),).
    """
    _check_direction(params, direction, "direction")
    alphas = _check_grid(alphas, "alphas")
    return _grid_losses(loss_fn, params, (direction,), alphas[:, None], batches, weight_fn, stacked)


def loss_landscape_2d(loss_fn: Callable, params: PyTree, directions: Sequence[PyTree], alphas, betas, *,
                      batches=None, weight_fn=None, stacked: bool = False) -> np.ndarray:
    """ℓ(w₀ + α d₁ + β d₂) on the grid alphas × betas.

    Args:
      loss_fn, params, batches, weight_fn, stacked: as in :func:`loss_landscape_1d`.
      directions: (d₁, d₂).
      alphas, betas: 1-D grids.

    Returns:
      float64 array of shape (len(alphas), len(betas)); entry [i, j] is at (alphas[i], betas[j]).
    """
    if len(directions) != 2:
        raise ValueError(f"loss_landscape_2d needs two directions (d1, d2), got {len(directions)}.")
    for i, d in enumerate(directions):
        _check_direction(params, d, f"directions[{i}]")
    alphas, betas = _check_grid(alphas, "alphas"), _check_grid(betas, "betas")
    aa, bb = np.meshgrid(alphas, betas, indexing="ij")
    coeffs = np.stack([aa.ravel(), bb.ravel()], axis=1)
    losses = _grid_losses(loss_fn, params, tuple(directions), coeffs, batches, weight_fn, stacked)
    return losses.reshape(len(alphas), len(betas))


def _check_png_path(path):
    path = os.fspath(path)
    if not path.lower().endswith(".png"):
        raise ValueError(f"path={path!r} must end in .png.")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"the directory of path={path!r} does not exist; create {parent} first.")
    return path


def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)  # no pyplot and no global backend change
    return fig


def plot_landscape_1d(path, alphas, losses, *, labels: Optional[Sequence[str]] = None, xlabel: str = "α",
                      ylabel: str = "training loss", title: Optional[str] = None, log_scale: bool = False) -> str:
    """Writes a PNG of one or several 1-D slices ℓ(w₀ + α d).

    Args:
      path: output file ending in .png (its directory must exist).
      alphas: (A,) coefficients.
      losses: (A,) or (C, A) losses, one row per curve.
      labels: C legend entries.
      xlabel, ylabel, title: axis text.
      log_scale: logarithmic loss axis.

    Returns:
      ``path``.
    """
    path = _check_png_path(path)
    alphas = _check_grid(alphas, "alphas")
    losses = np.atleast_2d(np.asarray(losses, np.float64))
    if losses.ndim != 2 or losses.shape[1] != alphas.size:
        raise ValueError(f"losses has shape {losses.shape}; expected ({alphas.size},) or (C, {alphas.size}).")
    if labels is not None and len(labels) != losses.shape[0]:
        raise ValueError(f"{len(labels)} labels for {losses.shape[0]} curves.")
    fig = _figure((5, 3.5))
    ax = fig.add_subplot()
    for i, row in enumerate(losses):
        ax.plot(alphas, row, label=None if labels is None else labels[i])
    if labels is not None:
        ax.legend()
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title or "")
    if log_scale:
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_landscape_2d(path, alphas, betas, losses, *, levels: int = 30, xlabel: str = "α", ylabel: str = "β",
                      title: Optional[str] = None, log_scale: bool = False) -> str:
    """Writes a PNG contour plot of a 2-D slice ``losses[i, j] = ℓ(w₀ + alphas[i] d₁ + betas[j] d₂)``.

    Args:
      path: output file ending in .png (its directory must exist).
      alphas, betas: (A,), (B,) coefficients.
      losses: (A, B) losses.
      levels: number of contour levels.
      xlabel, ylabel, title: axis text.
      log_scale: contour log ℓ (ℓ must be positive).

    Returns:
      ``path``.
    """
    path = _check_png_path(path)
    alphas, betas = _check_grid(alphas, "alphas"), _check_grid(betas, "betas")
    losses = np.asarray(losses, np.float64)
    if losses.shape != (alphas.size, betas.size):
        raise ValueError(f"losses has shape {losses.shape}; expected (len(alphas), len(betas)) = "
                         f"({alphas.size}, {betas.size}).")
    if log_scale:
        if not np.all(losses > 0):
            raise ValueError("log_scale=True needs positive losses.")
        losses = np.log(losses)
    hs._check_int(levels, "levels", 2)
    fig = _figure((4.5, 4))
    ax = fig.add_subplot()
    cs = ax.contourf(alphas, betas, losses.T, levels=levels, cmap="viridis")
    ax.contour(alphas, betas, losses.T, levels=levels, colors="k", linewidths=0.3)
    fig.colorbar(cs, ax=ax, label="log loss" if log_scale else "loss")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title or "")
    fig.tight_layout()
    fig.savefig(path)
    return path
