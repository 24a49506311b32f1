"""Patient-level bootstrap, vectorised; the unit is the one the splits kept together (patient,
else study: ``CTCache.groups``), called "patient" below.

Slices of one patient are correlated (adjacent slices are near-duplicates, and a lesion spans
several), so an interval that resamples slices is far too narrow. A replicate here draws patients
with replacement: it is a vector of per-patient counts ``c`` (a multinomial draw), and every slice
of patient ``p`` enters the replicate ``c_p`` times. Statistics are computed for all replicates at
once from those counts:

* means and ratios (log loss, sensitivity, specificity, PPV): sums per patient, then one matrix
  product ``counts @ sums``;
* ROC AUC: the Mann-Whitney statistic with weights, ``sum_ij w_i w_j [y_i = 1, y_j = 0]
  H(s_i - s_j) / (W_pos W_neg)`` with ``H`` = 1, 1/2, 0 for >, =, <. Since a slice's weight is its
  patient's count, the numerator is ``c^T K c`` with the patient-pair matrix ``K[p, q] = sum of
  H(s_i - s_j)`` over positives ``i`` of ``p`` and negatives ``j`` of ``q``, built once from one
  sorted search per patient; all replicates are then one matrix product ``(C K) * C``. For many
  units (a slice-level bootstrap) ``K`` would not fit: then per tie group of the sorted scores the
  weighted positives and negatives (``np.add.reduceat``) and an exclusive cumulative sum of the
  negatives, a block of replicates at a time.

With all counts equal to one it is the usual AUC (tested against scikit-learn), and a replicate
equals scikit-learn's AUC on the materialised resample (tested). Percentile intervals. A replicate
without a positive or a negative has no AUC: NaN, left out of the percentiles.
"""
from __future__ import annotations

import numpy as np


class PatientBootstrap:
    """``replicates`` resamples of the patients of a set of slices.

    Args:
        patients: the grouping unit of each slice (N,), ``CTCache.groups(rows)``. Pass
            ``np.arange(N)`` for a slice-level bootstrap (each slice its own unit).
        replicates: how many resamples.
        seed: of the draws; the same seed and patients give the same replicates, so two models
            scored on the same slices are resampled identically (a paired bootstrap).
    """

    def __init__(self, patients, replicates: int = 2000, seed: int = 0):
        _, self.codes = np.unique(np.asarray(patients).astype(str), return_inverse=True)
        self.n_patients = int(self.codes.max()) + 1 if len(self.codes) else 0
        self.replicates = int(replicates)
        self.seed = int(seed)
        rng = np.random.default_rng(seed)
        p = self.n_patients
        self.counts = rng.multinomial(p, np.full(p, 1.0 / p), size=self.replicates).astype(np.float64) if p else \
            np.zeros((self.replicates, 0))

    def patient_sums(self, values: np.ndarray) -> np.ndarray:
        """Per-patient sums of per-slice ``values`` (N,) or (N, K) -> (P,) or (P, K)."""
        values = np.asarray(values, dtype=np.float64)
        if values.ndim == 1:
            return np.bincount(self.codes, weights=values, minlength=self.n_patients)
        return np.stack([self.patient_sums(values[:, k]) for k in range(values.shape[1])], axis=1)

    def ratio(self, numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
        """``sum(w * numerator) / sum(w * denominator)`` over slices, per replicate (B,); NaN where
        a replicate's denominator is 0. A mean is ``ratio(values, ones)``."""
        num = self.counts @ self.patient_sums(numerator)
        den = self.counts @ self.patient_sums(denominator)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)

    def auc(self, labels: np.ndarray, scores: np.ndarray, block: int = 64) -> np.ndarray:
        """ROC AUC of every replicate (B,), NaN where a replicate lacks positives or negatives."""
        return replicate_auc(labels, scores, self.codes, self.counts, block)

    def average_precision(self, labels: np.ndarray, scores: np.ndarray, block: int = 16) -> np.ndarray:
        """Average precision of every replicate (B,), NaN where a replicate lacks positives."""
        return replicate_average_precision(labels, scores, self.codes, self.counts, block)

    def interval(self, values: np.ndarray, level: float = 0.95) -> list | None:
        """Percentile interval ``[lo, hi]`` of replicate values (NaNs left out); None when fewer
        than half of the replicates have a value."""
        return percentile_interval(values, level)


