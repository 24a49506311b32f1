"""A folder of raw DICOM slices as a list of slices in series order (the MONAI bundle's datalist).

The cache orders a series' slices with :func:`dicom_preprocess.cache.series_order` (position
along the series, ties by image id, grouped by study and SeriesInstanceUID); a folder read here
is ordered by the same function on the same header fields, read by the same reader
(:func:`dicom_preprocess.reader.read_dicom`), so a 2.5D slice model sees the neighbours, and a
series model the sequence, that `medmoco predict` gives it. Each item names the files of its
slice and of its ``context`` neighbours on each side (clamped at the series' ends, as
``CTCache.stack`` does); :class:`medmoco.transforms.dicom.EncodeDicomd` reads them.
"""
from __future__ import annotations

import logging
import os

import numpy as np

log = logging.getLogger("medmoco.data.dicom_folder")


def series_datalist(folder: str, context: int = 0, modalities=("CT",)) -> list[dict]:
    """The usable DICOM slices under ``folder`` (recursive), grouped by series, in slice order.

    Returns:
        one dict per slice: ``image`` (the files of slices s-context .. s+context), ``image_id``
        (SOPInstanceUID, else the file's stem, as in the cache), ``series``
        (``"<study_uid>/<series_uid>"``) and ``slice_index``. A file that is not a usable slice
        is left out with a warning naming it and the reason.

    Raises:
        FileNotFoundError: when ``folder`` does not exist.
        ValueError: when it holds no usable slice.
    """
    import pandas as pd

    from dicom_preprocess.cache import series_order
    from dicom_preprocess.reader import SkipImage, read_dicom
    from dicom_preprocess.sources import InputArchive

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"dataset_dir {folder}: no such folder")
    archive = InputArchive(folder)
    records, skipped = [], 0
    for source in archive.list():
        path = archive.local_path(source)
        reason = source.skip_reason or ("" if source.kind == "dicom" else "not a DICOM file (volumes: medmoco predict)")
        if not reason:
            try:
                # the whole reader, not a header parse: an image it refuses here would be refused later
                image = read_dicom(path, source.name, modalities=tuple(modalities) or None)
                records.append({"path": path, "image_id": image.image_id, "study_uid": image.study_uid,
                                "series_uid": image.series_uid, "z": image.z})
                continue
            except SkipImage as err:
                reason = str(err)
        skipped += 1
        log.warning("%s: %s; skipped", source.name, reason)
    if not records:
        raise ValueError(f"dataset_dir {folder}: no usable DICOM slice ({skipped} files skipped)")
    frame = series_order(pd.DataFrame(records))  # rows 0..n-1; prev/next_index name rows
    paths = frame["path"].to_numpy()
    prev_index, next_index = frame["prev_index"].to_numpy(), frame["next_index"].to_numpy()
    items = []
    for row in frame.sort_values(["study_uid", "series_uid", "slice_index"], kind="mergesort").index.to_numpy():
        before, after = [row], [row]
        for _ in range(int(context)):  # CTCache.neighbours: step along the series, clamped at its ends
            before.append(prev_index[before[-1]])
            after.append(next_index[after[-1]])
        neighbours = before[:0:-1] + after
        items.append({"image": [str(paths[i]) for i in neighbours], "image_id": frame.at[row, "image_id"],
                      "series": f"{frame.at[row, 'study_uid']}/{frame.at[row, 'series_uid']}",
                      "slice_index": int(frame.at[row, "slice_index"])})
    return items


def series_batches(datalist: list[dict]) -> list[list[int]]:
    """Indices of ``datalist`` (in series order) grouped into one batch per series: the
    ``batch_sampler`` of a series model, which must see each series whole and alone."""
    keys = np.array([item["series"] for item in datalist], dtype=object)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], len(keys)]
    return [list(range(a, b)) for a, b in zip(starts, ends)]
