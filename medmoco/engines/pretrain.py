"""MoCo pretraining as a PyTorch-Ignite engine, on one CPU, one GPU, or DDP over ranks/nodes.

``training(local_rank, config)`` follows the ignite examples' shape: small named factories
(:func:`get_dataflow`, :func:`initialize`, :func:`create_pretrainer`) and rank handling in one
place. It runs under ``idist.Parallel`` (see ``pipelines/pretrain.py``), which initialises
torch.distributed when launched by torchrun or srun and is a no-op otherwise.

Why a plain ignite ``Engine`` and not MONAI's ``SupervisedTrainer``: the MoCo step takes two
views, owns a queue and has no label; MONAI's ``Trainer`` would be subclassed only to override
``_iteration``, and its AMP path assumes CUDA's GradScaler, while bf16 autocast must run on CPU
too. The data side is MONAI (``monai.data.DataLoader``, MONAI transforms).
"""
from __future__ import annotations

import glob
import logging
import math
import os
import random
import re
import time
import warnings
from contextlib import nullcontext

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver

from ..config import PretrainConfig
from ..data.datasets import CacheSliceDataset, ContrastiveDataset, EpochSampler
from ..models import build_moco, check_queue_batch
from ..transforms.views import BatchViewAugment, TwoViews, monai_view_transform, view_seed

log = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "checkpoint"


class RNGState:
    """torch / numpy / python RNG states as a checkpointable object (tensors and ints only, so the
    checkpoint loads with ``weights_only=True``)."""

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        version, internal, gauss = random.getstate()
        return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
                "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_cached": float(cached),
                "python": torch.tensor(internal, dtype=torch.int64), "python_version": int(version)}

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                             state["numpy_has_gauss"], state["numpy_cached"]))
        random.setstate((state["python_version"], tuple(int(v) for v in state["python"].tolist()), None))


def device_for(config: PretrainConfig) -> torch.device:
    if config.device:
        return torch.device(config.device)
    return idist.device()


def amp_context(config: PretrainConfig, device: torch.device):
    """bf16 autocast (CPU and CUDA) or fp16 (CUDA, with a GradScaler); ``none`` = fp32."""
    if config.amp == "none":
        return nullcontext()
    dtype = torch.bfloat16 if config.amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def get_dataflow(config: PretrainConfig, cache):
    """Loader over the pretraining splits. ``batch_size`` is per process; ``drop_last`` keeps
    every batch full, so the queue assert cannot fire on a short last batch."""
    from monai.data import DataLoader

    indices = np.concatenate([cache.indices(split) for split in config.splits])
    if len(indices) == 0:
        raise ValueError(f"cache {cache.root}: splits {config.splits} hold no images")
    base = CacheSliceDataset(cache, np.sort(indices), context=config.context)
    views = None if config.augment.on_device else TwoViews(monai_view_transform(config.augment, config.image_size))
    dataset = ContrastiveDataset(base, views, seed=config.seed)
    world, rank = idist.get_world_size(), idist.get_rank()
    limit = config.max_iters_per_epoch * config.batch_size if config.max_iters_per_epoch else 0
    sampler = EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=config.seed,
                           drop_last=True, limit=limit)
    if len(sampler) < config.batch_size:
        raise ValueError(f"{len(sampler)} images per rank are fewer than batch_size {config.batch_size}")
    on_cuda = device_for(config).type == "cuda"
    return DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, num_workers=config.workers,
                      pin_memory=config.pin_memory and on_cuda, persistent_workers=config.workers > 0,
                      drop_last=True)


def in_channels(config: PretrainConfig, cache) -> int:
    return len(cache.metadata["windows"]) * (2 * config.context + 1)


def initialize(config: PretrainConfig, cache, steps_per_epoch: int):
    """Model (DDP-wrapped when world size > 1), optimizer, lr scheduler and GradScaler."""
    device = device_for(config)
    moco_cfg = config.moco
    model = build_moco(moco_cfg.arch, in_channels(config, cache), moco_cfg.dim, moco_cfg.K, moco_cfg.m,
                       moco_cfg.temperature, moco_cfg.use_mlp, moco_cfg.bn_splits).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    global_batch = config.batch_size * idist.get_world_size()
    lr = config.optim.lr * global_batch / 256.0
    params = [p for p in model.encoder_q.parameters() if p.requires_grad]
    if config.optim.name == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr, momentum=config.optim.momentum,
                                    weight_decay=config.optim.weight_decay)
    else:
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=config.optim.weight_decay)
    epochs, optim_cfg = config.epochs, config.optim

    def factor(epoch: int) -> float:  # stepped once per epoch, as the reference does
        if optim_cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
        if optim_cfg.schedule == "step":
            return optim_cfg.gamma ** sum(epoch >= m for m in optim_cfg.milestones)
        return 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp == "fp16" and device.type == "cuda")
    if idist.get_world_size() > 1:
        # broadcast_buffers=False: DDP must not re-send the 65536-key queue every step.
        model = idist.auto_model(model, sync_bn=False, broadcast_buffers=False)
    return model, optimizer, scheduler, scaler, lr


