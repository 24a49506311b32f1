"""Intervals a clinical reader can trust: when to give one, proportions of clustered slices, and
the one way a value with its interval is written.

* **When.** An interval of a class's figures is given only when the split holds at least
  :data:`MIN_GROUPS` grouping units (patients, else studies) with a positive slice of the class and
  as many with a negative one. Below that a patient bootstrap under-covers badly (simulated: 95%
  intervals of the AUC covered the truth 79% of the time with 10 patients, 74% for a class with
  about four positive patients), and sample-size work asks for far more (SE(AUC) < 0.025 needs
  60-170 events, Pavlou et al. 2021, Stat Methods Med Res); the interval is then ``null`` with a
  reason. The minimum is a setting; 10 is a floor, not a recommendation.
* **Proportions** (sensitivity, specificity, PPV, NPV) of clustered slices: a ratio estimate
  ``p = sum x / sum n`` with its cluster (linearisation) variance
  ``I / (I - 1) sum_i (x_i - p n_i)^2 / (sum n)^2`` over the ``I`` clusters that have slices in
  the denominator; the design effect ``D = var_clustered / (p (1 - p) / n)`` (Kish: ``1 + (m - 1)
  rho`` for clusters of ``m``), never below 1; the effective size ``n / D``; then Wilson's score
  interval on the effective size (Korn & Graubard 1998, Survey Methodology 24:193, for the effective
  size). Unlike a percentile bootstrap it reaches 0 and 1: a sensitivity of 1.0 gets ``[lo, 1]``
  with ``lo < 1``. Where ``p`` is 0 or 1 the design effect is undefined; the effective size is
  then the number of clusters (each cluster counted once, the conservative choice).
"""
from __future__ import annotations

import numpy as np
from scipy.stats import norm

MIN_GROUPS = 10


def withheld_reason(positive_groups: int, negative_groups: int, minimum: int = MIN_GROUPS,
                    unit: str = "patients") -> str | None:
    """Why a class's intervals are withheld (fewer than ``minimum`` positive or negative groups),
    or None when they are given."""
    singular = unit[:-1] if unit.endswith("s") else unit  # "1 positive patient"
    short = [f"{count} {side} {unit if count != 1 else singular}"
             for side, count in (("positive", positive_groups), ("negative", negative_groups)) if count < minimum]
    if not short:
        return None
    return f"{' and '.join(short)} (fewer than {minimum}): interval withheld"


def wilson(successes: float, n: float, level: float = 0.95) -> list | None:
    """Wilson's score interval for ``successes`` of ``n`` (``n`` may be an effective size)."""
    if n <= 0:
        return None
    z = float(norm.ppf(0.5 + level / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low = 0.0 if successes <= 0 else max(0.0, centre - half)  # exact at the ends, not 1 - 1e-16
    high = 1.0 if successes >= n else min(1.0, centre + half)
    return [float(low), float(high)]


def clustered_proportion(numerator, denominator, groups, level: float = 0.95) -> dict:
    """A proportion of slices with a cluster-adjusted Wilson interval (see the module docstring).

    Args:
        numerator: per slice, 1 where it counts as a success (0 outside the denominator).
        denominator: per slice, 1 where it is in the proportion's denominator.
        groups: the cluster of each slice.

    Returns:
        ``{"value", "ci", "n", "clusters", "design_effect", "n_effective"}``; ``value`` and ``ci``
        None when the denominator is empty.
    """
    x = np.asarray(numerator, dtype=np.float64)
    d = np.asarray(denominator, dtype=np.float64)
    _, codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    x_i = np.bincount(codes, weights=x)
    n_i = np.bincount(codes, weights=d)
    x_i, n_i = x_i[n_i > 0], n_i[n_i > 0]
    n, clusters = float(n_i.sum()), len(n_i)
    out = {"value": None, "ci": None, "n": int(n), "clusters": int(clusters), "design_effect": None,
           "n_effective": None}
    if n == 0:
        return out
    p = float(x_i.sum() / n)
    binomial = p * (1 - p) / n
    if binomial > 0 and clusters > 1:
        clustered = clusters / (clusters - 1) * float(((x_i - p * n_i) ** 2).sum()) / n ** 2
        design = max(1.0, clustered / binomial)
    else:
        design = n / clusters  # p is 0 or 1 (or one cluster): each cluster counted once
    n_eff = n / design
    out.update({"value": p, "ci": wilson(p * n_eff, n_eff, level), "design_effect": float(design),
                "n_effective": float(n_eff)})
    return out


def format_estimate(value, interval=None, digits: int = 3, signed: bool = False, missing: str = "n/a",
                    reason: str | None = None) -> str:
    """``value [low, high]``, the one way a figure with its interval is written in tables and
    console lines: ``n/a`` for an undefined value, the value alone without an interval, and
    ``value (reason)`` when an interval was withheld for a stated reason (e.g. too few patients)."""
    def number(x) -> str:
        if x is None or not np.isfinite(x):
            return missing
        return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"

    text = number(value)
    if value is None or not np.isfinite(value):
        return text
    if interval:
        return f"{text} [{number(interval[0])}, {number(interval[1])}]"
    return f"{text} (no interval: {reason})" if reason else text
