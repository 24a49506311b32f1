"""The hemorrhage classifier: a backbone and one linear layer to six logits, and its file format.

File format (``torch.save`` of plain containers, loads with ``weights_only=True``)::

    {"format": "medmoco-classifier/1", "arch", "in_channels", "context", "image_size",
     "classes": [six subtypes], "mode", "preprocess": {windows, window_mode, size, pad_value_hu,
     resize, cache_fingerprint}, "meta": {...}, "state_dict": {...},
     "operating_points": {"split": "val", "target_sensitivity": 0.9, "thresholds": {class: t}}}

``operating_points`` (optional; files of earlier versions have none) are the per-class thresholds
chosen on the validation split before the test split was read; `medmoco evaluate` applies them.

``preprocess`` is the cache's recorded preprocessing, so raw DICOMs can be prepared exactly as the
training data were (``medmoco predict`` and the registered MLflow model).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from dicom_preprocess.files import atomic_file

from .backbones import create_backbone, feature_size
from .export import load_backbone_state, read_weights

FORMAT = "medmoco-classifier/1"
PREPROCESS_KEYS = ("windows", "window_mode", "size", "pad_value_hu", "resize", "cache_fingerprint", "channels",
                   "modalities")


class Classifier(nn.Module):
    """``backbone`` (images -> features) + ``head`` (features -> six logits)."""

    def __init__(self, arch: str, in_channels: int, num_classes: int = 6):
        super().__init__()
        self.backbone, features = create_backbone(arch, in_channels)
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_classifier(arch: str, in_channels: int, mode: str, pretrained: str | dict | None = None) -> Classifier:
    """A classifier for a mode; ``finetune``/``linear`` load the pretrained backbone, ``linear`` freezes it.

    Raises:
        ValueError: when the pretrained weights do not fit (names the missing keys).
    """
    model = Classifier(arch, in_channels)
    if mode in ("finetune", "linear"):
        if pretrained is None:
            raise ValueError(f"mode {mode!r} needs pretrained weights")
        load_backbone_state(model.backbone, pretrained)
    if mode == "linear":
        for param in model.backbone.parameters():
            param.requires_grad = False
    # The reference linear-probe initialisation (moco main_lincls): N(0, 0.01) weights, zero bias.
    nn.init.normal_(model.head.weight, std=0.01)
    nn.init.zeros_(model.head.bias)
    return model


def save_classifier(model: nn.Module, path: str, arch: str, in_channels: int, context: int, image_size: int,
                    mode: str, preprocess: dict, meta: dict | None = None,
                    operating_points: dict | None = None) -> str:
    from dicom_preprocess import SUBTYPES

    model = getattr(model, "module", model)
    payload = {"format": FORMAT, "arch": arch, "in_channels": int(in_channels), "context": int(context),
               "image_size": int(image_size), "classes": list(SUBTYPES), "mode": mode,
               "preprocess": {k: preprocess[k] for k in PREPROCESS_KEYS if k in preprocess},
               "meta": dict(meta or {}),
               "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
    if operating_points:
        payload["operating_points"] = operating_points
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_file(path) as handle:
        torch.save(payload, handle)
    return path


def set_operating_points(path: str, operating_points: dict) -> str:
    """Record the thresholds in an existing classifier file (atomically)."""
    from .export import read_weights

    payload = read_weights(path)
    payload["operating_points"] = operating_points
    with atomic_file(path) as handle:
        torch.save(payload, handle)
    return path


def load_classifier(path_or_payload: str | dict) -> tuple[Classifier, dict]:
    """(model in eval mode, the file's payload without the state dict). Safe: weights_only=True.

    Raises:
        ValueError: when the file is not a medmoco classifier or its weights do not fit.
    """
    payload = read_weights(path_or_payload) if isinstance(path_or_payload, str) else path_or_payload
    if payload.get("format") != FORMAT:
        raise ValueError(f"{path_or_payload if isinstance(path_or_payload, str) else 'payload'}: not a "
                         f"{FORMAT} file (format {payload.get('format')!r})")
    model = Classifier(payload["arch"], payload["in_channels"], len(payload["classes"]))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"classifier weights do not fit {payload['arch']}: {str(err)[:300]}") from None
    model.eval()
    info = {k: v for k, v in payload.items() if k != "state_dict"}
    return model, info


__all__ = ["Classifier", "build_classifier", "save_classifier", "load_classifier", "feature_size", "FORMAT"]
