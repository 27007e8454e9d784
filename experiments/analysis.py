r"""Statistics over transfer seeds: mean ± std, paired differences with 95 % intervals, and the verdicts.

Every seed draws its own few-shot train/validation split and training noise, and every method of a
run sees the same draws, so methods are compared *paired by seed*: for FP-BMA against a method m,
dₛ = metricₛ(FP-BMA) − metricₛ(m) over the seeds s, and the 95 % interval is Student's t interval of
the mean of dₛ (:func:`scipy.stats.ttest_rel`), d̄ ± t₀.₉₇₅,ₙ₋₁ · sd(d)/√n. A comparison is

* ``better`` when the whole interval lies on FP-BMA's good side (above 0 for accuracy, below for NLL,
  ECE and sharpness),
* ``worse`` when it lies on the other side,
* ``undecided`` when it contains 0 (or with fewer than two seeds).

A claim over several comparisons (:func:`majority_verdict`) *holds* when more than half of them are
``better`` and none is ``worse``; it *does not hold* when at least half are ``worse``; otherwise it is
*undecided at this power* (more seeds could decide it).

The paper's two claims, as this library tests them:

1. *Most approximate-Bayes posteriors are sharp*: against FP-BMA's posterior, the Bayesian baselines
   (:data:`APPROXIMATE_BAYES`: variational, sampling and post-hoc posteriors; not point estimates, not
   FP-BMA's own variants) have a larger λ_max of the training-loss Hessian (paired on log λ_max). Needs
   the flatness experiment.
2. *FP-BMA's posterior is flatter and its BMA better*: (a) flatter than its ablation ``vi`` (the same
   posterior and loss without the perturbation), on log λ_max; (b) a better BMA than every other method
   of the run, on in-domain accuracy and on NLL.

>>> d = paired_interval([0.8, 0.82, 0.79], [0.7, 0.74, 0.72])
>>> round(d["mean"], 4), d["n"], d["low"] > 0
(0.0833, 3, True)
>>> comparison(d, higher_is_better=True)
'better'

References:
  Lim et al., "Flat Posterior Does Matter For Bayesian Model Averaging", arXiv:2406.15664 (the claims).
  Student's paired t interval: e.g. Wasserman, "All of Statistics", §10.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

APPROXIMATE_BAYES = ("vi", "moped", "bsam", "swag", "fswag", "sgld", "emcmc", "laplace")
"""The Bayesian baselines of claim 1 (posteriors that are not FP-BMA's and not point estimates)."""

REFERENCE = "fpbma"
HIGHER_IS_BETTER = {"acc": True, "nll": False, "ece": False, "brier": False, "log_lambda_max": False}


def paired_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean of dₛ = aₛ − bₛ and its Student-t interval; ``low``/``high`` are NaN with fewer than 2 pairs.

    Args:
      a, b: the two methods' values, in the same seed order.
      confidence: the interval's coverage.

    Returns:
      ``{"mean", "low", "high", "n"}``.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values need two 1-D sequences of one length, got shapes {a.shape} and {b.shape}.")
    d = a - b
    n = int(d.size)
    mean = float(np.mean(d)) if n else math.nan
    if n < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "n": n}
    if np.all(d == d[0]):  # zero spread: the interval is the point (scipy would return NaN)
        return {"mean": mean, "low": mean, "high": mean, "n": n}
    from scipy import stats

    ci = stats.ttest_rel(a, b).confidence_interval(confidence)
    return {"mean": mean, "low": float(ci.low), "high": float(ci.high), "n": n}


def comparison(interval: Mapping, higher_is_better: bool) -> str:
    """``"better"``, ``"worse"`` or ``"undecided"`` for the reference method (see the module docstring)."""
    low, high = interval["low"], interval["high"]
    if not (math.isfinite(low) and math.isfinite(high)):
        return "undecided"
    if low > 0 or high < 0:
        return "better" if (low > 0) == higher_is_better else "worse"
    return "undecided"


def majority_verdict(comparisons: Sequence[str]) -> str:
    """``holds`` (> half better, none worse), ``does not hold`` (≥ half worse) or ``undecided``."""
    n = len(comparisons)
    if n == 0:
        return "undecided"
    better, worse = comparisons.count("better"), comparisons.count("worse")
    if 2 * better > n and worse == 0:
        return "holds"
    if 2 * worse >= n:
        return "does not hold"
    return "undecided"


def paired_table(values: Mapping[str, Mapping[int, float]], metric: str, reference: str = REFERENCE) -> dict:
    """For every method ≠ ``reference``: the paired interval of reference − method over their common seeds."""
    if reference not in values:
        return {}
    ref = values[reference]
    out = {}
    for m, per in values.items():
        if m == reference:
            continue
        seeds = sorted(set(ref) & set(per))
        iv = paired_interval([ref[s] for s in seeds], [per[s] for s in seeds])
        out[m] = {**iv, "comparison": comparison(iv, HIGHER_IS_BETTER[metric])}
    return out


def claim_bma(values_acc: Mapping, values_nll: Mapping, reference: str = REFERENCE) -> dict:
    """Claim 2(b): FP-BMA's BMA against every other method, on accuracy and on NLL."""
    out = {}
    for metric, values in (("acc", values_acc), ("nll", values_nll)):
        table = paired_table(values, metric, reference)
        out[metric] = {"verdict": majority_verdict([r["comparison"] for r in table.values()]), "pairs": table}
    return out


def claim_sharpness(log_lambda: Mapping, reference: str = REFERENCE) -> dict:
    """Claims 1 and 2(a) from per-seed mean log λ_max: ``{"claim1": ..., "claim2_flatter_than_vi": ...}``."""
    table = paired_table(log_lambda, "log_lambda_max", reference)
    bayes = {m: r for m, r in table.items() if m in APPROXIMATE_BAYES}
    vi = table.get("vi")
    return {"claim1": {"verdict": majority_verdict([r["comparison"] for r in bayes.values()]), "pairs": bayes},
            "claim2_flatter_than_vi": {"verdict": "undecided" if vi is None else
                                       {"better": "holds", "worse": "does not hold"}.get(vi["comparison"], "undecided"),
                                       "pair": vi},
            "pairs": table}


def format_interval(iv: Mapping, digits: int = 3) -> str:
    """``+0.083 [+0.051, +0.116]`` (or ``+0.083 [n = 1]``)."""
    if not math.isfinite(iv["low"]):
        return f"{iv['mean']:+.{digits}f} [n = {iv['n']}]"
    return f"{iv['mean']:+.{digits}f} [{iv['low']:+.{digits}f}, {iv['high']:+.{digits}f}]"
