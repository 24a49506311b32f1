"""CT intensity windows: Hounsfield units -> [0, 1] channels.

A window maps HU linearly, ``clip((HU - (c - w/2)) / w, 0, 1)``, or through a sigmoid
(Lee et al. 2018, arXiv 1812.00572): ``U * sigmoid(W * HU + b)`` with
``W = 2/w * log(U/eps - 1)``, ``b = -2c/w * log(U/eps - 1)``, ``U = 1``, ``eps = 1/255``.

Presets are the ones of the RSNA 2019 top solutions (center/width in HU): brain 40/80,
subdural 80/200, bone 600/2800 (1st place), soft tissue 40/380 ("Appian" set, 2nd/12th place).

The cache stores ``round(255 * value)`` as uint8. Because the value depends only on the stored
pixel code, :func:`window_lut` tabulates it for every possible 16-bit code once per encoding;
a slice is then windowed by a table look-up instead of float arithmetic on every pixel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

WINDOW_MODES = ("linear", "sigmoid")
SIGMOID_EPS = 1.0 / 255.0


@dataclass(frozen=True)
class Window:
    """One intensity window, in Hounsfield units."""

    name: str
    center: float
    width: float

    def __post_init__(self) -> None:
        if not self.width > 0:
            raise ValueError(f"window {self.name!r}: width must be > 0, got {self.width}")


PRESET_WINDOWS = {
    "brain": Window("brain", 40.0, 80.0),
    "subdural": Window("subdural", 80.0, 200.0),
    "bone": Window("bone", 600.0, 2800.0),
    "soft_tissue": Window("soft_tissue", 40.0, 380.0),
    "stroke": Window("stroke", 32.0, 8.0),
}
DEFAULT_WINDOWS = ("brain", "subdural", "bone")


def parse_windows(spec: str | Sequence[str | dict | Window]) -> tuple[Window, ...]:
    """Parse a window list: ``"brain,subdural,bone"``, ``"brain,blood:60/40"`` or a list.

    Entries are preset names, ``name:center/width`` strings, ``{"name", "center", "width"}``
    mappings or :class:`Window` objects.

    Raises:
        ValueError: for an unknown preset or a malformed entry; the message names it.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    windows = []
    for item in items:
        if isinstance(item, Window):
            windows.append(item)
        elif isinstance(item, dict):
            try:
                windows.append(Window(str(item["name"]), float(item["center"]), float(item["width"])))
            except KeyError as err:
                raise ValueError(f"window {item}: missing key {err}; need name, center, width") from None
        else:
            text = str(item).strip()
            if ":" in text:
                name, _, cw = text.partition(":")
                try:
                    center, width = (float(v) for v in cw.split("/"))
                except ValueError:
                    raise ValueError(f"window {text!r}: expected name:center/width, e.g. blood:60/40") from None
                windows.append(Window(name.strip(), center, width))
            elif text in PRESET_WINDOWS:
                windows.append(PRESET_WINDOWS[text])
            else:
                raise ValueError(
                    f"window {text!r}: unknown preset; use one of {sorted(PRESET_WINDOWS)} or name:center/width"
                )
    if not windows:
        raise ValueError("windows: the list is empty")
    return tuple(windows)


def apply_window(hu: np.ndarray, window: Window, mode: str = "linear") -> np.ndarray:
    """Window HU values to float64 in [0, 1] (the definition; the cache uses :func:`window_lut`)."""
    hu = np.asarray(hu, dtype=np.float64)
    if mode == "linear":
        low = window.center - window.width / 2.0
        return np.clip((hu - low) / window.width, 0.0, 1.0)
    if mode == "sigmoid":
        gain = math.log(1.0 / SIGMOID_EPS - 1.0)
        slope = 2.0 / window.width * gain
        bias = -2.0 * window.center / window.width * gain
        return 1.0 / (1.0 + np.exp(-(slope * hu + bias)))
    raise ValueError(f"window mode {mode!r}: use one of {WINDOW_MODES}")


def apply_windows(hu: np.ndarray, windows: Sequence[Window], mode: str = "linear") -> np.ndarray:
    """Stack of windowed channels, float64 (C, H, W)."""
    return np.stack([apply_window(hu, w, mode) for w in windows])


def to_uint8(values: np.ndarray) -> np.ndarray:
    """``round(255 * value)`` for values in [0, 1], as stored in the cache."""
    return np.rint(np.asarray(values) * 255.0).astype(np.uint8)


def window_lut(
    windows: Sequence[Window],
    mode: str,
    code_to_hu: np.ndarray,
) -> np.ndarray:
    """Windowed value for every stored pixel code: float64 (C, n_codes).

    Args:
        windows: the channels.
        mode: ``linear`` or ``sigmoid``.
        code_to_hu: HU of each code, indexed by the code's unsigned 16-bit view
            (see :func:`dicom_preprocess.reader.code_to_hu_table`).
    """
    return apply_windows(code_to_hu, windows, mode)
