"""The whole model on a small ResNet-18 / narrow FPN: training, gradients, empty cases, bad targets."""

import copy

import pytest
import torch

from maskrcnn.config import ModelConfig
from maskrcnn.model.mask_rcnn import MaskRCNN, build_model

NUM_CLASSES, NUM_KEYPOINTS = 3, 4
# Several test processes share two cores: torch's default of one thread per core makes each of them
# spin-wait for the others (small convolutions ~20x slower). One thread per process is faster here.
torch.set_num_threads(1)


def small_config(*, masks: bool = True, keypoints: bool = True) -> ModelConfig:
    config = ModelConfig(num_classes=NUM_CLASSES)
    config.backbone.depth, config.backbone.norm, config.backbone.trainable_stages = 18, "gn", 5
    config.backbone.fpn_channels = 32
    config.transform.min_size, config.transform.min_size_test, config.transform.max_size = [96], 96, 128
    config.rpn.pre_nms_top_n_train = config.rpn.post_nms_top_n_train = 200
    config.rpn.pre_nms_top_n_test = config.rpn.post_nms_top_n_test = 100
    config.rpn.batch_size_per_image = 64
    config.box_head.batch_size_per_image, config.box_head.fc_dim = 64, 64
    config.mask_head.enabled, config.mask_head.num_convs, config.mask_head.conv_dim = masks, 2, 16
    config.keypoint_head.enabled, config.keypoint_head.num_keypoints = keypoints, NUM_KEYPOINTS
    config.keypoint_head.num_convs, config.keypoint_head.conv_dim = 2, 16
    return config


def synthetic_example(height=96, width=112):
    """One image with two bright rectangles and their boxes / masks / keypoints (continuous coordinates)."""
    image = torch.full((3, height, width), 0.1)
    boxes = torch.tensor([[10.0, 12.0, 50.0, 60.0], [60.0, 30.0, 100.0, 80.0]])
    masks = torch.zeros(2, height, width, dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
        masks[i, y1:y2, x1:x2] = 1
        image[i, y1:y2, x1:x2] = 0.9
    corners = torch.stack([boxes[:, [0, 1]] + 2, boxes[:, [2, 1]] + torch.tensor([-2.0, 2.0]),
                           boxes[:, [0, 3]] + torch.tensor([2.0, -2.0]), boxes[:, [2, 3]] - 2], dim=1)
    keypoints = torch.cat([corners, torch.full((2, 4, 1), 2.0)], dim=2)
    target = {"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks, "keypoints": keypoints, "image_id": 7}
    return image, target


def empty_target(height=96, width=112):
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, height, width, dtype=torch.uint8), "keypoints": torch.zeros(0, NUM_KEYPOINTS, 3)}


@pytest.fixture(scope="module")
def model() -> MaskRCNN:
    torch.manual_seed(0)
    return build_model(small_config())


def test_build_model_heads_follow_the_config():
    torch.manual_seed(0)
    faster = build_model(small_config(masks=False, keypoints=False)).train()
    image, target = synthetic_example()
    losses = faster([image], [{"boxes": target["boxes"], "labels": target["labels"]}])
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    faster.eval()
    with torch.no_grad():
        (detection,) = faster([image])
    assert set(detection) == {"boxes", "labels", "scores"}
    assert faster.config.num_classes == NUM_CLASSES


def test_gradients_reach_every_trainable_parameter(model):
    model = copy.deepcopy(model).train()
    image, target = synthetic_example()
    torch.manual_seed(1)
    losses = model([image, image.flip(-1)], [target, target])
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg",
                           "loss_mask", "loss_keypoint"}
    sum(losses.values()).backward()
    without_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert without_grad == []
    zero_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad.abs().sum() == 0]
    # only the class-specific rows of classes absent from the image may get no gradient
    assert all("predictor" in n for n in zero_grad), zero_grad


