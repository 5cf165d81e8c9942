"""Mask-head architectures of Birodkar et al. 2021: shapes, reference blocks, init, training."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from maskrcnn.model.mask_architectures import HourglassMaskHead, ResidualBlock, ResidualMaskHead

HEADS = [ResidualMaskHead, HourglassMaskHead]


@pytest.mark.parametrize("head_cls", HEADS)
@pytest.mark.parametrize("norm", ["none", "gn", "bn"])
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_forward_backward_shapes(head_cls, norm, block):
    torch.manual_seed(0)
    head = head_cls(in_channels=8, out_channels=3, conv_dim=16, num_convs=2, norm=norm, block=block)
    features = torch.randn(5, 8, 14, 14, requires_grad=True)
    logits = head(features)
    assert logits.shape == (5, 3, 28, 28)
    logits.square().mean().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    # Every parameter is reached by the gradient, including the zero-initialised branch ends.
    for name, param in head.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("head_cls", HEADS)
def test_empty_and_odd_sizes(head_cls):
    head = head_cls(in_channels=4, out_channels=1, conv_dim=8, num_convs=3)
    empty = head(torch.zeros(0, 4, 14, 14))
    assert empty.shape == (0, 1, 28, 28)
    # 7 x 7 crops are upsampled to 14, which goes 14 -> 7 -> 4 -> 2 in a 3-level hourglass and
    # must come back to 14 (odd sizes on the way).
    assert head(torch.randn(2, 4, 7, 7)).shape == (2, 1, 14, 14)


def _block_input_sizes(head: nn.Module, features: torch.Tensor) -> list[int]:
    """The spatial sizes that the residual blocks of `head` receive, in call order."""
    sizes: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda _m, inputs: sizes.append(inputs[0].shape[-1]))
             for m in head.modules() if isinstance(m, ResidualBlock)]
    head(features)
    for hook in hooks:
        hook.remove()
    return sizes


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_hourglass_runs_on_the_upsampled_grid(levels):
    """On 14 x 14 crops the hourglass works on the 28 x 28 mask grid: level l (0-based) receives
    ceil(28 / 2^l) and its down block hands ceil(28 / 2^(l + 1)) to the level below, so two levels
    bottom out at 7 x 7 (not 4 x 4, as when it ran on the crop itself)."""
    head = HourglassMaskHead(in_channels=4, out_channels=1, conv_dim=8, num_convs=levels)
    sizes = _block_input_sizes(head, torch.randn(2, 4, 14, 14))
    expected_levels = [math.ceil(28 / 2**level) for level in range(levels + 1)]  # 28, 14, 7, 4
    assert sorted(set(sizes), reverse=True) == expected_levels
    assert min(sizes) == math.ceil(28 / 2**levels)
    # Per level: skip and down at its own size, up at the size below; plus one bottom block.
    assert len(sizes) == 3 * levels + 1
    # The residual head keeps the crop's resolution.
    residual = ResidualMaskHead(in_channels=4, out_channels=1, conv_dim=8, num_convs=3)
    assert _block_input_sizes(residual, torch.randn(2, 4, 14, 14)) == [14, 14, 14]


def _copy_bn(ours: nn.BatchNorm2d, theirs: nn.BatchNorm2d) -> None:
    theirs.load_state_dict(ours.state_dict())


@pytest.mark.parametrize("stride", [1, 2])
def test_bottleneck_block_equals_torchvision(stride):
    """Our bottleneck with BN is torchvision's ResNet Bottleneck (v1.5: stride on the 3x3)."""
    torch.manual_seed(0)
    channels = 32
    ours = ResidualBlock(channels=channels, block="bottleneck", norm="bn", stride=stride)
    for module in ours.modules():  # non-trivial weights and statistics everywhere
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, std=0.1)
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.5, 0.5)
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    downsample = None
    if stride != 1:
        downsample = nn.Sequential(nn.Conv2d(channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels))
    theirs = torchvision.models.resnet.Bottleneck(channels, channels // 4, stride=stride, downsample=downsample)
    branch = ours.branch
    theirs.conv1.weight.data.copy_(branch[0].weight)
    _copy_bn(branch[1], theirs.bn1)
    theirs.conv2.weight.data.copy_(branch[3].weight)
    _copy_bn(branch[4], theirs.bn2)
    theirs.conv3.weight.data.copy_(branch[6].weight)
    _copy_bn(branch[7], theirs.bn3)
    if stride != 1:
        theirs.downsample[0].weight.data.copy_(ours.shortcut[0].weight)
        _copy_bn(ours.shortcut[1], theirs.downsample[1])
    ours.eval(), theirs.eval()
    x = torch.randn(3, channels, 14, 14)
    expected = theirs(x)
    assert expected.shape[-1] == 14 // stride
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)


