"""Box coding, matching and sampling: the bookkeeping shared by the RPN and the RoI heads.

All boxes are `[N, 4]` x1y1x2y2 in absolute pixels, continuous coordinates (see docs/design.md).
The numbers equal torchvision's `models/detection/_utils.py` (same operation order, same use of
`torch.randperm`), so a seeded run samples the same anchors and RoIs as torchvision.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_iou, nms

# Box deltas larger than this would make exp() overflow a box to an absurd size; torchvision and
# detectron2 both clamp dw, dh at log(1000 / 16): a box can grow at most 62.5x per decoding.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)

# IoUs computed at once when matching (Matcher.match_boxes): 4M float32 = 16 MB per [M, N] matrix.
MATCH_CHUNK_ELEMENTS = 1 << 22

# Matcher outputs for predictions without a match.
BELOW_LOW_THRESHOLD = -1  # background
BETWEEN_THRESHOLDS = -2  # ignored: neither foreground nor background


class BoxCoder:
    """Encodes boxes as (dx, dy, dw, dh) deltas relative to reference boxes, and decodes them.

    Deltas are `(wx * (cx - cx_ref) / w_ref, wy * (cy - cy_ref) / h_ref, ww * log(w / w_ref),
    wh * log(h / h_ref))`; the weights scale the targets to unit-ish variance (RPN: 1, 1, 1, 1;
    Fast R-CNN head: 10, 10, 5, 5).
    """

    def __init__(
        self, *, weights: tuple[float, float, float, float], scale_clamp: float = DEFAULT_SCALE_CLAMP
    ) -> None:
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def encode(self, target_boxes: Tensor, reference_boxes: Tensor) -> Tensor:
        """Deltas that turn `reference_boxes [N, 4]` into `target_boxes [N, 4]`; returns `[N, 4]`."""
        wx, wy, ww, wh = self.weights
        ref_widths = reference_boxes[:, 2] - reference_boxes[:, 0]
        ref_heights = reference_boxes[:, 3] - reference_boxes[:, 1]
        ref_ctr_x = reference_boxes[:, 0] + 0.5 * ref_widths
        ref_ctr_y = reference_boxes[:, 1] + 0.5 * ref_heights

        widths = target_boxes[:, 2] - target_boxes[:, 0]
        heights = target_boxes[:, 3] - target_boxes[:, 1]
        ctr_x = target_boxes[:, 0] + 0.5 * widths
        ctr_y = target_boxes[:, 1] + 0.5 * heights

        dx = wx * (ctr_x - ref_ctr_x) / ref_widths
        dy = wy * (ctr_y - ref_ctr_y) / ref_heights
        dw = ww * torch.log(widths / ref_widths)
        dh = wh * torch.log(heights / ref_heights)
        return torch.stack((dx, dy, dw, dh), dim=1)

    def decode(self, deltas: Tensor, reference_boxes: Tensor) -> Tensor:
        """Apply `deltas [N, 4 * K]` (K boxes per reference, e.g. one per class) to
        `reference_boxes [N, 4]`; returns boxes `[N, K, 4]`."""
        reference_boxes = reference_boxes.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        widths = reference_boxes[:, 2] - reference_boxes[:, 0]
        heights = reference_boxes[:, 3] - reference_boxes[:, 1]
        ctr_x = reference_boxes[:, 0] + 0.5 * widths
        ctr_y = reference_boxes[:, 1] + 0.5 * heights

        dx = deltas[:, 0::4] / wx  # [N, K]
        dy = deltas[:, 1::4] / wy
        dw = (deltas[:, 2::4] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[:, 3::4] / wh).clamp(max=self.scale_clamp)

        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        half_w = 0.5 * (torch.exp(dw) * widths[:, None])
        half_h = 0.5 * (torch.exp(dh) * heights[:, None])
        return torch.stack(
            (pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h), dim=2
        )


class Matcher:
    """Assigns each prediction (anchor or proposal) the ground-truth box it overlaps most.

    Given a quality matrix `[M gt, N predictions]` (IoU), returns `matched_idxs [N] int64`:
    the gt index where the best quality is >= `high_threshold`, `BETWEEN_THRESHOLDS` (-2) where it
    lies in [low, high), `BELOW_LOW_THRESHOLD` (-1) below `low_threshold`. With
    `allow_low_quality_matches`, every gt also keeps the predictions it overlaps most (ties
    included) even below the threshold, so that no gt is left without a positive (the RPN uses it).

    With no ground truth (M = 0) every prediction is background (-1): an image without objects
    trains as pure negatives.
    """

    def __init__(self, *, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool) -> None:
        if low_threshold > high_threshold:
            raise ValueError(f"Matcher: low_threshold {low_threshold} > high_threshold {high_threshold}")
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, quality: Tensor) -> Tensor:
        num_gt, num_predictions = quality.shape
        if num_gt == 0:
            return torch.full((num_predictions,), BELOW_LOW_THRESHOLD, dtype=torch.int64, device=quality.device)
        if num_predictions == 0:
            return torch.empty((0,), dtype=torch.int64, device=quality.device)
        best_quality, best_gt = quality.max(dim=0)  # [N], [N]
        return self._assign(best_quality, best_gt, self._best_predictions(quality))

    def match_boxes(self, gt_boxes: Tensor, boxes: Tensor, *, chunk_elements: int | None = None) -> Tensor:
        """`self(box_iou(gt_boxes, boxes))`, exactly, with at most ~`chunk_elements` IoUs alive at once
        (default MATCH_CHUNK_ELEMENTS).

        gt_boxes [M, 4], boxes [N, 4]. The full [M, N] matrix of a crowded image (1500 objects x
        100k anchors) with box_iou's [M, N, 2] intermediates takes gigabytes; rows of ground truth
        are taken a chunk at a time instead. Ties keep the first gt, as max(dim=0) does.
        """
        num_gt, num_predictions = len(gt_boxes), len(boxes)
        chunk_elements = MATCH_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
        rows = max(1, chunk_elements // max(num_predictions, 1))
        if num_gt <= rows or num_predictions == 0:
            return self(box_iou(gt_boxes, boxes))
        best_quality = torch.full((num_predictions,), -math.inf, dtype=boxes.dtype, device=boxes.device)
        best_gt = torch.zeros(num_predictions, dtype=torch.int64, device=boxes.device)
        best_predictions = []
        for start in range(0, num_gt, rows):
            quality = box_iou(gt_boxes[start:start + rows], boxes)  # [rows, N]
            values, indices = quality.max(dim=0)
            better = values > best_quality  # strictly: an equal later gt does not replace the first
            best_quality = torch.where(better, values, best_quality)
            best_gt = torch.where(better, indices + start, best_gt)
            if self.allow_low_quality_matches:
                best_predictions.append(self._best_predictions(quality))
        return self._assign(best_quality, best_gt, torch.cat(best_predictions) if best_predictions else None)

    def _best_predictions(self, quality: Tensor) -> Tensor | None:
        """Indices of the predictions that are the best of some gt row (ties included), or None."""
        if not self.allow_low_quality_matches:
            return None
        best_quality_per_gt = quality.max(dim=1).values  # [M]
        return torch.where(quality == best_quality_per_gt[:, None])[1]

    def _assign(self, best_quality: Tensor, best_gt: Tensor, best_predictions: Tensor | None) -> Tensor:
        """matched_idxs [N] from each prediction's best quality and gt (see the class docstring)."""
        matched_idxs = best_gt.clone()
        matched_idxs[best_quality < self.low_threshold] = BELOW_LOW_THRESHOLD
        between = (best_quality >= self.low_threshold) & (best_quality < self.high_threshold)
        matched_idxs[between] = BETWEEN_THRESHOLDS
        if best_predictions is not None:
            # The predictions that are the best for some gt keep their best gt, even when that overlap is low.
            matched_idxs[best_predictions] = best_gt[best_predictions]
        return matched_idxs


