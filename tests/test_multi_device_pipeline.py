"""The main job on 8 forced host devices equals the one on one device, and every step compiles once.

``--xla_force_host_platform_device_count`` must be set before jax is imported, so each run is the
command line of the README (``python -m experiments.transfer --workdir=...``) in its own process. Every
stage (pre-training, the SWAG prior, each method's transfer training) shards its batch over the ``data``
mesh and the BMA evaluation shards the test batches, so one step on 8 devices equals one step on one
device up to float32 reduction order (~1e-7). Pre-training a BatchNorm network from scratch is chaotic:
those 1e-7 grow to ~1e-2 within 20 steps (measured), as they do between two XLA optimisation levels on one
device. So pre-training is compared step by step over its first steps, and the 8-device main job starts
from the one-device run's source network: the prior fit, the training of fpbma, sgd, swag, sgld and
laplace, and their BMA metrics are then compared at float tolerance. Reference: the one-device run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from fpbma.models.checkpoints import restore_checkpoint

# The 8-device subprocesses of both files run on one xdist worker: two at once on 2 cores starve XLA's
# collective rendezvous (40 s timeout).
pytestmark = pytest.mark.xdist_group("eight_host_devices")
ROOT = Path(__file__).resolve().parents[1]
METHODS = ("fpbma", "sgd", "swag", "sgld", "laplace")
# Training runs 6–12 steps; gradients summed in another order differ by ~1e-7 per step. A wrong
# all-reduce (a shard's gradient instead of the mean) moves the NLL by ~1e-2.
TOL = 2e-4


def _command(workdir, *extra, stage="transfer"):
    return [sys.executable, "-m", f"experiments.{stage}", "--config=experiments/configs/tiny.py",
            f"--workdir={workdir}", f"--config.methods={','.join(METHODS)}", "--config.transfer.batch_size=8",
            "--config.eval.corruptions=none", "--config.compilation_cache=False",
            # enough pre-training and a large enough rate that the predictions are far from uniform (NLL
            # 1.9–2.7 against log 10 = 2.30), so a wrong gradient or BMA average would show
            "--config.pretrain.steps=100", "--config.transfer.steps=12", "--config.transfer.learning_rate=0.2",
            "--config.eval.num_samples=4", *extra]


def _run(workdir, devices: int, *extra, stage="transfer"):
    env = dict(os.environ)
    # Optimisation level 0 keeps compile time on 2 shared cores low; it does not change float32 results
    # beyond reduction order.
    flags = "--xla_backend_optimization_level=0"
    if devices > 1:
        flags = f"--xla_force_host_platform_device_count={devices} " + flags
    env["XLA_FLAGS"] = flags
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(_command(workdir, *extra, stage=stage), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _loops(workdir: Path) -> dict:
    return {str(p.parent.relative_to(workdir)): json.loads(p.read_text()) for p in workdir.rglob("loop.json")}


def _checkpoint(workdir: Path, pattern: str):
    (path,) = workdir.glob(pattern)
    return jax.device_get(restore_checkpoint(path))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    one, eight = tmp_path_factory.mktemp("devices1"), tmp_path_factory.mktemp("devices8")
    proc = _run(one, 1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (source,) = one.glob("source-*")
    (prior,) = one.glob("prior-*")
    prior8 = tmp_path_factory.mktemp("prior8")  # the prior fitted on 8 devices from the same source
    shutil.copytree(source / "final", prior8 / source.name / "final")
    proc = _run(prior8, 8, stage="prior")
    assert proc.returncode == 0, proc.stderr[-4000:]
    # The main job on 8 devices from the one-device source and prior: SWAG's σ² = mean(w²) − mean(w)²
    # turns 1e-7 weight differences into ~1 % differences of the smallest variances, which the frozen
    # weights drawn from the prior would carry into every method's BMA.
    for stage in (source, prior):
        shutil.copytree(stage / "final", eight / stage.name / "final")
    proc = _run(eight, 8)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = {}
    for devices, workdir in ((1, one), (8, eight)):
        with open(workdir / "results.json") as f:
            out[devices] = {"payload": json.load(f), "loops": _loops(workdir), "workdir": workdir}
    out["prior8"] = {"workdir": prior8, "loops": _loops(prior8)}
    return out


@pytest.fixture(scope="module")
def pretraining(tmp_path_factory):
    """Three pre-training steps from scratch on 1 and on 8 devices."""
    out = {}
    for devices in (1, 8):
        workdir = tmp_path_factory.mktemp(f"pretrain{devices}")
        proc = _run(workdir, devices, "--config.max_steps=3", "--config.checkpoint_every=3", stage="pretrain")
        assert proc.returncode == 0, proc.stderr[-4000:]
        out[devices] = {"state": _checkpoint(workdir, "source-*/step_3"), "loops": _loops(workdir)}
    return out


def test_pretraining_steps_on_8_devices_equal_those_on_one(pretraining):
    one, eight = pretraining[1]["state"], pretraining[8]["state"]
    assert jax.tree.structure(one) == jax.tree.structure(eight)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)
    moved = max(float(np.max(np.abs(np.asarray(a, np.float64)))) for a in jax.tree.leaves(one["opt_state"]))
    assert moved > 1e-3  # the momentum buffers hold real gradients
    for pre in pretraining.values():
        assert [loop["num_compilations"] for loop in pre["loops"].values()] == [1]


def test_the_swag_prior_on_8_devices_equals_the_one_on_one(runs):
    one = _checkpoint(runs[1]["workdir"], "prior-*/final")
    eight = _checkpoint(runs["prior8"]["workdir"], "prior-*/final")
    for field in ("mean", "cov_factor"):
        for a, b in zip(jax.tree.leaves(one[field]), jax.tree.leaves(eight[field])):
            np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-4)
    # σ² = mean(w²) − mean(w)² cancels: float32 leaves it an absolute error of ~1e-7 · w², so small
    # variances are compared absolutely, not through log σ.
    for a, b in zip(jax.tree.leaves(one["log_std"]), jax.tree.leaves(eight["log_std"])):
        np.testing.assert_allclose(np.exp(2 * b), np.exp(2 * a), atol=1e-6, rtol=1e-3)


def test_the_run_used_every_device(runs):
    assert len(runs[1]["payload"]["devices"]) == 1
    assert len(runs[8]["payload"]["devices"]) == 8
    assert {loop["devices"] for run in (8, "prior8") for loop in runs[run]["loops"].values()} == {8}


@pytest.mark.parametrize("method", METHODS)
def test_metrics_on_8_devices_equal_those_on_one(runs, method):
    one = runs[1]["payload"]["results"][method]["0"]["in_domain"]
    eight = runs[8]["payload"]["results"][method]["0"]["in_domain"]
    assert abs(one["raw"]["nll"] - 2.302585) > 0.03  # not the uniform predictive
    for kind in ("raw", "ts"):
        for metric in ("nll", "ece", "brier"):
            assert eight[kind][metric] == pytest.approx(one[kind][metric], abs=TOL), (kind, metric)
        assert abs(eight[kind]["acc"] - one[kind]["acc"]) <= 1 / 1008 + 1e-9  # at most one of 1,008 flips
    assert runs[8]["payload"]["results"][method]["0"]["temperature"] == pytest.approx(
        runs[1]["payload"]["results"][method]["0"]["temperature"], rel=1e-3)


def test_every_stage_compiles_its_step_once(runs):
    expected = {1: {"source", "prior", *METHODS}, 8: set(METHODS), "prior8": {"prior"}}
    for run, stages in expected.items():
        loops = runs[run]["loops"]
        assert {name.split("-")[0].split("/")[-1] for name in loops} == stages, sorted(loops)
        for name, loop in loops.items():
            assert loop["end_step"] > loop["start_step"], name
            assert loop["num_compilations"] == 1, (run, name, loop)


def test_a_batch_that_does_not_split_over_the_devices_is_refused_before_any_work(tmp_path):
    workdir = tmp_path / "run"
    proc = _run(workdir, 8, "--config.transfer.batch_size=10")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: config.transfer.batch_size=10 gives training batches of 10, which do not split over "
                     "the 8 devices of the data mesh: use a multiple of 8 (e.g. --config.transfer.batch_size=8 "
                     "or 16)."], proc.stderr[-2000:]
    assert not workdir.exists()
