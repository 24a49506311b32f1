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