def test_a_few_dozen_steps_drive_the_loss_down():
    config = small_config()
    # a frozen random backbone keeps the test fast; FPN, RPN and the heads learn
    config.backbone.norm, config.backbone.trainable_stages = "frozen_bn", 0
    torch.manual_seed(0)
    model = build_model(config).train()
    image, target = synthetic_example()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=0.01, momentum=0.9)
    torch.manual_seed(2)
    totals = []
    for _ in range(30):
        losses = model([image], [target])
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 10.0)  # the untrained keypoint loss starts near log(56^2)
        optimizer.step()
        totals.append(total.item())
    assert all(torch.isfinite(torch.tensor(totals)))
    assert sum(totals[-5:]) / 5 < 0.7 * sum(totals[:5]) / 5, totals


def test_image_without_targets_trains_with_zero_connected_losses(model):
    model = copy.deepcopy(model).train()
    image, target = synthetic_example()
    torch.manual_seed(3)
    losses = model([image], [empty_target()])
    assert all(torch.isfinite(v) for v in losses.values())
    for name in ("loss_rpn_box_reg", "loss_box_reg", "loss_mask", "loss_keypoint"):
        assert losses[name].item() == 0.0, name
        assert losses[name].requires_grad, name
    assert losses["loss_objectness"] > 0 and losses["loss_classifier"] > 0
    sum(losses.values()).backward()
    # and mixed with a non-empty image in one batch
    losses = model([image, image], [target, empty_target()])
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())


def test_zero_detections_give_correctly_shaped_empty_outputs(model):
    model = copy.deepcopy(model).eval()
    model.roi_heads.score_thresh = 1.1  # nothing can pass
    with torch.no_grad():
        outputs = model([torch.rand(3, 70, 90), torch.rand(3, 50, 64)])
    for output, (h, w) in zip(outputs, [(70, 90), (50, 64)]):
        assert output["boxes"].shape == (0, 4) and output["scores"].shape == (0,)
        assert output["labels"].shape == (0,) and output["labels"].dtype == torch.int64
        assert output["masks"].shape == (0, 1, h, w)
        assert output["keypoints"].shape == (0, NUM_KEYPOINTS, 3)
        assert output["keypoints_scores"].shape == (0, NUM_KEYPOINTS)


def test_eval_outputs_are_at_the_original_size(model):
    model = copy.deepcopy(model).eval()
    model.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        (output,) = model([torch.rand(3, 150, 200)])
    assert len(output["boxes"]) > 0
    assert output["masks"].shape[-2:] == (150, 200)
    assert output["boxes"][:, [0, 2]].max() <= 200 and output["boxes"][:, [1, 3]].max() <= 150


def test_segment_boxes_on_the_detections_equals_the_detector_output(model):
    model = copy.deepcopy(model).eval()
    model.roi_heads.score_thresh = 0.0
    images = [torch.rand(3, 150, 200), torch.rand(3, 90, 120)]
    with torch.no_grad():
        detected = model(images)
    assert all(len(d["boxes"]) > 0 for d in detected)
    given = model.segment_boxes(images, [d["boxes"] for d in detected], [d["labels"] for d in detected])
    for ours, reference in zip(given, detected):
        torch.testing.assert_close(ours["boxes"], reference["boxes"], rtol=0, atol=1e-4)
        assert torch.equal(ours["labels"], reference["labels"])
        # the boxes go through the resize and back once more: masks agree to float rounding
        torch.testing.assert_close(ours["masks"], reference["masks"], rtol=0, atol=1e-3)
        torch.testing.assert_close(ours["keypoints"], reference["keypoints"], rtol=0, atol=1e-3)


def test_segment_boxes_wants_eval_mode_and_matching_lists(model):
    image = torch.rand(3, 96, 112)
    with pytest.raises(RuntimeError, match="eval mode"):
        copy.deepcopy(model).train().segment_boxes([image], [torch.zeros(0, 4)], [torch.zeros(0)])
    with pytest.raises(ValueError, match="1 images, 2 box sets"):
        copy.deepcopy(model).eval().segment_boxes([image], [torch.zeros(0, 4)] * 2, [torch.zeros(0)])


def bad(target, **changes):
    target = dict(target)
    target.update(changes)
    return target


