"""Flatness of a posterior: Hessian spectra and traces of the training loss at its samples.

The paper's measure (README "Flatness"): for S samples w_s ~ q (or a method's own sample set), the top Hessian
eigenvalues λ₁ ≥ … ≥ λ_k of the training loss at w_s, the ratio λ₁/λ_k and the trace tr ∇²ℓ(w_s),
each reported as mean ± std over the samples.

References:
  Lim et al., "Flat Posterior Does Matter For Bayesian Model Averaging", arXiv:2406.15664.
"""

from __future__ import annotations

import collections.abc
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fpbma import posterior as post
from fpbma import types
from fpbma.flatness import hessian as hs

PyTree = Any

__all__ = ["FlatnessResult", "posterior_flatness"]


class FlatnessResult(NamedTuple):
    """Per-sample curvature of the training loss.

    Attributes:
      eigenvalues: (S, k) top Hessian eigenvalues at each sample, descending (Lanczos).
      trace: (S,) Hutchinson estimates of tr H (NaN when ``trace_samples=0``).
      trace_stderr: (S,) their standard errors.
    """

    eigenvalues: np.ndarray
    trace: np.ndarray
    trace_stderr: np.ndarray

    @property
    def lambda_max(self) -> np.ndarray:
        """(S,) λ₁ at each sample."""
        return self.eigenvalues[:, 0]

    @property
    def eigenvalue_ratio(self) -> np.ndarray:
        """(S,) λ₁/λ_k at each sample (λ₁/λ₅ for k = 5); meaningless where λ_k ≤ 0."""
        return self.eigenvalues[:, 0] / self.eigenvalues[:, -1]

    def summary(self) -> Dict[str, Tuple[float, float]]:
        """``{"lambda_max": (mean, std), "eigenvalue_ratio": ..., "trace": ...}`` over the samples (std: ddof 0)."""
        return {name: (float(np.mean(x)), float(np.std(x)))
                for name, x in (("lambda_max", self.lambda_max), ("eigenvalue_ratio", self.eigenvalue_ratio),
                                ("trace", self.trace))}


def posterior_flatness(loss_fn: Callable, samples_or_posterior, key: jax.Array, num_samples: Optional[int] = 10,
                       k: int = 5, *, batches=None, weight_fn=None, stacked: bool = False,
                       num_iterations: Optional[int] = None, trace_samples: int = 100,
                       wrt: Optional[str] = None) -> FlatnessResult:
    """λ₁..λ_k, λ₁/λ_k and tr H of the training loss at S samples of a posterior.

    For each w_s: eigenvalues of ∇²ℓ(w_s) by :func:`~fpbma.flatness.hessian_top_eigenvalues` (so λ_max
    is the Lanczos λ₁) and the trace by :func:`~fpbma.flatness.hessian_trace`. The Hessian-vector
    product is compiled once and reused for every sample.

    Args:
      loss_fn: ``w -> scalar`` (or ``(w, batch) -> scalar`` with ``batches``), where w has the structure
        of one sample (e.g. the ``params`` tree; close the loss over fixed BatchNorm statistics).
      samples_or_posterior: anything :func:`fpbma.types.draw` accepts — a DiagGaussian or
        LowRankGaussian, an object with ``sample(key, n)``, or a :class:`~fpbma.types.SampleSet`.
      key: PRNG key (split for the draw and each sample's Lanczos start / probes).
      num_samples: S for a parametric posterior; for a SampleSet, a random subset of that size, or all of
        its samples when None or ≥ its size.
      k: eigenvalues per sample.
      batches, weight_fn, stacked: accumulate ℓ over a loader (:func:`~fpbma.flatness.batched_loss_hvp`).
      num_iterations: Lanczos steps (default max(4k, 40)).
      trace_samples: Hutchinson probes per sample; 0 skips the trace.
      wrt: for samples that are mappings holding more than weights (e.g. ``{"params": ..., "batch_stats":
        ...}`` from SWAG with refreshed statistics), the entry whose Hessian block is measured; the other
        entries are held fixed. ``loss_fn`` still receives the whole sample. None: the whole sample.

    Returns:
      A :class:`FlatnessResult`; ``.summary()`` gives mean ± std.
    """
    obj = samples_or_posterior
    if not isinstance(obj, (post.DiagGaussian, post.LowRankGaussian, types.SampleSet)) and not callable(
            getattr(obj, "sample", None)):
        raise TypeError(f"posterior_flatness got a {type(obj).__name__}: pass a DiagGaussian, LowRankGaussian, "
                        "an object with sample(key, n), or stacked weights wrapped as "
                        "fpbma.types.SampleSet(samples).")
    k = hs._check_int(k, "k", 1)
    trace_samples = hs._check_int(trace_samples, "trace_samples", 0)
    if trace_samples == 1:
        raise ValueError("trace_samples=1 gives no standard error; use 0 (skip the trace) or >= 2.")
    hs._check_key(key)
    if isinstance(obj, types.SampleSet):
        s = types.num_samples(obj)
        n = None if num_samples is None or int(num_samples) >= s else hs._check_int(num_samples, "num_samples", 1)
    else:
        if num_samples is None:
            raise ValueError(f"num_samples is required to sample a {type(obj).__name__}.")
        n = hs._check_int(num_samples, "num_samples", 1)
    op = hs._make_operator(loss_fn, batches, weight_fn, stacked)
    draw_key, eval_key = jax.random.split(key)
    samples = types.draw(obj, draw_key, n)
    mask = None
    if wrt is not None:
        if not isinstance(samples, collections.abc.Mapping) or wrt not in samples:
            raise ValueError(f"wrt={wrt!r}: each sample must be a mapping with a {wrt!r} entry; its keys are "
                             f"{list(samples) if isinstance(samples, collections.abc.Mapping) else type(samples).__name__}.")
        one = jax.tree.map(lambda x: x[0], samples)
        selected = {name: jax.tree.map(lambda x, on=(name == wrt): jnp.full(jnp.shape(x), float(on)), sub)
                    for name, sub in one.items()}
        mask = ravel_pytree(type(one)(selected) if not isinstance(one, dict) else selected)[0]
    size = jax.tree_util.tree_leaves(samples)[0].shape[0]
    eigs, traces, errs = [], [], []
    for i, sample_key in enumerate(jax.random.split(eval_key, size)):
        w = jax.tree.map(lambda x: x[i], samples)
        lanczos_key, trace_key = jax.random.split(sample_key)
        eigs.append(hs._top_eigen(op, w, k, lanczos_key, num_iterations, False, mask))
        if trace_samples:
            t = hs._hutchinson(op, w, trace_samples, trace_key, mask)
            traces.append(t.trace)
            errs.append(t.stderr)
        else:
            traces.append(np.nan)
            errs.append(np.nan)
    return FlatnessResult(np.stack(eigs), np.asarray(traces), np.asarray(errs))
