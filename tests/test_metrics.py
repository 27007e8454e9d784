"""Metrics against hand computations on small arrays."""

import jax.numpy as jnp
import numpy as np
import pytest

from fpbma import metrics


def test_bma_log_predictive_is_log_of_mean_probability_and_handles_zero_probability():
    logits = jnp.array([[[0.0, 1.0, -2.0]], [[3.0, -1.0, 0.5]]])  # S=2, N=1, C=3
    probs = np.exp(np.asarray(logits)) / np.exp(np.asarray(logits)).sum(-1, keepdims=True)
    np.testing.assert_allclose(np.exp(metrics.bma_log_predictive(logits)), probs.mean(0), rtol=1e-6)
    # One sample gives class 2 probability exp(-1000) ≈ 0 in float32; log-space keeps NLL finite and exact.
    extreme = jnp.array([[[0.0, 0.0, -1000.0]], [[0.0, 0.0, -1000.0]]])
    lp = metrics.bma_log_predictive(extreme)
    expected = -1000.0 - np.log(1 + 1 + np.exp(-1000.0))
    np.testing.assert_allclose(metrics.nll(lp, jnp.array([2])), -expected, rtol=1e-6)


def test_accuracy_nll_brier_by_hand():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.25, 0.5, 0.25], [0.9, 0.05, 0.05]])
    labels = np.array([0, 1, 1, 2])
    lp = jnp.log(jnp.asarray(probs))
    assert np.isclose(metrics.accuracy(lp, labels), 2 / 4)
    np.testing.assert_allclose(metrics.nll(lp, labels), -np.mean(np.log([0.7, 0.3, 0.5, 0.05])), rtol=1e-6)
    onehot = np.eye(3)[labels]
    np.testing.assert_allclose(metrics.brier(lp, labels), np.mean(((probs - onehot) ** 2).sum(1)), rtol=1e-6)
    mask = jnp.array([True, True, False, False])
    assert np.isclose(metrics.accuracy(lp, labels, mask), 0.5)
    np.testing.assert_allclose(metrics.nll(lp, labels, mask), -np.mean(np.log([0.7, 0.3])), rtol=1e-6)


def test_ece_bins_by_hand():
    # Confidences 0.7 (bin (0.6667, 0.7333]), 0.6 (bin (0.5333, 0.6]: right edge inclusive), 0.5, 0.9.
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.25, 0.5, 0.25], [0.9, 0.05, 0.05]])
    labels = np.array([0, 1, 1, 2])
    lp = jnp.log(jnp.asarray(probs))
    count, conf, acc = metrics.calibration_bins(lp, labels, 15)
    edges = np.linspace(0, 1, 16)
    conf_np = probs.max(1)
    which = np.clip(np.searchsorted(edges, conf_np, side="left") - 1, 0, 14)
    assert which.tolist() == [10, 8, 7, 13]
    np.testing.assert_allclose(count, np.bincount(which, minlength=15))
    correct = (probs.argmax(1) == labels).astype(float)
    expected = sum(abs(correct[i] - conf_np[i]) for i in range(4)) / 4  # one example per bin here
    np.testing.assert_allclose(metrics.ece(lp, labels), expected, rtol=1e-6)


def test_ece_is_zero_for_a_perfectly_calibrated_predictor():
    # In each confidence level, exactly that fraction is correct.
    conf_levels = [0.5, 0.75, 1.0]
    probs, labels = [], []
    for c in conf_levels:
        n = 4
        for i in range(n):
            probs.append([c, 1 - c])
            labels.append(0 if i < round(c * n) else 1)
    lp = jnp.log(jnp.clip(jnp.asarray(probs), 1e-30))
    np.testing.assert_allclose(metrics.ece(lp, jnp.asarray(labels)), 0.0, atol=1e-6)


def test_bad_shapes_rejected():
    with pytest.raises(ValueError, match="samples, examples, classes"):
        metrics.bma_log_predictive(jnp.zeros((3, 4)))
