"""Data-parallel training and BMA evaluation: jit + device mesh, or pmap.

Two equivalent ways to run one training step on D devices (README "Data parallelism"):

* **jit-sharding** (:func:`make_data_parallel_step`): a 1-D mesh with axis ``"data"``
  (:func:`data_mesh`); the batch is split over it (:func:`shard_batch`), the train state is
  replicated (:func:`replicate`). The step is an ordinary single-device function whose loss is a
  mean over the *global* batch; XLA's SPMD partitioner inserts the all-reduces, so the gradient is

      g = (1/B) Σ_{i=1..B} ∇ℓ_i = Σ_d (B_d/B) g_d,

  the same number as on one device up to float32 reduction order. BatchNorm batch statistics are
  means over the global batch too, i.e. synchronised across devices with no extra code.
* **pmap** (:func:`make_pmap_step`): the same step with a named axis; the step pmeans both
  gradients over it (the clean one before the perturbation Δ* or SAM's ε* is formed from it, the
  perturbed one after), so every method — SGD, SAM, FP-BMA, ... — gives the one-device numbers, and
  BatchNorm averages its statistics when built with ``axis_name``
  (:class:`fpbma.models.resnet.BatchNorm` ``axis_name=``).

The step itself comes from :func:`make_train_step`: one jitted program draws the reparameterisation
noise, runs the clean forward/backward pass, forms the Fisher-weighted perturbation
Δ* = ρ F_θ⁻¹g/√(gᵀF_θ⁻¹g), runs the perturbed pass with the *same* noise and applies the optimizer —
no host round-trip and no Python-side tree work per step. The train state is donated, so θ, the
optimizer state and the BatchNorm statistics are updated in place. ``compute_dtype=jnp.bfloat16``
runs both passes in bfloat16 while θ, the gradients with respect to θ and the optimizer state stay
float32.

Evaluation (:func:`evaluate_sharded`) pads the last batch to a multiple of the device count with
copies of a real example, masks the copies and drops them after the BMA, so no example is lost or
counted twice.

Multi-host (TPU pods, multi-node GPU): call ``jax.distributed.initialize()`` once at start-up,
before any other JAX call. ``jax.devices()`` then lists every device of every host, so
``data_mesh()`` spans them all; each host loads only its share of the batch (e.g.
``fpbma.data.pipeline.batches(..., seed=seed + jax.process_index())`` over a per-host split) and
:func:`shard_batch` assembles the global array with ``jax.make_array_from_process_local_data``.
Everything else — the step, replication, evaluation — is the same code; nothing here assumes one
host. Metrics come back replicated, so every host can read them.

References:
  Lim et al., "Flat Posterior Does Matter For Bayesian Model Averaging", arXiv:2406.15664.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fpbma import posterior as post
from fpbma import transforms, types

PyTree = Any

__all__ = [
    "DATA_AXIS",
    "TrainState",
    "data_mesh",
    "shard_batch",
    "replicate",
    "pad_batch",
    "make_train_step",
    "make_data_parallel_step",
    "make_pmap_step",
    "replicate_for_pmap",
    "stack_for_pmap",
    "unreplicate",
    "evaluate_sharded",
    "evaluate_pmap",
]

DATA_AXIS = "data"


# ----------------------------------------------------------------------------------------------
# Meshes and placement.


def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D device mesh with the single axis ``"data"`` over ``devices`` (default: ``jax.devices()``,
    every device of every host after ``jax.distributed.initialize()``)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("data_mesh needs at least one device; got an empty device list.")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def _check_mesh(mesh):
    if not isinstance(mesh, Mesh) or DATA_AXIS not in mesh.axis_names:
        raise TypeError(f"mesh must be a jax.sharding.Mesh with an axis named {DATA_AXIS!r} "
                        f"(use fpbma.parallel.data_mesh()), got {mesh!r}.")


def _batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def _replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _leading_size(batch, what: str) -> int:
    sizes = {int(np.shape(x)[0]) if np.ndim(x) else None for x in jax.tree_util.tree_leaves(batch)}
    if not sizes:
        raise ValueError(f"{what}: the batch has no arrays.")
    if None in sizes or len(sizes) != 1:
        raise ValueError(f"{what}: every array of the batch needs the same leading (batch) dimension; "
                         f"got leading sizes {sorted(s for s in sizes if s is not None)}"
                         f"{' and scalars' if None in sizes else ''}.")
    return sizes.pop()


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
    """Places a batch on ``mesh`` split along its leading axis over ``"data"``.

    On one host ``batch`` is the global batch; on several hosts it is this host's share and the
    global array is assembled with ``jax.make_array_from_process_local_data``.

    Args:
      batch: a pytree of arrays sharing a leading batch dimension B (host or device arrays).
      mesh: from :func:`data_mesh`.

    Returns:
      The same pytree of global ``jax.Array`` s sharded as ``PartitionSpec("data")``.

    Raises:
      ValueError: if B is not divisible by the number of devices (training must not silently drop
        or duplicate examples; pad evaluation batches with :func:`pad_batch`).
    """
    _check_mesh(mesh)
    local_devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    size = _leading_size(batch, "shard_batch")
    if size % len(local_devices):
        fix = size - size % len(local_devices) or len(local_devices)
        raise ValueError(
            f"batch size {size} is not divisible by the {len(local_devices)} devices of the mesh"
            f"{' on this host' if jax.process_count() > 1 else ''}: use a multiple of {len(local_devices)} "
            f"(e.g. {fix}) for training, or pad evaluation batches with fpbma.parallel.pad_batch.")
    sharding = _batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Places every leaf of ``tree`` on every device of ``mesh`` (``PartitionSpec()``).

    Always copies (never aliases ``tree``'s buffers), so a donating step can consume the result
    while ``tree`` stays valid.
    """
    _check_mesh(mesh)
    # device_put may reuse a source buffer as one of the replicas (may_alias=False is not honoured
    # for multi-device targets in jax 0.10), so device arrays are copied first.
    tree = jax.tree.map(lambda x: jnp.copy(x) if isinstance(x, jax.Array) else x, tree)
    return jax.device_put(tree, _replicated(mesh))


