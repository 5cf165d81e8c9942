"""ResNet-FPN backbone against torchvision's resnet_fpn_backbone with the same weights."""

import pytest
import torch
from torch import nn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d

from maskrcnn.model.backbone import ResNetFPN


def torchvision_to_ours(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        key = key.replace("fpn.inner_blocks.", "fpn.lateral_convs.").replace("fpn.layer_blocks.", "fpn.output_convs.")
        key = key.replace(".0.weight", ".weight").replace(".0.bias", ".bias") if key.startswith("fpn.") else key
        out[key] = value
    return out


def randomize_frozen_bn(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


@pytest.mark.parametrize("depth", [18])  # ResNet-50 is covered by test_parity.py
def test_features_equal_torchvision(depth):
    torch.manual_seed(0)
    theirs = resnet_fpn_backbone(backbone_name=f"resnet{depth}", weights=None, trainable_layers=3).eval()
    randomize_frozen_bn(theirs, seed=1)
    ours = ResNetFPN(depth=depth, norm="frozen_bn", trainable_stages=3).eval()
    ours.load_state_dict(torchvision_to_ours(theirs.state_dict()))
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected, got = theirs(images), ours(images)
    assert list(got) == list(expected) == ["0", "1", "2", "3", "pool"]
    for name in expected:
        assert got[name].shape == expected[name].shape
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5)
    assert got["0"].shape[-2:] == (16, 24) and got["pool"].shape[-2:] == (1, 2)
    # the same parameters are trainable
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == [
        n for n, p in torchvision_to_ours(dict(theirs.named_parameters())).items() if p.requires_grad
    ]


@pytest.mark.parametrize("trainable_stages,expected_trainable", [
    (0, set()), (1, {"layer4"}), (3, {"layer2", "layer3", "layer4"}),
    (5, {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}),
])
def test_trainable_stages(trainable_stages, expected_trainable):
    model = ResNetFPN(depth=18, norm="bn", trainable_stages=trainable_stages, fpn_channels=16)
    trainable = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad and n.startswith("body.")}
    assert trainable == expected_trainable
    assert all(p.requires_grad for p in model.fpn.parameters())


def test_norms_and_channels():
    gn = ResNetFPN(depth=34, norm="gn", trainable_stages=5, fpn_channels=32)
    assert isinstance(gn.body.bn1, nn.GroupNorm)
    out = gn(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in out.values()] == [32] * 5
    assert isinstance(ResNetFPN(depth=18, norm="frozen_bn").body.layer1[0].bn1, FrozenBatchNorm2d)
    with pytest.raises(ValueError, match="norm"):
        ResNetFPN(depth=18, norm="instance")
    with pytest.raises(ValueError, match="depth 42"):
        ResNetFPN(depth=42)
    with pytest.raises(ValueError, match="trainable_stages"):
        ResNetFPN(depth=18, trainable_stages=6)


def test_local_imagenet_weights(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(3)
    reference = resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = ResNetFPN(depth=18, norm="frozen_bn", weights=str(path))
    torch.testing.assert_close(model.body.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    torch.testing.assert_close(model.body.bn1.running_var, reference.bn1.running_var)
    torch.save({"nonsense": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="do not fit"):
        ResNetFPN(depth=18, weights=str(path))


def _copy_weights_of(theirs: nn.Module, ours: nn.Module) -> None:
    state = {k: v for k, v in theirs.state_dict().items() if not k.startswith("fc.")}
    ours.load_state_dict(state)


def test_resnext_body_equals_torchvision_resnext():
    from torchvision.models import resnext50_32x4d

    from maskrcnn.model.backbone import ResNetBody

    torch.manual_seed(0)
    theirs = resnext50_32x4d(weights=None).eval()
    ours = ResNetBody(depth=50, norm="bn", groups=32, width_per_group=4).eval()
    _copy_weights_of(theirs, ours)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = nn.Sequential(*list(theirs.children())[:-2])(images)
        torch.testing.assert_close(ours(images)[-1], expected, rtol=1e-5, atol=1e-5)
    assert ours.layer1[0].conv2.groups == 32 and ours.out_channels == [256, 512, 1024, 2048]


def test_stride_in_1x1_moves_the_stride_to_the_first_conv():
    """detectron2's STRIDE_IN_1X1 (MSRA ResNets) equals torchvision's ResNet-50 with the stride of
    each stage's first block moved from its 3x3 conv to its 1x1 conv."""
    from torchvision.models import resnet50

    from maskrcnn.model.backbone import ResNetBody

    torch.manual_seed(0)
    theirs = resnet50(weights=None).eval()
    for layer in (theirs.layer2, theirs.layer3, theirs.layer4):
        layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)
    ours = ResNetBody(depth=50, norm="bn", stride_in_1x1=True).eval()
    _copy_weights_of(theirs, ours)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = nn.Sequential(*list(theirs.children())[:-2])(images)
        torch.testing.assert_close(ours(images)[-1], expected, rtol=1e-5, atol=1e-5)


def test_other_widths_and_detectron2_frozen_bn():
    """Stem and stage widths of detectron2's RESNETS.STEM_OUT_CHANNELS / RES2_OUT_CHANNELS; the
    detectron2 FrozenBN is the same affine map as torchvision's, computed by F.batch_norm."""
    from maskrcnn.model.backbone import ResNetBody
    from maskrcnn.model.layers import DetectronFrozenBatchNorm2d

    body = ResNetBody(depth=101, norm="frozen_bn_detectron2", stem_channels=32, res2_channels=64, width_per_group=16)
    assert body.conv1.out_channels == 32 and body.out_channels == [64, 128, 256, 512]
    assert [len(body.layer1), len(body.layer2), len(body.layer3), len(body.layer4)] == [3, 4, 23, 3]
    assert body.layer3[0].conv1.out_channels == 16 * 4
    g = torch.Generator().manual_seed(0)
    frozen, detectron = FrozenBatchNorm2d(8), DetectronFrozenBatchNorm2d(8)
    for buffer in ("weight", "bias", "running_mean", "running_var"):
        value = torch.rand(8, generator=g) + 0.5
        getattr(frozen, buffer).copy_(value)
        getattr(detectron, buffer).copy_(value)
    x = torch.randn(2, 8, 5, 5, generator=g)
    torch.testing.assert_close(detectron(x), frozen(x), rtol=1e-6, atol=1e-6)
    assert list(detectron.state_dict()) == list(frozen.state_dict())


def test_frozen_bn_equals_torchvision_to_the_bit_and_leaves_its_input():
    from maskrcnn.model.layers import FrozenBatchNorm2d as OurFrozenBatchNorm2d

    torch.manual_seed(0)
    theirs, ours = FrozenBatchNorm2d(16), OurFrozenBatchNorm2d(16)
    for name in ("weight", "bias", "running_mean"):
        getattr(theirs, name).normal_()
    theirs.running_var.uniform_(0.1, 2.0)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 16, 9, 11)
    before = x.clone()
    assert torch.equal(ours(x), theirs(x)) and torch.equal(x, before)


def test_fpn_release_inputs_frees_the_levels_and_changes_no_number():
    torch.manual_seed(0)
    backbone = ResNetFPN(depth=18, norm="frozen_bn", trainable_stages=3).eval()
    with torch.no_grad():
        features = backbone.body(torch.randn(1, 3, 64, 96))
        kept = backbone.fpn(list(features))
        given = list(features)
        released = backbone.fpn(given, release_inputs=True)
    assert given == [None, None, None, None]  # every C-level let go once used
    assert all(torch.equal(a, b) for a, b in zip(kept, released, strict=True))
