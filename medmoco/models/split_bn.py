"""Split BatchNorm: BN statistics per sub-batch, to emulate several GPUs in one process.

MoCo's positive pair must not be recognisable from BatchNorm statistics. Across GPUs the keys
are shuffled between devices (shuffle-BN); in one process a permutation changes nothing for a
whole-batch BN, so the batch is normalised in ``num_splits`` groups, as in the official MoCo
CIFAR demo. At eval time it is a plain BatchNorm with the averaged running statistics.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class SplitBatchNorm2d(nn.BatchNorm2d):
    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        if n % self.num_splits:
            raise ValueError(f"batch {n} is not divisible by bn_splits {self.num_splits}")
        # Running stats are tracked per split, then averaged back into the shared buffers.
        running_mean = self.running_mean.repeat(self.num_splits)
        running_var = self.running_var.repeat(self.num_splits)
        out = F.batch_norm(
            x.reshape(-1, c * self.num_splits, h, w), running_mean, running_var,
            self.weight.repeat(self.num_splits), self.bias.repeat(self.num_splits),
            True, self.momentum, self.eps,
        ).reshape(n, c, h, w)
        self.running_mean.copy_(running_mean.view(self.num_splits, c).mean(dim=0))
        self.running_var.copy_(running_var.view(self.num_splits, c).mean(dim=0))
        return out


def convert_split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm2d by a :class:`SplitBatchNorm2d` (weights and buffers kept)."""
    if num_splits <= 1:
        return module
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SplitBatchNorm2d):
        split = SplitBatchNorm2d(module.num_features, num_splits, eps=module.eps, momentum=module.momentum,
                                 affine=module.affine, track_running_stats=module.track_running_stats)
        split.load_state_dict(module.state_dict())
        return split
    for name, child in module.named_children():
        setattr(module, name, convert_split_bn(child, num_splits))
    return module
