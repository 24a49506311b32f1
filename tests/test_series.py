"""The series head: the model (ordering, padding, duplicates, single slices, neighbours), the
series data layer, the `medmoco series` stage on a learnable task, and every loader of a series
model (evaluate, predict --series-out, the registered pyfunc, review --compare)."""
import os

import numpy as np
import pandas as pd
import pytest
import torch

from dicom_preprocess import SUBTYPES
from dicom_preprocess.cache import open_cache, series_order
from medmoco.data.series import exam_labels, series_label_subset, series_members
from medmoco.models.series import SeriesHead


def _head(features=8, seed=0):
    torch.manual_seed(seed)
    return SeriesHead(features, hidden=6, dropout=0.0).eval()


# --- the head -----------------------------------------------------------------------------------

def test_a_slice_reads_its_neighbours_and_not_another_series():
    head = _head()
    torch.manual_seed(1)
    a, b = torch.randn(5, 8), torch.randn(3, 8)
    x = torch.zeros(2, 5, 8)
    x[0], x[1, :3] = a, b
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    with torch.no_grad():
        slices, exams = head(x, mask)
        changed = x.clone()
        # not a constant shift: LayerNorm removes that from every slice's features
        changed[0, 3] += torch.randn(8)  # the neighbour of slice 2 of series 0
        slices_n, exams_n = head(changed, mask)
        other = x.clone()
        other[1, 1] += torch.randn(8)  # another series of the batch
        slices_o, exams_o = head(other, mask)
        padding = x.clone()
        padding[1, 3:] = 99.0 * torch.randn(2, 8)  # what lies past a series' end
        slices_p, _ = head(padding, mask)
    assert not torch.allclose(slices[0, 2], slices_n[0, 2])  # a neighbour moves the slice's prediction
    assert not torch.allclose(exams[0], exams_n[0])
    torch.testing.assert_close(slices[0], slices_o[0])  # another series does not
    torch.testing.assert_close(exams[0], exams_o[0])
    torch.testing.assert_close(slices[1, :3], slices_p[1, :3])  # nor does padding
    alone, alone_exam = head(b[None])  # a series alone equals the same series in a padded batch
    torch.testing.assert_close(alone[0], slices[1, :3], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(alone_exam[0], exams[1], atol=1e-6, rtol=1e-5)


def test_order_matters_and_single_slices_and_empty_series():
    head = _head()
    torch.manual_seed(2)
    x = torch.randn(1, 6, 8)
    with torch.no_grad():
        forward, _ = head(x)
        reverse, _ = head(x.flip(1))
        one, one_exam = head(x[:, :1])
    # the bidirectional GRU sees the sequence, so reversing it changes the slices' outputs
    assert not torch.allclose(forward[0], reverse[0].flip(0))
    assert one.shape == (1, 1, 6) and one_exam.shape == (1, 6) and torch.isfinite(one).all()
    with pytest.raises(ValueError, match="without slices"):
        head(x, torch.zeros(1, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="series, slices, features"):
        head(x[0])


# --- the data layer -----------------------------------------------------------------------------

class _Manifest:
    """The parts of a CTCache the series layer reads, over a hand-written manifest."""

    def __init__(self, frame):
        self.manifest = series_order(frame)

    def labels(self, rows=None):
        frame = self.manifest if rows is None else self.manifest.iloc[np.asarray(rows)]
        return frame[list(SUBTYPES)].to_numpy(np.float32)

    def groups(self, rows=None):
        frame = self.manifest if rows is None else self.manifest.iloc[np.asarray(rows)]
        return frame["patient_id"].to_numpy(dtype=object)


def _manifest():
    rows = []
    # series A: 4 slices given out of order, two of them at one position (z = 10)
    for image, z, any_ in (("a3", 20.0, 0), ("a1", 10.0, 1), ("a0", 0.0, 0), ("a2", 10.0, 1)):
        rows.append({"image_id": image, "patient_id": "p1", "study_uid": "s1", "series_uid": "A", "z": z, "any": any_})
    rows.append({"image_id": "b0", "patient_id": "p2", "study_uid": "s2", "series_uid": "B", "z": 5.0, "any": 0})
    for k in range(3):
        rows.append({"image_id": f"c{k}", "patient_id": "p3", "study_uid": "s3", "series_uid": "C", "z": float(k),
                     "any": 0})
    frame = pd.DataFrame(rows)
    for c in SUBTYPES[:-1]:
        frame[c] = 0
    frame["intraparenchymal"] = frame["any"]
    return _Manifest(frame)


def test_series_members_are_whole_ordered_and_keep_both_slices_at_one_position():
    cache = _manifest()
    members, keys = series_members(cache, np.arange(len(cache.manifest)))
    ids = [list(cache.manifest["image_id"].to_numpy()[m]) for m in members]
    assert list(keys) == ["s1/A", "s2/B", "s3/C"]
    assert ids == [["a0", "a1", "a2", "a3"], ["b0"], ["c0", "c1", "c2"]]  # ties by image id, one-slice series
    np.testing.assert_array_equal(exam_labels(cache, members)[:, -1], [1, 0, 0])


def test_label_fractions_are_drawn_by_series():
    cache = _manifest()
    rows = np.arange(len(cache.manifest))
    for seed in range(5):
        kept = series_label_subset(cache, rows, 0.5, seed)
        series = set(cache.manifest["series_uid"].to_numpy()[kept])
        whole = np.flatnonzero(cache.manifest["series_uid"].isin(series).to_numpy())
        np.testing.assert_array_equal(np.sort(kept), whole)  # every slice of a drawn series, nothing else
        assert "A" in series  # the one positive series: stratified on the series' `any`
    np.testing.assert_array_equal(series_label_subset(cache, rows, 1.0, 0), rows)


# --- the stage on a learnable task ----------------------------------------------------------------

@pytest.fixture(scope="module")
def series_run(easy_cache, easy_models, tmp_path_factory):
    from medmoco.config import SeriesConfig, load_config
    from pipelines.series import training

    tmp = tmp_path_factory.mktemp("series")
    encoder = easy_models["runs"]["learned"]["model"]
    config = load_config(SeriesConfig, None, {
        "cache": easy_cache, "encoder": encoder, "run_dir": str(tmp / "run"), "epochs": 12, "hidden": 16,
        "lr": 0.01, "bootstrap": {"min_groups": 2, "replicates": 200},
        "tracking": {"uri": easy_models["uri"], "experiment": "easy-series"}})
    return {"result": training(config), "config": config, "encoder": encoder, "uri": easy_models["uri"], "tmp": tmp}


def test_the_series_head_learns_is_chosen_on_val_and_reports_slices_and_exams(series_run):
    import json

    result = series_run["result"]
    m = result["metrics"]
    assert m["auc_mean"] > 0.8, m["auc_mean"]  # the easy task: large blood in one subtype
    exam = m["exam"]
    assert exam["classes"]["any"]["auc"] > 0.8 and exam["n_series"] >= 4
    history = result["history"]
    best = max(history, key=lambda e: (e["val_score"], -e["val_weighted_logloss"]))
    assert result["selected_epoch"] == best["epoch"]  # chosen on val: slice and exam AUC, then log loss
    report = os.path.join(series_run["config"].run_dir, "report")
    stored = json.load(open(os.path.join(report, "metrics.json")))
    assert stored["exam"]["classes"]["any"]["auc"] == pytest.approx(exam["classes"]["any"]["auc"])
    frame = pd.read_parquet(os.path.join(report, "exam_predictions.parquet"))
    assert len(frame) == exam["n_series"] and frame["n_slices"].sum() == m["n_images"]
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(frame["label_any"], frame["prob_any"]) == pytest.approx(exam["classes"]["any"]["auc"])
    assert "Exam level" in open(os.path.join(report, "metrics.md")).read()


def test_every_loader_predicts_a_series_model_series_by_series(series_run, easy_cache, tmp_path):
    from medmoco.engines.series import predict_series_rows
    from medmoco.engines.supervised import predict_rows
    from medmoco.models import load_classifier
    from medmoco.transforms.supervised import prepare_images
    from pipelines.evaluate import evaluate

    model, info = load_classifier(series_run["result"]["model"])
    assert getattr(model, "is_series", False) and info["format"] == "medmoco-series/1"
    cache = open_cache(easy_cache)
    rows = cache.indices("test")
    members, _ = series_members(cache, rows)
    # the probabilities of a series = the model on that series' images in slice order
    first = members[0]
    images = torch.from_numpy(np.stack([np.array(cache[int(i)]) for i in first]))
    with torch.no_grad():
        direct = torch.sigmoid(model(prepare_images(images, info["image_size"]))).numpy()
    probs = predict_rows(model, cache, rows, info["context"], info["image_size"], "cpu")
    at = {int(r): i for i, r in enumerate(rows)}
    np.testing.assert_allclose(probs[[at[int(r)] for r in first]], direct, atol=1e-5)
    # rows in another order: the same probability for each row (series are regrouped and ordered)
    shuffled = np.random.default_rng(0).permutation(rows)
    again = predict_series_rows(model, cache, shuffled)[0]
    np.testing.assert_allclose(again, probs[[at[int(r)] for r in shuffled]], atol=1e-6)
    metrics = evaluate(series_run["result"]["model"], easy_cache, "test", str(tmp_path / "eval"), min_groups=2,
                       replicates=200)
    assert metrics["auc_mean"] == pytest.approx(series_run["result"]["metrics"]["auc_mean"], abs=1e-6)
    assert metrics["exam"]["classes"]["any"]["auc"] == pytest.approx(
        series_run["result"]["metrics"]["exam"]["classes"]["any"]["auc"], abs=1e-6)


def test_predict_writes_slices_and_one_row_per_series(series_run, easy_archive, tmp_path):
    from pipelines.evaluate import predict

    out = predict(series_run["result"]["model"], easy_archive.images_dir, str(tmp_path / "slices.csv"),
                  series_out=str(tmp_path / "series.csv"))
    slices = pd.read_csv(tmp_path / "slices.csv")
    series = pd.read_csv(tmp_path / "series.csv")
    truth = pd.DataFrame([{"image": s.image_id, "series": s.series_uid} for s in easy_archive.slices])
    assert out["images"] == len(truth) == len(slices) // 6
    assert sorted(series["series_uid"]) == sorted(truth["series"].unique())
    counts = truth.groupby("series").size()
    assert (series.set_index("series_uid")["n_slices"] == counts.reindex(series["series_uid"]).to_numpy()).all()
    assert list(series.columns[3:]) == list(SUBTYPES)
    assert series[list(SUBTYPES)].apply(lambda c: c.between(0, 1)).all().all()


def test_the_registered_series_model_takes_a_series_and_answers_in_input_order(series_run, easy_archive):
    import mlflow

    from pipelines.register import register

    reg = register(series_run["result"]["run_id"], "rsna-ich-series", "candidate", series_run["uri"])
    mlflow.set_tracking_uri(series_run["uri"])
    mlflow.set_registry_uri(series_run["uri"])
    loaded = mlflow.pyfunc.load_model(reg["model_uri"])
    series_uid = easy_archive.slices[0].series_uid
    files = [os.path.join(easy_archive.images_dir, f"{s.image_id}.dcm") for s in easy_archive.slices
             if s.series_uid == series_uid]
    order = np.random.default_rng(1).permutation(len(files))
    first = loaded.predict(files).to_numpy()
    second = loaded.predict([files[i] for i in order]).to_numpy()
    np.testing.assert_allclose(second, first[order], atol=1e-6)  # per slice, in input order
    by_bytes = loaded.predict(pd.DataFrame({"dicom": [open(f, "rb").read() for f in files]})).to_numpy()
    np.testing.assert_allclose(by_bytes, first, atol=1e-6)
    client = mlflow.MlflowClient(series_run["uri"])
    card = client.get_model_version(reg["name"], str(reg["version"])).description
    assert "series head" in card and "Exam-level test figures" in card and "whole series" in card


def test_review_compares_a_series_model_with_its_slice_model_on_the_same_images(series_run, easy_cache, tmp_path):
    from medmoco.registry.review import compare_versions
    from pipelines.register import register

    uri = series_run["uri"]
    slice_run = [r for r in (series_run["result"],)]  # noqa: F841
    series_version = register(series_run["result"]["run_id"], "rsna-ich-cmp", "", uri)["version"]
    from medmoco.tracking import client as mlflow_client

    encoder_run = mlflow_client(uri).search_runs(
        [mlflow_client(uri).get_experiment_by_name("easy").experiment_id],
        filter_string="tags.stage = 'finetune'")[0].info.run_id
    slice_version = register(encoder_run, "rsna-ich-cmp", "", uri)["version"]
    comparison = compare_versions("rsna-ich-cmp", str(series_version), str(slice_version), str(tmp_path / "cmp"),
                                  easy_cache, "test", tracking_uri=uri, cases=0, min_groups=2)
    cache = open_cache(easy_cache)
    assert comparison["n_images"] == len(cache.indices("test", labeled=True))


def test_a_series_model_predicts_every_real_rsna_series_whole(series_run, tmp_path):
    """The 12 real RSNA train series (../shared/data/rsna-train-12series): every slice gets six
    probabilities, both slices at a shared position included, and every series one exam row
    with its true slice count (the model is the easy task's: the figures mean nothing here)."""
    import pydicom

    from pipelines.evaluate import predict

    from .test_real_series import REAL_SERIES

    folder = os.path.abspath(REAL_SERIES)
    if not os.path.isdir(folder):
        pytest.skip(f"real RSNA series not found at {folder} (../shared/data/rsna-train-12series)")
    out = predict(series_run["result"]["model"], folder, str(tmp_path / "slices.csv"),
                  series_out=str(tmp_path / "series.csv"))
    files = sorted(f for f in os.listdir(folder) if f.endswith(".dcm"))
    counts = pd.Series([str(pydicom.dcmread(os.path.join(folder, f), stop_before_pixels=True).SeriesInstanceUID)
                        for f in files]).value_counts()
    slices = pd.read_csv(tmp_path / "slices.csv")
    series = pd.read_csv(tmp_path / "series.csv").set_index("series_uid")
    assert out["images"] == len(files) == 407 and out["skipped"] == 0
    assert set(slices["ID"].str.rsplit("_", n=1).str[0]) == {f[:-4] for f in files}
    assert len(series) == 12
    assert (series["n_slices"] == counts.reindex(series.index)).all()
    assert np.isfinite(series[list(SUBTYPES)].to_numpy()).all()


def test_end_to_end_training_with_2p5d_input_and_flip_tta(easy_cache, tmp_path):
    """End to end (the backbone trains too), on a 2.5D encoder (each slice with its neighbours as
    channels) with the flip average: the backbone moves, the file records it, every loader agrees."""
    from medmoco.config import SeriesConfig, load_config
    from medmoco.engines.supervised import predict_rows
    from medmoco.models import build_classifier, load_classifier, save_classifier
    from pipelines.series import training

    cache = open_cache(easy_cache)
    torch.manual_seed(0)
    encoder = build_classifier("resnet18", 3 * 3, "scratch")
    encoder_file = save_classifier(encoder, str(tmp_path / "encoder.pt"), "resnet18", 9, 1, 32, "scratch",
                                   cache.metadata)
    config = load_config(SeriesConfig, None, {
        "cache": easy_cache, "encoder": encoder_file, "run_dir": str(tmp_path / "run"), "epochs": 1, "hidden": 8,
        "end_to_end": True, "flip_tta": True, "bootstrap": {"min_groups": 2, "replicates": 50},
        "tracking": {"enabled": False}})
    result = training(config)
    model, info = load_classifier(result["model"])
    assert info["series"]["training"] == "end_to_end" and info["series"]["flip_tta"] and info["context"] == 1
    before = encoder.state_dict()["backbone.conv1.weight"]
    assert not torch.allclose(model.encoder.state_dict()["backbone.conv1.weight"], before)  # the backbone trained
    rows = cache.indices("test")
    probs = predict_rows(model, cache, rows, info["context"], info["image_size"], "cpu")
    assert np.isfinite(probs).all() and probs.shape == (len(rows), 6)
    # the flip average: the embedding of an image equals the mean of its and its mirror's features
    x = torch.rand(2, 9, 32, 32)
    with torch.no_grad():
        expected = 0.5 * (model.encoder.backbone(x) + model.encoder.backbone(torch.flip(x, dims=(-1,))))
        torch.testing.assert_close(model.embed(x), expected)
