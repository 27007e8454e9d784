"""Temperature scaling recovers a known temperature; reliability diagrams plot the metrics' bins."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpbma import calibration, metrics


def _synthetic(t_star, n=20000, c=10, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, c)) * 3.0
    p = np.exp(z / t_star - (z / t_star).max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    labels = (p.cumsum(1) > rng.random((n, 1))).argmax(1)  # y ~ softmax(z / T*)
    # A BMA-style predictive of z: the log-mean-exp over S identical samples is log softmax(z).
    log_probs = metrics.bma_log_predictive(jnp.broadcast_to(jnp.asarray(z, jnp.float32), (3, n, c)))
    return z, labels, log_probs


def test_fit_temperature_recovers_known_temperature_and_lowers_nll():
    t_star = 2.5
    z, labels, lp = _synthetic(t_star)
    t = calibration.fit_temperature(lp, labels)
    assert abs(t - t_star) / t_star < 0.05, t
    before = float(metrics.nll(lp, jnp.asarray(labels)))
    after = float(metrics.nll(calibration.apply_temperature(lp, t), jnp.asarray(labels)))
    assert after <= before
    # The fitted T is the minimiser: a brute-force grid never does better (up to the grid's resolution).
    grid = np.exp(np.linspace(np.log(0.5), np.log(10), 400))
    nlls = [calibration.temperature_nll(lp, labels, g) for g in grid]
    assert calibration.temperature_nll(lp, labels, t) <= min(nlls) + 1e-9
    assert abs(np.log(grid[int(np.argmin(nlls))]) - np.log(t)) < 2 * np.log(grid[1] / grid[0])


def test_fit_temperature_respects_mask_and_bounds():
    _, labels, lp = _synthetic(2.5, n=4000)
    _, labels_cold, lp_cold = _synthetic(0.5, n=4000, seed=1)
    both_lp = jnp.concatenate([lp, lp_cold])
    both_y = np.concatenate([labels, labels_cold])
    mask = np.r_[np.ones(4000, bool), np.zeros(4000, bool)]
    # Padding rows (mask False) must not move the fit.
    np.testing.assert_allclose(calibration.fit_temperature(both_lp, both_y, mask),
                               calibration.fit_temperature(lp, labels), rtol=1e-5)
    # A minimiser outside the bracket stops at the bound.
    assert calibration.fit_temperature(lp, labels, bounds=(0.05, 1.5)) == pytest.approx(1.5)


def test_calibrated_metrics_fit_on_validation_improve_test_nll():
    _, y_val, lp_val = _synthetic(2.5, n=5000, seed=4)
    _, y_test, lp_test = _synthetic(2.5, n=5000, seed=5)
    out = calibration.calibrated_metrics(lp_val, y_val, lp_test, y_test)
    assert abs(out["temperature"] - 2.5) / 2.5 < 0.1
    assert out["scaled"]["nll"] < out["raw"]["nll"] - 0.05
    assert out["scaled"]["ece"] < out["raw"]["ece"]
    assert out["scaled"]["acc"] == out["raw"]["acc"]  # a positive temperature never changes the argmax


def test_apply_temperature_is_tempered_softmax():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(50, 6)) * 2
    lp = z - np.log(np.exp(z).sum(1, keepdims=True))
    out = np.asarray(calibration.apply_temperature(lp, 1.7))
    ref = np.exp(z / 1.7) / np.exp(z / 1.7).sum(1, keepdims=True)
    np.testing.assert_allclose(np.exp(out), ref, rtol=1e-5)


def test_reliability_diagram_writes_png_with_metric_bins(tmp_path):
    rng = np.random.default_rng(3)
    z = rng.normal(size=(300, 4)) * 2
    lp = jax.nn.log_softmax(jnp.asarray(z, jnp.float32))
    y = rng.integers(0, 4, 300)
    path = tmp_path / "sub" / "rel.png"
    data = calibration.reliability_diagram(lp, y, path, "test")
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 2000
    conf = np.exp(np.asarray(lp)).max(1)
    counts = np.histogram(conf, bins=np.linspace(0, 1, 16))[0]  # equal-width bins; no confidence on an edge
    np.testing.assert_array_equal(np.asarray(data["count"]), counts)
    np.testing.assert_allclose(data["ece"], float(metrics.ece(lp, jnp.asarray(y))), rtol=1e-6)


def test_bad_inputs_fail_before_work(tmp_path):
    lp = jnp.log(jnp.full((4, 3), 1 / 3))
    with pytest.raises(ValueError, match="labels must lie"):
        calibration.fit_temperature(lp, np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="bounds"):
        calibration.fit_temperature(lp, np.array([0, 1, 2, 0]), bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match="mask is all False"):
        calibration.fit_temperature(lp, np.array([0, 1, 2, 0]), np.zeros(4, bool))
    with pytest.raises(ValueError, match="positive"):
        calibration.apply_temperature(lp, 0.0)
    with pytest.raises(ValueError, match=".png"):
        calibration.reliability_diagram(lp, np.array([0, 1, 2, 0]), tmp_path / "x.pdf")
    assert not list(tmp_path.iterdir())
