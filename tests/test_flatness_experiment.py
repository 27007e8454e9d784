"""End-to-end test of ``experiments.flatness`` on the tiny transfer config.

The tiny transfer pipeline runs for real (two methods, no corruptions), then the flatness stage reuses
its checkpoints. Values are checked against independent computations: λ_max and the trace of one
sample against the explicit ``jax.hessian`` of the training loss over the flattened subset, the
flattest-half BMA against :func:`fpbma.bma.predict_samples` over the samples with the smallest λ_max,
the report's numbers against the JSON and the transfer run's ``metrics.json``.
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
import pytest
from jax.flatten_util import ravel_pytree

from experiments import config_checks, input_pipeline, pipeline as stages, training, workdir as layout
from experiments import flatness as flat_exp
from tests.experiment_utils import first_table, tiny_config
from fpbma import bma
from fpbma.types import SampleSet
from fpbma.models import partition

ROOT = Path(__file__).resolve().parents[1]
NUM_SAMPLES = 6


def _config(workdir, **overrides):
    return tiny_config(workdir, **{"flatness.num_samples": NUM_SAMPLES, **overrides})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("flatness")
    config = _config(workdir)
    stages.run_pipeline(config)
    payload = flat_exp.run(config)
    return config, payload


@pytest.fixture(scope="module")
def fpbma_samples(run):
    """The transfer setup of seed 0 and the S samples of FP-BMA's posterior the flatness stage measured."""
    config, _ = run
    setup = training.setup_transfer(config, 0)
    trained = training.train_method(config, "fpbma", 0, setup)
    posterior, finished = trained.posterior, trained.finished
    assert finished
    return setup, flat_exp.draw_samples(config, setup.scheme, posterior, setup.extra, 0)


def _rows(md: str) -> dict:
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in first_table(md)}


def test_writes_report_whose_numbers_are_the_json(run):
    config, payload = run
    wd = Path(config.workdir)
    for name in ("flatness.json", "flatness.md", "flatness_scatter.png"):
        assert (wd / name).is_file() and (wd / name).stat().st_size > 0, name
    assert json.loads((wd / "flatness.json").read_text())["summary"] == payload["summary"]
    rows = _rows((wd / "flatness.md").read_text())
    assert set(rows) == {"fpbma", "sgd"}
    for method, cells in rows.items():
        r = payload["summary"][method]
        for cell, name in zip(cells[:3], ("lambda_max", "eigenvalue_ratio", "trace")):
            mean, std = (float(x) for x in cell.split("±"))
            assert mean == pytest.approx(r[name][0], rel=1e-3, abs=1e-12)
            assert std == pytest.approx(r[name][1], rel=0.05, abs=1e-12)
        values = [float(x) for x in cells[3:]]
        expected = [r[part][m] for part in ("bma", "flattest_half", "sharpest_half") for m in ("acc", "nll", "ece")]
        np.testing.assert_allclose(values, expected, atol=5e-5)
        # The BMA columns are the transfer run's own metrics.
        with open(os.path.join(layout.method_dir(config, method, 0), "metrics.json")) as f:
            raw = json.load(f)["in_domain"]["raw"]
        assert r["bma"] == {m: pytest.approx(raw[m]) for m in ("acc", "nll", "ece")}
        # Pooled over the one seed, the summary is the mean / std of the per-sample values.
        per = payload["methods"][method]["0"]
        assert r["lambda_max"][0] == pytest.approx(np.mean(per["lambda_max"]))
        assert r["trace"][1] == pytest.approx(np.std(per["trace"]))


def test_eigenvalues_are_sorted_and_ratio_is_first_over_last(run):
    _, payload = run
    for method in ("fpbma", "sgd"):
        r = payload["methods"][method]["0"]
        eigs = np.asarray(r["eigenvalues"])
        assert eigs.shape == (NUM_SAMPLES, 5)
        assert np.all(np.diff(eigs, axis=1) <= 0)  # λ₁ ≥ λ₂ ≥ … ≥ λ₅
        np.testing.assert_allclose(r["lambda_max"], eigs[:, 0])
        np.testing.assert_allclose(r["eigenvalue_ratio"], eigs[:, 0] / eigs[:, -1])


