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

import warnings

import numpy as np
from scipy.stats import norm

from dicom_preprocess import SUBTYPES

from .bootstrap import PatientBootstrap, percentile_interval
from .clustered import clustered_auc_test


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
                        replicates: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Per-class and mean AUC of both models on the same slices, their difference (candidate minus
    reference) with a paired patient-bootstrap interval, and the clustered (Obuchowski) p-value per
    class. ``patients``: the grouping unit of each slice (``CTCache.groups(rows)``)."""
    labels = np.asarray(labels, dtype=np.float64)
    boot = PatientBootstrap(patients, replicates, seed)
    classes, deltas_by_class, cand_means, ref_means = {}, [], [], []
    for j, name in enumerate(SUBTYPES):
        y = labels[:, j]
        if not 0 < y.sum() < len(y):
            classes[name] = {"auc_candidate": None, "auc_reference": None, "delta": None, "delta_ci": None,
                             "p_value": None, "positives": int(y.sum()),
                             "note": "one label value in this split: no AUC"}
            continue
        test = delong(y, candidate[:, j], reference[:, j])
        clustered = clustered_auc_test(y, candidate[:, j], reference[:, j], patients)
        cand_rep, ref_rep = boot.auc(y, candidate[:, j]), boot.auc(y, reference[:, j])
        deltas_by_class.append(cand_rep - ref_rep)
        cand_means.append(cand_rep)
        ref_means.append(ref_rep)
        classes[name] = {"auc_candidate": test["auc_a"], "auc_reference": test["auc_b"], "delta": test["delta"],
                         "delta_ci": percentile_interval(cand_rep - ref_rep, level), "p_value": clustered["p_value"],
                         "positives": int(y.sum())}
    scored = [c for c in classes.values() if c["delta"] is not None]
    mean = {"auc_candidate": None, "auc_reference": None, "delta": None, "delta_ci": None}
    if scored:
        mean["auc_candidate"] = float(np.mean([c["auc_candidate"] for c in scored]))
        mean["auc_reference"] = float(np.mean([c["auc_reference"] for c in scored]))
        mean["delta"] = mean["auc_candidate"] - mean["auc_reference"]
        with warnings.catch_warnings():  # a replicate with no scorable class has no mean: NaN, dropped below
            warnings.simplefilter("ignore", RuntimeWarning)
            per_replicate = np.nanmean(np.stack(cand_means), axis=0) - np.nanmean(np.stack(ref_means), axis=0)
        mean["delta_ci"] = percentile_interval(per_replicate, level)
    return {"n_images": int(len(labels)), "n_patients": int(boot.n_patients), "classes": classes, "mean": mean,
            "method": {"p_value": P_VALUE_METHOD, "ci": "paired patient bootstrap", "replicates": int(replicates),
                       "level": float(level), "seed": int(seed)}}


def non_inferior(comparison: dict, margin: float) -> tuple[bool, str]:
    """Whether the candidate may replace the reference, and why (or why not)."""
    mean = comparison["mean"]
    if mean["delta_ci"] is None:
        return False, "no mean-AUC interval (no class has both labels, or too few replicates had them)"
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
        return "—" if value is None else (f"{value:+.4f}" if sign else f"{value:.4f}")

    def ci(pair):
        return "—" if not pair else f"[{pair[0]:+.4f}, {pair[1]:+.4f}]"

    def p(value):
        return "—" if value is None else ("<0.0001" if value < 1e-4 else f"{value:.4f}")

    lines = [f"Candidate: version {cand.get('version', '?')} ({cand.get('model_uri', '')}); reference: version "
             f"{ref.get('version', '?')} ({ref.get('model_uri', '')}).",
             f"Split `{comparison.get('split', '?')}`: {comparison['n_images']} slices of {comparison['n_patients']} "
             "patients, both models on the same slices.", "",
             f"| class | positives | AUC candidate | AUC reference | Δ (cand − ref) | {level}% CI (paired patient "
             "bootstrap) | p (clustered, Obuchowski) |", "|---|---|---|---|---|---|---|"]
    for name, c in comparison["classes"].items():
        lines.append(f"| {name} | {c['positives']} | {num(c['auc_candidate'])} | {num(c['auc_reference'])} | "
                     f"{num(c['delta'], True)} | {ci(c['delta_ci'])} | {p(c['p_value'])} |")
    m = comparison["mean"]
    lines.append(f"| **mean** | | {num(m['auc_candidate'])} | {num(m['auc_reference'])} | **{num(m['delta'], True)}** | "
                 f"**{ci(m['delta_ci'])}** | |")
    lines += ["", f"Intervals: {comparison['method']['replicates']} bootstrap replicates resampling patients, the "
              f"same resample for both models (seed {comparison['method']['seed']}). p: two-sided test of equal AUCs with "
              "Obuchowski's clustered variance (slices of a patient are correlated; DeLong's slice-level p is not "
              "shown, it is far too confident on such data)."]
    if "decision" in comparison:
        lines += ["", f"**Decision**: {comparison['decision']}"]
    return "\n".join(lines) + "\n"
