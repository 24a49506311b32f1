"""Read one CT slice from DICOM (pydicom, :mod:`.decoders` for compressed pixels), NIfTI (nibabel)
or ITK files.

Plain uncompressed little-endian files (RSNA's kind) and compressed ones with the same plain header
have their header read by :mod:`.fastheader` and go through the same checks; anything else, and
every rejection, is read by pydicom. A compressed frame is decoded from the bytes in memory by the
fastest exact decoder installed for its transfer syntax (:mod:`.decoders`), which returns stored
values, so that the same code -> HU mapping follows. The fast path never materialises HU: an
uncompressed DICOM's PixelData is viewed as 16-bit codes (zero-copy ``np.frombuffer``) and the
code -> HU mapping (rescale slope/intercept, sign extension, the RSNA 12-bit wrap fix) is returned
as parameters, so that the encoder can turn codes into windows with one table look-up.
``pixel_array`` costs ~1 ms per RSNA slice on these machines, ``dcmread`` alone ~0.2 ms.

Facts this module relies on (../shared/REFERENCE.md section 1):

* RSNA files are uncompressed Explicit VR Little Endian, 16 bit; they carry no InstanceNumber
  and use UIDs such as ``ID_1f6d1e8aeb``, which pydicom 3 warns about (expected).
* 12-bit wrap defect: if ``BitsStored == 12 and PixelRepresentation == 0 and
  RescaleIntercept > -100`` the codes are HU modulo 4096. Fix (used by most solutions): add 1000,
  subtract 4096 where the result is >= 4096, and use intercept -1000. Recovers HU >= -1000. It is
  a CT defect: applied to CT (or an image without Modality, accepted as CT) with slope 1 only; a
  CR with slope 0.684 and intercept 200 is not HU and must not be shifted.
* The same code -> HU rules hold on every decode path: every decoder returns the stored words
  (SimpleITK, the last fallback, applies slope/intercept itself, so its output is turned back into
  stored values first), and the bits above BitsStored are masked off as in uncompressed files.
* A CT pipeline puts CT windows on CT: other modalities (MR, CR, NM, OT, ...) are refused with a
  reason unless listed in ``modalities``; a missing Modality on an otherwise valid image is
  accepted with a note.
* WindowCenter/Width may be multi-valued; they are not used (windows come from the config).
* Orientation is kept as pydicom gives it: no transpose (MONAI's PydicomReader transposes 2D
  slices by default, MONAI#8265).
"""
from __future__ import annotations

import io
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

import numpy as np

from .acquisition import acquisition
from .decoders import FrameInfo, NotDecoded, decode_frame
from .fastheader import FastDataset, fast_dataset

MAX_SIDE = 4096  # larger Rows/Columns are refused before any pixel buffer is allocated
MAX_VOLUME_VOXELS = 512 * 2**20  # 2 GiB as float32: a NIfTI/ITK header claiming more is refused unread
AIR_HU = -1024.0


class SkipImage(Exception):
    """The input is not a usable CT slice; ``str(err)`` is the reason recorded in the errors table."""


class _FrameNotDecoded(SkipImage):
    """No decoder decoded the frame: final on the fast header's path too (pydicom's reading would
    hand the same frame to the same decoders, and a corrupt frame would be decoded twice)."""


@dataclass
class CodeMap:
    """How stored 16-bit codes become HU: ``(sign_extend(code) [+ wrap fix]) * slope + intercept``."""

    signed: bool
    bits_stored: int
    slope: float
    intercept: float
    wrap_fix: bool = False

    def key(self) -> tuple:
        return (self.signed, self.bits_stored, self.slope, self.intercept, self.wrap_fix)


def code_to_hu_table(cmap: CodeMap) -> np.ndarray:
    """HU of all 65536 codes, float64, indexed by the code's unsigned 16-bit view."""
    codes = np.arange(65536, dtype=np.int64)
    bits = cmap.bits_stored
    if cmap.signed:
        values = codes & ((1 << bits) - 1)
        values = np.where(values >= (1 << (bits - 1)), values - (1 << bits), values)
    else:
        values = codes
    if cmap.wrap_fix:
        values = values + 1000
        values = np.where(values >= 4096, values - 4096, values)
        return values * cmap.slope - 1000.0
    return values * cmap.slope + cmap.intercept


@dataclass
class Slice:
    """One decoded slice: either 16-bit ``codes`` with their :class:`CodeMap`, or float ``hu``."""

    image_id: str
    patient_id: str
    study_uid: str
    series_uid: str
    z: float
    codes: np.ndarray | None = None  # (H, W) uint16 view of the stored values
    code_map: CodeMap | None = None
    hu: np.ndarray | None = None  # (H, W) float32, when the reader applied the rescale itself
    invert: bool = False  # MONOCHROME1: display is inverted
    notes: list = field(default_factory=list)
    decoder: str = ""  # the library that decoded compressed pixels (decoders.DECODERS); '' if none
    acquisition: dict = field(default_factory=dict)  # dicom_preprocess.acquisition: scanner, kernel, thickness

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes if self.codes is not None else self.hu).shape

    def to_hu(self) -> np.ndarray:
        """HU as float64 (used by tests and the slow paths)."""
        if self.hu is not None:
            return self.hu.astype(np.float64)
        return code_to_hu_table(self.code_map)[self.codes]


