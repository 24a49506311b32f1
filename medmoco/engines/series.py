"""Training and prediction of the series head (:mod:`medmoco.models.series`).

Two ways to train, one loop (an ignite ``Engine`` whose iteration is a batch of whole series):

* **frozen embeddings** (default): the slice classifier's backbone embeds every slice once
  (:func:`medmoco.engines.embed.cached_embeddings`), and only the head trains, on padded batches of
  series. Seconds per epoch on CPU; the embeddings are shared by every trial on one backbone.
* **end to end** (``end_to_end``): the backbone trains too, one series per step (its slices are one
  batch of images through the backbone in train mode).

The loss is the slice BCE (weighted per class, ``any`` x2 as the competition metric, over the
valid slices) plus ``exam_weight`` x the exam BCE (a series is positive for a class when any of
its slices is). Every epoch is scored on ``val`` (:func:`selection_key`: the slice-level and
exam-level mean AUC, ties broken by the log loss) and the best epoch's head is kept: the test
split is never read here.
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import torch
import torch.nn.functional as F

from ..data.series import series_members
from ..transforms.supervised import prepare_images
from .embed import load_images


def pad(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Series of (S_i, F) -> (B, max S, F) zero-padded and the (B, max S) mask of valid slices."""
    steps = max(len(f) for f in features)
    x = features[0].new_zeros(len(features), steps, features[0].shape[-1])
    mask = torch.zeros(len(features), steps, dtype=torch.bool, device=x.device)
    for b, f in enumerate(features):
        x[b, :len(f)] = f
        mask[b, :len(f)] = True
    return x, mask


def series_loss(slice_logits, exam_logits, labels, mask, class_weights, exam_weight: float) -> torch.Tensor:
    """Weighted slice BCE over valid slices + ``exam_weight`` x weighted exam BCE.

    Args:
        labels: (B, S, 6) slice labels (padding rows are ignored through ``mask``).
    """
    w = class_weights.to(slice_logits.device)
    per_slice = F.binary_cross_entropy_with_logits(slice_logits, labels, reduction="none")  # (B, S, 6)
    slice_term = (per_slice * w).sum(-1)[mask].mean() / w.sum() * len(w)
    exam_target = labels.masked_fill(~mask[..., None], 0).amax(dim=1)  # (B, 6)
    exam_term = (F.binary_cross_entropy_with_logits(exam_logits, exam_target, reduction="none") * w).sum(-1).mean()
    return slice_term + exam_weight * exam_term / w.sum() * len(w)


@torch.no_grad()
def predict_series_rows(model, cache, rows, device="cpu", batch_size: int = 64, features=None):
    """Probabilities of a series model for cache ``rows``, computed series by series.

    Args:
        model: a :class:`~medmoco.models.series.SeriesClassifier` (eval mode is set here).
        features: optional (len(rows), F) precomputed embeddings of ``rows`` (frozen training).

    Returns:
        (slice probabilities (len(rows), 6) in the order of ``rows``, series keys (n_series,),
        exam probabilities (n_series, 6), the rows of each series in slice order).
    """
    inner = getattr(model, "module", model)
    was_training = inner.training
    inner.eval()
    rows = np.asarray(rows, dtype=np.int64)
    members, keys = series_members(cache, rows)
    position = {int(r): i for i, r in enumerate(rows)}
    slice_probs = np.zeros((len(rows), 6), dtype=np.float32)
    exam_probs = np.zeros((len(members), 6), dtype=np.float32)
    context, size = int(inner.context), int(inner.image_size)
    for k, member in enumerate(members):
        at = np.array([position[int(r)] for r in member])
        if features is not None:
            embedded = torch.as_tensor(features[at], device=device)
        else:
            parts = [inner.embed(prepare_images(load_images(cache, member[s:s + batch_size], context), size).to(device))
                     for s in range(0, len(member), batch_size)]
            embedded = torch.cat(parts)
        slice_logits, exam_logits = inner.head(embedded[None].float())
        slice_probs[at] = torch.sigmoid(slice_logits[0]).cpu().numpy()
        exam_probs[k] = torch.sigmoid(exam_logits[0]).cpu().numpy()
    inner.train(was_training)
    return slice_probs, keys, exam_probs, members


def selection_key(slice_metrics: dict, exam_metrics: dict) -> tuple[float, float]:
    """How an epoch is scored on val: the mean of the slice-level and the exam-level mean AUC (both
    are outputs of the model; either alone where the other is undefined; minus the weighted log loss
    where neither is), then, between equal scores, the lower slice weighted log loss. On a small or
    easy val split the AUCs saturate at 1 within a few epochs, and the first such epoch would
    otherwise win with an exam output that has barely trained."""
    aucs = [v for v in (slice_metrics["auc_mean"], exam_metrics["auc_mean"]) if v == v]
    loss = float(slice_metrics["weighted_logloss"])
    return (float(np.mean(aucs)) if aucs else -loss, -loss)


