"""Raw DICOM slices -> the model's windowed uint8 input, as a MONAI dictionary transform.

:class:`EncodeDicomd` is medmoco's own preprocessing (:func:`dicom_preprocess.reader.read_dicom`
and :class:`dicom_preprocess.encoding.SliceEncoder`, the code that wrote the training cache)
wrapped for a MONAI pipeline. MONAI's ``LoadImage(PydicomReader)`` + ``ScaleIntensityRange`` +
``Resize`` do not reproduce those bytes:

* ``PydicomReader`` applies slope and intercept but not the RSNA 12-bit wrap fix (the stored codes
  of those files are HU modulo 4096), transposes 2D slices by default (MONAI#8265) and cannot
  load an RSNA series folder (it sorts by the absent InstanceNumber);
* a non-square slice is padded to square with air (-1024 HU) before it is resized;
* the cache holds ``round(255 * window)`` after an area resize done in fixed point for integer
  factors: a float pipeline lands one grey level away wherever a value lies near a rounding
  boundary, and the model was trained on the cache's levels;
* MONOCHROME1 slices are inverted, sigmoid windows are medmoco's.

What follows the cache's bytes in medmoco (``/ 255``, the resize to the model's input size) is
MONAI's own transforms in the bundle (:mod:`medmoco.export.bundle`), which give the same floats as
:func:`medmoco.transforms.supervised.prepare_images`.
"""
from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import MapTransform


class EncodeDicomd(MapTransform):
    """Files of one slice (and its neighbours) -> uint8 (files x windows, size, size) tensor.

    Args:
        keys: the keys holding a path or a list of paths (a 2.5D slice: s-k .. s+k, in order).
        windows: ``[{"name", "center", "width"}]`` in HU, the model's recorded windows.
        window_mode: ``linear`` or ``sigmoid``.
        size: the cache's side in pixels (the model file's ``preprocess.size``).
        modalities: Modality values accepted (an image without Modality is read as CT).

    A 2.5D slice reads its neighbours' files too (each file 2k + 1 times in a series: ~1 ms per
    uncompressed RSNA slice, against a model's forward pass).

    Raises (when called):
        ValueError: naming the file and the reason when it is not a usable CT slice.
    """

    def __init__(self, keys, windows: Sequence[dict], window_mode: str = "linear", size: int = 256,
                 modalities: Sequence[str] = ("CT",), allow_missing_keys: bool = False):
        from dicom_preprocess.encoding import SliceEncoder
        from dicom_preprocess.windowing import parse_windows

        super().__init__(keys, allow_missing_keys)
        self.encoder = SliceEncoder(parse_windows([dict(w) for w in windows]), window_mode, int(size))
        self.modalities = tuple(modalities) or None

    def encode(self, path: str) -> np.ndarray:
        from dicom_preprocess.reader import SkipImage, read_dicom

        try:
            return self.encoder.encode(read_dicom(path, path, self.modalities))
        except SkipImage as err:
            raise ValueError(f"{path}: not a usable CT slice: {err}") from None

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            paths = [d[key]] if isinstance(d[key], str) else list(d[key])
            d[key] = torch.from_numpy(np.concatenate([self.encode(p) for p in paths]))  # (len(paths) * C, size, size)
        return d
