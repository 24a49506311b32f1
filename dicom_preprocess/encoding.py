"""Turn a decoded slice into the cache's uint8 multi-window tensor (C, size, size).

Geometry (the definition the tests check):
  1. a non-square image is padded to square, centred, with air (-1024 HU);
  2. each window maps HU to [0, 1];
  3. the square is resized to ``size`` x ``size``: area averaging when shrinking
     (``torch.nn.functional.interpolate(mode="area")``, i.e. the exact k x k block mean for an
     integer factor), bilinear (``align_corners=False``) when enlarging; nothing when the image
     already has that size, so ``size=512`` on a 512x512 slice returns the windowed pixels exactly;
  4. stored as ``round(255 * value)``; MONOCHROME1 images are inverted (``255 - value``).

Speed: the common RSNA case (512x512 -> 256x256) is one fused pass in a numba kernel that looks
each 16-bit code up in a fixed-point table and sums 2x2 blocks (~0.3 ms/slice); windowing floats
with numpy costs ~7 ms. The fixed-point sums (1/256 of a grey level) can make a block mean that
lies within 1/512 of a rounding boundary come out one level off the float definition; results
at native size are exact.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

from .reader import AIR_HU, CodeMap, Slice, code_to_hu_table
from .windowing import Window, apply_windows, to_uint8, window_lut

FIXED_POINT = 256  # table entries are round(255 * value * 256); fits uint16, sums accumulate in int64

try:  # numba is a hard dependency, but keep the library importable while it compiles/installs
    from numba import njit
except ImportError:  # pragma: no cover - exercised only on broken installs
    njit = None


def _box_kernel_py(codes, table, factor, out):  # pragma: no cover - reference for the numba path
    rows, cols = out.shape[1], out.shape[2]
    blocks = table[codes.astype(np.int64)].reshape(rows, factor, cols, factor, -1).sum(axis=(1, 3))
    denom = factor * factor * FIXED_POINT
    out[:] = ((blocks + denom // 2) // denom).astype(np.uint8).transpose(2, 0, 1)


if njit is not None:

    @njit(cache=True, nogil=True)
    def _box_kernel(codes, table, factor, out):  # pragma: no cover - compiled
        channels, rows, cols = out.shape
        denom = factor * factor * FIXED_POINT
        half = denom // 2
        acc = np.zeros(channels, dtype=np.int64)
        for i in range(rows):
            for j in range(cols):
                acc[:] = 0
                for di in range(factor):
                    for dj in range(factor):
                        code = codes[i * factor + di, j * factor + dj]
                        for c in range(channels):
                            acc[c] += table[code, c]
                for c in range(channels):
                    out[c, i, j] = (acc[c] + half) // denom

    @njit(cache=True, nogil=True)
    def _box_kernel_packed(codes, packed, factor, out):  # pragma: no cover - compiled
        # One look-up per pixel: up to 3 channels share a uint64 entry in 21-bit lanes, so a
        # block sum (<= 25 * 65280 < 2**21) adds all channels at once without carries.
        channels, rows, cols = out.shape
        denom = factor * factor * FIXED_POINT
        half = denom // 2
        mask = (1 << 21) - 1
        for i in range(rows):
            for j in range(cols):
                acc = np.uint64(0)
                for di in range(factor):
                    for dj in range(factor):
                        acc += packed[codes[i * factor + di, j * factor + dj]]
                for c in range(channels):
                    lane = np.int64((acc >> np.uint64(21 * c)) & np.uint64(mask))
                    out[c, i, j] = (lane + half) // denom

    @njit(cache=True, nogil=True)
    def _box2_kernel_packed(codes, packed, out):  # pragma: no cover - compiled
        # The RSNA case (512 -> 256): 2 x 2 blocks, two input rows per output row, and the
        # rounding division by 2 * 2 * 256 = 2**10 as a shift.
        channels, rows, cols = out.shape
        mask = np.uint64((1 << 21) - 1)
        half = np.uint64(512)
        for i in range(rows):
            top = codes[2 * i]
            bottom = codes[2 * i + 1]
            for j in range(cols):
                acc = packed[top[2 * j]] + packed[top[2 * j + 1]] + packed[bottom[2 * j]] + packed[bottom[2 * j + 1]]
                for c in range(channels):
                    out[c, i, j] = (((acc >> np.uint64(21 * c)) & mask) + half) >> np.uint64(10)

else:  # pragma: no cover
    _box_kernel = _box_kernel_py
    _box_kernel_packed = _box2_kernel_packed = None


def _area_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Adaptive average pooling's windows: output i averages inputs [floor(i n_in / n_out),
    ceil((i + 1) n_in / n_out)), as ``torch.nn.functional.interpolate(mode="area")`` does."""
    i = np.arange(n_out)
    return (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)


