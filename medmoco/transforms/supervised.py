"""Inputs of the classifier: light MONAI augmentation for training, and the one preparation every
inference path uses (evaluation, ``medmoco predict``, the registered MLflow model)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def supervised_transform(aug, size: int, native: int):
    """MONAI Compose: uint8 (C, H, W) -> float [0, 1] (C, size, size) with light augmentation.

    Args:
        aug: a :class:`medmoco.config.SupervisedAugmentConfig`.
        size: the model's input size; ``native``: the cache's.
    """
    from monai.transforms import (Compose, EnsureTyped, RandAffined, RandFlipd, RandShiftIntensityd, Resized,
                                  ScaleIntensityRanged)

    steps = [EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
             ScaleIntensityRanged(keys="image", a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0)]
    if size != native:
        steps.append(Resized(keys="image", spatial_size=(size, size), mode="area"))
    steps += [
        RandFlipd(keys="image", prob=aug.flip_prob, spatial_axis=1),
        RandAffined(keys="image", prob=aug.prob, rotate_range=(math.radians(aug.rotate_deg),),
                    scale_range=(aug.scale, aug.scale), padding_mode="zeros", mode="bilinear"),
        RandShiftIntensityd(keys="image", offsets=aug.intensity_shift, prob=aug.prob),
    ]
    return Compose(steps)


def prepare_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Evaluation input: uint8 (N, C, H, W) -> float [0, 1] at ``size`` (area resize when shrinking).
    The one function every inference path uses (evaluate, predict, the MLflow model)."""
    x = images.float().div_(255.0)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="area" if x.shape[-1] > size else "bilinear",
                          align_corners=None if x.shape[-1] > size else False)
    return x
