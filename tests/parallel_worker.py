"""Runs the data-parallel checks of tests/test_parallel.py on 8 forced host devices; prints JSON.

XLA_FLAGS must be set before jax is imported, so this runs in its own process:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/parallel_worker.py
"""

from __future__ import annotations

import json
import os
import sys
import time

if "--xla_force_host_platform_device_count=8" not in os.environ.get("XLA_FLAGS", ""):
    sys.exit("run with XLA_FLAGS=--xla_force_host_platform_device_count=8 set before python starts")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.tree_util import Partial  # noqa: E402

import fpbma  # noqa: E402
from fpbma import parallel  # noqa: E402
from fpbma.models.resnet import BatchNorm  # noqa: E402

NUM_CLASSES = 5
BATCH = 16
STEPS = 3


class SmallNet(nn.Module):
    """conv → BatchNorm → relu → mean-pool → head; ``axis_name`` syncs BatchNorm under pmap."""

    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3), name="conv1")(x)
        x = nn.relu(BatchNorm(axis_name=self.axis_name, name="bn1")(x, train))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(NUM_CLASSES, name="head")(x)


def make_loss(model):
    def loss_fn(weights, model_state, batch, key):
        del key
        logits, updates = model.apply({"params": weights, **model_state}, batch["image"], train=True,
                                      mutable=["batch_stats"])
        logits = logits.astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, updates
    return loss_fn


def mark(label):
    print(f"{time.perf_counter() - START:7.1f}s {label}", file=sys.stderr, flush=True)


def max_diff(a, b):
    return float(max(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)))
                     for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))))


def max_abs(a):
    return float(max(np.max(np.abs(np.asarray(x, np.float32))) for x in jax.tree_util.tree_leaves(a)))


def posterior(kind, params):
    if kind == "diag":
        return fpbma.DiagGaussian.from_point(params, 0.05)
    q = fpbma.LowRankGaussian.from_point(params, 0.05, rank=3)
    keys = iter(jax.random.split(jax.random.PRNGKey(7), 100))
    return q._replace(cov_factor=jax.tree.map(lambda d: 0.05 * jax.random.normal(next(keys), d.shape), q.cov_factor))


def run_jit(step_fn, mesh, state, batches, key):
    step = parallel.make_data_parallel_step(step_fn, mesh)
    state = parallel.replicate(state, mesh)
    losses = []
    for b in batches:
        state, m = step(state, parallel.shard_batch(b, mesh), key)
        losses.append(float(m["loss"]))
    return state, losses, step


def compare_devices(step_fn, pmap_step_fn, state0, batches, key, mesh1, mesh8):
    """STEPS steps from ``state0`` on one device, jit-sharded on 8 and pmapped on 8: max differences.

    Returns ``(report, eight, losses_eight, step8)``; the last three are the 8-device jit run.
    """
    one, losses_one, _ = run_jit(step_fn, mesh1, state0, batches, key)
    mark("one")
    eight, losses_eight, step8 = run_jit(step_fn, mesh8, state0, batches, key)
    mark("eight")
    pstep = parallel.make_pmap_step(pmap_step_fn)
    pstate = parallel.replicate_for_pmap(jax.tree.map(jnp.copy, state0))
    losses_pmap = []
    for b in batches:
        pstate, m = pstep(pstate, parallel.stack_for_pmap(b), key)
        losses_pmap.append(float(m["loss"][0]))
    mark("pmap")
    replica_spread = max_diff(jax.tree.map(lambda x: x[0], pstate), jax.tree.map(lambda x: x[-1], pstate))
    pstate = parallel.unreplicate(pstate)
    report = {
        "moved": max_diff(one.params, state0.params),
        "stats_moved": max_diff(one.model_state, state0.model_state),
        "jit8_params": max_diff(one.params, eight.params),
        "jit8_stats": max_diff(one.model_state, eight.model_state),
        "jit8_loss": max(abs(a - b) for a, b in zip(losses_one, losses_eight)),
        "pmap_params": max_diff(one.params, pstate.params),
        "pmap_stats": max_diff(one.model_state, pstate.model_state),
        "pmap_opt": max_diff(one.opt_state, pstate.opt_state),
        "pmap_loss": max(abs(a - b) for a, b in zip(losses_one, losses_pmap)),
        "pmap_replica_spread": replica_spread,
        "steps": int(eight.step),
        "param_sharding_replicated": all(x.sharding.is_fully_replicated
                                         for x in jax.tree_util.tree_leaves(eight.params)),
    }
    return report, eight, losses_eight, step8


START = time.perf_counter()


