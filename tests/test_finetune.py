"""Fine-tuning modes, metrics, evaluate / predict / select, extra labels, the label-efficiency experiment."""
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from dicom_preprocess import SUBTYPES, open_cache
from medmoco.config import FinetuneConfig, load_config
from medmoco.metrics import classification_metrics, weighted_log_loss
from pipelines.evaluate import evaluate, predict, select
from pipelines.finetune import training

from .conftest import finetune_settings, kill_in_epoch_3_then_resume, write_yaml


def _client(db):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{db}")


def _finetune(cache, tmp_path, mode, backbone=None, **over):
    db = tmp_path / "mlflow.db"
    data = finetune_settings(cache, str(tmp_path / mode), str(db), mode=mode,
                             pretrained=backbone if mode != "scratch" else "", **over)
    config = load_config(FinetuneConfig, write_yaml(tmp_path / f"{mode}.yaml", data))
    return training(0, config), db


@pytest.fixture(scope="module")
def trained(cls_cache, backbone_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft")
    return {mode: _finetune(cls_cache, tmp, mode, backbone_file) for mode in ("finetune", "linear", "scratch")}


def test_three_modes_train_and_log_metrics_and_artifacts(trained):
    for mode, (result, db) in trained.items():
        run = _client(db).get_run(result["run_id"])
        assert run.info.status == "FINISHED", mode
        for key in ["test_auc_mean", "test_weighted_logloss", "loss", "lr"] + [f"test_auc_{c}" for c in SUBTYPES]:
            assert key in run.data.metrics, (mode, key)
        assert run.data.tags["mode"] == mode and run.data.params["label_fraction"] == "1.0"
        assert run.data.tags["cache_fingerprint"]
        if mode != "scratch":
            assert run.data.tags["pretrain_run_id"] == "pretrain-run-x"
        names = {a.path for a in _client(db).list_artifacts(result["run_id"], "report")}
        for name in ("roc_curves.png", "training_curves.png", "metrics.csv", "metrics.md", "config.yaml"):
            assert f"report/{name}" in names, (mode, name)
        assert [a.path for a in _client(db).list_artifacts(result["run_id"], "model")] == ["model/model.pt"]
        assert 0.0 <= result["metrics"]["auc_mean"] <= 1.0


def test_linear_mode_leaves_the_backbone_bitwise_unchanged(trained, backbone_file):
    exported = torch.load(backbone_file, weights_only=True)["state_dict"]
    model = torch.load(trained["linear"][0]["model"], weights_only=True)["state_dict"]
    for key, value in exported.items():
        assert torch.equal(model[f"backbone.{key}"], value), key  # weights and BN running stats
    finetuned = torch.load(trained["finetune"][0]["model"], weights_only=True)["state_dict"]
    assert any(not torch.equal(finetuned[f"backbone.{k}"], v) for k, v in exported.items())


def test_metrics_equal_scikit_learn_and_a_direct_weighted_log_loss():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    y = (rng.random((200, 6)) < 0.3).astype(np.float32)
    p = np.clip(rng.random((200, 6)) * 0.6 + y * 0.3, 0, 1)
    p[0, 0] = 0.0  # clipping at 1e-7 matters
    m = classification_metrics(y, p)
    for j, c in enumerate(SUBTYPES):
        assert m[f"auc_{c}"] == pytest.approx(roc_auc_score(y[:, j], p[:, j]), abs=1e-12)
        assert m[f"ap_{c}"] == pytest.approx(average_precision_score(y[:, j], p[:, j]), abs=1e-12)
    assert m["auc_mean"] == pytest.approx(np.mean([roc_auc_score(y[:, j], p[:, j]) for j in range(6)]))
    w = np.array([1, 1, 1, 1, 1, 2.0])
    total = 0.0
    for i in range(200):
        row = 0.0
        for j in range(6):
            q = min(max(float(p[i, j]), 1e-7), 1 - 1e-7)
            row += w[j] * -(y[i, j] * np.log(q) + (1 - y[i, j]) * np.log(1 - q))
        total += row / w.sum()
    assert weighted_log_loss(y, p) == pytest.approx(total / 200, rel=1e-12)
    one_class = classification_metrics(np.zeros((5, 6)), np.full((5, 6), 0.5))
    assert np.isnan(one_class["auc_any"]) and np.isnan(one_class["auc_mean"])


def test_evaluate_writes_metrics_and_a_kaggle_submission(trained, cls_cache, tmp_path):
    model = trained["finetune"][0]["model"]
    metrics = evaluate(model, cls_cache, "test", str(tmp_path / "eval"))
    sub = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    cache = open_cache(cls_cache)
    n = len(cache.indices("test"))
    assert list(sub.columns) == ["ID", "Label"] and len(sub) == 6 * n
    assert sub["Label"].between(0, 1).all()
    assert sub["ID"].str.rsplit("_", n=1).str[1].tolist() == list(SUBTYPES) * n
    saved = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert saved["auc_mean"] == pytest.approx(trained["finetune"][0]["metrics"]["auc_mean"])
    assert set(f"auc_{c}" for c in SUBTYPES) <= set(saved) and "weighted_logloss" in saved
    assert metrics["n_images"] == n


def test_predict_on_raw_dicoms_equals_evaluating_their_cached_tensors(trained, cls_cache, cls_archive, tmp_path):
    model = trained["finetune"][0]["model"]
    evaluate(model, cls_cache, "all", str(tmp_path / "eval"))
    predict(model, cls_archive.images_dir, str(tmp_path / "sub.csv"))
    a = pd.read_csv(tmp_path / "eval" / "predictions.csv").set_index("ID")["Label"]
    b = pd.read_csv(tmp_path / "sub.csv").set_index("ID")["Label"]
    assert set(a.index) == set(b.index)
    np.testing.assert_allclose(a.loc[b.index].to_numpy(), b.to_numpy(), atol=2e-6)  # CSV has 6 decimals


def test_predict_on_the_real_rsna_sample_equals_evaluating_its_cache(trained, real_sample_dir, tmp_path):
    from dicom_preprocess.config import PreprocessConfig
    from dicom_preprocess.job import run_preprocess

    model = trained["finetune"][0]["model"]
    predict(model, real_sample_dir, str(tmp_path / "sub.csv"))
    run_preprocess(PreprocessConfig(input=real_sample_dir, out=str(tmp_path / "cache"), size=32, workers=1,
                                    split_fractions={"unsupervised": 1.0, "train": 0.0, "test": 0.0}), progress=False)
    evaluate(model, str(tmp_path / "cache"), "all", str(tmp_path / "eval"))
    a = pd.read_csv(tmp_path / "eval" / "predictions.csv").set_index("ID")["Label"]
    b = pd.read_csv(tmp_path / "sub.csv").set_index("ID")["Label"]
    assert len(b) == 6 * 32 and set(a.index) == set(b.index)
    np.testing.assert_allclose(a.loc[b.index].to_numpy(), b.to_numpy(), atol=2e-6)


def test_select_ranks_by_uncertainty_and_keeps_series_whole(trained, cls_cache, tmp_path):
    model = trained["finetune"][0]["model"]
    picked = select(model, cls_cache, 5, "uncertainty", str(tmp_path / "ids.csv"))
    assert len(picked) == 5 and picked["score"].is_monotonic_decreasing
    everything = select(model, cls_cache, 10_000, "uncertainty", str(tmp_path / "all.csv"))
    assert picked["score"].min() >= everything["score"].iloc[5:].max()
    cache = open_cache(cls_cache)
    unsup = set(cache.manifest["image_id"].to_numpy()[cache.indices("unsupervised")])
    assert set(everything["image_id"]) == unsup
    series = select(model, cls_cache, 3, "uncertainty", str(tmp_path / "series.csv"), by_series=True)
    sizes = cache.manifest[cache.manifest["split"] == "unsupervised"].groupby("series_uid").size()
    assert (series.groupby("series_id").size() == sizes.loc[series["series_id"].unique()]).all()
    random = select(model, cls_cache, 5, "random", str(tmp_path / "r.csv"), seed=1)
    assert len(random) == 5


def test_extra_labels_are_added_and_recorded(cls_cache, cls_archive, tmp_path):
    from dicom_preprocess.labels import read_rsna_labels, write_rsna_labels

    cache = open_cache(cls_cache)
    ids = cache.manifest["image_id"].to_numpy()[cache.indices("unsupervised")][:7]
    labels, _ = read_rsna_labels(cls_archive.labels_csv)
    extra = labels.loc[[i for i in ids if i in labels.index]]
    extra.loc["ID_notinthecache"] = 0
    write_rsna_labels(extra, str(tmp_path / "extra.csv"))
    result, db = _finetune(cls_cache, tmp_path, "scratch", epochs=1, extra_labels=str(tmp_path / "extra.csv"),
                           label_fraction=0.5)
    run = _client(db).get_run(result["run_id"])
    assert result["extra_labels_added"] == len(extra) - 1
    assert run.data.params["extra_labels_added"] == str(len(extra) - 1)
    assert run.data.params["extra_labels_missing"] == "1"


def test_bad_settings_fail_before_work(cls_cache, tmp_path):
    from dicom_preprocess.config import ConfigError

    with pytest.raises(ConfigError, match="label_fraction"):
        load_config(FinetuneConfig, None, {"cache": cls_cache, "mode": "scratch", "label_fraction": 0})
    with pytest.raises(ConfigError, match="pretrained"):
        load_config(FinetuneConfig, None, {"cache": cls_cache, "mode": "linear"})
    config = load_config(FinetuneConfig, None, {"cache": cls_cache, "mode": "finetune",
                                                "pretrained": str(tmp_path / "missing.pt")})
    with pytest.raises(ConfigError, match="pretrained .*missing.pt"):
        training(0, config)


@pytest.mark.slow
def test_label_efficiency_experiment_writes_table_plot_and_child_runs(cls_cache, backbone_file, tmp_path):
    from medmoco.config import load_config as load
    from pipelines.experiment import ExperimentConfig, run_experiment

    db = tmp_path / "exp.db"
    base = finetune_settings(cls_cache, "x", str(db), epochs=1)
    base.pop("cache"), base.pop("run_dir"), base.pop("tracking")
    exp = load(ExperimentConfig, None, {"cache": cls_cache, "pretrained": backbone_file, "run_dir": str(tmp_path / "e"),
                                         "label_fractions": [0.5, 1.0], "trials": 2, "finetune": base,
                                         "tracking": {"uri": f"sqlite:///{db}", "experiment": "exp"}})
    result = run_experiment(exp)
    table = result["table"]
    assert len(table) == 3 * 2 and (table["trials"] == 2).all()
    assert {"auc_mean_mean", "auc_mean_std", "auc_any_mean"} <= set(table.columns)
    assert os.path.getsize(tmp_path / "e" / "label_efficiency.png") > 1000
    client = _client(db)
    children = client.search_runs([client.get_experiment_by_name("exp").experiment_id],
                                  f"tags.mlflow.parentRunId = '{result['run_id']}'")
    assert len(children) == 12


@pytest.mark.slow
def test_killed_and_resumed_finetune_logs_the_same_metrics_and_weights(cls_cache, backbone_file, tmp_path):
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "medmoco", "finetune", "--config"]
    runs = {}
    for name in ("straight", "killed"):
        db = tmp_path / f"{name}.db"
        data = finetune_settings(cls_cache, str(tmp_path / name), str(db), mode="finetune", pretrained=backbone_file,
                                 epochs=4, deterministic=True, keep_checkpoints=4)
        cfg = write_yaml(tmp_path / f"{name}.yaml", data)
        if name == "straight":
            subprocess.run(cmd + [cfg], check=True, capture_output=True, cwd=repo)
        else:
            kill_in_epoch_3_then_resume("finetune", cfg, tmp_path / name, tmp_path / name / "report", delay=0.2)
        runs[name] = (_client(db), open(tmp_path / name / "mlflow_run_id").read().strip())
    for key in ("loss", "test_auc_mean", "test_weighted_logloss"):
        straight = [(m.step, m.value) for m in runs["straight"][0].get_metric_history(runs["straight"][1], key)]
        resumed = [(m.step, m.value) for m in runs["killed"][0].get_metric_history(runs["killed"][1], key)]
        assert sorted(straight) == sorted(resumed) and len(straight) == 4, key
    a = torch.load(tmp_path / "straight" / "checkpoints" / "checkpoint_4.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed" / "checkpoints" / "checkpoint_4.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs["killed"][0].get_run(runs["killed"][1]).info.status == "FINISHED"
