"""Mask head layers, targets, loss, inference and pasting against torchvision's own code."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import (
    maskrcnn_inference,
    maskrcnn_loss,
    paste_masks_in_image,
    project_masks_on_boxes,
)

from maskrcnn.model.mask_head import (
    MaskFCNHead,
    build_mask_head,
    mask_inference,
    mask_loss,
    mask_targets,
    paste_masks,
)


def _random_boxes(n: int, height: int, width: int, generator: torch.Generator, max_side: float = 40) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * torch.tensor([width - 4.0, height - 4.0])
    wh = torch.rand(n, 2, generator=generator) * max_side + 2
    return torch.cat([xy, torch.minimum(xy + wh, torch.tensor([float(width), float(height)]))], dim=1)


def test_fcn_head_equals_torchvision_heads_and_predictor():
    torch.manual_seed(0)
    ours = MaskFCNHead(in_channels=8, out_channels=4, conv_dim=16, num_convs=4)
    tv_head = MaskRCNNHeads(8, [16] * 4, 1)
    tv_predictor = MaskRCNNPredictor(16, 16, 4)
    # The module docstring's name mapping.
    state = ours.state_dict()
    tv_head.load_state_dict({k.removeprefix("convs."): v for k, v in state.items() if k.startswith("convs.")})
    tv_predictor.load_state_dict(
        {
            "conv5_mask.weight": state["deconv.weight"],
            "conv5_mask.bias": state["deconv.bias"],
            "mask_fcn_logits.weight": state["predictor.weight"],
            "mask_fcn_logits.bias": state["predictor.bias"],
        }
    )
    features = torch.randn(3, 8, 14, 14)
    logits = ours(features)
    assert logits.shape == (3, 4, 28, 28)
    torch.testing.assert_close(logits, tv_predictor(tv_head(features)))


@pytest.mark.parametrize("architecture", ["fcn", "deep_fcn", "resnet", "hourglass"])
@pytest.mark.parametrize("class_agnostic", [False, True])
def test_build_mask_head_shapes(architecture, class_agnostic):
    head = build_mask_head(
        architecture=architecture,
        in_channels=8,
        num_classes=3,
        conv_dim=8,
        num_convs=2,
        norm="gn",
        class_agnostic=class_agnostic,
    )
    assert head(torch.randn(2, 8, 14, 14)).shape == (2, 1 if class_agnostic else 4, 28, 28)


@pytest.mark.parametrize("architecture", ["fcn", "resnet", "hourglass"])
@pytest.mark.parametrize("class_agnostic", [False, True])
@pytest.mark.parametrize("num_rois", [5, 0])
def test_own_class_logits_equal_the_full_heads_channel(architecture, class_agnostic, num_rois):
    """`head(x, labels)` (training) gives the channel `labels[r]` of `head(x)`, and the same
    gradients for every weight and the features (float64: to rounding)."""
    torch.manual_seed(0)
    head = build_mask_head(architecture=architecture, in_channels=6, num_classes=4, conv_dim=8, num_convs=2,
                           norm="gn", class_agnostic=class_agnostic).double()
    for parameter in head.parameters():  # the resnet / hourglass inits put zeros where this test needs values
        parameter.data.normal_(0, 0.5)
    labels = torch.randint(1, 5, (num_rois,))
    targets = torch.rand(num_rois, 28, 28, dtype=torch.float64)

    def loss_and_gradients(own_class: bool):
        features = torch.randn(num_rois, 6, 14, 14, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        features.requires_grad_()
        head.zero_grad()
        logits = head(features, labels) if own_class else head(features)
        assert logits.shape == (num_rois, 1 if own_class or class_agnostic else 5, 28, 28)
        loss = mask_loss(logits, targets, labels)
        loss.backward()
        return [loss, features.grad] + [p.grad for p in head.parameters()], logits

    (full, full_logits), (own, own_logits) = loss_and_gradients(False), loss_and_gradients(True)
    if num_rois:
        channel = labels if not class_agnostic else torch.zeros_like(labels)
        torch.testing.assert_close(own_logits[:, 0], full_logits[torch.arange(num_rois), channel], rtol=0, atol=1e-12)
    for a, b in zip(full, own):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("architecture", ["fcn", "resnet", "hourglass"])
def test_own_class_logits_in_channels_last(architecture):
    """A head and features in channels_last (`model.to(memory_format=torch.channels_last)`) give the
    training path the same logits as the default layout."""
    torch.manual_seed(0)
    head = build_mask_head(architecture=architecture, in_channels=6, num_classes=4, conv_dim=8, num_convs=2,
                           norm="gn").double()
    features, labels = torch.randn(5, 6, 14, 14, dtype=torch.float64), torch.randint(1, 5, (5,))
    expected = head(features, labels)
    head.to(memory_format=torch.channels_last)
    logits = head(features.contiguous(memory_format=torch.channels_last), labels)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-12)


def test_own_class_logits_under_bf16_autocast():
    """The training path under CPU bf16 autocast stays within bf16 rounding of the full head's channel."""
    torch.manual_seed(0)
    head = MaskFCNHead(in_channels=8, out_channels=5, conv_dim=16, num_convs=2)
    features, labels = torch.randn(7, 8, 14, 14), torch.randint(1, 5, (7,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        own, full = head(features, labels), head(features)[torch.arange(7), labels]
    reference = head(features)[torch.arange(7), labels]
    assert own.shape == (7, 1, 28, 28)
    scale = reference.abs().max()
    assert (own[:, 0].float() - reference).abs().max() <= 0.02 * scale
    assert (full.float() - reference).abs().max() <= 0.02 * scale


def test_build_mask_head_rejects_unknown_architecture():
    with pytest.raises(ValueError, match="'unet'"):
        build_mask_head(architecture="unet", in_channels=8, num_classes=3)


def test_mask_targets_and_loss_equal_torchvision():
    g = torch.Generator().manual_seed(1)
    images = []
    for num_instances, num_rois, (height, width) in [(3, 7, (50, 60)), (2, 4, (40, 45))]:
        masks = (torch.rand(num_instances, height, width, generator=g) > 0.5).to(torch.uint8)
        boxes = _random_boxes(num_rois, height, width, g)
        matched = torch.randint(0, num_instances, (num_rois,), generator=g)
        labels = torch.randint(1, 5, (num_instances,), generator=g)
        images.append((masks, boxes, matched, labels))

    targets = [mask_targets(m, b, i, 28) for m, b, i, _ in images]
    for target, (masks, boxes, matched, _) in zip(targets, images):
        torch.testing.assert_close(target, project_masks_on_boxes(masks, boxes, matched, 28))

    logits = torch.randn(11, 5, 28, 28, generator=g, requires_grad=True)
    roi_labels = torch.cat([labels[matched] for _, _, matched, labels in images])
    ours = mask_loss(logits, torch.cat(targets), roi_labels)
    theirs = maskrcnn_loss(
        logits, [b for _, b, _, _ in images], [m for m, _, _, _ in images], [label for *_, label in images],
        [i for _, _, i, _ in images],
    )
    torch.testing.assert_close(ours, theirs)


def test_mask_targets_call_compact_masks():
    class CompactMasks:  # the InstanceMasks protocol (docs/design.md)
        def crop_and_resize(self, boxes, indices, size):
            self.args = (boxes, indices, size)
            return torch.ones(len(boxes), size, size)

    compact = CompactMasks()
    boxes = torch.tensor([[1.0, 2, 10, 12], [0, 0, 5, 5]])
    out = mask_targets(compact, boxes, torch.tensor([1, 0]), 14)
    assert out.shape == (2, 14, 14) and torch.equal(compact.args[1], torch.tensor([1, 0]))


def test_mask_loss_empty_is_zero_and_connected():
    logits = torch.randn(0, 3, 28, 28, requires_grad=True)
    loss = mask_loss(logits, torch.zeros(0, 28, 28), torch.zeros(0, dtype=torch.int64))
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert logits.grad is not None


def test_class_agnostic_loss_and_inference_use_channel_zero():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 1, 28, 28, generator=g)
    targets = torch.rand(4, 28, 28, generator=g)
    labels = torch.tensor([3, 1, 2, 3])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], targets)
    torch.testing.assert_close(mask_loss(logits, targets, labels), expected)
    torch.testing.assert_close(mask_inference(logits, labels), logits.sigmoid())


