"""Patient-grouped splits and the stratified labeled fraction.

No patient is in two splits: slices of one patient are near-duplicates, and a split by slice
would leak them from training into testing. Four splits: ``unsupervised`` (MoCo pretraining),
``train`` (the labeled pool fine-tuning draws its label fraction from), ``val`` (every choice:
epoch, early stop, thresholds) and ``test`` (read once, at the end). The RSNA lab's split of
752,801 slices was 564,601 unsupervised / 150,560 train / 37,640 test; the defaults keep its
unsupervised and test shares and take a validation share from train: 0.75 / 0.15 / 0.05 / 0.05.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

SPLITS = ("unsupervised", "train", "val", "test")
DEFAULT_FRACTIONS = {"unsupervised": 0.75, "train": 0.15, "val": 0.05, "test": 0.05}


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


def check_fractions(fractions: Mapping[str, float]) -> dict:
    """``fractions`` as floats, checked: keys among :data:`SPLITS`, values >= 0 summing to 1.

    Raises:
        ValueError: naming what is wrong.
    """
    unknown = sorted(set(fractions) - set(SPLITS))
    if unknown:
        raise ValueError(f"split fractions {dict(fractions)}: unknown split(s) {unknown}; use {list(SPLITS)}")
    try:
        out = {name: float(fractions[name]) for name in SPLITS if name in fractions}
    except (TypeError, ValueError):
        raise ValueError(f"split fractions {dict(fractions)}: values must be numbers") from None
    if any(v < 0 for v in out.values()) or abs(sum(out.values()) - 1.0) > 1e-6:
        raise ValueError(f"split fractions {dict(fractions)}: must be >= 0 and sum to 1")
    return out


def parse_fractions(text: str) -> dict:
    """``"unsupervised=0.75,train=0.15,val=0.05,test=0.05"`` -> checked fractions."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"split fractions {text!r}: expected name=value pairs, e.g. {_example()}")
        out[name.strip()] = value.strip()
    return check_fractions(out)


def _example() -> str:
    return ",".join(f"{k}={v}" for k, v in DEFAULT_FRACTIONS.items())


def assign_splits(manifest: pd.DataFrame, fractions: Mapping[str, float], seed: int,
                  label_fraction: float) -> pd.DataFrame:
    """``manifest`` with its ``split`` (grouped by patient, else study) and ``in_label_subset``
    (``label_fraction`` of the labeled train split, stratified on ``any``) columns set."""
    manifest = manifest.copy()
    group = manifest["patient_id"].where(manifest["patient_id"] != "", manifest["study_uid"])
    manifest["split"] = patient_splits(group, fractions, seed) if len(manifest) else np.array([], dtype=object)
    manifest["in_label_subset"] = False
    pool = np.flatnonzero((manifest["split"] == "train").to_numpy() & manifest["labeled"].to_numpy())
    if len(pool):
        chosen = label_subset(manifest["any"].iloc[pool], label_fraction, seed)
        manifest.loc[pool[chosen], "in_label_subset"] = True
    return manifest


def split_fingerprints(manifest: pd.DataFrame, label_columns) -> dict:
    """A hash per split of its image ids and their labels: two evaluations were made on the same
    images with the same labels exactly when their split fingerprints are equal."""
    import hashlib

    out = {}
    for name, part in manifest.groupby("split", sort=True):
        part = part.sort_values("image_id")
        digest = hashlib.sha256()
        for row in zip(part["image_id"], *(part[c] for c in label_columns), part["labeled"]):
            digest.update(("\t".join(str(v) for v in row) + "\n").encode())
        out[str(name)] = digest.hexdigest()[:16]
    return out
