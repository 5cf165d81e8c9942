"""Layers the backbone and the heads share: norm layers, convs before a norm, the FPN's level names.

Norms by name: "frozen_bn" (torchvision's FrozenBatchNorm2d, for pretrained backbones: batch
statistics of a few images per GPU are too noisy to train), "frozen_bn_detectron2" (the same
buffers computed with detectron2's arithmetic), "bn", "gn" (32 groups, fewer when the width is
not a multiple of 32) and, in the heads and the FPN, "none".
"""

from __future__ import annotations

import math
from functools import partial

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation
from torchvision.ops import FrozenBatchNorm2d as _TorchvisionFrozenBatchNorm2d

NORMS = ("none", "frozen_bn", "frozen_bn_detectron2", "bn", "gn")
BACKBONE_NORMS = ("frozen_bn", "frozen_bn_detectron2", "bn", "gn")
HEAD_NORMS = ("none", "bn", "gn")  # the FPN's and the RoI heads' convs
GROUP_NORM_GROUPS = 32

# The backbone's outputs, torchvision's names: P2..P5 (strides 4..32) and P6 ("pool", stride 64).
FPN_LEVEL_NAMES = ("0", "1", "2", "3", "pool")
ROI_LEVEL_NAMES = FPN_LEVEL_NAMES[:4]  # the RoI heads pool from P2..P5; P6 only feeds the RPN


class FrozenBatchNorm2d(_TorchvisionFrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d, to the bit (`x * scale + shift`, rounded the same way),
    with the shift added in place: one full-size temporary fewer per norm (on an 800 x 1067
    image, 56 MB at the stem and in every res2 block)."""

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        shift = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return (x * scale).add_(shift)


class DetectronFrozenBatchNorm2d(FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d (same buffers, same eps) computed as detectron2 computes
    it at inference: one `F.batch_norm` call, whose rounding differs from torchvision's
    `x * scale + shift` in the last bits; through a ResNet-101 that is 1e-3 px on the boxes and
    flips near-tied keypoint maxima, so detectron2's weights reproduce its outputs only this way."""

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)


def check_norm(norm: str, *, allowed: tuple[str, ...] = NORMS, what: str = "norm") -> None:
    if norm not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {norm!r}")


def norm_layer(norm: str, channels: int, *, allowed: tuple[str, ...] = NORMS, what: str = "norm") -> nn.Module:
    """The norm layer named `norm` over `channels`; "none" is an nn.Identity (no parameters, so
    the layer's index in an nn.Sequential, and with it the state dict's keys, stays the same)."""
    check_norm(norm, allowed=allowed, what=what)
    match norm:
        case "none":
            return nn.Identity()
        case "frozen_bn":
            return FrozenBatchNorm2d(channels)
        case "frozen_bn_detectron2":
            return DetectronFrozenBatchNorm2d(channels)
        case "bn":
            return nn.BatchNorm2d(channels)
        case _:  # "gn"
            return nn.GroupNorm(math.gcd(GROUP_NORM_GROUPS, channels), channels)


def conv(in_channels: int, out_channels: int, kernel_size: int, *, norm: str, stride: int = 1) -> nn.Conv2d:
    """A 'same'-padded conv with a bias only when no norm follows (a norm's mean subtraction
    cancels a bias)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                     bias=norm == "none")


def conv3x3_norm_relu(in_channels: int, out_channels: int, norm: str) -> Conv2dNormActivation:
    """conv3x3 (+ norm) + ReLU as one block whose children are `0` (conv) and `1` (norm), the same
    names as torchvision's heads; kaiming-normal weights (fan_out), zero bias (only without a norm)."""
    check_norm(norm, allowed=HEAD_NORMS, what="head norm")
    make = None if norm == "none" else partial(norm_layer, norm, allowed=HEAD_NORMS, what="head norm")
    block = Conv2dNormActivation(in_channels, out_channels, kernel_size=3, norm_layer=make)
    nn.init.kaiming_normal_(block[0].weight, mode="fan_out", nonlinearity="relu")
    if block[0].bias is not None:
        nn.init.zeros_(block[0].bias)
    return block
