"""Two random views of a multi-window CT slice for MoCo.

MoCo v2's aug+ is RandomResizedCrop(scale 0.2-1), colour jitter, grayscale, Gaussian blur
(sigma 0.1-2 at 224 px) and horizontal flip. Colour jitter and grayscale do not fit multi-window
CT (each channel is a window of one HU image), so intensity changes are made per window:
contrast/gamma, scale and shift; blur and noise are kept (../shared/REFERENCE.md section 3).

Two paths make the same kinds of views:

* :func:`monai_view_transform`: MONAI dictionary transforms, run per sample in loader workers.
  MONAI draws one random state per call for all keys, so the two views are two calls of one
  ``Compose`` (:class:`TwoViews`), each call drawing fresh parameters.
* :class:`BatchViewAugment`: the same augmentation on whole uint8 batches on the training device
  (one fused crop+resize+flip by ``grid_sample``), for nodes where CPU workers cannot feed the
  GPU. MONAI's transforms work per sample, hence this small torch module.

Both are deterministic functions of (seed, epoch, sample or iteration): a resumed run draws the
same views as an uninterrupted one, whatever the number of workers.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import AugmentConfig  # noqa: F401 (its home is the config schema; imported from here too)


def monai_view_transform(aug: AugmentConfig, size: int, key: str = "image"):
    """A MONAI ``Compose`` making one view of ``{key: uint8 (C, H, W)}`` as float32 (C, size, size)."""
    from monai.transforms import (Compose, EnsureTyped, RandAdjustContrastd, RandFlipd, RandGaussianNoised,
                                  RandGaussianSmoothd, RandScaleCropd, RandScaleIntensityd, RandShiftIntensityd,
                                  Resized, ScaleIntensityRanged)

    blur = tuple(s * size / 224.0 for s in aug.blur_sigma)
    side_low = math.sqrt(aug.crop_scale[0])
    return Compose([
        # Crop while still uint8 (a slice, no copy); float only from the resize on.
        RandScaleCropd(keys=key, roi_scale=side_low, max_roi_scale=math.sqrt(aug.crop_scale[1]), random_size=True),
        EnsureTyped(keys=key, dtype=torch.float32, track_meta=False),
        Resized(keys=key, spatial_size=(size, size), mode="bilinear", anti_aliasing=False),
        ScaleIntensityRanged(keys=key, a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0),
        RandFlipd(keys=key, prob=aug.flip_prob, spatial_axis=1),
        RandScaleIntensityd(keys=key, factors=aug.intensity_scale, prob=aug.intensity_prob, channel_wise=True),
        RandShiftIntensityd(keys=key, offsets=aug.intensity_shift, prob=aug.intensity_prob, channel_wise=True),
        RandAdjustContrastd(keys=key, gamma=tuple(aug.gamma), prob=aug.gamma_prob),
        RandGaussianSmoothd(keys=key, sigma_x=blur, sigma_y=blur, prob=aug.blur_prob),
        RandGaussianNoised(keys=key, prob=aug.noise_prob, std=aug.noise_std),
    ])


def plain_tensor(x) -> torch.Tensor:
    """A MONAI transform's output as a plain ``torch.Tensor``.

    MONAI returns ``MetaTensor``s; one that reaches the network sends every layer's every op
    through ``MetaTensor.__torch_function__``, which made a CPU training step ~2x slower here
    (measured: 46 of 88 s of a fine-tuning trial). The metadata is not used past the transforms.
    """
    return torch.as_tensor(x).as_subclass(torch.Tensor)


class TwoViews:
    """Two independent views of one sample: two calls of one MONAI Compose (TwoCrops style)."""

    def __init__(self, transform, key: str = "image"):
        self.transform = transform
        self.key = key

    def set_random_state(self, seed: int) -> None:
        self.transform.set_random_state(seed=seed)

    def __call__(self, image) -> dict:
        view1 = self.transform({self.key: image})[self.key]
        view2 = self.transform({self.key: image})[self.key]
        return {"view1": plain_tensor(view1), "view2": plain_tensor(view2)}


class BatchViewAugment(nn.Module):
    """Batched views on the device: uint8 (N, C, H, W) -> float (N, C, size, size).

    Per sample: random resized crop (area ``crop_scale``, aspect 3/4-4/3) with horizontal flip as
    one affine ``grid_sample``; per-window scale and shift; gamma; Gaussian blur (separable,
    per-sample sigma); Gaussian noise. Random numbers come from the ``generator`` passed in.
    """

    def __init__(self, aug: AugmentConfig, size: int):
        super().__init__()
        self.aug = aug
        self.size = size
        self.max_sigma = aug.blur_sigma[1] * size / 224.0
        self.radius = max(1, int(math.ceil(3 * self.max_sigma)))

    def _u(self, n: int, low: float, high: float, g: torch.Generator, device) -> torch.Tensor:
        return torch.rand(n, generator=g, device=device) * (high - low) + low

    def forward(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        aug, g = self.aug, generator
        n, c = images.shape[:2]
        device = images.device
        x = images.float().div_(255.0)
        # Crop + resize + flip: sample area and log-aspect, place the box inside the image.
        area = self._u(n, aug.crop_scale[0], aug.crop_scale[1], g, device)
        log_ratio = self._u(n, math.log(3 / 4), math.log(4 / 3), g, device)
        ratio = torch.exp(log_ratio)
        w = torch.sqrt(area * ratio).clamp(max=1.0)
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (torch.rand(n, generator=g, device=device) * 2 - 1) * (1 - w)
        cy = (torch.rand(n, generator=g, device=device) * 2 - 1) * (1 - h)
        flip = torch.where(torch.rand(n, generator=g, device=device) < aug.flip_prob, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3, device=device)
        theta[:, 0, 0] = w * flip
        theta[:, 0, 2] = cx
        theta[:, 1, 1] = h
        theta[:, 1, 2] = cy
        grid = F.affine_grid(theta, [n, c, self.size, self.size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        # Per-window intensity.
        on = (torch.rand(n, 1, 1, 1, generator=g, device=device) < aug.intensity_prob).float()
        scale = 1 + (torch.rand(n, c, 1, 1, generator=g, device=device) * 2 - 1) * aug.intensity_scale * on
        shift = (torch.rand(n, c, 1, 1, generator=g, device=device) * 2 - 1) * aug.intensity_shift * on
        x = x * scale + shift
        gamma_on = torch.rand(n, 1, 1, 1, generator=g, device=device) < aug.gamma_prob
        gamma = self._u(n, aug.gamma[0], aug.gamma[1], g, device).view(n, 1, 1, 1)
        low = x.amin(dim=(2, 3), keepdim=True)
        span = (x.amax(dim=(2, 3), keepdim=True) - low).clamp(min=1e-6)
        x = torch.where(gamma_on, ((x - low) / span).pow(gamma) * span + low, x)
        # Blur: per-sample sigma (a delta kernel where the sample is not blurred).
        sigma = self._u(n, aug.blur_sigma[0] * self.size / 224.0, self.max_sigma, g, device)
        blur_on = torch.rand(n, generator=g, device=device) < aug.blur_prob
        taps = torch.arange(-self.radius, self.radius + 1, device=device, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (taps[None] / sigma[:, None]) ** 2)
        kernel = kernel / kernel.sum(dim=1, keepdim=True)
        delta = (taps == 0).float().expand(n, -1)
        kernel = torch.where(blur_on[:, None], kernel, delta).repeat_interleave(c, dim=0)  # (N*C, taps)
        flat = x.reshape(1, n * c, self.size, self.size)
        flat = F.pad(flat, (self.radius,) * 4, mode="reflect")
        flat = F.conv2d(flat, kernel.view(n * c, 1, 1, -1), groups=n * c)
        flat = F.conv2d(flat, kernel.view(n * c, 1, -1, 1), groups=n * c)
        x = flat.view(n, c, self.size, self.size)
        noise_on = (torch.rand(n, 1, 1, 1, generator=g, device=device) < aug.noise_prob).float()
        x = x + torch.randn(x.shape, generator=g, device=device) * aug.noise_std * noise_on
        return x


def view_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for one (run seed, epoch, sample) triple (MONAI's RandomState takes < 2**32)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])
