"""Two models on the same images: per-class AUC differences with a paired patient-bootstrap
interval and a test that respects patients, and the non-inferiority rule promotion rests on.

* ``p_value``: the two-sided z-test of equal AUCs with Obuchowski's clustered variance (1997,
  Biometrics 53:567; :mod:`medmoco.clustered`), clusters being the grouping unit (patient, else
  study). DeLong's test (DeLong, DeLong & Clarke-Pearson 1988, computed by :func:`delong` with
  the mid-rank algorithm of Sun & Xu 2014) treats slices as independent: with 10-40 correlated
  slices per patient it rejects a true null far more often than its level (shown in the tests),
  so it is kept as a function but no longer shown.
* ``delta_ci``: the percentile interval of ``AUC_candidate - AUC_reference`` over a patient
  bootstrap that applies the same resample to both models (:class:`~.bootstrap.PatientBootstrap`).
* Non-inferiority: the candidate may replace the reference when the lower bound of the mean-AUC
  ``delta_ci`` is at or above ``-margin`` and no class's ``delta`` is below ``-2 x margin``; the
  margin is said before looking.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import norm

from dicom_preprocess import SUBTYPES

from .bootstrap import PatientBootstrap, percentile_interval
from .clustered import clustered_auc_test
from .evaluation import class_counts
from .intervals import MIN_GROUPS, format_estimate, withheld_reason


P_VALUE_METHOD = "Obuchowski 1997 clustered, paired"


def midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(ordered)]
    ranks_sorted = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    out = np.empty(len(values))
    out[order] = ranks_sorted
    return out


def delong(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> dict:
    """DeLong's test of ``AUC_a = AUC_b`` on the same slices (fast mid-rank algorithm, Sun & Xu 2014).

    Returns:
        ``{"auc_a", "auc_b", "delta" (a - b), "se", "z", "p_value"}``; ``p_value`` is None when the
        difference has no variance (identical rankings) or a side has no positive or negative.
    """
    y = np.asarray(labels) > 0.5
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        return {"auc_a": None, "auc_b": None, "delta": None, "se": None, "z": None, "p_value": None}
    v10, v01, aucs = [], [], []
    for scores in (np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)):
        pos, neg = scores[y], scores[~y]
        rank_pos, rank_neg = midranks(pos), midranks(neg)
        rank_all = midranks(np.concatenate([pos, neg]))
        aucs.append((rank_all[:m].sum() - m * (m + 1) / 2.0) / (m * n))
        v10.append((rank_all[:m] - rank_pos) / n)  # per positive: share of negatives below it
        v01.append(1.0 - (rank_all[m:] - rank_neg) / m)  # per negative: share of positives above it
    s10 = np.cov(np.stack(v10)) if m > 1 else np.zeros((2, 2))
    s01 = np.cov(np.stack(v01)) if n > 1 else np.zeros((2, 2))
    cov = s10 / m + s01 / n
    variance = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    delta = aucs[0] - aucs[1]
    out = {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "delta": float(delta), "se": None, "z": None,
           "p_value": None}
    if variance > 1e-15:
        se = float(np.sqrt(variance))
        z = delta / se
        out.update({"se": se, "z": float(z), "p_value": float(2.0 * norm.sf(abs(z)))})
    return out


def compare_predictions(labels: np.ndarray, candidate: np.ndarray, reference: np.ndarray, patients,
                        replicates: int = 2000, level: float = 0.95, seed: int = 0,
                        min_groups: int = MIN_GROUPS) -> dict:
    """Per-class and mean AUC of both models on the same slices, their difference (candidate minus
    reference) with a paired patient-bootstrap interval, and the clustered (Obuchowski) p-value per
    class. ``patients``: the grouping unit of each slice (``CTCache.groups(rows)``).

    A class with fewer than ``min_groups`` positive or negative units keeps its point figures but
    has no interval and no p (``interval_note`` says why) and is left out of the mean, which is
    over the fixed set of the other scored classes (``mean.classes``); a replicate lacking one of
    them is left out of the mean's interval (``mean.replicates`` counts those kept)."""
    labels = np.asarray(labels, dtype=np.float64)
    boot = PatientBootstrap(patients, replicates, seed)
    counts = class_counts(labels, patients)
    classes, cand_means, ref_means, mean_classes = {}, [], [], []
    for j, name in enumerate(SUBTYPES):
        y = labels[:, j]
        c = counts[name]
        if not 0 < y.sum() < len(y):
            classes[name] = {"auc_candidate": None, "auc_reference": None, "delta": None, "delta_ci": None,
                             "p_value": None, "positives": int(y.sum()), "positive_groups": c["positive_groups"],
                             "negative_groups": c["negative_groups"], "note": "one label value in this split: no AUC"}
            continue
        test = delong(y, candidate[:, j], reference[:, j])  # the point AUCs (exact mid-rank Mann-Whitney)
        entry = {"auc_candidate": test["auc_a"], "auc_reference": test["auc_b"], "delta": test["delta"],
                 "delta_ci": None, "p_value": None, "positives": int(y.sum()), "positive_groups": c["positive_groups"],
                 "negative_groups": c["negative_groups"]}
        reason = withheld_reason(c["positive_groups"], c["negative_groups"], min_groups)
        if reason is None:
            cand_rep, ref_rep = boot.auc(y, candidate[:, j]), boot.auc(y, reference[:, j])
            cand_means.append(cand_rep)
            ref_means.append(ref_rep)
            mean_classes.append(name)
            entry["delta_ci"] = percentile_interval(cand_rep - ref_rep, level)
            entry["p_value"] = clustered_auc_test(y, candidate[:, j], reference[:, j], patients)["p_value"]
        else:
            entry["interval_note"] = f"{reason}; left out of the mean"
        classes[name] = entry
    mean = {"auc_candidate": None, "auc_reference": None, "delta": None, "delta_ci": None, "classes": mean_classes,
            "replicates": 0}
    if mean_classes:
        mean["auc_candidate"] = float(np.mean([classes[c]["auc_candidate"] for c in mean_classes]))
        mean["auc_reference"] = float(np.mean([classes[c]["auc_reference"] for c in mean_classes]))
        mean["delta"] = mean["auc_candidate"] - mean["auc_reference"]
        cand, ref = np.stack(cand_means), np.stack(ref_means)
        complete = np.isfinite(cand).all(axis=0) & np.isfinite(ref).all(axis=0)
        mean["replicates"] = int(complete.sum())
        mean["delta_ci"] = percentile_interval(np.where(complete, cand.mean(axis=0) - ref.mean(axis=0), np.nan), level)
    return {"n_images": int(len(labels)), "n_patients": int(boot.n_patients), "classes": classes, "mean": mean,
            "method": {"p_value": P_VALUE_METHOD, "ci": "paired patient bootstrap", "replicates": int(replicates),
                       "level": float(level), "seed": int(seed)}}


