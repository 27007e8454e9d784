"""Memory-bounded Bayesian model averaging: the BMA predictive over S weight samples, on device.

The BMA predictive (arXiv 2406.15664 §3; docs page :doc:`/transfer`) averages *probabilities* over S samples
w_s ~ q and is computed in log space,

    log p̄(y|x) = logsumexp_s log softmax(f(x; w_s))_y − log S,

so a class to which some samples give probability 0 never yields log 0.

Memory does not grow with S: the S samples are processed in chunks of ``chunk_size`` with
``jax.lax.scan``; within a chunk the forward passes are vectorised with ``jax.vmap``; a running
log-sum-exp accumulator of shape (N, C) is the only state carried between chunks. Weights are drawn
on device inside the same compiled program (one ``jax.jit`` per input shape), so there is no host
round-trip per sample. A remainder of S mod ``chunk_size`` samples is evaluated by one extra
vectorised call, so no sample is wasted or duplicated.

Sample s always uses the key ``jax.random.split(key, S)[s]``; evaluating a dataset batch by batch with
the same ``key`` therefore uses the same S weight samples for every batch, exactly as if the batches
were concatenated.

Functions and arrays: ``apply_fn``, ``sample_weights`` and ``refresh_fn`` are passed to the compiled
program as pytrees. A plain Python function works, but arrays it closes over are baked into the
program as constants and a new function object recompiles. Wrap them as
``jax.tree_util.Partial(fn, *arrays)`` (e.g. ``Partial(fpbma.sample, q)``) so the arrays travel as
arguments and repeated calls reuse one compilation.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from fpbma import metrics
from fpbma.types import SampleSet, num_samples as _num_samples_of

PyTree = Any

__all__ = ["predict", "predict_samples", "evaluate", "make_batchnorm_refresh", "default_chunk_size"]

# On accelerators, ten forward passes vectorised at once is the memory/throughput compromise for S = 30
# (three chunks): memory is that of 10 forward passes over the batch, whatever S is. On XLA:CPU, vmapping
# a convolution over its weights becomes a grouped convolution that is slower than a loop (measured for a
# small CNN, 30 samples × 256 images on 2 cores: chunk 1 → 1.02× the time of 30 plain forward passes,
# chunk 10 → 1.9×), so the CPU default is one sample per scan step.
DEFAULT_CHUNK_SIZE = 10
DEFAULT_CHUNK_SIZE_CPU = 1


def default_chunk_size(num_samples: int) -> int:
    """``min(S, 1)`` on CPU, ``min(S, DEFAULT_CHUNK_SIZE)`` on GPU/TPU (see the comment above)."""
    per_backend = DEFAULT_CHUNK_SIZE_CPU if jax.default_backend() == "cpu" else DEFAULT_CHUNK_SIZE
    return min(int(num_samples), per_backend)


# ----------------------------------------------------------------------------------------------
# The compiled core.


def _as_partial(fn, name: str):
    if fn is None or isinstance(fn, Partial):
        return fn
    if not callable(fn):
        raise TypeError(f"{name} must be callable (or a jax.tree_util.Partial), got {type(fn).__name__}.")
    return Partial(fn)


def _map_chunk(fn: Callable, chunk: PyTree):
    """``fn`` over the leading axis of ``chunk``, stacked. A one-item chunk is not vmapped: on XLA:CPU a
    convolution vmapped over its weights is a grouped convolution, slower even for one item
    (30-sample BMA / 30 forwards: 1.108 vmapped, 1.037 not)."""
    if jax.tree.leaves(chunk)[0].shape[0] == 1:
        return jax.tree.map(lambda a: a[None], fn(jax.tree.map(lambda a: a[0], chunk)))
    return jax.vmap(fn)(chunk)


def _draw(sample_weights, refresh_fn, k):
    """One weight sample for key ``k`` (refreshed by ``refresh_fn(w, fold_in(k, 1))`` if given)."""
    w = sample_weights(k)
    return w if refresh_fn is None else refresh_fn(w, jax.random.fold_in(k, 1))


def _chunked_log_sum(per_item: Callable, items: PyTree, num_items: int, chunk_size: int, out_shape):
    """logsumexp over s of per_item(items[s]) → out_shape, with at most chunk_size items live at once."""
    n_full, rem = divmod(num_items, chunk_size)
    acc = jnp.full(out_shape.shape, -jnp.inf, jnp.float32)

    def chunk_lse(chunk):
        return jax.nn.logsumexp(_map_chunk(per_item, chunk), axis=0)

    if n_full:
        full = jax.tree.map(lambda a: a[:n_full * chunk_size].reshape((n_full, chunk_size) + a.shape[1:]), items)

        def body(carry, chunk):
            return jnp.logaddexp(carry, chunk_lse(chunk)), None

        acc, _ = jax.lax.scan(body, acc, full)
    if rem:
        acc = jnp.logaddexp(acc, chunk_lse(jax.tree.map(lambda a: a[n_full * chunk_size:], items)))
    return acc


def _log_softmax_f32(logits):
    return jax.nn.log_softmax(jnp.asarray(logits).astype(jnp.float32), axis=-1)


@functools.partial(jax.jit, static_argnames=("num_samples", "chunk_size"))
def _sampled_log_predictive(apply_fn, sample_weights, refresh_fn, key, x, *, num_samples, chunk_size):
    keys = jax.random.split(key, num_samples)

    def one(k):
        return _log_softmax_f32(apply_fn(_draw(sample_weights, refresh_fn, k), x))

    out = jax.eval_shape(one, keys[0])
    return _chunked_log_sum(one, keys, num_samples, chunk_size, out) - math.log(num_samples)


@jax.jit
def _draw_chunk(sample_weights, refresh_fn, keys):
    """One weight sample per key, stacked on a leading axis."""
    return _map_chunk(lambda k: _draw(sample_weights, refresh_fn, k), keys)


@jax.jit
def _accumulate_chunk(apply_fn, acc, weights, x):
    """logaddexp(acc, logsumexp over the chunk's samples of log softmax f(x; w))."""
    lse = jax.nn.logsumexp(_map_chunk(lambda w: _log_softmax_f32(apply_fn(w, x)), weights), axis=0)
    return lse if acc is None else jnp.logaddexp(acc, lse)


def _split_log_predictive(apply_fn, sample_weights, refresh_fn, key, x, *, num_samples, chunk_size):
    """Same value as :func:`_sampled_log_predictive`, as two compiled programs per chunk.

    The draw and the forward passes run as separate programs (still on device, no host transfer), so
    the forward receives its weights as arguments: on XLA:CPU a convolution whose filter is produced
    in the same program ran 20 % slower (benchmarks/RESULTS.md §2). Only one chunk of weights is
    alive at a time, so memory does not grow with S.
    """
    keys = jax.random.split(key, num_samples)
    acc = None
    for start in range(0, num_samples, chunk_size):
        weights = _draw_chunk(sample_weights, refresh_fn, keys[start:start + chunk_size])
        acc = _accumulate_chunk(apply_fn, acc, weights, x)
    return acc - math.log(num_samples)


@functools.partial(jax.jit, static_argnames=("num_samples", "chunk_size"))
def _stacked_log_predictive(apply_fn, samples, refresh_fn, key, x, *, num_samples, chunk_size):
    keys = jax.random.split(key, num_samples)

    def one(item):
        w, k = item
        if refresh_fn is not None:
            w = refresh_fn(w, k)
        return _log_softmax_f32(apply_fn(w, x))

    items = (samples, keys)
    out = jax.eval_shape(one, jax.tree.map(lambda a: a[0], items))
    return _chunked_log_sum(one, items, num_samples, chunk_size, out) - math.log(num_samples)


# ----------------------------------------------------------------------------------------------
# Inputs: one array or an iterator of batches.


def _check_counts(num_samples, chunk_size):
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} must be a positive integer (the paper uses 30).")
    if chunk_size is None:
        return int(num_samples), default_chunk_size(num_samples)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer (samples evaluated at once) "
                         "or None for the default.")
    return int(num_samples), min(int(chunk_size), int(num_samples))