def test_mask_inference_equals_torchvision():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 4, 28, 28, generator=g)
    labels = torch.tensor([1, 3, 2, 2, 1, 3])
    theirs = torch.cat(maskrcnn_inference(logits, [labels[:2], labels[2:]]))
    torch.testing.assert_close(mask_inference(logits, labels), theirs)


@pytest.mark.parametrize("height,width", [(60, 80), (37, 23)])
def test_paste_masks_equals_torchvision(height, width):
    g = torch.Generator().manual_seed(4)
    boxes = torch.cat(
        [
            _random_boxes(12, height, width, g, max_side=70),  # some larger than the image
            torch.tensor(
                [
                    [-10.0, -5, 15, 20],  # sticks out at the top left
                    [width - 5.0, height - 3, width + 30, height + 9],  # bottom right
                    [3.0, 4, 3.2, 4.1],  # far below one pixel
                    [0.0, 0, float(width), float(height)],  # the whole image
                ]
            ),
        ]
    )
    masks = torch.rand(len(boxes), 1, 28, 28, generator=g)
    ours = paste_masks(masks, boxes, (height, width))
    theirs = paste_masks_in_image(masks, boxes, (height, width))
    assert ours.shape == theirs.shape == (len(boxes), 1, height, width)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("aligned", [False, True])
