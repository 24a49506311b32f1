"""Per compressed transfer syntax, the fastest exact decoder installed, decoding one frame from bytes.

A compressed DICOM slice's PixelData holds one encoded frame (JPEG Lossless, JPEG-LS, JPEG 2000,
RLE, ...). :func:`decode_frame` hands that frame, already in memory, to the decoders listed for its
transfer syntax in :data:`DECODERS`, fastest first, and returns the first result with the name of
the decoder that produced it. The result is the stored sample words, as an uncompressed file holds
them: the code -> HU rules of :mod:`.reader` (sign extension from BitsStored, the RSNA 12-bit wrap
fix, slope and intercept) then run unchanged on every path, and no decoder's output goes through
floats.

A decoder that is not installed, or that fails on the frame, is passed over; when the one that ran
is not the first of its syntax's list, :attr:`Decoded.fallback` says which were passed over and why,
and the reader writes it into the slice's notes (the cache manifest's ``notes`` column): a slow
fallback never runs silently. SimpleITK (GDCM behind ITK) is the last resort of every list: it only
reads files, so it costs a temporary file and a float round trip, and serves what no library
decodes from bytes (RLE excepted: see :data:`DECODERS`).
"""
from __future__ import annotations

import functools
import importlib
import os
import tempfile
from dataclasses import dataclass
from typing import Callable

import numpy as np

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.57"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_LS_NEAR_LOSSLESS = "1.2.840.10008.1.2.4.81"
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_2000 = "1.2.840.10008.1.2.4.91"
HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
HTJ2K_LOSSLESS_RPCL = "1.2.840.10008.1.2.4.202"
HTJ2K = "1.2.840.10008.1.2.4.203"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"

# Transfer syntax -> decoders, fastest first. The order of the lossless syntaxes is measured
# (CPU ms per 512x512 16-bit real RSNA slice, re-encoded losslessly, one frame decoded from bytes,
# passes run in turn, best of 7, 2-core VM, 2026-12-01; `python benchmarks/preprocess.py
# --compressed` prints the same loops):
#   JPEG Lossless SV1  imagecodecs (libjpeg-turbo 3) 2.07, gdcm 4.89, pylibjpeg-libjpeg 11.2
#   JPEG-LS lossless   pyjpegls 4.55, imagecodecs 4.50 (both CharLS 2.4: a tie), gdcm 7.5, libjpeg 16.7
#   JPEG 2000 lossless pylibjpeg-openjpeg 17.6, imagecodecs 17.4 (both OpenJPEG 2.5: a tie), gdcm 20.7
#     imagecodecs goes first: it hands OpenJPEG a thread count (opj_codec_set_threads; OpenJPEG
#     decodes code-blocks and the wavelet transform in parallel), pylibjpeg-openjpeg does not. With
#     2 threads a slice takes 8.0 ms of wall time instead of 14.5 for the same 15 CPU ms (exact
#     either way; 16 real slices, 2-core VM, quiet, 2026-12-01). A job uses the threads that its
#     workers leave free (:func:`set_threads`, ``decode_threads``): none with one worker per CPU.
#   RLE Lossless       pylibjpeg-rle 0.51, pydicom's own (numpy) 6.9-8.5, gdcm 10.3, SimpleITK 37
# gdcm's figure includes ~2 ms of its Python binding: the pixels come back as a str (SWIG's char*)
# that must be encoded back to bytes.
# RLE stops at pydicom's own decoder, which is always installed: GDCM (python-gdcm and SimpleITK's
# alike) dies of SIGFPE on an RLE header that declares no segments, taking the worker with it.
# The lossy syntaxes (a CT archive rarely holds them) keep libjpeg first: it decodes 8- and 12-bit
# JPEG, gdcm's plugin refuses 12-bit Extended. Syntaxes not listed go to pydicom's own choice.
DECODERS: dict[str, tuple[str, ...]] = {
    JPEG_LOSSLESS: ("imagecodecs", "gdcm", "pylibjpeg-libjpeg", "SimpleITK"),
    JPEG_LOSSLESS_SV1: ("imagecodecs", "gdcm", "pylibjpeg-libjpeg", "SimpleITK"),
    JPEG_LS_LOSSLESS: ("pyjpegls", "imagecodecs", "gdcm", "pylibjpeg-libjpeg", "SimpleITK"),
    JPEG_LS_NEAR_LOSSLESS: ("pyjpegls", "imagecodecs", "gdcm", "pylibjpeg-libjpeg", "SimpleITK"),
    JPEG_2000_LOSSLESS: ("imagecodecs", "pylibjpeg-openjpeg", "gdcm", "SimpleITK"),
    JPEG_2000: ("imagecodecs", "pylibjpeg-openjpeg", "gdcm", "SimpleITK"),
    HTJ2K_LOSSLESS: ("pylibjpeg-openjpeg", "pydicom", "SimpleITK"),
    HTJ2K_LOSSLESS_RPCL: ("pylibjpeg-openjpeg", "pydicom", "SimpleITK"),
    HTJ2K: ("pylibjpeg-openjpeg", "pydicom", "SimpleITK"),
    RLE_LOSSLESS: ("pylibjpeg-rle", "pydicom"),
    JPEG_BASELINE: ("pylibjpeg-libjpeg", "gdcm", "pydicom", "SimpleITK"),
    JPEG_EXTENDED: ("pylibjpeg-libjpeg", "pydicom", "SimpleITK"),
}
OTHER_SYNTAXES = ("pydicom", "SimpleITK")
MAX_MESSAGE = 200  # of each decoder's complaint, in a fallback note or a skip reason