def _flatten_batch(batch: Mapping, index: int):
    if "image" not in batch:
        raise ValueError(f"batch #{index} has no 'image' entry (keys: {sorted(batch)}); pass batches as produced "
                         "by fpbma.data.pipeline.batches or a single array of inputs.")
    image = batch["image"]
    mask = batch.get("mask")
    label = batch.get("label")
    if mask is not None and np.ndim(mask) == 2:
        # layout="stack": a leading device axis (D, B/D, ...) — merge it into the batch axis.
        def merge(a):
            return None if a is None else a.reshape((-1,) + tuple(a.shape[2:]))

        image, mask, label = merge(image), merge(mask), merge(label)
    if mask is not None and np.shape(mask) != np.shape(image)[:1]:
        raise ValueError(f"batch #{index}: mask shape {np.shape(mask)} does not match the batch size "
                         f"{np.shape(image)[:1]}.")
    return image, mask, label


def _run(core, inputs, mask, return_labels):
    """Applies ``core(x) -> (B, C)`` to one array or to every batch; keeps the unmasked rows."""
    if isinstance(inputs, (jax.Array, np.ndarray)):
        if return_labels:
            raise ValueError("return_labels=True needs an iterator of batches with a 'label' entry; with an "
                             "array input you already hold the labels.")
        if mask is not None and np.shape(mask) != np.shape(inputs)[:1]:
            raise ValueError(f"mask shape {np.shape(mask)} does not match the number of inputs "
                             f"{np.shape(inputs)[:1]}.")
        out = core(inputs)
        if mask is not None:
            out = out[np.asarray(mask, bool)]
        return out
    if mask is not None:
        raise ValueError("mask= is for an array input; an iterator of batches carries its own 'mask' entries.")
    if isinstance(inputs, Mapping):
        inputs = [inputs]
    try:
        iterator = iter(inputs)
    except TypeError:
        raise TypeError(f"inputs must be an array (N, ...) or an iterable of batch dicts, got "
                        f"{type(inputs).__name__}.") from None
    log_probs, labels = [], []
    for i, batch in enumerate(iterator):
        if not isinstance(batch, Mapping):
            raise TypeError(f"batch #{i} is a {type(batch).__name__}; expected a dict with 'image' (and 'mask', "
                            "'label') as produced by fpbma.data.pipeline.batches.")
        image, bmask, label = _flatten_batch(batch, i)
        keep = None if bmask is None else np.asarray(bmask, bool)
        # Device arrays are gathered after the loop so the host prepares the next batch while this one runs.
        log_probs.append((core(image), keep))
        if return_labels:
            if label is None:
                raise ValueError(f"batch #{i} has no 'label' entry but return_labels=True.")
            label = np.asarray(label)
            labels.append(label if keep is None else label[keep])
    if not log_probs:
        raise ValueError("inputs yielded no batches; nothing to evaluate.")
    lp = jnp.asarray(np.concatenate([np.asarray(out) if keep is None else np.asarray(out)[keep]
                                     for out, keep in log_probs]))
    return (lp, jnp.asarray(np.concatenate(labels))) if return_labels else lp


