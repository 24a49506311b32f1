"""Statistics of a split (medmoco.bootstrap, medmoco.metrics, medmoco.evaluation) against direct
implementations and data with a known answer."""
import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from dicom_preprocess import SUBTYPES
from medmoco.bootstrap import PatientBootstrap, _auc_by_patient_pairs, _auc_by_tie_groups
from medmoco.evaluation import choose_thresholds, evaluate_split, flat_metrics, markdown_table
from medmoco.metrics import brier_score, expected_calibration_error, operating_point, threshold_for_sensitivity


def _clustered(rng, patients=60, slices=8, d=1.0, sd_patient=1.0, sd_slice=1.0, positive_rate=0.4):
    """Patient-level labels, a shared random effect per patient: slices of one patient are
    correlated. Positive and negative slices never share a patient, so every sample AUC estimates
    the population AUC Phi(d / sqrt(2 (sd_patient^2 + sd_slice^2)))."""
    label = (rng.random(patients) < positive_rate).astype(float)
    effect = rng.normal(0, sd_patient, patients)
    pid = np.repeat(np.arange(patients), slices)
    y = label[pid]
    score = d * y + effect[pid] + rng.normal(0, sd_slice, len(pid))
    return y, score, pid, float(norm.cdf(d / np.sqrt(2 * (sd_patient ** 2 + sd_slice ** 2))))


def _materialised(codes, counts_row):
    """The slice indices of one replicate, each slice repeated as often as its patient was drawn."""
    return np.concatenate([np.flatnonzero(codes == q).repeat(int(c)) for q, c in enumerate(counts_row) if c])


def test_replicate_auc_equals_scikit_learn_on_the_materialised_resample():
    rng = np.random.default_rng(0)
    y, score, pid, _ = _clustered(rng)
    score = np.round(score, 1)  # ties count one half
    y = np.where(rng.random(len(y)) < 0.2, 1 - y, y)  # positives and negatives inside patients too
    boot = PatientBootstrap(pid, replicates=40, seed=3)
    pairs = _auc_by_patient_pairs(y, score, boot.codes, boot.counts)
    groups = _auc_by_tie_groups(y, score, boot.codes, boot.counts, block=7)
    for r in range(40):
        idx = _materialised(boot.codes, boot.counts[r])
        assert pairs[r] == pytest.approx(roc_auc_score(y[idx], score[idx]), abs=1e-12)
        assert groups[r] == pytest.approx(pairs[r], abs=1e-12)
    ones = PatientBootstrap(pid, replicates=1, seed=0)
    ones.counts[:] = 1
    assert ones.auc(y, score)[0] == pytest.approx(roc_auc_score(y, score), abs=1e-12)


def test_patient_bootstrap_interval_covers_a_known_auc_in_most_draws():
    rng = np.random.default_rng(1)
    covered = {"patient": [], "slice": []}
    for draw in range(200):
        y, score, pid, truth = _clustered(rng)
        for unit, units in (("patient", pid), ("slice", np.arange(len(pid)))):
            boot = PatientBootstrap(units, replicates=400, seed=draw)
            lo, hi = boot.interval(boot.auc(y, score))
            covered[unit].append(lo <= truth <= hi)
    coverage = {unit: float(np.mean(hits)) for unit, hits in covered.items()}
    assert 0.88 <= coverage["patient"] <= 0.99, coverage  # nominal 0.95; percentile intervals run slightly low
    assert coverage["slice"] < 0.8, coverage  # resampling correlated slices: far too narrow


def test_patient_intervals_stay_wide_when_slices_are_duplicated_and_slice_intervals_do_not():
    rng = np.random.default_rng(2)
    y, score, pid, _ = _clustered(rng, patients=80, slices=1)
    reps = 10  # every slice ten times: no new information
    y10, score10, pid10 = np.repeat(y, reps), np.repeat(score, reps), np.repeat(pid, reps)

    def width(units, yy, ss):
        boot = PatientBootstrap(units, replicates=1000, seed=0)
        lo, hi = boot.interval(boot.auc(yy, ss))
        return hi - lo

    original = width(pid, y, score)
    patient = width(pid10, y10, score10)
    slices = width(np.arange(len(y10)), y10, score10)
    assert patient == pytest.approx(original, rel=0.25)
    assert patient > 2.0 * slices  # a slice-level bootstrap is ~sqrt(10) too narrow here