def main():
    devices = jax.devices()
    assert len(devices) == 8, devices
    out = {"num_devices": len(devices)}
    key = jax.random.PRNGKey(0)
    data_key, init_key, step_key = jax.random.split(key, 3)
    images = jax.random.normal(data_key, (STEPS, BATCH, 6, 6, 3))
    labels = jax.random.randint(data_key, (STEPS, BATCH), 0, NUM_CLASSES)
    batches = [{"image": np.asarray(images[i]), "label": np.asarray(labels[i])} for i in range(STEPS)]
    plain = SmallNet()
    synced = SmallNet(axis_name="batch")
    variables = plain.init(init_key, images[0], train=False)
    mesh1, mesh8 = parallel.data_mesh(devices[:1]), parallel.data_mesh()

    for kind in ("diag", "lowrank"):
        q0 = posterior(kind, variables["params"])
        prior = jax.tree.map(jnp.copy, q0)
        tx = fpbma.fpbma(0.1, rho=0.2, momentum=0.9)
        state0 = parallel.TrainState.create(q0, tx, {"batch_stats": variables["batch_stats"]})
        kw = dict(prior=prior, num_data=100)
        step_fn = parallel.make_train_step(make_loss(plain), tx, **kw)
        mark(kind)
        tx_p = fpbma.fpbma(0.1, rho=0.2, momentum=0.9, batch_axis_name="batch")
        pstep_fn = parallel.make_train_step(make_loss(synced), tx_p, batch_axis_name="batch", **kw)
        out[kind], eight, losses_eight, step8 = compare_devices(step_fn, pstep_fn, state0, batches, step_key,
                                                                mesh1, mesh8)
        if kind == "diag":
            reference_diag = (q0, state0, eight, losses_eight)

        # Compilation count over many steps: one jit cache entry, no backend compile after the first.
        compiles = []
        listener = lambda event, duration, **kw: compiles.append(event) if "backend_compile" in event else None
        jax.monitoring.register_event_duration_secs_listener(listener)
        state = parallel.replicate(state0, mesh8)
        counts = []
        for i in range(8):
            state, m = step8(state, parallel.shard_batch(batches[i % STEPS], mesh8), jax.random.fold_in(step_key, i))
            counts.append(len(compiles))
        jax.block_until_ready(state)
        jax.monitoring.unregister_event_duration_listener(listener)
        out[kind]["compile_events_after_first_step"] = counts[-1] - counts[0]
        out[kind]["cache_size"] = step8.num_compilations()

    mark("compile count")
    # Point-estimate methods through the same make_train_step: plain weights, transforms built with
    # no axis name (the step itself averages both gradients under pmap).
    import fpbma.baselines as B
    for name, make_tx in (("sgd", lambda: B.sgd(0.1, momentum=0.9)), ("sam", lambda: B.sam(0.1, rho=0.2))):
        tx = make_tx()
        state0_w = parallel.TrainState.create(variables["params"], tx, {"batch_stats": variables["batch_stats"]})
        step_fn = parallel.make_train_step(make_loss(plain), tx)
        pstep_fn = parallel.make_train_step(make_loss(synced), tx, batch_axis_name="batch")
        out[name], _, _, _ = compare_devices(step_fn, pstep_fn, state0_w, batches, step_key, mesh1, mesh8)
        mark(name)
    # Donation: the input state's buffers are consumed by the step.
    state = parallel.replicate(state0, mesh8)
    new_state, _ = step8(state, parallel.shard_batch(batches[0], mesh8), step_key)
    out["donated"] = all(x.is_deleted() for x in jax.tree_util.tree_leaves(state.params))

    # Batch sizes that do not split over 8 devices are rejected in training.
    bad = {"image": batches[0]["image"][:12], "label": batches[0]["label"][:12]}
    errors = {}
    for name, call in [("step", lambda: step8(new_state, bad, step_key)),
                       ("shard_batch", lambda: parallel.shard_batch(bad, mesh8)),
                       ("stack_for_pmap", lambda: parallel.stack_for_pmap(bad, 8))]:
        try:
            call()
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    out["errors"] = errors

    # BMA evaluation of 13 examples (not a multiple of 8): sharded and pmapped vs one device.
    q = posterior("lowrank", variables["params"])
    stats = variables["batch_stats"]
    apply_fn = Partial(lambda bs, w, x: plain.apply({"params": w, "batch_stats": bs}, x, train=False), stats)
    sample_weights = Partial(fpbma.sample, q)
    x_eval = jax.random.normal(jax.random.PRNGKey(3), (13, 6, 6, 3))
    from fpbma import bma
    mark("bma start")
    ref = bma.predict(apply_fn, sample_weights, jax.device_put(x_eval, devices[0]), key=step_key, num_samples=7,
                      chunk_size=3)
    sharded = parallel.evaluate_sharded(apply_fn, sample_weights, np.asarray(x_eval), mesh8, key=step_key,
                                        num_samples=7, chunk_size=3)
    pmapped = parallel.evaluate_pmap(apply_fn, sample_weights, np.asarray(x_eval), key=step_key, num_samples=7,
                                     chunk_size=3)
    mark("bma")
    # Independent reference: average softmax over the 7 samples, one at a time, in NumPy.
    keys = jax.random.split(step_key, 7)
    probs = np.mean([np.asarray(jax.nn.softmax(apply_fn(fpbma.sample(q, k), x_eval))) for k in keys], axis=0)
    out["bma"] = {
        "rows": [int(ref.shape[0]), int(sharded.shape[0]), int(pmapped.shape[0])],
        "sharded_vs_one": max_diff(ref, sharded),
        "pmap_vs_one": max_diff(ref, pmapped),
        "one_vs_numpy": float(np.max(np.abs(np.exp(np.asarray(ref)) - probs))),
    }

    # bf16 compute with float32 posterior parameters: the same 3 steps as the float32 diag run above.
    q0, state0, s32, losses32 = reference_diag
    tx = fpbma.fpbma(0.1, rho=0.2, momentum=0.9)
    step_fn = parallel.make_train_step(make_loss(plain), tx, prior=q0, num_data=100, compute_dtype=jnp.bfloat16)
    s16, losses16, _ = run_jit(step_fn, mesh8, state0, batches, step_key)
    mark("bf16")
    out["bf16"] = {
        "param_dtypes": sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(s16.params)}),
        "opt_dtypes": sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(s16.opt_state)
                              if jnp.issubdtype(x.dtype, jnp.floating)}),
        "stats_dtypes": sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(s16.model_state)}),
        "loss32": losses32, "loss16": losses16,
        "update_diff": max_diff(jax.tree.map(lambda a, b: a - b, s16.params, q0),
                                jax.tree.map(lambda a, b: a - b, s32.params, q0)),
        "update_size": max_abs(jax.tree.map(lambda a, b: a - b, s32.params, q0)),
    }
    out["seconds"] = time.perf_counter() - START
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
