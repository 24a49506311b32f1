"""Compressed slices: real RSNA slices re-encoded losslessly in the four syntaxes archives use decode to
the uncompressed original's pixels and HU, by the fast decoder each syntax lists first; every other
decoder of a list gives the same pixels; a missing fast decoder shows in the slice's notes and fails
the check on which decoder ran, never passing silently."""
import glob
import os
import shutil
import sys

import numpy as np
import pydicom
import pytest

from dicom_preprocess import decoders, open_cache
from dicom_preprocess.compress import LOSSLESS, compress
from dicom_preprocess.config import PreprocessConfig
from dicom_preprocess.decoders import (DECODERS, JPEG_2000_LOSSLESS, JPEG_LOSSLESS_SV1, JPEG_LS_LOSSLESS,
                                       RLE_LOSSLESS)
from dicom_preprocess.fastheader import fast_dataset
from dicom_preprocess.job import run_preprocess
from dicom_preprocess.reader import SkipImage, read_dicom

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
# The decoder each syntax must be decoded by where the project's requirements are installed
# (written out, not read from DECODERS: reordering that table must fail here).
FAST = {JPEG_LOSSLESS_SV1: "imagecodecs", JPEG_LS_LOSSLESS: "pyjpegls", JPEG_2000_LOSSLESS: "imagecodecs",
        RLE_LOSSLESS: "pylibjpeg-rle"}
SYNTAXES = list(LOSSLESS.values())


def assert_decoded_by_the_fast_decoder(image, syntax):
    assert image.decoder == FAST[syntax], f"{image.decoder or 'no decoder'} ran, not {FAST[syntax]} ({image.notes})"
    assert not any(note.startswith("decoded by") for note in image.notes), image.notes


def _real_slices() -> list[str]:
    """Two slices of each RSNA encoding: 12-bit unsigned Explicit VR (the stage-2 sample and the 12
    series), 16-bit signed Explicit VR with -2000 outside the circle and 12-bit unsigned Implicit VR
    (the 12 series)."""
    sample = os.path.abspath(os.path.join(DATA, "rsna-stage2-sample"))
    series = os.path.abspath(os.path.join(DATA, "rsna-train-12series"))
    for folder in (sample, series):
        if not os.path.isdir(folder):
            pytest.skip(f"real RSNA slices not found at {folder} (../shared/data/, see its README)")
    picked = sorted(glob.glob(os.path.join(sample, "*.dcm")))[:2]
    kinds = {}
    for path in sorted(glob.glob(os.path.join(series, "*.dcm"))):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        kind = (ds.file_meta.TransferSyntaxUID, int(ds.PixelRepresentation))
        if len(kinds.setdefault(kind, [])) < 2:
            kinds[kind].append(path)
    assert len(kinds) == 3, kinds
    return picked + [p for paths in kinds.values() for p in paths]


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """{syntax: folder} of the real slices re-encoded losslessly, and the folder of the originals."""
    root = tmp_path_factory.mktemp("compressed")
    originals = root / "uncompressed"
    originals.mkdir()
    folders = {"uncompressed": str(originals)}
    for path in _real_slices():
        shutil.copyfile(path, originals / os.path.basename(path))
    for name, syntax in LOSSLESS.items():
        folder = root / name.replace(" ", "_")
        folder.mkdir()
        for path in sorted(glob.glob(str(originals / "*.dcm"))):
            (folder / os.path.basename(path)).write_bytes(compress(open(path, "rb").read(), syntax))
        folders[syntax] = str(folder)
    return folders


@pytest.fixture
def without(monkeypatch):
    """``without('gdcm')`` makes a decoder's library unimportable, as if it were not installed."""

    def remove(decoder: str) -> None:
        for module in decoders._MODULES[decoder]:
            monkeypatch.setitem(sys.modules, module, None)
        decoders._module.cache_clear()

    yield remove
    monkeypatch.undo()
    decoders._module.cache_clear()


def _pairs(compressed, syntax):
    for path in sorted(glob.glob(os.path.join(compressed[syntax], "*.dcm"))):
        yield path, os.path.join(compressed["uncompressed"], os.path.basename(path))


