"""The network of a medmoco MONAI bundle: a medmoco classifier that answers probabilities.

A bundle's ``network_def`` must be built from its config alone (``_target_`` and JSON arguments)
and load ``models/model.pt``, a plain state dict. :class:`BundleClassifier` is that: the arguments
of :func:`network_args` rebuild the slice :class:`~medmoco.models.classifier.Classifier` or the
:class:`~medmoco.models.series.SeriesClassifier` of a model file, and ``forward`` ends in the
sigmoid, so that the bundle's ``pred`` is what its metadata says (probabilities in [0, 1]) for
every consumer of ``model.pt`` and of the TorchScript ``model.ts`` alike.

A series model reads the batch dimension as the slices of ONE series in slice order: (S, C, H, W)
-> (S, 6). A slice model reads it as independent slices. Both are scriptable (``torch.jit.script``):
the GRU runs on the whole series as one packed sequence, so a TorchScript series model takes a
series of any length.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models.classifier import Classifier
from ..models.series import SeriesClassifier, build_series_head

# The series settings that shape the head's weights (the rest of a model file's ``series``
# record describes its training).
SERIES_ARGS = ("features", "hidden", "layers", "flip_tta")


class BundleClassifier(nn.Module):
    """Images -> sigmoid probabilities of the six subtypes, (N, C, H, W) float [0, 1] -> (N, 6).

    Args:
        arch: the backbone's name (:data:`medmoco.models.backbones.BACKBONES`).
        in_channels: windows x (2 context + 1) slices.
        num_classes: six (RSNA's subtypes, ``any`` last).
        series: None for a slice model; for a series model the head's settings
            (``features``, ``hidden``, ``layers``, ``flip_tta``).
    """

    def __init__(self, arch: str, in_channels: int, num_classes: int = 6, series: dict | None = None):
        super().__init__()
        model = Classifier(arch, int(in_channels), int(num_classes))
        if series is not None:
            settings = {**series, "dropout": 0.0}  # dropout holds no weights and is off in eval mode anyway
            model = SeriesClassifier(model, build_series_head(int(series["features"]), settings),
                                     bool(series.get("flip_tta", False)))
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(images).float())


def network_args(info: dict) -> dict:
    """The JSON arguments of :class:`BundleClassifier` for a model file's payload (``load_classifier``'s info)."""
    args = {"arch": info["arch"], "in_channels": int(info["in_channels"]), "num_classes": len(info["classes"])}
    if info.get("series"):
        settings = info["series"]
        args["series"] = {key: settings[key] for key in SERIES_ARGS if key in settings}
    return args


def bundle_network(model: nn.Module, info: dict) -> BundleClassifier:
    """A :class:`BundleClassifier` built from :func:`network_args` holding ``model``'s weights (in eval mode).

    Raises:
        ValueError: when the weights do not fit the network the arguments build (a model file
            whose settings do not describe its weights).
    """
    network = BundleClassifier(**network_args(info))
    try:
        network.model.load_state_dict(model.state_dict())
    except RuntimeError as err:
        raise ValueError(f"the bundle network built from {network_args(info)} does not fit the model's weights: "
                         f"{str(err)[:300]}") from None
    return network.eval()
