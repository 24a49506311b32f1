"""Datasets over a :class:`dicom_preprocess.CTCache`.

Samples are addressed as ``(epoch, index)`` pairs produced by :class:`EpochSampler`, so that every
random draw of a sample is a function of (seed, epoch, index): loader workers need no shared
state, and a resumed run sees exactly the views an uninterrupted one would.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from ..transforms.views import plain_tensor, view_seed


class CacheSliceDataset(Dataset):
    """uint8 tensors (C * (2 context + 1), H, W) of selected cache rows (2.5D when context > 0)."""

    def __init__(self, cache, indices: Sequence[int], context: int = 0):
        self.cache = cache
        self.indices = np.asarray(indices, dtype=np.int64)
        self.context = context

    def __len__(self) -> int:
        return len(self.indices)

    def image(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.cache.stack(int(self.indices[i]), self.context)))

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.image(i)


class ContrastiveDataset(Dataset):
    """``(epoch, i)`` -> ``{"view1", "view2"}`` (CPU views) or ``{"image"}`` (uint8, device views)."""

    def __init__(self, base: CacheSliceDataset, views=None, seed: int = 0):
        self.base = base
        self.views = views
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item) -> dict:
        epoch, i = item if isinstance(item, tuple) else (0, item)
        image = self.base.image(i)
        if self.views is None:
            return {"image": image}
        self.views.set_random_state(view_seed(self.seed, epoch, i))
        return self.views(image)


class LabeledDataset(Dataset):
    """``(epoch, i)`` or ``i`` -> ``{"image": float (C, H, W), "label": float (6,), "index": row}``."""

    def __init__(self, base: CacheSliceDataset, transform=None, seed: int = 0, labels=None):
        self.base = base
        self.transform = transform
        self.seed = seed
        # labels: the cache's unless given (slices labeled later, e.g. `finetune --extra-labels`)
        self.labels = base.cache.labels(base.indices) if labels is None else np.asarray(labels, np.float32)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item) -> dict:
        epoch, i = item if isinstance(item, tuple) else (0, item)
        image = self.base.image(i)
        if self.transform is not None:
            self.transform.set_random_state(seed=view_seed(self.seed, epoch, i))
            image = plain_tensor(self.transform({"image": image})["image"])
        else:
            image = image.float().div_(255.0)
        return {"image": image, "label": torch.from_numpy(self.labels[i]),
                "index": int(self.base.indices[i])}


class EpochSampler(Sampler):
    """A :class:`DistributedSampler` (per-rank shard, shuffled by seed + epoch) yielding ``(epoch, i)``.

    Works without a process group (``num_replicas=1``). ``set_epoch`` is called by the engine.
    ``limit`` > 0 keeps only the first ``limit`` samples of each epoch's order (short epochs for
    demos and tests, still a fresh shuffle every epoch).
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, limit: int = 0):
        self.inner = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                                        seed=seed, drop_last=drop_last)
        self.limit = limit
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = list(self.inner)
        if self.limit:
            order = order[: self.limit]
        return ((self.epoch, i) for i in order)

    def __len__(self) -> int:
        return min(len(self.inner), self.limit) if self.limit else len(self.inner)
