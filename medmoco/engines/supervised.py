"""Supervised fine-tuning and evaluation of the hemorrhage classifier (Ignite engines).

Same stack as pretraining: an ignite ``Engine`` for the step (bf16/fp16 AMP, channels_last,
DDP through ``ignite.distributed``), MONAI transforms and ``DataLoader`` on the data side,
ignite ``Checkpoint`` for resume. MONAI's ``SupervisedTrainer`` is not used for the same reason
as in :mod:`.pretrain`: its AMP path is CUDA-only, and the ``linear`` mode must put the backbone
in eval mode inside every step, which its ``_iteration`` does not allow without a subclass.

Evaluation runs over *every* image of a split: each rank predicts an interleaved share, padded to
equal length, and the shares are all-gathered and de-duplicated by cache row, so metrics under
DDP equal single-process metrics (no DistributedSampler padding leaks into the AUC).
"""
from __future__ import annotations

import logging
import math

import ignite.distributed as idist
import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine

from ..config import FinetuneConfig
from ..data.datasets import CacheSliceDataset, EpochSampler, LabeledDataset
from .pretrain import _attach_epoch_stats, amp_context, device_for

log = logging.getLogger(__name__)


def supervised_transform(config: FinetuneConfig, size: int, native: int):
    """MONAI Compose: uint8 (C, H, W) -> float [0, 1] (C, size, size) with light augmentation."""
    from monai.transforms import (Compose, EnsureTyped, RandAffined, RandFlipd, RandShiftIntensityd, Resized,
                                  ScaleIntensityRanged)

    aug = config.augment
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


def train_indices(cache, config: FinetuneConfig, extra: "pd.DataFrame | None" = None):  # noqa: F821
    """(rows, labels) used for training: the label fraction of the labeled train split (stratified
    on ``any``, seeded by ``subset_seed``) plus the slices of ``extra`` (labels from that CSV).

    Returns:
        rows (int64), labels float32 (N, 6), number of extra slices added, extra ids not in the cache.
    """
    from dicom_preprocess.splits import label_subset

    rows = cache.indices(config.train_split, labeled=True)
    if len(rows) == 0:
        raise ValueError(f"cache {cache.root}: split {config.train_split!r} has no labeled images")
    any_col = cache.manifest["any"].iloc[rows].reset_index(drop=True)
    keep = label_subset(any_col, config.label_fraction, config.subset_seed)
    rows = rows[keep]
    labels = cache.labels(rows)
    added, missing = 0, []
    if extra is not None and len(extra):
        position = {img: i for i, img in enumerate(cache.manifest["image_id"].to_numpy())}
        eval_rows = set(cache.indices(config.eval_split).tolist()) if config.eval_split else set()
        have = set(rows.tolist())
        new_rows, new_labels = [], []
        for image_id, values in zip(extra.index, extra.to_numpy(np.float32)):
            row = position.get(image_id)
            if row is None:
                missing.append(image_id)
            elif row not in have and row not in eval_rows:  # never train on the evaluation split
                new_rows.append(row)
                new_labels.append(values)
                have.add(row)
        if new_rows:
            rows = np.concatenate([rows, np.array(new_rows, dtype=np.int64)])
            labels = np.concatenate([labels, np.stack(new_labels)])
            added = len(new_rows)
    return rows, labels, added, missing


def get_train_loader(config: FinetuneConfig, cache, rows: np.ndarray, labels: np.ndarray, size: int):
    from monai.data import DataLoader

    base = CacheSliceDataset(cache, rows, context=config.context)
    dataset = LabeledDataset(base, supervised_transform(config, size, cache.shape[-1]), seed=config.seed,
                             labels=labels)
    world, rank = idist.get_world_size(), idist.get_rank()
    limit = config.max_iters_per_epoch * config.batch_size if config.max_iters_per_epoch else 0
    sampler = EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=config.seed,
                           drop_last=len(dataset) >= config.batch_size * world, limit=limit)
    on_cuda = device_for(config).type == "cuda"
    return DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, num_workers=config.workers,
                      pin_memory=config.pin_memory and on_cuda, persistent_workers=config.workers > 0)


