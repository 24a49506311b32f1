"""The preprocessing job on 12 complete real RSNA train series (issue 21).

``../shared/data/rsna-train-12series`` (relative to the project root; its README.md describes it)
holds 407 slices of 12 whole series with their real labels: two encodings (implicit VR 12-bit
unsigned, explicit VR 16-bit signed with -2000 padding), gantry tilt up to 22 degrees, mixed
spacing, 8 pairs of slices sharing a position, and the challenge's invalid ``ID_...`` UIDs.

The folder is preprocessed once, at ``size=512`` (the slices' own size: no resize, so pixels can
be compared exactly), and every check below recomputes what it expects from the files with
pydicom, numpy and the csv module, never with ``dicom_preprocess`` code: the labels, the order of
the slices along the slice normal, the slices that share a position, the windowed pixels and the
series counts of the README's table.
"""
from __future__ import annotations

import csv
import glob
import json
import math
import os
import warnings
from collections import defaultdict

import numpy as np
import pytest

from dicom_preprocess import open_cache
from dicom_preprocess.config import PreprocessConfig
from dicom_preprocess.job import run_preprocess

REAL_SERIES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "rsna-train-12series")
SUBTYPES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")
IMPLICIT_VR_LE, EXPLICIT_VR_LE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
SHARED_SERIES = "ID_72952d87fa"  # 8 positions hold two slices each
PADDED_SERIES = {"ID_72952d87fa", "ID_7e2939f5a2", "ID_6254afb327", "ID_805824f65e", "ID_c0d8754a07",
                 "ID_9d97cf289b"}  # raw -2000 outside the reconstruction circle (the README's "-2000 pad")
POSITION_MM = 1e-3  # two slices whose positions along the normal differ by less share a position

# The README's table: series -> (PatientID, slices, gantry tilt in degrees (0: none), positive
# slices per subtype in SUBTYPES order).
README_TABLE = {
    "ID_72952d87fa": ("ID_462abff7", 36, 8.0, (0, 0, 0, 5, 0, 5)),
    "ID_7e2939f5a2": ("ID_21cbc42c", 36, 22.0, (0, 15, 0, 0, 0, 15)),
    "ID_6254afb327": ("ID_ee4d05e4", 32, 17.5, (0, 1, 0, 0, 6, 6)),
    "ID_44cfc8e964": ("ID_cd5a85fd", 33, 0.0, (0, 12, 4, 17, 15, 18)),
    "ID_3780d48b28": ("ID_ce8a3cd2", 32, 6.0, (0, 4, 0, 0, 0, 4)),
    "ID_805824f65e": ("ID_237065fa", 40, 14.5, (0, 0, 0, 0, 0, 0)),
    "ID_203cd6ec46": ("ID_18f2d431", 38, 0.0, (0, 0, 0, 0, 0, 0)),
    "ID_c0d8754a07": ("ID_fc08e4cf", 32, 16.5, (0, 0, 0, 0, 0, 0)),
    "ID_d479d9cbaa": ("ID_680ca8b0", 31, 0.0, (0, 0, 0, 0, 0, 0)),
    "ID_245e16180c": ("ID_df70c823", 33, 0.0, (0, 0, 0, 0, 0, 0)),
    "ID_f54eba3225": ("ID_1c9eacb9", 36, 0.0, (0, 0, 0, 0, 0, 0)),
    "ID_9d97cf289b": ("ID_5772ebe3", 28, 22.0, (0, 0, 0, 0, 0, 0)),
}


def _dcmread(path: str, pixels: bool = False):
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the ID_... UIDs are not valid UIs
        return pydicom.dcmread(path, stop_before_pixels=not pixels)


@pytest.fixture(scope="module")
def folder():
    path = os.path.abspath(REAL_SERIES)
    if not os.path.isdir(path):
        pytest.skip(f"real RSNA series not found at {path} (../shared/data/rsna-train-12series)")
    return path


@pytest.fixture(scope="module")
def headers(folder):
    """Every slice's header, read with pydicom: image id (file stem) -> what the checks need.
    ``position`` is ImagePositionPatient projected on the slice normal, the cross product of
    ImageOrientationPatient's row and column direction cosines."""
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.dcm"))):
        ds = _dcmread(path)
        orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
        normal = np.cross(orientation[:3], orientation[3:])
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        out[os.path.basename(path)[: -len(".dcm")]] = {
            "path": path, "sop": str(ds.SOPInstanceUID), "series": str(ds.SeriesInstanceUID),
            "patient": str(ds.PatientID), "normal": normal, "position": float(ipp @ normal),
            "syntax": str(ds.file_meta.TransferSyntaxUID), "signed": int(ds.PixelRepresentation),
            "rows": int(ds.Rows), "cols": int(ds.Columns),
        }
    return out