@pytest.mark.parametrize("syntax", SYNTAXES, ids=list(LOSSLESS))
def test_each_syntax_decodes_to_the_uncompressed_original_by_its_fast_decoder(compressed, syntax):
    seen_signed = set()
    for path, original_path in _pairs(compressed, syntax):
        raw = open(path, "rb").read()
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
        assert fast_dataset(raw) is not None  # the plain header is read without pydicom
        image, original = read_dicom(raw, path), read_dicom(original_path)
        assert_decoded_by_the_fast_decoder(image, syntax)
        assert original.decoder == "" and image.code_map.key() == original.code_map.key()
        assert (image.image_id, image.patient_id, image.series_uid, image.z) == \
            (original.image_id, original.patient_id, original.series_uid, original.z)
        np.testing.assert_array_equal(image.to_hu(), original.to_hu(), err_msg=path)
        mask = (1 << image.code_map.bits_stored) - 1
        np.testing.assert_array_equal(image.codes & mask, original.codes & mask, err_msg=path)
        seen_signed.add(image.code_map.signed)
    assert seen_signed == {True, False}


@pytest.mark.parametrize("syntax", SYNTAXES, ids=list(LOSSLESS))
def test_every_decoder_of_a_syntax_gives_the_same_pixels(compressed, syntax, monkeypatch):
    """Each decoder alone (SimpleITK's temporary file and float round trip included): a fallback
    caches the same HU as the fast decoder."""
    pairs = list(_pairs(compressed, syntax))
    for name in DECODERS[syntax]:
        assert decoders.installed(name), f"{name} is an install requirement (setup.cfg)"
        monkeypatch.setitem(DECODERS, syntax, (name,))
        for path, original_path in pairs:
            image = read_dicom(path)
            assert image.decoder == name and not image.notes
            np.testing.assert_array_equal(image.to_hu(), read_dicom(original_path).to_hu(), err_msg=f"{name} {path}")


@pytest.mark.parametrize("syntax", SYNTAXES, ids=list(LOSSLESS))
def test_a_missing_fast_decoder_is_said_and_fails_the_check(compressed, syntax, without):
    path, original_path = next(_pairs(compressed, syntax))
    without(FAST[syntax])
    image = read_dicom(path)
    assert image.decoder == DECODERS[syntax][1]  # the next of the list ran...
    np.testing.assert_array_equal(image.to_hu(), read_dicom(original_path).to_hu())  # ...exactly
    assert image.notes == [f"decoded by {image.decoder} ({FAST[syntax]}: not installed)"]
    with pytest.raises(AssertionError, match=f"not {FAST[syntax]}"):
        assert_decoded_by_the_fast_decoder(image, syntax)


def test_no_decoder_left_is_a_skip_naming_each(compressed, without, monkeypatch):
    path, _ = next(_pairs(compressed, RLE_LOSSLESS))
    monkeypatch.setitem(DECODERS, RLE_LOSSLESS, ("pylibjpeg-rle", "gdcm", "SimpleITK"))  # pydicom reads the header
    for name in DECODERS[RLE_LOSSLESS]:
        without(name)
    with pytest.raises(SkipImage, match=r"RLE Lossless not decoded \(pylibjpeg-rle: not installed; gdcm: not "
                                        r"installed; SimpleITK: not installed\)"):
        read_dicom(path)


def test_a_corrupt_rle_header_is_a_skip_not_a_crash(compressed):
    """An RLE header declaring no segments: GDCM would die of SIGFPE on it (and the worker with it);
    the RLE list holds no GDCM decoder, and both of its decoders refuse the frame."""
    from pydicom.encaps import encapsulate

    path, _ = next(_pairs(compressed, RLE_LOSSLESS))
    ds = pydicom.dcmread(path)
    frame = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)
    ds.PixelData = encapsulate([b"\0" * 64 + frame[64:]])
    out = pydicom.filebase.DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    with pytest.raises(SkipImage, match=r"RLE Lossless not decoded \(pylibjpeg-rle: .+; pydicom: .+\)$"):
        read_dicom(out.getvalue())