def make_criterion(config: FinetuneConfig, device) -> "callable":
    """BCE with logits, weighted per class (default: any x2, as the competition metric), optional pos_weight."""
    weights = torch.tensor(config.class_weights, dtype=torch.float32, device=device)
    pos_weight = torch.tensor(config.pos_weight, dtype=torch.float32, device=device) if config.pos_weight else None

    def criterion(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(logits.float(), target, pos_weight=pos_weight, reduction="none")
        return (loss * weights).sum(dim=1).div(weights.sum()).mean()

    return criterion


def create_supervised_trainer(model, optimizer, scaler, config: FinetuneConfig) -> Engine:
    device = device_for(config)
    criterion = make_criterion(config, device)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    inner = getattr(model, "module", model)

    def step(engine: Engine, batch: dict) -> dict:
        model.train()
        if config.mode == "linear":
            inner.backbone.eval()  # MoCo-Freeze: BatchNorm statistics must not move
        x = batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
        y = batch["label"].to(device, non_blocking=True).float()
        with amp_context(config, device):
            logits = model(x)
        loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        acc = ((logits.detach() > 0).float() == y).float().mean()
        return {"loss": loss.item(), "acc": acc.item(), "images": x.shape[0]}

    trainer = Engine(step)
    _attach_epoch_stats(trainer)
    return trainer


@torch.no_grad()
def predict_rows(model, cache, rows: np.ndarray, context: int, size: int, device, batch_size: int = 64,
                 amp: str = "none") -> np.ndarray:
    """Sigmoid probabilities (len(rows), 6) of cache rows, computed over all ranks and gathered.

    Every rank must call it (it all-gathers). Rank r predicts rows[r::world] padded to equal length.
    """
    world, rank = idist.get_world_size(), idist.get_rank()
    n = len(rows)
    per_rank = int(math.ceil(n / world)) if n else 0
    mine = np.arange(rank, n, world)
    pad = per_rank - len(mine)
    positions = np.concatenate([mine, np.full(pad, -1, dtype=np.int64)]) if pad else mine
    inner = getattr(model, "module", model)
    was_training = inner.training
    inner.eval()
    out = []
    autocast = (torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
                if amp == "bf16" else torch.autocast(device_type="cuda", dtype=torch.float16) if amp == "fp16"
                else None)
    for start in range(0, len(positions), batch_size):
        chunk = positions[start : start + batch_size]
        take = np.where(chunk >= 0, chunk, mine[0] if len(mine) else 0)
        images = torch.from_numpy(np.stack([np.asarray(cache.stack(int(rows[p]), context)) for p in take]))
        x = prepare_images(images, size).to(device)
        if autocast is not None:
            with autocast:
                logits = inner(x)
        else:
            logits = inner(x)
        out.append(torch.sigmoid(logits.float()).cpu())
    inner.train(was_training)
    probs = torch.cat(out) if out else torch.zeros(0, 6)
    if world == 1:
        return probs.numpy()
    tagged = torch.cat([torch.as_tensor(positions, dtype=torch.float32)[:, None], probs], dim=1)
    gathered = idist.all_gather(tagged.to(idist.device())).cpu().numpy()
    gathered = gathered[gathered[:, 0] >= 0]
    result = np.zeros((n, probs.shape[1]), dtype=np.float32)
    result[gathered[:, 0].astype(np.int64)] = gathered[:, 1:]
    return result


def backbone_fingerprint(model) -> dict[str, torch.Tensor]:
    """A copy of every backbone parameter and buffer (for the ``linear`` mode's no-change check)."""
    inner = getattr(model, "module", model)
    return {k: v.detach().cpu().clone() for k, v in inner.backbone.state_dict().items()}


def changed_keys(before: dict[str, torch.Tensor], model) -> list[str]:
    now = backbone_fingerprint(model)
    return [k for k in before if not torch.equal(before[k], now[k])]
