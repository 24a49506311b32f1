"""Windowed output equals an independent numpy computation from the phantom's HU."""
import glob
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dicom_preprocess import open_cache
from dicom_preprocess.encoding import SliceEncoder
from dicom_preprocess.reader import SkipImage, read_dicom, read_volume
from dicom_preprocess.synthetic import ENCODINGS
from dicom_preprocess.windowing import parse_windows

WINDOWS = [(40, 80), (80, 200), (600, 2800)]


def reference(hu: np.ndarray, size: int) -> np.ndarray:
    """pad with -1024 -> linear windows -> block mean (or torch area/bilinear) -> round(255 v)."""
    rows, cols = hu.shape
    side = max(rows, cols)
    canvas = np.full((side, side), -1024.0)
    top, left = (side - rows) // 2, (side - cols) // 2
    canvas[top:top + rows, left:left + cols] = hu
    win = np.stack([np.clip((canvas - (c - w / 2)) / w, 0, 1) for c, w in WINDOWS])
    if side != size:
        if side % size == 0:
            k = side // size
            win = win.reshape(3, size, k, size, k).mean(axis=(2, 4))
        else:
            mode = "area" if side > size else "bilinear"
            kw = {} if mode == "area" else {"align_corners": False}
            win = F.interpolate(torch.from_numpy(win)[None], size=(size, size), mode=mode, **kw)[0].numpy()
    return np.rint(win * 255).astype(np.uint8)


def test_every_encoding_variant_matches_the_phantom(archive, cache_dir):
    cache = open_cache(cache_dir)
    row_of = dict(zip(cache.manifest.image_id, range(len(cache))))
    seen = set()
    for s in archive.slices:
        got = cache[row_of[s.image_id]]
        want = reference(s.hu.astype(np.float64), 256)
        diff = np.abs(got.astype(int) - want)
        assert diff.max() <= 1, (s.encoding, s.hu.shape)
        assert (diff > 0).mean() < 0.005, (s.encoding, s.hu.shape)
        seen.add((s.encoding, s.hu.shape))
    assert {e[0] for e in ENCODINGS} <= {e for e, _ in seen}
    assert any(shape[0] != shape[1] for _, shape in seen)  # non-square covered


def test_native_size_is_exact_and_wrap_fix_recovers_hu(archive):
    encoder = SliceEncoder(parse_windows("brain,subdural,bone"), "linear", 512)
    checked = set()
    for s in archive.slices:
        if s.hu.shape != (512, 512):
            continue
        path = os.path.join(archive.images_dir, f"{s.image_id}.dcm")
        image = read_dicom(path)
        np.testing.assert_array_equal(image.to_hu(), s.hu)  # 12-bit wrap fix included
        np.testing.assert_array_equal(encoder.encode(image), reference(s.hu.astype(float), 512))
        assert image.code_map.wrap_fix == (s.encoding == "wrap")
        checked.add(s.encoding)
    assert "wrap" in checked


def test_real_rsna_slices_equal_plain_pydicom(real_sample_dir):
    import pydicom

    files = sorted(glob.glob(os.path.join(real_sample_dir, "*.dcm")))
    assert len(files) == 32
    for size in (512, 256):
        encoder = SliceEncoder(parse_windows("brain,subdural,bone"), "linear", size)
        for path in files:
            ds = pydicom.dcmread(path)
            hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            image = read_dicom(path)
            assert image.image_id == os.path.basename(path)[:-4]
            got = encoder.encode(image)
            want = reference(hu, size)
            if size == 512:
                np.testing.assert_array_equal(got, want)
            else:
                assert np.abs(got.astype(int) - want).max() <= 1


PYDICOM_FILES = [
    "CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_expb.dcm",
    "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "JPEG2000.dcm",
    "JPEG-lossy.dcm", "JPGExtended.dcm", "ExplVR_BigEndNoMeta.dcm", "ExplVR_LitEndNoMeta.dcm", "no_meta.dcm",
    "MR_truncated.dcm", "rtplan.dcm", "rtplan_truncated.dcm", "rtstruct.dcm", "test-SR.dcm", "rtdose.dcm",
    "SC_rgb_rle_2frame.dcm", "SC_rgb_small_odd.dcm", "examples_palette.dcm", "examples_ybr_color.dcm", "image_dfl.dcm",
    "liver_1frame.dcm", "meta_missing_tsyntax.dcm", "badVR.dcm", "waveform_ecg.dcm", "MR_small_padded.dcm",
]