def _number(ds, keyword: str, default: float | None) -> float:
    """First value of a numeric tag (multi-valued WindowCenter-style tags take the first)."""
    if keyword not in ds or ds[keyword].value in (None, ""):
        if default is None:
            raise SkipImage(f"{keyword} is missing")
        return default
    value = ds[keyword].value
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SkipImage(f"{keyword} '{_shown(value)}' is not a number") from None
    if not math.isfinite(number):
        raise SkipImage(f"{keyword} {number} is not finite")
    return number


def _shown(value, limit: int = 16) -> str:
    """A tag value as it may appear in a message: printable ASCII, short. A corrupt header can
    make a value swallow the bytes of its neighbours (PatientID among them), so messages never
    echo more than a few characters of what a file holds."""
    text = "".join(c if " " <= c <= "~" else "?" for c in str(value))
    return text[:limit] + ("..." if len(text) > limit else "")


def _code_string(value: str) -> str:
    """A CS value (Modality, PhotometricInterpretation) if it is one, else ``<invalid>``."""
    return value if re.fullmatch(r"[A-Z0-9 _]{1,16}", value) else "<invalid>"


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword, "")
    return str(value).strip() if value is not None else ""


def _z_position(ds) -> float:
    ipp = ds.get("ImagePositionPatient")
    try:
        if ipp is not None and len(ipp) == 3:
            return float(ipp[2])
    except (TypeError, ValueError):
        pass
    try:
        return float(ds.SliceLocation)
    except (AttributeError, TypeError, ValueError):
        return float("nan")


def _check_image_tags(ds) -> tuple[int, int]:
    if "PixelData" not in ds:
        kind = _code_string(_text(ds, "Modality")) if _text(ds, "Modality") else "unknown modality"
        raise SkipImage(f"no PixelData: not an image object (Modality {kind})")
    frames = ds.get("NumberOfFrames", 1)
    try:
        frames = int(frames or 1)
    except (TypeError, ValueError):
        raise SkipImage(f"NumberOfFrames {frames!r} is not a number") from None
    if frames > 1:
        raise SkipImage(f"multi-frame image ({frames} frames); only single slices are read")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = _text(ds, "PhotometricInterpretation") or "MONOCHROME2"
    if samples != 1 or not photometric.startswith("MONOCHROME"):
        raise SkipImage(f"colour image (PhotometricInterpretation {_code_string(photometric)}, "
                        f"SamplesPerPixel {samples})")
    rows, cols = int(_number(ds, "Rows", None)), int(_number(ds, "Columns", None))
    if not (0 < rows <= MAX_SIDE and 0 < cols <= MAX_SIDE):
        raise SkipImage(f"Rows x Columns {rows} x {cols} outside 1..{MAX_SIDE}")
    return rows, cols


def _uncompressed_codes(ds, rows: int, cols: int, big_endian: bool) -> tuple[np.ndarray, int]:
    bits_allocated = int(_number(ds, "BitsAllocated", None))
    if bits_allocated not in (8, 16):
        raise SkipImage(f"BitsAllocated {bits_allocated} not supported (8 or 16 expected)")
    declared = getattr(ds.get_item("PixelData"), "length", None)  # the raw element's length field
    data = ds.PixelData
    if declared is not None and declared != 0xFFFFFFFF and declared > len(data):
        raise SkipImage(f"PixelData declares {declared:,} bytes but the file holds {len(data):,} (truncated file)")
    expected = rows * cols * bits_allocated // 8
    if len(data) < expected:
        raise SkipImage(
            f"PixelData holds {len(data):,} bytes, expected {expected:,} for {rows}x{cols}x{bits_allocated} bit "
            "(truncated file)"
        )
    if len(data) >= 2 * expected:
        # Padding is a byte or a few hundred; twice the size means Rows/Columns/BitsAllocated lie
        # about the pixels, and reading the first `expected` bytes would cache a wrong image.
        raise SkipImage(
            f"PixelData holds {len(data):,} bytes, expected {expected:,} for {rows}x{cols}x{bits_allocated} bit "
            "(Rows, Columns or BitsAllocated do not match the pixels)"
        )
    if bits_allocated == 8:
        codes = np.frombuffer(data, dtype=np.uint8, count=expected).astype(np.uint16)
    else:
        codes = np.frombuffer(data, dtype=">u2" if big_endian else "<u2", count=rows * cols)
        if big_endian:
            codes = codes.astype(np.uint16)
    return codes.reshape(rows, cols), bits_allocated


