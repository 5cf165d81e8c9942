"""from_torchvision (model / state dict / .pth), errors for wrong weights, convert_torchvision."""

import pytest
import torch
from torchvision.models.detection import KeypointRCNN
from torchvision.models.detection import MaskRCNN as TvMaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d

from maskrcnn.checkpoint.format import load_checkpoint
from maskrcnn.checkpoint.torchvision import convert_torchvision, from_torchvision

# see test_model.py: one thread per test process on this shared machine
torch.set_num_threads(1)
SMALL = dict(min_size=96, max_size=128, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_score_thresh=0.0,
             box_detections_per_img=6)


def small_torchvision(kind: str, norm_layer=torch.nn.BatchNorm2d) -> torch.nn.Module:
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5, norm_layer=norm_layer)
    if kind == "mask":
        model = TvMaskRCNN(backbone, num_classes=5, **SMALL)
    else:
        # a narrow keypoint head (torchvision's modules): the width is inferred from the weights
        model = KeypointRCNN(backbone, num_classes=2, keypoint_head=KeypointRCNNHeads(256, [32] * 3),
                             keypoint_predictor=KeypointRCNNPredictor(32, 5), **SMALL)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(10)
    return model.eval()


def configure_like(ours, theirs):
    """Our model comes configured like torchvision's builders; align the small test settings."""
    ours.transform.min_size = (96,)
    ours.transform.min_size_test, ours.transform.max_size = 96, 128
    ours.rpn.pre_nms_top_n["test"], ours.rpn.post_nms_top_n["test"] = 100, 50
    ours.roi_heads.score_thresh, ours.roi_heads.detections_per_img = 0.0, 6
    return ours


@pytest.mark.parametrize("kind", ["mask", "keypoint"])
def test_from_torchvision_model_state_dict_and_file_agree(kind, tmp_path):
    theirs = small_torchvision(kind)
    path = tmp_path / "weights.pth"
    torch.save(theirs.state_dict(), path)
    from_model = from_torchvision(theirs)
    from_state = from_torchvision(theirs.state_dict())
    assert not from_model.training and not from_state.training
    for config in (from_model.config, from_state.config):
        assert config.backbone.depth == 18 and config.backbone.norm == "bn"
        if kind == "mask":
            assert config.num_classes == 4 and config.mask_head.enabled and not config.keypoint_head.enabled
        else:
            assert config.num_classes == 1 and config.keypoint_head.num_keypoints == 5
            assert (config.keypoint_head.num_convs, config.keypoint_head.conv_dim) == (3, 32)
            assert not config.mask_head.enabled
    # weights alone: the builder's settings; a live model: its own
    builder_sizes = [640, 672, 704, 736, 768, 800] if kind == "keypoint" else [800]
    assert from_state.config.transform.min_size == builder_sizes and from_state.config.box_head.score_thresh == 0.05
    assert from_model.config.transform.min_size == [96] and from_model.config.box_head.score_thresh == 0.0
    assert from_model.config.rpn.post_nms_top_n_test == 50 and from_model.config.box_head.detections_per_img == 6
    for other in (from_state, from_torchvision(str(path)), from_torchvision({"model": theirs.state_dict(), "epoch": 3})):
        for (name, a), (_, b) in zip(from_model.state_dict().items(), other.state_dict().items()):
            assert torch.equal(a, b), name

    images = [torch.rand(3, 80, 100), torch.rand(3, 120, 90)]
    with torch.no_grad():
        got, expected = from_model(images), theirs(images)
    for g, e in zip(got, expected):
        assert len(e["boxes"]) > 0
        assert set(g) == set(e)
        for key in e:
            torch.testing.assert_close(g[key], e[key], rtol=1e-4, atol=1e-4)


def test_wrong_or_partial_weights_give_clear_errors(tmp_path):
    state = small_torchvision("mask").state_dict()
    partial = {k: v for k, v in state.items() if not k.startswith("rpn.")}
    with pytest.raises(ValueError, match="missing rpn.head.cls_logits.weight"):
        from_torchvision(partial)
    no_fc7 = {k: v for k, v in state.items() if "fc7" not in k}
    with pytest.raises(ValueError, match="missing.*fc7"):
        from_torchvision(no_fc7)
    with pytest.raises(ValueError, match="not the state dict of a torchvision"):
        from_torchvision({"conv.weight": torch.zeros(1)})
    pickled_model = tmp_path / "whole_model.pth"
    torch.save(torch.nn.Linear(2, 2), pickled_model)
    with pytest.raises(ValueError, match="more than weights"):
        from_torchvision(str(pickled_model))
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        from_torchvision(str(tmp_path / "nowhere.pth"))
    with pytest.raises(TypeError, match="expected a torchvision model"):
        from_torchvision(42)


def test_convert_torchvision_writes_a_checkpoint(tmp_path):
    theirs = small_torchvision("keypoint")
    source, destination = tmp_path / "tv.pth", tmp_path / "ours.pth"
    torch.save(theirs.state_dict(), source)
    converted = convert_torchvision(source, destination)
    loaded = load_checkpoint(destination)
    assert loaded.config == converted.config
    for (name, a), (_, b) in zip(converted.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_pretrained_layout_uses_frozen_batchnorm():
    """torchvision's pretrained models use FrozenBatchNorm2d (no num_batches_tracked in the weights)."""
    theirs = small_torchvision("mask", norm_layer=FrozenBatchNorm2d)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in theirs.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=g) + 0.5)
    ours = from_torchvision(theirs.state_dict())
    assert ours.config.backbone.norm == "frozen_bn" and ours.config.backbone.trainable_stages == 3
    assert not ours.backbone.body.layer1[0].conv1.weight.requires_grad
    configure_like(ours, theirs)
    images = [torch.rand(3, 90, 110)]
    with torch.no_grad():
        got, expected = ours(images)[0], theirs(images)[0]
    assert len(expected["boxes"]) > 0
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-4)
