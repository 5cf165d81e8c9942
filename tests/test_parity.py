"""Parity with torchvision's fasterrcnn / maskrcnn / keypointrcnn_resnet50_fpn and the v2 builders
fasterrcnn / maskrcnn_resnet50_fpn_v2 (norm in the FPN and the heads, 2-conv RPN head, 4-conv +
1-fc box head) on the same seeded weights.

Each torchvision model is built once per module (weights=None: nothing is downloaded) and converted
with `from_torchvision`. Both run on small images (min_size 96, max_size 160) so ResNet-50 stays fast.
Intermediate stages are compared first, so that a mismatch says where it starts.
"""

import copy

import pytest
import torch
import torchvision
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor

from maskrcnn.checkpoint.torchvision import from_torchvision

BUILDERS = {
    "fasterrcnn": torchvision.models.detection.fasterrcnn_resnet50_fpn,
    "maskrcnn": torchvision.models.detection.maskrcnn_resnet50_fpn,
    "keypointrcnn": torchvision.models.detection.keypointrcnn_resnet50_fpn,
    "fasterrcnn_v2": torchvision.models.detection.fasterrcnn_resnet50_fpn_v2,
    "maskrcnn_v2": torchvision.models.detection.maskrcnn_resnet50_fpn_v2,
}
MIN_SIZE, MAX_SIZE = 96, 160
# see test_model.py: one thread per test process on this shared machine
torch.set_num_threads(1)
# Random weights give near-uniform class scores: the threshold goes to 0 on both sides and the
# classifier is sharpened so that there are real, distinct detections to compare.
# Fewer detections and sampled RoIs than the defaults keep the heads' cost down.
SETTINGS = dict(min_size=MIN_SIZE, max_size=MAX_SIZE, box_score_thresh=0.0, box_detections_per_img=10,
                rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=200, box_batch_size_per_image=128)


def make_images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 64, 96, generator=g), torch.rand(3, 120, 90, generator=g), torch.rand(3, 100, 160, generator=g)]


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def pair(request):
    arch = request.param
    torch.manual_seed(0)
    theirs = BUILDERS[arch](weights=None, weights_backbone=None, num_classes=5, **SETTINGS)
    if arch == "keypointrcnn":
        # torchvision's own keypoint modules, 64 channels wide instead of 512: the same code path at
        # 1/64 of the cost (8 convs of 512 channels are ~7 GFLOP per RoI). from_torchvision infers the width.
        theirs.roi_heads.keypoint_head = KeypointRCNNHeads(256, [64] * 8)
        theirs.roi_heads.keypoint_predictor = KeypointRCNNPredictor(64, 17)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        theirs.roi_heads.box_predictor.cls_score.weight.mul_(30)
        for module in theirs.modules():  # non-trivial BatchNorm statistics (body; v2: FPN and heads too)
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=g) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=g) + 0.5)
    theirs.eval()
    ours = from_torchvision(theirs)
    # from a live model, its own settings are copied (not the builder's defaults)
    assert ours.transform.min_size == (MIN_SIZE,) and ours.transform.max_size == MAX_SIZE
    assert ours.rpn.post_nms_top_n["test"] == 200 and ours.roi_heads.detections_per_img == 10
    assert ours.roi_heads.score_thresh == 0.0 and ours.roi_heads.sampler.batch_size_per_image == 128
    return arch, ours, theirs


def test_intermediate_stages_equal(pair):
    _, ours, theirs = pair
    images = make_images()
    with torch.no_grad():
        batch, _ = ours.transform(images)
        expected_batch, _ = theirs.transform(images)
        torch.testing.assert_close(batch.tensors, expected_batch.tensors, rtol=0, atol=0)
        assert batch.image_sizes == [tuple(s) for s in expected_batch.image_sizes]

        features = ours.backbone(batch.tensors)
        expected_features = theirs.backbone(expected_batch.tensors)
        assert list(features) == list(expected_features)
        for name in features:
            torch.testing.assert_close(features[name], expected_features[name], rtol=1e-4, atol=1e-4)

        anchors = torch.cat(ours.rpn.anchor_generator(tuple(batch.tensors.shape[-2:]), list(features.values())))
        expected_anchors = theirs.rpn.anchor_generator(expected_batch, list(expected_features.values()))
        torch.testing.assert_close(anchors, expected_anchors[0], rtol=0, atol=0)

        # proposals from identical features, so that only the RPN is compared here
        proposals, _ = ours.rpn(batch, expected_features)
        expected_proposals, _ = theirs.rpn(expected_batch, expected_features)
        for p, e in zip(proposals, expected_proposals):
            assert len(p) == len(e) > 0
            torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-4)


