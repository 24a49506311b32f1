"""Hemorrhage metrics: per-class ROC AUC, the RSNA weighted log loss, per-class average precision,
calibration (ECE, Brier) and operating points.

AUC comes from MONAI's ``compute_roc_auc`` with ``average="none"`` (what ``ROCAUCMetric``
computes; MONAI's ignite ``ROCAUC`` handler reports only one number, so it is not used). A class
with a single label value has no AUC: NaN, left out of the mean. Inputs are the full
predictions of a split, already gathered from every rank.

The competition metric is a weighted multi-label log loss: per image the weighted mean over the six
subtypes of the binary cross-entropy, ``any`` weighted 2 and the others 1, with probabilities
clipped to [1e-7, 1 - 1e-7] (the RSNA 2019 competition's evaluation), averaged over images.
"""
from __future__ import annotations

import warnings

import numpy as np

from dicom_preprocess import SUBTYPES

RSNA_WEIGHTS = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 2.0])  # SUBTYPES order: any is last
EPS = 1e-7


def per_class_auc(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """``{subtype: AUC}`` plus ``mean`` (NaN-mean over the classes that have both label values)."""
    import torch
    from monai.metrics import compute_roc_auc
    from monai.utils import Average

    out = {}
    for j, name in enumerate(SUBTYPES):
        y = labels[:, j]
        if 0 < y.sum() < len(y):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[name] = float(compute_roc_auc(torch.as_tensor(probs[:, j], dtype=torch.float64),
                                                  torch.as_tensor(y), average=Average.NONE))
        else:
            out[name] = float("nan")
    values = [v for v in out.values() if not np.isnan(v)]
    out["mean"] = float(np.mean(values)) if values else float("nan")
    return out


def slice_log_loss(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray = RSNA_WEIGHTS) -> np.ndarray:
    """Each slice's weighted log loss over the six subtypes (N,); its mean is the competition metric."""
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1.0 - EPS)
    y = np.asarray(labels, dtype=np.float64)
    per_class = -(y * np.log(p) + (1.0 - y) * np.log(1.0 - p))
    return (per_class * weights).sum(axis=1) / weights.sum()


def weighted_log_loss(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray = RSNA_WEIGHTS) -> float:
    return float(np.mean(slice_log_loss(labels, probs, weights)))