@dataclass(frozen=True)
class FrameInfo:
    """What the decoders need to know about the frame, from the file's header.

    ``file`` is the whole DICOM file: only SimpleITK, which reads files, uses it; ``slope`` and
    ``intercept`` turn SimpleITK's rescaled output back into stored values.
    """

    transfer_syntax: str
    rows: int
    columns: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    photometric: str = "MONOCHROME2"
    slope: float = 1.0
    intercept: float = 0.0
    file: bytes = b""


@dataclass
class Decoded:
    """``words``: (rows, columns) uint16, the stored values as an uncompressed file holds them
    (8-bit samples widened); ``decoder``: the one that ran; ``fallback``: '' when it was the first
    of the syntax's list, else which were passed over and why."""

    words: np.ndarray
    decoder: str
    fallback: str = ""


class NotDecoded(Exception):
    """No decoder of the syntax's list decoded the frame; ``str(err)`` names each and its reason."""


class _Unusable(Exception):
    """This decoder cannot serve this frame (not installed, wrong size out): try the next."""


def decoders_for(transfer_syntax: str) -> tuple[str, ...]:
    """The decoders tried for a transfer syntax, in order."""
    return DECODERS.get(str(transfer_syntax), OTHER_SYNTAXES)


def decode_frame(frame: bytes, info: FrameInfo) -> Decoded:
    """Decode one encoded frame with the first decoder of its syntax's list that can.

    Raises:
        NotDecoded: every decoder failed or is missing; the message names each with its reason.
    """
    passed_over = []
    for name in decoders_for(info.transfer_syntax):
        try:
            words = _DECODE[name](frame, info)
        except _Unusable as err:
            passed_over.append(f"{name}: {err}")
            continue
        except Exception as err:  # a C decoder raises many types on a corrupt frame
            passed_over.append(f"{name}: {type(err).__name__}: {_one_line(err)}")
            continue
        except BaseException as err:
            # pylibjpeg-rle is Rust: on a corrupt frame it panics, and pyo3's PanicException derives
            # from BaseException so that `except Exception` lets it through (it would end a chunk).
            if type(err).__module__ != "pyo3_runtime":
                raise
            passed_over.append(f"{name}: {type(err).__name__}: {_one_line(err)}")
            continue
        fallback = f"decoded by {name} ({'; '.join(passed_over)})" if passed_over else ""
        return Decoded(words, name, fallback)
    raise NotDecoded("; ".join(passed_over))


_threads = 1  # per decode, for the decoders that can use threads (imagecodecs' JPEG 2000)


def set_threads(count: int) -> None:
    """Threads each decode may use from now on in this process (a worker sets it from its job's
    ``decode_threads``); 1 decodes in the calling thread only."""
    global _threads
    if count < 1:
        raise ValueError(f"decode threads {count}: must be >= 1")
    _threads = int(count)


def installed(name: str) -> bool:
    """Whether a decoder of :data:`DECODERS` can run here (its library imports)."""
    return all(_module(m) is not None for m in _MODULES[name])