def predict(apply_fn: Callable, sample_weights: Callable, inputs, *, key: jax.Array, num_samples: int = 30,
            chunk_size: Optional[int] = None, mask=None, refresh_fn: Optional[Callable] = None,
            return_labels: bool = False):
    """BMA log-predictive log p̄(y|x) (N, C) over ``num_samples`` weights drawn on device.

        log p̄(y|x) = logsumexp_{s=1..S} log softmax(f(x; w_s))_y − log S,   w_s = sample_weights(k_s),
        k_s = jax.random.split(key, S)[s]   (then w_s ← refresh_fn(w_s, fold_in(k_s, 1)) if given).

    Memory is that of ``chunk_size`` forward passes plus an (N, C) accumulator, whatever S.

    >>> import fpbma, jax, jax.numpy as jnp
    >>> from jax.tree_util import Partial
    >>> q = fpbma.DiagGaussian.from_point({"w": 5.0 * jnp.eye(3)}, std=0.1)   # a linear classifier
    >>> apply_fn = Partial(lambda w, x: x @ w["w"])
    >>> x, y = jnp.eye(3), jnp.arange(3)
    >>> lp = predict(apply_fn, Partial(fpbma.sample, q), x, key=jax.random.PRNGKey(0), num_samples=10)
    >>> lp.shape, bool(jnp.allclose(jnp.exp(lp).sum(-1), 1.0, atol=1e-5))     # log-probabilities
    ((3, 3), True)
    >>> evaluate(lp, y)["acc"]
    1.0

    Args:
      apply_fn: ``apply_fn(weights, x_batch) -> logits (B, C)``.
      sample_weights: ``sample_weights(key) -> weights``, ONE weight pytree drawn on device, e.g.
        ``Partial(fpbma.sample, q)`` or a composition that also draws frozen weights from the prior.
      inputs: an array (N, ...) evaluated in one pass (for large N pass batches instead), or an iterable of batch dicts ``{"image", "mask", "label"}`` as produced
        by :func:`fpbma.data.pipeline.batches` (any layout; padded examples, ``mask == False``, are dropped).
        Every batch uses the same S samples, so the result equals that on the concatenated data.
      key: PRNG key; the same key gives the same samples.
      num_samples: S (30 in the paper).
      chunk_size: samples vectorised at once (default :func:`default_chunk_size`: 1 on CPU, 10 on
        GPU/TPU).
      mask: optional boolean (N,) for an array input; rows where it is False are dropped.
      refresh_fn: optional ``refresh_fn(weights, key) -> weights`` applied to each sample before the
        forward pass, e.g. :func:`make_batchnorm_refresh` to recompute BatchNorm statistics per sample.
      return_labels: with an iterator of batches, also return the labels of the kept examples.

    Returns:
      log p̄ as float32 (N_kept, C); with ``return_labels`` the tuple (log p̄, labels).

    References:
      FP-BMA / SA-BMA, arXiv 2406.15664 (BMA with S = 30 samples).
    """
    num_samples, chunk_size = _check_counts(num_samples, chunk_size)
    apply_fn = _as_partial(apply_fn, "apply_fn")
    sample_weights = _as_partial(sample_weights, "sample_weights")
    refresh_fn = _as_partial(refresh_fn, "refresh_fn")

    def core(x):
        # Under a trace (jit, pmap) one scanned program; called eagerly, a loop of two programs per chunk.
        traced = any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves((x, key, sample_weights, apply_fn)))
        compute = _sampled_log_predictive if traced else _split_log_predictive
        return compute(apply_fn, sample_weights, refresh_fn, key, x, num_samples=num_samples, chunk_size=chunk_size)

    return _run(core, inputs, mask, return_labels)