def per_class_ap(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import average_precision_score

    out = {}
    for j, name in enumerate(SUBTYPES):
        y = labels[:, j]
        out[name] = float(average_precision_score(y, probs[:, j])) if y.sum() > 0 else float("nan")
    return out


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    """All metrics of a split as one flat dict: ``auc_<class>``, ``auc_mean``, ``weighted_logloss``, ``ap_<class>``."""
    auc = per_class_auc(labels, probs)
    ap = per_class_ap(labels, probs)
    out = {f"auc_{k}": v for k, v in auc.items()}
    out["weighted_logloss"] = weighted_log_loss(labels, probs)
    out.update({f"ap_{k}": v for k, v in ap.items()})
    out["n_images"] = int(len(labels))
    return out


# --- calibration and operating points ----------------------------------------------------------

ECE_BINS = 15


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE over ``bins`` equal-width probability bins: ``sum_b n_b / N |mean(y_b) - mean(p_b)|``
    (a probability of exactly 1 falls in the last bin)."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    if len(y) == 0:
        return float("nan")
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    gap = np.abs(np.bincount(which, weights=y, minlength=bins) - np.bincount(which, weights=p, minlength=bins))
    return float(gap.sum() / len(y))


def brier_score(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean squared error of the probability."""
    y = np.asarray(labels, dtype=np.float64)
    return float(np.mean((np.asarray(probs, dtype=np.float64) - y) ** 2)) if len(y) else float("nan")


def threshold_for_sensitivity(labels: np.ndarray, probs: np.ndarray, target: float) -> float | None:
    """The highest threshold ``t`` (positive when ``p >= t``) whose sensitivity reaches ``target``:
    the ``ceil(target x positives)``-th largest score of the positives. None without positives."""
    scores = np.sort(np.asarray(probs, dtype=np.float64)[np.asarray(labels) > 0.5])[::-1]
    if len(scores) == 0:
        return None
    k = max(1, int(np.ceil(target * len(scores) - 1e-9)))
    return float(scores[k - 1])


def operating_point(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict:
    """Sensitivity, specificity, PPV and NPV at ``p >= threshold`` (None where undefined)."""
    y = np.asarray(labels) > 0.5
    called = np.asarray(probs, dtype=np.float64) >= threshold
    tp, fp = int((called & y).sum()), int((called & ~y).sum())
    pos, neg = int(y.sum()), int((~y).sum())
    fn, tn = pos - tp, neg - fp
    return {"sensitivity": tp / pos if pos else None, "specificity": tn / neg if neg else None,
            "ppv": tp / (tp + fp) if tp + fp else None, "npv": tn / (tn + fn) if tn + fn else None}


def calibration_slope_intercept(labels: np.ndarray, probs: np.ndarray) -> dict:
    """Logistic recalibration (Cox 1958; as reported per Van Calster et al. 2016, J Clin Epidemiol
    74:167, and 2019, BMC Med 17:230): with ``o = logit(p)`` (p clipped to [1e-7, 1 - 1e-7]),

    * ``calibration_intercept``: ``a`` of ``logit P(y = 1) = a + o`` (``o`` an offset): calibration
      in the large, 0 when the mean risk is right, negative when risks are too high;
    * ``calibration_slope``: ``b`` of ``logit P(y = 1) = c + b o``: 1 when risks are neither too
      extreme (``b < 1``) nor too moderate (``b > 1``).

    Maximum likelihood by Newton's method with step halving. Both None when the labels have one
    value, or the fit does not converge (separation: the slope runs off to infinity)."""
    y = np.asarray(labels, dtype=np.float64)
    out = {"calibration_intercept": None, "calibration_slope": None}
    if not 0 < y.sum() < len(y):
        return out
    o = np.log(np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)) - np.log1p(-np.clip(
        np.asarray(probs, dtype=np.float64), EPS, 1 - EPS))
    intercept = _logistic_fit(y, np.ones((len(y), 1)), o)
    both = _logistic_fit(y, np.column_stack([np.ones(len(y)), o]), np.zeros(len(y)))
    out["calibration_intercept"] = None if intercept is None else float(intercept[0])
    out["calibration_slope"] = None if both is None else float(both[1])
    return out


def _log_likelihood(y: np.ndarray, eta: np.ndarray) -> float:
    return float(np.sum(y * eta - np.logaddexp(0.0, eta)))


def _logistic_fit(y: np.ndarray, x: np.ndarray, offset: np.ndarray, iterations: int = 100,
                  tolerance: float = 1e-10) -> np.ndarray | None:
    from scipy.special import expit

    beta = np.zeros(x.shape[1])
    current = _log_likelihood(y, offset)
    for _ in range(iterations):
        eta = offset + x @ beta
        mu = expit(eta)  # stable where eta is large (a collapsed model's logits): 1 / (1 + exp(-eta)) overflows
        gradient = x.T @ (y - mu)
        hessian = (x * (mu * (1 - mu))[:, None]).T @ x
        try:
            step = np.linalg.solve(hessian, gradient)
        except np.linalg.LinAlgError:
            return None
        scale = 1.0
        while scale > 1e-8:
            candidate = beta + scale * step
            value = _log_likelihood(y, offset + x @ candidate)
            if value >= current - 1e-12:
                break
            scale /= 2
        beta, gain, current = candidate, value - current, value
        if abs(gain) < tolerance and np.max(np.abs(scale * step)) < 1e-7:
            return beta if np.all(np.abs(beta) < 1e3) else None
    return None