def test_lambda_max_and_trace_match_the_explicit_hessian(run, fpbma_samples):
    _, payload = run
    r = payload["methods"]["fpbma"]["0"]
    setup, samples = fpbma_samples
    data, model, scheme = setup.data, setup.model, setup.scheme
    i = int(np.argmax(r["lambda_max"]))
    variables = jax.tree.map(lambda x: x[i], samples)
    subset, rest = partition.split(variables["params"], scheme.scheme)
    flat, unravel = ravel_pytree(subset)
    assert flat.size == r["subset_size"]
    images = input_pipeline.normalise(data["train_image"])
    labels = np.asarray(data["train_label"])

    def loss(w_flat):  # the mean training cross-entropy, eval-mode BatchNorm, over the flattened subset
        params = partition.merge(unravel(w_flat), rest)
        logits = model.apply({"batch_stats": variables["batch_stats"], "params": params}, images, train=False)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(labels.size), labels])

    hessian = np.asarray(jax.jit(jax.hessian(loss))(flat), np.float64)
    exact = np.linalg.eigvalsh(0.5 * (hessian + hessian.T))[::-1]
    lanczos = np.asarray(r["eigenvalues"][i])
    assert lanczos[0] == pytest.approx(exact[0], rel=1e-3)
    # Ritz values interlace from below: λ_j(T_m) ≤ λ_j(H) (Cauchy).
    assert np.all(lanczos <= exact[:5] + 1e-4 * abs(exact[0]))
    # Hutchinson: unbiased, within a few of its own standard errors of tr H.
    assert abs(r["trace"][i] - np.trace(hessian)) <= 4 * r["trace_stderr"][i] + 1e-4 * abs(np.trace(hessian))


def test_flattest_half_bma_uses_the_samples_with_smallest_lambda_max(run, fpbma_samples):
    _, payload = run
    r = payload["methods"]["fpbma"]["0"]
    lam = np.asarray(r["lambda_max"])
    flat_idx, sharp_idx = r["flattest_half"]["indices"], r["sharpest_half"]["indices"]
    assert len(flat_idx) == len(sharp_idx) == NUM_SAMPLES // 2
    assert sorted(flat_idx) == sorted(np.argsort(lam)[:NUM_SAMPLES // 2].tolist())
    assert lam[flat_idx].max() <= lam[sharp_idx].min()
    setup, samples = fpbma_samples
    data, model = setup.data, setup.model
    labels = data["test_label"]
    for part, idx in (("flattest_half", flat_idx), ("sharpest_half", sharp_idx),
                      ("all_samples", list(range(NUM_SAMPLES)))):
        chosen = SampleSet(jax.tree.map(lambda x, idx=idx: x[np.asarray(idx)], samples))
        lp = bma.predict_samples(lambda w, x: model.apply(w, x, train=False), chosen,
                                 input_pipeline.normalise(data["test_image"]))
        expected = bma.evaluate(lp, labels)
        for m in ("acc", "nll", "ece"):
            assert r[part][m] == pytest.approx(expected[m], rel=1e-4, abs=1e-6), (part, m)


def test_missing_transfer_checkpoints_fail_before_any_work(tmp_path, run):
    # A work dir the transfer pipeline never saw: nothing is created.
    fresh = tmp_path / "wd"
    with pytest.raises(config_checks.ConfigError, match=r"Run `python -m experiments.transfer` with the same --config"):
        flat_exp.run(_config(fresh))
    assert not fresh.exists()
    # The trained work dir, but a method the transfer run did not train: the error names it, nothing is written.
    config, _ = run
    wd = Path(config.workdir)
    before = {p: p.stat().st_mtime_ns for p in wd.rglob("*")}
    bad = _config(wd, methods=("fpbma", "sgd", "sam"))
    with pytest.raises(config_checks.ConfigError, match=r"missing .*sam-"):
        flat_exp.run(bad)
    assert {p: p.stat().st_mtime_ns for p in wd.rglob("*")} == before


@pytest.mark.parametrize("field, value, message", [
    ("num_samples", 1, "num_samples=1 must be >= 2"),
    ("trace_probes", 1, "trace_probes=1 must be >= 2"),
    ("lanczos_iterations", 3, "lanczos_iterations=3 must be >= config.flatness.num_eigenvalues=5"),
    ("lanczos", 3, r"unknown field\(s\) \['lanczos'\]"),
])
def test_bad_flatness_settings_fail_before_any_work(tmp_path, field, value, message):
    config = _config(tmp_path / "wd")
    config.flatness[field] = value
    with pytest.raises(config_checks.ConfigError, match=message):
        flat_exp.run(config)
    assert not (tmp_path / "wd").exists()


def test_command_line_error_is_one_clear_message(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "experiments.flatness", "--config=experiments/configs/tiny.py",
                           f"--config.workdir={tmp_path / 'wd'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error: the transfer pipeline has not trained"), proc.stderr[-2000:]
    assert "python -m experiments.transfer" in lines[-1] and "Traceback" not in proc.stderr
    assert not (tmp_path / "wd").exists()