def pad_batch(batch: PyTree, multiple: int):
    """Pads the leading axis up to a multiple of ``multiple`` with copies of the first example.

    Returns:
      ``(padded, mask)`` with ``mask`` a bool (B_padded,) array, True on the B real rows.
    """
    if isinstance(multiple, bool) or not isinstance(multiple, (int, np.integer)) or multiple < 1:
        raise ValueError(f"multiple={multiple!r} must be a positive integer (the device count).")
    size = _leading_size(batch, "pad_batch")
    if size == 0:
        raise ValueError("pad_batch: the batch is empty; there is nothing to evaluate.")
    padded_size = -(-size // multiple) * multiple
    mask = np.arange(padded_size) < size

    def pad(x):
        if padded_size == size:
            return x
        xp = jnp if isinstance(x, jax.Array) else np
        fill = xp.repeat(x[:1], padded_size - size, axis=0)
        return xp.concatenate([x, fill], axis=0)

    return jax.tree.map(pad, batch), mask


# ----------------------------------------------------------------------------------------------
# The train step.


TrainState = types.TrainState
"""The one train state of the library (:class:`fpbma.types.TrainState`): ``params`` (θ — a posterior for
FP-BMA and VI, plain weights for SGD/SAM-type methods), ``opt_state``, ``model_state`` (e.g.
``{"batch_stats": ...}``, ``{}`` if none) and the int32 ``step`` folded into the PRNG key."""


def _is_posterior(params) -> bool:
    return isinstance(params, (post.DiagGaussian, post.LowRankGaussian))


def _cast_floating(tree, dtype):
    if dtype is None:
        return tree
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x,
                        tree)


