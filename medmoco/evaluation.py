"""The evaluation of a split a clinical reviewer reads: figures with patient-level intervals,
calibration, and operating points fixed before the split was seen.

:func:`evaluate_split` returns the ``metrics.json`` of `medmoco evaluate` and of the end of
`medmoco finetune`::

    n_images, n_patients, auc_mean, auc_mean_ci, weighted_logloss, weighted_logloss_ci,
    classes: {<class>: {auc, auc_ci, ap, ece, brier, threshold, sensitivity, sensitivity_ci,
                        specificity, specificity_ci, ppv, positives, note?}},
    bootstrap: {unit: patient, replicates, level, seed},
    auc_<class>, ap_<class> (the flat keys of earlier versions), notes

Intervals are percentile intervals of :class:`medmoco.bootstrap.PatientBootstrap`. The mean AUC
of a replicate is the mean over the classes that have an AUC on the whole split (a class whose
replicate lacks positives is left out of that replicate's mean). A class with no positive or no
negative slice has ``null`` figures and a note. ``threshold`` comes from the model (chosen on the
validation split for a target sensitivity); without one the operating point is ``null``.
"""
from __future__ import annotations

import numpy as np

from dicom_preprocess import SUBTYPES
from dicom_preprocess.splits import GROUP_UNIT

from .bootstrap import PatientBootstrap, percentile_interval
from .metrics import (ECE_BINS, brier_score, expected_calibration_error, operating_point, per_class_ap,
                      per_class_auc, slice_log_loss)


