"""The preprocessing job: archive kinds, resume after kill -9, shards + merge, splits, labels."""
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile

import numpy as np
import pandas as pd
import pytest

from dicom_preprocess import SUBTYPES, open_cache
from dicom_preprocess.config import ConfigError, PreprocessConfig, load_config
from dicom_preprocess.job import finalize_cache, merge_parts, run_preprocess
from dicom_preprocess.labels import read_rsna_labels

from .conftest import caches_equal


def _config(archive, src, out, **kw):
    base = dict(input=src, labels=archive.labels_csv, out=str(out), size=64, workers=1, files_per_shard=8)
    base.update(kw)
    return PreprocessConfig(**base)


@pytest.fixture(scope="module")
def small_cache(archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("small")
    run_preprocess(_config(archive, archive.root, out), progress=False)
    return str(out)


def test_cache_api_and_metadata(small_cache, archive):
    cache = open_cache(small_cache)
    assert len(cache) == len(archive.slices)
    assert cache[0].shape == (3, 64, 64) and cache[0].dtype == np.uint8
    assert set(cache.manifest.image_id) == {s.image_id for s in archive.slices}
    assert cache.metadata["channels"] == ["brain", "subdural", "bone"]
    truth = {s.image_id: s.labels for s in archive.slices}
    for row in cache.manifest.itertuples():
        assert [getattr(row, k) for k in SUBTYPES] == [truth[row.image_id][k] for k in SUBTYPES]
    assert cache.manifest.labeled.all()
    assert "6 duplicate rows dropped" in cache.metadata["labels"]


def test_zip_tar_and_folder_give_identical_caches(archive, small_cache, tmp_path):
    zip_path = tmp_path / "a.zip"
    tar_path = tmp_path / "a.tar.gz"
    # compresslevel=1: gzip -9 of noisy slices took 30 s of this test, and the level changes nothing read
    with zipfile.ZipFile(zip_path, "w") as zf, tarfile.open(tar_path, "w:gz", compresslevel=1) as tf:
        for name in sorted(os.listdir(archive.images_dir)):
            full = os.path.join(archive.images_dir, name)
            zf.write(full, f"stage_2_train/{name}")
            tf.add(full, f"stage_2_train/{name}")
    folder = open_cache(small_cache)
    for src in (zip_path, tar_path):
        out = tmp_path / (src.name + ".cache")
        run_preprocess(_config(archive, str(src), out, workers=2), progress=False)
        caches_equal(folder, open_cache(str(out)))


def test_series_order_and_neighbours(small_cache):
    cache = open_cache(small_cache)
    m = cache.manifest
    for _, series in m.groupby(["study_uid", "series_uid"]):
        ordered = series.sort_values("z")
        assert list(ordered.slice_index) == list(range(len(series)))
        idx = ordered.index.to_numpy()
        mid = idx[len(idx) // 2]
        pos = len(idx) // 2
        np.testing.assert_array_equal(cache.neighbours(mid), idx[pos - 1 : pos + 2])
        np.testing.assert_array_equal(cache.neighbours(idx[0]), [idx[0], idx[0], idx[1]])
    assert cache.stack(0).shape == (9, 64, 64)


def test_splits_grouped_by_patient_and_label_fraction_stratified(small_cache):
    m = open_cache(small_cache).manifest
    assert (m.groupby("patient_id").split.nunique() == 1).all()
    sub = m[m.in_label_subset]
    assert (sub.split == "train").all()
    pool = m[(m.split == "train") & m.labeled]
    for value in (0, 1):
        n = int((pool["any"] == value).sum())
        if n:
            assert int((sub["any"] == value).sum()) == max(1, round(0.2 * n))


def test_patient_splits_follow_fractions_on_many_patients():
    from dicom_preprocess.splits import label_subset, patient_splits

    rng = np.random.default_rng(0)
    patients = pd.Series(np.repeat([f"P{i}" for i in range(2000)], rng.integers(10, 60, 2000)))
    fractions = {"unsupervised": 0.75, "train": 0.15, "val": 0.05, "test": 0.05}
    splits = patient_splits(patients, fractions, seed=3)
    shares = pd.Series(splits).value_counts(normalize=True)
    for name, share in fractions.items():
        assert abs(shares[name] - share) < 0.02, name
    assert pd.DataFrame({"p": patients, "s": splits}).groupby("p").s.nunique().max() == 1
    np.testing.assert_array_equal(splits, patient_splits(patients, fractions, seed=3))
    any_label = pd.Series((rng.random(10000) < 0.14).astype(int))
    mask = label_subset(any_label, 0.2, seed=0)
    assert mask.sum() == round(0.2 * (any_label == 0).sum()) + round(0.2 * (any_label == 1).sum())
    assert abs(any_label[mask].mean() - any_label.mean()) < 0.002


def test_labels_csv_report(tmp_path):
    path = tmp_path / "labels.csv"
    rows = ["ID,Label"] + [f"ID_a_{s},{int(s == 'any')}" for s in SUBTYPES] + [f"ID_a_{SUBTYPES[0]},0"]
    rows += ["ID_b_epidural,1", "garbage", "ID_c_alien,1", "ID_d_any,7"]
    path.write_text("\n".join(rows) + "\n")
    table, report = read_rsna_labels(str(path))
    assert table.loc["ID_a", "any"] == 1 and table.loc["ID_a", "epidural"] == 0
    assert table.loc["ID_b", "epidural"] == 1 and "ID_b" in report.incomplete_images
    assert report.duplicate_rows == 1
    assert report.unknown_subtypes == {"alien": 1}
    assert len(report.malformed_rows) == 2


def _chunks_done(parts):
    return len([n for n in os.listdir(parts) if n.endswith(".json") and n.startswith("chunk_")]) if os.path.isdir(parts) else 0


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_uninterrupted_cache(archive, small_cache, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "medmoco", "preprocess", "--input", archive.root, "--labels", archive.labels_csv,
           "--out", str(out), "--size", "64", "--workers", "1", "--files-per-shard", "8", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _chunks_done(out / "parts") < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "metadata.json").exists()  # killed before the end
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    caches_equal(open_cache(small_cache), open_cache(str(out)))


def test_shards_then_merge_equal_a_single_run(archive, small_cache, tmp_path):
    outs = []
    for i in range(3):
        out = tmp_path / f"shard{i}"
        summary = run_preprocess(_config(archive, archive.root, out, shard=f"{i}/3"), progress=False)
        assert not summary.finalized
        outs.append(str(out))
    with pytest.raises(ConfigError, match="chunks not done"):
        finalize_cache(outs[0])
    merge_parts(outs[0], outs[1:])
    finalize_cache(outs[0])
    caches_equal(open_cache(small_cache), open_cache(outs[0]))


def test_rerun_with_other_settings_is_refused(archive, small_cache):
    with pytest.raises(ConfigError, match="another job"):
        run_preprocess(_config(archive, archive.root, small_cache, size=128), progress=False)


def test_config_errors_name_the_setting(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("size: 256\nwindowz: [brain]\n")
    with pytest.raises(ConfigError, match="windowz"):
        load_config(PreprocessConfig, str(bad))
    with pytest.raises(ConfigError, match="label_fraction"):
        load_config(PreprocessConfig, None, {"label_fraction": 1.5})
    with pytest.raises(ConfigError, match="size"):
        load_config(PreprocessConfig, None, {"size": "big"})
    config = load_config(PreprocessConfig, "configs/preprocess/rsna.yaml", {"size": 128})
    assert config.size == 128 and config.windows == ["brain", "subdural", "bone"]


def test_bad_files_in_a_folder_are_recorded_and_the_rest_cached(archive, tmp_path):
    src = tmp_path / "mixed"
    src.mkdir()
    good = sorted(os.listdir(archive.images_dir))[:3]
    for name in good:
        (src / name).write_bytes(open(os.path.join(archive.images_dir, name), "rb").read())
    (src / "ID_truncated.dcm").write_bytes((src / good[0]).read_bytes()[:5000])
    (src / "ID_empty.dcm").write_bytes(b"")
    with open(src / "ID_huge.dcm", "wb") as handle:  # sparse: one byte past the 256 MB bound
        handle.truncate(256 * 2**20 + 1)
    (src / "readme.txt").write_text("ignored")
    out = tmp_path / "out"
    summary = run_preprocess(PreprocessConfig(input=str(src), out=str(out), size=64, workers=1), progress=False)
    cache = open_cache(str(out))
    assert len(cache) == 3 and summary.skipped == 3
    errors = cache.errors()
    assert set(errors.source) == {"ID_truncated.dcm", "ID_empty.dcm", "ID_huge.dcm"}
    assert errors.set_index("source").reason["ID_huge.dcm"] == "file larger than 256 MB"
    assert not cache.manifest.labeled.any()


def test_cli_preprocess_and_open_cache(archive, tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run([sys.executable, "-m", "medmoco", "preprocess", "--config", "configs/preprocess/rsna.yaml",
                             "--input", archive.images_dir, "--labels", archive.labels_csv, "--out", str(out),
                             "--size", "32", "--workers", "2", "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "cache complete: 67 images, 0 inputs skipped" in result.stdout
    assert open_cache(str(out))[0].shape == (3, 32, 32)
    bad = subprocess.run([sys.executable, "-m", "medmoco", "preprocess", "--input", archive.images_dir,
                          "--out", str(tmp_path / "x"), "--set", "sizee=3"], capture_output=True, text=True)
    assert bad.returncode == 2 and "sizee" in bad.stderr


def test_rsna_uids_are_written_and_read_without_a_warning_per_file(tmp_path, caplog):
    """RSNA's ID_... UIDs are invalid UIs; pydicom 3 logged one warning per value written or read
    (thousands in `make demo`)."""
    import logging
    import warnings

    from dicom_preprocess.reader import read_dicom
    from dicom_preprocess.synthetic import synthesize

    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        archive = synthesize(str(tmp_path), patients=1, seed=0, slices_per_series=(2, 2), rows=32)
        for s in archive.slices:
            read_dicom(os.path.join(archive.images_dir, f"{s.image_id}.dcm"))
    assert not [r for r in caplog.records if "VR UI" in r.getMessage()]
    assert not [w for w in caught if "VR UI" in str(w.message)]


def test_decoder_messages_name_their_file_instead_of_reaching_the_console(tmp_path):
    """GDCM/OpenJPEG/libjpeg print to stderr without a file name; the job puts what they said in
    the file's errors.csv reason (rejected) or manifest notes (cached)."""
    import shutil

    from pydicom.data import get_testdata_file

    src = tmp_path / "in"
    src.mkdir()
    for name in ("JPEG-lossy.dcm", "JPEG2000-embedded-sequence-delimiter.dcm", "CT_small.dcm"):
        path = get_testdata_file(name)
        if path is None:
            pytest.skip(f"{name} not bundled with this pydicom")
        shutil.copyfile(path, src / name)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "medmoco", "preprocess", "--input", str(src), "--out", str(out),
                             "--size", "32", "--workers", "2", "--modalities", "", "--quiet"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    for said in ("Unsupported JPEG data precision", "Invalid number of tiles"):
        assert said not in result.stderr
    cache = open_cache(str(out))
    notes = dict(zip(cache.manifest["source"], cache.manifest["notes"]))
    assert "decoder said: Unsupported JPEG data precision 12" in notes["JPEG-lossy.dcm"]
    assert notes["CT_small.dcm"] == ""
    reasons = dict(zip(cache.errors()["source"], cache.errors()["reason"]))
    assert "decoder said: Invalid number of tiles" in reasons["JPEG2000-embedded-sequence-delimiter.dcm"]
