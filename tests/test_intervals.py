"""Cluster-adjusted Wilson intervals for proportions, the minimum for an interval, the formatter."""
import numpy as np
import pytest

from medmoco.intervals import clustered_proportion, format_estimate, wilson, withheld_reason


def _clustered_sensitivity(rng, patients=40, truth=0.8, spread=2.0):
    """Positive slices of ``patients`` patients, 5-30 each; a patient's own detection rate varies
    (logit-normal), so its slices are
    correlated; ``truth`` is the median patient's rate. Returns hits, ones and patient ids."""
    sizes = rng.integers(5, 31, patients)
    logit = np.log(truth / (1 - truth)) + rng.normal(0, spread, patients)
    rate = 1 / (1 + np.exp(-logit))
    pid = np.repeat(np.arange(patients), sizes)
    hits = (rng.random(len(pid)) < rate[pid]).astype(float)
    return hits, np.ones_like(hits), pid


def _population_rate(truth=0.8, spread=2.0):
    draws = np.random.default_rng(99).normal(0, spread, 2_000_000) + np.log(truth / (1 - truth))
    return float(np.mean(1 / (1 + np.exp(-draws))))  # sizes independent of rate: slice- and patient-weighted agree


def test_wilson_matches_its_formula_and_reaches_the_ends():
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4901625, abs=1e-6) and hi == pytest.approx(0.9433178, abs=1e-6)
    assert wilson(10, 10)[1] == 1.0 and wilson(10, 10)[0] < 1.0 and wilson(0, 10)[0] == 0.0


def test_clustered_wilson_covers_a_known_proportion_and_the_slice_wilson_does_not():
    rng = np.random.default_rng(0)
    truth = _population_rate()
    covered = {"clustered": [], "slices": []}
    for _ in range(400):
        hits, ones, pid = _clustered_sensitivity(rng)
        result = clustered_proportion(hits, ones, pid)
        covered["clustered"].append(result["ci"][0] <= truth <= result["ci"][1])
        lo, hi = wilson(hits.sum(), len(hits))
        covered["slices"].append(lo <= truth <= hi)
        assert result["design_effect"] >= 1.0
    coverage = {k: float(np.mean(v)) for k, v in covered.items()}
    assert 0.90 <= coverage["clustered"] <= 0.99, coverage
    assert coverage["slices"] < 0.7, coverage  # correlated slices counted as independent


def test_a_sensitivity_of_one_gets_an_interval_that_leaves_one():
    pid = np.repeat(np.arange(12), 20)
    result = clustered_proportion(np.ones(240), np.ones(240), pid)
    assert result["value"] == 1.0 and result["ci"][1] == 1.0
    assert result["ci"] == pytest.approx(wilson(12, 12))  # 12 patients, each counted once
    assert clustered_proportion(np.zeros(3), np.zeros(3), [1, 2, 3])["ci"] is None


def test_intervals_are_withheld_below_the_minimum_with_a_reason():
    assert withheld_reason(10, 300) is None
    assert withheld_reason(4, 300) == "4 positive patients (fewer than 10): interval withheld"
    assert withheld_reason(1, 9, 5) == "1 positive patient (fewer than 5): interval withheld"


def test_one_formatter_for_values_and_intervals():
    assert format_estimate(0.81234, [0.7, 0.9]) == "0.812 [0.700, 0.900]"
    assert format_estimate(None, None) == "n/a" and format_estimate(float("nan")) == "n/a"
    assert format_estimate(0.01, [-0.02, 0.04], 4, signed=True) == "+0.0100 [-0.0200, +0.0400]"
    assert format_estimate(0.9, None, reason="3 positive patients") == "0.900 (no interval: 3 positive patients)"