def test_ratio_and_mean_equal_the_materialised_resample():
    rng = np.random.default_rng(3)
    pid = rng.integers(0, 30, 300)
    values, y = rng.random(300), (rng.random(300) < 0.3).astype(float)
    boot = PatientBootstrap(pid, replicates=20, seed=5)
    means, sens = boot.ratio(values, np.ones(300)), boot.ratio((values > 0.5) * y, y)
    for r in range(20):
        idx = _materialised(boot.codes, boot.counts[r])
        assert means[r] == pytest.approx(values[idx].mean(), abs=1e-12)
        assert sens[r] == pytest.approx(((values[idx] > 0.5) & (y[idx] > 0)).sum() / y[idx].sum(), abs=1e-12)


def test_calibration_and_operating_points_against_direct_loops():
    rng = np.random.default_rng(4)
    p = rng.random(500)
    y = (rng.random(500) < p).astype(float)  # calibrated by construction
    ece = 0.0
    for b in range(15):
        inside = [(pi, yi) for pi, yi in zip(p, y) if min(int(pi * 15), 14) == b]
        if inside:
            ece += len(inside) / 500 * abs(np.mean([v for _, v in inside]) - np.mean([q for q, _ in inside]))
    assert expected_calibration_error(y, p) == pytest.approx(ece, abs=1e-12)
    assert expected_calibration_error(y, p) < 0.08
    assert expected_calibration_error(y, y) == 0.0 and brier_score(y, y) == 0.0
    assert brier_score(y, p) == pytest.approx(np.mean((p - y) ** 2))
    for target in (0.5, 0.9, 1.0):
        t = threshold_for_sensitivity(y, p, target)
        point = operating_point(y, p, t)
        assert point["sensitivity"] >= target
        assert operating_point(y, p, np.nextafter(t, 1.0))["sensitivity"] < target  # the highest such threshold
        called = p >= t
        assert point["specificity"] == pytest.approx(((~called) & (y == 0)).sum() / (y == 0).sum())
        assert point["ppv"] == pytest.approx((called & (y == 1)).sum() / called.sum())
    assert threshold_for_sensitivity(np.zeros(5), p[:5], 0.9) is None


def test_evaluate_split_reports_intervals_and_null_for_a_class_without_positives():
    rng = np.random.default_rng(5)
    n = 600
    pid = rng.integers(0, 50, n)
    labels = (rng.random((n, 6)) < 0.25).astype(float)
    labels[:, 0] = 0  # no epidural positives in this split
    probs = np.clip(0.35 * labels + 0.65 * rng.random((n, 6)), 0, 1)
    thresholds = choose_thresholds(labels, probs, 0.9)
    assert "epidural" not in thresholds and set(thresholds) == set(SUBTYPES[1:])
    out = evaluate_split(labels, probs, pid, thresholds, replicates=300, seed=1)
    assert out["n_images"] == n and out["n_patients"] == len(set(pid))
    assert out["bootstrap"] == {"unit": "patient, else study", "replicates": 300, "level": 0.95, "seed": 1}
    assert out["auc_mean_classes"] == list(SUBTYPES[1:]) and out["auc_mean_replicates"] == 300
    epidural = out["classes"]["epidural"]
    assert epidural["auc"] is None and epidural["auc_ci"] is None and "no AUC" in epidural["note"]
    for name in SUBTYPES[1:]:
        entry = out["classes"][name]
        assert entry["auc"] == pytest.approx(roc_auc_score(labels[:, SUBTYPES.index(name)], probs[:, SUBTYPES.index(name)]))
        assert entry["auc_ci"][0] <= entry["auc"] <= entry["auc_ci"][1]
        assert entry["sensitivity"] >= 0.9 and entry["sensitivity_ci"][0] <= entry["sensitivity"] <= entry["sensitivity_ci"][1]
        for key in ("ap", "ap_ci", "ece", "brier", "specificity", "ppv", "ppv_ci", "npv", "npv_ci", "threshold",
                    "calibration_slope", "calibration_intercept"):
            assert entry[key] is not None, (name, key)
    assert out["auc_mean"] == pytest.approx(np.mean([out["classes"][c]["auc"] for c in SUBTYPES[1:]]))
    assert out["auc_mean_ci"][0] <= out["auc_mean"] <= out["auc_mean_ci"][1]
    assert out["weighted_logloss_ci"][0] <= out["weighted_logloss"] <= out["weighted_logloss_ci"][1]
    flat = flat_metrics(out, "test")
    assert "test_auc_any_ci_low" in flat and "test_auc_epidural" not in flat and "test_auc_mean_ci_high" in flat
    table = markdown_table(out)
    assert "| epidural | n/a | n/a |" in table and "95% CI" in table
    same = evaluate_split(labels, probs, pid, thresholds, replicates=300, seed=1)
    assert same["auc_mean_ci"] == out["auc_mean_ci"]  # a seed gives the same interval


