"""Temperature scaling of the BMA predictive and reliability diagrams.

Temperature scaling (Guo et al., 2017) is fitted on the validation split *on the BMA predictive*
log p̄(y|x) (the transfer scheme's last step, see the docs page :doc:`/transfer`), not on single-network logits:

    p_T(y|x) = softmax(log p̄(·|x) / T)_y  ∝  p̄(y|x)^{1/T},

with T = argmin_T −(1/N) Σ_n log p_T(y_n|x_n). The NLL is convex in β = 1/T (a log-sum-exp of functions
linear in β minus a linear term), hence unimodal in log T; a golden-section search on log T over a
bounded bracket finds the minimiser without derivatives or step-size tuning.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fpbma import metrics

__all__ = ["fit_temperature", "apply_temperature", "temperature_nll", "calibrated_metrics", "reliability_diagram"]

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _check(log_probs, labels, mask):
    lp = np.asarray(log_probs, np.float64)
    y = np.asarray(labels)
    if lp.ndim != 2:
        raise ValueError(f"log_probs must be (N, C) log-probabilities, got shape {lp.shape}.")
    if y.shape != lp.shape[:1]:
        raise ValueError(f"labels shape {y.shape} does not match log_probs {lp.shape}; expected ({lp.shape[0]},).")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}.")
    if y.size and (y.min() < 0 or y.max() >= lp.shape[1]):
        raise ValueError(f"labels must lie in [0, {lp.shape[1] - 1}], got range [{y.min()}, {y.max()}].")
    if np.isnan(lp).any() or np.isposinf(lp).any():
        raise ValueError("log_probs contain NaN or +inf; pass log-probabilities (≤ 0, −inf allowed).")
    if mask is None:
        w = np.ones(lp.shape[0])
    else:
        w = np.asarray(mask, bool)
        if w.shape != y.shape:
            raise ValueError(f"mask shape {w.shape} does not match labels {y.shape}.")
        w = w.astype(np.float64)
    if w.sum() < 1:
        raise ValueError("No examples to fit on: log_probs is empty or mask is all False.")
    return lp, y.astype(np.int64), w


def _nll_at(lp, y, w, temperature):
    z = lp / temperature
    finite_max = np.max(np.where(np.isfinite(z), z, -np.inf), axis=1, keepdims=True)
    lse = finite_max[:, 0] + np.log(np.sum(np.exp(z - finite_max), axis=1))
    picked = z[np.arange(z.shape[0]), y]
    return float(np.sum(w * (lse - picked)) / np.sum(w))


def temperature_nll(log_probs, labels, temperature: float, mask=None) -> float:
    """NLL −(1/N) Σ_n log softmax(log p̄(·|x_n) / T)_{y_n} of the temperature-scaled predictive (float64)."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be positive.")
    lp, y, w = _check(log_probs, labels, mask)
    return _nll_at(lp, y, w, float(temperature))


def fit_temperature(log_probs, labels, mask=None, *, bounds: Tuple[float, float] = (0.05, 20.0),
                    tol: float = 1e-6) -> float:
    """Temperature T minimising the validation NLL of the scaled BMA predictive.

        T = argmin_{T ∈ [T_lo, T_hi]} −(1/N) Σ_n log softmax(log p̄(·|x_n) / T)_{y_n}

    Golden-section search on log T (the objective is unimodal in log T, see the module docstring),
    evaluated in float64; T stops at a bound when the minimiser lies outside the bracket.

    Args:
      log_probs: BMA log-predictive on the validation split (N, C), e.g. from :func:`fpbma.bma.predict`.
      labels: integer labels (N,).
      mask: optional boolean (N,); False rows (padding) are ignored.
      bounds: bracket (T_lo, T_hi) with 0 < T_lo < T_hi.
      tol: width of the final bracket in log T.

    Returns:
      T as a Python float.

    References:
      Guo et al., "On Calibration of Modern Neural Networks", ICML 2017; FP-BMA, arXiv 2406.15664 (metrics
      after temperature scaling).
    """
    lo, hi = (float(b) for b in bounds)
    if not 0 < lo < hi:
        raise ValueError(f"bounds={bounds} must satisfy 0 < T_lo < T_hi.")
    if not tol > 0:
        raise ValueError(f"tol={tol} must be positive.")
    lp, y, w = _check(log_probs, labels, mask)

    def f(log_t):
        return _nll_at(lp, y, w, math.exp(log_t))

    a, b = math.log(lo), math.log(hi)
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = f(d)
    # The bracket ends are candidates too: a minimiser at a bound is never strictly inside.
    candidates = [(f(math.log(lo)), lo), (f(math.log(hi)), hi), (min(fc, fd), math.exp(c if fc <= fd else d))]
    return float(min(candidates)[1])