def make_train_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    *,
    prior=None,
    num_data: Optional[int] = None,
    kl_weight: float = 1.0,
    compute_dtype=None,
    batch_axis_name: Optional[str] = None,
) -> Callable:
    """A pure ``step(state, batch, key) -> (state, metrics)`` for any method of the library.

    With a posterior θ (FP-BMA, VI) the objective is the per-example negative ELBO

        L(θ) = ℓ(w(θ, ε); batch) + β KL(q_θ ‖ p)/N,   w = μ + σ⊙ε (+ low-rank part),

    with ε drawn once per step from ``fold_in(key, state.step)`` and shared by both passes; the clean
    gradient g = ∇_θ L(θ) goes to ``tx.update(g, ..., grad_fn=∇_θ L)``, which for ``fpbma.fpbma``
    evaluates ∇_θ L(θ + Δ*). With plain weights the objective is ℓ(w; batch) and ``tx`` may be SGD,
    SAM, FSAM, ... (``grad_fn`` is passed when the transform takes extra arguments).

    The model state (BatchNorm running statistics) is taken from the clean pass only; the perturbed
    pass's side effects are discarded. Under pmap (``batch_axis_name`` set) both gradients — the
    clean g and every ``grad_fn`` result — the metrics and the model state are averaged over the
    axis, so each replica sees the global-batch gradient and replicas stay identical for any ``tx``
    (SGD, SAM, FP-BMA, ...); ``tx`` need not be built with ``batch_axis_name`` (if it is, its own
    pmean of already-averaged gradients changes nothing).

    Args:
      loss_fn: ``loss_fn(weights, model_state, batch, key) -> (loss, new_model_state)``: the mean
        loss over the (local) batch at ``weights``; ``key`` is the same in both passes of a step
        (use it for dropout or for sampling frozen weights from a prior).
      tx: an optax transform (``GradientTransformationExtraArgs`` for opaque-mode methods).
      prior: p for the KL term (posterior θ only), or None.
      num_data: N, the training-set size (required with ``prior``).
      kl_weight: β.
      compute_dtype: e.g. ``jnp.bfloat16``: sampled weights and floating batch entries are cast to
        it for both forward/backward passes; θ, its gradients and the optimizer state keep their
        float32 dtype (the cast is differentiated through). None: no cast.
      batch_axis_name: pmap axis name, or None under jit.

    Returns:
      ``step(state: TrainState, batch, key) -> (TrainState, {"loss": ..., "num_skipped"?: ...})``.
    """
    if prior is not None and (num_data is None or num_data <= 0):
        raise ValueError(f"num_data={num_data!r}: pass the training-set size N (> 0) with a prior.")
    if compute_dtype is not None and not jnp.issubdtype(jnp.dtype(compute_dtype), jnp.floating):
        raise ValueError(f"compute_dtype={compute_dtype!r} must be a floating dtype such as jnp.bfloat16.")
    tx = optax.with_extra_args_support(tx)

    def step(state: TrainState, batch, key):
        step_key = jax.random.fold_in(key, state.step)
        noise_key, loss_key = jax.random.split(step_key)
        compute_batch = _cast_floating(batch, compute_dtype)
        posterior = _is_posterior(state.params)
        layout = transforms.flat_step_layout(state.params, tx)
        theta0 = layout.flatten(state.params) if layout else state.params
        flat_prior = layout.flatten(prior) if layout and prior is not None else prior
        noise = post.sample_noise(theta0, noise_key) if posterior else None

        def objective(theta):
            w = post.sample_from_noise(theta, noise) if posterior else theta
            if layout:
                w = layout.leaves(w)
            loss, new_model_state = loss_fn(_cast_floating(w, compute_dtype), state.model_state,
                                            compute_batch, loss_key)
            loss = jnp.asarray(loss, jnp.float32)
            total = loss
            if posterior and prior is not None:
                total = total + kl_weight * post.kl_divergence(theta, flat_prior) / num_data
            return total, (loss, new_model_state)

        def grad_fn(theta):
            return _mean_over(jax.grad(lambda t: objective(t)[0])(theta), batch_axis_name)

        (total, (loss, model_state)), grads = jax.value_and_grad(objective, has_aux=True)(theta0)
        # Averaging here (not only inside tx) makes every method exact under pmap, including
        # transforms that know no axis name (optax.sgd) or average only their second gradient
        # (optax.contrib.sam perturbs with the local one). A second pmean inside tx is an identity.
        grads = _mean_over(grads, batch_axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, theta0, grad_fn=grad_fn)
        params = optax.apply_updates(theta0, updates)
        if layout:
            params = layout.unflatten(params)
        # Running statistics may have been promoted to compute_dtype; keep the carry's dtypes fixed.
        model_state = jax.tree.map(lambda new, old: new.astype(old.dtype), model_state, state.model_state)
        metrics = {"loss": loss, "objective": total}
        if batch_axis_name is not None:
            metrics = jax.lax.pmean(metrics, batch_axis_name)
            model_state = jax.lax.pmean(model_state, batch_axis_name)
        num_skipped = _find_num_skipped(opt_state)
        if num_skipped is not None:
            metrics["num_skipped"] = num_skipped
        return state._replace(params=params, opt_state=opt_state, model_state=model_state, step=state.step + 1), metrics

    return step


