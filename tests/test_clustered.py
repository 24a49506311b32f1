"""Obuchowski's clustered AUC variance: DeLong's on independent slices, a test of equal AUCs that
keeps its level on clustered slices where DeLong's does not."""
import numpy as np
import pytest

from medmoco.clustered import clustered_auc_covariance, clustered_auc_test
from medmoco.comparison import delong


def _two_models_equal_auc(rng, patients=60, d=1.0):
    """10-40 slices per patient; a bleeding patient's slices are positive where the bleed is (60%
    of them), so clusters hold positives and negatives; each model has its own patient effect (its
    errors on a patient's slices are correlated) and the same expected AUC."""
    sizes = rng.integers(10, 41, patients)
    pid = np.repeat(np.arange(patients), sizes)
    y = (np.repeat(rng.random(patients) < 0.4, sizes) & (rng.random(len(pid)) < 0.6)).astype(float)
    y[np.repeat(np.arange(patients), sizes) == 0] = 1.0  # surely one positive patient
    y[np.repeat(np.arange(patients), sizes) == 1] = 0.0  # and one negative
    shared = rng.normal(0, 0.5, patients)[pid]
    a = d * y + shared + rng.normal(0, 1.0, patients)[pid] + rng.normal(0, 0.3, len(pid))
    b = d * y + shared + rng.normal(0, 1.0, patients)[pid] + rng.normal(0, 0.3, len(pid))
    return y, a, b, pid


def test_with_one_slice_per_cluster_it_is_delongs_variance():
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.3).astype(float)
    a, b = y + rng.normal(0, 1, 300), 0.5 * y + rng.normal(0, 1, 300)
    a = np.round(a, 1)  # ties
    ours = clustered_auc_test(y, a, b, np.arange(300))
    theirs = delong(y, a, b)
    for key in ("auc_a", "auc_b", "delta", "se", "p_value"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-10), key


def test_variance_matches_the_spread_of_the_auc_over_clustered_draws():
    rng = np.random.default_rng(1)
    aucs, variances = [], []
    for _ in range(300):
        y, a, _, pid = _two_models_equal_auc(rng)
        result = clustered_auc_covariance(y, a, pid)
        aucs.append(result["auc"][0])
        variances.append(result["covariance"][0, 0])
    assert np.mean(variances) == pytest.approx(np.var(aucs), rel=0.25)


def test_type_one_error_is_near_its_level_on_clustered_slices_and_delongs_is_not():
    rng = np.random.default_rng(2)
    rejected = {"clustered": [], "delong": []}
    for _ in range(300):
        y, a, b, pid = _two_models_equal_auc(rng)
        rejected["clustered"].append(clustered_auc_test(y, a, b, pid)["p_value"] < 0.05)
        rejected["delong"].append(delong(y, a, b)["p_value"] < 0.05)
    rate = {k: float(np.mean(v)) for k, v in rejected.items()}
    assert 0.02 <= rate["clustered"] <= 0.09, rate  # 0.05 nominal; 300 draws: +-0.025 is 2 SE
    assert rate["delong"] > 0.3, rate  # slices taken as independent: far too confident


def test_undefined_without_two_clusters_of_each_kind():
    y = np.array([1, 1, 0, 0, 0.0])
    assert clustered_auc_test(y, np.arange(5.0), np.arange(5.0)[::-1], ["p", "p", "q", "r", "r"])["p_value"] is None


def test_equals_obuchowskis_formula_computed_pair_by_pair():
    # the paper's sums written out literally, on a small clustered set with mixed clusters and ties
    rng = np.random.default_rng(3)
    y, a, b, pid = _two_models_equal_auc(rng, patients=8)
    a, b = np.round(a, 1), np.round(b, 1)
    pos, neg = np.flatnonzero(y > 0.5), np.flatnonzero(y < 0.5)
    M, N, clusters = len(pos), len(neg), np.unique(pid)

    def parts(s):
        psi = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        auc = psi.mean()
        v10 = np.array([psi[pid[pos] == i].sum() / N for i in clusters])
        v01 = np.array([psi[:, pid[neg] == i].sum() / M for i in clusters])
        m_i = np.array([(pid[pos] == i).sum() for i in clusters])
        n_i = np.array([(pid[neg] == i).sum() for i in clusters])
        return auc, v10 - m_i * auc, v01 - n_i * auc, (m_i > 0).sum(), (n_i > 0).sum()

    (auc_a, a10, a01, i10, i01), (auc_b, b10, b01, _, _) = parts(a), parts(b)
    big_i = len(clusters)

    def cov(x10, x01, z10, z01):
        s10 = i10 / ((i10 - 1) * M) * (x10 * z10).sum()
        s01 = i01 / ((i01 - 1) * N) * (x01 * z01).sum()
        s11 = big_i / (big_i - 1) * ((x10 * z01).sum() + (z10 * x01).sum())
        return s10 / M + s01 / N + s11 / (M * N)

    expected = cov(a10, a01, a10, a01) + cov(b10, b01, b10, b01) - 2 * cov(a10, a01, b10, b01)
    result = clustered_auc_test(y, a, b, pid)
    assert result["auc_a"] == pytest.approx(auc_a, abs=1e-12) and result["auc_b"] == pytest.approx(auc_b, abs=1e-12)
    assert result["se"] ** 2 == pytest.approx(expected, rel=1e-10)