def apply_temperature(log_probs, temperature) -> jax.Array:
    """Temperature-scaled log-predictive log softmax(log p̄ / T), shape (N, C)."""
    if not float(temperature) > 0:
        raise ValueError(f"temperature={temperature} must be positive (fit it with fit_temperature).")
    return jax.nn.log_softmax(jnp.asarray(log_probs, jnp.float32) / float(temperature), axis=-1)


def calibrated_metrics(val_log_probs, val_labels, test_log_probs, test_labels, *, val_mask=None,
                       test_mask=None, num_bins: int = 15) -> dict:
    """Raw and temperature-scaled test metrics, T fitted on the validation BMA predictive.

        T = fit_temperature(log p̄_val, y_val),   scaled = evaluate(log softmax(log p̄_test / T), y_test)

    Args:
      val_log_probs, val_labels: BMA log-predictive (N_val, C) and labels of the validation split.
      test_log_probs, test_labels: the same for the split that is reported.
      val_mask, test_mask: optional boolean masks (padding rows False).
      num_bins: ECE bins.

    Returns:
      ``{"temperature": T, "raw": {acc, nll, ece, brier}, "scaled": {acc, nll, ece, brier}}``.

    References:
      Guo et al., ICML 2017; FP-BMA, arXiv 2406.15664 (metrics reported with and without scaling).
    """
    from fpbma.bma import evaluate

    _check(test_log_probs, test_labels, test_mask)
    t = fit_temperature(val_log_probs, val_labels, val_mask)
    return {"temperature": t,
            "raw": evaluate(test_log_probs, test_labels, test_mask, num_bins),
            "scaled": evaluate(apply_temperature(test_log_probs, t), test_labels, test_mask, num_bins)}


def reliability_diagram(log_probs, labels, path, title: str = "", *, num_bins: int = 15,
                        mask: Optional[jax.Array] = None) -> dict:
    """Writes a reliability diagram (accuracy vs confidence per bin, top label) as a PNG.

    Bars show the accuracy in each of ``num_bins`` equal-width confidence bins
    (:func:`fpbma.metrics.calibration_bins`), the diagonal is perfect calibration, and the title carries
    ECE = Σ_b (|B_b|/N) |acc_b − conf_b|.

    Args:
      log_probs: predictive log-probabilities (N, C).
      labels: integer labels (N,).
      path: output PNG path; parent directories are created.
      title: figure title (the ECE is appended).
      num_bins: number of bins (15 in the paper).
      mask: optional boolean (N,).

    Returns:
      The plotted data: ``{"count", "confidence", "accuracy"}`` (lists over bins) and ``"ece"``.
    """
    lp, y, _ = _check(log_probs, labels, mask)
    path = os.fspath(path)
    if not path.lower().endswith(".png"):
        raise ValueError(f"path={path!r} must end with .png.")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise ValueError(f"cannot write {path!r}: {parent!r} is a file, not a directory.")
    m = None if mask is None else jnp.asarray(mask, bool)
    lpj = jnp.asarray(lp, jnp.float32)
    count, conf, acc = (np.asarray(a) for a in metrics.calibration_bins(lpj, jnp.asarray(y), num_bins, m))
    ece = float(metrics.ece(lpj, jnp.asarray(y), num_bins, m))

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    width = edges[1] - edges[0]
    filled = count > 0
    ax.bar(edges[:-1][filled], acc[filled], width=width, align="edge", color="tab:blue", edgecolor="black",
           label="accuracy")
    ax.bar(edges[:-1][filled], conf[filled] - acc[filled], bottom=acc[filled], width=width, align="edge",
           color="tab:red", alpha=0.3, edgecolor="tab:red", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}  ECE={ece:.3f}".strip())
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=100)
    return {"count": count.tolist(), "confidence": conf.tolist(), "accuracy": acc.tolist(), "ece": ece}