def test_basic_block_equals_torchvision():
    torch.manual_seed(0)
    ours = ResidualBlock(channels=16, block="basic", norm="bn")
    for module in ours.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, std=0.1)
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.5, 0.5)
    theirs = torchvision.models.resnet.BasicBlock(16, 16)
    theirs.conv1.weight.data.copy_(ours.branch[0].weight)
    _copy_bn(ours.branch[1], theirs.bn1)
    theirs.conv2.weight.data.copy_(ours.branch[3].weight)
    _copy_bn(ours.branch[4], theirs.bn2)
    x = torch.randn(2, 16, 9, 9)
    # Training mode: batch statistics on both sides.
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_init_like_the_fcn():
    torch.manual_seed(0)
    head = ResidualMaskHead(in_channels=64, out_channels=5, conv_dim=64, num_convs=2, norm="none", block="basic")
    # kaiming normal, fan_out, ReLU gain: std = sqrt(2 / (out_channels * k * k))
    stem = head.stem[0]
    assert stem.bias is not None and stem.bias.abs().max() == 0
    expected_std = math.sqrt(2.0 / (64 * 3 * 3))
    assert abs(stem.weight.std().item() / expected_std - 1) < 0.05
    assert head.predictor.bias.abs().max() == 0
    # The predictor starts near zero: every mask logit is ~0 and the first BCE is log 2.
    assert abs(head.predictor.weight.std().item() / 0.001 - 1) < 0.1
    logits = head(torch.rand(3, 64, 14, 14))
    target = torch.rand(3, 5, 28, 28).round()
    loss = nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert abs(loss.item() - math.log(2)) < 1e-2
    # The residual branches start at zero: each block is the identity on non-negative input.
    block = head.body[0]
    x = torch.rand(2, 64, 14, 14)
    torch.testing.assert_close(block(x), x)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="norm"):
        ResidualMaskHead(in_channels=4, out_channels=1, conv_dim=8, num_convs=1, norm="layer")
    with pytest.raises(ValueError, match="block"):
        ResidualMaskHead(in_channels=4, out_channels=1, conv_dim=8, num_convs=1, block="dense")
    with pytest.raises(ValueError, match="levels"):
        HourglassMaskHead(in_channels=4, out_channels=1, conv_dim=8, num_convs=0)


def _toy_problem():
    """Features whose first channel is a disc; the target mask is that disc at twice the size."""
    generator = torch.Generator().manual_seed(0)
    count, size = 6, 14
    ys, xs = torch.meshgrid(torch.arange(2 * size) + 0.5, torch.arange(2 * size) + 0.5, indexing="ij")
    centres = torch.rand(count, 2, generator=generator) * 12 + 8
    radii = torch.rand(count, generator=generator) * 5 + 4
    targets = ((xs - centres[:, 0, None, None]) ** 2 + (ys - centres[:, 1, None, None]) ** 2 <= radii[:, None, None] ** 2)
    targets = targets.float()[:, None]  # [6, 1, 28, 28]
    features = torch.randn(count, 4, size, size, generator=generator) * 0.1
    features[:, 0] += torch.nn.functional.avg_pool2d(targets, 2)[:, 0]
    return features, targets


@pytest.mark.parametrize("head_cls", HEADS)
@pytest.mark.parametrize("norm", ["none", "gn"])
def test_trains_on_toy_target(head_cls, norm):
    torch.manual_seed(0)
    features, targets = _toy_problem()
    head = head_cls(in_channels=4, out_channels=1, conv_dim=16, num_convs=2, norm=norm)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = nn.functional.binary_cross_entropy_with_logits(head(features), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(value) for value in losses)
    assert losses[-1] < 0.4 * losses[0], losses


@pytest.mark.parametrize("architecture", ["resnet", "hourglass"])
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_config_block_reaches_the_model(architecture, block):
    from maskrcnn.config import ModelConfig, from_dict
    from maskrcnn.model.mask_rcnn import build_model

    config = from_dict(ModelConfig, {
        "num_classes": 2, "backbone": {"depth": 18, "norm": "gn", "fpn_channels": 16},
        "mask_head": {"architecture": architecture, "block": block, "num_convs": 1, "conv_dim": 16},
    })
    blocks = [m for m in build_model(config).modules() if isinstance(m, ResidualBlock)]
    assert blocks
    # A basic block's branch has two 3x3 convs; a bottleneck's has 1x1, 3x3, 1x1.
    kernels = {tuple(c.kernel_size for c in b.branch if isinstance(c, nn.Conv2d)) for b in blocks}
    assert kernels == ({((3, 3), (3, 3))} if block == "basic" else {((1, 1), (3, 3), (1, 1))})


def test_hourglass_trains_at_the_experiments_width():
    """The hourglass as the partial-supervision experiment builds it (64 channels, GroupNorm,
    bottleneck blocks) fits the toy masks on a tiny batch."""
    torch.manual_seed(0)
    features, targets = _toy_problem()
    head = HourglassMaskHead(in_channels=4, out_channels=1, conv_dim=64, num_convs=2, norm="gn")
    optimizer = torch.optim.AdamW(head.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        loss = nn.functional.binary_cross_entropy_with_logits(head(features), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(2)) < 1e-2  # the near-zero predictor's start
    assert all(math.isfinite(value) for value in losses)
    assert losses[-1] < 0.5 * losses[0], losses
