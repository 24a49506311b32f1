"""Hostile inputs for the fault tests and benchmarks/faults.py (test support, not product):
broken and lying DICOM files, and dangerous archives.

A 750k-file job from several hospitals meets every kind of damage. :func:`fuzz_corpus` derives
such files from valid slices, each with what the job must do with it:

* ``rejected``: it must end in ``errors.csv`` with a reason (truncated at any offset, empty,
  not DICOM, header bombs that claim huge images with little data, lying BitsAllocated/Rows,
  missing or non-numeric rescale tags on CT, unknown transfer syntax);
* ``cached``: its pixels are complete and consistent, so it must be cached (bytes flipped
  inside the pixel data, a non-numeric WindowCenter that the pipeline does not use);
* ``either``: bytes flipped in the header may or may not leave a readable slice; the job must
  still put it in exactly one of the two tables, never crash and never hang.

:func:`hostile_zip` and :func:`hostile_tar` write archives with path-traversal names, links,
a zip bomb and duplicate members.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import warnings
import zipfile
from dataclasses import dataclass

import numpy as np

PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian


@dataclass(frozen=True)
class HostileFile:
    name: str
    expect: str  # rejected | cached | either
    what: str


def _pixel_data_offset(raw: bytes) -> int:
    """Byte offset of the pixel values (after PixelData's tag, VR and length)."""
    tag = raw.rfind(PIXEL_DATA_TAG)
    if tag < 0:
        raise ValueError("no PixelData element")
    return tag + 12  # tag 4 + "OW" 2 + reserved 2 + length 4 (explicit VR)


def _edited(raw: bytes, **tags) -> bytes:
    """``raw`` re-saved by pydicom with tags set (None deletes a tag)."""
    import logging

    import pydicom

    with warnings.catch_warnings(), _quiet(logging.getLogger("pydicom")):
        warnings.simplefilter("ignore")  # RSNA-style ID_... UIDs are invalid UIs by design
        ds = pydicom.dcmread(io.BytesIO(raw))
        for key, value in tags.items():
            if value is None:
                if key in ds:
                    delattr(ds, key)
            else:
                setattr(ds, key, value)
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=False)
    return out.getvalue()


class _quiet:
    """Silence a logger for a block (pydicom logs each invalid UI it writes)."""

    def __init__(self, logger):
        self.logger = logger

    def __enter__(self):
        self.level = self.logger.level
        self.logger.setLevel(100)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def _with_raw_value(raw: bytes, keyword: str, value: bytes) -> bytes:
    """Splice a short-VR element's value with arbitrary bytes (what a broken writer leaves).

    Works on Explicit VR Little Endian: the element is found by its tag and VR and rewritten
    with the new length; nothing else in the file moves but what follows it.
    """
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    tag = tag_for_keyword(keyword)
    vr = dictionary_VR(tag).encode()
    head = (tag >> 16).to_bytes(2, "little") + (tag & 0xFFFF).to_bytes(2, "little") + vr
    at = raw.find(head)
    if at < 0:
        raise ValueError(f"{keyword} not in the file")
    old_length = int.from_bytes(raw[at + 6 : at + 8], "little")
    if len(value) % 2:
        value += b" "
    return raw[: at + 6] + len(value).to_bytes(2, "little") + value + raw[at + 8 + old_length :]


