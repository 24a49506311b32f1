"""Real-world input as a user meets it: every decode path applies the same HU rules, other
modalities are refused, labels keyed by file names are found, and files that cannot be used end in
clear errors rather than tracebacks or silently empty results."""
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pydicom
import pytest

from dicom_preprocess import open_cache
from dicom_preprocess.assembly import LabelsUnmatched
from dicom_preprocess.config import PreprocessConfig
from dicom_preprocess.job import run_preprocess
from dicom_preprocess.reader import SkipImage, read_dicom
from dicom_preprocess.synthetic import encode_codes, head_phantom, write_dicom

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tags(uid: str, **over) -> dict:
    tags = {"SOPInstanceUID": uid, "Modality": "CT", "PatientID": "ID_patient01", "StudyInstanceUID": "ID_study01",
            "SeriesInstanceUID": "ID_series01", "ImagePositionPatient": [-125.0, -125.0, 10.0],
            "BitsStored": 12, "PixelRepresentation": 0, "RescaleIntercept": 0.0, "RescaleSlope": 1.0}
    tags.update(over)
    return tags


@pytest.fixture(scope="module")
def wrap_slice(tmp_path_factory):
    """The RSNA 12-bit wrap defect (BitsStored 12, unsigned, intercept 0: codes are HU mod 4096)
    stored three ways: uncompressed, RLE Lossless (pydicom encodes it) and JPEG Lossless SV1 (GDCM,
    through SimpleITK's writer, encodes it)."""
    import SimpleITK as sitk
    from pydicom.uid import RLELossless

    tmp = tmp_path_factory.mktemp("wrap")
    hu = head_phantom(64, 64, 0.5, {}, np.random.default_rng(0)).astype(np.float64)
    codes = encode_codes(hu, "wrap")
    paths = {"uncompressed": str(tmp / "plain.dcm"), "rle": str(tmp / "rle.dcm"), "jpeg_lossless": str(tmp / "jl.dcm")}
    write_dicom(paths["uncompressed"], codes, _tags("ID_wrap0001"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(paths["uncompressed"])
        ds.compress(RLELossless)
        ds.save_as(paths["rle"])
        writer = sitk.ImageFileWriter()  # GDCM writes JPEG Lossless (process 14) from 16-bit codes
        writer.SetFileName(str(tmp / "sitk.dcm"))
        writer.SetImageIO("GDCMImageIO")
        writer.SetUseCompression(True)
        writer.SetCompressor("JPEG")  # GDCM: JPEG Lossless, process 14 (its default is JPEG 2000)
        writer.Execute(sitk.GetImageFromArray(codes))
        jl = pydicom.dcmread(str(tmp / "sitk.dcm"))
        for key, value in _tags("ID_wrap0001").items():
            setattr(jl, key, value)
        jl.HighBit = 11
        jl.save_as(paths["jpeg_lossless"])
    return {"hu": hu, "paths": paths}


def test_the_wrap_fix_is_applied_on_every_decode_path(wrap_slice, monkeypatch):
    from dicom_preprocess import decoders

    ran = {"uncompressed": "", "rle": "pylibjpeg-rle", "jpeg_lossless": "imagecodecs"}
    for kind, path in wrap_slice["paths"].items():
        image = read_dicom(path)
        assert image.code_map.wrap_fix, kind
        np.testing.assert_array_equal(image.to_hu(), wrap_slice["hu"], err_msg=kind)  # air reads -1000, not 3096
        assert image.decoder == ran[kind] and not image.notes, (kind, image.decoder, image.notes)
    # Each decoder of each list alone, SimpleITK's float round trip included: the same HU.
    for kind, syntax in (("rle", decoders.RLE_LOSSLESS), ("jpeg_lossless", decoders.JPEG_LOSSLESS_SV1)):
        assert pydicom.dcmread(wrap_slice["paths"][kind]).file_meta.TransferSyntaxUID == syntax
        for name in decoders.DECODERS[syntax]:
            monkeypatch.setitem(decoders.DECODERS, syntax, (name,))
            image = read_dicom(wrap_slice["paths"][kind])
            assert image.decoder == name and image.code_map.wrap_fix
            np.testing.assert_array_equal(image.to_hu(), wrap_slice["hu"], err_msg=f"{kind} by {name}")
        monkeypatch.undo()


def test_the_wrap_rule_is_for_ct_with_slope_one_and_other_modalities_are_refused(tmp_path):
    codes = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096
    write_dicom(str(tmp_path / "cr.dcm"), codes, _tags("ID_cr01", Modality="CR", RescaleSlope=0.684,
                                                       RescaleIntercept=200.0))
    with pytest.raises(SkipImage, match="Modality CR is not accepted"):
        read_dicom(str(tmp_path / "cr.dcm"))
    image = read_dicom(str(tmp_path / "cr.dcm"), modalities=None)  # read anyway: not HU, not shifted by -516
    assert not image.code_map.wrap_fix
    np.testing.assert_allclose(image.to_hu(), codes * 0.684 + 200.0)
    write_dicom(str(tmp_path / "ct.dcm"), codes, _tags("ID_ct01", RescaleSlope=0.5))
    assert not read_dicom(str(tmp_path / "ct.dcm")).code_map.wrap_fix  # CT, but slope 0.5
    ds = pydicom.dcmread(str(tmp_path / "ct.dcm"))
    del ds.Modality
    ds.RescaleSlope = 1.0
    ds.save_as(str(tmp_path / "nomod.dcm"))
    image = read_dicom(str(tmp_path / "nomod.dcm"))
    assert image.code_map.wrap_fix and "no Modality tag" in image.notes[0]


def test_modalities_in_a_job_errors_csv_and_manifest_notes(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    codes = np.full((32, 32), 1024, dtype=np.uint16)
    write_dicom(str(src / "a.dcm"), codes, _tags("ID_a", RescaleIntercept=-1024.0, BitsStored=16))
    write_dicom(str(src / "mr.dcm"), codes, _tags("ID_mr", Modality="MR"))
    ds = pydicom.dcmread(str(src / "a.dcm"))
    del ds.Modality
    ds.SOPInstanceUID = "ID_nomodality"
    ds.save_as(str(src / "b.dcm"))
    run_preprocess(PreprocessConfig(input=str(src), out=str(tmp_path / "out"), size=32, workers=1,
                                    split_fractions={"unsupervised": 1.0}), progress=False)
    cache = open_cache(str(tmp_path / "out"))
    notes = dict(zip(cache.manifest["image_id"], cache.manifest["notes"]))
    assert set(notes) == {"ID_a", "ID_nomodality"} and "no Modality tag" in notes["ID_nomodality"]
    assert "Modality MR is not accepted" in dict(zip(cache.errors()["source"], cache.errors()["reason"]))["mr.dcm"]
    run_preprocess(PreprocessConfig(input=str(src), out=str(tmp_path / "all"), size=32, workers=1, modalities=[],
                                    split_fractions={"unsupervised": 1.0}), progress=False)
    assert len(open_cache(str(tmp_path / "all"))) == 3


def test_labels_keyed_by_file_name_are_found_and_none_found_is_an_error(archive, tmp_path, capsys):
    """Outside RSNA the label ids are often file names while SOPInstanceUIDs are 1.2.840... ."""
    import pandas as pd

    from dicom_preprocess.labels import read_rsna_labels, write_rsna_labels
    from pipelines.cli import main

    src = tmp_path / "renamed"
    src.mkdir()
    labels, _ = read_rsna_labels(archive.labels_csv)
    names = sorted(os.listdir(archive.images_dir))[:8]
    by_file = {}
    for i, name in enumerate(names):
        shutil.copyfile(os.path.join(archive.images_dir, name), src / f"scan_{i:03d}.dcm")
        by_file[f"scan_{i:03d}"] = labels.loc[name[:-4]]
    write_rsna_labels(pd.DataFrame(by_file).T, str(tmp_path / "by_file.csv"))
    run_preprocess(PreprocessConfig(input=str(src), labels=str(tmp_path / "by_file.csv"), out=str(tmp_path / "out"),
                                    size=32, workers=1), progress=False)
    cache = open_cache(str(tmp_path / "out"))
    assert cache.manifest["labeled"].all() and "8 by file name" in cache.metadata["labels"]
    for row in cache.manifest.itertuples():
        stem = os.path.basename(row.source)[:-4]
        assert row.any == by_file[stem]["any"]
    write_rsna_labels(pd.DataFrame({f"other_{i}": by_file[k] for i, k in enumerate(by_file)}).T,
                      str(tmp_path / "other.csv"))
    with pytest.raises(LabelsUnmatched, match="other_0.*ID_"):
        run_preprocess(PreprocessConfig(input=str(src), labels=str(tmp_path / "other.csv"), out=str(tmp_path / "o2"),
                                        size=32, workers=1), progress=False)
    code = main(["preprocess", "--input", str(src), "--labels", str(tmp_path / "other.csv"), "--out",
                 str(tmp_path / "o3"), "--size", "32", "--workers", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "none of its 8 image ids matches" in err and "Traceback" not in err


def test_a_folder_with_nothing_usable_writes_its_errors_and_stops_clearly(tmp_path):
    src = tmp_path / "junk"
    src.mkdir()
    (src / "notes.dcm").write_text("not a dicom")
    (src / "random.dcm").write_bytes(np.random.default_rng(0).bytes(4000))
    (src / "picture").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    (src / "readme.txt").write_text("listed nowhere")
    (src / "meta.json").write_text("{}")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "medmoco", "preprocess", "--input", str(src), "--out", str(out),
                             "--workers", "1", "--quiet"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "none of the 3 inputs is a usable image" in result.stderr and "errors.csv" in result.stderr
    import pandas as pd

    errors = pd.read_csv(out / "errors.csv")
    assert set(errors["source"]) == {"notes.dcm", "random.dcm", "picture"}
    assert not (out / "metadata.json").exists()


def test_single_file_inputs_and_an_unusable_output_path(archive, tmp_path, capsys):
    import nibabel as nib

    from pipelines.cli import main

    one = os.path.join(archive.images_dir, sorted(os.listdir(archive.images_dir))[0])
    summary = run_preprocess(PreprocessConfig(input=one, out=str(tmp_path / "one"), size=32, workers=1,
                                              split_fractions={"unsupervised": 1.0}), progress=False)
    assert summary.images == 1
    volume = np.random.default_rng(0).integers(-1000, 1500, size=(40, 32, 5)).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "head.nii.gz"))
    summary = run_preprocess(PreprocessConfig(input=str(tmp_path / "head.nii.gz"), out=str(tmp_path / "nii"), size=32,
                                              workers=1, split_fractions={"unsupervised": 1.0}), progress=False)
    assert summary.images == 5
    (tmp_path / "a_file").write_text("x")
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "cache"):
        assert main(["preprocess", "--input", one, "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "out " in err and "Traceback" not in err


def test_counts_are_the_caches_and_a_rerun_says_what_it_reused(archive, tmp_path, capsys):
    from pipelines.cli import main

    src = tmp_path / "dup"
    src.mkdir()
    names = sorted(os.listdir(archive.images_dir))[:5]
    for name in names:
        shutil.copyfile(os.path.join(archive.images_dir, name), src / name)
    shutil.copyfile(os.path.join(archive.images_dir, names[0]), src / "copy_of_first.dcm")  # same image id twice
    (src / "broken.dcm").write_bytes(b"")
    (src / "index.json").write_text("{}")
    (src / "notes.txt").write_text("")
    args = ["preprocess", "--input", str(src), "--out", str(tmp_path / "out"), "--size", "32", "--workers", "1",
            "--files-per-shard", "4", "--quiet"]
    assert main(args) == 0
    first = capsys.readouterr().out
    cache = open_cache(str(tmp_path / "out"))
    assert len(cache) == 5 and len(cache.errors()) == 2  # the duplicate and the empty file
    assert "5 images, 2 inputs skipped" in first and "7 files decoded" in first
    assert cache.metadata["unlisted_inputs"] == {"files": 2, "by_suffix": {".json": 1, ".txt": 1}}
    assert main(args) == 0
    again = capsys.readouterr().out
    assert "5 images, 2 inputs skipped" in again and "7 files in 2 chunks reused" in again


def test_decoders_messages_are_kept_whole_enough_to_read_the_cause():
    from pydicom.data import get_testdata_file

    from dicom_preprocess.decoders import DECODERS, JPEG_2000

    path = get_testdata_file("JPEG2000-embedded-sequence-delimiter.dcm")
    if path is None:
        pytest.skip("not bundled with this pydicom")
    with pytest.raises(SkipImage) as err:
        read_dicom(path, modalities=None)
    reason = str(err.value)
    assert reason.startswith("compressed transfer syntax JPEG 2000 Image Compression not decoded (")
    for name in DECODERS[JPEG_2000]:  # each decoder tried, each with more than a letter of its cause
        assert f"{name}: " in reason and len(reason.split(f"{name}: ")[1].split(";")[0].strip(" )")) > 10, name
