"""Inference on raw DICOMs or windowed tensors with a ``model.pt`` (no MLflow here).

:class:`ClassifierPredictor` applies exactly the preprocessing recorded in the model file (the
cache's windows, window mode and size: ``dicom_preprocess``'s reader and :class:`SliceEncoder`,
the same code that built the training cache) and the same input preparation as evaluation
(:func:`medmoco.transforms.supervised.prepare_images`), so its probabilities equal `medmoco
evaluate` on the same images. The MLflow model (:mod:`medmoco.pyfunc_model`) wraps it.
"""
from __future__ import annotations

import io

import numpy as np
import torch

from dicom_preprocess import SUBTYPES


class ClassifierPredictor:
    def __init__(self, model_file: str, device: str = "cpu", batch_size: int = 64):
        from dicom_preprocess.encoding import SliceEncoder
        from dicom_preprocess.windowing import parse_windows

        from .models import load_classifier

        self.model, self.info = load_classifier(model_file)
        self.model.to(device)
        self.device, self.batch_size = device, batch_size
        pre = self.info["preprocess"]
        windows = parse_windows([{"name": w["name"], "center": w["center"], "width": w["width"]}
                                 for w in pre["windows"]])
        self.encoder = SliceEncoder(windows, pre.get("window_mode", "linear"), int(pre["size"]))
        self.channels = len(windows)
        self.is_series = bool(getattr(self.model, "is_series", False))

    def encode_dicom(self, data: bytes | str) -> np.ndarray:
        """One DICOM (bytes or path) -> uint8 (C, size, size), as in the cache.

        Raises:
            ValueError: naming the reason when the file is not a usable CT slice.
        """
        from dicom_preprocess.reader import SkipImage, read_dicom

        if self.info["context"] > 0:
            raise ValueError("this is a 2.5D model (context > 0): it needs whole series; use `medmoco predict`")
        return self.encoder.encode(self._read(data))

    @staticmethod
    def _read(data: bytes | str):
        from dicom_preprocess.reader import SkipImage, read_dicom

        try:
            return read_dicom(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
        except SkipImage as err:
            raise ValueError(f"{data if isinstance(data, str) else 'DICOM bytes'}: not a usable CT slice: {err}") \
                from None

    @torch.no_grad()
    def predict_series_tensors(self, images) -> tuple[np.ndarray, np.ndarray]:
        """A series model on uint8 (S, C, H, W) tensors of ONE series in slice order -> (slice
        probabilities (S, 6), exam probabilities (6,))."""
        from .transforms.supervised import prepare_images

        images = torch.as_tensor(np.asarray(images))
        x = prepare_images(images, self.info["image_size"]).to(self.device)
        slices, exam = self.model.forward_series(x)
        return torch.sigmoid(slices.float()).cpu().numpy(), torch.sigmoid(exam.float()).cpu().numpy()

    def predict_series_dicoms(self, items) -> np.ndarray:
        """A series model on DICOMs (paths or bytes) of one or more series -> slice probabilities
        (N, 6) in input order. The slices are grouped by study and SeriesInstanceUID and ordered as
        the cache orders them (:func:`dicom_preprocess.cache.series_order`), each series is
        predicted whole, and the probabilities go back to the input order."""
        import pandas as pd

        from dicom_preprocess.cache import series_order

        slices = [self._read(item) for item in items]
        frame = series_order(pd.DataFrame({"study_uid": [s.study_uid for s in slices],
                                           "series_uid": [s.series_uid for s in slices],
                                           "z": [s.z for s in slices],
                                           "image_id": [s.image_id or str(i) for i, s in enumerate(slices)]}))
        probs = np.zeros((len(slices), len(SUBTYPES)), dtype=np.float32)
        for _, group in frame.groupby(["study_uid", "series_uid"], sort=False):
            members = group.sort_values("slice_index").index.to_numpy()
            images = np.stack([self.encoder.encode(slices[i]) for i in members])
            probs[members] = self.predict_series_tensors(images)[0]
        return probs

    @torch.no_grad()
    def predict_tensors(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 (N, C, H, W) windowed tensors -> probabilities (N, 6)."""
        from .transforms.supervised import prepare_images

        images = torch.as_tensor(np.asarray(images))
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"tensors must be uint8 (N, C, H, W); got {images.dtype} {tuple(images.shape)}")
        if images.shape[1] != self.info["in_channels"]:
            raise ValueError(f"tensors have {images.shape[1]} channels; the model takes {self.info['in_channels']}")
        out = []
        for start in range(0, len(images), self.batch_size):
            x = prepare_images(images[start : start + self.batch_size], self.info["image_size"]).to(self.device)
            out.append(torch.sigmoid(self.model(x).float()).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, len(SUBTYPES)), np.float32)

    def predict_dicoms(self, items) -> np.ndarray:
        if self.is_series:
            return self.predict_series_dicoms(items)
        return self.predict_tensors(np.stack([self.encode_dicom(item) for item in items]))