def test_paired_differences_are_a_t_interval_over_seed_paired_trials():
    from scipy import stats

    from medmoco.label_efficiency import paired_differences

    rng = np.random.default_rng(6)
    results = []
    for mode, shift in (("scratch", 0.0), ("finetune", 0.05)):
        for trial in range(5):
            results.append({"mode": mode, "label_fraction": 0.2, "trial": trial,
                            "auc_mean": 0.7 + shift + 0.01 * trial + 0.005 * rng.random()})
    diff = paired_differences(results).iloc[0]
    d = np.array([r["auc_mean"] for r in results if r["mode"] == "finetune"]) - \
        np.array([r["auc_mean"] for r in results if r["mode"] == "scratch"])
    half = stats.t.ppf(0.975, 4) * d.std(ddof=1) / np.sqrt(5)
    assert diff["pairs"] == 5 and diff["delta_auc_mean"] == pytest.approx(d.mean())
    assert diff["delta_ci_low"] == pytest.approx(d.mean() - half) and diff["delta_ci_high"] == pytest.approx(d.mean() + half)


def test_replicate_average_precision_equals_scikit_learn_on_the_materialised_resample():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(5)
    y, score, pid, _ = _clustered(rng)
    score = np.round(score, 1)  # tie groups enter at once
    y = np.where(rng.random(len(y)) < 0.2, 1 - y, y)
    boot = PatientBootstrap(pid, replicates=30, seed=2)
    ap = boot.average_precision(y, score, block=7)
    for r in range(30):
        idx = _materialised(boot.codes, boot.counts[r])
        assert ap[r] == pytest.approx(average_precision_score(y[idx], score[idx]), abs=1e-12)


def test_calibration_slope_and_intercept_recover_a_known_miscalibration():
    from medmoco.metrics import calibration_slope_intercept

    rng = np.random.default_rng(6)
    logit_p = rng.normal(-1.0, 1.5, 200_000)
    p = 1 / (1 + np.exp(-logit_p))
    # the truth is less extreme than the model says: slope 0.6, intercept -0.3 on top
    y = (rng.random(len(p)) < 1 / (1 + np.exp(-(-0.3 + 0.6 * logit_p)))).astype(float)
    fit = calibration_slope_intercept(y, p)
    assert fit["calibration_slope"] == pytest.approx(0.6, abs=0.02)
    from scipy.optimize import brentq  # the intercept solves its score equation sum(y - expit(a + logit p)) = 0
    root = brentq(lambda a: float(np.sum(y - 1 / (1 + np.exp(-(a + logit_p))))), -5, 5, xtol=1e-12)
    assert fit["calibration_intercept"] == pytest.approx(root, abs=1e-6) and root < -0.05
    well = (rng.random(len(p)) < p).astype(float)
    fit = calibration_slope_intercept(well, p)
    assert fit["calibration_slope"] == pytest.approx(1.0, abs=0.02)
    assert fit["calibration_intercept"] == pytest.approx(0.0, abs=0.02)
    assert calibration_slope_intercept(np.zeros(10), np.full(10, 0.2))["calibration_slope"] is None


