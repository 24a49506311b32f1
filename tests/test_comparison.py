"""Paired comparison statistics (medmoco.comparison) against independent implementations."""
import numpy as np
import pytest
from scipy.stats import kstest, norm
from sklearn.metrics import roc_auc_score

from dicom_preprocess import SUBTYPES
from medmoco.clustered import clustered_auc_test
from medmoco.comparison import compare_predictions, delong, midranks, non_inferior


def _delong_direct(y, a, b):
    """DeLong et al. (1988) as written: placement values psi(X_i, Y_j) over all positive-negative
    pairs (O(mn)), their covariance, a two-sided z-test. Independent of the mid-rank algorithm."""
    y = np.asarray(y) > 0.5
    v10, v01 = [], []
    for s in (np.asarray(a, float), np.asarray(b, float)):
        pos, neg = s[y], s[~y]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    m, n = len(v10[0]), len(v01[0])
    s10, s01 = np.cov(np.stack(v10)), np.cov(np.stack(v01))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    delta = v10[0].mean() - v10[1].mean()
    return delta, 2 * norm.sf(abs(delta / np.sqrt(var)))


def test_midranks_give_tied_values_their_mean_rank():
    np.testing.assert_array_equal(midranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])), [4.0, 1.0, 4.0, 2.0, 4.0])


def test_delong_equals_the_direct_pairwise_implementation():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(30, 300))
        y = (rng.random(n) < rng.uniform(0.1, 0.5)).astype(float)
        a = np.round(y * rng.uniform(0, 1.5) + rng.normal(0, 1, n), 1)  # rounding makes ties
        b = np.round(0.7 * a + y * 0.3 + rng.normal(0, 1, n), 1)  # correlated with a
        got = delong(y, a, b)
        delta, p = _delong_direct(y, a, b)
        assert got["auc_a"] == pytest.approx(roc_auc_score(y, a), abs=1e-12)
        assert got["auc_b"] == pytest.approx(roc_auc_score(y, b), abs=1e-12)
        assert got["delta"] == pytest.approx(delta, abs=1e-12) and got["p_value"] == pytest.approx(p, rel=1e-9)


def test_delong_p_values_are_uniform_when_the_two_aucs_are_equal():
    """Two models with the same true AUC (the same signal, independent noise of equal size)."""
    rng = np.random.default_rng(1)
    p_values = []
    for _ in range(500):
        y = (rng.random(200) < 0.3).astype(float)
        signal = y + rng.normal(0, 1, 200)
        p_values.append(delong(y, signal + rng.normal(0, 0.7, 200), signal + rng.normal(0, 0.7, 200))["p_value"])
    p_values = np.array(p_values)
    assert 0.02 <= (p_values < 0.05).mean() <= 0.09
    assert kstest(p_values, "uniform").pvalue > 0.01


def test_candidate_as_reference_plus_noise_deltas_equal_scikit_learn_differences():
    rng = np.random.default_rng(2)
    n, patients = 1200, 120
    pid = np.sort(rng.integers(0, patients, n))
    labels = (rng.random((n, 6)) < 0.2).astype(float)
    reference = np.clip(0.4 * labels + 0.6 * rng.random((n, 6)), 0, 1)
    candidate = np.clip(reference + rng.normal(0, 0.1, (n, 6)), 0, 1)
    out = compare_predictions(labels, candidate, reference, pid, replicates=400, seed=3)
    assert out["n_images"] == n and out["n_patients"] == patients
    assert out["method"] == {"p_value": "Obuchowski 1997 clustered, paired", "ci": "paired patient bootstrap",
                             "replicates": 400, "level": 0.95, "seed": 3}
    for j, name in enumerate(SUBTYPES):
        c = out["classes"][name]
        expected = roc_auc_score(labels[:, j], candidate[:, j]) - roc_auc_score(labels[:, j], reference[:, j])
        assert c["delta"] == pytest.approx(expected, abs=1e-12)
        assert c["delta_ci"][0] <= c["delta"] <= c["delta_ci"][1]
        assert c["p_value"] == pytest.approx(clustered_auc_test(labels[:, j], candidate[:, j], reference[:, j],
                                                                pid)["p_value"])
    assert out["mean"]["delta"] == pytest.approx(np.mean([out["classes"][c]["delta"] for c in SUBTYPES]))
    same = compare_predictions(labels, reference, reference, pid, replicates=400, seed=3)
    assert same["mean"]["delta_ci"] == [0.0, 0.0]  # the same resample for both models: no spurious difference


def test_non_inferiority_rule():
    rng = np.random.default_rng(4)
    n = 2000
    pid = np.sort(rng.integers(0, 200, n))
    labels = (rng.random((n, 6)) < 0.3).astype(float)
    good = np.clip(0.5 * labels + 0.5 * rng.random((n, 6)), 0, 1)
    poor = np.clip(0.15 * labels + 0.85 * rng.random((n, 6)), 0, 1)
    better, why = non_inferior(compare_predictions(labels, good, poor, pid, 300), margin=0.005)
    assert better and "non-inferior" in why
    worse, why = non_inferior(compare_predictions(labels, poor, good, pid, 300), margin=0.005)
    assert not worse and "lower bound" in why
    one_class_worse = good.copy()
    one_class_worse[:, 1] = poor[:, 1]  # the mean barely moves, one class drops a lot
    comparison = compare_predictions(labels, one_class_worse, good, pid, 300)
    comparison["mean"]["delta_ci"] = [0.0, 0.01]  # as if the mean were fine
    ok, why = non_inferior(comparison, margin=0.005)
    assert not ok and "intraparenchymal" in why


def test_a_class_with_too_few_patients_has_no_interval_or_p_and_is_left_out_of_the_mean():
    rng = np.random.default_rng(5)
    pid = np.repeat(np.arange(150), 8)
    has = rng.random((150, 6)) < 0.3
    has[:, 0] = False
    has[:3, 0] = True  # epidural in 3 patients
    labels = has[pid].astype(float)
    reference = np.clip(0.4 * labels + 0.6 * rng.random(labels.shape), 0, 1)
    candidate = np.clip(reference + rng.normal(0, 0.1, labels.shape), 0, 1)
    out = compare_predictions(labels, candidate, reference, pid, replicates=200, seed=0)
    epidural = out["classes"]["epidural"]
    assert epidural["delta"] is not None and epidural["delta_ci"] is None and epidural["p_value"] is None
    assert epidural["positive_groups"] == 3 and "3 positive patients" in epidural["interval_note"]
    assert out["mean"]["classes"] == list(SUBTYPES[1:])
    assert out["mean"]["delta"] == pytest.approx(np.mean([out["classes"][c]["delta"] for c in SUBTYPES[1:]]))
    from medmoco.comparison import markdown
    assert "epidural: 3 positive patients" in markdown(out)