def _compressed_bomb(raw: bytes, rng: np.random.Generator) -> bytes:
    """Encapsulated (JPEG Baseline) pixel data that claims 4096 x 4096 and holds junk."""
    import logging

    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    with warnings.catch_warnings(), _quiet(logging.getLogger("pydicom")):
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(raw))
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.Rows = ds.Columns = 4096
        junk = b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 256, 2048, dtype=np.uint8)) + b"\xff\xd9"
        ds.PixelData = encapsulate([junk])
        ds["PixelData"].VR = "OB"
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def fuzz_corpus(seed_files: list[str], out_dir: str, seed: int = 0, flips: int = 24) -> list[HostileFile]:
    """Write the corpus derived from valid uncompressed CT slices into ``out_dir``.

    Args:
        seed_files: valid RSNA-like DICOM paths (Explicit VR Little Endian, 16 bit).
        flips: how many header-flip and pixel-flip variants to make.

    Returns:
        One :class:`HostileFile` per written file.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    made: list[HostileFile] = []

    def put(name: str, data: bytes, expect: str, what: str) -> None:
        with open(os.path.join(out_dir, name), "wb") as handle:
            handle.write(data)
        made.append(HostileFile(name, expect, what))

    serial = iter(range(10**6))

    def fresh(data: bytes) -> bytes:  # every derived file gets its own SOPInstanceUID (RSNA-style)
        return _edited(data, SOPInstanceUID=f"ID_fz{next(serial):06d}")

    raws = [open(path, "rb").read() for path in seed_files]
    raw = raws[0]
    pixels = _pixel_data_offset(raw)
    # Truncation anywhere loses pixels (PixelData is the last element of an RSNA file).
    offsets = sorted({1, 4, 64, 128, 131, 132, 136, 200, 300, pixels - 13, pixels - 1, pixels, pixels + 1,
                      pixels + 1000, (pixels + len(raw)) // 2, len(raw) - 2, len(raw) - 1}
                     | {int(v) for v in rng.integers(1, len(raw) - 1, size=8)})
    for offset in offsets:
        put(f"ID_trunc{offset:07d}.dcm", raw[:offset], "rejected", f"truncated at byte {offset}")
    for i in range(flips):
        data = bytearray(fresh(raws[i % len(raws)]))
        start = _pixel_data_offset(bytes(data))
        for position in rng.integers(132, start - 12, size=int(rng.integers(1, 4))):
            data[position] ^= int(rng.integers(1, 256))
        put(f"ID_hflip{i:03d}.dcm", bytes(data), "either", "bytes flipped in the header")
        data = bytearray(fresh(raws[i % len(raws)]))
        for position in rng.integers(start, len(data), size=16):
            data[position] ^= int(rng.integers(1, 256))
        put(f"ID_pflip{i:03d}.dcm", bytes(data), "cached", "bytes flipped in the pixel data")
    put("ID_empty.dcm", b"", "rejected", "zero-length file")
    put("ID_text.dcm", b"patient list\nnot an image\n" * 40, "rejected", "text with a .dcm name")
    put("ID_png.dcm", b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 4000, dtype=np.uint8)), "rejected",
        "PNG with a .dcm name")
    put("ID_random.dcm", bytes(rng.integers(0, 256, 70000, dtype=np.uint8)), "rejected", "random bytes")
    put("ID_dicm_only.dcm", b"\0" * 128 + b"DICM", "rejected", "preamble and magic only")
    small = np.zeros(256, np.uint16).tobytes()
    put("ID_bomb_rows.dcm", _edited(raw, Rows=65535, Columns=65535, PixelData=small), "rejected",
        "header bomb: 65535 x 65535 claimed, 512 bytes of pixels")
    put("ID_bomb_4k.dcm", _edited(raw, Rows=4096, Columns=4096, PixelData=small), "rejected",
        "header bomb: 4096 x 4096 claimed, 512 bytes of pixels")
    put("ID_bomb_frames.dcm", _edited(raw, NumberOfFrames=100000), "rejected", "header bomb: 100000 frames claimed")
    put("ID_bomb_jpeg.dcm", _compressed_bomb(raw, rng), "rejected",
        "header bomb: JPEG transfer syntax, 4096 x 4096 claimed, 2 KB of junk fragments")
    length = bytearray(raw)
    length[pixels - 4 : pixels] = (0xFFFFFFF0).to_bytes(4, "little")
    put("ID_bomb_length.dcm", bytes(length), "rejected", "PixelData length field claims 4 GB")
    put("ID_bits32.dcm", _edited(raw, BitsAllocated=32, BitsStored=32, HighBit=31), "rejected",
        "BitsAllocated 32 with 16-bit data")
    put("ID_bits8.dcm", _edited(raw, BitsAllocated=8, BitsStored=8, HighBit=7), "rejected",
        "BitsAllocated 8 with 16-bit data")
    put("ID_bits0.dcm", _edited(raw, BitsStored=0), "rejected", "BitsStored 0")
    put("ID_half_rows.dcm", _edited(raw, Rows=256), "rejected", "Rows half of the pixels")
    put("ID_no_slope.dcm", _edited(raw, RescaleSlope=None), "rejected", "CT without RescaleSlope")
    put("ID_no_intercept.dcm", _edited(raw, RescaleIntercept=None), "rejected", "CT without RescaleIntercept")
    put("ID_text_slope.dcm", _with_raw_value(raw, "RescaleSlope", b"one "), "rejected", "RescaleSlope 'one'")
    put("ID_text_intercept.dcm", _with_raw_value(raw, "RescaleIntercept", b"-1O24 "), "rejected",
        "RescaleIntercept '-1O24'")
    put("ID_nan_slope.dcm", _with_raw_value(raw, "RescaleSlope", b"NaN "), "rejected", "RescaleSlope NaN")
    put("ID_text_center.dcm", _with_raw_value(fresh(raw), "WindowCenter", b"brain "), "cached",
        "WindowCenter 'brain' (not used by the pipeline)")
    put("ID_no_center.dcm", _edited(fresh(raw), WindowCenter=None, WindowWidth=None), "cached",
        "no WindowCenter/Width")
    unknown = _edited(raw)
    marker = b"1.2.840.10008.1.2.1\0"
    put("ID_unknown_ts.dcm", unknown.replace(marker, b"1.2.3.4.5.6.7.8.9.0\0", 1), "rejected",
        "unknown transfer syntax 1.2.3.4.5.6.7.8.9.0")
    return made


def hostile_zip(path: str, members: list[bytes]) -> dict:
    """A zip with traversal and absolute names, duplicates, a zip bomb and an expansion-ratio bomb.

    Args:
        members: four valid DICOM files (distinct SOPInstanceUIDs).

    Returns:
        {member name: "read" | "refused"}: what the job must do with each image member.
    """
    expect = {}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, member in zip(("../../escape/ID_trav1.dcm", "/etc/ID_abs1.dcm", "ok/ID_plain1.dcm"), members):
            archive.writestr(name, member)
            expect[name] = "read"
        archive.writestr("dup/ID_dup1.dcm", members[3])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
            archive.writestr("dup/ID_dup1.dcm", members[3][:500])
        expect["dup/ID_dup1.dcm"] = "read"  # the first copy; the second is reported
        info = zipfile.ZipInfo("bomb/ID_zeros.dcm")
        info.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(info, "w", force_zip64=True) as handle:  # 300 MB of zeros, ~300 KB packed
            block = b"\0" * 2**20
            for _ in range(300):
                handle.write(block)
        expect["bomb/ID_zeros.dcm"] = "refused"
        archive.writestr("bomb/ID_ratio.dcm", b"\0" * 20 * 2**20)  # 20 MB of zeros: ratio ~1000
        expect["bomb/ID_ratio.dcm"] = "refused"
    return expect


def hostile_tar(path: str, members: list[bytes], outside_target: str) -> dict:
    """A tar with a symlink and a hard link to ``outside_target``, a traversal name and a device.

    Args:
        members: three valid DICOM files (distinct SOPInstanceUIDs).

    Returns:
        {member name: "read" | "refused"}.
    """
    expect = {}
    with tarfile.open(path, "w") as archive:
        for name, member in zip(("../../escape/ID_ttrav.dcm", "/abs/ID_tabs.dcm", "ok/ID_tplain.dcm"), members):
            info = tarfile.TarInfo(name)
            info.size = len(member)
            archive.addfile(info, io.BytesIO(member))
            expect[name] = "read"
        for name, kind in (("links/ID_symlink.dcm", tarfile.SYMTYPE), ("links/ID_hardlink.dcm", tarfile.LNKTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = outside_target
            archive.addfile(info)
            expect[name] = "refused"
        info = tarfile.TarInfo("dev/ID_device.dcm")
        info.type = tarfile.CHRTYPE
        info.devmajor, info.devminor = 1, 3
        archive.addfile(info)
        expect["dev/ID_device.dcm"] = "refused"
    return expect


_MEMORY_PROBE = """
import json, resource, sys
from dicom_preprocess.encoding import SliceEncoder
from dicom_preprocess.reader import SkipImage, read_dicom
from dicom_preprocess.windowing import parse_windows
encoder = SliceEncoder(parse_windows("brain,subdural,bone"), "linear", 256)
encoder.encode(read_dicom(sys.argv[1]))  # warm up: imports, tables, numba
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
outcomes = []
for path in sys.argv[2:]:
    try:
        encoder.encode(read_dicom(path))
        outcomes.append("cached")
    except SkipImage as err:
        outcomes.append(str(err))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_mb": (peak - base) / 1024, "outcomes": outcomes}))
"""


def read_memory_growth(valid_file: str, paths: list[str]) -> dict:
    """Peak RSS growth (MB) of a fresh process reading and encoding ``paths`` after one valid file.

    Returns:
        {"growth_mb": float, "outcomes": ["cached" or the skip reason, per path]}.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, valid_file, *paths], capture_output=True, text=True,
                         cwd=root, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
