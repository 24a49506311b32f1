"""Series of the cache: which rows form each series, in slice order, and labeled fractions drawn by series.

The order is the cache's own (``slice_index``, written by ``dicom_preprocess.cache.series_order``:
position along the series, ties by image id), so a series model sees a series exactly as the
neighbour links (``prev_index``/``next_index``, ``c.stack``) do. Two slices at one position are
two members; a series of one slice is a member list of length one.
"""
from __future__ import annotations

import numpy as np


def series_keys(cache, rows) -> np.ndarray:
    """The series of each row as ``"<study_uid>/<series_uid>"`` (a series uid alone may repeat across studies)."""
    frame = cache.manifest.iloc[np.asarray(rows, dtype=np.int64)]
    return (frame["study_uid"].astype(str) + "/" + frame["series_uid"].astype(str)).to_numpy(dtype=object)


def series_members(cache, rows) -> tuple[list[np.ndarray], np.ndarray]:
    """Group ``rows`` by series, each in slice order.

    Returns:
        (members, keys): ``members[k]`` the int64 rows of series ``keys[k]`` ordered by
        ``slice_index``; series ordered by key. Rows of a series that are not in ``rows`` are not
        added (a split holds whole series: splits group patients).
    """
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return [], np.zeros(0, dtype=object)
    keys = series_keys(cache, rows)
    order = np.lexsort((cache.manifest["slice_index"].to_numpy()[rows], keys))
    rows, keys = rows[order], keys[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ends = np.r_[starts[1:], len(rows)]
    return [rows[a:b] for a, b in zip(starts, ends)], keys[starts]


def exam_labels(cache, members: list[np.ndarray]) -> np.ndarray:
    """(n_series, 6) float32: a series is positive for a class when any of its slices is."""
    return np.stack([cache.labels(m).max(axis=0) for m in members]) if members else np.zeros((0, 6), np.float32)


def series_label_subset(cache, rows, fraction: float, seed: int) -> np.ndarray:
    """The rows of ``fraction`` of the series of ``rows``, drawn by series and stratified on the
    series' ``any`` label (:func:`dicom_preprocess.splits.label_subset` over series), sorted.

    Raises:
        ValueError: when ``fraction`` is outside (0, 1].
    """
    import pandas as pd

    from dicom_preprocess.splits import label_subset

    members, _ = series_members(cache, rows)
    if not members:
        return np.zeros(0, dtype=np.int64)
    any_exam = pd.Series(exam_labels(cache, members)[:, -1])
    keep = label_subset(any_exam, fraction, seed)
    return np.sort(np.concatenate([m for m, k in zip(members, keep) if k]))