def _cache_by_id(out):
    cache = open_cache(out)
    return cache, {image_id: cache[i] for i, image_id in enumerate(cache.manifest.image_id)}


def test_the_job_caches_each_syntax_as_the_uncompressed_archive(compressed, tmp_path, without):
    def job(folder, out):
        return _cache_by_id(_job(folder, tmp_path / out, workers=1))

    _, want = job(compressed["uncompressed"], "uncompressed")
    for name, syntax in LOSSLESS.items():
        cache, got = job(compressed[syntax], name)
        assert set(got) == set(want) and len(cache.errors()) == 0, name
        for image_id in want:
            np.testing.assert_array_equal(got[image_id], want[image_id], err_msg=f"{name} {image_id}")
        assert (cache.manifest["notes"] == "").all(), name  # no fallback ran
    without(FAST[RLE_LOSSLESS])  # a fallback in a job: the same pixels, and the manifest says so
    cache, got = job(compressed[RLE_LOSSLESS], "rle-fallback")
    assert all(np.array_equal(got[i], want[i]) for i in want)
    assert cache.manifest["notes"].str.startswith("decoded by pydicom (pylibjpeg-rle: not installed)").all()


def test_jpeg_2000_decodes_with_the_cpus_its_workers_leave(compressed, tmp_path, monkeypatch):
    """A job with fewer workers than CPUs (--workers 1, or fewer chunks than CPUs) gives each JPEG
    2000 decode the CPUs left over as OpenJPEG threads (imagecodecs' numthreads); one worker per CPU
    or --decode-threads 1 decodes single-threaded; the cache is the same either way."""
    import imagecodecs

    import dicom_preprocess.job as job_module

    monkeypatch.setattr(decoders, "_threads", decoders._threads)  # restored after the test
    monkeypatch.setattr(job_module, "usable_cpus", lambda: 4)
    real, asked = imagecodecs.jpeg2k_decode, []

    def recording(data, **kwargs):  # the real decoder, with the thread count it was asked for noted
        asked.append(kwargs.get("numthreads"))
        return real(data, **kwargs)

    monkeypatch.setattr(imagecodecs, "jpeg2k_decode", recording)
    n_files = len(list(_pairs(compressed, JPEG_2000_LOSSLESS)))
    _, want = _cache_by_id(_job(compressed["uncompressed"], tmp_path / "uncompressed", workers=1))
    runs = {"one worker of 4 CPUs": ({"workers": 1}, 4), "4 workers, 1 chunk": ({"workers": 4}, 4),
            # worker processes: the spy is not in them, so no call is seen; the pixels still are checked
            "2 workers, 2 chunks": ({"workers": 2, "files_per_shard": (n_files + 1) // 2}, None),
            "--decode-threads 1": ({"workers": 1, "decode_threads": 1}, 1)}
    for name, (settings, threads) in runs.items():
        asked.clear()
        out = _job(compressed[JPEG_2000_LOSSLESS], tmp_path / name.replace(" ", "_"), **settings)
        cache, got = _cache_by_id(out)
        assert asked == ([] if threads is None else [threads] * n_files), name
        assert set(got) == set(want) and (cache.manifest["notes"] == "").all(), name
        for image_id in want:
            np.testing.assert_array_equal(got[image_id], want[image_id], err_msg=f"{name} {image_id}")


def _job(folder, out, **settings):
    run_preprocess(PreprocessConfig(input=folder, out=str(out), size=64, split_fractions={"unsupervised": 1.0},
                                    **settings), progress=False)
    return str(out)


def _outcome(raw: bytes, fast: bool, monkeypatch):
    import dicom_preprocess.reader as reader

    if not fast:
        monkeypatch.setattr(reader, "fast_dataset", lambda raw: None)
    try:
        image = read_dicom(raw, "x.dcm")
    except SkipImage as err:
        return ("skip", str(err))
    finally:
        monkeypatch.undo()
    return (image.image_id, image.code_map.key(), tuple(image.notes), image.decoder, image.codes.tobytes())


def test_the_fast_header_reads_compressed_files_as_pydicom_does(compressed, monkeypatch):
    """Fragments split, a Basic Offset Table, truncations, a broken item and corrupt frames: the
    fast header's slice (or rejection) is pydicom's, and what it does not read goes to pydicom."""
    from pydicom.encaps import encapsulate

    variants = []
    for syntax in SYNTAXES:
        path = next(_pairs(compressed, syntax))[0]
        raw = open(path, "rb").read()
        ds = pydicom.dcmread(path)
        frame = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)
        for split in (2, 3):  # one frame in several fragments, with a Basic Offset Table
            ds.PixelData = encapsulate([frame], fragments_per_frame=split, has_bot=True)
            out = pydicom.filebase.DicomBytesIO()
            ds.save_as(out, enforce_file_format=True)
            variants.append((out.getvalue(), True))
        end = len(raw)
        for cut in (end - 2, end - 9, end - len(frame) // 2, end - len(frame) + 4):  # truncated
            variants.append((raw[:cut], False))
        at = raw.rindex(b"\xfe\xff\x00\xe0")  # the frame's item tag: broken, the items are not whole
        variants.append((raw[:at] + b"\xfe\xff\x01\xe0" + raw[at + 4:], False))
        rng = np.random.default_rng(len(variants))
        for _ in range(3):  # bytes of the frame flipped: decoded as garbage or refused, alike
            corrupt = bytearray(raw)
            for offset in rng.integers(end - len(frame) + 20, end - 20, size=4):
                corrupt[offset] ^= 0x5A
            variants.append((bytes(corrupt), True))
    for raw, readable in variants:
        assert (fast_dataset(raw) is not None) == readable
        assert _outcome(raw, True, monkeypatch) == _outcome(raw, False, monkeypatch)


PYDICOM_COMPRESSED = {  # pydicom's bundled greyscale compressed files: (medmoco's decoder, pydicom's plugin to check)
    "MR_small_RLE.dcm": ("pylibjpeg-rle", "pydicom"), "MR_small_jpeg_ls_lossless.dcm": ("pyjpegls", "gdcm"),
    "JPEGLSNearLossless_16.dcm": ("pyjpegls", "gdcm"), "MR_small_jp2klossless.dcm": ("imagecodecs", "gdcm"),
    "JPEG2000.dcm": ("imagecodecs", "gdcm"), "J2K_pixelrep_mismatch.dcm": ("imagecodecs", "gdcm"),
    "JPGExtended.dcm": ("pylibjpeg-libjpeg", "pylibjpeg"),  # 12-bit JPEG Extended: only libjpeg decodes it
}


@pytest.mark.parametrize("name", sorted(PYDICOM_COMPRESSED))
def test_pydicom_bundled_compressed_files_equal_another_decoder(name):
    """Input this project did not write, checked against pydicom decoding it with another library."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not bundled with this pydicom")
    decoder, other = PYDICOM_COMPRESSED[name]
    image = read_dicom(path, modalities=None)
    assert image.decoder == decoder and not any(n.startswith("decoded by") for n in image.notes)
    ds = pydicom.dcmread(path)
    ds.pixel_array_options(decoding_plugin=other)
    np.testing.assert_array_equal(image.to_hu(), ds.pixel_array * float(ds.get("RescaleSlope", 1))
                                  + float(ds.get("RescaleIntercept", 0)))


@pytest.mark.parametrize("syntax", SYNTAXES, ids=list(LOSSLESS))
def test_pydicom_ct_small_in_each_syntax(syntax, tmp_path):
    """pydicom's CT_small.dcm (128x128 signed CT from another scanner, header not RSNA's) in each
    syntax reads as the original."""
    from pydicom.data import get_testdata_file

    raw = open(get_testdata_file("CT_small.dcm"), "rb").read()
    image, original = read_dicom(compress(raw, syntax)), read_dicom(raw)
    assert_decoded_by_the_fast_decoder(image, syntax)
    np.testing.assert_array_equal(image.to_hu(), original.to_hu())