def _area_axis(x: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    start, end = _area_weights(x.shape[axis], n_out)
    sums = np.cumsum(x, axis=axis)
    sums = np.concatenate([np.zeros_like(np.take(sums, [0], axis=axis)), sums], axis=axis)
    counts = (end - start).astype(np.float64)
    shape = [1] * x.ndim
    shape[axis] = n_out
    return (np.take(sums, end, axis=axis) - np.take(sums, start, axis=axis)) / counts.reshape(shape)


def _bilinear_axis(x: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Linear interpolation along one axis with ``align_corners=False`` (PyTorch's source index:
    ``(i + 0.5) n_in / n_out - 0.5``, clamped at 0)."""
    n_in = x.shape[axis]
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    low = np.floor(src).astype(np.int64)
    high = np.minimum(low + 1, n_in - 1)
    weight = src - low
    shape = [1] * x.ndim
    shape[axis] = n_out
    weight = weight.reshape(shape)
    return np.take(x, low, axis=axis) * (1.0 - weight) + np.take(x, high, axis=axis) * weight


def resize_square(channels: np.ndarray, size: int) -> np.ndarray:
    """Resize float (C, N, N) to (C, size, size): area when shrinking, bilinear when enlarging.

    PyTorch's ``interpolate`` semantics (``mode="area"``, ``mode="bilinear", align_corners=False``),
    written in numpy so that a preprocessing worker never imports torch (seconds per process);
    ``tests/test_reader_encoding.py`` checks the cache against torch itself.
    """
    side = channels.shape[-1]
    if side == size:
        return channels
    x = np.asarray(channels, dtype=np.float64)
    resize = _area_axis if side > size else _bilinear_axis
    return resize(resize(x, size, axis=-2), size, axis=-1)


def pad_to_square(image: np.ndarray, fill: float | np.ndarray) -> np.ndarray:
    """Centre a (..., H, W) array in a square canvas filled with ``fill`` (per leading channel)."""
    rows, cols = image.shape[-2:]
    side = max(rows, cols)
    if rows == cols:
        return image
    canvas = np.empty(image.shape[:-2] + (side, side), dtype=image.dtype)
    canvas[...] = np.asarray(fill, dtype=image.dtype).reshape(-1, 1, 1) if np.ndim(fill) else fill
    top, left = (side - rows) // 2, (side - cols) // 2
    canvas[..., top : top + rows, left : left + cols] = image
    return canvas


class SliceEncoder:
    """Encodes slices for one cache configuration (windows, mode, size).

    Tables are built once per code mapping (slope, intercept, sign, wrap fix) and reused:
    an RSNA archive has a handful of distinct mappings.
    """

    def __init__(self, windows: Sequence[Window], mode: str = "linear", size: int = 256):
        if size < 8:
            raise ValueError(f"size {size}: must be >= 8")
        self.windows = tuple(windows)
        self.mode = mode
        self.size = int(size)
        self._air = apply_windows(np.array([AIR_HU]), self.windows, mode)[:, 0]  # (C,)
        self._tables = lru_cache(maxsize=64)(self._build_tables)

    def _build_tables(self, key: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        values = window_lut(self.windows, self.mode, code_to_hu_table(CodeMap(*key)))  # (C, 65536)
        exact = to_uint8(values)  # (C, 65536)
        fixed = np.ascontiguousarray(np.rint(values.T * 255.0 * FIXED_POINT).astype(np.uint16))  # (65536, C)
        packed = None
        if len(self.windows) <= 3:
            packed = np.zeros(65536, dtype=np.uint64)
            for c in range(len(self.windows)):
                packed |= fixed[:, c].astype(np.uint64) << np.uint64(21 * c)
        return values, exact, fixed, packed

    def encode(self, image: Slice, out: np.ndarray | None = None) -> np.ndarray:
        """The slice as uint8 (C, size, size), written into ``out`` when given (a chunk's row)."""
        if image.codes is not None:
            result = self._encode_codes(image.codes, image.code_map, out)
        else:
            result = self.encode_hu(image.hu)
        if out is not None and result is not out:
            out[...] = result
            result = out
        if image.invert:
            np.subtract(255, result, out=result)
        return result

    def encode_hu(self, hu: np.ndarray) -> np.ndarray:
        """Slow, general path for float HU input (NIfTI, ITK, SimpleITK-decoded DICOM)."""
        windowed = apply_windows(hu, self.windows, self.mode)
        return to_uint8(resize_square(pad_to_square(windowed, self._air), self.size))

    def _encode_codes(self, codes: np.ndarray, code_map: CodeMap, out: np.ndarray | None = None) -> np.ndarray:
        values, exact, fixed, packed = self._tables(code_map.key())
        rows, cols = codes.shape
        if rows == cols == self.size:
            return np.take(exact, codes, axis=1, out=out)
        if rows == cols and rows % self.size == 0:
            factor = rows // self.size
            if out is None:
                out = np.empty((len(self.windows), self.size, self.size), dtype=np.uint8)
            codes = np.ascontiguousarray(codes)
            if packed is not None and factor == 2 and _box2_kernel_packed is not None:
                _box2_kernel_packed(codes, packed, out)
            elif packed is not None and factor <= 5 and _box_kernel_packed is not None:
                _box_kernel_packed(codes, packed, factor, out)
            else:
                _box_kernel(codes, fixed, factor, out)
            return out
        windowed = np.take(values, codes, axis=1)
        return to_uint8(resize_square(pad_to_square(windowed, self._air), self.size))
