"""A minimal reader of the DICOM header for the one kind of file a CT archive is made of.

RSNA's 750k files are uncompressed Explicit VR Little Endian slices with a plain header; other
archives hold the same header over one compressed frame (JPEG Lossless, JPEG-LS, JPEG 2000, RLE).
pydicom handles every DICOM variant, at a price: ``dcmread`` builds an element for each of the ~40 tags and
each keyword look-up walks its machinery (about 1.8 ms per RSNA file on these machines, more than
windowing and resizing the pixels). This module walks the element stream once with
``struct.unpack_from`` and keeps only the tags the reader uses; of an encapsulated PixelData, where
its fragments lie.

It never decides anything about a file: it returns None for anything it was not written for
(a transfer syntax :mod:`.decoders` does not list, a sequence of undefined length, an odd element
length, a value with a backslash where one value is expected, non-ASCII text, a PixelData that does
not fit the file, encapsulated items without their closing delimiter, ...), and
:func:`dicom_preprocess.reader.read_dicom` then reads the file with pydicom. Files it
does read go through the same checks as pydicom's (``reader._slice_from_header``); the tests compare
both paths on synthetic, real RSNA, pydicom's bundled and fuzzed files.
"""
from __future__ import annotations

import functools
import struct

from .decoders import DECODERS

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
# Compressed syntaxes (their datasets are Explicit VR Little Endian, their PixelData encapsulated,
# PS3.5 A.4): those whose frames decoders.py decodes from bytes.
ENCAPSULATED = frozenset(DECODERS)
ITEM = (0xFFFE, 0xE000)
SEQUENCE_DELIMITER = (0xFFFE, 0xE0DD)
# Explicit VR: these VRs have two reserved bytes and a 4-byte length (PS3.5 7.1.2).
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
SHORT_VRS = {v.encode() for v in ("AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT", "PN", "SH",
                                  "SL", "SS", "ST", "TM", "UI", "UL", "US")}
# (group, element) -> (keyword, how the value is read)
TAGS = {
    (0x0008, 0x0018): ("SOPInstanceUID", "text"),
    (0x0008, 0x0060): ("Modality", "text"),
    (0x0008, 0x0070): ("Manufacturer", "text"),
    (0x0008, 0x1090): ("ManufacturerModelName", "text"),
    (0x0010, 0x0020): ("PatientID", "text"),
    (0x0018, 0x0050): ("SliceThickness", "text"),
    (0x0018, 0x0060): ("KVP", "text"),
    (0x0018, 0x1210): ("ConvolutionKernel", "multi"),
    (0x0020, 0x000D): ("StudyInstanceUID", "text"),
    (0x0020, 0x000E): ("SeriesInstanceUID", "text"),
    (0x0020, 0x0032): ("ImagePositionPatient", "multi"),
    (0x0020, 0x1041): ("SliceLocation", "text"),
    (0x0028, 0x0002): ("SamplesPerPixel", "us"),
    (0x0028, 0x0004): ("PhotometricInterpretation", "text"),
    (0x0028, 0x0008): ("NumberOfFrames", "text"),
    (0x0028, 0x0010): ("Rows", "us"),
    (0x0028, 0x0011): ("Columns", "us"),
    (0x0028, 0x0100): ("BitsAllocated", "us"),
    (0x0028, 0x0101): ("BitsStored", "us"),
    (0x0028, 0x0103): ("PixelRepresentation", "us"),
    (0x0028, 0x1052): ("RescaleIntercept", "text"),
    (0x0028, 0x1053): ("RescaleSlope", "text"),
}
PIXEL_DATA = (0x7FE0, 0x0010)
# Implicit VR: the value representation of the tags read (their lengths are always 4 bytes).
IMPLICIT_US = {tag for tag, (_, kind) in TAGS.items() if kind == "us"}

_U16 = struct.Struct("<H")
_TAG_VR_LEN16 = struct.Struct("<HH2sH")
_U32 = struct.Struct("<I")
_TAG_LEN32 = struct.Struct("<HHI")