def warm_up() -> None:
    """Import the decoders' libraries now (SimpleITK, the last resort, excepted): a worker times
    each file with SIGALRM, and an alarm landing in a half-done import breaks the interpreter."""
    for name in _DECODE:
        if name != "SimpleITK":
            module = _module(_MODULES[name][0])
            if module is not None and name == "imagecodecs":
                for function in set(_IMAGECODECS.values()):  # imagecodecs loads each codec on first use
                    getattr(module, function, None)


@functools.lru_cache(maxsize=None)
def _module(name: str):
    """The module, or None when it is not installed (asked once per process: a failed import
    searches the whole path again each time)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _require(decoder: str):
    modules = [_module(m) for m in _MODULES[decoder]]
    if any(m is None for m in modules):
        raise _Unusable("not installed")
    return modules[0]


def _words(buffer, info: FrameInfo) -> np.ndarray:
    """A decoder's output bytes as (rows, columns) uint16 stored words (little endian, as all of
    these decoders write them)."""
    pixels = info.rows * info.columns
    if len(buffer) == 2 * pixels:
        return np.frombuffer(buffer, dtype="<u2").reshape(info.rows, info.columns)
    if len(buffer) == pixels:
        return np.frombuffer(buffer, dtype=np.uint8).astype(np.uint16).reshape(info.rows, info.columns)
    raise _Unusable(f"decoded {len(buffer):,} bytes, expected {pixels:,} or {2 * pixels:,} for "
                    f"{info.rows}x{info.columns} one-sample pixels")


def _array_words(array: np.ndarray, info: FrameInfo) -> np.ndarray:
    if array.shape != (info.rows, info.columns):
        raise _Unusable(f"decoded shape {array.shape}, expected {(info.rows, info.columns)}")
    if array.dtype.itemsize == 2:
        return array.view(np.uint16)
    if array.dtype.itemsize == 1:
        return array.astype(np.uint16)
    raise _Unusable(f"decoded {array.dtype} samples, expected 8 or 16 bits")


def _rle(frame: bytes, info: FrameInfo) -> np.ndarray:
    rle = _require("pylibjpeg-rle")
    return _words(rle.decode_pixel_data(frame, version=2, rows=info.rows, columns=info.columns,
                                        bits_allocated=info.bits_allocated), info)


# imagecodecs' decoder per syntax: libjpeg-turbo 3 (lossless JPEG, all predictors, 2-16 bits),
# CharLS, OpenJPEG
_IMAGECODECS = {JPEG_LOSSLESS: "jpeg8_decode", JPEG_LOSSLESS_SV1: "jpeg8_decode", JPEG_LS_LOSSLESS: "jpegls_decode",
                JPEG_LS_NEAR_LOSSLESS: "jpegls_decode", JPEG_2000_LOSSLESS: "jpeg2k_decode", JPEG_2000: "jpeg2k_decode"}


def _imagecodecs(frame: bytes, info: FrameInfo) -> np.ndarray:
    imagecodecs = _require("imagecodecs")
    if info.transfer_syntax not in _IMAGECODECS:
        raise _Unusable("not for this transfer syntax")
    name = _IMAGECODECS[info.transfer_syntax]
    options = {"numthreads": _threads} if name == "jpeg2k_decode" else {}
    return _array_words(getattr(imagecodecs, name)(frame, **options), info)


def _pyjpegls(frame: bytes, info: FrameInfo) -> np.ndarray:
    jpeg_ls = _require("pyjpegls")
    buffer, header = jpeg_ls.decode_pixel_data(frame)  # (pixels, the codestream's frame header)
    if (header["height"], header["width"], header["components"]) != (info.rows, info.columns, 1):
        raise _Unusable(f"codestream is {header['height']}x{header['width']}x{header['components']}")
    return _words(buffer, info)


def _libjpeg(frame: bytes, info: FrameInfo) -> np.ndarray:
    libjpeg = _require("pylibjpeg-libjpeg")
    return _words(libjpeg.decode_pixel_data(frame, version=2), info)


def _openjpeg(frame: bytes, info: FrameInfo) -> np.ndarray:
    # Signed codestreams come out sign-extended to 16 bits, unsigned ones zero-extended; either way
    # the low BitsStored bits are the stored value, which is all the code -> HU rule reads.
    openjpeg = _require("pylibjpeg-openjpeg")
    return _words(openjpeg.decode_pixel_data(frame, version=2), info)


def _gdcm(frame: bytes, info: FrameInfo) -> np.ndarray:
    """GDCM's codecs on the frame in memory: a one-fragment gdcm.Image, as pydicom's own GDCM
    plugin builds it (python-gdcm reads no Python stream, only this or a file)."""
    gdcm = _require("gdcm")
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(frame)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())
    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((info.columns, info.rows, 1))
    image.SetDataElement(element)
    photometric = gdcm.PhotometricInterpretation.GetPIType(info.photometric)
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(photometric))
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(info.transfer_syntax)))
    # JPEG-LS and JPEG 2000 codestreams carry their own precision; GDCM sizes its output by it.
    bits_allocated = 8 if info.bits_stored <= 8 else 16
    image.SetPixelFormat(gdcm.PixelFormat(1, bits_allocated, info.bits_stored, info.bits_stored - 1,
                                          int(info.signed)))
    buffer = image.GetBuffer()  # a str of the bytes (SWIG's char*); empty when GDCM failed
    if not buffer:
        raise _Unusable("GDCM decoded nothing")
    return _words(buffer.encode("utf-8", "surrogateescape"), info)


def _pydicom(frame: bytes, info: FrameInfo, plugin: str = "") -> np.ndarray:
    """pydicom's pixel decoding on the frame (its own RLE decoder with ``plugin='pydicom'``, else
    the first of its plugins that decodes the syntax)."""
    _require("pydicom")
    from pydicom.encaps import encapsulate
    from pydicom.pixels.decoders.base import get_decoder

    try:
        decoder = get_decoder(info.transfer_syntax)
    except NotImplementedError:
        raise _Unusable("pydicom has no decoder for this transfer syntax") from None
    array, _ = decoder.as_array(
        encapsulate([frame]), decoding_plugin=plugin, raw=True, rows=info.rows, columns=info.columns,
        samples_per_pixel=1, bits_allocated=info.bits_allocated, bits_stored=info.bits_stored,
        pixel_representation=int(info.signed), photometric_interpretation=info.photometric, number_of_frames=1)
    return _array_words(array, info)


def _simpleitk(frame: bytes, info: FrameInfo) -> np.ndarray:
    """SimpleITK reads the whole file from a temporary file and applies slope and intercept; its
    floats go back to stored values (exact for integer stored values and slope 1)."""
    sitk = _require("SimpleITK")
    if not info.file:
        raise _Unusable("needs the whole file")
    with tempfile.NamedTemporaryFile(suffix=".dcm", delete=False) as handle:
        handle.write(info.file)
        path = handle.name
    try:
        array = sitk.GetArrayFromImage(sitk.ReadImage(path))
    finally:
        os.unlink(path)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.shape != (info.rows, info.columns):
        raise _Unusable(f"decoded an array of shape {array.shape}, expected {(info.rows, info.columns)}")
    stored = np.rint((array.astype(np.float64) - info.intercept) / info.slope)
    low, high = (-32768, 32767) if info.signed else (0, 65535)
    if stored.size and (stored.min() < low or stored.max() > high):
        raise _Unusable(f"decoded values outside the {'signed' if info.signed else 'unsigned'} 16-bit range")
    return stored.astype(np.int16 if info.signed else np.uint16).view(np.uint16)


# decoder -> the modules it needs (the first is the one it calls)
_MODULES = {
    "imagecodecs": ("imagecodecs",),
    "pylibjpeg-rle": ("rle",),
    "pyjpegls": ("jpeg_ls",),
    "pylibjpeg-libjpeg": ("libjpeg",),
    "pylibjpeg-openjpeg": ("openjpeg",),
    "gdcm": ("gdcm",),
    "pydicom": ("pydicom",),
    "SimpleITK": ("SimpleITK",),
}
_DECODE: dict[str, Callable[[bytes, FrameInfo], np.ndarray]] = {
    "imagecodecs": _imagecodecs,
    "pylibjpeg-rle": _rle,
    "pyjpegls": _pyjpegls,
    "pylibjpeg-libjpeg": _libjpeg,
    "pylibjpeg-openjpeg": _openjpeg,
    "gdcm": _gdcm,
    "pydicom": _pydicom,
    "SimpleITK": _simpleitk,
}


def _one_line(err: BaseException, limit: int = MAX_MESSAGE) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