def percentile_interval(values: np.ndarray, level: float = 0.95) -> list | None:
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if len(finite) < max(2, len(values) // 2):
        return None
    alpha = (1.0 - level) / 2.0
    return [float(np.quantile(finite, alpha)), float(np.quantile(finite, 1.0 - alpha))]


MAX_KERNEL_UNITS = 3000  # K is P x P float64: 72 MB at this size


def replicate_auc(labels, scores, codes: np.ndarray, counts: np.ndarray, block: int = 64) -> np.ndarray:
    """Weighted Mann-Whitney AUC for every row of ``counts`` (B, P), slice weights
    ``counts[:, codes]``; ties count one half. See the module docstring."""
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if counts.shape[1] <= MAX_KERNEL_UNITS:
        return _auc_by_patient_pairs(y, s, codes, counts)
    return _auc_by_tie_groups(y, s, codes, counts, block)


def _auc_by_patient_pairs(y: np.ndarray, s: np.ndarray, codes: np.ndarray, counts: np.ndarray) -> np.ndarray:
    units = counts.shape[1]
    positive = y > 0.5
    pos_scores, pos_units = s[positive], codes[positive]
    kernel = np.zeros((units, units))
    neg_scores, neg_units = s[~positive], codes[~positive]
    by_unit = np.argsort(neg_units, kind="mergesort")
    bounds = np.searchsorted(neg_units[by_unit], np.arange(units + 1))
    for q in range(units):
        negatives = np.sort(neg_scores[by_unit[bounds[q] : bounds[q + 1]]])
        if len(negatives) == 0 or len(pos_scores) == 0:
            continue
        below = np.searchsorted(negatives, pos_scores, side="left")
        tied = np.searchsorted(negatives, pos_scores, side="right") - below
        kernel[:, q] = np.bincount(pos_units, weights=below + 0.5 * tied, minlength=units)
    numerator = ((counts @ kernel) * counts).sum(axis=1)
    total_pos = counts @ np.bincount(codes, weights=positive.astype(np.float64), minlength=units)
    total_neg = counts @ np.bincount(codes, weights=(~positive).astype(np.float64), minlength=units)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((total_pos > 0) & (total_neg > 0), numerator / (total_pos * total_neg), np.nan)


def _auc_by_tie_groups(y: np.ndarray, s: np.ndarray, codes: np.ndarray, counts: np.ndarray,
                       block: int) -> np.ndarray:
    order = np.argsort(s, kind="mergesort")
    s_sorted, y_sorted, codes_sorted = s[order], y[order], codes[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    out = np.empty(len(counts))
    for first in range(0, len(counts), block):
        w = counts[first : first + block][:, codes_sorted]  # (b, N) slice weights in score order
        pos = w * y_sorted
        neg = w - pos
        pos_g = np.add.reduceat(pos, starts, axis=1)
        neg_g = np.add.reduceat(neg, starts, axis=1)
        neg_below = np.cumsum(neg_g, axis=1) - neg_g
        numerator = (pos_g * (neg_below + 0.5 * neg_g)).sum(axis=1)
        total_pos, total_neg = pos_g.sum(axis=1), neg_g.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[first : first + block] = np.where((total_pos > 0) & (total_neg > 0),
                                                  numerator / (total_pos * total_neg), np.nan)
    return out


def replicate_average_precision(labels, scores, codes: np.ndarray, counts: np.ndarray, block: int = 16) -> np.ndarray:
    """Weighted average precision for every row of ``counts`` (B, P), as scikit-learn defines it:
    ``sum_k (R_k - R_{k-1}) P_k`` over the distinct scores taken as thresholds from the highest
    down, a tie group entering at once; equivalently each positive slice adds its weight times the
    precision at the end of its tie group, over the total positive weight. Slice weights are their
    patient's count, a block of replicates at a time; only the cumulative sums at the positives'
    group ends are kept."""
    y = np.asarray(labels, dtype=np.float64) > 0.5
    s = np.asarray(scores, dtype=np.float64)
    out = np.full(len(counts), np.nan)
    if not y.any():
        return out
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted, codes_sorted = s[order], y[order], codes[order]
    # the last position of each slice's tie group: cumulative sums are read there
    ends = np.r_[np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), len(s_sorted) - 1]
    group_end = np.repeat(ends, np.diff(np.r_[-1, ends]))
    positives = np.flatnonzero(y_sorted)
    read_at = group_end[positives]
    last_positive = np.searchsorted(positives, read_at, side="right") - 1  # the group's last positive
    # float32 sums of small integer counts are exact below 2^24 (16.7M slices x draws)
    weights = counts.astype(np.float32)
    for first in range(0, len(counts), block):
        w = weights[first : first + block][:, codes_sorted]  # (b, N) slice weights in score order
        called = np.cumsum(w, axis=1)[:, read_at].astype(np.float64)
        w_pos = w[:, positives].astype(np.float64)
        tp = np.cumsum(w_pos, axis=1)[:, last_positive]
        total = w_pos.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(called > 0, tp / np.where(called > 0, called, 1.0), 0.0)
            out[first : first + block] = np.where(total > 0, (w_pos * precision).sum(axis=1) / total, np.nan)
    return out
