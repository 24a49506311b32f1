"""Patient-grouped splits and the stratified labeled fraction.

No patient is in two splits: slices of one patient are near-duplicates, and a split by slice
would leak them from training into testing. The RSNA lab's split of 752,801 slices was
564,601 unsupervised / 150,560 train / 37,640 test, i.e. 0.75 / 0.20 / 0.05 (the defaults).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

SPLITS = ("unsupervised", "train", "test")


def patient_splits(patient_ids: pd.Series, fractions: Mapping[str, float], seed: int) -> np.ndarray:
    """Assign every row a split, grouping rows by patient.

    Patients are shuffled with ``seed`` and laid along the cumulative slice count; a patient goes
    to the split whose share of the slice count holds the middle of its slices.

    Returns:
        An array of split names, one per row.

    Raises:
        ValueError: when fractions are negative or do not sum to 1.
    """
    names = list(fractions)
    shares = np.array([float(fractions[n]) for n in names])
    if (shares < 0).any() or not np.isclose(shares.sum(), 1.0):
        raise ValueError(f"split fractions {dict(fractions)}: must be >= 0 and sum to 1")
    counts = patient_ids.value_counts(sort=False)
    patients = np.array(sorted(counts.index))
    order = np.random.default_rng(seed).permutation(len(patients))
    sizes = counts.loc[patients[order]].to_numpy()
    middle = (np.cumsum(sizes) - sizes / 2.0) / sizes.sum()
    bounds = np.cumsum(shares)
    which = np.minimum(np.searchsorted(bounds, middle, side="right"), len(names) - 1)
    assignment = dict(zip(patients[order], np.array(names)[which]))
    return patient_ids.map(assignment).to_numpy()


def label_subset(labels_any: pd.Series, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask selecting ``fraction`` of the rows, stratified on the ``any`` label.

    Each value of ``any`` keeps ``round(fraction * n)`` of its rows (at least one where
    ``fraction > 0`` and the class is present), so the positive rate of the subset equals the
    pool's up to rounding.

    Raises:
        ValueError: when ``fraction`` is outside (0, 1].
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label_fraction {fraction}: must be in (0, 1]")
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels_any), dtype=bool)
    values = labels_any.to_numpy()
    for value in np.unique(values):
        rows = np.flatnonzero(values == value)
        take = max(1, int(round(fraction * len(rows))))
        mask[rng.choice(rows, size=take, replace=False)] = True
    return mask
