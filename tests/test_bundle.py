"""`medmoco export bundle`: a model as a MONAI bundle that MONAI's own CLI verifies and runs on a
real RSNA series, giving the probabilities `medmoco predict` gives (a 2.5D slice model and a series
model), with a TorchScript twin and, from the registry, the verified promotion record."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from dicom_preprocess import SUBTYPES
from medmoco.export import export_bundle
from medmoco.registry.integrity import IntegrityError, sha256_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_SERIES = os.path.join(REPO, "..", "shared", "data", "rsna-train-12series")
# The real data's two encodings: explicit VR 16-bit signed with -2000 padding, 36 slices of which 8
# positions hold two (the order's ties matter), for the series model; implicit VR 12-bit unsigned,
# 33 slices, for the 2.5D slice model.
SERIES = {"series": ("ID_72952d87fa", 36), "slice": ("ID_44cfc8e964", 33)}
WINDOWS = [{"name": "brain", "center": 40.0, "width": 80.0}, {"name": "subdural", "center": 80.0, "width": 200.0},
           {"name": "bone", "center": 600.0, "width": 2800.0}]
NAME = "bundle-check"
TOLERANCE = 1e-4


def _preprocess(size: int) -> dict:
    return {"windows": WINDOWS, "window_mode": "linear", "size": size, "modalities": ["CT"]}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two small models with random weights, each through another branch of the preprocessing:
    a 2.5D slice model (one neighbour each side: 9 channels; cache 64 px, input 48 px: MONAI's area
    resize) and a series model (GRU head with flip averaging; cache 32 px, input 40 px: bilinear)."""
    from medmoco.models.classifier import Classifier, save_classifier, save_series_model
    from medmoco.models.export import read_weights
    from medmoco.models.series import SeriesClassifier, SeriesHead

    tmp = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    slice_path = save_classifier(Classifier("resnet18", 9), str(tmp / "slice.pt"), "resnet18", 9, 1, 48, "scratch",
                                 _preprocess(64), meta={"epoch": 3, "label_fraction": 0.2},
                                 operating_points={"split": "val", "target_sensitivity": 0.9,
                                                   "thresholds": {c: 0.5 for c in SUBTYPES}})
    encoder = Classifier("resnet18", 3)
    encoder_path = save_classifier(encoder, str(tmp / "encoder.pt"), "resnet18", 3, 0, 40, "finetune", _preprocess(32))
    encoder_info = {k: v for k, v in read_weights(encoder_path).items() if k != "state_dict"}
    settings = {"hidden": 8, "layers": 1, "dropout": 0.1, "flip_tta": True, "features": 512, "training": "frozen"}
    series = SeriesClassifier(encoder, SeriesHead(512, 8), True, 0, 40)
    series_path = save_series_model(series, str(tmp / "series.pt"), encoder_info, settings)
    return {"slice": slice_path, "series": series_path}


@pytest.fixture(scope="module")
def bundles(models, tmp_path_factory):
    """Both exported through the `medmoco export bundle` command."""
    from pipelines.cli import main

    tmp = tmp_path_factory.mktemp("bundles")
    out = {}
    for kind, path in models.items():
        out[kind] = str(tmp / kind)
        assert main(["export", "bundle", "--model", path, "--out", out[kind]]) == 0
    return out


