"""ROC AUC of clustered data: Obuchowski's variance, for one model and for the difference of two.

Slices of one patient are correlated, so DeLong's variance (DeLong, DeLong & Clarke-Pearson 1988),
which treats every slice as independent, is too small: with 10-40 correlated slices per patient
its two-sided test of equal AUCs rejects a true null far more often than its level. Obuchowski
(1997, Biometrics 53:567-578) keeps DeLong's structural components but sums them per cluster
(here the grouping unit: patient, else study).

With ``psi(x, y) = 1, 1/2, 0`` for ``x >, =, < y``, ``M`` positive and ``N`` negative slices, and
per cluster ``i`` its ``m_i`` positives and ``n_i`` negatives, the placement sums are

    V10_i = sum over positives x of i of (1/N) sum over all negatives y of psi(x, y)
    V01_i = sum over negatives y of i of (1/M) sum over all positives x of psi(x, y)

so that ``A = sum_i V10_i / M = sum_i V01_i / N`` is the usual AUC. With ``I`` clusters, of which
``I10`` hold a positive and ``I01`` a negative, and ``a_i = V10_i - m_i A``, ``b_i = V01_i - n_i A``:

    S10 = I10 / ((I10 - 1) M) sum a_i^2,  S01 = I01 / ((I01 - 1) N) sum b_i^2,
    S11 = I / (I - 1) sum a_i b_i,
    Var(A) = S10 / M + S01 / N + 2 S11 / (M N).

For two models scored on the same slices the same sums with one model's ``a`` and the other's
``b`` give the covariance, and ``Var(A1 - A2) = Var(A1) + Var(A2) - 2 Cov(A1, A2)``; the test of
``A1 = A2`` is a z-test. With one slice per cluster it is DeLong's variance (tested).
"""
from __future__ import annotations

import numpy as np
from scipy.stats import norm


def _midranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(ordered)]
    out = np.empty(len(values))
    out[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return out


def _components(y: np.ndarray, scores: np.ndarray, codes: np.ndarray, clusters: int):
    """AUC and the per-cluster ``a_i``, ``b_i`` of one model's scores."""
    m, n = int(y.sum()), int((~y).sum())
    pos, neg = scores[y], scores[~y]
    rank_all = _midranks(np.concatenate([pos, neg]))
    below = rank_all[:m] - _midranks(pos)  # per positive: negatives below it, ties one half
    above = m - (rank_all[m:] - _midranks(neg))  # per negative: positives above it, ties one half
    auc = below.sum() / (m * n)
    v10 = np.bincount(codes[y], weights=below / n, minlength=clusters)
    v01 = np.bincount(codes[~y], weights=above / m, minlength=clusters)
    m_i = np.bincount(codes[y], minlength=clusters)
    n_i = np.bincount(codes[~y], minlength=clusters)
    return auc, v10 - m_i * auc, v01 - n_i * auc


def clustered_auc_covariance(labels, scores, groups) -> dict | None:
    """AUCs of ``K`` models on the same slices and their Obuchowski covariance matrix.

    Args:
        labels: (N,) 0/1.
        scores: (N,) or (N, K), one column per model.
        groups: (N,) the cluster of each slice.

    Returns:
        ``{"auc": (K,), "covariance": (K, K), "clusters", "clusters_positive", "clusters_negative"}``,
        or None when there is no positive or no negative slice, or fewer than two clusters of a kind.
    """
    y = np.asarray(labels) > 0.5
    s = np.asarray(scores, dtype=np.float64)
    s = s[:, None] if s.ndim == 1 else s
    _, codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    clusters = int(codes.max()) + 1 if len(codes) else 0
    m, n = int(y.sum()), int((~y).sum())
    with_pos = len(np.unique(codes[y]))
    with_neg = len(np.unique(codes[~y]))
    if m == 0 or n == 0 or with_pos < 2 or with_neg < 2:
        return None
    parts = [_components(y, s[:, k], codes, clusters) for k in range(s.shape[1])]
    auc = np.array([p[0] for p in parts])
    a = np.stack([p[1] for p in parts], axis=1)  # (I, K)
    b = np.stack([p[2] for p in parts], axis=1)
    s10 = with_pos / ((with_pos - 1) * m) * (a.T @ a)
    s01 = with_neg / ((with_neg - 1) * n) * (b.T @ b)
    s11 = clusters / (clusters - 1) * (a.T @ b)
    covariance = s10 / m + s01 / n + (s11 + s11.T) / (m * n)
    return {"auc": auc, "covariance": covariance, "clusters": clusters, "clusters_positive": with_pos,
            "clusters_negative": with_neg}


def clustered_auc_test(labels, scores_a, scores_b, groups) -> dict:
    """Two-sided z-test of ``AUC_a = AUC_b`` on the same slices, clustered (Obuchowski 1997).

    Returns:
        ``{"auc_a", "auc_b", "delta" (a - b), "se", "z", "p_value"}``; figures are None where
        undefined (a side without slices, fewer than two clusters of a kind, or no variance).
    """
    out = {"auc_a": None, "auc_b": None, "delta": None, "se": None, "z": None, "p_value": None}
    both = clustered_auc_covariance(labels, np.column_stack([scores_a, scores_b]), groups)
    if both is None:
        return out
    (auc_a, auc_b), cov = both["auc"], both["covariance"]
    delta = float(auc_a - auc_b)
    out.update({"auc_a": float(auc_a), "auc_b": float(auc_b), "delta": delta})
    variance = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    if variance > 1e-15:
        se = float(np.sqrt(variance))
        out.update({"se": se, "z": delta / se, "p_value": float(2.0 * norm.sf(abs(delta / se)))})
    return out
