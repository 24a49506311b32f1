"""Saved predictions reproduce every figure of the evaluation they belong to."""
import json

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from dicom_preprocess import SUBTYPES
from medmoco.evaluation import evaluate_split
from medmoco.predictions import read_predictions
from medmoco.reports import write_evaluation


def _tiny_probabilities(rng, patients=40, slices=10):
    """A confident model's probabilities: all near 1e-6, distinct only past the sixth decimal."""
    group = np.repeat([f"P{i}" for i in range(patients)], slices)
    labels = (rng.random((patients, 6)) < 0.4)[np.repeat(np.arange(patients), slices)].astype(np.float32)
    logits = -13.8 + 0.8 * labels + rng.normal(0, 0.5, labels.shape)
    probs = (1 / (1 + np.exp(-logits))).astype(np.float32)
    return group, labels, probs


def test_metrics_json_recomputes_from_the_saved_predictions_alone(tmp_path):
    rng = np.random.default_rng(0)
    group, labels, probs = _tiny_probabilities(rng)
    thresholds = {name: float(np.quantile(probs[:, j], 0.6)) for j, name in enumerate(SUBTYPES)}
    evaluation = evaluate_split(labels, probs, group, thresholds, replicates=200, seed=3)
    ids = [f"ID_{i:06x}" for i in range(len(labels))]
    write_evaluation(str(tmp_path), labels, probs, evaluation, {"split": "test"},
                     {"image_ids": ids, "groups": group, "split": "test"})
    reported = json.loads((tmp_path / "metrics.json").read_text())
    assert reported["predictions"] == "predictions.parquet"
    saved = read_predictions(str(tmp_path / reported["predictions"]))
    assert (saved["split"] == "test").all() and list(saved["image_id"]) == ids
    thresholds_read = {name: e["threshold"] for name, e in reported["classes"].items()}
    again = evaluate_split(saved["labels"], saved["probs"], saved["group"], thresholds_read, replicates=200,
                           seed=3)
    again = json.loads(json.dumps(again))
    assert again == {k: reported[k] for k in again}  # every figure, every interval, exactly


def test_the_kaggle_csv_keeps_enough_digits_for_the_auc(tmp_path):
    from pipelines.evaluate import write_submission

    rng = np.random.default_rng(1)
    _, labels, probs = _tiny_probabilities(rng)
    ids = [f"ID_{i:06x}" for i in range(len(labels))]
    path = write_submission(ids, probs, str(tmp_path / "predictions.csv"))
    read = pd.read_csv(path)["Label"].to_numpy().reshape(-1, 6)
    assert len(np.unique(read[:, 0])) == len(np.unique(probs[:, 0]))  # no value collapsed into another
    for j in range(6):
        assert roc_auc_score(labels[:, j], read[:, j]) == roc_auc_score(labels[:, j], probs[:, j])
    six = np.round(probs[:, 0].astype(np.float64), 6)  # the former %.6f: ties everywhere, another AUC
    assert abs(roc_auc_score(labels[:, 0], six) - roc_auc_score(labels[:, 0], probs[:, 0])) > 0.01
