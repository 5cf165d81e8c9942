"""Box head: pooled RoI features -> class scores and class-specific box deltas.

Layers (our name -> torchvision's name in a `fasterrcnn_resnet50_fpn` / `maskrcnn_resnet50_fpn`
state dict, inside `roi_heads.`):

    box_head.fc6        -> box_head.fc6            Linear(C * 7 * 7, 1024)
    box_head.fc7        -> box_head.fc7            Linear(1024, 1024)
    box_predictor.cls_score -> box_predictor.cls_score   Linear(1024, K + 1)
    box_predictor.bbox_pred -> box_predictor.bbox_pred   Linear(1024, (K + 1) * 4)
    box_head.convs.{i}.0 / .1 (conv / norm, only when num_convs > 0; torchvision's v2 head
                               `FastRCNNConvFCHead` is not mapped)

The Fast R-CNN loss and the box inference are pure functions below the layers, testable with
plain tensors. `K` is the number of foreground classes; column 0 is background everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import clip_boxes_to_image, remove_small_boxes

from maskrcnn.model.box_ops import BoxCoder, batched_nms_top_k
from maskrcnn.model.layers import conv3x3_norm_relu

BOX_POSTPROCESSES = ("torchvision", "detectron2")


class BoxHead(nn.Module):
    """Optional conv3x3 layers, then two fully connected layers ("2fc", Mask R-CNN's FPN head), or
    one (`num_fcs=1`: torchvision's v2 head, 4 convs + 1 fc).

    features: `[R, in_channels, S, S]` pooled RoI features -> `[R, fc_dim]`.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        resolution: int,
        fc_dim: int = 1024,
        num_convs: int = 0,
        conv_dim: int = 256,
        norm: str = "none",
        num_fcs: int = 2,
    ) -> None:
        super().__init__()
        if num_fcs not in (1, 2):
            raise ValueError(f"the box head has 1 or 2 fully connected layers, got num_fcs={num_fcs}")
        self.convs = nn.Sequential(
            *[conv3x3_norm_relu(in_channels if i == 0 else conv_dim, conv_dim, norm) for i in range(num_convs)]
        )
        flat_channels = (conv_dim if num_convs > 0 else in_channels) * resolution * resolution
        self.fc6 = nn.Linear(flat_channels, fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim) if num_fcs == 2 else None

    def forward(self, features: Tensor) -> Tensor:
        x = F.relu(self.fc6(self.convs(features).flatten(start_dim=1)))
        return F.relu(self.fc7(x)) if self.fc7 is not None else x


class BoxPredictor(nn.Module):
    """`[R, in_channels]` -> class logits `[R, K + 1]` and class-specific deltas `[R, (K + 1) * 4]`."""

    def __init__(self, *, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes + 1)
        self.bbox_pred = nn.Linear(in_channels, (num_classes + 1) * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


def fast_rcnn_loss(
    class_logits: Tensor,  # [R, K + 1]
    box_deltas: Tensor,  # [R, (K + 1) * 4]
    labels: Tensor,  # [R] int64, 0 = background
    regression_targets: Tensor,  # [R, 4] encoded matched gt boxes (ignored for background)
) -> tuple[Tensor, Tensor]:
    """Cross-entropy over the sampled RoIs, and smooth-L1 (beta 1/9) on the deltas of each
    positive RoI's own class, summed and divided by the number of sampled RoIs (positives and
    negatives alike, as torchvision and detectron2 do: a batch with few positives does not blow
    up the box loss). Returns `(loss_classifier, loss_box_reg)`; both exactly 0 and connected to
    the graph when `R == 0` (cross-entropy's mean over nothing would be NaN)."""
    if labels.numel() == 0:
        return class_logits.sum() * 0, box_deltas.sum() * 0
    loss_classifier = F.cross_entropy(class_logits, labels)

    positive = torch.where(labels > 0)[0]
    deltas_per_class = box_deltas.reshape(box_deltas.shape[0], -1, 4)  # [R, K + 1, 4]
    loss_box_reg = F.smooth_l1_loss(
        deltas_per_class[positive, labels[positive]],
        regression_targets[positive],
        beta=1 / 9,
        reduction="sum",
    ) / labels.numel()
    return loss_classifier, loss_box_reg


def box_inference(
    class_logits: Tensor,  # [R, K + 1], R = sum of proposals over the images
    box_deltas: Tensor,  # [R, (K + 1) * 4]
    proposals: list[Tensor],  # per image [Ri, 4] x1y1x2y2, input-image pixels
    image_sizes: list[tuple[int, int]],  # per image (H, W) of the resized image
    *,
    box_coder: BoxCoder,
    score_thresh: float,
    nms_thresh: float,
    detections_per_img: int,
    suppressed_labels: tuple[int, ...] = (),
    postprocess: str = "torchvision",
) -> list[dict[str, Tensor]]:
    """Detections per image: `{"boxes": [N, 4], "scores": [N], "labels": [N] int64}`, best first.

    Softmax scores; one decoded box per (proposal, foreground class), clipped to the image; a
    (proposal, class) pair is kept when its score > `score_thresh`; NMS runs per class
    (`batched_nms`); the `detections_per_img` best survive (`batched_nms_top_k`: the same boxes,
    without suppressing the candidates below them). `suppressed_labels` are never
    candidates (class slots that stand for no category). Degenerate boxes: `postprocess`
    "torchvision" drops boxes narrower or shorter than 0.01 px before NMS; "detectron2" keeps them
    through NMS and the top-k and drops the empty ones (a side of 0 after clipping) at the end,
    as its `detector_postprocess` does. Only the loop over images is in Python.
    """
    if postprocess not in BOX_POSTPROCESSES:
        raise ValueError(f"box_head.postprocess must be one of {BOX_POSTPROCESSES}, got {postprocess!r}")
    out_channels = class_logits.shape[-1]  # K + 1 (background first)
    boxes_all = box_coder.decode(box_deltas, torch.cat(proposals))  # [R, K + 1, 4]
    scores_all = F.softmax(class_logits, dim=-1)  # [R, K + 1]
    sizes = [len(p) for p in proposals]
    # The background column and the suppressed ones are dropped; every other (proposal, class) pair is a candidate.
    classes = torch.tensor([c for c in range(1, out_channels) if c not in suppressed_labels],
                           dtype=torch.int64, device=scores_all.device)

    detections = []
    for boxes, scores, image_size in zip(boxes_all.split(sizes), scores_all.split(sizes), image_sizes):
        boxes = clip_boxes_to_image(boxes, image_size)
        labels = classes.expand(len(scores), -1).reshape(-1)
        boxes, scores = boxes[:, classes].reshape(-1, 4), scores[:, classes].reshape(-1)

        keep = torch.where(scores > score_thresh)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if postprocess == "torchvision":
            keep = remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = batched_nms_top_k(boxes, scores, labels, nms_thresh, detections_per_img)
        if postprocess == "detectron2":
            keep = keep[((boxes[keep, 2:] - boxes[keep, :2]) > 0).all(dim=1)]
        detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return detections