@pytest.fixture(scope="module")
def series_dirs(tmp_path_factory):
    """Each real series of :data:`SERIES`, copied into a folder of its own (copies, not links:
    medmoco's reader skips links that point outside the input folder)."""
    import pydicom

    folder = os.path.abspath(REAL_SERIES)
    if not os.path.isdir(folder):
        pytest.skip(f"real RSNA series not found at {folder} (../shared/data/rsna-train-12series)")
    out = {kind: tmp_path_factory.mktemp(uid) for kind, (uid, _) in SERIES.items()}
    wanted = {uid: kind for kind, (uid, _) in SERIES.items()}
    for path in sorted(glob.glob(os.path.join(folder, "*.dcm"))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the ID_... UIDs are not valid UIs
            uid = pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID
        if uid in wanted:
            shutil.copy(path, out[wanted[uid]])
    for kind, (uid, slices) in SERIES.items():
        assert len(os.listdir(out[kind])) == slices, uid
    return {kind: str(path) for kind, path in out.items()}


def _monai_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m monai.bundle ARGS` in a fresh interpreter that imports this checkout's medmoco
    (``stdout``: its output and its log together)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH", "")]))}
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env, timeout=600)


def _labels(path: str) -> pd.Series:
    return pd.read_csv(path).set_index("ID")["Label"]


def _medmoco_predict(model: str, folder: str, out: str) -> pd.Series:
    from pipelines.evaluate import predict

    predict(model, folder, out)
    return _labels(out)


# --- what is written ------------------------------------------------------------------------------

def test_the_bundle_holds_the_spec_files_the_model_and_its_origin(bundles, models):
    root = bundles["slice"]
    for name in ("configs/metadata.json", "configs/metadata_schema.json", "configs/inference.json",
                 "models/model.pt", "models/model.ts", "docs/README.md", "LICENSE"):
        assert os.path.getsize(os.path.join(root, name)) > 0, name
    meta = json.load(open(os.path.join(root, "configs", "metadata.json")))
    image, pred = meta["network_data_format"]["inputs"]["image"], meta["network_data_format"]["outputs"]["pred"]
    assert (image["format"], image["modality"], image["num_channels"], image["spatial_shape"]) == \
        ("hounsfield", "CT", 9, [48, 48])
    assert image["channel_def"]["0"] == "slice s-1: brain window 40/80 HU (center/width)"
    assert image["channel_def"]["5"] == "slice s: bone window 600/2800 HU (center/width)"
    assert (pred["type"], pred["format"], pred["num_channels"], pred["value_range"]) == \
        ("probabilities", "classes", 6, [0, 1])
    assert list(pred["channel_def"].values()) == list(SUBTYPES)
    assert meta["required_packages_version"]["medmoco"] and meta["required_packages_version"]["pydicom"]
    assert meta["intended_use"].startswith("Research only")
    assert meta["schema"] == "configs/metadata_schema.json"
    record = meta["registry"]
    assert record["registered"] is False and record["model_file_sha256"] == sha256_file(models["slice"])
    assert meta["bundle_files_sha256"]["models/model.pt"] == sha256_file(os.path.join(root, "models", "model.pt"))
    assert meta["medmoco_model"]["operating_points"]["thresholds"]["any"] == 0.5
    card = open(os.path.join(root, "docs", "README.md")).read()
    assert "Research only" in card and "Unregistered model file" in card and record["model_file_sha256"] in card
    assert "12-bit wrap fix" in card and "resized to 48 px" in card
    state = torch.load(os.path.join(root, "models", "model.pt"), weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # a plain state dict, as the spec asks


def test_a_bundle_is_written_once_and_a_foreign_file_is_refused(bundles, tmp_path, capsys):
    from pipelines.cli import main

    # the bundle's own model.pt is a bare state dict, not a medmoco model file
    bare = os.path.join(bundles["slice"], "models", "model.pt")
    assert main(["export", "bundle", "--model", bare, "--out", str(tmp_path / "b")]) == 2
    assert "not a medmoco-classifier/1" in capsys.readouterr().err and not os.path.exists(tmp_path / "b")
    assert main(["export", "bundle", "--model", "x.pt", "--out", bundles["slice"]]) == 2
    assert "not an empty folder" in capsys.readouterr().err


# --- MONAI's checks -------------------------------------------------------------------------------

def test_monai_verifies_metadata_offline_and_the_network_in_and_out(bundles, tmp_path):
    """The metadata through MONAI's CLI, offline; the rest through the functions the CLI calls, in this
    process: each `python -m monai.bundle` spends ~10 s of CPU importing MONAI (`run` below is one)."""
    from monai.bundle import verify_metadata, verify_net_in_out

    root = bundles["series"]
    meta, schema = f"{root}/configs/metadata.json", f"{root}/configs/metadata_schema.json"
    result = _monai_cli("verify_metadata", "--meta_file", meta, "--filepath", schema)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "skipped downloading" in result.stdout and "metadata is verified with no error" in result.stdout
    for root in bundles.values():
        verify_metadata(meta_file=f"{root}/configs/metadata.json", filepath=f"{root}/configs/metadata_schema.json")
        verify_net_in_out("network_def", meta_file=f"{root}/configs/metadata.json",
                          config_file=f"{root}/configs/inference.json", device="cpu")
    # and the schema refuses metadata that lacks what the specification requires
    without_task = json.load(open(meta))
    del without_task["task"]
    without_channels = json.load(open(meta))
    del without_channels["network_data_format"]["outputs"]["pred"]["channel_def"]
    for missing, data in (("task", without_task), ("channel_def", without_channels)):
        path = str(tmp_path / f"without-{missing}.json")
        json.dump(data, open(path, "w"))
        with pytest.raises(ValueError, match=f"'{missing}' is a required property"):
            verify_metadata(meta_file=path, filepath=schema)


# --- the same probabilities as medmoco predict ------------------------------------------------------

def test_the_series_bundle_run_by_monai_gives_medmoco_predict_on_a_real_series(bundles, models, series_dirs,
                                                                                tmp_path):
    root, series_dir = bundles["series"], series_dirs["series"]
    out = tmp_path / "monai"
    result = _monai_cli("run", "--config_file", f"{root}/configs/inference.json", "--bundle_root", root,
                        "--dataset_dir", series_dir, "--output_dir", str(out))
    assert result.returncode == 0, result.stdout[-3000:]
    bundle = _labels(out / "predictions.csv")
    medmoco = _medmoco_predict(models["series"], series_dir, str(tmp_path / "medmoco.csv"))
    assert len(bundle) == SERIES["series"][1] * 6 and set(bundle.index) == set(medmoco.index)
    assert np.abs(bundle - medmoco.loc[bundle.index]).max() < TOLERANCE
    # the agreement rests on the order: the same slices as a series in reverse give other answers
    from medmoco.models import load_classifier

    model, _ = load_classifier(models["series"])
    images = _bundle_images(root, series_dir)
    with torch.no_grad():
        forward = torch.sigmoid(model(images))
        backward = torch.sigmoid(model(images.flip(0))).flip(0)
    assert float((forward - backward).abs().max()) > 100 * TOLERANCE


def test_the_2_5d_slice_bundle_gives_medmoco_predict_on_a_real_series(bundles, models, series_dirs, tmp_path):
    from monai.bundle import run

    root, series_dir = bundles["slice"], series_dirs["slice"]
    run(config_file=f"{root}/configs/inference.json", bundle_root=root, dataset_dir=series_dir,
        output_dir=str(tmp_path / "monai"))  # MONAI's `run`, in this process (the CLI ran above)
    bundle = _labels(tmp_path / "monai" / "predictions.csv")
    medmoco = _medmoco_predict(models["slice"], series_dir, str(tmp_path / "medmoco.csv"))
    assert len(bundle) == SERIES["slice"][1] * 6 and set(bundle.index) == set(medmoco.index)
    assert np.abs(bundle - medmoco.loc[bundle.index]).max() < TOLERANCE


def _bundle_images(root: str, folder: str) -> torch.Tensor:
    """The series as the bundle's inference config prepares it: (S, C, H, W) in series order."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(f"{root}/configs/inference.json")
    parser["dataset_dir"] = folder
    dataset = parser.get_parsed_content("dataset")
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


def test_the_datalist_orders_a_series_clamps_its_neighbours_and_skips_what_is_not_a_slice(series_dirs, tmp_path,
                                                                                         caplog):
    from medmoco.data.dicom_folder import series_batches, series_datalist

    folder = tmp_path / "folder"
    shutil.copytree(series_dirs["slice"], folder)
    (folder / "notes").write_text("not a slice")  # no suffix: listed as DICOM, refused by the reader
    items = series_datalist(str(folder), context=1)
    assert len(items) == SERIES["slice"][1] and "notes" in caplog.text and "skipped" in caplog.text
    assert [item["slice_index"] for item in items] == list(range(len(items)))
    first, second, last = items[0]["image"], items[1]["image"], items[-1]["image"]  # files of s-1, s, s+1
    assert first[0] == first[1] and first[2] == second[1] and second[0] == first[1]  # clamped at the first slice
    assert last[2] == last[1]  # and at the last
    assert series_batches(items) == [list(range(len(items)))]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no usable DICOM slice"):
        series_datalist(str(tmp_path / "empty"))


# --- TorchScript ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["slice", "series"])
def test_torchscript_equals_the_eager_model(bundles, models, kind):
    from monai.data import load_net_with_metadata

    from medmoco.models import load_classifier

    scripted, meta, _ = load_net_with_metadata(os.path.join(bundles[kind], "models", "model.ts"))
    model, info = load_classifier(models[kind])
    torch.manual_seed(1)
    for slices in (1, 7):  # a series of any length: nothing was fixed by a trace
        x = torch.rand(slices, info["in_channels"], info["image_size"], info["image_size"])
        with torch.no_grad():
            np.testing.assert_allclose(scripted(x).numpy(), torch.sigmoid(model(x)).numpy(), atol=1e-6, rtol=0)
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == info["in_channels"]


# --- from the registry -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def registry(models, tmp_path_factory):
    """A SQLite MLflow store where the series model is a candidate (files pinned by sha256) that
    `promote` released as NAME@champion, with its promotion record."""
    from medmoco.registry.integrity import FILES_TAG, file_digests
    from medmoco.registry.release import promote
    from medmoco.tracking import client as mlflow_client

    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = mlflow_client(uri)
    experiment = client.create_experiment("bundle-candidates", artifact_location=(tmp / "artifacts").as_uri())
    run = client.create_run(experiment)
    files = tmp / "model"
    files.mkdir()
    shutil.copy(models["series"], files / "model.pt")
    client.log_artifacts(run.info.run_id, str(files), "model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model(f"{NAME}-candidates")
    client.create_model_version(f"{NAME}-candidates", f"{run.info.artifact_uri}/model", run.info.run_id,
                                tags={FILES_TAG: json.dumps(file_digests(str(files)))})
    promote(NAME, "1", "champion", tracking_uri=uri)
    return {"uri": uri, "client": client, "files": file_digests(str(files))}


def test_a_released_model_carries_its_verified_promotion_record(registry, models, tmp_path):
    from medmoco.registry.history import RECORD_TAG

    out = str(tmp_path / "bundle")
    result = export_bundle(f"models:/{NAME}@champion", out, registry["uri"])
    assert result["registered"] and result["model_uri"] == f"models:/{NAME}/1"
    meta = json.load(open(os.path.join(out, "configs", "metadata.json")))
    record = meta["registry"]
    assert (record["registered_model"], record["version"], record["aliases"]) == (NAME, "1", ["champion"])
    assert record["files_sha256"] == registry["files"]
    assert record["model_file_sha256"] == sha256_file(models["series"])
    promotion = record["promotion"]
    assert promotion["sequence"] == 1 and promotion["alias"] == "champion"
    candidate = promotion["candidate"]
    assert (candidate["registered_model"], candidate["version"]) == (f"{NAME}-candidates", "1")
    assert promotion["files_sha256"] == registry["files"] and promotion["decision"].startswith("no previous holder")
    version = registry["client"].get_model_version(NAME, "1")
    assert record["promotion_sha256"] == version.tags[RECORD_TAG]
    assert meta["version"] == "1.0.0"
    card = open(os.path.join(out, "docs", "README.md")).read()
    assert f"Registered model `{NAME}`, version 1" in card and record["promotion_sha256"] in card
    # a promotion record that no longer matches the digest on its version is refused, not shipped
    registry["client"].set_model_version_tag(NAME, "1", RECORD_TAG, "0" * 64)
    try:
        with pytest.raises(IntegrityError, match="promotion record"):
            export_bundle(f"models:/{NAME}@champion", str(tmp_path / "refused"), registry["uri"])
        assert not os.path.exists(tmp_path / "refused")
    finally:
        registry["client"].set_model_version_tag(NAME, "1", RECORD_TAG, record["promotion_sha256"])
