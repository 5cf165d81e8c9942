"""Backbone: torchvision's ResNet body (C2-C5) and a Feature Pyramid Network (P2-P6).

Feature names follow torchvision: "0", "1", "2", "3" for P2-P5 (strides 4, 8, 16, 32) and "pool"
for P6 (stride 64, a stride-2 subsampling of P5 that only the RPN uses).
Parameter names: `body.*` equals torchvision's `backbone.body.*`; the FPN's `lateral_convs.i` /
`output_convs.i` are torchvision's `backbone.fpn.inner_blocks.i.0` / `layer_blocks.i.0`, and
`lateral_norms.i` / `output_norms.i` their `.1` (checkpoint/torchvision.py holds the mapping).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet

from maskrcnn.model.layers import (
    BACKBONE_NORMS,
    FPN_LEVEL_NAMES,
    HEAD_NORMS,
    check_norm,
    norm_layer,
)

RESNETS: dict[int, Callable[..., resnet.ResNet]] = {18: resnet.resnet18, 34: resnet.resnet34}  # basic blocks
# The stages that `trainable_stages` unfreezes, from the top: 1 = layer4 only, ..., 5 = everything.
STAGES_FROM_TOP = ("layer4", "layer3", "layer2", "layer1", "conv1")
# Bottleneck blocks per stage (res2..res5) of the deeper ResNets.
BOTTLENECK_BLOCKS: dict[int, tuple[int, int, int, int]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def norm_layer_for(norm: str) -> Callable[[int], nn.Module]:
    """The backbone's norm layer builder (channels -> layer), one of BACKBONE_NORMS (model/layers.py)."""
    check_norm(norm, allowed=BACKBONE_NORMS, what="backbone norm")
    return partial(norm_layer, norm)


class Bottleneck(nn.Module):
    """ResNet / ResNeXt bottleneck: conv1x1 -> conv3x3 (`groups`) -> conv1x1, plus the shortcut.

    `stride_in_1x1` puts the stage's stride in the first 1x1 conv (MSRA's original ResNets, which
    detectron2's model zoo uses) instead of the 3x3 conv (torchvision, "ResNet v1.5"). Parameter
    names are torchvision's (`conv1`, `bn1`, ..., `downsample.0` / `.1`).
    """

    def __init__(self, *, in_channels: int, width: int, out_channels: int, stride: int, groups: int,
                 stride_in_1x1: bool, norm_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, stride=stride_1x1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride_3x3, padding=1, groups=groups, bias=False)
        self.bn2 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, out_channels, kernel_size=1, bias=False)
        self.bn3 = norm_layer(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False), norm_layer(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        out += shortcut  # in place, as torchvision's Bottleneck: the same numbers, one temporary fewer
        return self.relu(out)


class ResNetBody(nn.Module):
    """A ResNet without its classifier: returns C2-C5 (strides 4, 8, 16, 32).

    ResNet-18/34 are torchvision's (basic blocks). ResNet-50/101/152 are built from `Bottleneck`
    with torchvision's parameter names; the defaults give torchvision's `resnet50` / `resnet101`
    exactly, and the other arguments describe detectron2's variants: ResNeXt (`groups`,
    `width_per_group`), the stride in the first 1x1 conv, and other widths (`stem_channels`, the
    stem's output; `res2_channels`, stage 2's output, doubled by each later stage).
    """

    def __init__(self, *, depth: int, norm: str, stem_channels: int = 64, res2_channels: int = 256,
                 groups: int = 1, width_per_group: int = 64, stride_in_1x1: bool = False) -> None:
        super().__init__()
        if depth not in RESNETS and depth not in BOTTLENECK_BLOCKS:
            raise ValueError(f"backbone depth {depth} is not one of {sorted({*RESNETS, *BOTTLENECK_BLOCKS})}")
        norm_layer = norm_layer_for(norm)
        if depth in (18, 34):
            if (stem_channels, res2_channels, groups, width_per_group, stride_in_1x1) != (64, 256, 1, 64, False):
                raise ValueError(f"ResNet-{depth} (basic blocks) has fixed widths: stem_channels, res2_channels, "
                                 "groups, width_per_group and stride_in_1x1 apply to ResNet-50 and deeper")
            network = RESNETS[depth](weights=None, norm_layer=norm_layer)
            self.conv1, self.bn1, self.relu, self.maxpool = network.conv1, network.bn1, network.relu, network.maxpool
            self.layer1, self.layer2 = network.layer1, network.layer2
            self.layer3, self.layer4 = network.layer3, network.layer4
            self.out_channels = [64, 128, 256, 512]
            return
        self.conv1 = nn.Conv2d(3, stem_channels, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels, self.out_channels = stem_channels, []
        for stage, num_blocks in enumerate(BOTTLENECK_BLOCKS[depth]):  # stage 0 = res2 = layer1
            width, out_channels = groups * width_per_group * 2**stage, res2_channels * 2**stage
            blocks = [
                Bottleneck(in_channels=in_channels if i == 0 else out_channels, width=width, out_channels=out_channels,
                           stride=2 if i == 0 and stage > 0 else 1, groups=groups, stride_in_1x1=stride_in_1x1,
                           norm_layer=norm_layer)
                for i in range(num_blocks)
            ]
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
            in_channels = out_channels
            self.out_channels.append(out_channels)
        _init_like_torchvision(self)

    def freeze(self, trainable_stages: int) -> None:
        """Keep the top `trainable_stages` stages trainable (0..5, torchvision's trainable_layers)."""
        if not 0 <= trainable_stages <= 5:
            raise ValueError(f"trainable_stages must be in 0..5, got {trainable_stages}")
        trainable = list(STAGES_FROM_TOP[:trainable_stages])
        if trainable_stages == 5:
            trainable.append("bn1")
        for name, parameter in self.named_parameters():
            if not any(name.startswith(stage) for stage in trainable):
                parameter.requires_grad_(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]


class FPN(nn.Module):
    """Feature Pyramid Network (Lin et al. 2017): 1x1 lateral convs, top-down nearest upsampling,
    3x3 output convs; P6 = P5 subsampled by 2. With `norm` ("bn" / "gn", torchvision's v2
    builders) each conv is followed by that norm (`lateral_norms.i`, `output_norms.i`) and has no
    bias (the norm would cancel it)."""

    def __init__(self, *, in_channels: list[int], out_channels: int, norm: str = "none") -> None:
        super().__init__()
        bias = norm == "none"
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, kernel_size=1, bias=bias) for c in in_channels)
        self.output_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=bias) for _ in in_channels
        )
        for conv in [*self.lateral_convs, *self.output_convs]:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        # Identity (no parameters, so v1 state dicts keep their keys) when there is no norm
        check_norm(norm, allowed=HEAD_NORMS, what="backbone fpn_norm")
        self.lateral_norms = nn.ModuleList(norm_layer(norm, out_channels) for _ in in_channels)
        self.output_norms = nn.ModuleList(norm_layer(norm, out_channels) for _ in in_channels)

    def _lateral(self, level: int, feature: Tensor) -> Tensor:
        return self.lateral_norms[level](self.lateral_convs[level](feature))

    def _output(self, level: int, feature: Tensor) -> Tensor:
        return self.output_norms[level](self.output_convs[level](feature))

    def forward(self, features: list[Tensor], *, release_inputs: bool = False) -> list[Tensor]:
        """`features`: C2..C5, finest first. Returns P2..P6, each `[B, out_channels, H_l, W_l]`.

        release_inputs: empty `features` level by level as the top-down pass is done with each, so
        that (without autograd holding them) C5..C2 are freed early: at 800 x 1067, 104 MB less
        at the P2 output conv, the backbone's peak."""
        top_down = self._lateral(len(features) - 1, features[-1])
        if release_inputs:
            features[-1] = None
        outputs = [self._output(len(features) - 1, top_down)]
        for level in range(len(features) - 2, -1, -1):
            lateral = self._lateral(level, features[level])
            if release_inputs:
                features[level] = None
            # size= rather than scale_factor=2: odd sizes upsample to the lateral's exact shape. In
            # place on the lateral (the values of torchvision's `lateral + upsampled`).
            top_down = lateral.add_(F.interpolate(top_down, size=lateral.shape[-2:], mode="nearest"))
            outputs.insert(0, self._output(level, top_down))
        # P6: kernel 1, stride 2 (a subsampling, not a real pooling), as in torchvision and detectron2
        outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2))
        return outputs