def compare_detections(got, expected):
    for g, e in zip(got, expected):
        assert len(e["boxes"]) > 0
        assert set(g) == set(e)
        assert torch.equal(g["labels"], e["labels"])
        torch.testing.assert_close(g["boxes"], e["boxes"], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(g["scores"], e["scores"], rtol=1e-4, atol=1e-5)
        if "masks" in e:
            assert g["masks"].shape == e["masks"].shape
            torch.testing.assert_close(g["masks"], e["masks"], rtol=0, atol=1e-3)
        if "keypoints" in e:
            torch.testing.assert_close(g["keypoints"], e["keypoints"], rtol=1e-4, atol=1e-3)
            torch.testing.assert_close(g["keypoints_scores"], e["keypoints_scores"], rtol=1e-4, atol=1e-3)


def test_detections_equal_batched_and_single(pair):
    arch, ours, theirs = pair
    images = make_images()
    with torch.no_grad():
        compare_detections(ours(images), theirs(images))
        single = ours(images[:1])
        compare_detections(single, theirs(images[:1]))
    assert {"fasterrcnn": "boxes", "maskrcnn": "masks", "keypointrcnn": "keypoints"}[arch.removesuffix("_v2")] in single[0]


def make_targets(arch, images):
    g = torch.Generator().manual_seed(2)
    targets = []
    for image in images:
        h, w = image.shape[-2:]
        boxes = torch.tensor([[4.0, 6.0, w / 2, h / 2], [w / 3, h / 4, w - 3.0, h - 5.0]])
        target = {"boxes": boxes, "labels": torch.tensor([1, 4])}
        if arch.startswith("maskrcnn"):
            masks = torch.zeros(2, h, w, dtype=torch.uint8)
            masks[0, 8 : h // 2 - 2, 6 : w // 2 - 1] = 1
            masks[1] = (torch.rand(h, w, generator=g) > 0.4).to(torch.uint8)
            target["masks"] = masks
        if arch == "keypointrcnn":
            xy = boxes[:, None, :2] + torch.rand(2, 17, 2, generator=g) * (boxes[:, None, 2:] - boxes[:, None, :2])
            visibility = (torch.rand(2, 17, 1, generator=g) > 0.3).float() * 2
            target["keypoints"] = torch.cat([xy, visibility], dim=2)
        targets.append(target)
    return targets


def test_losses_equal_with_same_seed(pair):
    arch, ours, theirs = pair
    # copies: training mode updates BatchNorm statistics, which the other tests must not see
    ours, theirs = copy.deepcopy(ours).train(), copy.deepcopy(theirs).train()
    images = make_images(seed=3)[:2]
    targets = make_targets(arch, images)
    torch.manual_seed(11)
    losses = ours(images, targets)
    torch.manual_seed(11)
    expected = theirs(images, targets)
    assert set(losses) == set(expected)
    for name in expected:
        assert expected[name] > 0, name
        torch.testing.assert_close(losses[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_v2_layout_is_read_off_the_weights(pair):
    arch, ours, _ = pair
    config = ours.config
    v2 = arch.endswith("_v2")
    assert config.backbone.fpn_norm == ("bn" if v2 else "none") and config.rpn.num_convs == (2 if v2 else 1)
    box = config.box_head
    assert (box.num_convs, box.num_fcs, box.norm) == ((4, 1, "bn") if v2 else (0, 2, "none"))
    if config.mask_head.enabled:
        assert config.mask_head.norm == ("bn" if v2 else "none")