def train_series_head(model, cache, train_rows, val_rows, epochs: int, lr: float, weight_decay: float,
                      batch_series: int, class_weights, exam_weight: float, seed: int, device="cpu",
                      train_features=None, val_features=None, end_to_end: bool = False, on_epoch=None) -> dict:
    """Train ``model.head`` (and the backbone when ``end_to_end``) and keep the best epoch on val.

    Args:
        train_features / val_features: (len(rows), F) frozen embeddings of the rows (required
            unless ``end_to_end``).
        on_epoch: called as ``on_epoch(epoch, metrics)`` after each epoch's validation.

    Returns:
        ``{"epoch", "score", "history"}``; the model holds the selected epoch's weights.
    """
    from ignite.engine import Engine, Events

    from ..metrics import classification_metrics

    inner = getattr(model, "module", model)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    train_rows = np.asarray(train_rows, dtype=np.int64)
    members, _ = series_members(cache, train_rows)
    if not members:
        raise ValueError("series head: no labeled training series")
    position = {int(r): i for i, r in enumerate(train_rows)}
    if end_to_end:
        params = list(inner.parameters())
    else:
        if train_features is None:
            raise ValueError("series head: frozen training needs the training embeddings")
        params = list(inner.head.parameters())
        train_features = torch.as_tensor(train_features)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    weights = torch.as_tensor(class_weights, dtype=torch.float32)
    step_size = 1 if end_to_end else batch_series

    def batches():
        order = torch.randperm(len(members), generator=generator).tolist()
        return [[members[i] for i in order[s:s + step_size]] for s in range(0, len(order), step_size)]

    def step(engine, batch):
        inner.train()
        if not end_to_end:
            inner.encoder.eval()  # frozen: BatchNorm statistics stay as the embeddings saw them
        labels, _ = pad([torch.from_numpy(cache.labels(m)) for m in batch])
        if end_to_end:
            embedded = [inner.embed(prepare_images(load_images(cache, m, inner.context), inner.image_size).to(device))
                        for m in batch]
        else:
            embedded = [train_features[[position[int(r)] for r in m]].to(device) for m in batch]
        x, mask = pad(embedded)
        slice_logits, exam_logits = inner.head(x, mask)
        loss = series_loss(slice_logits, exam_logits, labels.to(device), mask, weights, exam_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    trainer = Engine(step)
    trainer.logger.setLevel(logging.WARNING)  # ignite logs every epoch at INFO; the stage logs the epoch line
    val_labels = cache.labels(val_rows)
    best = {"epoch": 0, "score": -np.inf, "key": None, "state": None, "history": []}

    @trainer.on(Events.EPOCH_STARTED)
    def _reshuffle(engine):
        engine.state.dataloader = batches()
        engine.state.losses = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _loss(engine):
        engine.state.losses.append(engine.state.output)

    @trainer.on(Events.EPOCH_COMPLETED)
    def _select(engine):
        scheduler.step()
        probs, _, exam_probs, _ = predict_series_rows(inner, cache, val_rows, device, features=val_features)
        metrics = classification_metrics(val_labels, probs)
        exam = classification_metrics(exam_arrays(cache, val_rows, probs, exam_probs)[0], exam_probs)
        key = selection_key(metrics, exam)
        entry = {"epoch": engine.state.epoch, "loss": float(np.mean(engine.state.losses)),
                 "val_auc_mean": metrics["auc_mean"], "val_exam_auc_mean": exam["auc_mean"],
                 "val_weighted_logloss": metrics["weighted_logloss"], "val_score": key[0]}
        best["history"].append(entry)
        if best["key"] is None or key > best["key"]:
            best.update(epoch=engine.state.epoch, score=float(key[0]), key=key,
                        state=copy.deepcopy(inner.state_dict() if end_to_end else inner.head.state_dict()))
        if on_epoch is not None:
            on_epoch(engine.state.epoch, entry)

    trainer.run(batches(), max_epochs=epochs)
    (inner if end_to_end else inner.head).load_state_dict(best["state"])
    return {"epoch": best["epoch"], "score": best["score"], "history": best["history"]}


def exam_arrays(cache, rows, slice_probs, exam_probs=None):
    """Series-level (labels, probabilities, grouping unit, keys, slice counts) of ``rows``: a series is
    positive when any of its slices is; its probability is the series head's exam output, else
    (a slice model) the highest slice probability of the series."""
    from ..data.series import exam_labels

    rows = np.asarray(rows, dtype=np.int64)
    members, keys = series_members(cache, rows)
    if exam_probs is None:
        at = {int(r): i for i, r in enumerate(rows)}
        exam_probs = np.stack([np.asarray(slice_probs)[[at[int(r)] for r in m]].max(axis=0) for m in members]) \
            if members else np.zeros((0, 6), np.float32)
    groups = cache.groups([int(m[0]) for m in members]) if members else np.zeros(0, dtype=object)
    return exam_labels(cache, members), np.asarray(exam_probs), groups, keys, np.array([len(m) for m in members])


def exam_predictions(model, cache, rows, slice_probs, device="cpu"):
    """:func:`exam_arrays` of any model: a series model's exam output (computed again here), a slice
    model's highest slice probability per series."""
    inner = getattr(model, "module", model)
    exam_probs = predict_series_rows(model, cache, rows, device)[2] if getattr(inner, "is_series", False) else None
    return exam_arrays(cache, rows, slice_probs, exam_probs)
