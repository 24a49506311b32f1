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

    def encode_dicom(self, data: bytes | str) -> np.ndarray:
        """One DICOM (bytes or path) -> uint8 (C, size, size), as in the cache.

        Raises:
            ValueError: naming the reason when the file is not a usable CT slice.
        """
        from dicom_preprocess.reader import SkipImage, read_dicom

        if self.info["context"] > 0:
            raise ValueError("this is a 2.5D model (context > 0): it needs whole series; use `medmoco predict`")
        try:
            image = read_dicom(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
        except SkipImage as err:
            raise ValueError(f"not a usable CT slice: {err}") from None
        return self.encoder.encode(image)

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
        return self.predict_tensors(np.stack([self.encode_dicom(item) for item in items]))