def test_paste_masks_outside_the_image_or_empty_gives_zeros(aligned):
    # (torchvision's paste_masks_in_image raises for a box entirely right of the image.)
    boxes = torch.tensor([[45.0, 2, 60, 10], [-30.0, -20, -2, -1], [5.0, 5, 5, 15], [10.0, 10, 20, 20]])
    pasted = paste_masks(torch.ones(4, 1, 28, 28), boxes, (30, 40), aligned=aligned)
    assert torch.isfinite(pasted).all()
    assert torch.all(pasted[:2] == 0) and pasted[3].sum() > 50
    if aligned:
        assert torch.all(pasted[2] == 0)  # an empty box covers no pixel centre


def test_paste_masks_padding_zero_and_empty():
    g = torch.Generator().manual_seed(5)
    boxes = _random_boxes(5, 30, 30, g)
    masks = torch.rand(5, 1, 14, 14, generator=g)
    torch.testing.assert_close(
        paste_masks(masks, boxes, (30, 30), padding=0),
        paste_masks_in_image(masks, boxes, (30, 30), padding=0),
        atol=1e-5,
        rtol=0,
    )
    empty = paste_masks(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (17, 19))
    assert empty.shape == (0, 1, 17, 19)


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize(
    "box,aligned,min_iou",
    [
        ((20, 12, 50, 40), True, 0.99),  # a mask that fills its whole box
        ((20, 12, 50, 40), False, 0.9),  # torchvision's convention loses up to a pixel per side
        ((33, 21, 34, 22), True, 0.99),  # a 1-pixel object (torchvision's convention moves it)
        ((0, 0, 64, 48), True, 0.99),  # the whole image
        ((0, 0, 64, 48), False, 0.9),
    ],
)
def test_objects_survive_targets_and_pasting(box, aligned, min_iou):
    height, width = 48, 64
    x1, y1, x2, y2 = box
    truth = torch.zeros(1, height, width, dtype=torch.uint8)
    truth[0, y1:y2, x1:x2] = 1
    gt_box = torch.tensor([box], dtype=torch.float32)  # the tight box, continuous coordinates
    target = mask_targets(truth, gt_box, torch.tensor([0]), 28, aligned=aligned)  # what the head learns
    pasted = paste_masks(target[:, None], gt_box, (height, width), aligned=aligned)[0, 0]
    assert _iou(pasted >= 0.5, truth[0].bool()) >= min_iou


def test_aligned_paste_equals_grid_sample_reference():
    # detectron2's convention written with grid_sample on the whole image, one mask at a time:
    # pixel centres (+0.5) mapped into the box, zeros outside the mask.
    g = torch.Generator().manual_seed(6)
    height, width = 40, 50
    boxes = torch.cat([_random_boxes(8, height, width, g, max_side=45), torch.tensor([[-6.0, 30, 20, 47]])])
    masks = torch.rand(len(boxes), 1, 28, 28, generator=g)
    reference = []
    for mask, (x1, y1, x2, y2) in zip(masks, boxes.tolist()):
        xs = ((torch.arange(width) + 0.5 - x1) / (x2 - x1)) * 2 - 1
        ys = ((torch.arange(height) + 0.5 - y1) / (y2 - y1)) * 2 - 1
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]  # [1, H, W, 2]
        reference.append(torch.nn.functional.grid_sample(mask[None], grid, align_corners=False)[0])
    ours = paste_masks(masks, boxes, (height, width), aligned=True)
    torch.testing.assert_close(ours, torch.stack(reference), atol=1e-5, rtol=0)
