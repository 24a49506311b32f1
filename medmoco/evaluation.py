"""The evaluation of a split a clinical reviewer reads: counts of patients and slices, figures
with intervals where the data carry them, calibration, and operating points fixed before the
split was seen.

:func:`evaluate_split` returns the ``metrics.json`` of `medmoco evaluate` and of the end of
`medmoco finetune`::

    n_images, n_patients, auc_mean, auc_mean_ci, auc_mean_classes, auc_mean_replicates,
    weighted_logloss, weighted_logloss_ci,
    classes: {<class>: {positives, negatives, positive_groups, negative_groups, prevalence,
                        auc, auc_ci, ap, ap_ci, ece, brier, calibration_intercept, calibration_slope,
                        threshold, sensitivity(_ci), specificity(_ci), ppv(_ci), npv(_ci),
                        interval_note?, note?}},
    bootstrap: {unit, replicates, level, seed}, intervals: {min_groups, proportions},
    auc_<class>, ap_<class> (the flat keys of earlier versions), notes

The grouping unit (``bootstrap.unit``) is the one the splits kept together: patient, else study.
AUC, AP and the mean AUC have percentile intervals of :class:`medmoco.bootstrap.PatientBootstrap`;
sensitivity, specificity, PPV and NPV have cluster-adjusted Wilson intervals
(:func:`medmoco.intervals.clustered_proportion`), which reach 0 and 1. A class with fewer than
``min_groups`` positive or negative units has its intervals withheld (``null``) and says why in
``interval_note`` (:mod:`medmoco.intervals`). The mean AUC is over a fixed set of classes, those
with an AUC on the whole split (``auc_mean_classes``); its interval is given when every one of them
has its own, and uses the replicates in which all of them have an AUC (``auc_mean_replicates``
counts them). A class with no positive or no negative slice has ``null`` figures and a note.
``threshold`` comes from the model (chosen on the validation split for a target sensitivity);
without one the operating point is ``null``.
"""
from __future__ import annotations

import numpy as np

from dicom_preprocess import SUBTYPES
from dicom_preprocess.splits import GROUP_UNIT

from .bootstrap import PatientBootstrap, percentile_interval
from .intervals import MIN_GROUPS, clustered_proportion, format_estimate, withheld_reason
from .metrics import (ECE_BINS, brier_score, calibration_slope_intercept, expected_calibration_error,
                      operating_point, per_class_ap, per_class_auc, slice_log_loss)


def _number(value) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def class_counts(labels: np.ndarray, groups) -> dict:
    """Per class: positive and negative slices, the units (patients, else studies) with at least
    one positive slice and with at least one negative slice, and the slice prevalence."""
    labels = np.asarray(labels, dtype=np.float64)
    _, codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    out = {}
    for j, name in enumerate(SUBTYPES):
        y = labels[:, j] > 0.5
        out[name] = {"positives": int(y.sum()), "negatives": int((~y).sum()),
                     "positive_groups": int(len(np.unique(codes[y]))),
                     "negative_groups": int(len(np.unique(codes[~y]))),
                     "prevalence": float(y.mean()) if len(y) else None}
    return out