DEFAULT_MODALITIES = ("CT",)


def read_dicom(source: str | bytes | BinaryIO, name: str = "", modalities=DEFAULT_MODALITIES) -> Slice:
    """Read one DICOM slice.

    Args:
        source: a path, the file's bytes, or a binary file object.
        name: the input's name for messages and the fallback image id (file stem).
        modalities: the Modality values accepted (None: any); an image without Modality is
            accepted with a note.

    Raises:
        SkipImage: with the reason, for anything that is not a complete single-frame
            greyscale image.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    name = name or (source if isinstance(source, str) else "<bytes>")
    raw_bytes = source if isinstance(source, bytes) else None
    if raw_bytes is None and isinstance(source, str):
        with open(source, "rb") as handle:
            raw_bytes = handle.read()
    elif raw_bytes is None:
        raw_bytes = source.read()
    if len(raw_bytes) == 0:
        raise SkipImage("empty file (0 bytes)")
    fast = fast_dataset(raw_bytes)  # a plain uncompressed little-endian file: no pydicom needed
    if fast is not None:
        try:
            rows, cols = _check_image_tags(fast)
            return _slice_from_dataset(fast, raw_bytes, name, rows, cols, modalities)
        except _FrameNotDecoded:
            raise
        except Exception:  # SkipImage included: a rejection is worded by pydicom's reading, below
            pass
    from pydicom.config import disable_value_validation

    # RSNA's ID_... UIDs and odd VRs would warn (and log) once per value: validation off; the
    # checks that matter for the pixels are made below.
    with warnings.catch_warnings(), disable_value_validation():
        warnings.simplefilter("ignore")
        try:
            try:
                ds = pydicom.dcmread(io.BytesIO(raw_bytes))
            except InvalidDicomError:
                # No preamble/"DICM": pydicom still reads a raw dataset when forced; anything
                # that is not really DICOM then fails the image-tag checks below.
                ds = pydicom.dcmread(io.BytesIO(raw_bytes), force=True)
            rows, cols = _check_image_tags(ds)
        except SkipImage:
            raise
        except Exception as err:  # pydicom raises many types on broken headers
            raise SkipImage(f"not a readable DICOM file ({type(err).__name__}: {_one_line(err, 200)})") from None

        try:
            return _slice_from_dataset(ds, raw_bytes, name, rows, cols, modalities)
        except SkipImage:
            raise
        except Exception as err:  # pydicom parses lazily: a broken element can raise on first access
            raise SkipImage(f"not a readable DICOM file ({type(err).__name__}: {_one_line(err, 200)})") from None


def _slice_from_dataset(ds, raw_bytes: bytes, name: str, rows: int, cols: int, modalities) -> Slice:
    stem = os.path.basename(name)
    stem = stem[:-4] if stem.lower().endswith(".dcm") else stem
    image_id = _text(ds, "SOPInstanceUID") or stem
    photometric = _text(ds, "PhotometricInterpretation") or "MONOCHROME2"
    modality = _text(ds, "Modality").upper()
    notes = []
    if not modality:
        notes.append("no Modality tag: accepted and read as CT")
    elif modalities is not None and modality not in {m.upper() for m in modalities}:
        raise SkipImage(f"Modality {_code_string(modality)} is not accepted (accepted: {', '.join(modalities)}; "
                        "set --modalities to read it): CT windows would be meaningless on it")
    as_ct = modality in ("CT", "")
    if modality == "CT":
        # Type 1 in the CT Image module: without them stored values are not HU, and every
        # window would be off by the intercept (-1024 on RSNA).
        for keyword in ("RescaleSlope", "RescaleIntercept"):
            if keyword not in ds or ds[keyword].value in (None, ""):
                raise SkipImage(f"{keyword} is missing (required for CT: HU cannot be computed)")
    slope = _number(ds, "RescaleSlope", 1.0)
    intercept = _number(ds, "RescaleIntercept", 0.0)
    signed = int(_number(ds, "PixelRepresentation", 0.0)) == 1
    bits_stored = int(_number(ds, "BitsStored", _number(ds, "BitsAllocated", 16.0)))
    if not 1 <= bits_stored <= 16:
        raise SkipImage(f"BitsStored {bits_stored} outside 1..16")
    if slope == 0:
        raise SkipImage("RescaleSlope is 0")

    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if tsyntax is not None and not tsyntax.is_transfer_syntax:  # before is_encapsulated, which raises
        raise SkipImage(f"unknown transfer syntax {tsyntax}")
    encapsulated = bool(tsyntax is not None and tsyntax.is_encapsulated)
    out = Slice(
        image_id=image_id,
        patient_id=_text(ds, "PatientID"),
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        z=_z_position(ds),
        invert=photometric == "MONOCHROME1",
        notes=notes,
        acquisition=acquisition(ds),
    )
    wrap_fix = as_ct and slope == 1.0 and bits_stored == 12 and not signed and intercept > -100
    if not encapsulated:
        big_endian = not ds.original_encoding[1] if ds.original_encoding[1] is not None else False
        out.codes, bits_allocated = _uncompressed_codes(ds, rows, cols, big_endian)
        out.code_map = CodeMap(signed, min(bits_stored, bits_allocated), slope, intercept, wrap_fix)
        return out
    # Compressed: one frame, decoded from the bytes in memory (decoders.py says which library).
    info = FrameInfo(str(tsyntax), rows, cols, int(_number(ds, "BitsAllocated", 16.0)), bits_stored, signed,
                     photometric, slope, intercept, raw_bytes)
    try:
        decoded = decode_frame(_single_frame(ds), info)
    except NotDecoded as err:
        raise _FrameNotDecoded(f"compressed transfer syntax {tsyntax.name} not decoded ({err})") from None
    out.codes = decoded.words
    out.code_map = CodeMap(signed, bits_stored, slope, intercept, wrap_fix)
    out.decoder = decoded.decoder
    if decoded.fallback:
        out.notes.append(decoded.fallback)
    return out


def _single_frame(ds) -> bytes:
    """The encoded frame of a single-frame encapsulated PixelData."""
    if isinstance(ds, FastDataset):
        return ds.encapsulated_frame()
    from pydicom.encaps import get_frame

    return get_frame(ds.PixelData, 0, number_of_frames=1)


def _one_line(err: BaseException, limit: int = 280) -> str:
    """An exception's message on one line (decoders' messages span several), shortened at its end:
    the cause is what follows a decoder's name, so the start must stay whole."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_volume_shape(shape: tuple) -> None:
    voxels = math.prod(int(v) for v in shape)
    if voxels > MAX_VOLUME_VOXELS:
        raise SkipImage(f"volume of shape {tuple(shape)} ({voxels:,} voxels) exceeds {MAX_VOLUME_VOXELS:,}")


NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")


def read_volume(path: str, name: str = "") -> Iterator[Slice]:
    """Axial slices of a NIfTI (nibabel) or ITK (SimpleITK) volume, in HU as stored.

    NIfTI volumes are reoriented to the closest canonical (RAS+) orientation and each axial
    slice is returned as rows = posterior->anterior flipped so anterior is up, columns = x;
    ITK volumes are returned as SimpleITK's (z, y, x) array slices. Ids are
    ``<stem>_z<index>``; patient, study and series are the stem.
    """
    name = name or path
    stem = os.path.basename(name)
    for suffix in NIFTI_SUFFIXES + ITK_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    lower = name.lower()
    try:
        if lower.endswith(NIFTI_SUFFIXES):
            import nibabel as nib

            image = nib.load(path)
            _check_volume_shape(image.shape)  # before the voxels are read: headers can lie
            image = nib.as_closest_canonical(image)
            data = np.asarray(image.dataobj, dtype=np.float32)  # scl_slope/inter applied
            if data.ndim != 3:
                raise SkipImage(f"NIfTI volume has {data.ndim} dimensions, expected 3")
            z0, dz = float(image.affine[2, 3]), float(image.affine[2, 2])
            slices = [np.ascontiguousarray(np.flipud(data[:, :, k].T)) for k in range(data.shape[2])]
            zs = [z0 + k * dz for k in range(data.shape[2])]
        else:
            import SimpleITK as sitk

            info = sitk.ImageFileReader()
            info.SetFileName(path)
            info.ReadImageInformation()
            _check_volume_shape(tuple(info.GetSize()) + (info.GetNumberOfComponents(),))
            image = sitk.ReadImage(path)
            data = sitk.GetArrayFromImage(image).astype(np.float32)
            if data.ndim == 2:
                data = data[None]
            if data.ndim != 3:
                raise SkipImage(f"ITK image has shape {data.shape}, expected a 3D greyscale volume")
            z0, dz = float(image.GetOrigin()[-1]), float(image.GetSpacing()[-1])
            slices = [data[k] for k in range(data.shape[0])]
            zs = [z0 + k * dz for k in range(data.shape[0])]
    except SkipImage:
        raise
    except Exception as err:
        raise SkipImage(f"unreadable volume ({type(err).__name__}: {_one_line(err, 300)})") from None
    for k, (hu, z) in enumerate(zip(slices, zs)):
        if max(hu.shape) > MAX_SIDE:
            raise SkipImage(f"slice shape {hu.shape} larger than {MAX_SIDE}")
        yield Slice(f"{stem}_z{k:04d}", stem, stem, stem, z, hu=hu)
