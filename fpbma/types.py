"""The contracts every method, BMA, metrics and flatness tool share: loss signatures, train state, results.

A method (:mod:`fpbma.methods`) trains on a :class:`Problem` — the mean mini-batch loss ℓ(w, batch, key),
the starting point and, where the method needs them, an initial posterior, a KL term and a log-prior —
through a :class:`Trainer`: ``init() -> TrainState``, a pure ``step(state, batch, key) -> TrainState``
and ``finalize(state) -> result``. The result is one of

* a posterior family of :mod:`fpbma.posterior` (``DiagGaussian``, ``LowRankGaussian``), sampled with
  :func:`fpbma.sample`;
* any object with a ``sample(key, n)`` method returning ``n`` weight pytrees stacked on a leading axis
  (e.g. :class:`fpbma.baselines.LastLayerPosterior`, :class:`SubsetLaplace`);
* a :class:`SampleSet`: weight pytrees already drawn (MCMC chains, SWAG samples with refreshed
  BatchNorm statistics, a single MAP point) stacked on a leading axis.

:func:`draw` turns any of them into ``n`` stacked weight pytrees and :func:`sample_one` into one, so
BMA code needs one code path.

>>> import jax, jax.numpy as jnp
>>> draw(point_mass({"w": jnp.ones(2)}), jax.random.PRNGKey(0))["w"].shape
(1, 2)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from fpbma import posterior as post

PyTree = Any

# One compiled program per (family, shapes, n) instead of hundreds of eager per-leaf dispatches; the
# structural checks of fpbma.sample still run while tracing.
_sample_jit = jax.jit(post.sample, static_argnums=2)

__all__ = ["HEAD", "LossFn", "Problem", "TrainState", "Trainer", "SampleSet", "SubsetLaplace", "draw",
           "sample_one", "num_samples", "point_mass", "stack_samples"]

HEAD = "head"

LossFn = Callable[[PyTree, Any, jax.Array], jax.Array]
"""``loss(weights, batch, key) -> scalar``: the mean mini-batch loss ℓ at ``weights``; ``key`` drives any
other randomness of the objective (the transfer scheme draws its frozen weights from it)."""


class Problem(NamedTuple):
    """What a method trains on: the objective's pieces, built once per run.

    Methods combine them into their own objective: point estimates minimise ℓ, variational methods the
    per-example negative ELBO E_q[ℓ(w)] + β KL(q ‖ p)/N, Langevin samplers the potential
    U(w) = N ℓ(w) − log p(w).

    Attributes:
      loss: ℓ, a :data:`LossFn`.
      init_params: w₀, the starting weights of point-estimate and sampling methods.
      num_data: N ≥ 1, the training-set size.
      init_posterior: q₀ for methods that train a posterior (a :class:`fpbma.LowRankGaussian`), or None.
      kl: ``q -> KL(q ‖ p)`` over the part of q that has an informative prior, or None (no KL term).
      log_prior: ``w -> log p(w)``, or None (a flat prior).
      features: ``w -> φ``, the inputs of the classifier head for the whole training set at weights w
        (post-hoc head methods such as last-layer Laplace), or None.
      labels: the training labels that go with ``features``, or None.
      head: the top-level key of ``init_params`` holding the new classifier head (it has no
        informative prior), or None.
      head_variance: α > 0, the initial variance of the head for methods that train a posterior.
      model_state: the model's non-trained variables that training updates (e.g. ``{"batch_stats": ...}``
        of BatchNorm in train mode), or None. When set, the loss is
        ``loss(w, batch, key, model_state) -> (ℓ, new_model_state)`` and the state carries it; point
        estimates (SGD, SAM, SWAG, ...) support it, the other methods raise.
    """

    loss: LossFn
    init_params: PyTree
    num_data: int
    init_posterior: Any = None
    kl: Optional[Callable[[Any], jax.Array]] = None
    log_prior: Optional[Callable[[PyTree], jax.Array]] = None
    features: Optional[Callable[[PyTree], jax.Array]] = None
    labels: Optional[jax.Array] = None
    head: Optional[str] = HEAD
    head_variance: float = 1e-4
    model_state: Any = None


class TrainState(NamedTuple):
    """Everything a train step changes; a pytree of arrays (checkpointable).

    Attributes:
      step: int32 steps taken.
      params: the trained object (a posterior for variational methods, the weights otherwise).
      opt_state: the optimizer state.
      samples: collection buffer (leaves ``(M, ...)``) for samplers, ``()`` otherwise.
      num_collected: int32 samples written into ``samples``.
      model_state: non-trained model variables carried forward (e.g. ``{"batch_stats": ...}``), ``{}``
        if none.
      metrics: float32 scalars of the last step (a method's trainer: ``loss``, ``kl`` for variational
        methods) and ``num_skipped``, the steps skipped for a non-finite result; ``{}`` if none.

    Every training loop of the library carries this one state: the methods' trainers
    (:mod:`fpbma.methods`), :func:`fpbma.parallel.make_train_step` and the experiment stages.

    >>> import optax
    >>> state = TrainState.create({"w": jnp.zeros(3)}, optax.sgd(0.1))
    >>> int(state.step), state.model_state
    (0, {})
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    samples: PyTree = ()
    num_collected: jax.Array = 0
    model_state: PyTree = {}
    metrics: PyTree = {}

    @classmethod
    def create(cls, params, tx, model_state=None, samples=()) -> "TrainState":
        """Step 0: ``params``, ``tx.init(params)``, ``model_state`` (``{}`` when None) and ``samples``."""
        return cls(jnp.zeros([], jnp.int32), params, tx.init(params), samples, jnp.zeros([], jnp.int32),
                   {} if model_state is None else model_state)