def predict_samples(apply_fn: Callable, samples, inputs, *, chunk_size: Optional[int] = None, mask=None,
                    refresh_fn: Optional[Callable] = None, key: Optional[jax.Array] = None,
                    return_labels: bool = False):
    """BMA log-predictive (N, C) over weight samples already drawn (SGLD, SWAG, E-MCMC, a MAP point).

        log p̄(y|x) = logsumexp_s log softmax(f(x; w_s))_y − log S   over the S stored samples.

    Args:
      apply_fn: ``apply_fn(weights, x_batch) -> logits``.
      samples: a :class:`fpbma.types.SampleSet` or a pytree whose leaves are stacked on a
        leading sample axis (e.g. the output of :func:`fpbma.types.draw`).
      inputs, chunk_size, mask, return_labels: as in :func:`predict`.
      refresh_fn: optional ``refresh_fn(weights, key)`` per sample; sample s gets
        ``jax.random.split(key, S)[s]``.
      key: PRNG key for ``refresh_fn`` (default ``PRNGKey(0)``; unused without ``refresh_fn``).

    Returns:
      log p̄ as float32 (N_kept, C), or (log p̄, labels) with ``return_labels``.

    References:
      FP-BMA / SA-BMA, arXiv 2406.15664.
    """
    if not isinstance(samples, SampleSet):
        if hasattr(samples, "sample") or type(samples).__name__ in ("DiagGaussian", "LowRankGaussian"):
            raise TypeError(f"predict_samples takes stored samples, got a {type(samples).__name__}; use "
                            "predict(apply_fn, sample_weights, ...) to draw from a posterior on device, or "
                            "fpbma.types.draw(...) first.")
        samples = SampleSet(samples)
    s = _num_samples_of(samples)
    s, chunk_size = _check_counts(s, chunk_size)
    apply_fn = _as_partial(apply_fn, "apply_fn")
    refresh_fn = _as_partial(refresh_fn, "refresh_fn")
    key = jax.random.PRNGKey(0) if key is None else key

    def core(x):
        return _stacked_log_predictive(apply_fn, samples.samples, refresh_fn, key, x,
                                       num_samples=s, chunk_size=chunk_size)

    return _run(core, inputs, mask, return_labels)


