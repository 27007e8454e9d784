"""Data parallelism (fpbma.parallel) on 8 forced host devices vs one device, pmap vs jit-sharding.

The 8-device checks run in a subprocess (tests/parallel_worker.py) because
``--xla_force_host_platform_device_count`` must be set before jax is imported; one run produces every
number and the tests below assert on them. Reference: one device, the same step and data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fpbma import parallel

WORKER = Path(__file__).with_name("parallel_worker.py")
# The 8-device subprocesses of both files run on one xdist worker: two at once on 2 cores starve XLA's
# collective rendezvous (40 s timeout).
pytestmark = pytest.mark.xdist_group("eight_host_devices")
ROOT = Path(__file__).resolve().parents[1]
FLOAT32_REDUCTION_TOL = 2e-6  # observed differences are ~1e-7; a wrong all-reduce gives ~1e-2


@pytest.fixture(scope="module")
def eight():
    env = dict(os.environ)
    # Optimisation level 0 keeps compile time of the ~12 programs under a minute on 2 shared cores;
    # it does not change float32 results beyond reduction order.
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(WORKER)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(line[-1][len("RESULT "):])


@pytest.mark.parametrize("kind", ["diag", "lowrank", "sgd", "sam"])
def test_training_steps_match_one_device_under_jit_sharding_and_pmap(eight, kind):
    """FP-BMA (diagonal and low-rank θ) and two point methods (SGD, SAM through optax.contrib.sam,
    built without an axis name) give the one-device θ, BatchNorm statistics and losses on 8 devices."""
    assert eight["num_devices"] == 8
    r = eight[kind]
    assert r["steps"] == 3
    # The steps did something (else equality would be vacuous): θ and BatchNorm statistics moved.
    assert r["moved"] > 1e-2 and r["stats_moved"] > 1e-2
    for name in ("jit8_params", "jit8_stats", "jit8_loss", "pmap_params", "pmap_stats", "pmap_loss"):
        assert r[name] < FLOAT32_REDUCTION_TOL, (name, r[name])
    assert r["pmap_opt"] < 1e-5  # momentum buffers accumulate the two passes' gradients
    assert r["pmap_replica_spread"] == 0.0  # every device holds the same θ
    assert r["param_sharding_replicated"]


@pytest.mark.parametrize("kind", ["diag", "lowrank"])
def test_jitted_step_compiles_once_over_many_steps(eight, kind):
    assert eight[kind]["cache_size"] == 1
    assert eight[kind]["compile_events_after_first_step"] == 0


def test_train_state_is_donated(eight):
    assert eight["donated"]


def test_indivisible_training_batch_is_rejected_with_a_clear_error(eight):
    for name, message in eight["errors"].items():
        assert message is not None, f"{name} accepted a batch of 12 on 8 devices"
        assert "12" in message and "divisible" in message and "multiple of 8" in message, message


def test_bma_evaluation_pads_masks_and_matches_one_device(eight):
    r = eight["bma"]
    assert r["rows"] == [13, 13, 13]  # 13 examples on 8 devices: padded to 16, none dropped or duplicated
    assert r["one_vs_numpy"] < 1e-6  # the one-device BMA against a per-sample NumPy average
    assert r["sharded_vs_one"] < FLOAT32_REDUCTION_TOL
    assert r["pmap_vs_one"] < FLOAT32_REDUCTION_TOL


def test_bf16_compute_keeps_float32_posterior_and_tracks_float32_step(eight):
    r = eight["bf16"]
    assert r["param_dtypes"] == ["float32"] and r["opt_dtypes"] == ["float32"] and r["stats_dtypes"] == ["float32"]
    np.testing.assert_allclose(r["loss16"], r["loss32"], atol=1e-2)  # bf16 has ~3 significant digits
    assert r["loss16"] != r["loss32"]  # the cast really happened
    assert r["update_diff"] < 0.05 * r["update_size"], r


# In-process checks on the default (single) device.


def test_pad_batch_pads_to_a_multiple_with_a_mask():
    batch = {"image": np.arange(13 * 2, dtype=np.float32).reshape(13, 2), "label": np.arange(13)}
    padded, mask = parallel.pad_batch(batch, 8)
    assert padded["image"].shape == (16, 2) and mask.shape == (16,)
    assert mask.sum() == 13 and mask[:13].all()
    np.testing.assert_array_equal(padded["label"][mask], batch["label"])
    np.testing.assert_array_equal(padded["image"][13:], np.repeat(batch["image"][:1], 3, axis=0))
    same, mask = parallel.pad_batch(batch, 13)
    assert same["image"].shape == (13, 2) and mask.all()


def test_point_sgd_step_matches_optax_by_hand():
    """make_train_step with plain weights and optax.sgd equals grad + sgd update written out."""
    w0 = {"w": jnp.array([[0.5, -1.0], [2.0, 0.3]]), "b": jnp.array([0.1, -0.2])}
    x = jnp.array([[1.0, 2.0], [-1.0, 0.5], [0.3, 0.3], [2.0, -1.0]])
    y = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.0]])

    def loss_fn(w, model_state, batch, key):
        pred = batch["x"] @ w["w"] + w["b"]
        return jnp.mean((pred - batch["y"]) ** 2), model_state

    tx = optax.sgd(0.1)
    step = parallel.make_data_parallel_step(parallel.make_train_step(loss_fn, tx), parallel.data_mesh(jax.devices()[:1]))
    state = parallel.replicate(parallel.TrainState.create(w0, tx), step.mesh)
    state, metrics = step(state, {"x": x, "y": y}, jax.random.PRNGKey(0))
    g = jax.grad(lambda w: loss_fn(w, {}, {"x": x, "y": y}, None)[0])(w0)
    expected = jax.tree.map(lambda w, gw: w - 0.1 * gw, w0, g)
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"], loss_fn(w0, {}, {"x": x, "y": y}, None)[0], rtol=1e-6)
    assert int(state.step) == 1


def test_bad_arguments_are_rejected():
    with pytest.raises(TypeError, match="data_mesh"):
        parallel.shard_batch({"x": np.zeros(4)}, "not a mesh")
    with pytest.raises(ValueError, match="same leading"):
        parallel.shard_batch({"x": np.zeros(4), "y": np.zeros(3)}, parallel.data_mesh())
    with pytest.raises(ValueError, match="compute_dtype"):
        parallel.make_train_step(lambda *a: None, optax.sgd(0.1), compute_dtype=jnp.int32)
    with pytest.raises(ValueError, match="num_data"):
        parallel.make_train_step(lambda *a: None, optax.sgd(0.1), prior=object())
