"""Per-slice embeddings of a slice classifier's backbone, computed once and reused.

A series head trained on frozen embeddings needs each slice's features once, not once per epoch
or per trial: :func:`cached_embeddings` stores them under a key made of the model file's sha256,
the cache fingerprint and the flip setting, so every trial of an experiment on one backbone
reads the same file (and a changed model or cache can never be served stale features).
"""
from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from ..transforms.supervised import prepare_images


def load_images(cache, rows, context: int) -> torch.Tensor:
    """uint8 (N, C*(2k+1), H, W) of cache rows (2.5D neighbours as channels when ``context`` > 0)."""
    return torch.from_numpy(np.stack([np.asarray(cache.stack(int(i), context)) for i in rows]))


@torch.no_grad()
def embed_rows(backbone: torch.nn.Module, cache, rows, context: int, size: int, device, batch_size: int = 64,
               flip: bool = False) -> np.ndarray:
    """float32 (len(rows), F) pooled features in eval mode; ``flip`` averages each slice's
    features with those of its left-right mirror image (test-time augmentation)."""
    was_training = backbone.training
    backbone.eval()
    out = []
    rows = np.asarray(rows, dtype=np.int64)
    for start in range(0, len(rows), batch_size):
        x = prepare_images(load_images(cache, rows[start:start + batch_size], context), size).to(device)
        features = backbone(x).float()
        if flip:
            features = 0.5 * (features + backbone(torch.flip(x, dims=(-1,))).float())
        out.append(features.cpu())
    backbone.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_embeddings(model_file: str, cache, rows, directory: str, device="cpu", flip: bool = False,
                      batch_size: int = 64) -> np.ndarray:
    """Embeddings (len(rows), F) of ``rows`` by the backbone of the slice classifier ``model_file``,
    from ``directory/embeddings-<key>.npz`` where present, computing (and adding) only the rows
    it lacks.

    The key is the model file's sha256, the cache fingerprint and ``flip``.
    """
    from dicom_preprocess.files import atomic_file

    from ..models import load_classifier

    key = hashlib.sha256(f"{_file_sha256(model_file)}|{cache.fingerprint}|flip={bool(flip)}".encode()).hexdigest()
    path = os.path.join(directory, f"embeddings-{key[:20]}.npz")
    rows = np.asarray(rows, dtype=np.int64)
    known_rows, known = np.zeros(0, np.int64), None
    if os.path.exists(path):
        with np.load(path) as stored:
            known_rows, known = stored["rows"], stored["features"]
    missing = np.setdiff1d(rows, known_rows)
    if len(missing):
        model, info = load_classifier(model_file)
        model.to(device)
        fresh = embed_rows(model.backbone, cache, missing, int(info["context"]), int(info["image_size"]), device,
                           batch_size, flip)
        known_rows = np.concatenate([known_rows, missing])
        known = fresh if known is None else np.concatenate([known, fresh])
        order = np.argsort(known_rows)
        known_rows, known = known_rows[order], known[order]
        os.makedirs(directory, exist_ok=True)
        with atomic_file(path) as handle:
            np.savez(handle, rows=known_rows, features=known)
    return known[np.searchsorted(known_rows, rows)]