def evaluate(log_probs, labels, mask=None, num_bins: int = 15) -> dict:
    """Accuracy, NLL, ECE (``num_bins`` equal-width bins, top label) and Brier of a predictive (N, C).

    Args:
      log_probs: log-probabilities (N, C), e.g. from :func:`predict`.
      labels: integer labels (N,).
      mask: optional boolean (N,); examples where it is False are ignored.
      num_bins: ECE bins (15 in the paper).

    Returns:
      ``{"acc", "nll", "ece", "brier"}`` as Python floats.
    """
    log_probs = jnp.asarray(log_probs)
    labels = jnp.asarray(labels)
    if log_probs.ndim != 2 or labels.shape != log_probs.shape[:1]:
        raise ValueError(f"log_probs must be (N, C) and labels (N,); got {log_probs.shape} and {labels.shape}.")
    if mask is not None and np.shape(mask) != labels.shape:
        raise ValueError(f"mask shape {np.shape(mask)} does not match labels {labels.shape}.")
    mask = None if mask is None else jnp.asarray(mask, bool)
    return {"acc": float(metrics.accuracy(log_probs, labels, mask)),
            "nll": float(metrics.nll(log_probs, labels, mask)),
            "ece": float(metrics.ece(log_probs, labels, num_bins, mask)),
            "brier": float(metrics.brier(log_probs, labels, mask))}


# ----------------------------------------------------------------------------------------------
# BatchNorm statistics per sample.


def _combine_moments(a, b):
    """Chan et al.'s parallel update of (count, mean, M2 = Σ (x − mean)²)."""
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    n = n_a + n_b
    delta = mean_b - mean_a
    frac = n_b / jnp.maximum(n, 1.0)
    return n, mean_a + delta * frac, m2_a + m2_b + delta ** 2 * n_a * frac


def _batchnorm_moments(model, train_kwargs, variables, images):
    """Per-BatchNorm-layer (count, mean, M2) of the layer's input in one train-mode pass."""
    import flax.linen as nn

    captured = {}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if isinstance(mod, nn.BatchNorm) and context.method_name == "__call__":
            if kwargs.get("mask") is not None:
                raise NotImplementedError("make_batchnorm_refresh does not support BatchNorm(mask=...).")
            x = jnp.asarray(args[0], jnp.float32)
            axis = mod.axis if isinstance(mod.axis, (tuple, list)) else (mod.axis,)
            feature = {a % x.ndim for a in axis}
            red = tuple(i for i in range(x.ndim) if i not in feature)
            count = float(np.prod([x.shape[i] for i in red]))
            mean = jnp.mean(x, axis=red)
            m2 = jnp.sum((x - jnp.expand_dims(mean, red)) ** 2, axis=red)
            path = tuple(mod.path)
            moments = (jnp.float32(count), mean, m2)
            captured[path] = _combine_moments(captured[path], moments) if path in captured else moments
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        model.apply(variables, images, mutable=["batch_stats"], **train_kwargs)
    return captured