def test_intervals_are_withheld_for_a_class_with_too_few_patients_and_the_mean_set_is_fixed():
    # 200 patients; epidural bleeds in 4 of them: its AUC is reported, its intervals are not
    rng = np.random.default_rng(7)
    patients, slices = 200, 6
    pid = np.repeat(np.arange(patients), slices)
    has = rng.random((patients, 6)) < 0.3
    has[:, 0] = False
    has[:4, 0] = True
    labels = has[pid].astype(float)
    probs = np.clip(0.3 * labels + 0.7 * rng.random(labels.shape), 0, 1)
    thresholds = choose_thresholds(labels, probs, 0.9)
    out = evaluate_split(labels, probs, pid, thresholds, replicates=200, seed=0)
    epidural = out["classes"]["epidural"]
    assert epidural["positive_groups"] == 4 and epidural["negative_groups"] == 196 and epidural["positives"] == 24
    assert epidural["auc"] is not None and epidural["npv"] is not None
    for key in ("auc_ci", "ap_ci", "sensitivity_ci", "specificity_ci", "ppv_ci", "npv_ci"):
        assert epidural[key] is None, key
    assert epidural["interval_note"] == "4 positive patients (fewer than 10): interval withheld"
    assert out["classes"]["subdural"]["auc_ci"] is not None and "interval_note" not in out["classes"]["subdural"]
    assert out["auc_mean_ci"] is None and "epidural" in out["auc_mean_classes"]  # the set is fixed: no interval
    assert "withheld" in markdown_table(out) and any("4 positive" in n for n in out["notes"])
    lowered = evaluate_split(labels, probs, pid, thresholds, replicates=200, seed=0, min_groups=4)
    assert lowered["classes"]["epidural"]["auc_ci"] is not None and lowered["auc_mean_ci"] is not None
    # a sensitivity of 1 gets an interval that leaves 1 (a percentile bootstrap's would be [1, 1])
    called = lowered["classes"]["epidural"]
    assert called["sensitivity"] < 1 or called["sensitivity_ci"][0] < 1.0
    assert lowered["auc_mean_replicates"] < 200  # replicates without an epidural patient are left out, counted


def _label_efficiency_draw(rng, patients=40, slices=5, trials=5):
    """Two modes with the same true AUCs: each has its own errors on each patient, shared by its
    seeds (a model's mistakes on a patient do not change much with the seed), plus small seed noise."""
    pid = np.repeat(np.arange(patients), slices)
    labels = (rng.random((patients, 6)) < 0.35)[pid].astype(float)
    out = []
    for mode in ("scratch", "finetune"):
        patient_error = rng.normal(0, 1.0, (patients, 6))[pid]
        for trial in range(trials):
            logit = 1.2 * labels + patient_error + rng.normal(0, 0.1, (patients, 6))[pid] + \
                rng.normal(0, 0.3, labels.shape)
            out.append({"mode": mode, "label_fraction": 0.2, "trial": trial, "labels": labels,
                        "probs": 1 / (1 + np.exp(-logit)), "groups": pid})
    return out


def test_label_efficiency_interval_over_patients_and_seeds_covers_a_null_difference():
    from medmoco.label_efficiency import paired_differences, patient_seed_bootstrap
    from medmoco.metrics import per_class_auc

    rng = np.random.default_rng(8)
    covered = {"patients and seeds": [], "seeds only": []}
    for draw in range(60):
        trials = _label_efficiency_draw(rng)
        row = patient_seed_bootstrap(trials, replicates=200, seed=draw).iloc[0]
        covered["patients and seeds"].append(row["delta_ci_low"] <= 0.0 <= row["delta_ci_high"])
        records = [{"mode": t["mode"], "label_fraction": 0.2, "trial": t["trial"],
                    "auc_mean": per_class_auc(t["labels"], t["probs"])["mean"]} for t in trials]
        seeds = paired_differences(records).iloc[0]
        assert seeds["delta_auc_mean"] == pytest.approx(row["delta_auc_mean"])  # same point estimate
        covered["seeds only"].append(seeds["delta_ci_low"] <= 0.0 <= seeds["delta_ci_high"])
    coverage = {k: float(np.mean(v)) for k, v in covered.items()}
    assert coverage["patients and seeds"] >= 0.85, coverage  # nominal 0.95
    assert coverage["seeds only"] < 0.5, coverage  # the test split's patients held fixed: far too narrow
