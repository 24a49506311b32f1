"""Supervised fine-tuning and evaluation of the hemorrhage classifier (ignite engines).

The ignite examples' factories: :func:`get_dataflow`, :func:`initialize`,
:func:`create_supervised_trainer` and :func:`create_evaluator`; ``pipelines/finetune.py`` puts them
together. Same stack as pretraining: bf16/fp16 AMP, channels_last, DDP through
``ignite.distributed``, MONAI transforms and ``DataLoader``, ignite ``Checkpoint`` for resume.
MONAI's ``SupervisedTrainer`` is not used for the same reason as in :mod:`.pretrain`: its AMP path
is CUDA-only, and the ``linear`` mode must put the backbone in eval mode inside every step, which
its ``_iteration`` does not allow without a subclass.

Evaluation runs over *every* image of a split: each rank predicts an interleaved share, padded to
equal length, and the shares are all-gathered and put back in row order, so metrics under DDP
equal single-process metrics (no DistributedSampler padding leaks into the AUC).
"""
from __future__ import annotations

import logging
import math

import ignite.distributed as idist
import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from torch.utils.data import Dataset

from ..config import FinetuneConfig
from ..data.datasets import CacheSliceDataset, EpochSampler, LabeledDataset
from ..models import build_classifier
from ..transforms.supervised import prepare_images, supervised_transform
from .common import (EpochStatistics, attach_failpoints, autocast, build_optimizer_and_scheduler, device_for,
                     grad_scaler)

log = logging.getLogger(__name__)


def input_settings(config: FinetuneConfig, payload: dict | None, cache) -> tuple[str, int, int, int]:
    """(arch, context, image size, input channels) of the classifier: the config's, else the
    pretrained file's, else the defaults (resnet50, no context, the cache's size)."""
    meta = (payload or {}).get("meta", {})
    arch = config.arch or (payload or {}).get("arch", "resnet50")
    context = config.context if config.context >= 0 else int(meta.get("context", 0))
    size = config.image_size or int(meta.get("image_size", 0)) or cache.shape[-1]
    return arch, context, size, len(cache.metadata["windows"]) * (2 * context + 1)


def get_dataflow(config: FinetuneConfig, cache, rows: np.ndarray, labels: np.ndarray, context: int, size: int):
    """The training loader over ``rows`` (per-sample MONAI augmentation; ``batch_size`` per process)."""
    from monai.data import DataLoader

    base = CacheSliceDataset(cache, rows, context=context)
    dataset = LabeledDataset(base, supervised_transform(config.augment, size, cache.shape[-1]), seed=config.seed,
                             labels=labels)
    world, rank = idist.get_world_size(), idist.get_rank()
    limit = config.max_iters_per_epoch * config.batch_size if config.max_iters_per_epoch else 0
    sampler = EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=config.seed,
                           drop_last=len(dataset) >= config.batch_size * world, limit=limit)
    on_cuda = device_for(config).type == "cuda"
    return DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, num_workers=config.workers,
                      pin_memory=config.pin_memory and on_cuda, persistent_workers=config.workers > 0)


def initialize(config: FinetuneConfig, arch: str, in_channels: int, payload: dict | None):
    """Classifier for the mode (DDP-wrapped when world size > 1), optimizer, per-epoch lr schedule,
    GradScaler and the effective lr."""
    device = device_for(config)
    model = build_classifier(arch, in_channels, config.mode, payload).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler, lr = build_optimizer_and_scheduler(config.optim, params, config.epochs,
                                                             config.batch_size * idist.get_world_size())
    if idist.get_world_size() > 1:
        model = idist.auto_model(model, sync_bn=False, find_unused_parameters=False)
    return model, optimizer, scheduler, grad_scaler(config.amp, device), lr


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
        with autocast(config.amp, device):
            logits = model(x)
        loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        acc = ((logits.detach() > 0).float() == y).float().mean()
        return {"loss": loss.item(), "acc": acc.item(), "images": x.shape[0]}

    trainer = Engine(step)
    EpochStatistics(optimizer).attach(trainer)
    attach_failpoints(trainer)
    return trainer


