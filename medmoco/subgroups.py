"""Figures per acquisition subgroup: AUC and counts per manufacturer and slice-thickness band.

A model can work on one scanner and not on another, or on thick slices and not on thin ones; a
clinical reader asks for the figures per subgroup (the acquisition tags are kept in the cache
manifest: :mod:`dicom_preprocess.acquisition`). Each subgroup gets its slice and unit (patient,
else study) counts and per class the positive/negative units and the AUC where it has both
labels; no interval (subgroups are small, and a reader compares them to the whole split's). A
subgroup below the minimum of positive or negative units for a class is flagged, not hidden.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from dicom_preprocess import SUBTYPES

from .evaluation import class_counts
from .intervals import MIN_GROUPS, format_estimate
from .metrics import per_class_auc

# (upper bound in mm, label): thin reconstructions, intermediate, the RSNA set's usual 5 mm
THICKNESS_BANDS = ((1.5, "<= 1.5 mm"), (3.0, "1.5-3 mm"), (float("inf"), "> 3 mm"))


def thickness_band(values) -> np.ndarray:
    """The band of each SliceThickness text (``"unknown"`` when empty or not a number)."""
    numbers = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(dtype=np.float64)
    out = np.full(len(numbers), "unknown", dtype=object)
    lower = 0.0
    for upper, label in THICKNESS_BANDS:
        out[(numbers > lower) & (numbers <= upper)] = label
        lower = upper
    return out


def acquisition_attributes(manifest: pd.DataFrame) -> dict:
    """``{"manufacturer": (N,), "slice_thickness": (N,) bands}`` of manifest rows (``"unknown"``
    for a missing tag; empty when the cache predates the acquisition columns)."""
    out = {}
    if "manufacturer" in manifest:
        out["manufacturer"] = manifest["manufacturer"].astype(str).replace("", "unknown").to_numpy(dtype=object)
    if "slice_thickness" in manifest:
        out["slice_thickness"] = thickness_band(manifest["slice_thickness"].to_numpy())
    return out


def subgroup_table(labels: np.ndarray, probs: np.ndarray, groups, attributes: dict,
                   min_groups: int = MIN_GROUPS) -> dict:
    """``{attribute: {value: {"n_images", "n_units", "auc_mean", "classes": {class: {"auc",
    "positive_groups", "negative_groups", "few"}}}}}`` (see the module docstring)."""
    labels = np.asarray(labels, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    groups = np.asarray(groups).astype(str)
    out = {}
    for attribute, values in attributes.items():
        values = np.asarray(values, dtype=object)
        table = {}
        for value in sorted(set(values)):
            rows = values == value
            auc = per_class_auc(labels[rows], probs[rows])
            counts = class_counts(labels[rows], groups[rows])
            classes = {}
            for name in SUBTYPES:
                c = counts[name]
                classes[name] = {"auc": None if np.isnan(auc[name]) else float(auc[name]),
                                 "positive_groups": c["positive_groups"], "negative_groups": c["negative_groups"],
                                 "few": bool(min(c["positive_groups"], c["negative_groups"]) < min_groups)}
            table[str(value)] = {"n_images": int(rows.sum()), "n_units": int(len(set(groups[rows]))),
                                 "auc_mean": None if np.isnan(auc["mean"]) else float(auc["mean"]), "classes": classes}
        out[attribute] = table
    return out


def markdown(subgroups: dict) -> str:
    """One table per attribute: counts and AUC per class (``n/a`` where undefined, ``*`` where a
    class has fewer than the minimum of positive or negative units in the subgroup)."""
    lines = []
    for attribute, table in subgroups.items():
        title = attribute.replace("_", " ")
        lines += ["", f"Subgroups by {title} (AUC; positive/negative units; * below the minimum):",
                  "", f"| {attribute} | slices | units | mean AUC | " + " | ".join(SUBTYPES) + " |",
                  "|---|---|---|---|" + "---|" * len(SUBTYPES)]
        for value, entry in table.items():
            cells = [f"{format_estimate(c['auc'])}{'*' if c['few'] else ''} "
                     f"({c['positive_groups']}/{c['negative_groups']})" for c in entry["classes"].values()]
            lines.append(f"| {value} | {entry['n_images']} | {entry['n_units']} | "
                         f"{format_estimate(entry['auc_mean'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def add_reader_tables(evaluation: dict, cache, rows, probs, min_groups: int = MIN_GROUPS) -> dict:
    """``counts_by_split`` (per split and class: units, slices, prevalence) and ``subgroups`` (per
    manufacturer and slice-thickness band) of the evaluated ``rows`` into ``evaluation``."""
    from .evaluation import counts_by_split

    evaluation["counts_by_split"] = counts_by_split(cache)
    attributes = acquisition_attributes(cache.manifest.iloc[rows])
    evaluation["subgroups"] = subgroup_table(cache.labels(rows), probs, cache.groups(rows), attributes, min_groups)
    return evaluation
