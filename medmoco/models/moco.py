"""Momentum Contrast (He et al. 2019; Chen et al. 2020, "v2"), with the reference interface.

``MoCo`` keeps facebookresearch/moco's names: ``encoder_q``/``encoder_k`` (backbone + projection
head), buffers ``queue`` (dim x K, L2-normalised columns) and ``queue_ptr``, ``K``, ``m``, ``T``
and ``forward(im_q, im_k) -> (logits N x (1+K), labels N zeros)``. Known traps handled here:

* momentum update on parameters only, before the key forward;
* keys gathered across ranks before they are enqueued; ``K % global_batch == 0`` checked at start
  (``drop_last=True`` in the loader keeps every batch full);
* BatchNorm must not leak the positive: under DDP the keys are shuffled across ranks (shuffle-BN);
  in one process :mod:`.split_bn` emulates several GPUs and a local permutation moves samples
  between the BN splits. SyncBN alone is not enough (moco#46).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .backbones import create_backbone
from .split_bn import convert_split_bn


class Encoder(nn.Module):
    """Backbone + projection head: images (N, C, H, W) -> features (N, dim)."""

    def __init__(self, backbone: nn.Module, feature_size: int, dim: int, mlp: bool):
        super().__init__()
        self.backbone = backbone
        if mlp:  # v2 head: Linear(F, F) - ReLU - Linear(F, dim)
            self.head = nn.Sequential(nn.Linear(feature_size, feature_size), nn.ReLU(inplace=True),
                                      nn.Linear(feature_size, dim))
        else:
            self.head = nn.Linear(feature_size, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 (no gradient); the identity in one process."""
    if not _distributed():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


class MoCo(nn.Module):
    """MoCo v1/v2.

    Args:
        encoder_q, encoder_k: two encoders of the same architecture (k gets q's weights).
        dim: feature dimension; K: queue length; m: key-encoder momentum; T: softmax temperature.
    """

    def __init__(self, encoder_q: nn.Module, encoder_k: nn.Module, dim: int = 128, K: int = 65536,
                 m: float = 0.999, T: float = 0.2):
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.encoder_q = encoder_q
        self.encoder_k = encoder_k
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False
        self.register_buffer("queue", nn.functional.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        """k = m k + (1 - m) q, parameters only (BN running statistics are the key encoder's own)."""
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.mul_(self.m).add_(param_q.data, alpha=1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        keys = concat_all_gather(keys)  # (N * world) x dim
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        if self.K % batch_size:
            raise ValueError(f"K={self.K} is not divisible by the global batch {batch_size}")
        self.queue[:, ptr : ptr + batch_size] = keys.T.to(self.queue.dtype)
        self.queue_ptr[0] = (ptr + batch_size) % self.K

    @torch.no_grad()
    def _batch_shuffle(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shuffle the keys' batch across ranks (shuffle-BN); returns the shuffled part and the inverse."""
        if not _distributed():
            idx_shuffle = torch.randperm(x.shape[0], device=x.device)
            return x[idx_shuffle], torch.argsort(idx_shuffle)
        batch_size_this = x.shape[0]
        x_gather = concat_all_gather(x)
        num_gpus = x_gather.shape[0] // batch_size_this
        idx_shuffle = torch.randperm(x_gather.shape[0], device=x.device)
        dist.broadcast(idx_shuffle, src=0)  # every rank uses rank 0's permutation
        idx_unshuffle = torch.argsort(idx_shuffle)
        rank = dist.get_rank()
        idx_this = idx_shuffle.view(num_gpus, -1)[rank]
        return x_gather[idx_this], idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle(self, x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
        if not _distributed():
            return x[idx_unshuffle]
        batch_size_this = x.shape[0]
        x_gather = concat_all_gather(x)
        num_gpus = x_gather.shape[0] // batch_size_this
        idx_this = idx_unshuffle.view(num_gpus, -1)[dist.get_rank()]
        return x_gather[idx_this]

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """im_q, im_k: two views, N x C x H x W. Returns logits N x (1+K) and labels N (zeros)."""
        q = nn.functional.normalize(self.encoder_q(im_q), dim=1)  # N x dim
        with torch.no_grad():
            self._momentum_update_key_encoder()
            im_k, idx_unshuffle = self._batch_shuffle(im_k)
            k = nn.functional.normalize(self.encoder_k(im_k), dim=1)  # N x dim
            k = self._batch_unshuffle(k, idx_unshuffle)
        l_pos = torch.einsum("nc,nc->n", q, k.to(q.dtype)).unsqueeze(-1)  # N x 1
        l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach().to(q.dtype))  # N x K
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T  # N x (1+K)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._dequeue_and_enqueue(k.float())
        return logits, labels


MOCO_VERSIONS = {
    # v1: linear head, T=0.07; v2: MLP head, T=0.2 (and blur in the augmentation).
    "v1": {"mlp": False, "T": 0.07},
    "v2": {"mlp": True, "T": 0.2},
}


def build_moco(arch: str = "resnet50", in_channels: int = 3, dim: int = 128, K: int = 65536, m: float = 0.999,
               T: float = 0.2, mlp: bool = True, bn_splits: int = 1) -> MoCo:
    """A MoCo model with two encoders built from a MONAI backbone name (see :mod:`.backbones`)."""
    encoders = []
    for _ in range(2):
        backbone, features = create_backbone(arch, in_channels)
        encoders.append(convert_split_bn(Encoder(backbone, features, dim, mlp), bn_splits))
    return MoCo(encoders[0], encoders[1], dim=dim, K=K, m=m, T=T)


def check_queue_batch(K: int, global_batch: int) -> None:
    """Fail at start, not at the first enqueue, when the queue cannot hold whole batches.

    Raises:
        ValueError: naming K and the global batch.
    """
    if global_batch <= 0 or K % global_batch:
        raise ValueError(
            f"moco.K={K} must be a multiple of the global batch {global_batch} (batch_size x world size); "
            "change moco.K or batch_size"
        )