class FastHeader:
    """The header values :mod:`dicom_preprocess.reader` uses, as pydicom would give them.

    ``values`` maps keywords to ``str`` (text tags, stripped of padding), ``int`` (US tags) or a
    list of ``str`` (ImagePositionPatient); ``pixel_offset``/``pixel_length`` locate PixelData
    (its items, when encapsulated); ``fragments`` lists the (offset, length) of an encapsulated
    PixelData's fragments (the Basic Offset Table left out), else None.
    """

    def __init__(self, values: dict, transfer_syntax: str, pixel_offset: int, pixel_length: int,
                 fragments: list | None = None):
        self.values = values
        self.transfer_syntax = transfer_syntax
        self.pixel_offset = pixel_offset
        self.pixel_length = pixel_length
        self.fragments = fragments


def _text(raw: bytes) -> str | None:
    """A text value as pydicom gives it (padding stripped), or None when it is not plain ASCII."""
    if not raw.isascii():
        return None
    text = raw.decode("ascii").strip(" \0")
    if not text.isprintable():
        return None
    return text


def parse(raw: bytes) -> FastHeader | None:
    """The header of an uncompressed little-endian or a compressed (:data:`ENCAPSULATED`) DICOM
    file, or None (read it with pydicom)."""
    if len(raw) < 144 or raw[128:132] != b"DICM":
        return None
    try:
        at, transfer_syntax = _file_meta(raw, 132)
        if transfer_syntax not in (EXPLICIT_LE, IMPLICIT_LE) and transfer_syntax not in ENCAPSULATED:
            return None
        return _dataset(raw, at, transfer_syntax != IMPLICIT_LE, transfer_syntax)
    except (struct.error, IndexError, ValueError, UnicodeDecodeError):
        return None


def _explicit_element(raw: bytes, at: int) -> tuple[int, int, int, int] | None:
    """(group, element, value start, value length) of the Explicit VR element at ``at``; None when
    the two VR bytes are not a VR (a damaged file, which pydicom reads with its own guesses)."""
    group, element, vr, length = _TAG_VR_LEN16.unpack_from(raw, at)
    if vr in LONG_VRS:
        (length,) = _U32.unpack_from(raw, at + 8)
        return group, element, at + 12, length
    if vr in SHORT_VRS:
        return group, element, at + 8, length
    return None


def _file_meta(raw: bytes, at: int) -> tuple[int, str]:
    """Group 0002 (always Explicit VR Little Endian); returns where the dataset starts and its
    transfer syntax."""
    transfer_syntax = None
    end = len(raw)
    while at + 8 <= end:
        parsed = _explicit_element(raw, at)
        if parsed is None:
            raise ValueError("not a VR in the file meta information")
        group, element, start, length = parsed
        if group != 0x0002:
            break
        if length == 0xFFFFFFFF or start + length > end:
            raise ValueError("file meta element of undefined or impossible length")
        if element == 0x0010:
            transfer_syntax = _text(raw[start : start + length])
        at = start + length
    if not transfer_syntax:
        raise ValueError("no transfer syntax")
    return at, transfer_syntax


def _dataset(raw: bytes, at: int, explicit: bool, transfer_syntax: str) -> FastHeader | None:
    values: dict = {}
    end = len(raw)
    encapsulated = transfer_syntax in ENCAPSULATED
    while at + 8 <= end:
        if explicit:
            parsed = _explicit_element(raw, at)
            if parsed is None:
                return None
            group, element, start, length = parsed
        else:
            group, element, length = _TAG_LEN32.unpack_from(raw, at)
            start = at + 8
        tag = (group, element)
        if tag == PIXEL_DATA and encapsulated:
            if length != 0xFFFFFFFF:
                return None  # encapsulated PixelData has an undefined length (PS3.5 A.4)
            fragments, stop = _items(raw, start)
            if fragments is None:
                return None
            return FastHeader(values, transfer_syntax, start, stop - start, fragments)
        if length == 0xFFFFFFFF or length % 2 or start + length > end:
            return None  # undefined length (sequences, encapsulated pixels), odd, or past the end
        if tag == PIXEL_DATA:
            return FastHeader(values, transfer_syntax, start, length)
        known = TAGS.get(tag)
        if known is not None:
            keyword, kind = known
            if keyword in values:
                return None  # the same tag twice
            value = raw[start : start + length]
            if kind == "us":
                if length != 2:
                    return None
                (values[keyword],) = _U16.unpack_from(value)
            else:
                text = _text(value)
                if text is None:
                    return None
                if kind == "multi":
                    values[keyword] = text.split("\\")
                elif "\\" in text:
                    return None  # several values where the reader expects one: pydicom decides
                else:
                    values[keyword] = text
        at = start + length
    return None  # no PixelData