def intersection_over_area(boxes: Tensor, regions: Tensor) -> Tensor:
    """Fraction of each box's own area covered by each region: `[N boxes, M regions]` in [0, 1]."""
    top_left = torch.max(boxes[:, None, :2], regions[None, :, :2])
    bottom_right = torch.min(boxes[:, None, 2:], regions[None, :, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=2)  # [N, M]
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=1e-6)
    return intersection / area[:, None]


def ignore_crowd(matched_idxs: Tensor, boxes: Tensor, crowd_boxes: Tensor, ioa_threshold: float) -> Tensor:
    """Mark background predictions that lie inside a crowd region as ignored.

    `matched_idxs [N]` from `Matcher`; `boxes [N, 4]` the anchors or proposals; `crowd_boxes [M, 4]`
    the image's iscrowd regions. A prediction matched as background (-1) whose intersection with a
    crowd box covers >= `ioa_threshold` of its own area becomes `BETWEEN_THRESHOLDS` (-2): a crowd
    holds objects, so calling it background would teach the model to miss them. Returns a new tensor.
    """
    if crowd_boxes.numel() == 0 or boxes.numel() == 0:
        return matched_idxs
    inside_crowd = intersection_over_area(boxes, crowd_boxes.to(boxes.dtype)).max(dim=1).values >= ioa_threshold
    return torch.where(
        (matched_idxs == BELOW_LOW_THRESHOLD) & inside_crowd,
        torch.full_like(matched_idxs, BETWEEN_THRESHOLDS),
        matched_idxs,
    )


