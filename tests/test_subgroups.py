"""Acquisition metadata from the DICOM header to the manifest, and figures per subgroup."""
import glob
import os

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from dicom_preprocess import SUBTYPES, open_cache
from dicom_preprocess.reader import read_dicom
from dicom_preprocess.synthetic import synthesize
from medmoco.subgroups import acquisition_attributes, markdown, subgroup_table, thickness_band


def test_thickness_bands():
    assert list(thickness_band(["0.625", "1.5", "2.5", "5.000000", "", "x"])) == \
        ["<= 1.5 mm", "<= 1.5 mm", "1.5-3 mm", "> 3 mm", "unknown", "unknown"]


def test_subgroup_auc_and_counts_equal_those_of_the_subgroup_alone():
    rng = np.random.default_rng(0)
    pid = np.repeat(np.arange(60), 5)
    labels = (rng.random((60, 6)) < 0.4)[pid].astype(float)
    scanner = np.where(pid < 30, "GE", "SIEMENS").astype(object)
    probs = np.where((scanner == "GE")[:, None], 0.2 + 0.6 * labels, rng.random(labels.shape))  # GE: perfect
    table = subgroup_table(labels, probs, pid, {"manufacturer": scanner}, min_groups=10)["manufacturer"]
    assert set(table) == {"GE", "SIEMENS"} and table["GE"]["n_images"] == 150 and table["GE"]["n_units"] == 30
    for j, name in enumerate(SUBTYPES):
        assert table["GE"]["classes"][name]["auc"] == 1.0
        rows = scanner == "SIEMENS"
        assert table["SIEMENS"]["classes"][name]["auc"] == pytest.approx(roc_auc_score(labels[rows, j], probs[rows, j]))
        assert table["GE"]["classes"][name]["positive_groups"] == len(set(pid[(scanner == "GE") & (labels[:, j] > 0)]))
    assert "| GE | 150 | 30 | 1.000 |" in markdown({"manufacturer": table})


def test_acquisition_tags_are_read_alike_on_both_header_paths_and_vary_in_synthetic_archives(tmp_path, monkeypatch):
    import dicom_preprocess.reader as reader

    archive = synthesize(str(tmp_path / "a"), patients=4, seed=2, slices_per_series=(2, 3), rows=64)
    paths = sorted(glob.glob(os.path.join(archive.images_dir, "*.dcm")))
    fast = [read_dicom(p).acquisition for p in paths]
    monkeypatch.setattr(reader, "fast_dataset", lambda raw: None)
    slow = [read_dicom(p).acquisition for p in paths]
    assert fast == slow
    assert len({a["manufacturer"] for a in fast}) >= 2 and {a["slice_thickness"] for a in fast} <= {"4.0", "5.0"}
    assert all(a["kvp"] and a["convolution_kernel"] and a["manufacturer_model"] for a in fast)


def test_the_manifest_keeps_acquisition_columns(tiny_cache):
    cache = open_cache(tiny_cache)
    for column in ("manufacturer", "manufacturer_model", "slice_thickness", "convolution_kernel", "kvp"):
        assert column in cache.manifest and (cache.manifest[column] != "").all(), column
    attributes = acquisition_attributes(cache.manifest)
    assert set(attributes["slice_thickness"]) == {"> 3 mm"} and len(set(attributes["manufacturer"])) >= 2

