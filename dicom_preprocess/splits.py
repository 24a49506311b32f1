"""Patient-grouped splits and the stratified labeled fraction.

No patient is in two splits: slices of one patient are near-duplicates, and a split by slice
would leak them from training into testing. Four splits: ``unsupervised`` (MoCo pretraining),
``train`` (the labeled pool fine-tuning draws its label fraction from), ``val`` (every choice:
epoch, early stop, thresholds) and ``test`` (read once, at the end); optionally a fifth,
``release``, on which promotion compares candidates, so that no release decision is taken on
``test`` (a split that decides releases turns the champion's figure on it into a selected
maximum). The RSNA lab's split of
752,801 slices was 564,601 unsupervised / 150,560 train / 37,640 test; the defaults keep its
unsupervised and test shares and take a validation share from train: 0.75 / 0.15 / 0.05 / 0.05.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from .labels import SUBTYPES

# ``release``: optional (no default share), read only to decide which model is released, so that the
# ``test`` figures stay a single, unselected read (`medmoco split --fractions ...,release=0.05`).
SPLITS = ("unsupervised", "train", "val", "test", "release")
DEFAULT_FRACTIONS = {"unsupervised": 0.75, "train": 0.15, "val": 0.05, "test": 0.05}
# Patients are stratified on these; "any" adds nothing, every positive has a subtype.
STRATIFY_ON = tuple(name for name in SUBTYPES if name != "any")
# Recorded in metadata.json and the cache fingerprint: the same fractions and seed under another
# method are other splits.
SPLIT_METHOD = "patients, iterative stratification on the subtypes, repaired at the boundary"
# The unit splits keep together, and the only unit a statistic resamples or counts: a slice without
# PatientID is grouped with its study (its own patient, as far as anyone can tell). Recorded in
# metadata.json as ``group_unit``.
GROUP_UNIT = "patient, else study"


def group_ids(manifest: pd.DataFrame) -> np.ndarray:
    """The grouping unit of every row: ``patient_id``, or ``study_uid`` where the patient id is empty.

    Splits are drawn over these groups and every bootstrap, threshold count and comparison
    resamples them; using the raw ``patient_id`` instead would make all ID-less slices one unit.
    """
    # no prefix on the study uid: the splits of caches made before this function stay as they were
    patients = manifest["patient_id"].astype(str)
    return patients.where(patients != "", manifest["study_uid"].astype(str)).to_numpy(dtype=object)


def patient_splits(patient_ids: pd.Series, fractions: Mapping[str, float], seed: int,
                   positives: pd.DataFrame | None = None, labeled: pd.Series | None = None) -> np.ndarray:
    """Assign every row a split, grouping rows by patient, stratified on ``positives``.

    Iterative stratification (Sechidis, Tsoumakas & Vlahavas, ECML 2011) over patients: take the
    class with the fewest unassigned patients, send each of them (in a seeded shuffle) to the split
    that still wants most slices of that class's patients, on a tie the one that wants most slices;
    count the patient's slices against every class it has; repeat. Having labels counts as one
    more class (the commonest, so it comes last); the rest go to the split that wants most slices
    (placing by slices, not heads, keeps slice shares at ``fractions``). Each split so
    holds about its share of every class's patients and slice shares stay close to ``fractions``.
    Placing by slices can still leave a split without a class at the boundary (exactly
    ``1 / share`` patients of it); :func:`_repair_missing_classes` then swaps patients of similar
    size, so a class with at least ``1 / share`` patients is in every split of that share. Without it a rare subtype
    lands where chance puts it: the experiment's 22-patient test split once held none of its 21
    epidural patients.

    Args:
        patient_ids: one per row.
        fractions: split name -> share of the slices, summing to 1.
        seed: the shuffle and the tie-breaks.
        positives: one row per row of ``patient_ids``, a 0/1 column per class to stratify on; a
            patient has a class when any of its rows does. ``None``: slices only.
        labeled: per row, whether it has labels; labeled patients are stratified as a class.

    Returns:
        An array of split names, one per row.

    Raises:
        ValueError: when fractions are negative or do not sum to 1.
    """
    names = list(fractions)
    shares = np.array([float(fractions[n]) for n in names])
    if (shares < 0).any() or not np.isclose(shares.sum(), 1.0):
        raise ValueError(f"split fractions {dict(fractions)}: must be >= 0 and sum to 1")
    group = patient_ids.to_numpy()
    sizes = patient_ids.value_counts(sort=False)
    patients = np.array(sorted(sizes.index))
    sizes = sizes.loc[patients].to_numpy(dtype=float)
    has = np.zeros((len(patients), 0), dtype=bool)
    if positives is not None and positives.shape[1]:
        has = (pd.DataFrame(positives.to_numpy() > 0).groupby(group).max().loc[patients].to_numpy())
    if labeled is not None:  # "has labels" as one more class: each split gets its share of them
        any_label = pd.Series(np.asarray(labeled, dtype=bool)).groupby(group).max().loc[patients].to_numpy()
        has = np.column_stack([has, any_label])

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(patients))
    closed = np.where(shares > 0, 0.0, -np.inf)  # a split with no share never takes anyone
    want_class = shares[:, None] * (has * sizes[:, None]).sum(axis=0)[None, :] + closed[:, None]
    want_slices = shares * sizes.sum() + closed
    split = np.full(len(patients), -1)

    def place(patient: int, preference: np.ndarray) -> None:
        best = np.flatnonzero(preference == preference.max())  # exact ties: equal shares at the start
        if len(best) > 1:
            best = best[want_slices[best] == want_slices[best].max()]
        chosen = best[0] if len(best) == 1 else rng.choice(best)
        split[patient] = chosen
        want_class[chosen] -= has[patient] * sizes[patient]
        want_slices[chosen] -= sizes[patient]

    while True:
        left = has[order] & (split[order] < 0)[:, None]
        counts = left.sum(axis=0)
        if not counts.any():
            break
        rarest = int(np.argmin(np.where(counts > 0, counts, np.iinfo(counts.dtype).max)))
        for patient in order[left[:, rarest]]:
            place(patient, want_class[:, rarest])
    for patient in order[split[order] < 0]:
        place(patient, want_slices)
    split = _repair_missing_classes(split, has, sizes, shares)
    assignment = dict(zip(patients, np.array(names)[split]))
    return patient_ids.map(assignment).to_numpy()


def _repair_missing_classes(split: np.ndarray, has: np.ndarray, sizes: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Swap patients so that every split holds each class it has patients enough for.

    Iterative stratification places most patients well but, by slices, can leave a split without
    a class at the boundary (20 epidural patients of 500 at a 0.05 share: 3 of 200 seeds left val
    or test without one). A split "has enough" of a class when ``share x patients of the class >= 1``.
    For each split lacking such a class: of the class's patients in splits holding two or more of
    them, and the lacking split's patients without the class, swap the pair closest in slices,
    among pairs whose move leaves no split without a class it already held and needs (so a repair
    never breaks another). Slice shares move by the size difference of the pair only.
    Deterministic given the placement; bounded by the number of patients.
    """
    if not has.shape[1]:
        return split
    splits = len(shares)
    needs = (shares[:, None] * has.sum(axis=0)[None, :] >= 1 - 1e-9) & (shares[:, None] > 0)  # (S, C)
    for _ in range(len(split)):
        held = np.stack([np.bincount(split[has[:, c]], minlength=splits) for c in range(has.shape[1])], axis=1)
        missing = np.argwhere(needs & (held == 0))
        if not len(missing):
            break
        swapped = False
        for target, c in missing:
            # a patient may leave split k only if every class it has that k needs stays in k
            can_leave = np.all(~has | (held >= 2)[split] | ~needs[split], axis=1)
            donors = np.flatnonzero(has[:, c] & (split != target) & can_leave)
            partners = np.flatnonzero(~has[:, c] & (split == target) & can_leave)
            if not len(donors) or not len(partners):
                continue
            partners = partners[np.argsort(sizes[partners], kind="mergesort")]
            at = np.searchsorted(sizes[partners], sizes[donors])  # nearest size: a neighbour of the insertion point
            near = np.stack([np.clip(at - 1, 0, len(partners) - 1), np.clip(at, 0, len(partners) - 1)], axis=1)
            gap = np.abs(sizes[partners][near] - sizes[donors][:, None])
            i, k = np.unravel_index(np.argmin(gap), gap.shape)
            donor, partner = donors[i], partners[near[i, k]]
            split[partner], split[donor] = split[donor], target
            swapped = True
            break
        if not swapped:
            break
    return split


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
    """``manifest`` with its ``split`` (grouped by patient, else study; stratified on the subtypes,
    :func:`patient_splits`) and ``in_label_subset``
    (``label_fraction`` of the labeled train split, stratified on ``any``) columns set."""
    # One order whatever the caller's dict, since the assignment depends on it: sorted by name, the
    # order preprocessing has always used (its settings come back from the job record's JSON with
    # sorted keys). `medmoco split` passed them in SPLITS order and swapped val and test.
    fractions = dict(sorted(check_fractions(fractions).items()))
    manifest = manifest.copy()
    group = pd.Series(group_ids(manifest), index=manifest.index)
    if len(manifest):
        # unlabeled rows hold 0 in every subtype column
        manifest["split"] = patient_splits(group, fractions, seed, manifest[list(STRATIFY_ON)], manifest["labeled"])
    else:
        manifest["split"] = np.array([], dtype=object)
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
