"""Pretraining speed: MoCo step vs supervised step, view pipelines, data-wait fraction.

    python benchmarks/pretrain.py [--arch resnet18] [--size 128] [--batch 32] [--device cpu]

Each figure runs the project and a baseline side by side in this one process and prints the ratio:
  1. MoCo step (two encoders, queue, shuffle) vs a plain supervised step (same backbone, batch,
     optimizer, cross-entropy): images/s ratio, target >= 0.7 (the ceiling is ~0.75: the key
     forward costs ~1/3 of a forward+backward).
  2. View pipeline, one core, per image pair: medmoco's MONAI Compose (crop while uint8, float
     from the resize on) and the batched device path (one fused crop+resize+flip grid_sample) vs a
     naive per-sample MONAI Compose (float first, then the same transforms): target >= 2x.
  3. Data-wait fraction of a short run under configs/pretrain/cpu_demo.yaml (time the step waited
     for the loader / step time): the figure that tells whether the GPU starves.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import warnings

import numpy as np

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _time(fn, n: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def step_ratio(arch: str, size: int, batch: int, device: str, iters: int) -> None:
    import torch

    from medmoco.models import build_moco
    from medmoco.models.backbones import create_backbone

    x1 = torch.randn(batch, 3, size, size, device=device)
    x2 = torch.randn(batch, 3, size, size, device=device)
    moco = build_moco(arch, 3, dim=128, K=batch * 64, m=0.999, T=0.2, mlp=True, bn_splits=1).to(device)
    opt_m = torch.optim.SGD(moco.encoder_q.parameters(), lr=0.01, momentum=0.9)
    backbone, feats = create_backbone(arch, 3)
    sup = torch.nn.Sequential(backbone, torch.nn.Linear(feats, 6)).to(device)
    opt_s = torch.optim.SGD(sup.parameters(), lr=0.01, momentum=0.9)
    target = torch.randint(0, 6, (batch,), device=device)
    ce = torch.nn.CrossEntropyLoss()

    def moco_step():
        logits, labels = moco(x1, x2)
        loss = ce(logits, labels)
        opt_m.zero_grad(set_to_none=True)
        loss.backward()
        opt_m.step()

    def sup_step():
        loss = ce(sup(x1), target)
        opt_s.zero_grad(set_to_none=True)
        loss.backward()
        opt_s.step()

    t_moco, t_sup = [], []
    for _ in range(3):  # interleaved rounds so that drift hits both
        t_moco.append(_time(moco_step, iters))
        t_sup.append(_time(sup_step, iters))
    m, s = batch / min(t_moco), batch / min(t_sup)
    print(f"1. step  {arch} {size}px batch {batch} on {device}: MoCo {m:7.1f} img/s, supervised {s:7.1f} img/s,"
          f" ratio {m / s:.2f} (target >= 0.70, ceiling ~0.75)")


def view_ratio(size: int, n: int) -> None:
    import torch
    from monai.transforms import (Compose, EnsureTyped, RandAdjustContrastd, RandFlipd, RandGaussianNoised,
                                  RandGaussianSmoothd, RandScaleCropd, RandScaleIntensityd, RandShiftIntensityd,
                                  Resized, ScaleIntensityRanged)

    from medmoco.transforms.views import AugmentConfig, BatchViewAugment, monai_view_transform

    torch.set_num_threads(1)
    aug = AugmentConfig()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (3, 256, 256), dtype=np.uint8) for _ in range(n)]
    blur = tuple(s * size / 224.0 for s in aug.blur_sigma)
    naive = Compose([  # the usual per-sample pipeline: float and [0, 1] first, then crop and resize
        EnsureTyped(keys="image", dtype=torch.float32, track_meta=True),
        ScaleIntensityRanged(keys="image", a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0),
        RandScaleCropd(keys="image", roi_scale=math.sqrt(aug.crop_scale[0]), max_roi_scale=1.0, random_size=True),
        Resized(keys="image", spatial_size=(size, size), mode="bilinear"),
        RandFlipd(keys="image", prob=aug.flip_prob, spatial_axis=1),
        RandScaleIntensityd(keys="image", factors=aug.intensity_scale, prob=aug.intensity_prob, channel_wise=True),
        RandShiftIntensityd(keys="image", offsets=aug.intensity_shift, prob=aug.intensity_prob, channel_wise=True),
        RandAdjustContrastd(keys="image", gamma=tuple(aug.gamma), prob=aug.gamma_prob),
        RandGaussianSmoothd(keys="image", sigma_x=blur, sigma_y=blur, prob=aug.blur_prob),
        RandGaussianNoised(keys="image", prob=aug.noise_prob, std=aug.noise_std),
    ])
    ours = monai_view_transform(aug, size)
    batched = BatchViewAugment(aug, size)
    gen = torch.Generator().manual_seed(0)
    stack = torch.from_numpy(np.stack(images))

    def per_sample(t):
        def run():
            for im in images:
                t({"image": im})
                t({"image": im})
        return run

    def device_batch():
        batched(stack, gen)
        batched(stack, gen)

    rates = {}
    for _ in range(2):
        for name, fn in (("naive MONAI", per_sample(naive)), ("medmoco MONAI", per_sample(ours)),
                         ("medmoco batched", device_batch)):
            rates[name] = max(rates.get(name, 0.0), n / _time(fn, 2))
    base = rates["naive MONAI"]
    for name, rate in rates.items():
        print(f"2. views {name:16s}: {rate:8.1f} pairs/s/core  ratio {rate / base:5.2f}"
              + ("  (target >= 2x)" if name != "naive MONAI" else ""))


def data_wait(workers: int) -> None:
    import yaml

    from dicom_preprocess.config import PreprocessConfig
    from dicom_preprocess.job import run_preprocess
    from dicom_preprocess.synthetic import synthesize
    from medmoco.config import PretrainConfig, load_config
    from pipelines.pretrain import training

    work = tempfile.mkdtemp(prefix="medmoco-bench-")
    arch = synthesize(os.path.join(work, "archive"), patients=8, seed=0)
    run_preprocess(PreprocessConfig(input=arch.images_dir, labels=arch.labels_csv, out=os.path.join(work, "cache"),
                                    size=256, workers=2), progress=False)
    root = os.path.join(os.path.dirname(__file__), "..", "configs", "pretrain", "cpu_demo.yaml")
    overrides = {"cache": os.path.join(work, "cache"), "run_dir": os.path.join(work, "run"), "epochs": 2,
                 "knn_every": 0, "progress": False, "splits": ["unsupervised", "train", "test"],
                 "tracking": {"enabled": False}}
    if workers >= 0:
        overrides["workers"] = workers
    config = load_config(PretrainConfig, root, overrides)
    result = training(0, config)
    last = result["history"][-1]
    print(f"3. data-wait fraction, cpu_demo.yaml (workers={config.workers}, {config.image_size}px, batch "
          f"{config.batch_size}): {last['data_wait_fraction']:.2f} of step time; {last['images_per_s']:.1f} img/s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--views", type=int, default=64)
    parser.add_argument("--workers", type=int, default=-1, help="-1: the config's default")
    parser.add_argument("--skip", default="", help="comma list of 1,2,3 to skip")
    args = parser.parse_args()
    skip = set(args.skip.split(","))
    if "1" not in skip:
        step_ratio(args.arch, args.size, args.batch, args.device, args.iters)
    if "2" not in skip:
        view_ratio(args.size, args.views)
    if "3" not in skip:
        data_wait(args.workers)


if __name__ == "__main__":
    main()
