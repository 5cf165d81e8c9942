"""Stronger mask heads (Birodkar et al. 2021, "The surprising impact of mask-head architecture
on novel class segmentation").

The paper keeps Mask R-CNN's detector and swaps the small 4-conv FCN mask head for deeper
off-the-shelf networks: a stack of residual blocks and an hourglass (encoder-decoder with skip
connections). Trained on ground-truth boxes, these heads segment classes that never had a mask
in training far better than the FCN ("strong mask generalization"). The standard FCN (and the
"deep_fcn", i.e. the FCN with more convs) live in `mask_head.py`; this file holds the two others.

Both heads share the FCN's contract, so `mask_head.build_mask_head` can choose any of them by
name:

    features: Tensor  # [R, in_channels, S, S]  RoIAligned features (S = pooler resolution, 14)
    head(features) -> Tensor  # [R, out_channels, 2S, 2S]  mask logits; the 2x upsampling is a
                              # transposed conv 2x2 / stride 2, exactly as in the FCN

`out_channels` is K + 1 (one mask per class, background included, channel = label) or 1 for
class-agnostic masks (what the partially supervised setting needs).

Layers (parameter names): `stem` (conv3x3 in_channels -> conv_dim [+ norm] + ReLU), `body` (the
residual blocks, or the outermost HourglassLevel), `deconv` (ConvTranspose2d conv_dim -> conv_dim,
2x2, s2), `predictor` (conv1x1 conv_dim -> out_channels). No torchvision counterpart.

Order: the residual head runs its blocks on the S x S crop, then upsamples (stem -> body ->
deconv -> predictor, as the FCN); the hourglass upsamples first and runs on the 2S x 2S mask grid
(stem -> deconv -> body -> predictor). An hourglass halves its input once per level, and on the
14 x 14 crop two levels already reach 4 x 4, too coarse to hold a shape; on the 28 x 28 grid two
levels go 28 -> 14 -> 7, so that its coarsest level sees the crop at half its resolution.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.model.layers import HEAD_NORMS, check_norm, conv, norm_layer
from maskrcnn.model.mask_head import own_class_logits, upsample_and_predict

BLOCKS = ("bottleneck", "basic")


class ResidualBlock(nn.Module):
    """One residual block at constant width and resolution (stride 2 when `stride=2`).

    "basic": conv3x3 -> norm -> ReLU -> conv3x3 -> norm, plus the input, then ReLU.
    "bottleneck": conv1x1 (width / 4) -> conv3x3 -> conv1x1 (back to width), each with norm,
    ReLU between them, plus the input, then ReLU. With stride 2 the shortcut is a strided
    conv1x1 + norm so that the shapes agree.
    """

    def __init__(self, *, channels: int, block: str = "bottleneck", norm: str = "none", stride: int = 1) -> None:
        super().__init__()
        if block == "basic":
            layers = [
                conv(channels, channels, 3, norm=norm, stride=stride),
                norm_layer(norm, channels),
                nn.ReLU(inplace=True),
                conv(channels, channels, 3, norm=norm),
                norm_layer(norm, channels),
            ]
        elif block == "bottleneck":
            inner = max(channels // 4, 1)
            layers = [
                conv(channels, inner, 1, norm=norm),
                norm_layer(norm, inner),
                nn.ReLU(inplace=True),
                conv(inner, inner, 3, norm=norm, stride=stride),
                norm_layer(norm, inner),
                nn.ReLU(inplace=True),
                conv(inner, channels, 1, norm=norm),
                norm_layer(norm, channels),
            ]
        else:
            raise ValueError(f"residual block must be one of {BLOCKS}, got {block!r}")
        self.branch = nn.Sequential(*layers)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1:
            self.shortcut = nn.Sequential(conv(channels, channels, 1, norm=norm, stride=stride), norm_layer(norm, channels))

    def forward(self, x: Tensor) -> Tensor:  # [R, C, H, W] -> [R, C, H / stride, W / stride]
        return F.relu(self.branch(x) + self.shortcut(x))


class HourglassLevel(nn.Module):
    """One level of an hourglass, recursive: skip path at this resolution, plus a path that goes
    down by 2 (strided residual block), through the next level (or a bottom block), back up
    (nearest-neighbour upsampling to the skip's exact size, so odd sizes such as 7 work), added
    to the skip path."""

    def __init__(self, *, channels: int, levels: int, block: str, norm: str) -> None:
        super().__init__()
        self.skip = ResidualBlock(channels=channels, block=block, norm=norm)
        self.down = ResidualBlock(channels=channels, block=block, norm=norm, stride=2)
        self.inner: nn.Module
        if levels > 1:
            self.inner = HourglassLevel(channels=channels, levels=levels - 1, block=block, norm=norm)
        else:
            self.inner = ResidualBlock(channels=channels, block=block, norm=norm)
        self.up = ResidualBlock(channels=channels, block=block, norm=norm)

    def forward(self, x: Tensor) -> Tensor:  # [R, C, H, W] -> [R, C, H, W]
        low = self.up(self.inner(self.down(x)))  # [R, C, ceil(H / 2), ceil(W / 2)]
        return self.skip(x) + F.interpolate(low, size=x.shape[-2:], mode="nearest")


class _MaskHeadBase(nn.Module):
    """stem -> body -> transposed conv (2x) -> ReLU -> 1x1 predictor (or, with `body_after_upsampling`,
    stem -> transposed conv -> ReLU -> body -> predictor), initialised like the FCN except for the
    predictor (see `_init_weights`)."""

    def __init__(
        self, *, in_channels: int, out_channels: int, conv_dim: int, norm: str, body: nn.Module,
        body_after_upsampling: bool = False,
    ) -> None:
        super().__init__()
        check_norm(norm, allowed=HEAD_NORMS, what="mask head norm")
        self.body_after_upsampling = body_after_upsampling
        self.stem = nn.Sequential(conv(in_channels, conv_dim, 3, norm=norm), norm_layer(norm, conv_dim), nn.ReLU(inplace=True))
        self.body = body
        self.deconv = nn.ConvTranspose2d(conv_dim, conv_dim, kernel_size=2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, out_channels, kernel_size=1)
        self._init_weights()

    def _init_weights(self) -> None:
        # As the FCN head (torchvision / detectron2): kaiming normal (fan_out, ReLU), zero biases.
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Each residual branch starts at zero (its last norm's scale, or its last conv when there is
        # no norm), as torchvision's `zero_init_residual`: without it the activations' variance
        # doubles at every block of a norm-free stack (2^20 for 20 blocks). The branch's last layer
        # still gets gradients at the first step, so the branches start learning at once.
        # The predictor starts near zero (detectron2's std 0.001), so the first mask loss is log 2:
        # kaiming fan_out on a 1-channel (class-agnostic) 1x1 conv gives weights of std sqrt(2) and
        # logits of tens, a mask loss of ~10-25 that swamps the other losses at the start.
        nn.init.normal_(self.predictor.weight, std=0.001)
        for module in self.modules():
            if isinstance(module, ResidualBlock):
                last = module.branch[-1] if not isinstance(module.branch[-1], nn.Identity) else module.branch[-2]
                nn.init.zeros_(last.weight)

    def forward(self, features: Tensor, labels: Tensor | None = None) -> Tensor:
        """features: [R, in_channels, S, S] -> mask logits [R, out_channels, 2S, 2S]; with `labels [R]`
        only each RoI's own class, [R, 1, 2S, 2S] (training: the loss reads no other)."""
        x = self.stem(features)  # [R, conv_dim, S, S]
        if self.body_after_upsampling:
            return own_class_logits(self.body(F.relu(self.deconv(x))), self.predictor, labels)
        return upsample_and_predict(self.body(x), self.deconv, self.predictor, labels)


class ResidualMaskHead(_MaskHeadBase):
    """A stack of `num_convs` residual blocks at the RoI resolution (the paper's "ResNet" heads).

    Args:
        in_channels: channels of the pooled RoI features (the FPN width).
        out_channels: one per class, background included (K + 1), or 1 for class-agnostic masks.
        conv_dim: width of the head.
        num_convs: number of residual blocks (the paper goes up to dozens; 0 leaves stem + deconv).
        norm: "none" | "gn" | "bn".
        block: "bottleneck" (1x1-3x3-1x1, width / 4 inside) or "basic" (3x3-3x3).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        conv_dim: int,
        num_convs: int,
        norm: str = "none",
        block: str = "bottleneck",
    ) -> None:
        if num_convs < 0:
            raise ValueError(f"resnet mask head: num_convs (residual blocks) must be >= 0, got {num_convs}")
        check_norm(norm, allowed=HEAD_NORMS, what="mask head norm")
        body = nn.Sequential(*(ResidualBlock(channels=conv_dim, block=block, norm=norm) for _ in range(num_convs)))
        super().__init__(in_channels=in_channels, out_channels=out_channels, conv_dim=conv_dim, norm=norm, body=body)


class HourglassMaskHead(_MaskHeadBase):
    """An hourglass (encoder-decoder with a skip connection at every resolution) of `num_convs`
    levels on the upsampled 2S x 2S grid: a 14 x 14 crop is upsampled to 28 x 28, which goes
    28 -> 14 -> 7 with two levels (-> 4 with three) and back up. Each level holds three residual
    blocks (skip, down, up) plus the next level, or a bottom block at the last one.

    Args:
        in_channels, out_channels, conv_dim, norm: as ResidualMaskHead.
        num_convs: number of levels (>= 1); each one halves the resolution once.
        block: "bottleneck" or "basic" residual blocks.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        conv_dim: int,
        num_convs: int,
        norm: str = "none",
        block: str = "bottleneck",
    ) -> None:
        if num_convs < 1:
            raise ValueError(f"hourglass mask head: num_convs (levels) must be >= 1, got {num_convs}")
        check_norm(norm, allowed=HEAD_NORMS, what="mask head norm")
        body = HourglassLevel(channels=conv_dim, levels=num_convs, block=block, norm=norm)
        super().__init__(in_channels=in_channels, out_channels=out_channels, conv_dim=conv_dim, norm=norm, body=body,
                         body_after_upsampling=True)
