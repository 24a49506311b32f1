"""MoCo pretraining as a PyTorch-Ignite engine, on one CPU, one GPU, or DDP over ranks/nodes.

The ignite examples' small named factories (:func:`get_dataflow`, :func:`initialize`,
:func:`create_pretrainer`); ``pipelines/pretrain.py``'s ``training(local_rank, config)`` puts them
together on each rank (under :func:`medmoco.distributed.run_on_ranks`, which joins the process
group when launched by torchrun or srun and is a no-op otherwise).

Why a plain ignite ``Engine`` and not MONAI's ``SupervisedTrainer``: the MoCo step takes two
views, owns a queue and has no label; MONAI's ``Trainer`` would be subclassed only to override
``_iteration``, and its AMP path assumes CUDA's GradScaler, while bf16 autocast must run on CPU
too. The data side is MONAI (``monai.data.DataLoader``, MONAI transforms).
"""
from __future__ import annotations

import logging

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine

from ..config import PretrainConfig
from ..data.datasets import CacheSliceDataset, ContrastiveDataset, EpochSampler
from ..models import build_moco
from ..transforms.views import BatchViewAugment, TwoViews, monai_view_transform, view_seed
from .common import (EpochStatistics, attach_failpoints, autocast, build_optimizer_and_scheduler, device_for,
                     grad_scaler)

log = logging.getLogger(__name__)


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


def initialize(config: PretrainConfig, cache):
    """Model (DDP-wrapped when world size > 1), optimizer, per-epoch lr schedule, GradScaler, lr."""
    device = device_for(config)
    moco_cfg = config.moco
    model = build_moco(moco_cfg.arch, in_channels(config, cache), moco_cfg.dim, moco_cfg.K, moco_cfg.m,
                       moco_cfg.temperature, moco_cfg.use_mlp, moco_cfg.bn_splits).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.encoder_q.parameters() if p.requires_grad]
    optimizer, scheduler, lr = build_optimizer_and_scheduler(config.optim, params, config.epochs,
                                                             config.batch_size * idist.get_world_size())
    if idist.get_world_size() > 1:
        # broadcast_buffers=False: DDP must not re-send the 65536-key queue every step.
        model = idist.auto_model(model, sync_bn=False, broadcast_buffers=False)
    return model, optimizer, scheduler, grad_scaler(config.amp, device), lr


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
        with autocast(config.amp, device):
            logits, labels = model(im_q, im_k)
            loss = criterion(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        accuracy = (logits.argmax(dim=1) == 0).float().mean()
        return {"loss": loss.item(), "acc": accuracy.item(), "images": im_q.shape[0]}

    trainer = Engine(step)
    EpochStatistics(optimizer).attach(trainer)
    attach_failpoints(trainer)
    return trainer
