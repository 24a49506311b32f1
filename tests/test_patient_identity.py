"""No patient identity leaves the DICOMs: cache, logs, MLflow params/tags/artifacts and the
registered model hold only the ids the pipeline needs; --hash-ids replaces even those."""
import glob
import os

import pydicom
import pytest

from dicom_preprocess.config import PreprocessConfig
from dicom_preprocess.job import run_preprocess
from medmoco.config import FinetuneConfig, load_config
from pipelines.finetune import training
from pipelines.register import register

from .conftest import finetune_settings

IDENTITY = {"PatientName": "Doe^Janet^Q", "PatientBirthDate": "19471103", "AccessionNumber": "ACC99812345",
            "InstitutionName": "St Elsewhere General", "ReferringPhysicianName": "Kildare^James",
            "OtherPatientIDs": "MRN-55501234", "PatientAddress": "12 Elm Street Springfield"}


@pytest.fixture(scope="module")
def identified_archive(cls_archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("identified")
    for path in sorted(glob.glob(os.path.join(cls_archive.images_dir, "*.dcm"))):
        ds = pydicom.dcmread(path)
        for keyword, value in IDENTITY.items():
            setattr(ds, keyword, value)
        ds.save_as(str(out / os.path.basename(path)))
    return str(out)


def _leaks(root: str) -> list[str]:
    found = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            data = open(os.path.join(dirpath, name), "rb").read()
            for value in IDENTITY.values():
                for needle in {value, value.replace("^", " ")}:
                    if needle.encode() in data:
                        found.append(f"{os.path.join(dirpath, name)}: {needle}")
    return found


def test_no_identifying_tag_reaches_any_output(identified_archive, cls_archive, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    cache = str(tmp_path / "cache")
    run_preprocess(PreprocessConfig(input=identified_archive, labels=cls_archive.labels_csv, out=cache, size=32,
                                    workers=1, split_fractions={"unsupervised": 0.2, "train": 0.4, "val": 0.2, "test": 0.2}),
                   progress=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = finetune_settings(cache, str(tmp_path / "run"), "x", mode="scratch", epochs=1)
    data["tracking"] = {"uri": uri, "experiment": "identity"}
    result = training(0, load_config(FinetuneConfig, None, data))
    register(result["run_id"], "identity-check", "candidate", uri)
    assert not _leaks(str(tmp_path)), _leaks(str(tmp_path))[:5]
    assert not any(v in caplog.text for v in IDENTITY.values())


def test_hash_ids_replaces_patient_study_and_series_ids(identified_archive, tmp_path):
    from dicom_preprocess import open_cache

    plain, hashed = str(tmp_path / "plain"), str(tmp_path / "hashed")
    run_preprocess(PreprocessConfig(input=identified_archive, out=plain, size=32, workers=1), progress=False)
    run_preprocess(PreprocessConfig(input=identified_archive, out=hashed, size=32, workers=1, hash_ids=True,
                                    hash_salt="lab-secret"), progress=False)
    a, b = open_cache(plain).manifest, open_cache(hashed).manifest
    for column in ("patient_id", "study_uid", "series_uid"):
        assert not set(a[column]) & set(b[column]), column
        assert a[column].nunique() == b[column].nunique(), column  # still groups the same slices
    for value in set(a["patient_id"]):
        assert not _contains(hashed, value)


def _contains(root: str, text: str) -> bool:
    for dirpath, _, files in os.walk(root):
        for name in files:
            if text.encode() in open(os.path.join(dirpath, name), "rb").read():
                return True
    return False