class ResNetFPN(nn.Module):
    """ResNet body + FPN: `[B, 3, H, W]` -> {"0": P2, "1": P3, "2": P4, "3": P5, "pool": P6}."""

    feature_names = FPN_LEVEL_NAMES
    strides = (4, 8, 16, 32, 64)

    def __init__(
        self,
        *,
        depth: int = 50,
        norm: str = "frozen_bn",
        trainable_stages: int = 3,
        fpn_channels: int = 256,
        fpn_norm: str = "none",
        weights: str | None = None,
        stem_channels: int = 64,
        res2_channels: int = 256,
        groups: int = 1,
        width_per_group: int = 64,
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        self.body = ResNetBody(depth=depth, norm=norm, stem_channels=stem_channels, res2_channels=res2_channels,
                               groups=groups, width_per_group=width_per_group, stride_in_1x1=stride_in_1x1)
        if weights is not None:
            load_imagenet_weights(self.body, weights)
        self.body.freeze(trainable_stages)
        self.fpn = FPN(in_channels=self.body.out_channels, out_channels=fpn_channels, norm=fpn_norm)
        self.out_channels = fpn_channels

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        features = self.body(images)
        pyramid = self.fpn(features, release_inputs=True)  # the list is ours: free C5..C2 as they are used
        return OrderedDict(zip(self.feature_names, pyramid))


def _init_like_torchvision(module: nn.Module) -> None:
    """torchvision's ResNet initialisation: He (fan_out) for the convs, norms at identity."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(layer, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


def load_imagenet_weights(body: ResNetBody, path: str) -> None:
    """Load a torchvision ImageNet ResNet state dict (a local .pth: nothing is downloaded)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = body.load_state_dict(state, strict=False)
    # FrozenBatchNorm2d drops num_batches_tracked itself; anything else missing means a wrong file
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"ImageNet weights {path}: do not fit a ResNet body; missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
