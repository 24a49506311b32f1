"""Hemorrhage metrics: per-class ROC AUC, the RSNA weighted log loss, per-class average precision.

AUC comes from MONAI's ``compute_roc_auc`` with ``average="none"`` (what ``ROCAUCMetric``
computes; MONAI's ignite ``ROCAUC`` handler reports only one number, so it is not used). A class
with a single label value has no AUC: NaN, left out of the mean. Inputs are the full
predictions of a split, already gathered from every rank.

The competition metric is a weighted multi-label log loss: per image the weighted mean over the six
subtypes of the binary cross-entropy, ``any`` weighted 2 and the others 1, with probabilities
clipped to [1e-7, 1 - 1e-7] (REFERENCE.md section 2), averaged over images.
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


def weighted_log_loss(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray = RSNA_WEIGHTS) -> float:
    p = np.clip(probs.astype(np.float64), EPS, 1.0 - EPS)
    y = labels.astype(np.float64)
    per_class = -(y * np.log(p) + (1.0 - y) * np.log(1.0 - p))
    return float(np.mean((per_class * weights).sum(axis=1) / weights.sum()))


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


def metrics_table(metrics: dict) -> list[dict]:
    """Rows ``{class, auc, ap}`` for the six subtypes and the mean, for CSV/Markdown reports."""
    rows = [{"class": c, "auc": metrics[f"auc_{c}"], "ap": metrics[f"ap_{c}"]} for c in SUBTYPES]
    aps = [metrics[f"ap_{c}"] for c in SUBTYPES if not np.isnan(metrics[f"ap_{c}"])]
    rows.append({"class": "mean", "auc": metrics["auc_mean"], "ap": float(np.mean(aps)) if aps else float("nan")})
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| class | AUC | AP |", "|---|---|---|"]
    lines += [f"| {r['class']} | {r['auc']:.4f} | {r['ap']:.4f} |" for r in rows]
    return "\n".join(lines) + "\n"
