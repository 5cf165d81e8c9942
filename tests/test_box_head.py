"""Box head layers, Fast R-CNN loss and box inference against torchvision's own code."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import _utils as tv_utils
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads as TvRoIHeads
from torchvision.models.detection.roi_heads import fastrcnn_loss

from maskrcnn.model.box_head import BoxHead, BoxPredictor, box_inference, fast_rcnn_loss
from maskrcnn.model.box_ops import BoxCoder


def _random_boxes(n: int, size: float, generator: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * size * 0.7
    wh = torch.rand(n, 2, generator=generator) * size * 0.3 + 2
    return torch.cat([xy, xy + wh], dim=1)


def test_layers_equal_torchvision_with_the_same_weights():
    torch.manual_seed(0)
    ours_head = BoxHead(in_channels=8, resolution=7, fc_dim=32)
    ours_pred = BoxPredictor(in_channels=32, num_classes=4)
    tv_head = TwoMLPHead(8 * 49, 32)
    tv_pred = FastRCNNPredictor(32, 5)
    # Parameter names map one to one (the module docstring's table).
    tv_head.load_state_dict(ours_head.state_dict())
    tv_pred.load_state_dict(ours_pred.state_dict())
    features = torch.randn(6, 8, 7, 7)
    logits, deltas = ours_pred(ours_head(features))
    tv_logits, tv_deltas = tv_pred(tv_head(features))
    assert logits.shape == (6, 5) and deltas.shape == (6, 20)
    torch.testing.assert_close(logits, tv_logits)
    torch.testing.assert_close(deltas, tv_deltas)


@pytest.mark.parametrize("norm", ["none", "gn", "bn"])
def test_conv_head_shapes_and_norm_layers(norm):
    head = BoxHead(in_channels=8, resolution=7, fc_dim=16, num_convs=2, conv_dim=12, norm=norm)
    assert head(torch.randn(3, 8, 7, 7)).shape == (3, 16)
    names = {name for name, _ in head.named_parameters()}
    assert ("convs.0.0.bias" in names) == (norm == "none")  # a norm cancels the conv bias
    assert ("convs.1.1.weight" in names) == (norm != "none")


def test_unknown_norm_is_named_in_the_error():
    with pytest.raises(ValueError, match="'layernorm'"):
        BoxHead(in_channels=8, resolution=7, num_convs=1, norm="layernorm")


def test_fast_rcnn_loss_equals_torchvision():
    g = torch.Generator().manual_seed(1)
    num_rois, num_classes = 40, 6  # K + 1
    logits = torch.randn(num_rois, num_classes, generator=g, requires_grad=True)
    deltas = torch.randn(num_rois, num_classes * 4, generator=g, requires_grad=True)
    labels = torch.randint(0, num_classes, (num_rois,), generator=g)
    labels[:15] = 0
    targets = torch.randn(num_rois, 4, generator=g)
    cls, box = fast_rcnn_loss(logits, deltas, labels, targets)
    tv_cls, tv_box = fastrcnn_loss(logits, deltas, [labels[:25], labels[25:]], [targets[:25], targets[25:]])
    torch.testing.assert_close(cls, tv_cls)
    torch.testing.assert_close(box, tv_box)
    assert box > 0


def test_fast_rcnn_loss_without_positives_or_rois_is_zero_and_connected():
    logits = torch.randn(5, 3, requires_grad=True)
    deltas = torch.randn(5, 12, requires_grad=True)
    cls, box = fast_rcnn_loss(logits, deltas, torch.zeros(5, dtype=torch.int64), torch.zeros(5, 4))
    assert cls > 0 and box == 0 and box.requires_grad
    (cls + box).backward()
    assert deltas.grad is not None and torch.all(deltas.grad == 0)

    logits = torch.zeros(0, 3, requires_grad=True)
    deltas = torch.zeros(0, 12, requires_grad=True)
    cls, box = fast_rcnn_loss(logits, deltas, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4))
    assert cls.item() == 0 and box.item() == 0
    (cls + box).backward()
    assert logits.grad is not None and deltas.grad is not None


def _tv_postprocessor(score_thresh: float, nms_thresh: float, detections: int) -> TvRoIHeads:
    return TvRoIHeads(
        None, None, None, 0.5, 0.5, 512, 0.25, (10.0, 10.0, 5.0, 5.0), score_thresh, nms_thresh, detections
    )


@pytest.mark.parametrize("score_thresh,detections", [(0.05, 100), (0.0, 7)])
def test_box_inference_equals_torchvision_postprocess(score_thresh, detections):
    g = torch.Generator().manual_seed(2)
    num_classes = 5  # K + 1
    proposals = [_random_boxes(30, 100, g), _random_boxes(0, 100, g), _random_boxes(25, 60, g)]
    image_sizes = [(100, 90), (80, 80), (60, 64)]
    num_rois = sum(len(p) for p in proposals)
    # Peaked logits so that several classes pass the threshold and NMS has work to do.
    logits = torch.randn(num_rois, num_classes, generator=g) * 3
    deltas = torch.randn(num_rois, num_classes * 4, generator=g) * 0.5

    ours = box_inference(
        logits,
        deltas,
        proposals,
        image_sizes,
        box_coder=BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)),
        score_thresh=score_thresh,
        nms_thresh=0.5,
        detections_per_img=detections,
    )
    tv_boxes, tv_scores, tv_labels = _tv_postprocessor(score_thresh, 0.5, detections).postprocess_detections(
        logits, deltas, proposals, image_sizes
    )
    assert len(ours) == 3
    assert len(ours[0]["boxes"]) > 3
    for result, boxes, scores, labels in zip(ours, tv_boxes, tv_scores, tv_labels):
        torch.testing.assert_close(result["boxes"], boxes)
        torch.testing.assert_close(result["scores"], scores)
        assert torch.equal(result["labels"], labels)
        assert result["labels"].dtype == torch.int64
    assert ours[1]["boxes"].shape == (0, 4) and ours[1]["scores"].shape == (0,)
    assert len(ours[0]["boxes"]) <= detections


def test_box_inference_with_nothing_above_threshold_gives_empty_shapes():
    logits = torch.zeros(4, 3)
    logits[:, 0] = 10  # background wins everywhere
    result = box_inference(
        logits,
        torch.zeros(4, 12),
        [torch.tensor([[0.0, 0, 10, 10]] * 4)],
        [(20, 20)],
        box_coder=BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)),
        score_thresh=0.05,
        nms_thresh=0.5,
        detections_per_img=100,
    )[0]
    assert result["boxes"].shape == (0, 4)
    assert result["scores"].shape == (0,)
    assert result["labels"].shape == (0,) and result["labels"].dtype == torch.int64


def test_box_coder_decode_matches_torchvision_for_the_head_weights():
    # box_inference relies on A's BoxCoder agreeing with torchvision's for [R, 4 * (K + 1)] deltas.
    g = torch.Generator().manual_seed(3)
    boxes = _random_boxes(10, 50, g)
    deltas = torch.randn(10, 12, generator=g)
    ours = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)).decode(deltas, boxes)
    theirs = tv_utils.BoxCoder((10.0, 10.0, 5.0, 5.0)).decode(deltas, [boxes])
    torch.testing.assert_close(ours, theirs)


def test_detectron2_postprocess_keeps_tiny_boxes_and_drops_empty_ones_after_nms():
    """torchvision drops boxes under 0.01 px before NMS; detectron2 keeps them, and removes boxes
    with a zero side (clipped against the image border) only after NMS and the top-k."""
    proposals = [torch.tensor([[10.0, 10, 10.0078125, 20], [30, 30, 40, 40], [55, 5, 70, 15]])]
    logits = torch.tensor([[0.0, 4.0], [0.0, 3.0], [0.0, 5.0]])  # K = 1, one foreground class
    kwargs = dict(box_coder=BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)), score_thresh=0.05, nms_thresh=0.5,
                  detections_per_img=2)
    results = {
        postprocess: box_inference(logits, torch.zeros(3, 8), proposals, [(50, 50)], postprocess=postprocess,
                                   **kwargs)[0]
        for postprocess in ("torchvision", "detectron2")
    }
    # the third box lies right of the 50-px image: clipped to zero width
    assert results["detectron2"]["boxes"].tolist() == [[10.0, 10, 10.0078125, 20]]  # the top 2 held the empty one
    assert results["torchvision"]["boxes"].tolist() == [[30.0, 30, 40, 40]]
