"""Backbones by name, from MONAI's networks (2D, any number of input channels).

``create_backbone(name, in_channels)`` returns a module mapping (N, C, H, W) to pooled features
(N, F) and its feature size F. MONAI's ``ResNet`` has no grouped convolutions, so
``resnext50_32x4d`` (the backbone of one earlier MoCo-v2 CT implementation) is MONAI's ResNet
with a ResNeXt bottleneck (32 groups of width 4 per 64 planes, as torchvision's); MONAI's
SE-ResNeXt50 is available as ``seresnext50_32x4d`` (3rd place RSNA 2019 used it).
"""
from __future__ import annotations

from torch import nn


def _resnext_bottleneck():
    from monai.networks.layers.factories import Conv
    from monai.networks.layers.utils import get_norm_layer
    from monai.networks.nets.resnet import ResNetBottleneck

    class ResNeXtBottleneck(ResNetBottleneck):
        """MONAI's bottleneck with a grouped 3x3 convolution: width = planes * 2 for 32x4d."""

        expansion = 4
        groups = 32
        base_width = 4

        def __init__(self, in_planes, planes, spatial_dims=3, stride=1, downsample=None, norm="batch", **kwargs):
            super().__init__(in_planes, planes, spatial_dims=spatial_dims, stride=stride, downsample=downsample,
                             norm=norm, **kwargs)
            conv = Conv[Conv.CONV, spatial_dims]
            width = int(planes * self.base_width / 64) * self.groups
            self.conv1 = conv(in_planes, width, kernel_size=1, bias=False)
            self.bn1 = get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=width)
            self.conv2 = conv(width, width, kernel_size=3, stride=stride, padding=1, groups=self.groups, bias=False)
            self.bn2 = get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=width)
            self.conv3 = conv(width, planes * self.expansion, kernel_size=1, bias=False)

    return ResNeXtBottleneck


def _monai_resnet(block, layers, in_channels: int) -> nn.Module:
    from monai.networks.nets import ResNet

    return ResNet(block=block, layers=layers, block_inplanes=[64, 128, 256, 512], spatial_dims=2,
                  n_input_channels=in_channels, conv1_t_size=7, conv1_t_stride=2, feed_forward=False)


BACKBONES = {
    "resnet18": (lambda c: _monai_resnet("basic", [2, 2, 2, 2], c), 512),
    "resnet34": (lambda c: _monai_resnet("basic", [3, 4, 6, 3], c), 512),
    "resnet50": (lambda c: _monai_resnet("bottleneck", [3, 4, 6, 3], c), 2048),
    "resnext50_32x4d": (lambda c: _monai_resnet(_resnext_bottleneck(), [3, 4, 6, 3], c), 2048),
}


def _seresnext50(in_channels: int) -> nn.Module:
    from monai.networks.nets import SEResNext50

    net = SEResNext50(spatial_dims=2, in_channels=in_channels, num_classes=1)
    net.last_linear = nn.Identity()
    return net


BACKBONES["seresnext50_32x4d"] = (_seresnext50, 2048)


def create_backbone(name: str, in_channels: int = 3) -> tuple[nn.Module, int]:
    """(backbone, feature size) for a name in :data:`BACKBONES`.

    Raises:
        ValueError: for an unknown name (lists the known ones).
    """
    if name not in BACKBONES:
        raise ValueError(f"arch {name!r}: unknown; use one of {sorted(BACKBONES)}")
    factory, features = BACKBONES[name]
    return factory(in_channels), features


def feature_size(name: str) -> int:
    return BACKBONES[name][1]