def _number(value) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def evaluate_split(labels: np.ndarray, probs: np.ndarray, patients, thresholds: dict | None = None,
                   replicates: int = 2000, level: float = 0.95, seed: int = 0, unit: str = GROUP_UNIT) -> dict:
    """Point figures, patient-bootstrap intervals, calibration and operating points of one split.

    Args:
        labels, probs: (N, 6) in :data:`SUBTYPES` order.
        patients: the grouping unit of each slice (N,): ``CTCache.groups(rows)``, the unit the
            splits kept together (patient, else study).
        unit: what ``patients`` holds, recorded in ``bootstrap.unit``.
        thresholds: ``{class: threshold}`` fixed beforehand (on validation), or None.
    """
    labels = np.asarray(labels, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    boot = PatientBootstrap(patients, replicates, seed)
    auc = per_class_auc(labels, probs)
    ap = per_class_ap(labels, probs)
    losses = slice_log_loss(labels, probs)
    out = {"n_images": int(len(labels)), "n_patients": int(boot.n_patients),
           "weighted_logloss": float(losses.mean()) if len(losses) else None,
           "weighted_logloss_ci": percentile_interval(boot.ratio(losses, np.ones_like(losses)), level),
           "classes": {}, "notes": [],
           "bootstrap": {"unit": unit, "replicates": int(replicates), "level": float(level), "seed": int(seed)}}
    replicate_aucs = []
    for j, name in enumerate(SUBTYPES):
        y, p = labels[:, j], probs[:, j]
        positives = int(y.sum())
        entry = {"auc": None, "auc_ci": None, "ap": _number(ap[name]), "ece": None, "brier": None,
                 "threshold": None, "sensitivity": None, "sensitivity_ci": None, "specificity": None,
                 "specificity_ci": None, "ppv": None, "positives": positives}
        if len(y):
            entry["ece"] = expected_calibration_error(y, p, ECE_BINS)
            entry["brier"] = brier_score(y, p)
        if 0 < positives < len(y):
            aucs = boot.auc(y, p)
            replicate_aucs.append(aucs)
            entry["auc"] = _number(auc[name])
            entry["auc_ci"] = percentile_interval(aucs, level)
        else:
            entry["note"] = (f"{positives} positive and {len(y) - positives} negative slices: no AUC, and no "
                             "sensitivity or specificity where a side is empty")
            out["notes"].append(f"{name}: {entry['note']}")
        threshold = (thresholds or {}).get(name)
        if threshold is not None:
            called = (p >= threshold).astype(np.float64)
            point = operating_point(y, p, threshold)
            entry.update({"threshold": float(threshold), **point})
            if point["sensitivity"] is not None:
                entry["sensitivity_ci"] = percentile_interval(boot.ratio(called * y, y), level)
            if point["specificity"] is not None:
                entry["specificity_ci"] = percentile_interval(boot.ratio((1 - called) * (1 - y), 1 - y), level)
        out["classes"][name] = entry
    if thresholds is None:
        out["notes"].append("the model has no operating points (thresholds chosen on validation): "
                            "sensitivity and specificity are not reported")
    out["auc_mean"] = _number(auc["mean"])
    if replicate_aucs:
        with np.errstate(invalid="ignore"), _quiet_nanmean():
            out["auc_mean_ci"] = percentile_interval(np.nanmean(np.stack(replicate_aucs), axis=0), level)
    else:
        out["auc_mean_ci"] = None
    # flat keys, as earlier metrics.json files had them
    for name in SUBTYPES:
        out[f"auc_{name}"] = _number(auc[name])
        out[f"ap_{name}"] = _number(ap[name])
    return out


class _quiet_nanmean:
    """nanmean of an all-NaN column warns; such a replicate simply has no mean AUC."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)


def flat_metrics(evaluation: dict, prefix: str) -> dict:
    """The figures of :func:`evaluate_split` as MLflow metrics: ``<prefix>_auc_<class>``,
    ``<prefix>_auc_<class>_ci_low/_ci_high``, the same for the mean and the log loss, and per class
    ECE, Brier, sensitivity and specificity (None values left out)."""
    out = {f"{prefix}_auc_mean": evaluation["auc_mean"], f"{prefix}_weighted_logloss": evaluation["weighted_logloss"]}
    for key, ci in (("auc_mean", evaluation["auc_mean_ci"]), ("weighted_logloss", evaluation["weighted_logloss_ci"])):
        if ci:
            out[f"{prefix}_{key}_ci_low"], out[f"{prefix}_{key}_ci_high"] = ci
    for name, entry in evaluation["classes"].items():
        out[f"{prefix}_auc_{name}"] = entry["auc"]
        if entry["auc_ci"]:
            out[f"{prefix}_auc_{name}_ci_low"], out[f"{prefix}_auc_{name}_ci_high"] = entry["auc_ci"]
        for key in ("ap", "ece", "brier", "sensitivity", "specificity", "ppv"):
            out[f"{prefix}_{key}_{name}"] = entry[key]
    return {k: v for k, v in out.items() if v is not None}


def markdown_table(evaluation: dict) -> str:
    """The per-class table a reviewer reads (AUC with interval, AP, calibration, operating point)."""
    level = int(round(100 * evaluation["bootstrap"]["level"]))

    def num(value, digits=3):
        return "—" if value is None else f"{value:.{digits}f}"

    def ci(pair):
        return "" if not pair else f" [{pair[0]:.3f}, {pair[1]:.3f}]"

    lines = [f"| class | positives | AUC [{level}% CI] | AP | ECE | Brier | threshold | sensitivity [{level}% CI] | "
             f"specificity [{level}% CI] | PPV |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in evaluation["classes"].items():
        lines.append(f"| {name} | {e['positives']} | {num(e['auc'])}{ci(e['auc_ci'])} | {num(e['ap'])} | "
                     f"{num(e['ece'])} | {num(e['brier'])} | {num(e['threshold'], 4)} | "
                     f"{num(e['sensitivity'])}{ci(e['sensitivity_ci'])} | {num(e['specificity'])}"
                     f"{ci(e['specificity_ci'])} | {num(e['ppv'])} |")
    lines.append(f"| **mean** | | **{num(evaluation['auc_mean'])}**{ci(evaluation['auc_mean_ci'])} | | | | | | | |")
    lines.append("")
    lines.append(f"RSNA weighted log loss {num(evaluation['weighted_logloss'], 4)}{ci(evaluation['weighted_logloss_ci'])}; "
                 f"{evaluation['n_images']} slices of {evaluation['n_patients']} patients; intervals: percentile, "
                 f"{evaluation['bootstrap']['replicates']} bootstrap replicates resampling patients "
                 f"(seed {evaluation['bootstrap']['seed']}).")
    for note in evaluation.get("notes", []):
        lines.append(f"Note: {note}.")
    return "\n".join(lines) + "\n"


def choose_thresholds(labels: np.ndarray, probs: np.ndarray, target_sensitivity: float) -> dict:
    """``{class: threshold}`` reaching ``target_sensitivity`` on these (validation) slices; a class
    without positives gets none."""
    from .metrics import threshold_for_sensitivity

    out = {}
    for j, name in enumerate(SUBTYPES):
        threshold = threshold_for_sensitivity(labels[:, j], probs[:, j], target_sensitivity)
        if threshold is not None:
            out[name] = threshold
    return out