def non_inferior(comparison: dict, margin: float) -> tuple[bool, str]:
    """Whether the candidate may replace the reference, and why (or why not)."""
    mean = comparison["mean"]
    if mean["delta_ci"] is None:
        return False, ("no mean-AUC interval (no class has both labels in enough patients for one, or too few "
                       "replicates had them)")
    low = mean["delta_ci"][0]
    if low < -margin:
        return False, (f"the lower bound of the mean-AUC difference, {low:+.4f}, is below -margin = {-margin:+.4f} "
                       f"(delta {mean['delta']:+.4f}, {int(100 * comparison['method']['level'])}% CI "
                       f"[{mean['delta_ci'][0]:+.4f}, {mean['delta_ci'][1]:+.4f}])")
    worse = [f"{name} {c['delta']:+.4f}" for name, c in comparison["classes"].items()
             if c["delta"] is not None and c["delta"] < -2 * margin]
    if worse:
        return False, f"class deltas below -2 x margin = {-2 * margin:+.4f}: {', '.join(worse)}"
    return True, (f"non-inferior: lower bound {low:+.4f} >= -margin {-margin:+.4f}, and no class delta below "
                  f"{-2 * margin:+.4f}")


def markdown(comparison: dict) -> str:
    """The table a reviewer reads: both AUCs, the difference with its interval, the clustered p."""
    level = int(round(100 * comparison["method"]["level"]))
    cand, ref = comparison.get("candidate", {}), comparison.get("reference", {})

    def num(value, sign=False):
        return format_estimate(value, None, 4, signed=sign)

    def ci(pair):
        return "n/a" if not pair else f"[{pair[0]:+.4f}, {pair[1]:+.4f}]"

    def p(value):
        return "n/a" if value is None else ("<0.0001" if value < 1e-4 else f"{value:.4f}")

    lines = [f"Candidate: version {cand.get('version', '?')} ({cand.get('model_uri', '')}); reference: version "
             f"{ref.get('version', '?')} ({ref.get('model_uri', '')}).",
             f"Split `{comparison.get('split', '?')}`: {comparison['n_images']} slices of {comparison['n_patients']} "
             "patients, both models on the same slices.", "",
             f"| class | positive / negative patients | AUC candidate | AUC reference | Δ (cand − ref) | "
             f"{level}% CI (paired patient bootstrap) | p (clustered, Obuchowski) |", "|---|---|---|---|---|---|---|"]
    for name, c in comparison["classes"].items():
        lines.append(f"| {name} | {c.get('positive_groups', 'n/a')} / {c.get('negative_groups', 'n/a')} | "
                     f"{num(c['auc_candidate'])} | {num(c['auc_reference'])} | "
                     f"{num(c['delta'], True)} | {ci(c['delta_ci'])} | {p(c['p_value'])} |")
    m = comparison["mean"]
    lines.append(f"| **mean** ({', '.join(m.get('classes', [])) or 'no class'}) | | {num(m['auc_candidate'])} | "
                 f"{num(m['auc_reference'])} | **{num(m['delta'], True)}** | **{ci(m['delta_ci'])}** | |")
    lines += ["", f"Intervals: {comparison['method']['replicates']} bootstrap replicates resampling patients, the "
              f"same resample for both models (seed {comparison['method']['seed']}). p: two-sided test of equal "
              "AUCs with Obuchowski's clustered variance (slices of a patient are correlated; DeLong's slice-level "
              "p is not shown, it is far too confident on such data)."]
    lines += [f"Note: {name}: {c['interval_note']}." for name, c in comparison["classes"].items()
              if c.get("interval_note")]
    if "decision" in comparison:
        lines += ["", f"**Decision**: {comparison['decision']}"]
    return "\n".join(lines) + "\n"
