"""Shared fixtures: a small synthetic RSNA-like archive and its cache, built once per session."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from dicom_preprocess.config import PreprocessConfig
from dicom_preprocess.job import run_preprocess
from dicom_preprocess.synthetic import synthesize

warnings.filterwarnings("ignore", message="Invalid value for VR UI")
REAL_SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "rsna-stage2-sample")


@pytest.fixture(autouse=True)
def _hermetic_mlflow_uri():
    """MLflow's set_tracking_uri writes MLFLOW_TRACKING_URI into os.environ; no test may leave it
    behind for the next one (a later subprocess would talk to a server that is gone)."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    try:
        import mlflow.tracking._tracking_service.utils as mlflow_uri

        mlflow_uri._tracking_uri = None  # back to "environment, else default" for the next test
    except ImportError:
        pass


@pytest.fixture(scope="session")
def archive(tmp_path_factory):
    """6 patients, every RSNA encoding variant and odd shape, HU kept for checks."""
    return synthesize(str(tmp_path_factory.mktemp("synth")), patients=6, seed=1, keep_hu=True,
                      slices_per_series=(5, 8))


@pytest.fixture(scope="session")
def cache_dir(archive, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cache"))
    run_preprocess(PreprocessConfig(input=archive.images_dir, labels=archive.labels_csv, out=out, size=256,
                                    workers=1, files_per_shard=16), progress=False)
    return out


@pytest.fixture
def real_sample_dir():
    path = os.path.abspath(REAL_SAMPLE)
    if not os.path.isdir(path):
        pytest.skip(f"real RSNA sample not found at {path} (../shared/data/rsna-stage2-sample)")
    return path


def caches_equal(a, b) -> None:
    """Assert two opened caches hold the same images, manifest and pixels."""
    assert len(a) == len(b)
    cols = [c for c in a.manifest.columns]
    assert a.manifest[cols].equals(b.manifest[cols])
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i], b[i])


@pytest.fixture(scope="session")
def tiny_cache(archive, tmp_path_factory):
    """32 px cache of the session archive, splits sized so train and test both hold labels."""
    out = str(tmp_path_factory.mktemp("tiny"))
    run_preprocess(PreprocessConfig(input=archive.images_dir, labels=archive.labels_csv, out=out, size=32,
                                    workers=1, files_per_shard=64,
                                    split_fractions={"unsupervised": 0.4, "train": 0.4, "test": 0.2}),
                   progress=False)
    return out


def write_yaml(path, data) -> str:
    import yaml

    with open(path, "w") as handle:
        yaml.safe_dump(data, handle)
    return str(path)


def pretrain_settings(cache: str, run_dir: str, db: str, **over) -> dict:
    """A seconds-long MoCo config for tests (resnet18, 32 px, K=32)."""
    data = {
        "cache": cache, "run_dir": run_dir, "splits": ["unsupervised", "train", "test"], "image_size": 32,
        "epochs": 4, "batch_size": 8, "max_iters_per_epoch": 4,
        "moco": {"arch": "resnet18", "dim": 16, "K": 32, "m": 0.9, "bn_splits": 2},
        "optim": {"lr": 0.5}, "workers": 0, "knn_every": 0, "log_every": 1, "progress": False,
        "tracking": {"uri": f"sqlite:///{db}", "experiment": "test-pretrain"},
    }
    for key, value in over.items():
        if isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    return data


@pytest.fixture(scope="session")
def cls_archive(tmp_path_factory):
    """16 patients of small series (128 px) so that the train and test splits hold positives."""
    return synthesize(str(tmp_path_factory.mktemp("cls-synth")), patients=16, seed=3, slices_per_series=(4, 6),
                      rows=128)


@pytest.fixture(scope="session")
def cls_cache(cls_archive, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cls-cache"))
    run_preprocess(PreprocessConfig(input=cls_archive.images_dir, labels=cls_archive.labels_csv, out=out, size=32,
                                    workers=1, files_per_shard=64,
                                    split_fractions={"unsupervised": 0.3, "train": 0.4, "test": 0.3}),
                   progress=False)
    return out


@pytest.fixture(scope="session")
def backbone_file(tmp_path_factory):
    """A real `medmoco pretrain`-format export of a (freshly initialised) resnet18 MoCo backbone."""
    from medmoco.models import build_moco, export_backbone

    torch_seed = __import__("torch").manual_seed(0)  # noqa: F841
    moco = build_moco("resnet18", 3, dim=16, K=32, bn_splits=1)
    path = str(tmp_path_factory.mktemp("backbone") / "backbone.pt")
    return export_backbone(moco, path, "resnet18", 3, 512, meta={"image_size": 32, "context": 0,
                                                                 "mlflow_run_id": "pretrain-run-x"})


def finetune_settings(cache: str, run_dir: str, db: str, **over) -> dict:
    data = {"cache": cache, "run_dir": run_dir, "arch": "resnet18", "epochs": 2, "batch_size": 8,
            "label_fraction": 1.0, "workers": 0, "progress": False, "eval_batch_size": 32,
            "optim": {"name": "adam", "lr": 0.05, "weight_decay": 0.0},
            "tracking": {"uri": f"sqlite:///{db}", "experiment": "test-finetune"}}
    for key, value in over.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data


def kill_in_epoch_3_then_resume(stage: str, config: str, run_dir, finished, delay: float) -> None:
    """Run ``medmoco STAGE --config CONFIG``, SIGKILL it ``delay`` s after checkpoint 2 is written
    (inside epoch 3), check that ``finished`` (what only a complete run writes) is not there, and
    rerun it with ``--resume auto``."""
    import signal
    import subprocess
    import sys
    import time

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "medmoco", stage, "--config", config]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=repo)
    target = os.path.join(str(run_dir), "checkpoints", "checkpoint_2.pt")
    deadline = time.time() + 300
    while not os.path.exists(target) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(finished), "the run finished before it was killed"
    subprocess.run(cmd + ["--resume", "auto"], check=True, capture_output=True, cwd=repo)
