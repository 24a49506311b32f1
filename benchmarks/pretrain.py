"""Pretraining speed: the MoCo step against a supervised step, end to end, and the loader's feed rate.

    python benchmarks/pretrain.py [--arch resnet18] [--size 112] [--batch 32] [--iters 20]
    python benchmarks/pretrain.py --e2e [--device cuda|cpu] [--arch resnet50] [--size 224] [--batch 128]
                                  [--iters 50] [--warmup 10] [--cache DIR] [--workers 8]
    python benchmarks/pretrain.py --feed [--images 20000] [--size 224] [--cache-size 256]

Default: the MoCo step (two encoders, queue, split BN) against a supervised step of the same
backbone, batch and optimizer on the same tensors, rounds interleaved, the ratio with three
decimals (target >= 0.70; ceiling ~0.75, the key encoder's forward costing ~1/3 of a step), and
the per-core rate of the two view paths against a naive per-sample MONAI pipeline.

--e2e: the real pretraining engine (``medmoco.engines.pretrain``'s get_dataflow / initialize /
create_pretrainer: the code path of `medmoco pretrain`, MLflow off) on a cache of RSNA-size slices
(a synthetic one, or --cache), a warm-up and then --iters timed iterations for each setting: view
path (loader workers with MONAI transforms, or batched views on the device), AMP (none, bf16; fp16
on CUDA) and channels_last (off, on). Columns: image pairs/s, data-wait fraction of the iteration,
step time (median, p90), peak memory (CUDA: allocated; CPU: resident set), loader workers; beside
each AMP/channels_last setting, the same backbone's plain supervised step (one view, no key
encoder) as the ceiling, and the ratio. Target on one H100 with bf16 + channels_last + device
views: data-wait < 5% and >= 1,500 pairs/s.

--feed: how many image pairs per second one CPU core hands to the GPU in each view path (read
uint8 from a memory-mapped cache of --images distinct slices, collate; pin when CUDA is there; for
the worker path also the two MONAI views), and so how many loader workers each path needs per GPU
to feed 1,500 pairs/s.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
TARGET_PAIRS_PER_S = 1500


def _time(fn, n: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


# --- the step ratio and the view paths (CPU figures of README section 3) ----------------------------

def step_ratio(arch: str, size: int, batch: int, device: str, iters: int, rounds: int = 5) -> float:
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
    for _ in range(rounds):  # interleaved rounds so that drift hits both
        t_moco.append(_time(moco_step, iters))
        t_sup.append(_time(sup_step, iters))
    m, s = batch / statistics.median(t_moco), batch / statistics.median(t_sup)
    spread = [round(batch / a / (batch / b), 3) for a, b in zip(t_moco, t_sup)]
    print(f"1. step  {arch} {size}px batch {batch} on {device}, {rounds} rounds x {iters} iterations: MoCo "
          f"{m:7.1f} img/s, supervised {s:7.1f} img/s, ratio {m / s:.3f} (rounds: {spread}; target >= 0.700, "
          "ceiling ~0.75)")
    return m / s


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
        print(f"2. views {name:16s}: {rate:8.1f} pairs/s/core  ratio {rate / base:6.3f}"
              + ("  (target >= 2x)" if name != "naive MONAI" else ""))


# --- end to end -----------------------------------------------------------------------------------

def _reset_peak_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: writing 5 resets the process's peak resident set (VmHWM)
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            pass


def _peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def moco_row(cache, device: str, arch: str, size: int, batch: int, iters: int, warmup: int, on_device: bool,
             amp: str, channels_last: bool, workers: int) -> dict:
    """One setting through the real engine: pairs/s, data wait, step times, peak memory."""
    import torch
    from ignite.engine import Events

    from medmoco.config import PretrainConfig, from_mapping
    from medmoco.engines.pretrain import create_pretrainer, get_dataflow, initialize

    queue = batch * max(1, 65536 // batch) if batch <= 65536 else batch
    config = from_mapping(PretrainConfig, {
        "cache": cache.root, "run_dir": tempfile.mkdtemp(prefix="medmoco-e2e-"), "splits": ["unsupervised"],
        "image_size": size, "epochs": 1, "batch_size": batch, "max_iters_per_epoch": warmup + iters,
        # one process: split BatchNorm stands in for shuffle-BN, as `medmoco pretrain` runs on one GPU
        "moco": {"version": "v2", "arch": arch, "K": queue,
                 "bn_splits": next(s for s in (8, 4, 2, 1) if batch % s == 0 and (batch // s >= 16 or s == 1))},
        "augment": {"on_device": on_device}, "amp": amp, "channels_last": channels_last, "workers": workers,
        "device": device, "knn_every": 0, "progress": False, "tracking": {"enabled": False}})
    dev = torch.device(device)
    loader = get_dataflow(config, cache)
    model, optimizer, _, scaler, _ = initialize(config, cache)
    trainer = create_pretrainer(model, optimizer, scaler, config)
    marks, waits, steps = {}, [], []

    @trainer.on(Events.GET_BATCH_STARTED)
    def _wait_start(engine):
        marks["wait"] = time.perf_counter()

    @trainer.on(Events.GET_BATCH_COMPLETED)
    def _wait_end(engine):
        marks["step"] = time.perf_counter()
        if engine.state.iteration >= warmup:  # GET_BATCH of iteration i fires with state.iteration == i - 1
            waits.append(marks["step"] - marks["wait"])

    @trainer.on(Events.ITERATION_COMPLETED)
    def _step_end(engine):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if engine.state.iteration > warmup:
            steps.append(time.perf_counter() - marks["step"])
        if engine.state.iteration == warmup:
            _reset_peak_memory(dev)

    trainer.run(loader, max_epochs=1)
    total = [w + s for w, s in zip(waits, steps)]
    return {"pairs_per_s": batch * len(total) / sum(total), "data_wait": sum(waits) / sum(total),
            "step_median_ms": 1000 * statistics.median(total),
            "step_p90_ms": 1000 * float(np.percentile(total, 90)), "peak_mb": _peak_memory_mb(dev)}


def supervised_ceiling(device: str, arch: str, size: int, batch: int, iters: int, warmup: int, amp: str,
                       channels_last: bool) -> float:
    """Images/s of the same backbone's plain supervised step (one view, no key encoder), the
    batch already on the device: what a pretraining step could at most approach."""
    import torch

    from medmoco.engines.common import autocast
    from medmoco.models.backbones import create_backbone

    dev = torch.device(device)
    backbone, feats = create_backbone(arch, 3)
    model = torch.nn.Sequential(backbone, torch.nn.Linear(feats, 6)).to(dev)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16" and dev.type == "cuda")
    x = torch.rand(batch, 3, size, size, device=dev).contiguous(memory_format=memory_format)
    y = torch.randint(0, 6, (batch,), device=dev)

    def step():
        with autocast(amp, dev):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return batch * iters / (time.perf_counter() - start)


def e2e(args) -> list[dict]:
    import torch

    from dicom_preprocess import open_cache
    from dicom_preprocess.synthetic import write_synthetic_cache

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    work = None
    cache_dir = args.cache
    if not cache_dir:
        work = tempfile.mkdtemp(prefix="medmoco-e2e-cache-")
        cache_dir = write_synthetic_cache(os.path.join(work, "cache"), args.cache_images, size=args.cache_size)
    cache = open_cache(cache_dir)
    amps = [a for a in args.amp.split(",") if a and (a != "fp16" or device.startswith("cuda"))]
    layouts = [flag == "on" for flag in args.channels_last.split(",") if flag]
    paths = [p for p in args.paths.split(",") if p]
    print(f"end to end on {name}: MoCo v2 {args.arch}, {args.size} px from a {cache.shape[-1]} px cache of "
          f"{len(cache)} slices, batch {args.batch}, {args.warmup} warm-up + {args.iters} timed iterations; "
          f"{args.workers} loader workers; torch {torch.__version__}")
    head = ("| view path | AMP | channels_last | pairs/s | data-wait | step median (ms) | step p90 (ms) | "
            "peak memory (MB) | workers | supervised img/s | MoCo/supervised |")
    print(head)
    print("|" + "---|" * 11)
    rows, ceilings = [], {}
    for amp in amps:
        for cl in layouts:
            ceilings[(amp, cl)] = supervised_ceiling(device, args.arch, args.size, args.batch, args.iters,
                                                     args.warmup, amp, cl)
            for path in paths:
                row = moco_row(cache, device, args.arch, args.size, args.batch, args.iters, args.warmup,
                               path == "device", amp, cl, args.workers)
                row.update({"path": path, "amp": amp, "channels_last": cl, "supervised": ceilings[(amp, cl)]})
                rows.append(row)
                print(f"| {'device views' if path == 'device' else 'worker MONAI views'} | {amp} | "
                      f"{'on' if cl else 'off'} | {row['pairs_per_s']:.1f} | {row['data_wait']:.3f} | "
                      f"{row['step_median_ms']:.1f} | {row['step_p90_ms']:.1f} | {row['peak_mb']:.0f} | "
                      f"{args.workers} | {row['supervised']:.1f} | {row['pairs_per_s'] / row['supervised']:.3f} |",
                      flush=True)
    if work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return rows


# --- the loader's feed rate ------------------------------------------------------------------------

def feed(args) -> dict:
    import torch
    from monai.data.utils import list_data_collate

    from dicom_preprocess import open_cache
    from dicom_preprocess.synthetic import write_synthetic_cache
    from medmoco.data.datasets import CacheSliceDataset, ContrastiveDataset
    from medmoco.transforms.views import AugmentConfig, TwoViews, monai_view_transform

    torch.set_num_threads(1)  # one loader worker is one process on one core
    work = None
    cache_dir = args.cache
    if not cache_dir:
        work = tempfile.mkdtemp(prefix="medmoco-feed-")
        start = time.perf_counter()
        cache_dir = write_synthetic_cache(os.path.join(work, "cache"), args.images, size=args.cache_size)
        print(f"synthetic cache: {args.images} distinct slices at {args.cache_size} px in "
              f"{time.perf_counter() - start:.0f} s")
    cache = open_cache(cache_dir)
    pin = torch.cuda.is_available()
    base = CacheSliceDataset(cache, np.arange(len(cache)))
    datasets = {"device views (uint8 batch; views on the GPU)": ContrastiveDataset(base, None),
                "worker views (two MONAI views per sample)":
                    ContrastiveDataset(base, TwoViews(monai_view_transform(AugmentConfig(), args.size)))}
    rng = np.random.default_rng(0)
    out = {}
    print(f"feed rate of one loader worker (one core), {args.batches} batches of {args.batch} random slices of "
          f"{len(cache)} ({cache.shape[-1]} px cache, views at {args.size} px), page cache warm, "
          f"{'pinned' if pin else 'not pinned (no CUDA here)'}")
    for name, dataset in datasets.items():
        order = rng.integers(0, len(cache), args.batches * args.batch)
        start = time.perf_counter()
        for b in range(args.batches):
            batch = list_data_collate([dataset[(0, int(i))] for i in order[b * args.batch : (b + 1) * args.batch]])
            if pin:
                batch = {k: v.pin_memory() for k, v in batch.items()}
        rate = args.batches * args.batch / (time.perf_counter() - start)
        need = math.ceil(TARGET_PAIRS_PER_S / rate)
        out[name] = {"pairs_per_s": rate, "workers_for_target": need}
        print(f"   {name:50s} {rate:9.1f} pairs/s per worker -> {need} workers to feed {TARGET_PAIRS_PER_S} pairs/s")
    if work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--e2e", action="store_true", help="the real engine, per setting (see above)")
    parser.add_argument("--feed", action="store_true", help="one loader worker's pairs/s per view path")
    parser.add_argument("--arch", default="")
    parser.add_argument("--size", type=int, default=0, help="view size (default 224; 112 for the step ratio)")
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--device", default="")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the step ratio")
    parser.add_argument("--views", type=int, default=64)
    parser.add_argument("--cache", default="", help="a cache to read (else a synthetic one is written)")
    parser.add_argument("--cache-images", dest="cache_images", type=int, default=2048)
    parser.add_argument("--cache-size", dest="cache_size", type=int, default=256)
    parser.add_argument("--images", type=int, default=20000, help="--feed: distinct slices of the synthetic cache")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--workers", type=int, default=4, help="--e2e: loader workers")
    parser.add_argument("--amp", default="none,bf16,fp16")
    parser.add_argument("--channels-last", dest="channels_last", default="off,on")
    parser.add_argument("--paths", default="workers,device")
    args = parser.parse_args()
    if args.e2e:
        args.arch, args.size, args.batch = args.arch or "resnet50", args.size or 224, args.batch or 128
        e2e(args)
    elif args.feed:
        args.size, args.batch = args.size or 224, args.batch or 64
        feed(args)
    else:
        arch, size, batch = args.arch or "resnet18", args.size or 112, args.batch or 32
        step_ratio(arch, size, batch, args.device or "cpu", args.iters, args.rounds)
        view_ratio(size, args.views)


if __name__ == "__main__":
    main()