def _mean_over(tree, axis_name):
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def _find_num_skipped(opt_state):
    if isinstance(opt_state, transforms.SkipNonFiniteState):
        return opt_state.num_skipped
    return None


class _DataParallelStep:
    """A jitted data-parallel step; ``jitted`` is the underlying ``jax.jit`` object."""

    def __init__(self, jitted, mesh, expected_devices):
        self.jitted = jitted
        self.mesh = mesh
        self._devices = expected_devices

    def __call__(self, state, batch, key):
        size = _leading_size(batch, "data-parallel step")
        if size % self._devices:
            raise ValueError(
                f"training batch size {size} is not divisible by the {self._devices} devices of the mesh: "
                f"use a multiple of {self._devices} (e.g. {size - size % self._devices or self._devices}); "
                "the gradient must be a mean over equally split shards, so examples are never padded "
                "or dropped in training.")
        return self.jitted(state, batch, key)

    def num_compilations(self) -> int:
        """Compiled variants of the step so far (1 after any number of same-shaped calls)."""
        return self.jitted._cache_size()


def make_data_parallel_step(step_fn: Callable, mesh: Mesh, donate: bool = True) -> _DataParallelStep:
    """Jits ``step_fn(state, batch, key) -> outputs`` over ``mesh``: state replicated, batch split over
    ``"data"``, state buffers donated, every output replicated.

    ``outputs`` may be any pytree: ``(state, metrics)`` of :func:`make_train_step`, or the new state of a
    method's :attr:`fpbma.types.Trainer.step` (what the experiment stages run).

    ``step_fn`` is the single-device step (:func:`make_train_step` without ``batch_axis_name``);
    since its loss is a mean over the global batch, XLA's SPMD partitioner averages gradients across
    devices and computes BatchNorm statistics over the global batch.

    Args:
      step_fn: a pure step.
      mesh: from :func:`data_mesh`.
      donate: donate the input state's buffers (the caller must not reuse the old state).

    Returns:
      A callable ``step(state, batch, key)``; it rejects a batch whose size is not divisible by the
      number of devices, and ``.num_compilations()`` counts compiled variants.
    """
    _check_mesh(mesh)
    rep, shard = _replicated(mesh), _batch_sharding(mesh)
    jitted = jax.jit(step_fn, in_shardings=(rep, shard, rep), out_shardings=rep,
                     donate_argnums=(0,) if donate else ())
    return _DataParallelStep(jitted, mesh, mesh.devices.size)


def make_pmap_step(step_fn: Callable, axis_name: str = "batch", donate: bool = True,
                   devices: Optional[Sequence[jax.Device]] = None) -> Callable:
    """``jax.pmap`` of ``step_fn(state, batch, key)`` over ``axis_name``.

    ``step_fn`` must average over ``axis_name`` itself: build it with
    ``make_train_step(..., batch_axis_name=axis_name)`` (any ``tx``), and give BatchNorm
    ``axis_name=axis_name`` to synchronise its statistics. The state carries a leading device axis
    (:func:`replicate_for_pmap`), the batch is ``(D, B/D, ...)`` (:func:`stack_for_pmap` or the
    pipeline's ``layout="stack"``); the key is broadcast so every device draws the same noise.
    """
    return jax.pmap(step_fn, axis_name=axis_name, in_axes=(0, 0, None), donate_argnums=(0,) if donate else (),
                    devices=devices)


