"""The predictions an evaluation was computed from, saved so that every figure can be recomputed.

One ``predictions.parquet`` per evaluation: per slice ``image_id``, ``group`` (the unit the splits
kept together and the bootstrap resamples: patient, else study), ``split``, the six labels
``label_<class>`` and the six probabilities ``prob_<class>``, as float64. Nothing is rounded: a
fine-tuned model's probabilities can sit near 1e-6, where six decimals collapse hundreds of
distinct values into ties and change the AUC (the audit of the demo found 0.632 recomputed from a
``%.6f`` file against 0.444 reported). The Kaggle submission CSV keeps its format and writes
:data:`SUBMISSION_FORMAT`, nine significant digits, which keeps the order of any two float32
probabilities that differ (float32 has 24 bits, under 7.3 decimal digits).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from dicom_preprocess import SUBTYPES

FILE = "predictions.parquet"
SUBMISSION_FORMAT = "%.9g"


def write_predictions(path: str, image_ids, groups, split, labels: np.ndarray, probs: np.ndarray) -> str:
    """Write one evaluation's slices (see the module docstring); ``split`` is a name or one per slice."""
    import os

    labels = np.asarray(labels, dtype=np.float64).reshape(-1, len(SUBTYPES))
    probs = np.asarray(probs, dtype=np.float64).reshape(-1, len(SUBTYPES))
    frame = pd.DataFrame({"image_id": np.asarray(image_ids, dtype=str), "group": np.asarray(groups, dtype=str),
                          "split": np.broadcast_to(np.asarray(split, dtype=object), (len(labels),))})
    for j, name in enumerate(SUBTYPES):
        frame[f"label_{name}"] = labels[:, j]
    for j, name in enumerate(SUBTYPES):
        frame[f"prob_{name}"] = probs[:, j]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    frame.to_parquet(path, index=False)
    return path


def read_predictions(path: str) -> dict:
    """``{"image_id", "group", "split", "labels" (N, 6), "probs" (N, 6)}`` of a :func:`write_predictions` file."""
    frame = pd.read_parquet(path)
    return {"image_id": frame["image_id"].to_numpy(), "group": frame["group"].to_numpy(),
            "split": frame["split"].to_numpy(),
            "labels": frame[[f"label_{c}" for c in SUBTYPES]].to_numpy(np.float64),
            "probs": frame[[f"prob_{c}" for c in SUBTYPES]].to_numpy(np.float64)}


EXAM_FILE = "exam_predictions.parquet"


def write_exam_predictions(path: str, series, groups, n_slices, split, labels: np.ndarray, probs: np.ndarray) -> str:
    """One row per series: ``series`` (study/series key), ``group``, ``n_slices``, ``split``, the
    six exam labels (a series is positive when any of its slices is) and the six exam probabilities."""
    import os

    labels = np.asarray(labels, dtype=np.float64).reshape(-1, len(SUBTYPES))
    probs = np.asarray(probs, dtype=np.float64).reshape(-1, len(SUBTYPES))
    frame = pd.DataFrame({"series": np.asarray(series, dtype=str), "group": np.asarray(groups, dtype=str),
                          "n_slices": np.asarray(n_slices, dtype=np.int64),
                          "split": np.broadcast_to(np.asarray(split, dtype=object), (len(labels),))})
    for j, name in enumerate(SUBTYPES):
        frame[f"label_{name}"] = labels[:, j]
    for j, name in enumerate(SUBTYPES):
        frame[f"prob_{name}"] = probs[:, j]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    frame.to_parquet(path, index=False)
    return path


def read_exam_predictions(path: str) -> dict:
    """``{"series", "group", "n_slices", "labels" (S, 6), "probs" (S, 6)}`` of a :func:`write_exam_predictions` file."""
    frame = pd.read_parquet(path)
    return {"series": frame["series"].to_numpy(), "group": frame["group"].to_numpy(),
            "n_slices": frame["n_slices"].to_numpy(),
            "labels": frame[[f"label_{c}" for c in SUBTYPES]].to_numpy(np.float64),
            "probs": frame[[f"prob_{c}" for c in SUBTYPES]].to_numpy(np.float64)}