def _items(raw: bytes, at: int) -> tuple[list | None, int]:
    """The (offset, length) of the fragments of the encapsulated PixelData whose items start at
    ``at``, the first item (the Basic Offset Table) left out, and where the items end; None
    unless the items are whole, even-sized, at least one fragment, closed by the delimiter."""
    items = []
    end = len(raw)
    while at + 8 <= end:
        group, element, length = _TAG_LEN32.unpack_from(raw, at)
        if (group, element) == SEQUENCE_DELIMITER:
            return (items[1:] if len(items) > 1 else None), at
        if (group, element) != ITEM or length == 0xFFFFFFFF or length % 2 or at + 8 + length > end:
            return None, at
        items.append((at + 8, length))
        at += 8 + length
    return None, at  # no delimiter: a truncated file


class _Element:
    __slots__ = ("value", "length")

    def __init__(self, value, length=None):
        self.value, self.length = value, length


class _FileMeta:
    def __init__(self, transfer_syntax: str):
        self._uid = _uid(transfer_syntax)

    def get(self, keyword: str, default=None):
        return self._uid if keyword == "TransferSyntaxUID" else default


@functools.lru_cache(maxsize=64)
def _uid(transfer_syntax: str):
    """pydicom's UID of a transfer syntax, made once per syntax: ``UID(...)`` validates the string
    and cost 0.03 ms per file, a tenth of the whole header parse."""
    from pydicom.uid import UID

    return UID(transfer_syntax)


class FastDataset:
    """A :class:`FastHeader` behind the part of pydicom's ``Dataset`` API the reader uses
    (``in``, ``[...].value``, ``get``, attributes, ``PixelData``, ``get_item``, ``file_meta``,
    ``original_encoding``), so that the reader's checks run unchanged on either."""

    def __init__(self, raw: bytes, header: FastHeader):
        self._raw = raw
        self._values = header.values
        self._pixels = memoryview(raw)[header.pixel_offset : header.pixel_offset + header.pixel_length]
        self._pixel_length = header.pixel_length
        self._fragments = header.fragments
        self.file_meta = _FileMeta(header.transfer_syntax)
        self.original_encoding = (header.transfer_syntax == IMPLICIT_LE, True)  # (implicit VR, little endian)

    def __contains__(self, keyword: str) -> bool:
        return keyword == "PixelData" or keyword in self._values

    def __getitem__(self, keyword: str) -> _Element:
        return _Element(self._values[keyword])

    def get(self, keyword: str, default=None):
        return self._values.get(keyword, default)

    def get_item(self, keyword: str) -> _Element | None:
        return _Element(None, self._pixel_length) if keyword == "PixelData" else None

    @property
    def PixelData(self) -> memoryview:  # noqa: N802 (pydicom's keyword)
        return self._pixels

    def encapsulated_frame(self) -> bytes:
        """The one frame of an encapsulated PixelData: its fragments joined (a single-frame image's
        fragments all belong to its frame, PS3.5 A.4)."""
        raw = self._raw
        return b"".join(raw[start : start + length] for start, length in self._fragments)

    def __getattr__(self, keyword: str):
        try:
            return self._values[keyword]
        except KeyError:
            raise AttributeError(keyword) from None


def fast_dataset(raw: bytes) -> FastDataset | None:
    """:func:`parse` as a :class:`FastDataset`, or None."""
    header = parse(raw)
    return None if header is None else FastDataset(raw, header)