class Trainer(NamedTuple):
    """``init() -> TrainState``; pure ``step(state, batch, key) -> state``; ``finalize(state) -> result``."""

    init: Callable[[], TrainState]
    step: Callable[[TrainState, Any, jax.Array], TrainState]
    finalize: Callable[[TrainState], Any]


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


class SubsetLaplace(NamedTuple):
    """Last-layer Laplace within a weight tree: ``point`` everywhere but the head, the head ~ ``head``.

    Attributes:
      point: the trained weights (nested dicts with a top-level :data:`HEAD` entry).
      head: the head posterior, an object with ``sample(key, n=None)`` (a
        :class:`fpbma.baselines.FullGaussian`).
    """

    point: PyTree
    head: Any

    def sample(self, key: jax.Array, n: Optional[int] = None) -> PyTree:
        """One weight tree (``n`` None) or ``n`` stacked ones: the point with the head drawn from ``head``."""
        head = self.head.sample(key) if n is None else self.head.sample(key, int(n))
        rest = {k: v for k, v in self.point.items() if k != HEAD}
        if n is not None:
            rest = jax.tree.map(lambda x: jnp.broadcast_to(x, (int(n),) + jnp.shape(x)), rest)
        return {**rest, HEAD: head}


def sample_one(result, key: jax.Array) -> PyTree:
    """One weight pytree from a method's result.

    * DiagGaussian / LowRankGaussian: ``fpbma.sample(q, key)``;
    * :class:`SampleSet`: a uniformly random stored sample;
    * an object with ``sample(key, n=None)`` (:class:`SubsetLaplace`): that method with ``n=None``.
    """
    if isinstance(result, (post.DiagGaussian, post.LowRankGaussian)):
        return post.sample(result, key)
    if isinstance(result, SampleSet):
        leaves = jax.tree_util.tree_leaves(result.samples)
        i = jax.random.randint(key, (), 0, leaves[0].shape[0])
        return jax.tree.map(lambda x: x[i], result.samples)
    if callable(getattr(result, "sample", None)):
        return result.sample(key)
    raise TypeError(f"cannot draw from a {type(result).__name__}: pass a DiagGaussian, LowRankGaussian, "
                    "SampleSet, or an object with a sample(key, n=None) method.")


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