def replicate_for_pmap(tree: PyTree, devices: Optional[Sequence[jax.Device]] = None) -> PyTree:
    """Copies ``tree`` to every local device with a leading device axis (for :func:`make_pmap_step`)."""
    devices = jax.local_devices() if devices is None else list(devices)
    sharding = NamedSharding(Mesh(np.asarray(devices), ("pmap",)), PartitionSpec("pmap"))
    # (jax.device_put_replicated is deprecated:) one copy per device along a new leading axis.
    return jax.tree.map(lambda x: jax.device_put(jnp.broadcast_to(x, (len(devices),) + jnp.shape(x)), sharding),
                        tree)


def unreplicate(tree: PyTree) -> PyTree:
    """The first replica of a pmapped tree."""
    return jax.tree.map(lambda x: x[0], tree)


def stack_for_pmap(batch: PyTree, num_devices: Optional[int] = None) -> PyTree:
    """Reshapes a batch (B, ...) to (D, B/D, ...); B must be divisible by D (training)."""
    d = jax.local_device_count() if num_devices is None else int(num_devices)
    size = _leading_size(batch, "stack_for_pmap")
    if size % d:
        raise ValueError(f"batch size {size} is not divisible by the {d} devices: use a multiple of {d} "
                         f"(e.g. {size - size % d or d}) for training, or pad evaluation batches with "
                         "fpbma.parallel.pad_batch.")
    return jax.tree.map(lambda x: x.reshape((d, size // d) + tuple(x.shape[1:])), batch)


# ----------------------------------------------------------------------------------------------
# Evaluation.


def _bma_predict():
    from fpbma import bma  # imported lazily: the BMA module builds on this package

    return bma.predict


def evaluate_sharded(apply_fn: Callable, sample_weights: Callable, inputs, mesh: Mesh, *, key: jax.Array,
                     num_samples: int = 30, chunk_size: Optional[int] = None) -> jax.Array:
    """BMA log-predictive log p̄(y|x) of ``inputs`` with the examples split over ``mesh``.

        log p̄(y|x) = logsumexp_s log softmax f(x; w_s) − log S,   w_s = sample_weights(k_s),

    computed by :func:`fpbma.bma.predict` on a batch padded to a multiple of the device count
    (copies of the first example, masked out afterwards). Samples are drawn on device, identically
    on every device (the key is replicated), so the result equals the one-device BMA.

    Args:
      apply_fn, sample_weights, key, num_samples, chunk_size: as in :func:`fpbma.bma.predict`.
      inputs: an array (N, ...) of any N ≥ 1.
      mesh: from :func:`data_mesh`.

    Returns:
      float32 (N, C): exactly one row per input, in order.
    """
    _check_mesh(mesh)
    padded, mask = pad_batch(inputs, mesh.devices.size)
    return _bma_predict()(apply_fn, sample_weights, shard_batch(padded, mesh), key=key, num_samples=num_samples,
                          chunk_size=chunk_size, mask=mask)


def evaluate_pmap(apply_fn: Callable, sample_weights: Callable, inputs, *, key: jax.Array, num_samples: int = 30,
                  chunk_size: Optional[int] = None, devices: Optional[Sequence[jax.Device]] = None) -> jax.Array:
    """:func:`evaluate_sharded` under ``jax.pmap``: (N, ...) padded and stacked to (D, ⌈N/D⌉, ...).

    ``apply_fn`` and ``sample_weights`` must be ``jax.tree_util.Partial`` s (or plain functions that
    close over no traced values); every device draws the same S samples from the broadcast key.
    """
    devices = jax.local_devices() if devices is None else list(devices)
    d = len(devices)
    predict = _bma_predict()
    padded, mask = pad_batch(inputs, d)
    stacked = stack_for_pmap(padded, d)
    out = jax.pmap(lambda x, k: predict(apply_fn, sample_weights, x, key=k, num_samples=num_samples,
                                        chunk_size=chunk_size), in_axes=(0, None), devices=devices)(stacked, key)
    out = out.reshape((-1,) + tuple(out.shape[2:]))
    return out[np.asarray(mask)]