def create_pretrainer(model, optimizer, scaler, config: PretrainConfig) -> Engine:
    """The MoCo step: two views -> logits (N x (1+K)) -> cross-entropy -> SGD/Adam step."""
    device = device_for(config)
    criterion = torch.nn.CrossEntropyLoss()
    augment = BatchViewAugment(config.augment, config.image_size) if config.augment.on_device else None
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format

    def step(engine: Engine, batch: dict) -> dict:
        model.train()
        if augment is not None:
            images = batch["image"].to(device, non_blocking=True)
            generator = torch.Generator(device=device)
            generator.manual_seed(view_seed(config.seed + idist.get_rank(), engine.state.epoch, engine.state.iteration))
            im_q, im_k = augment(images, generator), augment(images, generator)
        else:
            im_q = batch["view1"].to(device, non_blocking=True)
            im_k = batch["view2"].to(device, non_blocking=True)
        im_q = im_q.contiguous(memory_format=memory_format)
        im_k = im_k.contiguous(memory_format=memory_format)
        with amp_context(config, device):
            logits, labels = model(im_q, im_k)
            loss = criterion(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        accuracy = (logits.argmax(dim=1) == 0).float().mean()
        return {"loss": loss.item(), "acc": accuracy.item(), "images": im_q.shape[0]}

    trainer = Engine(step)
    _attach_epoch_stats(trainer)
    return trainer


def _attach_epoch_stats(trainer: Engine) -> None:
    """Per-epoch mean loss/accuracy (averaged over ranks), images/s and the data-wait fraction:
    the time the step waited for the loader divided by the whole iteration time. It is the
    figure that says whether the GPU starves (healthy: a few percent)."""
    clock = {}

    @trainer.on(Events.EPOCH_STARTED)
    def _reset(engine):
        engine.state.stats = {"loss": 0.0, "acc": 0.0, "n": 0, "wait": 0.0, "step": 0.0, "images": 0}
        clock["epoch"] = time.perf_counter()

    @trainer.on(Events.GET_BATCH_STARTED)
    def _wait_start(engine):
        clock["wait"] = time.perf_counter()

    @trainer.on(Events.GET_BATCH_COMPLETED)
    def _wait_end(engine):
        engine.state.stats["wait"] += time.perf_counter() - clock["wait"]
        clock["step"] = time.perf_counter()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _accumulate(engine):
        s, out = engine.state.stats, engine.state.output
        s["step"] += time.perf_counter() - clock["step"]
        s["loss"] += out["loss"]
        s["acc"] += out["acc"]
        s["images"] += out["images"]
        s["n"] += 1

    @trainer.on(Events.EPOCH_COMPLETED)
    def _summarise(engine):
        s = engine.state.stats
        totals = torch.tensor([s["loss"], s["acc"], float(s["n"]), float(s["images"])], dtype=torch.float64)
        totals = idist.all_reduce(totals)  # a collective: every rank calls it
        seconds = time.perf_counter() - clock["epoch"]
        engine.state.epoch_metrics = {
            "epoch_loss": float(totals[0] / max(totals[2], 1)),
            "epoch_acc": float(totals[1] / max(totals[2], 1)),
            "images_per_s": float(totals[3]) / max(seconds, 1e-9),
            "data_wait_fraction": s["wait"] / max(s["wait"] + s["step"], 1e-9),
        }


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str) -> list[str]:
    """Checkpoints of a run, newest (highest epoch) first."""
    paths = glob.glob(os.path.join(checkpoint_dir(run_dir), f"{CHECKPOINT_PREFIX}_*.pt"))

    def epoch_of(path: str) -> int:
        match = re.search(r"_(\d+)\.pt$", path)
        return int(match.group(1)) if match else -1

    return sorted(paths, key=epoch_of, reverse=True)


def load_checkpoint_file(path: str) -> dict:
    """``torch.load(weights_only=True)``: a checkpoint holds tensors and plain values only."""
    return torch.load(path, map_location="cpu", weights_only=True)


def find_resume_checkpoint(resume: str, run_dir: str) -> tuple[str | None, dict | None]:
    """``auto``: the newest readable checkpoint of ``run_dir`` (a corrupt or truncated one is
    skipped with a warning); a path: that file. Returns (path, loaded state) or (None, None)."""
    if not resume:
        return None, None
    candidates = list_checkpoints(run_dir) if resume == "auto" else [resume]
    if resume != "auto" and not os.path.isfile(resume):
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
    for path in candidates:
        try:
            return path, load_checkpoint_file(path)
        except Exception as err:
            if resume != "auto":
                raise ValueError(f"--resume {path}: unreadable checkpoint ({str(err)[:200]})") from None
            warnings.warn(f"checkpoint {path} is unreadable ({str(err)[:120]}); trying the previous one")
    return None, None


def attach_checkpointing(trainer: Engine, to_save: dict, config: PretrainConfig) -> Checkpoint:
    """Every epoch, keep the last N. Built on every rank; only rank 0 writes (ignite#2035).

    ``DiskSaver(atomic=True)`` writes ``tmp*`` beside the checkpoints and renames it; a job killed
    during a save leaves that file behind (hundreds of MB for a ResNet-50 with its queue), so
    rank 0 removes such leftovers before the first save.
    """
    folder = checkpoint_dir(config.run_dir)
    if idist.get_rank() == 0 and os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith("tmp") and not name.endswith(".pt"):
                os.remove(os.path.join(folder, name))
    saver = DiskSaver(folder, require_empty=False, atomic=True)
    handler = Checkpoint(to_save, saver, filename_prefix=CHECKPOINT_PREFIX, n_saved=config.keep_checkpoints,
                         global_step_transform=lambda engine, _: engine.state.epoch,
                         filename_pattern="{filename_prefix}_{global_step}.{ext}")
    trainer.add_event_handler(Events.EPOCH_COMPLETED, handler)
    return handler
