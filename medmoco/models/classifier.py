"""The hemorrhage classifier: a backbone and one linear layer to six logits, and its file format.

File format (``torch.save`` of plain containers, loads with ``weights_only=True``)::

    {"format": "medmoco-classifier/1", "arch", "in_channels", "context", "image_size",
     "classes": [six subtypes], "mode", "preprocess": {windows, window_mode, size, pad_value_hu,
     resize, cache_fingerprint}, "meta": {...}, "state_dict": {...},
     "operating_points": {"split": "val", "target_sensitivity": 0.9, "thresholds": {class: t}}}

``operating_points`` (optional; files of earlier versions have none) are the per-class thresholds
chosen on the validation split before the test split was read; `medmoco evaluate` applies them.

A series model (``medmoco series``) is the same file with ``"format": "medmoco-series/1"``, the
encoder's keys as above (its ``state_dict`` is the slice classifier it embeds with), and
``"series": {hidden, layers, dropout, flip_tta, features, training, ...}`` with the head's
``head_state_dict``; :func:`load_classifier` returns a
:class:`~medmoco.models.series.SeriesClassifier` for it, so every loader handles both.

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
SERIES_FORMAT = "medmoco-series/1"
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


def save_series_model(model: nn.Module, path: str, encoder_info: dict, series: dict, meta: dict | None = None,
                      operating_points: dict | None = None) -> str:
    """Write a :class:`~medmoco.models.series.SeriesClassifier` as ``medmoco-series/1`` (atomically).

    Args:
        encoder_info: the slice classifier's file payload without its state dict (arch, context, ...).
        series: the head's settings (``hidden``, ``layers``, ``dropout``, ``flip_tta``, ``features``,
            ``training`` and whatever else describes it).
    """
    model = getattr(model, "module", model)
    payload = {k: v for k, v in encoder_info.items() if k not in ("state_dict", "head_state_dict", "series",
                                                                    "operating_points", "meta")}
    payload.update({"format": SERIES_FORMAT, "meta": dict(meta or {}), "series": dict(series),
                    "state_dict": {k: v.detach().cpu().clone() for k, v in model.encoder.state_dict().items()},
                    "head_state_dict": {k: v.detach().cpu().clone() for k, v in model.head.state_dict().items()}})
    if operating_points:
        payload["operating_points"] = operating_points
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_file(path) as handle:
        torch.save(payload, handle)
    return path


def load_classifier(path_or_payload: str | dict) -> tuple[nn.Module, dict]:
    """(model in eval mode, the file's payload without the state dicts). Safe: weights_only=True.

    The one loader of a model file: a slice classifier (``medmoco-classifier/1``) or a series
    model (``medmoco-series/1``, a :class:`~medmoco.models.series.SeriesClassifier`).

    Raises:
        ValueError: when the file is not a medmoco classifier or its weights do not fit.
    """
    payload = read_weights(path_or_payload) if isinstance(path_or_payload, str) else path_or_payload
    if payload.get("format") not in (FORMAT, SERIES_FORMAT):
        raise ValueError(f"{path_or_payload if isinstance(path_or_payload, str) else 'payload'}: not a "
                         f"{FORMAT} or {SERIES_FORMAT} file (format {payload.get('format')!r})")
    model = Classifier(payload["arch"], payload["in_channels"], len(payload["classes"]))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"classifier weights do not fit {payload['arch']}: {str(err)[:300]}") from None
    if payload["format"] == SERIES_FORMAT:
        from .series import SeriesClassifier, build_series_head

        settings = payload["series"]
        head = build_series_head(int(settings["features"]), settings)
        try:
            head.load_state_dict(payload["head_state_dict"])
        except RuntimeError as err:
            raise ValueError(f"series head weights do not fit its settings {settings}: {str(err)[:300]}") from None
        model = SeriesClassifier(model, head, bool(settings.get("flip_tta", False)), payload["context"],
                                 payload["image_size"])
    model.eval()
    info = {k: v for k, v in payload.items() if k not in ("state_dict", "head_state_dict")}
    return model, info


__all__ = ["Classifier", "build_classifier", "save_classifier", "save_series_model", "load_classifier",
           "feature_size", "FORMAT", "SERIES_FORMAT"]