@pytest.fixture(scope="module")
def cache(folder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("real-series") / "cache")
    summary = run_preprocess(PreprocessConfig(input=folder, labels=os.path.join(folder, "labels.csv"), out=out,
                                              size=512, workers=1), progress=False)
    assert summary.finalized
    return open_cache(out)


def _series_rows(cache) -> dict:
    """series uid -> the cache's image ids in the cache's slice order (manifest slice_index)."""
    frame = cache.manifest.sort_values(["series_uid", "slice_index"], kind="mergesort")
    return {uid: list(group["image_id"]) for uid, group in frame.groupby("series_uid", sort=True)}


def test_every_slice_is_cached_with_exactly_its_labels(folder, headers, cache):
    expected: dict[str, dict[str, int]] = defaultdict(dict)
    with open(os.path.join(folder, "labels.csv"), newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["ID", "Label"]
    for key, value in rows[1:]:
        image, _, subtype = key.rpartition("_")
        assert subtype in SUBTYPES and subtype not in expected[image], key
        expected[image][subtype] = int(value)
    assert len(rows) - 1 == 2442 and len(expected) == 407
    assert set(expected) == set(headers) and all(len(v) == 6 for v in expected.values())

    manifest = cache.manifest
    assert cache.errors().empty, cache.errors().to_string()
    assert len(cache) == 407 and cache.metadata["images"] == 407 and cache.metadata["skipped"] == 0
    assert sorted(manifest["image_id"]) == sorted(headers)  # the SOPInstanceUIDs are the file stems
    assert all(headers[i]["sop"] == i for i in headers)
    assert manifest["labeled"].all()
    for row in manifest.itertuples():
        got = {name: int(getattr(row, name)) for name in SUBTYPES}
        assert got == expected[row.image_id], row.image_id


def test_slices_are_ordered_along_the_slice_normal_tilted_series_too(headers, cache):
    """The cache's order within each series is the order of the positions along the slice normal
    (ascending); slices sharing a position may come in either order but next to each other."""
    assert set(_series_rows(cache)) == set(README_TABLE)
    tilted = 0
    for series, cached in _series_rows(cache).items():
        members = [i for i in headers if headers[i]["series"] == series]
        normals = np.array([headers[i]["normal"] for i in members])
        assert np.allclose(normals, normals[0], atol=1e-6), f"{series}: one orientation per series"
        tilted += abs(normals[0][2]) < math.cos(math.radians(1.0))
        assert sorted(cached) == sorted(members)
        # Rank the positions along the normal; slices whose positions differ by less than
        # POSITION_MM share a rank (a shared position).
        group, rank, last = {}, -1, -math.inf
        for image in sorted(members, key=lambda i: headers[i]["position"]):
            if headers[image]["position"] - last >= POSITION_MM:
                rank += 1
            group[image], last = rank, headers[image]["position"]
        ranks = [group[i] for i in cached]
        assert ranks == sorted(ranks), (
            f"{series}: cache order is not the order along the slice normal: "
            f"{[round(headers[i]['position'], 3) for i in cached]}")
    assert tilted == 7  # the README's tilted series: the normal is not the z axis there


def test_both_slices_at_a_shared_position_are_kept_and_adjacent(headers, cache):
    members = [i for i in headers if headers[i]["series"] == SHARED_SERIES]
    by_position: dict[int, list[str]] = defaultdict(list)
    for image in members:
        by_position[round(headers[image]["position"] / POSITION_MM)].append(image)
    pairs = [sorted(v) for v in by_position.values() if len(v) > 1]
    assert len(pairs) == 8 and all(len(p) == 2 for p in pairs)
    manifest = cache.manifest
    row = {image: k for k, image in enumerate(manifest["image_id"])}
    slice_index = manifest["slice_index"].to_numpy()
    prev_index, next_index = manifest["prev_index"].to_numpy(), manifest["next_index"].to_numpy()
    for a, b in pairs:
        assert a in row and b in row, (a, b)
        first, second = sorted((row[a], row[b]), key=lambda r: slice_index[r])
        assert slice_index[second] == slice_index[first] + 1, (a, b)
        assert next_index[first] == second and prev_index[second] == first, (a, b)
    # The neighbour links of the whole series walk its slices in slice_index order, both ways.
    rows = sorted((row[i] for i in members), key=lambda r: slice_index[r])
    assert [slice_index[r] for r in rows] == list(range(len(members)))
    assert (manifest.loc[rows, "series_length"] == len(members)).all()
    assert [int(next_index[r]) for r in rows] == rows[1:] + rows[-1:]
    assert [int(prev_index[r]) for r in rows] == rows[:1] + rows[:-1]


def _window(hu: np.ndarray, center: float, width: float, mode: str) -> np.ndarray:
    """255 x the window of ``hu`` (grey levels, not rounded), as the windowing docs define it,
    written out again here."""
    if mode == "linear":
        value = np.clip((hu - (center - width / 2.0)) / width, 0.0, 1.0)
    elif mode == "sigmoid":
        gain = math.log(255.0 - 1.0)  # U = 1, eps = 1/255: log(U / eps - 1)
        value = 1.0 / (1.0 + np.exp(-(2.0 * gain / width) * (hu - center)))
    else:
        raise AssertionError(f"window_mode {mode!r}: no independent definition in this test")
    return value * 255.0


def test_cached_pixels_equal_an_independent_pydicom_path(headers, cache):
    with open(os.path.join(cache.root, "metadata.json")) as handle:
        metadata = json.load(handle)
    windows = [(float(w["center"]), float(w["width"])) for w in metadata["windows"]]
    mode, size = metadata["window_mode"], metadata["size"]
    row = {image: k for k, image in enumerate(cache.manifest["image_id"])}
    sample = sorted(headers)  # every slice: ~10 ms each, so all 407 rather than a sample
    assert {headers[i]["syntax"] for i in sample} == {IMPLICIT_VR_LE, EXPLICIT_VR_LE}
    assert {headers[i]["signed"] for i in sample} == {0, 1}
    padded = set()
    for image in sample:
        ds = _dcmread(headers[image]["path"], pixels=True)
        raw = ds.pixel_array
        if int(raw.min()) == -2000:
            padded.add(headers[image]["series"])
        # The project's 12-bit wrap rule is for intercept > -100; every slice here has -1024.
        assert float(ds.RescaleIntercept) == -1024.0 and float(ds.RescaleSlope) == 1.0
        assert raw.shape == (size, size), f"{image}: {raw.shape} is not the cache size {size}: no resize expected"
        hu = raw.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        exact = np.stack([_window(hu, c, w, mode) for c, w in windows])
        if str(ds.get("PhotometricInterpretation", "MONOCHROME2")) == "MONOCHROME1":
            exact = 255.0 - exact
        expected = np.floor(exact + 0.5)  # halves up; the cache may round them to even
        got = np.asarray(cache[row[image]], dtype=np.float64)
        assert got.shape == expected.shape
        worst = float(np.abs(got - expected).max())
        assert worst <= 1.0, f"{image} ({headers[image]['series']}): {worst} grey levels off"
        # Stronger: every stored level is a nearest level of the exact value (a tie may go either way).
        nearest = float(np.abs(got - exact).max())
        assert nearest <= 0.5 + 1e-6, f"{image}: a stored level is {nearest:.3f} from the exact value"
    assert padded == PADDED_SERIES


def test_series_and_patient_counts_match_the_readme_table(headers, cache):
    by_series: dict[str, list[str]] = defaultdict(list)
    for image, header in headers.items():
        by_series[header["series"]].append(image)
    assert {s: len(v) for s, v in by_series.items()} == {s: t[1] for s, t in README_TABLE.items()}
    assert {s: {headers[i]["patient"] for i in v} for s, v in by_series.items()} == {
        s: {t[0]} for s, t in README_TABLE.items()}
    for series, images in by_series.items():  # tilt: the angle between the slice normal and z
        tilt = math.degrees(math.acos(min(1.0, abs(headers[images[0]]["normal"][2]))))
        assert abs(tilt - README_TABLE[series][2]) < 0.1, (series, tilt)

    manifest = cache.manifest
    assert manifest["series_uid"].nunique() == 12 and manifest["patient_id"].nunique() == 12
    assert manifest.groupby("series_uid").size().to_dict() == {s: t[1] for s, t in README_TABLE.items()}
    assert (manifest["series_length"] == manifest.groupby("series_uid")["image_id"].transform("size")).all()
    assert manifest.groupby("series_uid")["patient_id"].agg(set).to_dict() == {
        s: {t[0]} for s, t in README_TABLE.items()}
    positives = manifest.groupby("series_uid")[list(SUBTYPES)].sum()
    assert {s: tuple(int(v) for v in positives.loc[s]) for s in README_TABLE} == {
        s: t[3] for s, t in README_TABLE.items()}
    assert (positives["any"] > 0).sum() == 5 and (positives["epidural"] == 0).all()
