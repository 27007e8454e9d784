"""What BMA, metrics and flatness tools accept from a baseline: the contract shared by every method.

A baseline's result is one of

* a posterior family of :mod:`fpbma.posterior` (``DiagGaussian``, ``LowRankGaussian``), sampled with
  :func:`fpbma.sample`;
* any object with a ``sample(key, n)`` method returning ``n`` weight pytrees stacked on a leading axis
  (e.g. :class:`fpbma.baselines.laplace.LastLayerPosterior`);
* a :class:`SampleSet`: weight pytrees already drawn (MCMC chains, SWAG samples with refreshed
  BatchNorm statistics, a single MAP point) stacked on a leading axis.

:func:`draw` turns any of them into ``n`` stacked weight pytrees, so BMA code needs one code path.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from fpbma import posterior as post

PyTree = Any

# One compiled program per (family, shapes, n) instead of hundreds of eager per-leaf dispatches; the
# structural checks of fpbma.sample still run while tracing.
_sample_jit = jax.jit(post.sample, static_argnums=2)

__all__ = ["SampleSet", "draw", "num_samples", "point_mass", "stack_samples"]


class SampleSet(NamedTuple):
    """Weight pytrees stacked on a leading axis of size S (every leaf has shape ``(S, ...)``).

    Attributes:
      samples: the stacked pytree. It may hold any tree the model's ``apply`` takes, e.g. only
        ``params`` or ``{"params": ..., "batch_stats": ...}`` when BatchNorm statistics were refreshed
        per sample.
    """

    samples: PyTree


def num_samples(samples: SampleSet) -> int:
    """S, the size of the leading axis of a :class:`SampleSet` (all leaves must agree)."""
    leaves = jax.tree_util.tree_leaves(samples.samples)
    if not leaves:
        raise ValueError("SampleSet is empty: it holds no arrays.")
    sizes = {int(jnp.shape(x)[0]) if jnp.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"SampleSet leaves disagree on the leading (sample) axis: {sorted(map(str, sizes))}; "
                         "stack every leaf over the same samples.")
    return sizes.pop()


def stack_samples(trees: Sequence[PyTree]) -> SampleSet:
    """A :class:`SampleSet` from a list of weight pytrees of one structure (e.g. collected by a chain)."""
    trees = list(trees)
    if not trees:
        raise ValueError("stack_samples got no samples; collect at least one weight pytree first.")
    structure = jax.tree.structure(trees[0])
    for i, t in enumerate(trees[1:], start=1):
        if jax.tree.structure(t) != structure:
            raise ValueError(f"sample #{i} has a different tree structure from sample #0; all samples must "
                             "describe the same parameters.")
    return SampleSet(jax.tree.map(lambda *xs: jnp.stack(xs), *trees))


def point_mass(params: PyTree) -> SampleSet:
    """A single point (MAP / SGD / SAM / FSAM weights) as a one-sample :class:`SampleSet`."""
    return SampleSet(jax.tree.map(lambda x: jnp.asarray(x)[None], params))


def draw(posterior_or_samples, key: jax.Array, n: Optional[int] = None) -> PyTree:
    """``n`` weight pytrees stacked on a leading axis, whatever a baseline returned.

    * DiagGaussian / LowRankGaussian: ``fpbma.sample(q, key, n)``.
    * an object with ``sample(key, n)`` (e.g. last-layer Laplace): that method.
    * :class:`SampleSet` with S samples: all S in stored order when ``n`` is None or S; otherwise a
      uniformly random subset of ``n < S`` without replacement (chosen with ``key``).

    Args:
      posterior_or_samples: a posterior family, an object with ``sample``, or a SampleSet.
      key: a PRNG key.
      n: number of weight pytrees; required for parametric posteriors.

    Returns:
      A pytree whose leaves have a leading axis of size n (S for a SampleSet with ``n=None``).
    """
    obj = posterior_or_samples
    if isinstance(obj, SampleSet):
        s = num_samples(obj)
        if n is None or int(n) == s:
            return obj.samples
        if not 1 <= int(n) < s:
            raise ValueError(f"n={n} samples requested from a SampleSet holding {s}; ask for 1..{s} "
                             "(or n=None for all of them).")
        idx = jax.random.choice(key, s, (int(n),), replace=False)
        return jax.tree.map(lambda x: x[idx], obj.samples)
    if n is None:
        raise ValueError(f"draw() needs n (the number of samples) for a {type(obj).__name__}.")
    if isinstance(obj, (post.DiagGaussian, post.LowRankGaussian)):
        return _sample_jit(obj, key, int(n))
    if callable(getattr(obj, "sample", None)):
        return obj.sample(key, int(n))
    raise TypeError(f"draw() does not know how to sample a {type(obj).__name__}: pass a DiagGaussian, "
                    "LowRankGaussian, SampleSet, or an object with a sample(key, n) method.")
