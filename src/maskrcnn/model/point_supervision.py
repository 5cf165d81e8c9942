"""Point-supervised mask loss (Cheng, Parkhi, Kirillov 2021, "Pointly-supervised instance
segmentation").

Each training instance carries a box and a handful of points labelled inside (1) or outside (0)
the object. Mask R-CNN trains unchanged except for the mask loss: instead of comparing the
M x M logits with a rasterised mask, the logits are bilinearly interpolated at the labelled points
that fall inside the RoI, and the sigmoid BCE is averaged over those points.

Coordinates: boxes and points are continuous image coordinates in the same frame (the model's
resized input image), a pixel `i` covering `[i, i + 1)` (docs/design.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# How the point loss is averaged: over the labelled points that lie in their RoI (ours), or over
# every labelled point of the RoIs' instances, those outside the RoI adding zero (PointSup's code
# in detectron2: `reduction="mean"` with a 0 / 1 weight, i.e. divided by RoIs x points).
POINT_LOSS_AVERAGES = ("valid_points", "all_points")


def point_coords_in_roi(boxes: Tensor, point_coords: Tensor) -> tuple[Tensor, Tensor]:
    """Map image-coordinate points into each RoI's `grid_sample` frame.

    Args:
        boxes: [R, 4] RoIs, x1y1x2y2, continuous image coordinates.
        point_coords: [R, P, 2] (x, y), continuous image coordinates.

    Returns:
        grid: [R, P, 2] normalised coordinates for `grid_sample(..., align_corners=False)`.
        inside: [R, P] bool, the point lies in its RoI (closed box).

    The M x M logits cover the box: cell `j` spans `[x1 + j * w / M, x1 + (j + 1) * w / M)` with
    `w = x2 - x1`, so the box's left edge is the left edge of cell 0 and its right edge the right
    edge of cell M - 1. With `align_corners=False`, `grid_sample` puts -1 at the left edge of
    the first cell and +1 at the right edge of the last one, which gives
        u = 2 * (x - x1) / w - 1,    v = 2 * (y - y1) / h - 1,
    and a point at the centre of cell `j`, `x1 + (j + 0.5) * w / M`, samples exactly logit `j`.
    """
    top_left = boxes[:, None, :2]  # [R, 1, 2]
    # A degenerate RoI would divide by zero; its points are outside anyway unless on the edge.
    size = (boxes[:, None, 2:] - top_left).clamp(min=1e-6)  # [R, 1, 2]
    grid = 2.0 * (point_coords - top_left) / size - 1.0  # [R, P, 2]
    inside = (grid >= -1.0).all(dim=-1) & (grid <= 1.0).all(dim=-1)
    return grid, inside


def _check_point_shapes(mask_logits: Tensor, boxes: Tensor, point_coords: Tensor, point_labels: Tensor) -> None:
    num_rois = mask_logits.shape[0]
    if boxes.shape[0] != num_rois or point_coords.shape[:1] != (num_rois,) or point_labels.shape[0] != num_rois:
        raise ValueError(
            f"point_mask_loss: mask_logits has {num_rois} RoIs but boxes {tuple(boxes.shape)}, "
            f"point_coords {tuple(point_coords.shape)}, point_labels {tuple(point_labels.shape)}"
        )
    if point_coords.shape[1:] != (point_labels.shape[1], 2):
        raise ValueError(
            f"point_mask_loss: point_coords must be [R, P, 2] and point_labels [R, P], got "
            f"{tuple(point_coords.shape)} and {tuple(point_labels.shape)}"
        )


def point_mask_loss(
    mask_logits: Tensor,
    boxes: Tensor,
    point_coords: Tensor,
    point_labels: Tensor,
    labels: Tensor,
    *,
    average: str = "valid_points",
) -> Tensor:
    """Sigmoid BCE of the mask logits sampled at the labelled points inside each RoI.

    Args:
        mask_logits: [R, C, M, M] predicted logits over each RoI (C = classes, or 1 when
            class-agnostic or already each RoI's own class).
        boxes: [R, 4] the RoIs the logits were predicted for, x1y1x2y2, image coordinates.
        point_coords: [R, P, 2] (x, y) of each RoI's instance's points, image coordinates.
        point_labels: [R, P] 1 inside the object, 0 outside, -1 ignored (padding).
        labels: [R] int64, the channel of each RoI's class (1..C-1); not used when C == 1.
        average: "valid_points": the BCE summed over the points that are labelled (0 or 1) and
            lie in their RoI, divided by their number; "all_points": the same sum divided by the
            number of labelled points, inside their RoI or not (PointSup's normalisation: a
            proposal that covers part of its object weighs by the share of its points it holds).

    Returns:
        A scalar. Exactly 0, and still connected to `mask_logits`, when no labelled point lies
        in its RoI (no RoI, no points, or all of them outside / ignored).
    """
    if average not in POINT_LOSS_AVERAGES:
        raise ValueError(f"point_mask_loss: average must be one of {POINT_LOSS_AVERAGES}, got {average!r}")
    _check_point_shapes(mask_logits, boxes, point_coords, point_labels)
    num_rois = mask_logits.shape[0]
    if num_rois == 0 or point_labels.shape[1] == 0:
        return mask_logits.sum() * 0.0

    logits = _own_channel(mask_logits, labels)  # [R, 1, M, M]
    grid, inside = point_coords_in_roi(boxes.to(point_coords.dtype), point_coords)
    # "border" padding: a point in the outer half cell of the box takes the edge cell's value
    # instead of being blended with a zero logit (a 0.5 probability) that nothing predicted.
    point_logits = F.grid_sample(
        logits.float(),
        grid[:, :, None, :].float(),  # [R, P, 1, 2]
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )[:, 0, :, 0]  # [R, P]

    labelled = point_labels >= 0  # [R, P]
    valid = inside & labelled
    if not bool(valid.any()):
        return mask_logits.sum() * 0.0
    total = F.binary_cross_entropy_with_logits(
        point_logits[valid], point_labels[valid].to(point_logits.dtype), reduction="sum"
    )
    return total / (valid if average == "valid_points" else labelled).sum()


def outside_box_loss(mask_logits: Tensor, boxes: Tensor, instance_boxes: Tensor, labels: Tensor) -> Tensor:
    """Sigmoid BCE towards 0 of the mask cells that lie outside their instance's box.

    Point labels are drawn inside the instance's box, so a RoI larger than the box (most positive
    proposals, and the detector's boxes at test time) has no label between the box and its own
    edges, where a point-trained head lets the mask bleed. The box is part of the annotation and
    the object lies inside it: a cell whose centre is outside the box is background for certain.

    Args:
        mask_logits: [R, C, M, M] logits over each RoI (C = classes, or 1).
        boxes: [R, 4] the RoIs, x1y1x2y2, image coordinates.
        instance_boxes: [R, 4] the box of each RoI's instance, same frame.
        labels: [R] int64, each RoI's class channel; not used when C == 1.

    Returns:
        A scalar: the BCE averaged over the cells (all RoIs together) whose centre
        `x1 + (j + 0.5) * w / M` lies strictly outside the instance's box; exactly 0, still
        connected to `mask_logits`, when there is none.
    """
    num_rois, _, size, _ = mask_logits.shape
    if num_rois == 0:
        return mask_logits.sum() * 0.0
    boxes, instance_boxes = boxes.float(), instance_boxes.float()
    steps = (torch.arange(size, device=boxes.device, dtype=torch.float32) + 0.5) / size  # [M]
    centres_x = boxes[:, 0:1] + steps * (boxes[:, 2:3] - boxes[:, 0:1])  # [R, M]
    centres_y = boxes[:, 1:2] + steps * (boxes[:, 3:4] - boxes[:, 1:2])
    outside_x = (centres_x < instance_boxes[:, 0:1]) | (centres_x > instance_boxes[:, 2:3])
    outside_y = (centres_y < instance_boxes[:, 1:2]) | (centres_y > instance_boxes[:, 3:4])
    outside = outside_y[:, :, None] | outside_x[:, None, :]  # [R, M (y), M (x)]
    if not bool(outside.any()):
        return mask_logits.sum() * 0.0
    cells = _own_channel(mask_logits, labels)[:, 0].float()[outside]
    return F.binary_cross_entropy_with_logits(cells, torch.zeros_like(cells))


def _own_channel(mask_logits: Tensor, labels: Tensor) -> Tensor:
    """[R, 1, M, M]: each RoI's class channel (the only one when C == 1)."""
    if mask_logits.shape[1] == 1:
        return mask_logits
    return mask_logits[torch.arange(mask_logits.shape[0], device=mask_logits.device), labels][:, None]


def sample_point_subset(point_labels: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """Keep a random subset of at most `k` labelled points per instance (the paper's optional
    "fewer points each iteration"), by turning the others into ignored points.

    Args:
        point_labels: [N, P] 1 / 0 labelled, -1 ignored.
        k: points to keep per instance (all labelled points when an instance has fewer).
        generator: optional, on `point_labels`' device, for reproducible draws.

    Returns:
        [N, P] a copy of `point_labels` with all but the chosen labelled points set to -1.
    """
    if k < 0:
        raise ValueError(f"sample_point_subset: k must be >= 0, got {k}")
    labelled = point_labels >= 0
    # Random scores in [0, 1) for labelled points and -1 for the others, so that the k highest
    # scores of a row are k labelled points drawn uniformly without replacement.
    scores = torch.rand(point_labels.shape, generator=generator, device=point_labels.device)
    scores = torch.where(labelled, scores, torch.full_like(scores, -1.0))
    rank = scores.argsort(dim=1, descending=True).argsort(dim=1)  # [N, P] 0 = highest score
    keep = labelled & (rank < k)
    return torch.where(keep, point_labels, torch.full_like(point_labels, -1))


def points_of_rois(
    targets: list[dict], matched: list[Tensor], *, points_per_instance: int | None = None
) -> tuple[Tensor, Tensor]:
    """The labelled points of the instances that train the mask head, one row per RoI.

    targets: per image `point_coords [N, P_i, 2]` and `point_labels [N, P_i]`; matched: per image
    `[R_i]` the instance of each RoI. With `points_per_instance`, each image's labels are first
    subsampled (`sample_point_subset`). Returns coords `[R, P, 2]` and labels `[R, P]`: images carry
    different numbers of points (an image without objects has `[0, 0, 2]`), so rows are padded to
    the batch's largest count with label -1, which the loss ignores.
    """
    labels = [t["point_labels"] for t in targets]
    if points_per_instance is not None:
        labels = [sample_point_subset(p, points_per_instance) for p in labels]
    width = max(p.shape[1] for p in labels)
    coords = torch.cat([_pad_points(t["point_coords"][m], width, 0.0) for t, m in zip(targets, matched)])
    return coords, torch.cat([_pad_points(p[m], width, -1.0) for p, m in zip(labels, matched)])


def _pad_points(values: Tensor, width: int, fill: float) -> Tensor:
    """Pad `[R, P, ...]` point coordinates or labels along P to `width` with `fill`."""
    missing = width - values.shape[1]
    if missing == 0:
        return values
    padding = values.new_full((values.shape[0], missing, *values.shape[2:]), fill)
    return torch.cat([values, padding], dim=1)