@pytest.mark.parametrize("name", PYDICOM_FILES)
def test_pydicom_test_files_read_correctly_or_skip_with_reason(name):
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not bundled with this pydicom")
    encoder = SliceEncoder(parse_windows("brain,subdural,bone"), "linear", 64)
    try:
        image = read_dicom(path)
    except SkipImage as err:
        assert str(err)  # a reason, never a crash
        return
    tensor = encoder.encode(image)
    assert tensor.shape == (3, 64, 64) and tensor.dtype == np.uint8
    try:
        ds = pydicom.dcmread(path, force=True)
        expected = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(
            ds.get("RescaleIntercept", 0))
    except Exception:
        return  # pydicom cannot decode it itself (SimpleITK did): nothing to compare with
    if expected.shape == image.shape:
        np.testing.assert_allclose(image.to_hu(), expected)


def test_truncated_and_empty_files_are_skipped_with_reason(archive, tmp_path):
    path = os.path.join(archive.images_dir, f"{archive.slices[0].image_id}.dcm")
    data = open(path, "rb").read()
    with pytest.raises(SkipImage, match="truncated"):
        read_dicom(data[: len(data) - 1000], "ID_cut.dcm")
    with pytest.raises(SkipImage, match="empty file"):
        read_dicom(b"", "ID_empty.dcm")
    with pytest.raises(SkipImage):
        read_dicom(b"this is not DICOM at all" * 10, "notes.dcm")


def test_nifti_and_mha_volumes_are_read_as_axial_slices(tmp_path):
    import nibabel as nib
    import SimpleITK as sitk

    volume = np.random.default_rng(0).integers(-1000, 1500, size=(40, 32, 5)).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "head.nii.gz"))
    slices = list(read_volume(str(tmp_path / "head.nii.gz")))
    assert len(slices) == 5 and slices[0].image_id == "head_z0000"
    np.testing.assert_array_equal(slices[2].hu, np.flipud(volume[:, :, 2].T))
    image = sitk.GetImageFromArray(np.moveaxis(volume, 2, 0))  # (z, y, x)
    sitk.WriteImage(image, str(tmp_path / "head.mha"))
    slices = list(read_volume(str(tmp_path / "head.mha")))
    assert len(slices) == 5
    np.testing.assert_array_equal(slices[3].hu, volume[:, :, 3])


def _outcome(path, use_fast: bool, monkeypatch):
    import dicom_preprocess.reader as reader

    if not use_fast:
        monkeypatch.setattr(reader, "fast_dataset", lambda raw: None)
    try:
        image = read_dicom(path, modalities=None)
    except SkipImage as err:
        return ("skip", str(err))
    finally:
        monkeypatch.undo()
    return ("slice", image.image_id, image.patient_id, image.study_uid, image.series_uid, repr(image.z),
            image.code_map.key(), image.invert, tuple(image.notes), image.decoder, image.codes.tobytes())


def test_the_fast_header_path_reads_exactly_what_pydicom_reads(archive, real_sample_dir, tmp_path, monkeypatch):
    """Every file read with the fast header reader gives the slice pydicom's path gives, and every
    rejection has pydicom's reason; RSNA-like files (synthetic and real) all take the fast path."""
    from pydicom.data import get_testdata_files

    from dicom_preprocess.fastheader import fast_dataset

    from .hostile import fuzz_corpus

    rsna = sorted(glob.glob(os.path.join(archive.images_dir, "*.dcm"))) + \
        sorted(glob.glob(os.path.join(real_sample_dir, "*.dcm")))
    squares = [p for p in rsna[: len(rsna) - 32] if read_dicom(p).shape[0] == read_dicom(p).shape[1]][:4]
    corpus = fuzz_corpus(squares, str(tmp_path / "corpus"), seed=3, flips=40)
    others = sorted(get_testdata_files("*.dcm")) + [str(tmp_path / "corpus" / item.name) for item in corpus]
    fast_served = 0
    for path in rsna + others:
        with_fast, pydicom_only = _outcome(path, True, monkeypatch), _outcome(path, False, monkeypatch)
        assert with_fast == pydicom_only, path
        fast_served += fast_dataset(open(path, "rb").read()) is not None and with_fast[0] == "slice"
    assert all(fast_dataset(open(path, "rb").read()) is not None for path in rsna)
    assert fast_served >= len(rsna)
