"""Posterior families over parameter pytrees, with closed-form KL and exact Fisher products.

Two Gaussian families, each a pytree whose fields are trees shaped like the network's parameters
(so ``optax.apply_updates(q, updates)`` works on them directly):

* :class:`DiagGaussian` ``(mean, log_std)``:  w = μ + σ ⊙ ε,  σ = exp(log_std).
* :class:`LowRankGaussian` ``(mean, log_std, cov_factor)``, the SWAG form (Maddox et al., 2019)
  with K deviation columns D (``cov_factor`` leaves carry a leading axis of size K):

      Σ = ½ (diag(σ²) + D Dᵀ / (K − 1)),    w = μ + (σ ⊙ ε₁ + D ε₂ / √(K − 1)) / √2.

  Σ is never materialised. Writing Σ = A + Uᵀ U with A = diag(σ²/2) and U = D / √(2(K − 1)) (K × P),
  every quantity uses Woodbury and the matrix-determinant lemma with the K × K capacitance
  matrix M = I + U A⁻¹ Uᵀ:

      Σ⁻¹ v = A⁻¹ v − A⁻¹ Uᵀ M⁻¹ U A⁻¹ v,      log|Σ| = Σᵢ log aᵢ + log|M|,

  at O(P K²) cost. The O(P) work runs on flat buffers: μ and log σ concatenated into P-vectors and D
  into one K × P matrix, so the traced computation has the same size for any number of leaves.

The Fisher information of q with respect to its own parameters θ (derived per family on the docs page
*FP-BMA math*, section "The posterior families and their Fisher") is

    F_θ = E_{w~q_θ}[∇_θ log q_θ(w) ∇_θ log q_θ(w)ᵀ] = ∇²_Δ KL(q_{θ+Δ} ‖ q_θ) |_{Δ=0}.

Reference: Lim et al., "Flat Posterior Does Matter For Bayesian Model Averaging" (FP-BMA, called
SA-BMA in earlier versions), arXiv:2406.15664.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import distrax
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

PyTree = Any

__all__ = [
    "DiagGaussian",
    "LowRankGaussian",
    "LowRankNoise",
    "sample_noise",
    "tree_normal_like",
    "sample",
    "sample_from_noise",
    "log_prob",
    "kl_divergence",
    "fisher_vp",
    "inverse_fisher_vp",
    "fisher_diagonal",
    "num_parameters",
    "kl_along_line",
    "perturbation_kl",
    "FlatLayout",
    "flat_layout",
]


class DiagGaussian(NamedTuple):
    """Mean-field Gaussian q(w) = Πᵢ N(wᵢ; μᵢ, σᵢ²) over a parameter pytree.

    Attributes:
      mean: tree of means μ, shaped like the network's parameters.
      log_std: tree of log σ, same structure and shapes as ``mean``.
    """

    mean: PyTree
    log_std: PyTree

    @classmethod
    def from_point(cls, params: PyTree, std: float) -> "DiagGaussian":
        """q centred at a point estimate with a constant standard deviation ``std``.

        >>> q = DiagGaussian.from_point({"w": jnp.zeros(3)}, std=0.1)
        >>> [round(float(s), 4) for s in jnp.exp(q.log_std["w"])]
        [0.1, 0.1, 0.1]
        """
        _check_positive_finite(std, "std")
        _check_finite_tree(params, "params")
        log_std = jax.tree.map(lambda x: jnp.full(jnp.shape(x), math.log(std), jnp.result_type(x, jnp.float32)), params)
        return cls(mean=params, log_std=log_std)


class LowRankGaussian(NamedTuple):
    """SWAG-form Gaussian Σ = ½(diag(σ²) + D Dᵀ/(K − 1)) over a parameter pytree.

    Attributes:
      mean: tree of means μ.
      log_std: tree of log σ (the diagonal part), shaped like ``mean``.
      cov_factor: tree of deviation columns D; each leaf has shape ``(K, *mean_leaf.shape)``, K ≥ 2.
    """

    mean: PyTree
    log_std: PyTree
    cov_factor: PyTree

    @property
    def rank(self) -> int:
        """K, the number of deviation columns."""
        return _rank(self)

    @classmethod
    def from_point(cls, params: PyTree, std: float, rank: int) -> "LowRankGaussian":
        """q centred at ``params`` with diagonal std ``std`` and ``rank`` zero deviation columns."""
        _check_positive_finite(std, "std")
        _check_finite_tree(params, "params")
        if int(rank) < 2:
            raise ValueError(f"rank={rank}: LowRankGaussian needs K >= 2 deviation columns because of "
                             "the 1/(K-1) factor (as in SWAG); pass rank >= 2 or use DiagGaussian.")
        log_std = jax.tree.map(lambda x: jnp.full(jnp.shape(x), math.log(std), jnp.result_type(x, jnp.float32)), params)
        cov_factor = jax.tree.map(lambda x: jnp.zeros((int(rank),) + jnp.shape(x), jnp.result_type(x, jnp.float32)), params)
        return cls(mean=params, log_std=log_std, cov_factor=cov_factor)

    @classmethod
    def from_swag_moments(
        cls,
        mean: PyTree,
        sq_mean: PyTree,
        deviations: PyTree,
        min_var: float = 1e-30,
    ) -> "LowRankGaussian":
        """Builds the SWAG posterior from first/second moments and the last K deviations.

        σ² = max(E[w²] − E[w]², min_var) and D = deviations (leaves shaped ``(K, *param.shape)``,
        each column a deviation w_t − w̄_t), as in Maddox et al. (2019), "A Simple Baseline for
        Bayesian Uncertainty in Deep Learning".
        """
        _check_same_structure(mean, sq_mean, "mean", "sq_mean")
        _check_finite_tree(mean, "mean")
        _check_finite_tree(sq_mean, "sq_mean")
        _check_finite_tree(deviations, "deviations")
        _check_positive_finite(min_var, "min_var")
        var = jax.tree.map(lambda m, s: jnp.maximum(s - m * m, min_var), mean, sq_mean)
        log_std = jax.tree.map(lambda v: 0.5 * jnp.log(v), var)
        q = cls(mean=mean, log_std=log_std, cov_factor=deviations)
        _validate(q)
        return q


class LowRankNoise(NamedTuple):
    """Standard-normal noise of a LowRankGaussian sample: ε₁ shaped like the parameters, ε₂ ∈ ℝ^K."""

    diag: PyTree
    rank: jax.Array


# ----------------------------------------------------------------------------------------------
# Validation: raised eagerly, before any work. Value checks are skipped for traced arrays.


def _leaves(tree):
    return jax.tree_util.tree_leaves(tree)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_positive_finite(x, name):
    if not (np.isfinite(x) and x > 0):
        raise ValueError(f"{name}={x!r} must be a positive finite number.")


def _check_finite_tree(tree, name):
    for i, leaf in enumerate(_leaves(tree)):
        # NumPy, not jnp: under a jit trace jnp would turn even a closed-over constant into a tracer.
        if _is_concrete(leaf) and not np.isfinite(np.asarray(leaf)).all():
            raise ValueError(f"{name} has non-finite values (NaN or inf) in leaf #{i} "
                             f"(shape {jnp.shape(leaf)}); fix the input before building the posterior.")


def _check_same_structure(a, b, name_a, name_b):
    ta, tb = jax.tree.structure(a), jax.tree.structure(b)
    if ta != tb:
        raise ValueError(f"{name_a} and {name_b} have different tree structures:\n  {ta}\nvs\n  {tb}\n"
                         "They must describe the same parameters.")
    for i, (x, y) in enumerate(zip(_leaves(a), _leaves(b))):
        if jnp.shape(x) != jnp.shape(y):
            raise ValueError(f"{name_a} and {name_b} differ in shape at leaf #{i}: "
                             f"{jnp.shape(x)} vs {jnp.shape(y)}.")


def _rank(q: LowRankGaussian) -> int:
    leaves = _leaves(q.cov_factor)
    if not leaves:
        raise ValueError("LowRankGaussian.cov_factor is empty.")
    return int(jnp.shape(leaves[0])[0])


def _validate(q) -> None:
    """Static checks (always) and finiteness checks (when values are concrete)."""
    if isinstance(q, DiagGaussian):
        _check_same_structure(q.mean, q.log_std, "q.mean", "q.log_std")
    elif isinstance(q, LowRankGaussian):
        _check_same_structure(q.mean, q.log_std, "q.mean", "q.log_std")
        if jax.tree.structure(q.cov_factor) != jax.tree.structure(q.mean):
            raise ValueError("q.cov_factor must have the same tree structure as q.mean "
                             "(each leaf with an extra leading axis of size K).")
        ranks = {jnp.shape(d)[0] if jnp.ndim(d) else None for d in _leaves(q.cov_factor)}
        for i, (m, d) in enumerate(zip(_leaves(q.mean), _leaves(q.cov_factor))):
            if jnp.shape(d)[1:] != jnp.shape(m) or jnp.ndim(d) != jnp.ndim(m) + 1:
                raise ValueError(f"q.cov_factor leaf #{i} has shape {jnp.shape(d)}; expected "
                                 f"(K, *{jnp.shape(m)}) to match q.mean.")
        if len(ranks) != 1:
            raise ValueError(f"q.cov_factor leaves disagree on K: {sorted(ranks)}.")
        k = ranks.pop()
        if k < 2:
            raise ValueError(f"LowRankGaussian has K={k} deviation columns; K >= 2 is required "
                             "because of the 1/(K-1) factor (SWAG rejects K < 2 too).")
    else:
        raise TypeError(f"Expected a DiagGaussian or LowRankGaussian, got {type(q).__name__}.")
    for name, tree in zip(q._fields, q):
        _check_finite_tree(tree, f"q.{name}")


def _validate_like(q, v, name: str) -> None:
    """v must be a tree shaped like q (a tangent of θ)."""
    if type(v) is not type(q):
        raise TypeError(f"{name} must be a {type(q).__name__} shaped like q (a tangent of its parameters), "
                        f"got {type(v).__name__}.")
    _check_same_structure(q, v, "q", name)


# ----------------------------------------------------------------------------------------------
# Flat buffers. Every O(P) computation of the posterior algebra (Gram products, Woodbury solves, the KL,
# the Fisher) runs on the parameters concatenated into one vector, and the deviation columns into one
# (K, P) matrix: a parameter tree of L leaves then traces into a fixed number of operations instead of
# L copies of each, so the compile time of a step does not grow with L. The concatenation is a copy of
# θ (one pass over it); splitting a result back into leaves is a view.


def _opaque_true(x: jax.Array) -> jax.Array:
    """A boolean that is always True but that the compiler cannot evaluate: u ≠ u + 1 for the unsigned
    bits u of the first element of ``x`` (any dtype, wrapping addition)."""
    first = jnp.ravel(x)[0]
    if jnp.issubdtype(first.dtype, jax.dtypes.prng_key):
        first = jax.random.key_data(first).reshape(-1)[0]
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[first.dtype.itemsize]
    u = jax.lax.bitcast_convert_type(first, bits) if first.dtype != jnp.bool_ else first.astype(jnp.uint8)
    return u != u + jnp.ones_like(u)


def _materialised(fn: Callable, x):
    """``fn(x)`` computed inside a conditional whose predicate is always true but opaque to XLA.

    XLA fuses cheap elementwise producers into each of their consumers. For a tree of L leaves cut out
    of one flat buffer, or drawn from one flat normal, that puts a copy of the producer into the
    consumer of every leaf (a layer of the network): L large fusions to compile instead of one. Behind
    the conditional the leaves are computed once, as plain copies. Forward and reverse mode see fn.
    Outside a trace nothing fuses, and a conditional would compile its branches at every call."""
    if not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(x)):
        return fn(x)
    return jax.lax.cond(_opaque_true(x), fn, lambda y: jax.tree.map(jnp.zeros_like, jax.eval_shape(fn, y)), x)


class FlatLayout:
    """The leaf shapes of a parameter tree, to hold trees shaped like it (and posteriors over it) flat.

    A posterior over a network of L weight arrays is a tree of 2L or 3L leaves, and a step written leaf
    by leaf traces into L copies of every operation: XLA compiles each copy on its own, so compile time
    grows with the depth of the network. Held flat (μ and log σ as P-vectors, D as one K × P matrix, the
    leaves concatenated in ``jax.tree`` order), the posterior algebra, the optimizer and the update are a
    fixed number of operations for any L; only the network sees the leaves, through :meth:`leaves`.

    Args:
      tree: a tree shaped like the weights (e.g. ``q.mean``); only its structure and shapes are used.

    >>> import fpbma, jax.numpy as jnp
    >>> q = fpbma.DiagGaussian.from_point({"b": jnp.zeros(2), "w": jnp.ones((2, 3))}, std=0.1)
    >>> layout = fpbma.FlatLayout(q.mean)
    >>> flat = layout.flatten(q)                  # a DiagGaussian with (P,) fields
    >>> flat.mean.shape, layout.size
    ((8,), 8)
    >>> layout.leaves(flat.mean)["w"].shape       # the network's view of a flat weight vector
    (2, 3)
    >>> bool(jnp.all(layout.unflatten(flat).log_std["w"] == q.log_std["w"]))
    True
    """

    def __init__(self, tree):
        leaves, self.treedef = jax.tree.flatten(tree)
        self.shapes = [tuple(jnp.shape(x)) for x in leaves]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.size = int(sum(self.sizes))

    def ravel(self, tree, lead: int = 0) -> jax.Array:
        """The leaves of ``tree`` (shaped like the layout's, with ``lead`` extra leading axes) as one
        array of shape ``(*lead, P)``."""
        leaves = self.treedef.flatten_up_to(tree)
        parts = [jnp.reshape(x, jnp.shape(x)[:lead] + (-1,)) for x in leaves]
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=lead)

    def unravel(self, flat: jax.Array):
        """The inverse of :meth:`ravel`: ``(*lead, P)`` → a tree of ``(*lead, *leaf_shape)`` leaves."""
        lead = jnp.shape(flat)[:-1]
        parts = [flat] if len(self.sizes) == 1 else jnp.split(flat, np.cumsum(self.sizes)[:-1], axis=-1)
        return jax.tree.unflatten(self.treedef, [x.reshape(lead + s) for x, s in zip(parts, self.shapes)])

    def leaves(self, flat: jax.Array):
        """:meth:`unravel` for the network: the leaves of a flat weight vector, each computed once.

        Inside a traced step, prefer it to :meth:`unravel` for weights a network consumes: it keeps XLA
        from fusing the computation of the flat vector (a sample μ + σε + …) into every layer."""
        return _materialised(self.unravel, flat) if len(self.sizes) > 1 else self.unravel(flat)

    def flatten(self, q):
        """A posterior over this layout's tree → the same family with flat fields ((P,), D as (K, P))."""
        return type(q)(*[self.ravel(f, lead=1 if name == "cov_factor" else 0) for name, f in zip(q._fields, q)])

    def unflatten(self, flat_q):
        """The inverse of :meth:`flatten`."""
        return type(flat_q)(*[self.unravel(f) for f in flat_q])


def flat_layout(q) -> Optional[FlatLayout]:
    """The :class:`FlatLayout` to hold posterior ``q`` flat in a train step, or None when there is nothing
    to gain or it cannot be held flat: q is not a posterior, has one leaf per field, or its leaves have
    different dtypes (one flat buffer has one dtype)."""
    if not isinstance(q, (DiagGaussian, LowRankGaussian)) or jax.tree.structure(q.mean).num_leaves < 2:
        return None
    return FlatLayout(q.mean) if _flat_dtype(q) is not None else None


def _flat_dtype(*trees):
    """The common dtype of every leaf, or None when the leaves disagree (those keep the leaf-wise path,
    whose per-leaf dtype promotion a single flat buffer cannot reproduce)."""
    dtypes = {jnp.result_type(x) for t in trees for x in _leaves(t)}
    return dtypes.pop() if len(dtypes) == 1 else None


def _is_flat(q) -> bool:
    return jax.tree.structure(q.mean).num_leaves == 1 and jnp.ndim(_leaves(q.mean)[0]) == 1


def _flatten(q, *others):
    """(layout, q, *others) with every posterior-shaped argument as a one-leaf posterior of flat fields
    (mean and log σ of shape (P,), D of shape (K, P)) and every mean-shaped argument (a plain tree) as a
    (P,) vector; ``layout`` is None (and the arguments unchanged) when leaf dtypes differ or q is flat."""
    if _is_flat(q) or _flat_dtype(q, *others) is None:
        return None, q, *others
    layout = FlatLayout(q.mean)

    def flat(x):
        return layout.flatten(x) if isinstance(x, (DiagGaussian, LowRankGaussian)) else layout.ravel(x)

    return layout, flat(q), *[flat(x) for x in others]


def _unflatten(layout: Optional[FlatLayout], x):
    """Splits a flat posterior-shaped or mean-shaped result back into the layout's leaves."""
    if layout is None:
        return x
    return layout.unflatten(x) if isinstance(x, (DiagGaussian, LowRankGaussian)) else layout.unravel(x)

# ----------------------------------------------------------------------------------------------
# Leaf-wise helpers for the low-rank algebra (K × P "matrices" are trees with a leading K axis).


def _tree_sum(tree) -> jax.Array:
    return sum(jnp.sum(x) for x in _leaves(tree))


def _sum_k(x: jax.Array) -> jax.Array:
    """Σ over the leading K axis of one leaf, unrolled: XLA:CPU reduces a major axis with strided loads,
    ~30× slower than K fused elementwise adds (363 ms vs 11 ms for a (5, 1.1·10⁷) array)."""
    return sum(x[j] for j in range(x.shape[0]))


# Leaves are viewed as 2-D (K, n) matrices so XLA emits plain matmuls (an N-d einsum lowers to a
# transposing dot_general that is several times slower on CPU).


def _kk(a, b) -> jax.Array:
    """Σ_leaves a bᵀ for trees of (K_a, ...) and (K_b, ...) leaves → (K_a, K_b)."""
    return sum(x.reshape(x.shape[0], -1) @ y.reshape(y.shape[0], -1).T for x, y in zip(_leaves(a), _leaves(b)))


def _kv(a, v) -> jax.Array:
    """Σ_leaves a v for a tree of (K, ...) leaves and a tree of (...) leaves → (K,)."""
    return sum(x.reshape(x.shape[0], -1) @ y.reshape(-1) for x, y in zip(_leaves(a), _leaves(v)))


def _combine_leaf(coeffs: jax.Array, x: jax.Array) -> jax.Array:
    """coeffsᵀ x: (K,) or (K, J) coefficients times one (K, ...) leaf → (...) or (J, ...).

    A matmul, not K fused multiply-adds: unrolled, XLA:CPU copied the K-term sums into every consumer
    fusion and an FP-BMA step with the low-rank KL ran 1.7× slower (ResNet-20).
    """
    flat = coeffs.T @ x.reshape(x.shape[0], -1)
    return flat.reshape(x.shape[1:] if coeffs.ndim == 1 else (coeffs.shape[1],) + x.shape[1:])


def _combine(coeffs: jax.Array, a):
    """coeffsᵀ a for a tree of (K, ...) leaves (see :func:`_combine_leaf`)."""
    return jax.tree.map(lambda x: _combine_leaf(coeffs, x), a)


class _Woodbury(NamedTuple):
    """Cached pieces of Σ = A + Uᵀ U:  a = σ²/2,  U,  W = U A⁻¹,  G = U A⁻¹ Uᵀ,  chol(M), M = I + G."""

    a: PyTree
    u: PyTree
    w: PyTree
    gram: jax.Array
    chol: jax.Array


def _woodbury(q: LowRankGaussian) -> _Woodbury:
    k = _rank(q)
    a = jax.tree.map(lambda s: 0.5 * jnp.exp(2.0 * s), q.log_std)
    u = jax.tree.map(lambda d: d / math.sqrt(2.0 * (k - 1)), q.cov_factor)
    w = jax.tree.map(lambda ui, ai: ui / ai, u, a)
    gram = _kk(u, w)
    return _Woodbury(a, u, w, gram, jnp.linalg.cholesky(jnp.eye(k, dtype=_dtype(q)) + gram))


def _dtype(q):
    return jnp.result_type(*_leaves(q.log_std))


def _cho_solve(chol, b):
    return jax.scipy.linalg.cho_solve((chol, True), b)


def _sigma_inv_vp(wb: _Woodbury, v):
    """Σ⁻¹ v by Woodbury: A⁻¹ v − Wᵀ M⁻¹ (W v)."""
    coeff = _cho_solve(wb.chol, _kv(wb.w, v))
    correction = _combine(coeff, wb.w)
    return jax.tree.map(lambda vi, ai, ci: vi / ai - ci, v, wb.a, correction)


def _sigma_vp(wb: _Woodbury, v):
    """Σ v = A v + Uᵀ (U v)."""
    low_rank = _combine(_kv(wb.u, v), wb.u)
    return jax.tree.map(lambda vi, ai, li: ai * vi + li, v, wb.a, low_rank)


def _log_det(wb: _Woodbury) -> jax.Array:
    return _tree_sum(jax.tree.map(jnp.log, wb.a)) + 2.0 * jnp.sum(jnp.log(jnp.diag(wb.chol)))


def _sigma_inv_low_rank(wb: _Woodbury):
    """Σ⁻¹ Uᵀ = A⁻¹ Uᵀ M⁻¹ (row j: Σₖ (M⁻¹)ₖⱼ wₖ), exact and free of cancellation."""
    return _combine(_cho_solve(wb.chol, jnp.eye(wb.chol.shape[0], dtype=wb.chol.dtype)), wb.w)


def _sigma_inv_diag(wb: _Woodbury, sigma_inv_u):
    """diag(Σ⁻¹)ᵢ = 1/aᵢ − Σ_j W_ji (Σ⁻¹Uᵀ)_ji, clamped at 0 against float32 round-off."""
    return jax.tree.map(lambda ai, wi, si: jnp.maximum(1.0 / ai - _sum_k(wi * si), 0.0),
                        wb.a, wb.w, sigma_inv_u)


# ----------------------------------------------------------------------------------------------
# Sampling.


def tree_normal_like(key: jax.Array, tree):
    """Independent standard normals shaped like ``tree`` (float32 or wider per leaf).

    One flat draw of Σ|leaf| numbers, cut into the leaves: drawing per leaf puts one threefry kernel per
    leaf into the compiled program, which dominated the compile time of FP-BMA steps on deep networks.
    """
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return tree
    dtypes = [jnp.result_type(x, jnp.float32) for x in leaves]
    sizes = [int(np.size(x)) for x in leaves]
    shape, dtype = (sum(sizes),), jnp.result_type(*dtypes)
    draw = functools.partial(jax.random.normal, shape=shape, dtype=dtype)
    # Materialised once (see _materialised): otherwise XLA fuses the bits-to-normal transform (an erf⁻¹
    # polynomial) into the consumer of every leaf's slice. The values are those of jax.random.normal(key, (P,)).
    flat = _materialised(draw, key) if len(leaves) > 1 else draw(key)
    offsets = np.cumsum([0] + sizes)
    return jax.tree.unflatten(treedef, [flat[a:b].reshape(jnp.shape(x)).astype(d)
                                        for a, b, x, d in zip(offsets[:-1], offsets[1:], leaves, dtypes)])


def sample_noise(q, key: jax.Array):
    """Standard-normal noise ε for one sample of q (a tree for DiagGaussian, LowRankNoise otherwise).

    Drawing ε once and reusing it across the clean and perturbed passes of an FP-BMA step makes the two
    gradients differ only by the perturbation of θ.
    """
    key_rank, key_diag = jax.random.split(key)
    diag = tree_normal_like(key_diag, q.mean)
    if isinstance(q, DiagGaussian):
        return diag
    _validate(q)
    return LowRankNoise(diag=diag, rank=jax.random.normal(key_rank, (_rank(q),), _dtype(q)))


def sample_from_noise(q, noise):
    """Deterministic reparameterised sample w(θ, ε).

    DiagGaussian: w = μ + σ ⊙ ε.  LowRankGaussian: w = μ + (σ ⊙ ε₁ + D ε₂ / √(K − 1)) / √2.
    """
    if isinstance(q, DiagGaussian):
        return jax.tree.map(lambda m, s, e: m + jnp.exp(s) * e, q.mean, q.log_std, noise)
    if isinstance(q, LowRankGaussian):
        k = _rank(q)
        if not isinstance(noise, LowRankNoise):
            raise TypeError("noise for a LowRankGaussian must be a LowRankNoise(diag, rank); "
                            "use fpbma.sample_noise(q, key).")
        # Leaf by leaf, on purpose: each leaf's sample fuses with the layer that consumes it.
        low = _combine(noise.rank / math.sqrt(k - 1), q.cov_factor)
        return jax.tree.map(lambda m, s, e, l: m + (jnp.exp(s) * e + l) / math.sqrt(2.0),
                            q.mean, q.log_std, noise.diag, low)
    raise TypeError(f"Expected a DiagGaussian or LowRankGaussian, got {type(q).__name__}.")


def sample(q, key: jax.Array, n: Optional[int] = None):
    """One weight pytree w ~ q, or ``n`` of them stacked on a leading axis.

    >>> q = DiagGaussian.from_point({"w": jnp.zeros(3)}, 0.1)
    >>> sample(q, jax.random.PRNGKey(0))["w"].shape
    (3,)
    >>> sample(q, jax.random.PRNGKey(0), 5)["w"].shape        # n samples stacked on a leading axis
    (5, 3)
    """
    _validate(q)
    if n is None:
        return sample_from_noise(q, sample_noise(q, key))
    if int(n) < 1:
        raise ValueError(f"n={n} samples requested; n must be >= 1.")
    return jax.vmap(lambda k: sample_from_noise(q, sample_noise(q, k)))(jax.random.split(key, int(n)))


# ----------------------------------------------------------------------------------------------
# Densities.


def num_parameters(tree) -> int:
    """P, the number of scalar parameters in a tree."""
    return sum(int(np.prod(jnp.shape(x))) for x in _leaves(tree))


def log_prob(q, w) -> jax.Array:
    """log q(w) for a weight pytree w shaped like ``q.mean``.

    LowRankGaussian: −½ [P log 2π + log|Σ| + rᵀ Σ⁻¹ r], r = w − μ, via Woodbury and the determinant
    lemma (O(P K²)).
    """
    _validate(q)
    _check_same_structure(q.mean, w, "q.mean", "w")
    _, q, w = _flatten(q, w)
    if isinstance(q, DiagGaussian):
        return _tree_sum(jax.tree.map(lambda m, s, x: distrax.Normal(m, jnp.exp(s)).log_prob(x),
                                      q.mean, q.log_std, w))
    wb = _woodbury(q)
    r = jax.tree.map(jnp.subtract, w, q.mean)
    quad = _tree_sum(jax.tree.map(jnp.multiply, r, _sigma_inv_vp(wb, r)))
    p = num_parameters(q.mean)
    return -0.5 * (p * math.log(2.0 * math.pi) + _log_det(wb) + quad)


def kl_divergence(q, p) -> jax.Array:
    """Closed-form KL(q ‖ p) for two posteriors of the same family over the same parameters.

        KL = ½ [tr(Σ_p⁻¹ Σ_q) + δᵀ Σ_p⁻¹ δ − P + log|Σ_p| − log|Σ_q|],   δ = μ_p − μ_q.

    For LowRankGaussian the trace splits as Σᵢ a_qᵢ/a_pᵢ − tr(M_p⁻¹ W_p A_q W_pᵀ)
    + tr(U_q Σ_p⁻¹ U_qᵀ), all O(P K²); the per-coordinate part is accumulated as
    Σᵢ (a_qᵢ/a_pᵢ − 1 − log(a_qᵢ/a_pᵢ)) so that KL(q‖q) is exactly 0 in the diagonal part, and the
    result is clamped at 0 against round-off. Its gradient with respect to q is in closed form (a
    ``jax.custom_jvp``, see ``_low_rank_kl_parts``); forward mode, reverse mode and Hessians all work,
    and the gradient with respect to p is autodiff of the closed form.
    """
    if type(q) is not type(p):
        raise TypeError(f"kl_divergence needs q and p of the same family, got {type(q).__name__} and "
                        f"{type(p).__name__}; convert one of them first.")
    _validate(q)
    _validate(p)
    _check_same_structure(q.mean, p.mean, "q.mean", "p.mean")
    _, q, p = _flatten(q, p)
    if isinstance(q, DiagGaussian):
        return _tree_sum(jax.tree.map(
            lambda mq, sq, mp, sp: distrax.Normal(mq, jnp.exp(sq)).kl_divergence(distrax.Normal(mp, jnp.exp(sp))),
            q.mean, q.log_std, p.mean, p.log_std))
    return _low_rank_kl(q, p)


# ----------------------------------------------------------------------------------------------
# KL between two LowRankGaussians: closed form with its q-gradient derived by hand.
#
# Reverse-mode autodiff of the closed form writes every K × P intermediate (A⁻¹U, A_q W_p, …) of
# the forward pass to memory and reads it back in the backward pass; on a full network the KL and its
# gradient then cost ~60 passes over θ, more than the two network passes of an FP-BMA step. The
# gradient in closed form needs only the K × K matrices of the forward pass and a few K-row
# combinations per field of q (ResNet-18, K = 5: 0.57 s instead of 1.77 s), so the KL is a
# custom_jvp: its tangent is ⟨∇_q KL, dq⟩ (+ autodiff of the value in p, used only when p itself is
# differentiated). Forward mode, reverse mode and Hessians (the Fisher tests) all go through it.


def _quad(matrix: jax.Array, x: jax.Array) -> jax.Array:
    """Per coordinate i: x[:, i]ᵀ matrix x[:, i] for one (K, ...) leaf and a symmetric K × K matrix → (...)."""
    return _sum_k(x * _combine_leaf(matrix, x))


def _low_rank_kl_parts(q: LowRankGaussian, p: LowRankGaussian, with_grad: bool):
    """KL(q ‖ p) before clamping and, if ``with_grad``, its gradient with respect to q (a LowRankGaussian).

    With c = 1/(2(K − 1)) (K of q or p), U = √c D, a = σ²/2, W = U/a, M = I + U A⁻¹ Uᵀ, δ = μ_p − μ_q:

        2 KL = Σᵢ (a_q/a_p − 1 − log(a_q/a_p)) − tr(M_p⁻¹ W_p A_q W_pᵀ) + Σ U_q²/a_p − tr(M_p⁻¹ H Hᵀ)
               + δᵀA_p⁻¹δ − bᵀ M_p⁻¹ b + log|M_p| − log|M_q|,      H = W_p U_qᵀ,  b = W_p δ.

    Gradient, from ∂KL/∂μ_q = −Σ_p⁻¹δ and ∂KL/∂Σ_q = ½(Σ_p⁻¹ − Σ_q⁻¹) through Σ = A + UᵀU:

        ∂/∂μ_q       = −δ/a_p + W_pᵀ M_p⁻¹ b
        ∂/∂log σ_qᵢ  = a_qᵢ (Σ_p⁻¹)ᵢᵢ − a_qᵢ (Σ_q⁻¹)ᵢᵢ,   a (Σ⁻¹)ᵢᵢ = 1 − U[:, i]ᵀ M⁻¹ U[:, i] / aᵢ
        ∂/∂D_q       = √c_q U_q (Σ_p⁻¹ − Σ_q⁻¹) = √c_q (U_q/a_p − Hᵀ M_p⁻¹ W_p − M_q⁻¹ W_q)

    (U_q Σ_q⁻¹ = M_q⁻¹ W_q exactly, free of cancellation). The per-coordinate sum is accumulated as
    a_q/a_p − 1 − log(a_q/a_p) so that KL(q ‖ q) is 0 there up to the K × K terms.
    """
    c_q, c_p = 0.5 / (_rank(q) - 1), 0.5 / (_rank(p) - 1)
    eye_q, eye_p = (jnp.eye(_rank(x), dtype=_dtype(q)) for x in (q, p))
    log_ratio = jax.tree.map(lambda sq, sp: 2.0 * (sq - sp), q.log_std, p.log_std)  # log(a_q / a_p)
    inv_a_p = jax.tree.map(lambda s: 2.0 * jnp.exp(-2.0 * s), p.log_std)
    inv_a_q = jax.tree.map(lambda s: 2.0 * jnp.exp(-2.0 * s), q.log_std)
    delta = jax.tree.map(jnp.subtract, p.mean, q.mean)
    x_p = jax.tree.map(jnp.multiply, p.cov_factor, inv_a_p)  # D_p / a_p = W_p / √c_p
    gram_p = c_p * _kk(x_p, p.cov_factor)
    gram_q = c_q * _kk(jax.tree.map(jnp.multiply, q.cov_factor, inv_a_q), q.cov_factor)
    # a_q = a_p exp(log ratio), so W_p A_q W_pᵀ = c_p (D_p/a_p) diag(a_q) (D_p/a_p)ᵀ.
    t = c_p * _kk(jax.tree.map(lambda x, ia, lr: x * (jnp.exp(lr) / ia), x_p, inv_a_p, log_ratio), x_p)
    h = math.sqrt(c_p * c_q) * _kk(x_p, q.cov_factor)
    b = math.sqrt(c_p) * _kv(x_p, delta)
    chol_p = jnp.linalg.cholesky(eye_p + gram_p)
    chol_q = jnp.linalg.cholesky(eye_q + gram_q)
    m_inv_p = _cho_solve(chol_p, eye_p)
    per_coordinate = _tree_sum(jax.tree.map(
        lambda lr, d, dl, ia: jnp.expm1(lr) - lr + ia * (c_q * _sum_k(d * d) + dl * dl),
        log_ratio, q.cov_factor, delta, inv_a_p))
    m_inv_h = m_inv_p @ h
    beta = m_inv_p @ b
    kl = 0.5 * (per_coordinate - jnp.sum(m_inv_p * t) - jnp.sum(h * m_inv_h) - b @ beta
                + 2.0 * (jnp.sum(jnp.log(jnp.diag(chol_p))) - jnp.sum(jnp.log(jnp.diag(chol_q)))))
    if not with_grad:
        return kl, None
    m_inv_q = _cho_solve(chol_q, eye_q)
    grad_mean = jax.tree.map(lambda dl, dp, ia: (math.sqrt(c_p) * _combine_leaf(beta, dp) - dl) * ia,
                             delta, p.cov_factor, inv_a_p)
    grad_log_std = jax.tree.map(
        lambda lr, dp, dq, ia_p, ia_q: jnp.exp(lr) * (1.0 - c_p * _quad(m_inv_p, dp) * ia_p) - 1.0
        + c_q * _quad(m_inv_q, dq) * ia_q,
        log_ratio, p.cov_factor, q.cov_factor, inv_a_p, inv_a_q)
    grad_cov = jax.tree.map(
        lambda dq, dp, ia_p, ia_q: c_q * (dq * ia_p - _combine_leaf(m_inv_q, dq) * ia_q)
        - math.sqrt(c_p * c_q) * _combine_leaf(m_inv_h, dp) * ia_p,
        q.cov_factor, p.cov_factor, inv_a_p, inv_a_q)
    return kl, LowRankGaussian(grad_mean, grad_log_std, grad_cov)


@jax.custom_jvp
def _low_rank_kl(q: LowRankGaussian, p: LowRankGaussian) -> jax.Array:
    # KL ≥ 0, but round-off can leave −1e−15 near q = p. Clamp the value only: the tangent below is that
    # of the closed form, so the Hessian at q = p is still the Fisher.
    return jnp.maximum(_low_rank_kl_parts(q, p, with_grad=False)[0], 0.0)


def _is_zero(tangent) -> bool:
    return isinstance(tangent, SymbolicZero)


def _low_rank_kl_jvp(primals, tangents):
    q, p = primals
    dq, dp = tangents
    kl, grad_q = _low_rank_kl_parts(q, p, with_grad=True)
    tangent = sum((jnp.sum(g * t) for g, t in zip(_leaves(grad_q), _leaves(dq)) if not _is_zero(t)),
                  jnp.zeros([], kl.dtype))
    if not all(_is_zero(t) for t in _leaves(dp)):
        dp = jax.tree.map(lambda t, x: jnp.zeros_like(x) if _is_zero(t) else t, dp, p)
        tangent = tangent + jax.jvp(lambda p_: _low_rank_kl_parts(q, p_, with_grad=False)[0], (p,), (dp,))[1]
    return jnp.maximum(kl, 0.0), tangent


_low_rank_kl.defjvp(_low_rank_kl_jvp, symbolic_zeros=True)


# ----------------------------------------------------------------------------------------------
# Fisher information of q with respect to its own parameters.


def fisher_diagonal(q, damping: float = 0.0):
    """The covariance-block Fisher diagonal (plus ``damping``) as a tree shaped like q.

    The ``mean`` field of the result is the diagonal of Σ⁻¹ (returned for inspection; products with the
    mean block always use the exact Σ⁻¹, never this diagonal).

    DiagGaussian: F = blockdiag(diag(σ⁻²), 2 I) in (μ, log σ), exactly diagonal.

    LowRankGaussian, with S = Σ⁻¹, c = 1/(K − 1), d_k the k-th deviation column, from
    F_ab = ½ tr(S ∂_aΣ S ∂_bΣ):

        F[log σᵢ, log σᵢ] = ½ σᵢ⁴ Sᵢᵢ²
        F[D_kᵢ, D_kᵢ]     = (c²/4) [ (S d_k)ᵢ² + Sᵢᵢ · d_kᵀ S d_k ]

    both O(P K²) by Woodbury. The full covariance block is singular (D ↦ D R, R orthogonal, leaves Σ
    unchanged), so this library uses its exact diagonal there; mean and covariance parameters are
    Fisher-orthogonal for a Gaussian.
    """
    _validate(q)
    _check_damping(damping)
    layout, q = _flatten(q)
    return _unflatten(layout, _fisher_diagonal(q, damping, None if isinstance(q, DiagGaussian) else _woodbury(q)))


def _fisher_diagonal(q, damping, wb: Optional[_Woodbury]):
    if isinstance(q, DiagGaussian):
        return DiagGaussian(mean=jax.tree.map(lambda s: jnp.exp(-2.0 * s), q.log_std),
                            log_std=jax.tree.map(lambda s: jnp.full_like(s, 2.0 + damping), q.log_std))
    k = _rank(q)
    c = 1.0 / (k - 1)
    sigma_inv_u = _sigma_inv_low_rank(wb)
    s_diag = _sigma_inv_diag(wb, sigma_inv_u)
    # ½ σ⁴ Sᵢᵢ² = ½ (σ² Sᵢᵢ)²
    f_log_std = jax.tree.map(lambda ls, sd: 0.5 * jnp.square(jnp.exp(2.0 * ls) * sd) + damping, q.log_std, s_diag)
    # D = √(2(K−1)) U, so S d_k = √(2(K−1)) (Σ⁻¹Uᵀ)_k and d_kᵀ S d_k = 2(K−1) (G M⁻¹)_kk: both avoid the
    # cancellation of the generic Woodbury product (d_k lies in the low-rank span, the worst case for it).
    scale = math.sqrt(2.0 * (k - 1))
    sd_cols = jax.tree.map(lambda x: scale * x, sigma_inv_u)
    d_s_d = 2.0 * (k - 1) * jnp.diagonal(_cho_solve(wb.chol, wb.gram))  # (G M⁻¹)_kk = (M⁻¹ G)_kk, G and M commute
    f_cov = jax.tree.map(
        lambda sdc, sd: (c * c / 4.0) * (jnp.square(sdc) + sd[None] * d_s_d.reshape((k,) + (1,) * sd.ndim)) + damping,
        sd_cols, s_diag)
    return LowRankGaussian(mean=s_diag, log_std=f_log_std, cov_factor=f_cov)


def _check_damping(damping):
    if _is_concrete(damping) and not np.all(np.asarray(damping) >= 0):
        raise ValueError(f"damping={damping} must be a number >= 0.")


def _fisher_and_woodbury(q, damping):
    _check_damping(damping)
    wb = None if isinstance(q, DiagGaussian) else _woodbury(q)
    return _fisher_diagonal(q, damping, wb), wb


def fisher_vp(q, v, damping: float = 0.0):
    """F_λ v for a tangent v shaped like q.

    F_λ = blockdiag(Σ⁻¹, diag(F_cov) + λ I): the mean block is exact (Σ⁻¹ by Woodbury for the
    low-rank family), the covariance block is diagonal (exact for DiagGaussian; the exact diagonal
    of the singular covariance block for LowRankGaussian, see :func:`fisher_diagonal`). ``damping``
    λ ≥ 0 is added to the covariance block only.
    """
    _validate_like(q, v, "v")
    layout, q, v = _flatten(q, v)
    fd, wb = _fisher_and_woodbury(q, damping)
    if isinstance(q, DiagGaussian):
        return _unflatten(layout, DiagGaussian(mean=jax.tree.map(jnp.multiply, fd.mean, v.mean),
                                               log_std=jax.tree.map(jnp.multiply, fd.log_std, v.log_std)))
    return _unflatten(layout, LowRankGaussian(mean=_sigma_inv_vp(wb, v.mean),
                                              log_std=jax.tree.map(jnp.multiply, fd.log_std, v.log_std),
                                              cov_factor=jax.tree.map(jnp.multiply, fd.cov_factor, v.cov_factor)))


def inverse_fisher_vp(q, v, damping: float = 0.0):
    """F_λ⁻¹ v, the exact inverse of :func:`fisher_vp` with the same ``damping``.

    Mean block: Σ v_μ (cheap and stable for the low-rank form: A v + Uᵀ(U v)). Covariance block:
    elementwise division by diag(F_cov) + λ. For the low-rank family a zero deviation column has zero
    Fisher there, so pass ``damping > 0`` when D may contain zero columns.
    """
    _validate_like(q, v, "v")
    layout, q, v = _flatten(q, v)
    fd, wb = _fisher_and_woodbury(q, damping)
    if isinstance(q, DiagGaussian):
        return _unflatten(layout, DiagGaussian(mean=jax.tree.map(lambda s, x: jnp.exp(2.0 * s) * x, q.log_std, v.mean),
                                               log_std=jax.tree.map(jnp.divide, v.log_std, fd.log_std)))
    return _unflatten(layout, LowRankGaussian(mean=_sigma_vp(wb, v.mean),
                                              log_std=jax.tree.map(jnp.divide, v.log_std, fd.log_std),
                                              cov_factor=jax.tree.map(jnp.divide, v.cov_factor, fd.cov_factor)))


# ----------------------------------------------------------------------------------------------
# The KL of a perturbed posterior to the unperturbed one, along a line θ + τ d.
#
# kl_divergence(q + τd, q) is exact in exact arithmetic, but its terms are O(1) or O(G) numbers
# (G = U A⁻¹ Uᵀ, ~10⁹ for SWAG columns next to a small σ) whose difference is the O(τ²) answer: in
# float32 KL(q ‖ q) itself comes out as ~1 nat for such a posterior. The KL ball's radius is found on
# this function, so it is written in differences that are computed directly (expm1 of the log σ step,
# K × K matrices of the step's own columns) and every term is small when τ is.


def _f_minus_log1p(y):
    """y − log(1 + y) for y > −1, by its series where cancellation would eat the digits."""
    series = y * y * (0.5 - y * (1.0 / 3.0 - y * (0.25 - y * (0.2 - y * (1.0 / 6.0 - y / 7.0)))))
    return jnp.where(jnp.abs(y) < 0.05, series, y - jnp.log1p(jnp.where(y > -1.0, y, 0.0)))


def _exp_argument(x):
    # exp(±88) overflows float32; the KL there is astronomically large anyway (the caller treats it so).
    return jnp.clip(x, -80.0, 80.0)


def kl_along_line(q, direction, mean_quad: Optional[jax.Array] = None):
    """The function τ ↦ KL(q_{θ+τd} ‖ q_θ) in closed form, accurate in float32 for small τ.

    With r = d_{log σ}, e^± = expm1(±2τ r) (per coordinate), A = diag(σ²/2), α = A⁻¹, U = D/√(2(K−1)),
    V = d_D/√(2(K−1)), M = I + U α Uᵀ and the step's K × K matrices B = U α Vᵀ, C = U α e⁻ Vᵀ:

        2 KL(τ) = τ² d_μᵀ Σ⁻¹ d_μ + Σᵢ (e⁺ᵢ − 2τ rᵢ) − tr(M⁻¹ U α(e⁺ + e⁻) Uᵀ) − 2τ tr(M⁻¹ C)
                  + τ² [tr(M⁻¹ U α Uᵀ V α Vᵀ) − tr(M⁻¹ B Bᵀ) − tr(M⁻¹ V α e⁻ Vᵀ)] + Σₖ (yₖ − log(1 + yₖ)),

    where yₖ are the eigenvalues of L⁻¹ (M_τ − M) L⁻ᵀ (M = L Lᵀ), M_τ − M = U α e⁻ Uᵀ + τ(C₁ + C₁ᵀ)
    + τ² V α(1 + e⁻) Vᵀ, C₁ = B + C. Every term is computed from the step's own quantities, so none is a
    difference of two O(1) numbers (the closed form of :func:`kl_divergence` subtracts O(‖G‖) terms).
    For a DiagGaussian it is the exact per-coordinate sum ½ Σ (τ² d_μ²/σ² + e⁺ − 2τ r).

    Args:
      q: a DiagGaussian or LowRankGaussian (θ).
      direction: d, a tree shaped like q.
      mean_quad: d_μᵀ Σ⁻¹ d_μ if the caller knows it exactly (for d = F⁻¹g it is g_μᵀ Σ g_μ, a forward
        product); otherwise it is computed here by Woodbury.

    Returns:
      A function of τ (a scalar, traceable) returning the KL, cheap to call several times: the
      τ-independent K × K matrices are computed once.

    >>> q = DiagGaussian.from_point({"w": jnp.zeros(3)}, 0.1)
    >>> d = DiagGaussian({"w": jnp.ones(3)}, {"w": jnp.zeros(3)})
    >>> round(float(kl_along_line(q, d)(0.1)), 6)  # ½ · 3 · (0.1/0.1)²
    1.5
    """
    _validate(q)
    _validate_like(q, direction, "direction")
    _, q, direction = _flatten(q, direction)
    if isinstance(q, DiagGaussian):
        if mean_quad is None:
            mean_quad = _tree_sum(jax.tree.map(lambda m, s: jnp.square(m * jnp.exp(-s)), direction.mean, q.log_std))

        def diag_kl(tau):
            per_coordinate = _tree_sum(jax.tree.map(
                lambda r: jnp.expm1(_exp_argument(2.0 * tau * r)) - 2.0 * tau * r, direction.log_std))
            return 0.5 * (tau * tau * mean_quad + per_coordinate)

        return diag_kl
    k = _rank(q)
    wb = _woodbury(q)
    if mean_quad is None:
        mean_quad = _tree_sum(jax.tree.map(jnp.multiply, direction.mean, _sigma_inv_vp(wb, direction.mean)))
    alpha = jax.tree.map(lambda a: 1.0 / a, wb.a)
    v = jax.tree.map(lambda d: d / math.sqrt(2.0 * (k - 1)), direction.cov_factor)
    uv = jax.tree.map(lambda u_, v_: jnp.concatenate([u_, v_], axis=0), wb.u, v)   # (2K, ...)
    both = _kk(uv, jax.tree.map(jnp.multiply, v, alpha))                             # [B; V α Vᵀ]
    b, v_alpha_v = both[:k], both[k:]
    eye = jnp.eye(k, dtype=wb.chol.dtype)
    m_inv = _cho_solve(wb.chol, eye)
    m_inv_g = _cho_solve(wb.chol, wb.gram)
    tau_free = jnp.sum(m_inv_g * v_alpha_v.T) - jnp.sum(m_inv * (b @ b.T))
    chol_inv = jax.scipy.linalg.solve_triangular(wb.chol, eye, lower=True)
    # Small steps (|2τ r| ≤ 0.1 everywhere, the rule on a large network) take the τ-dependent K × K
    # matrices from moments Zₙ = [U;V] α rⁿ [U;V]ᵀ, n = 1..3, computed once: e⁻ = Σₙ (−2τr)ⁿ/n! + O(x⁴) and
    # e⁺ + e⁻ = (2τr)² + O(x⁴) (relative error ≤ 1e-3), so each τ costs an elementwise pass instead of two
    # Gram products over θ. Larger steps recompute them exactly.
    r_max = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(r)) for r in _leaves(direction.log_std)])
    moments = [_kk(jax.tree.map(lambda x, al, r, n=n: x * (al * r ** n), uv, alpha, direction.log_std), uv)
               for n in (1, 2, 3)]

    def exact_matrices(tau):
        two_tau_r = jax.tree.map(lambda r: 2.0 * tau * r, direction.log_std)
        e_plus = jax.tree.map(lambda x: jnp.expm1(_exp_argument(x)), two_tau_r)
        e_minus = jax.tree.map(lambda x: jnp.expm1(_exp_argument(-x)), two_tau_r)
        cosh_part = _kk(jax.tree.map(lambda u_, al, ep, em: u_ * (al * (ep + em)), wb.u, alpha, e_plus, e_minus), wb.u)
        return cosh_part, _kk(jax.tree.map(lambda x, al, em: x * (al * em), uv, alpha, e_minus), uv)

    def series_matrices(tau):
        x = -2.0 * tau
        weighted = x * moments[0] + (x * x / 2.0) * moments[1] + (x ** 3 / 6.0) * moments[2]
        return (4.0 * tau * tau) * moments[1][:k, :k], weighted

    def low_rank_kl(tau):
        two_tau_r = jax.tree.map(lambda r: 2.0 * tau * r, direction.log_std)
        diag_part = _tree_sum(jax.tree.map(lambda x: jnp.expm1(_exp_argument(x)) - x, two_tau_r))
        cosh_part, weighted = jax.lax.cond(2.0 * jnp.abs(tau) * r_max <= 0.1, series_matrices, exact_matrices, tau)
        g_minus, c, v_minus_v = weighted[:k, :k], weighted[:k, k:], weighted[k:, k:]   # [U;V] α e⁻ [U;V]ᵀ
        c1 = b + c
        delta_m = g_minus + tau * (c1 + c1.T) + tau * tau * (v_alpha_v + v_minus_v)
        y = chol_inv @ delta_m @ chol_inv.T
        eig = jnp.linalg.eigvalsh(0.5 * (y + y.T))
        two_kl = (tau * tau * mean_quad + diag_part - jnp.sum(m_inv * cosh_part) - 2.0 * tau * jnp.sum(m_inv * c.T)
                  + tau * tau * (tau_free - jnp.sum(m_inv * v_minus_v)) + jnp.sum(_f_minus_log1p(eig)))
        return 0.5 * two_kl

    return low_rank_kl


def perturbation_kl(q, delta) -> jax.Array:
    """KL(q_{θ+Δ} ‖ q_θ), the size of a perturbation Δ of q's parameters in nats.

    Equal to ``kl_divergence(q + Δ, q)`` in exact arithmetic, but accurate in float32 for small Δ
    (see :func:`kl_along_line`, of which this is the value at τ = 1).

    >>> q = DiagGaussian.from_point({"w": jnp.zeros(2)}, 1.0)
    >>> float(perturbation_kl(q, DiagGaussian({"w": jnp.ones(2)}, {"w": jnp.zeros(2)})))
    1.0
    """
    return kl_along_line(q, delta)(jnp.asarray(1.0, _dtype(q)))