def evaluate_split(labels: np.ndarray, probs: np.ndarray, patients, thresholds: dict | None = None,
                   replicates: int = 2000, level: float = 0.95, seed: int = 0, unit: str = GROUP_UNIT,
                   min_groups: int = MIN_GROUPS) -> dict:
    """Counts, point figures, intervals, calibration and operating points of one split.

    Args:
        labels, probs: (N, 6) in :data:`SUBTYPES` order.
        patients: the grouping unit of each slice (N,): ``CTCache.groups(rows)``, the unit the
            splits kept together (patient, else study).
        thresholds: ``{class: threshold}`` fixed beforehand (on validation), or None.
        unit: what ``patients`` holds, recorded in ``bootstrap.unit``.
        min_groups: the fewest positive and negative units a class needs for its intervals.
    """
    labels = np.asarray(labels, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    boot = PatientBootstrap(patients, replicates, seed)
    auc = per_class_auc(labels, probs)
    ap = per_class_ap(labels, probs)
    losses = slice_log_loss(labels, probs)
    counts = class_counts(labels, patients)
    out = {"n_images": int(len(labels)), "n_patients": int(boot.n_patients),
           "weighted_logloss": float(losses.mean()) if len(losses) else None,
           "weighted_logloss_ci": None, "classes": {}, "notes": [],
           "bootstrap": {"unit": unit, "replicates": int(replicates), "level": float(level), "seed": int(seed)},
           "intervals": {"min_groups": int(min_groups),
                         "proportions": "cluster-adjusted Wilson (design effect from the clustered variance)"}}
    if boot.n_patients >= min_groups:
        out["weighted_logloss_ci"] = percentile_interval(boot.ratio(losses, np.ones_like(losses)), level)
    replicate_aucs, mean_classes, mean_ok = [], [], True
    for j, name in enumerate(SUBTYPES):
        y, p = labels[:, j], probs[:, j]
        c = counts[name]
        reason = withheld_reason(c["positive_groups"], c["negative_groups"], min_groups)
        entry = {**c, "auc": None, "auc_ci": None, "ap": _number(ap[name]), "ap_ci": None, "ece": None,
                 "brier": None, "calibration_intercept": None, "calibration_slope": None, "threshold": None,
                 "sensitivity": None, "sensitivity_ci": None, "specificity": None, "specificity_ci": None,
                 "ppv": None, "ppv_ci": None, "npv": None, "npv_ci": None}
        if len(y):
            entry["ece"] = expected_calibration_error(y, p, ECE_BINS)
            entry["brier"] = brier_score(y, p)
            entry.update(calibration_slope_intercept(y, p))
        if 0 < c["positives"] < len(y):
            entry["auc"] = _number(auc[name])
            mean_classes.append(name)
            mean_ok &= reason is None
            if reason is None:
                aucs = boot.auc(y, p)
                replicate_aucs.append(aucs)
                entry["auc_ci"] = percentile_interval(aucs, level)
                entry["ap_ci"] = percentile_interval(boot.average_precision(y, p), level)
        else:
            entry["note"] = (f"{c['positives']} positive and {c['negatives']} negative slices: no AUC, and no "
                             "sensitivity or specificity where a side is empty")
            out["notes"].append(f"{name}: {entry['note']}")
        if reason is not None:
            entry["interval_note"] = reason
            if "note" not in entry:  # a class without an AUC has said so already
                out["notes"].append(f"{name}: {reason}")
        threshold = (thresholds or {}).get(name)
        if threshold is not None:
            called = (p >= threshold).astype(np.float64)
            entry.update({"threshold": float(threshold), **operating_point(y, p, threshold)})
            if reason is None:
                for key, num, den in (("sensitivity", called * y, y), ("specificity", (1 - called) * (1 - y), 1 - y),
                                      ("ppv", called * y, called), ("npv", (1 - called) * (1 - y), 1 - called)):
                    entry[f"{key}_ci"] = clustered_proportion(num, den, patients, level)["ci"]
        out["classes"][name] = entry
    if thresholds is None:
        out["notes"].append("the model has no operating points (thresholds chosen on validation): "
                            "sensitivity and specificity are not reported")
    out["auc_mean"] = _number(auc["mean"])
    out["auc_mean_classes"] = mean_classes
    out["auc_mean_ci"], out["auc_mean_replicates"] = None, 0
    if mean_classes and mean_ok:
        stacked = np.stack(replicate_aucs)
        complete = np.isfinite(stacked).all(axis=0)  # a replicate lacking a class of the set is left out
        out["auc_mean_replicates"] = int(complete.sum())
        out["auc_mean_ci"] = percentile_interval(np.where(complete, stacked.mean(axis=0), np.nan), level)
    elif mean_classes:
        out["notes"].append("mean AUC: no interval, a class of its mean has too few patients for one")
    # flat keys, as earlier metrics.json files had them
    for name in SUBTYPES:
        out[f"auc_{name}"] = _number(auc[name])
        out[f"ap_{name}"] = _number(ap[name])
    return out


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
        for key in ("ap", "ece", "brier", "calibration_intercept", "calibration_slope", "sensitivity", "specificity",
                    "ppv", "npv"):
            out[f"{prefix}_{key}_{name}"] = entry.get(key)
    return {k: v for k, v in out.items() if v is not None}


def markdown_table(evaluation: dict) -> str:
    """The per-class tables a reviewer reads: counts, then figures with their intervals (``n/a``
    where a figure is undefined, "withheld" where the data cannot carry an interval)."""
    level = int(round(100 * evaluation["bootstrap"]["level"]))
    unit = evaluation["bootstrap"]["unit"]

    def est(entry, key, digits=3):
        withheld = "withheld" if entry.get("interval_note") else None
        return format_estimate(entry.get(key), entry.get(f"{key}_ci"), digits, reason=withheld)

    def num(value, digits=3):
        return format_estimate(value, None, digits)

    lines = [f"| class | positive / negative units ({unit}) | positive / negative slices | prevalence |",
             "|---|---|---|---|"]
    for name, e in evaluation["classes"].items():
        lines.append(f"| {name} | {e.get('positive_groups', 'n/a')} / {e.get('negative_groups', 'n/a')} | "
                     f"{e.get('positives', 'n/a')} / {e.get('negatives', 'n/a')} | {num(e.get('prevalence'), 4)} |")
    lines += ["", f"| class | AUC [{level}% CI] | AP [{level}% CI] | ECE | calibration intercept / slope | Brier | "
              f"threshold | sensitivity [{level}% CI] | specificity [{level}% CI] | PPV [{level}% CI] | "
              f"NPV [{level}% CI] |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in evaluation["classes"].items():
        lines.append(f"| {name} | {est(e, 'auc')} | {est(e, 'ap')} | {num(e.get('ece'))} | "
                     f"{num(e.get('calibration_intercept'), 2)} / {num(e.get('calibration_slope'), 2)} | "
                     f"{num(e.get('brier'))} | {num(e.get('threshold'), 4)} | {est(e, 'sensitivity')} | "
                     f"{est(e, 'specificity')} | {est(e, 'ppv')} | {est(e, 'npv')} |")
    mean = format_estimate(evaluation["auc_mean"], evaluation["auc_mean_ci"],
                           reason="withheld" if evaluation["auc_mean"] is not None else None)
    lines.append(f"| **mean** ({', '.join(evaluation.get('auc_mean_classes', [])) or 'no class'}) | **{mean}** | | | | "
                 "| | | | | |")
    lines.append("")
    loss = format_estimate(evaluation["weighted_logloss"], evaluation["weighted_logloss_ci"], 4)
    lines.append(f"RSNA weighted log loss {loss}; "
                 f"{evaluation['n_images']} slices of {evaluation['n_patients']} units ({unit}); AUC and AP intervals: "
                 f"percentile, {evaluation['bootstrap']['replicates']} bootstrap replicates resampling units "
                 f"(seed {evaluation['bootstrap']['seed']}); proportions: cluster-adjusted Wilson; intervals withheld "
                 f"below {evaluation.get('intervals', {}).get('min_groups', MIN_GROUPS)} positive or negative units.")
    for note in evaluation.get("notes", []):
        lines.append(f"Note: {note}.")
    text = "\n".join(lines) + "\n"
    if evaluation.get("counts_by_split"):
        text += "\nPer split (positive/negative units; positive/negative slices; slice prevalence):\n\n"
        text += "| split | " + " | ".join(SUBTYPES) + " |\n|---|" + "---|" * len(SUBTYPES) + "\n"
        for split, counts in evaluation["counts_by_split"].items():
            text += f"| {split} | " + " | ".join(
                f"{c['positive_groups']}/{c['negative_groups']}; {c['positives']}/{c['negatives']}; "
                f"{format_estimate(c['prevalence'], None, 4)}" for c in counts.values()) + " |\n"
    if evaluation.get("subgroups"):
        from .subgroups import markdown as subgroup_markdown

        text += subgroup_markdown(evaluation["subgroups"])
    return text


def counts_by_split(cache) -> dict:
    """:func:`class_counts` of the labeled slices of every split of a cache (``CTCache``), by its
    grouping unit: what a reader needs to judge each split's figures."""
    out = {}
    for split in sorted(set(cache.manifest["split"])):
        rows = cache.indices(split, labeled=True)
        if len(rows):
            out[str(split)] = class_counts(cache.labels(rows), cache.groups(rows))
    return out


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