@pytest.mark.parametrize("change,message", [
    (dict(boxes=torch.tensor([[10.0, 12.0, 10.0, 60.0], [60.0, 30.0, 100.0, 80.0]])), r"image 0 \(image_id 7\): boxes\[0\].*degenerate"),
    (dict(boxes=torch.tensor([[10.0, 12.0, 50.0, 60.0], [60.0, 90.0, 100.0, 80.0]])), r"boxes\[1\].*inverted"),
    (dict(boxes=torch.tensor([[10.0, 12.0, 50.0, float("nan")], [60.0, 30.0, 100.0, 80.0]])), r"boxes\[0\].*not finite"),
    (dict(boxes=torch.zeros(2, 5)), r"boxes has shape \[2, 5\], expected \[\*, 4\]"),
    (dict(labels=torch.tensor([1, 0])), r"labels\[1\] = 0 is out of range 1..3"),
    (dict(labels=torch.tensor([4, 1])), r"labels\[0\] = 4 is out of range"),
    (dict(labels=torch.tensor([1.0, 2.0])), r"labels must have dtype torch.int64"),
    (dict(labels=torch.tensor([1])), r"labels has shape \[1\], expected \[2\]"),
    (dict(masks=torch.zeros(3, 96, 112, dtype=torch.uint8)), r"masks has shape \[3, 96, 112\], expected \[2, 96, 112\]"),
    (dict(masks=torch.zeros(2, 90, 112, dtype=torch.uint8)), r"masks has shape"),
    (dict(keypoints=torch.zeros(1, NUM_KEYPOINTS, 3)), r"keypoints has shape \[1, 4, 3\], expected \[2, 4, 3\]"),
    (dict(keypoints=torch.zeros(2, 17, 3)), r"keypoints has shape"),
    (dict(point_coords=torch.zeros(2, 5, 2)), r"target has no 'point_labels'"),
    (dict(crowd_boxes=torch.zeros(4)), r"crowd_boxes has shape"),
])
def test_bad_targets_name_image_and_field(model, change, message):
    model = model.train()
    image, target = synthetic_example()
    with pytest.raises(ValueError, match=message):
        model([image], [bad(target, **change)])


def test_missing_fields_and_targets(model):
    model = model.train()
    image, target = synthetic_example()
    masks_missing = {k: v for k, v in target.items() if k != "masks"}
    with pytest.raises(ValueError, match=r"image 1 \(image_id 7\).*needs target 'masks'"):
        model([image, image], [target, masks_missing])
    with pytest.raises(ValueError, match="targets are required"):
        model([image])
    with pytest.raises(ValueError, match="2 images but 1 targets"):
        model([image, image], [target])
    with pytest.raises(TypeError, match="list of"):
        model(image[None], [target])


def test_trains_on_compact_instance_masks_and_crowd_regions(model):
    """InstanceMasks (polygons, resized lazily by the transform) in place of dense masks, plus a crowd box."""
    from maskrcnn.data.masks import InstanceMasks

    model = copy.deepcopy(model).train()
    image, target = synthetic_example()
    polygons = [[[x1, y1, x2, y1, x2, y2, x1, y2]] for x1, y1, x2, y2 in target["boxes"].tolist()]
    compact = dict(target, masks=InstanceMasks(polygons, image_size=(96, 112)),
                   crowd_boxes=torch.tensor([[0.0, 70.0, 40.0, 96.0]]))
    torch.manual_seed(4)
    losses = model([image], [compact])
    torch.manual_seed(4)
    dense_losses = model([image], [target])
    assert all(torch.isfinite(v) for v in losses.values())
    # rectangles rasterise to the same pixels either way: the mask losses agree closely
    torch.testing.assert_close(losses["loss_mask"], dense_losses["loss_mask"], rtol=0.05, atol=0.02)
    with pytest.raises(ValueError, match=r"masks hold 2 instances of size \(50, 50\)"):
        model([image], [dict(target, masks=InstanceMasks(polygons, image_size=(50, 50)))])


def test_aligned_mask_head_pastes_in_continuous_coordinates():
    config = small_config(keypoints=False)
    config.mask_head.aligned = True
    torch.manual_seed(0)
    model = build_model(config).eval()
    assert model.paste_aligned and model.roi_heads.mask_pooler.aligned
    model.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        (output,) = model([torch.rand(3, 64, 80)])
    assert len(output["boxes"]) > 0 and output["masks"].shape[1:] == (1, 64, 80)