def _refresh_batchnorm(model, batch_size, train_kwargs, images, weights, key):
    del key  # the passes are deterministic: every image once, in order, no augmentation
    import flax.traverse_util as tu

    if not isinstance(weights, Mapping) or "params" not in weights:
        raise ValueError("make_batchnorm_refresh expects flax variables {'params': ..., ['batch_stats': ...]} "
                         f"from sample_weights, got {type(weights).__name__}"
                         f"{' with keys ' + str(sorted(weights)) if isinstance(weights, Mapping) else ''}.")
    variables = dict(weights)
    n = images.shape[0]
    bs = min(batch_size, n)
    n_full, rem = divmod(n, bs)

    def moments_of(batch):
        return _batchnorm_moments(model, train_kwargs, variables, batch)

    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(moments_of, images[:bs]))
    if not zero:
        raise ValueError(f"make_batchnorm_refresh: {type(model).__name__} has no flax.linen.BatchNorm layer "
                         "called in this pass; no statistics to refresh.")
    full = images[:n_full * bs].reshape((n_full, bs) + images.shape[1:])

    def body(acc, batch):
        m = moments_of(batch)
        return {p: _combine_moments(acc[p], m[p]) for p in acc}, None

    acc, _ = jax.lax.scan(body, zero, full)
    if rem:
        m = moments_of(images[n_full * bs:])
        acc = {p: _combine_moments(acc[p], m[p]) for p in acc}
    old = tu.flatten_dict(variables.get("batch_stats", {}))
    flat = {}
    for path, (count, mean, m2) in acc.items():
        var = m2 / jnp.maximum(count - 1.0, 1.0)
        for name, value in (("mean", mean), ("var", var)):
            ref = old.get(path + (name,))
            flat[path + (name,)] = value if ref is None else value.astype(ref.dtype).reshape(ref.shape)
    missing = set(old) - set(flat)
    if missing:
        raise ValueError(f"batch_stats entries {sorted(missing)} were not produced by any BatchNorm call; is the "
                         "model applied with the same train_kwargs as in training?")
    variables["batch_stats"] = tu.unflatten_dict(flat)
    return type(weights)(variables) if not isinstance(weights, dict) else variables


def make_batchnorm_refresh(model, train_images, batch_size: int, *, train_kwargs: Optional[dict] = None):
    """``refresh_fn(weights, key)`` that recomputes a flax linen model's BatchNorm statistics exactly.

    Each sampled weight has its own activation statistics, so the running averages stored with the
    pre-trained or SWAG mean weights do not fit it (SWAG's "bn_update", Maddox et al. 2019). This helper
    runs train-mode passes (``model.apply(w, batch, mutable=["batch_stats"], **train_kwargs)``) over
    ``train_images`` in order, in batches of ``batch_size`` (the last one smaller), and for every
    ``flax.linen.BatchNorm`` layer accumulates the exact population moments of the layer's input over all
    images (Chan et al.'s pairwise update of count, mean and M2; not a momentum average):

        mean = (1/M) Σ_m x_m,      var = (1/(M − 1)) Σ_m (x_m − mean)²   (unbiased),

    with M = images × the layer's reduced (spatial) positions. Inside the passes each layer normalises with
    its batch statistics, as in training, so the inputs of deeper layers are those of train mode. The
    result replaces ``weights["batch_stats"]``.

    Args:
      model: a flax linen module with ``batch_stats`` (BatchNorm with ``use_running_average`` controlled
        by ``train_kwargs``).
      train_images: preprocessed training images (N, ...), e.g. the few-shot training split.
      batch_size: images per train-mode pass (the batch statistics used for normalisation inside a pass).
      train_kwargs: keyword arguments that put the model in training mode (default ``{"train": True}``).

    Returns:
      A ``jax.tree_util.Partial`` ``refresh_fn(weights, key) -> weights`` (images are passed as an
      argument of the compiled program, not baked in) for :func:`predict` and :func:`predict_samples`.

    References:
      Maddox et al., "A Simple Baseline for Bayesian Uncertainty in Deep Learning" (SWAG), NeurIPS 2019;
      FP-BMA, arXiv 2406.15664 (BMA with the SWAG prior over a BatchNorm network).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
    images = jnp.asarray(train_images)
    if images.ndim < 2 or images.shape[0] < 2:
        raise ValueError(f"train_images must be (N, ...) with N >= 2 for an unbiased variance; got shape "
                         f"{images.shape}.")
    if not callable(getattr(model, "apply", None)):
        raise TypeError(f"model must be a flax linen Module, got {type(model).__name__}.")
    train_kwargs = {"train": True} if train_kwargs is None else dict(train_kwargs)
    return Partial(functools.partial(_refresh_batchnorm, model, int(batch_size), train_kwargs), images)
