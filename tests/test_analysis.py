"""Paired intervals over seeds and the verdict rules of experiments.analysis, against hand-computed values."""

import math

import numpy as np
import pytest

from experiments import analysis

T_975_DF4 = 2.7764451051977987  # Student t quantile, 0.975, 4 degrees of freedom (tables)


def test_paired_interval_is_the_student_t_interval_of_the_differences():
    a = np.array([0.81, 0.77, 0.84, 0.79, 0.80])
    b = np.array([0.75, 0.76, 0.78, 0.70, 0.77])
    d = a - b
    half = T_975_DF4 * np.std(d, ddof=1) / math.sqrt(5)
    iv = analysis.paired_interval(a, b)
    assert iv["n"] == 5
    assert iv["mean"] == pytest.approx(d.mean(), abs=1e-12)
    assert iv["low"] == pytest.approx(d.mean() - half, abs=1e-10)
    assert iv["high"] == pytest.approx(d.mean() + half, abs=1e-10)


def test_paired_interval_pairs_by_position_not_by_sorting():
    # The same values unpaired would give a wide interval; paired, the difference is exactly 0.1 each time.
    a, b = [0.5, 0.9, 0.7], [0.4, 0.8, 0.6]
    iv = analysis.paired_interval(a, b)
    assert iv["low"] == pytest.approx(0.1) and iv["high"] == pytest.approx(0.1)
    assert analysis.comparison(iv, higher_is_better=True) == "better"


def test_one_seed_is_undecided_and_bad_shapes_raise():
    iv = analysis.paired_interval([0.9], [0.1])
    assert iv["n"] == 1 and math.isnan(iv["low"])
    assert analysis.comparison(iv, True) == "undecided"
    with pytest.raises(ValueError, match="one length"):
        analysis.paired_interval([1.0, 2.0], [1.0])


@pytest.mark.parametrize("low, high, higher, expected", [
    (0.01, 0.2, True, "better"), (0.01, 0.2, False, "worse"), (-0.2, -0.01, True, "worse"),
    (-0.2, -0.01, False, "better"), (-0.1, 0.1, True, "undecided"), (-0.1, 0.1, False, "undecided")])
def test_comparison_reads_the_interval_on_the_right_side(low, high, higher, expected):
    assert analysis.comparison({"low": low, "high": high}, higher) == expected


@pytest.mark.parametrize("signs, verdict", [
    (["better", "better", "undecided"], "holds"),
    (["better", "better", "worse"], "undecided"),       # one worse: not "holds"
    (["better", "undecided", "undecided"], "undecided"),  # not more than half better
    (["worse", "worse", "better", "undecided"], "does not hold"),  # half worse
    (["worse", "undecided", "undecided", "better"], "undecided"),
    ([], "undecided")])
def test_majority_verdict(signs, verdict):
    assert analysis.majority_verdict(signs) == verdict


def test_claims_from_per_seed_values():
    seeds = range(5)
    rng = np.random.default_rng(0)
    base = rng.normal(0.7, 0.05, 5)
    acc = {"fpbma": {s: base[s] + 0.05 for s in seeds}, "sgd": {s: base[s] for s in seeds},
           "vi": {s: base[s] + 0.05 + 0.001 * (-1) ** s for s in seeds}}
    nll = {m: {s: 1.0 - v for s, v in per.items()} for m, per in acc.items()}
    out = analysis.claim_bma(acc, nll)
    assert out["acc"]["pairs"]["sgd"]["comparison"] == "better"
    assert out["acc"]["pairs"]["vi"]["comparison"] == "undecided"
    assert out["acc"]["verdict"] == "undecided"  # better than 1 of 2: not more than half
    assert out["nll"]["pairs"]["sgd"]["comparison"] == "better"  # lower NLL is better

    lam = {"fpbma": {s: 1.0 for s in seeds}, "vi": {s: 2.0 + 0.1 * s for s in seeds},
           "swag": {s: 3.0 + 0.2 * (s % 2) for s in seeds}, "sgd": {s: 0.0 for s in seeds}}
    sharp = analysis.claim_sharpness(lam)
    assert set(sharp["claim1"]["pairs"]) == {"vi", "swag"}  # sgd is a point estimate, not approximate Bayes
    assert sharp["claim1"]["verdict"] == "holds"
    assert sharp["claim2_flatter_than_vi"]["verdict"] == "holds"
    lam["vi"] = {s: 0.5 - 0.01 * s for s in seeds}
    assert analysis.claim_sharpness(lam)["claim2_flatter_than_vi"]["verdict"] == "does not hold"
