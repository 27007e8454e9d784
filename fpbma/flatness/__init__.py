"""Flatness analysis: Hessian spectra and traces of the training loss, posterior flatness, loss landscapes.

The paper's two empirical claims (arXiv:2406.15664) are that approximate Bayesian methods rarely find
flat posteriors and that flatter posteriors give better BMA. This package measures flatness:

* :mod:`fpbma.flatness.hessian` — Hessian-vector products (forward-over-reverse, accumulated over a
  loader), top-k eigenvalues by Lanczos, λ_max by power iteration, the trace by Hutchinson;
* :mod:`fpbma.flatness.summary` — :func:`posterior_flatness`, those numbers at S samples of a posterior;
* :mod:`fpbma.flatness.landscape` — 1-D / 2-D loss slices along filter-normalised or posterior
  directions, and PNG plots.

>>> import jax, jax.numpy as jnp
>>> import fpbma.flatness
>>> loss_fn = lambda w: 0.5 * jnp.sum(jnp.array([1.0, 4.0, 9.0]) * w["w"] ** 2)   # H = diag(1, 4, 9)
>>> params, key = {"w": jnp.zeros(3)}, jax.random.PRNGKey(0)
>>> fpbma.flatness.hessian_top_eigenvalues(loss_fn, params, k=2, key=key).round(4).tolist()
[9.0, 4.0]
>>> lam, _ = fpbma.flatness.hessian_max_eigenvalue(loss_fn, params, key=key)       # and its eigenvector
>>> round(float(lam), 4)
9.0
>>> tr = fpbma.flatness.hessian_trace(loss_fn, params, key=key, num_samples=100)   # Rademacher probes
>>> float(tr.trace), float(tr.stderr)       # exact for a diagonal H: zᵀHz = Σ Hᵢᵢ for z ∈ {±1}ⁿ
(14.0, 0.0)
"""

from fpbma.flatness.hessian import (
    TraceEstimate,
    batched_loss,
    batched_loss_hvp,
    classifier_loss_per_batch,
    hessian_max_eigenvalue,
    hessian_top_eigenvalues,
    hessian_trace,
    hvp,
)
from fpbma.flatness.landscape import (
    filter_normalized_direction,
    loss_landscape_1d,
    loss_landscape_2d,
    plot_landscape_1d,
    plot_landscape_2d,
    posterior_directions,
)
from fpbma.flatness.summary import FlatnessResult, posterior_flatness

__all__ = [
    "FlatnessResult",
    "TraceEstimate",
    "batched_loss",
    "batched_loss_hvp",
    "classifier_loss_per_batch",
    "filter_normalized_direction",
    "hessian_max_eigenvalue",
    "hessian_top_eigenvalues",
    "hessian_trace",
    "hvp",
    "loss_landscape_1d",
    "loss_landscape_2d",
    "plot_landscape_1d",
    "plot_landscape_2d",
    "posterior_directions",
    "posterior_flatness",
]
