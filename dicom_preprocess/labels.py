"""RSNA label CSV (long format) -> one row per image with six subtype columns.

``stage_2_train.csv`` has columns ``ID,Label``; ``ID`` is ``ID_<imageid>_<subtype>``, six rows
per image in the order of :data:`SUBTYPES`. The stage-1 file has duplicated rows (e.g.
``ID_a64d5deed``): duplicates are dropped. Submissions use the same format with probabilities.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

SUBTYPES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")


@dataclass
class LabelReport:
    """What parsing found besides the labels (printed by the job and stored in the cache)."""

    rows: int = 0
    duplicate_rows: int = 0
    conflicting_duplicates: list = field(default_factory=list)
    malformed_rows: list = field(default_factory=list)  # (line number, text, reason)
    unknown_subtypes: dict = field(default_factory=dict)
    incomplete_images: list = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.rows} rows"]
        if self.duplicate_rows:
            parts.append(f"{self.duplicate_rows} duplicate rows dropped")
        if self.malformed_rows:
            parts.append(f"{len(self.malformed_rows)} malformed rows skipped")
        if self.unknown_subtypes:
            parts.append(f"unknown subtypes {dict(self.unknown_subtypes)} skipped")
        if self.incomplete_images:
            parts.append(f"{len(self.incomplete_images)} images lack some subtypes (missing = 0)")
        if self.conflicting_duplicates:
            parts.append(f"{len(self.conflicting_duplicates)} images have conflicting duplicates (max kept)")
        return ", ".join(parts)


def check_label_header(path: str) -> None:
    """Raises ValueError unless ``path`` starts with the RSNA header ``ID,Label``."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        header = handle.readline().strip().lstrip("\ufeff")
    if [c.strip() for c in header.split(",")[:2]] != ["ID", "Label"]:
        raise ValueError(f"{path}: expected columns ID,Label (RSNA long format), got {header[:80]!r}")


def read_rsna_labels(path: str) -> tuple[pd.DataFrame, LabelReport]:
    """Parse an RSNA long-format CSV.

    Returns:
        A frame indexed by ``image_id`` with one uint8 column per subtype, and a report.

    Raises:
        ValueError: when the file lacks the ``ID`` and ``Label`` columns.
    """
    report = LabelReport()
    check_label_header(path)
    raw = pd.read_csv(path, dtype=str, keep_default_na=False, on_bad_lines="skip")
    report.rows = len(raw)
    with open(path, "rb") as handle:  # the C parser drops lines with extra fields silently: count them
        lines = sum(1 for line in handle if line.strip()) - 1
    if lines > len(raw):
        report.malformed_rows.append((0, f"{lines - len(raw)} lines", "more fields than ID,Label; skipped"))
    ids = raw["ID"].str.strip()
    image_id, _, subtype = ids.str.rpartition("_").values.T
    label = pd.to_numeric(raw["Label"].str.strip(), errors="coerce")
    frame = pd.DataFrame({"image_id": image_id, "subtype": subtype, "label": label, "line": raw.index + 2})
    bad = (frame["image_id"] == "") | frame["label"].isna() | ~frame["label"].isin([0, 1])
    for row in frame[bad].itertuples():
        report.malformed_rows.append((int(row.line), ids.iloc[row.Index], "expected ID_<image>_<subtype>,0|1"))
    frame = frame[~bad]
    unknown = ~frame["subtype"].isin(SUBTYPES)
    if unknown.any():
        report.unknown_subtypes = frame.loc[unknown, "subtype"].value_counts().to_dict()
    frame = frame[~unknown]
    dup = frame.duplicated(["image_id", "subtype", "label"])
    report.duplicate_rows = int(dup.sum())
    frame = frame[~dup]
    conflicts = frame.duplicated(["image_id", "subtype"], keep=False)
    report.conflicting_duplicates = sorted(frame.loc[conflicts, "image_id"].unique().tolist())
    wide = frame.pivot_table(index="image_id", columns="subtype", values="label", aggfunc="max")
    counts = wide.notna().sum(axis=1)
    report.incomplete_images = sorted(wide.index[counts < len(SUBTYPES)].tolist())
    wide = wide.reindex(columns=list(SUBTYPES)).fillna(0).astype(np.uint8)
    wide.columns.name = None
    return wide, report


def write_long_format(image_ids, values, path: str, float_format: str | None = None) -> str:
    """The RSNA long format: ``ID,Label`` with six rows ``ID_<image>_<subtype>`` per image.

    The one writer of both label files (0/1) and Kaggle submissions (probabilities, e.g.
    ``float_format="%.6f"``).

    Args:
        image_ids: N image ids (``ID_...``).
        values: (N, 6) in :data:`SUBTYPES` order.
    """
    import os

    ids = np.repeat(np.asarray(image_ids, dtype=str), len(SUBTYPES))
    subtypes = np.tile(np.array(SUBTYPES), len(ids) // len(SUBTYPES))
    rows = pd.DataFrame({"ID": np.char.add(np.char.add(ids, "_"), subtypes),
                         "Label": np.asarray(values).reshape(-1)})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rows.to_csv(path, index=False, float_format=float_format)
    return path


def write_rsna_labels(labels: pd.DataFrame, path: str) -> None:
    """Write a frame indexed by image id with subtype columns in RSNA long format."""
    write_long_format(labels.index.to_numpy(dtype=str), labels[list(SUBTYPES)].to_numpy(), path)
