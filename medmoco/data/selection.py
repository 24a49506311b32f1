"""Which cache rows a fine-tuning run trains on: the label fraction, plus slices labeled later."""
from __future__ import annotations

import numpy as np


def train_indices(cache, split: str, label_fraction: float, subset_seed: int, extra=None,
                  exclude_splits: tuple = (), unit: str = "slice"):
    """(rows, labels) used for training: ``label_fraction`` of the labeled ``split`` (stratified on
    ``any``, seeded by ``subset_seed``, so every mode and trial of a fraction sees the same
    slices) plus the slices of ``extra`` (labels from that frame, indexed by image id).

    Args:
        unit: ``slice`` draws the fraction over slices; ``series`` over whole series (every
            slice of a drawn series, :func:`medmoco.data.series.series_label_subset`), which a
            series head needs and which pairs a slice head with it on the same labels.
        extra: a frame indexed by image id with the six subtype columns, or None.
        exclude_splits: extra slices of these splits are never added (no training on evaluation data).

    Returns:
        rows (int64), labels float32 (N, 6), number of extra slices added, extra ids not in the cache.

    Raises:
        ValueError: when the split holds no labeled image.
    """
    from dicom_preprocess.splits import label_subset

    rows = cache.indices(split, labeled=True)
    if len(rows) == 0:
        raise ValueError(f"cache {cache.root}: split {split!r} has no labeled images")
    if unit == "series":
        from .series import series_label_subset

        rows = series_label_subset(cache, rows, label_fraction, subset_seed)
    elif unit == "slice":
        any_col = cache.manifest["any"].iloc[rows].reset_index(drop=True)
        rows = rows[label_subset(any_col, label_fraction, subset_seed)]
    else:
        raise ValueError(f"label unit {unit!r}: use slice or series")
    labels = cache.labels(rows)
    added, missing = 0, []
    if extra is not None and len(extra):
        position = {img: i for i, img in enumerate(cache.manifest["image_id"].to_numpy())}
        present = set(cache.manifest["split"])
        excluded = {int(r) for s in exclude_splits if s in present for r in cache.indices(s)}
        have = set(rows.tolist())
        new_rows, new_labels = [], []
        for image_id, values in zip(extra.index, extra.to_numpy(np.float32)):
            row = position.get(image_id)
            if row is None:
                missing.append(image_id)
            elif row not in have and row not in excluded:
                new_rows.append(row)
                new_labels.append(values)
                have.add(row)
        if new_rows:
            rows = np.concatenate([rows, np.array(new_rows, dtype=np.int64)])
            labels = np.concatenate([labels, np.stack(new_labels)])
            added = len(new_rows)
    return rows, labels, added, missing