class BestEpoch:
    """After every epoch, score the evaluation split and keep the best epoch's model.

    Args:
        evaluate: () -> metrics of the split (every rank calls it; it may gather).
        save: (epoch, metrics) -> None, called on rank 0 when the epoch is the best so far.
        prefix: names of the logged figures (``<prefix>_auc_mean``, ...).

    The score is the mean AUC, else (no class with both labels) minus the weighted log loss; it is
    left in ``engine.state.selection_score`` for early stopping. The split's figures go into
    ``engine.state.epoch_metrics``; the best score and epoch are checkpointed (``state_dict``), so
    a resumed run keeps choosing correctly.
    """

    def __init__(self, evaluate, save, prefix: str):
        self.evaluate, self.save, self.prefix = evaluate, save, prefix
        self.score, self.epoch = float("-inf"), 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        metrics = self.evaluate()
        engine.state.epoch_metrics.update({f"{self.prefix}_{k}": v for k, v in metrics.items() if k != "n_images"})
        score = metrics["auc_mean"] if not np.isnan(metrics["auc_mean"]) else -metrics["weighted_logloss"]
        engine.state.selection_score = score
        if score > self.score:
            self.score, self.epoch = score, engine.state.epoch
            if idist.get_rank() == 0:
                self.save(engine.state.epoch, metrics)

    def state_dict(self) -> dict:
        return {"auc": self.score, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.score, self.epoch = float(state["auc"]), int(state["epoch"])


class FrozenBackbone:
    """MoCo-Freeze guard: after every epoch, no backbone weight or BatchNorm statistic may have
    changed (the reference linear probe asserts the same after its first epoch)."""

    def __init__(self, model):
        self.model = model
        self.before = backbone_fingerprint(model)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        moved = changed_keys(self.before, self.model)
        if moved:
            raise RuntimeError(f"linear mode: backbone changed after epoch {engine.state.epoch} ({moved[:3]}); "
                               "it must be frozen")


def backbone_fingerprint(model) -> dict[str, torch.Tensor]:
    """A copy of every backbone parameter and buffer (for the ``linear`` mode's no-change check)."""
    inner = getattr(model, "module", model)
    return {k: v.detach().cpu().clone() for k, v in inner.backbone.state_dict().items()}


def changed_keys(before: dict[str, torch.Tensor], model) -> list[str]:
    now = backbone_fingerprint(model)
    return [k for k in before if not torch.equal(before[k], now[k])]


# --- evaluation ----------------------------------------------------------------------------------

class _RowsOfRank(Dataset):
    """Position p of ``rows`` -> ``{"image": uint8 (C, H, W), "position": p}``; p = -1 pads a rank's
    share to the common length (it loads row 0 and is dropped when the shares are gathered)."""

    def __init__(self, cache, rows: np.ndarray, context: int):
        self.cache, self.rows, self.context = cache, np.asarray(rows, dtype=np.int64), context

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> dict:
        row = self.rows[position] if position >= 0 else self.rows[0]
        return {"image": torch.from_numpy(np.array(self.cache.stack(int(row), self.context))), "position": position}


def _positions_of_rank(n: int) -> list[int]:
    """This rank's interleaved share of ``range(n)``, padded with -1 to ``ceil(n / world)``."""
    world, rank = idist.get_world_size(), idist.get_rank()
    mine = list(range(rank, n, world))
    return mine + [-1] * ((int(math.ceil(n / world)) if n else 0) - len(mine))


def create_evaluator(model, size: int, device, amp: str = "none") -> Engine:
    """An ignite Engine that predicts sigmoid probabilities of a classifier.

    Run it on :func:`eval_loader`'s batches; at completion ``engine.state.probs`` holds the
    probabilities (N, 6) of every row, gathered from all ranks, in row order (every rank must run
    it: the gather is a collective). The model is in eval mode while it runs.
    """
    inner = getattr(model, "module", model)

    def step(engine: Engine, batch: dict) -> dict:
        x = prepare_images(batch["image"], size).to(device)
        with torch.no_grad(), autocast(amp, device):
            logits = inner(x)
        return {"position": torch.as_tensor(batch["position"]), "probs": torch.sigmoid(logits.float()).cpu()}

    evaluator = Engine(step)

    @evaluator.on(Events.STARTED)
    def _start(engine):
        engine.state.was_training = inner.training
        engine.state.parts = []
        inner.eval()

    @evaluator.on(Events.ITERATION_COMPLETED)
    def _collect(engine):
        out = engine.state.output
        engine.state.parts.append(torch.cat([out["position"].float()[:, None], out["probs"]], dim=1))

    @evaluator.on(Events.COMPLETED)
    def _gather(engine):
        inner.train(engine.state.was_training)
        tagged = torch.cat(engine.state.parts) if engine.state.parts else torch.zeros(0, 7)
        if idist.get_world_size() > 1:
            tagged = idist.all_gather(tagged.to(idist.device())).cpu()
        tagged = tagged[tagged[:, 0] >= 0].numpy()
        probs = np.zeros((len(tagged), tagged.shape[1] - 1), dtype=np.float32)
        probs[tagged[:, 0].astype(np.int64)] = tagged[:, 1:]
        engine.state.probs = probs

    return evaluator


def eval_loader(cache, rows: np.ndarray, context: int, batch_size: int = 64, workers: int = 0):
    """Batches of this rank's share of ``rows`` (see :func:`create_evaluator`)."""
    from monai.data import DataLoader

    # Its own generator: a loader draws a seed at every iteration, and evaluation must leave the
    # training's random streams (checkpointed for resume) as they were.
    return DataLoader(_RowsOfRank(cache, rows, context), batch_size=batch_size,
                      sampler=_positions_of_rank(len(rows)), num_workers=workers, generator=torch.Generator())


def predict_rows(model, cache, rows: np.ndarray, context: int, size: int, device, batch_size: int = 64,
                 amp: str = "none") -> np.ndarray:
    """Sigmoid probabilities (len(rows), 6) of cache rows, computed over all ranks and gathered.

    Every rank must call it (it all-gathers). A series model (``is_series``) predicts each series
    of ``rows`` whole, in slice order (:func:`medmoco.engines.series.predict_series_rows`; every
    rank computes all of it, there is nothing to gather).
    """
    if len(rows) == 0:
        return np.zeros((0, 6), dtype=np.float32)
    if getattr(getattr(model, "module", model), "is_series", False):
        from .series import predict_series_rows

        return predict_series_rows(model, cache, rows, device, batch_size)[0]
    evaluator = create_evaluator(model, size, device, amp)
    return evaluator.run(eval_loader(cache, rows, context, batch_size)).probs


def freeze_thresholds_then_test(model_path: str, cache, val_rows, val_labels, test_rows, device, batch_size: int,
                                target_sensitivity: float, replicates: int = 2000, level: float = 0.95,
                                seed: int = 0, min_groups: int = 10):
    """The end of a fine-tuning run, in the order that keeps the test split unseen by any choice:
    the selected model's per-class thresholds for ``target_sensitivity`` on the validation rows,
    then its one prediction of the test rows, evaluated with those thresholds and patient-bootstrap
    intervals (:func:`medmoco.evaluation.evaluate_split`). Every rank calls it (predictions are
    gathered).

    Returns:
        (operating points ``{"target_sensitivity", "thresholds"}``, the evaluation, test labels,
        test probabilities).
    """
    from ..evaluation import choose_thresholds, evaluate_split
    from ..models import load_classifier

    selected, info = load_classifier(model_path)
    selected.to(device)
    val_probs = predict_rows(selected, cache, val_rows, info["context"], info["image_size"], device, batch_size)
    operating_points = {"target_sensitivity": target_sensitivity,
                        "thresholds": choose_thresholds(val_labels, val_probs, target_sensitivity)}
    test_probs = predict_rows(selected, cache, test_rows, info["context"], info["image_size"], device, batch_size)
    test_labels = cache.labels(test_rows)
    patients = cache.groups(test_rows)
    evaluation = evaluate_split(test_labels, test_probs, patients, operating_points["thresholds"], replicates,
                                level, seed, cache.group_unit, min_groups)
    return operating_points, evaluation, test_labels, test_probs