class BalancedSampler:
    """Samples a fixed-size mini-batch of positives and negatives per image.

    Takes at most `batch_size_per_image * positive_fraction` positives (label >= 1) and fills the
    rest with negatives (label == 0); labels < 0 are never sampled. Uses `torch.randperm` on the
    positives then the negatives, image by image, exactly like torchvision's
    `BalancedPositiveNegativeSampler`, so a seeded run draws the same samples.
    """

    def __init__(self, *, batch_size_per_image: int, positive_fraction: float) -> None:
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def sample(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """`labels [N]` (>= 1 positive, 0 negative, < 0 ignored) -> bool masks `(positive [N], negative [N])`."""
        positive = torch.where(labels >= 1)[0]
        negative = torch.where(labels == 0)[0]
        num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
        num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
        chosen_pos = positive[torch.randperm(positive.numel(), device=positive.device)[:num_pos]]
        chosen_neg = negative[torch.randperm(negative.numel(), device=negative.device)[:num_neg]]
        pos_mask = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
        neg_mask = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
        pos_mask[chosen_pos] = True
        neg_mask[chosen_neg] = True
        return pos_mask, neg_mask

    def __call__(self, labels_per_image: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """One `sample` per image, in order (the order fixes which random numbers each image uses)."""
        samples = [self.sample(labels) for labels in labels_per_image]
        return [pos for pos, _ in samples], [neg for _, neg in samples]


# torchvision's batched_nms runs one NMS per class above this many box coordinates (CPU; CUDA
# 100k) and the coordinate-offset trick below it; the two can differ in the last float bit of an
# IoU, so batched_nms_top_k takes the same path to give the same boxes.
_PER_CLASS_NMS_ABOVE = {"cpu": 4000}
_DEFAULT_PER_CLASS_NMS_ABOVE = 100_000
_FIRST_PREFIX = 1024  # candidates tried first by batched_nms_top_k; x4 per retry


def batched_nms_top_k(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, k: int) -> Tensor:
    """`torchvision.ops.batched_nms(boxes, scores, idxs, iou_threshold)[:k]`, the same indices,
    without suppressing the whole candidate list when only the best `k` survivors are wanted.

    Greedy NMS decides on a box from the boxes scored above (or tied with) it alone, so NMS on the
    best candidates keeps exactly the full run's survivors among them; once that prefix yields `k`
    survivors with distinct scores, they are the full run's first `k`, in its order. (Survivors
    with equal scores come in the order of torchvision's unstable sort over all of them: then the
    full run is done.) The prefix grows 4x until it suffices. boxes `[N, 4]`, scores `[N]`, idxs
    `[N]` (class or level); returns int64 indices `[min(k, kept)]`, best first.

    Scores in bfloat16 / float16 (the RPN's under autocast) take only a few hundred values, so
    the best `k` survivors always hold ties and the prefix would be wasted: they go to the full run.
    """
    per_class_above = _PER_CLASS_NMS_ABOVE.get(boxes.device.type, _DEFAULT_PER_CLASS_NMS_ABOVE)
    few_values = scores.dtype in (torch.bfloat16, torch.float16)
    if (boxes.numel() <= per_class_above or len(scores) <= _FIRST_PREFIX or few_values
            or torch.jit.is_tracing()):
        return batched_nms(boxes, scores, idxs, iou_threshold)[:k]
    sorted_scores, order = scores.sort(descending=True, stable=True)
    size = _FIRST_PREFIX
    while size < len(scores):
        # every candidate tied with the last one of the prefix joins it
        size = int((sorted_scores >= sorted_scores[size - 1]).sum())
        prefix = order[:size].sort().values  # in the input's order, as the full run sees them
        keep = _nms_per_class(boxes[prefix], scores[prefix], idxs[prefix], iou_threshold)
        if len(keep) >= k:
            top = scores[prefix[keep[: k + 1]]]
            if bool((top[1:] < top[:-1]).all()):
                return prefix[keep[:k]]
            break  # tied survivors: only the full run knows their order
        size *= 4
    return batched_nms(boxes, scores, idxs, iou_threshold)[:k]


def _nms_per_class(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """One `nms` per class, survivors sorted by score: the path batched_nms takes for many boxes."""
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for class_id in torch.unique(idxs):
        in_class = torch.where(idxs == class_id)[0]
        keep_mask[in_class[nms(boxes[in_class], scores[in_class], iou_threshold)]] = True
    kept = torch.where(keep_mask)[0]
    return kept[scores[kept].sort(descending=True)[1]]
