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
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest workers on a 2-core CI machine: one torch thread each, or the
    # two workers' intra-op thread pools oversubscribe the same two cores. The variable carries
    # the same setting into the subprocesses a test starts: the kill/resume tests compare a run in
    # this process with one in a subprocess exactly, and float sums differ between thread counts.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
REAL_SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "rsna-stage2-sample")


@pytest.fixture(autouse=True)
def _hermetic_mlflow_uri():
    """MLflow's set_tracking_uri writes MLFLOW_TRACKING_URI into os.environ; no test may leave it
    behind for the next one (a later subprocess would talk to a server that is gone)."""
    before = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        import mlflow.tracking._model_registry.utils as mlflow_registry_uri
        import mlflow.tracking._tracking_service.utils as mlflow_uri

        mlflow_uri._tracking_uri = None  # back to "environment, else default" for the next test
        mlflow_registry_uri._registry_uri = None
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
    """32 px cache of the session archive, splits sized so train, val and test all hold labels."""
    return _small_cache(archive, str(tmp_path_factory.mktemp("tiny")), 64,
                        {"unsupervised": 0.4, "train": 0.3, "val": 0.15, "test": 0.15})


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
    """16 patients of small series (128 px) so that the train, val and test splits hold positives."""
    return synthesize(str(tmp_path_factory.mktemp("cls-synth")), patients=16, seed=3, slices_per_series=(4, 6),
                      rows=128)


@pytest.fixture(scope="session")
def cls_cache(cls_archive, tmp_path_factory):
    return _small_cache(cls_archive, str(tmp_path_factory.mktemp("cls-cache")), 64,
                        {"unsupervised": 0.2, "train": 0.4, "val": 0.2, "test": 0.2})


def _small_cache(archive, out: str, files_per_shard: int, split_fractions: dict) -> str:
    """A 32 px cache of ``archive`` (one process), split by patient as given."""
    run_preprocess(PreprocessConfig(input=archive.images_dir, labels=archive.labels_csv, out=out, size=32, workers=1,
                                    files_per_shard=files_per_shard, split_fractions=split_fractions),
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


def kill_at_iterations_then_resume(stage: str, config: str, finished, kills: list[int]) -> None:
    """Run ``medmoco STAGE --config CONFIG`` in a process that SIGKILLs itself right after iteration
    ``kills[0]`` (the engines' failpoint), then again with ``--resume auto`` killed at ``kills[1]``,
    and so on; after each kill, check that the process died by SIGKILL and that ``finished`` (what
    only a complete run writes) is not there. The final resume is the caller's to run."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for i, at in enumerate(kills):
        cmd = [sys.executable, "-m", "medmoco", stage, "--config", config] + (["--resume", "auto"] if i else [])
        env = {**os.environ, "MEDMOCO_FAILPOINT_KILL_AT_ITERATION": str(at)}
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, env=env, timeout=600)
        assert result.returncode == -9, f"not killed at iteration {at} ({result.returncode}): {result.stderr[-2000:]}"
        assert not os.path.exists(finished), f"the run finished before iteration {at}"


def replayed_steps(kills: list[int], iterations_per_epoch: int, total: int) -> list[int]:
    """The iteration steps a run killed after each of ``kills`` and resumed from its last epoch
    checkpoint logs, in order: the iterations between a checkpoint and a kill appear twice."""
    steps, start = [], 1
    for at in kills:
        steps += list(range(start, at))  # the kill comes before iteration `at` is logged
        start = (at - 1) // iterations_per_epoch * iterations_per_epoch + 1
    return steps + list(range(start, total + 1))


IDENTITY = {"PatientName": "Doe^Janet^Q", "PatientBirthDate": "19471103", "AccessionNumber": "ACC99812345",
            "InstitutionName": "St Elsewhere General", "ReferringPhysicianName": "Kildare^James",
            "OtherPatientIDs": "MRN-55501234", "PatientAddress": "12 Elm Street Springfield"}


@pytest.fixture(scope="session")
def easy_archive(tmp_path_factory):
    """An easy task: large intraparenchymal blood only (so `any` is the same task), 64 px slices;
    a model learns it in a few epochs. The files carry identifying tags that no output may show."""
    import pydicom

    archive = synthesize(str(tmp_path_factory.mktemp("easy")), patients=24, seed=11, slices_per_series=(4, 6), rows=64,
                         lesion_scale=3.0, subtypes=("intraparenchymal",), hemorrhage_rate=0.6)
    for name in os.listdir(archive.images_dir):
        path = os.path.join(archive.images_dir, name)
        ds = pydicom.dcmread(path)
        for keyword, value in IDENTITY.items():
            setattr(ds, keyword, value)
        ds.save_as(path)
    return archive


@pytest.fixture(scope="session")
def easy_cache(easy_archive, tmp_path_factory):
    return _small_cache(easy_archive, str(tmp_path_factory.mktemp("easy-cache")), 128,
                        {"unsupervised": 0.1, "train": 0.5, "val": 0.2, "test": 0.2})


@pytest.fixture(scope="session")
def easy_models(easy_cache, tmp_path_factory):
    """Two fine-tuning runs on the easy task, tracked in one SQLite store: ``learned`` (Adam, a
    few epochs) and ``chance`` (the same network, an lr of 1e-12: its random initialisation)."""
    from medmoco.config import FinetuneConfig, load_config
    from pipelines.finetune import training

    tmp = tmp_path_factory.mktemp("easy-runs")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    runs = {}
    for name, epochs, optim in (("learned", 4, {"name": "adam", "lr": 0.05}),
                                ("chance", 1, {"name": "sgd", "lr": 1e-12, "momentum": 0.0})):
        data = finetune_settings(easy_cache, str(tmp / name), "unused", mode="scratch", epochs=epochs, optim=optim)
        data["tracking"] = {"uri": uri, "experiment": "easy"}
        # the easy test split holds ~5 patients: below the default minimum intervals are withheld;
        # these tests check the machinery on a task with a known answer, so they lower it
        data["bootstrap"] = {"min_groups": 2}
        runs[name] = training(0, load_config(FinetuneConfig, None, data))
    return {"uri": uri, "runs": runs, "tmp": tmp}
