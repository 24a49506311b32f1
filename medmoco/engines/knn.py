"""kNN monitor: how well the query backbone's features separate hemorrhage, without training a head.

Embed a small labeled subset (the labeled train and val slices, capped: never test, which is
read once, at the end of fine-tuning) with the backbone in
eval mode; each slice scores each subtype by the similarity-weighted vote of its k nearest
labeled slices *of other patients* (adjacent slices of one series are near-duplicates, so
same-patient neighbours would flatter the monitor); cosine similarity, weights exp(s / 0.07) as
in the InstDisc/MoCo monitors. Per-class ROC AUC (:func:`medmoco.metrics.per_class_auc`) of those
scores and their mean; chance is 0.5. Leave-patient-out keeps the monitor defined when a small
split has no positives of a class.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..metrics import per_class_auc


@torch.no_grad()
def embed(backbone: torch.nn.Module, images: torch.Tensor, device, batch_size: int = 128) -> torch.Tensor:
    """L2-normalised features of uint8 images (N, C, H, W), computed in eval mode."""
    was_training = backbone.training
    backbone.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device).float().div_(255.0)
        out.append(F.normalize(backbone(x).float(), dim=1).cpu())
    backbone.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def knn_scores(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int = 20,
               temperature: float = 0.07, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Per-class scores (Q, classes) in [0, 1] from the k nearest bank samples.

    Args:
        exclude: optional boolean (Q, B) mask of bank samples a query may not use.
    """
    k = min(k, len(bank))
    sims = queries @ bank.T  # Q x B
    if exclude is not None:
        sims = sims.masked_fill(exclude, -2.0)  # below any cosine similarity
    top, idx = sims.topk(k, dim=1)
    weights = (top / temperature).exp()
    votes = (weights[..., None] * bank_labels[idx]).sum(dim=1)
    return votes / weights.sum(dim=1, keepdim=True)


def knn_monitor(backbone: torch.nn.Module, cache, device, samples: int = 2000, k: int = 20, seed: int = 0,
                context: int = 0) -> dict[str, float]:
    """Leave-patient-out kNN AUC per subtype over up to ``samples`` labeled train/val slices."""
    present = set(cache.manifest["split"])
    idx = np.concatenate([cache.indices(split, labeled=True) for split in ("train", "val") if split in present]
                         or [np.zeros(0, dtype=np.int64)])
    if len(idx) < 2:
        return {}
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(idx, size=min(samples, len(idx)), replace=False))
    images = torch.from_numpy(np.stack([np.array(cache.stack(int(i), context)) for i in idx]))
    features = embed(backbone, images, device)
    labels = torch.from_numpy(cache.labels(idx))
    patients = cache.groups(idx)
    _, codes = np.unique(patients, return_inverse=True)
    codes = torch.from_numpy(codes)
    same_patient = codes[:, None] == codes[None, :]
    if bool(same_patient.all()):
        return {}
    scores = knn_scores(features, labels, features, k, exclude=same_patient)
    return per_class_auc(labels.numpy(), scores.numpy())
