"""Predictive metrics for Bayesian model averaging: accuracy, NLL, ECE, Brier.

BMA predictive (docs page :doc:`/transfer`): p(y|x) = (1/S) Σ_s softmax(f(x; w_s)). Its log
is computed in log space, log p(y|x) = logsumexp_s log softmax(f(x; w_s))_y − log S, so a class to
which some samples give zero probability never produces log 0.

All functions take an optional boolean ``mask`` (N,) so padded evaluation batches can be reduced
without dropping or duplicating examples.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

__all__ = ["softmax_cross_entropy", "bma_log_predictive", "accuracy", "nll", "ece", "brier", "calibration_bins"]


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The cross-entropy of every example, −log softmax(logits)_y (..., C) → (...): the library's one.

    Every training loss, Hessian loss and Laplace likelihood of the library is this function (its mean:
    :func:`fpbma.transfer.cross_entropy`). It is ``optax.softmax_cross_entropy_with_integer_labels``
    mathematically; it subtracts log Σ exp from the shifted logits as ``jax.nn.log_softmax`` does, while
    optax forms logsumexp first, so the two differ in the last bit, and keeping this order keeps every
    trained result and the reported metrics of the experiments bit for bit.

    >>> float(softmax_cross_entropy(jnp.zeros((1, 4)), jnp.array([2]))[0]) == float(jnp.log(4.0))
    True
    """
    labels = jnp.asarray(labels).astype(jnp.int32)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], axis=-1)[..., 0]


def bma_log_predictive(logits: jax.Array) -> jax.Array:
    """log of the BMA predictive from per-sample logits (S, N, C) → (N, C).

        log p(y|x) = logsumexp_s log_softmax(logits_s)_y − log S.
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must have shape (samples, examples, classes), got {logits.shape}.")
    return jax.nn.logsumexp(jax.nn.log_softmax(logits, axis=-1), axis=0) - jnp.log(logits.shape[0])


def _masked_mean(values, mask):
    if mask is None:
        return jnp.mean(values)
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def accuracy(log_probs: jax.Array, labels: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    """Top-1 accuracy of a predictive given as log-probabilities or probabilities (N, C)."""
    return _masked_mean((jnp.argmax(log_probs, -1) == labels).astype(jnp.float32), mask)


def nll(log_probs: jax.Array, labels: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    """Mean negative log-likelihood −(1/N) Σ log p(yₙ|xₙ) from log-probabilities (N, C)."""
    picked = jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return _masked_mean(-picked, mask)


def brier(log_probs: jax.Array, labels: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    """Brier score (1/N) Σₙ Σ_c (p_c − 1[c = yₙ])² from log-probabilities (N, C)."""
    probs = jnp.exp(log_probs)
    onehot = jax.nn.one_hot(labels, probs.shape[-1], dtype=probs.dtype)
    return _masked_mean(jnp.sum((probs - onehot) ** 2, -1), mask)


def calibration_bins(log_probs: jax.Array, labels: jax.Array, num_bins: int = 15,
                     mask: Optional[jax.Array] = None):
    """Top-label reliability data on ``num_bins`` equal-width confidence bins over [0, 1].

    Bin b holds confidences in (b/B, (b+1)/B] (bin 0 also holds confidence 0).

    Returns:
      (count, mean_confidence, accuracy) per bin, each shape (num_bins,); empty bins give 0.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins={num_bins} must be >= 1.")
    probs = jnp.exp(log_probs)
    conf = jnp.max(probs, -1)
    correct = (jnp.argmax(probs, -1) == labels).astype(conf.dtype)
    weight = jnp.ones_like(conf) if mask is None else mask.astype(conf.dtype)
    bins = jnp.clip(jnp.ceil(conf * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
    count = jnp.zeros(num_bins, conf.dtype).at[bins].add(weight)
    conf_sum = jnp.zeros(num_bins, conf.dtype).at[bins].add(weight * conf)
    acc_sum = jnp.zeros(num_bins, conf.dtype).at[bins].add(weight * correct)
    safe = jnp.maximum(count, 1.0)
    return count, conf_sum / safe, acc_sum / safe


def ece(log_probs: jax.Array, labels: jax.Array, num_bins: int = 15, mask: Optional[jax.Array] = None) -> jax.Array:
    """Expected calibration error, top label, ``num_bins`` equal-width bins (Guo et al., 2017):

        ECE = Σ_b (|B_b| / N) · |acc(B_b) − conf(B_b)|.
    """
    count, conf, acc = calibration_bins(log_probs, labels, num_bins, mask)
    return jnp.sum(count * jnp.abs(acc - conf)) / jnp.maximum(jnp.sum(count), 1.0)
