"""RoI heads: sample proposals, pool their features, and run the box, mask and keypoint heads.

`RoIHeads.forward` is the dispatch: `_forward_box`, `_forward_mask`, `_forward_keypoint`. The
layers live in `box_head.py`, `mask_head.py` and `keypoint_head.py` beside their losses and
inference functions. The numbers (matching, sampling order, pooling, losses, detections) equal
torchvision's `RoIHeads` on the same weights, features, proposals and seed.

Parameter names inside `roi_heads.`: `box_head.*`, `box_predictor.*` (torchvision's names),
`mask_head.*`, `keypoint_head.*` (see those modules' docstrings for torchvision's names).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.ops import box_area

from maskrcnn.config import ModelConfig
from maskrcnn.model.box_head import BoxHead, BoxPredictor, box_inference, fast_rcnn_loss
from maskrcnn.model.box_ops import (
    BELOW_LOW_THRESHOLD,
    BETWEEN_THRESHOLDS,
    BalancedSampler,
    BoxCoder,
    Matcher,
    ignore_crowd,
)
from maskrcnn.model.keypoint_head import KeypointHead, heatmaps_to_keypoints, keypoint_loss, keypoint_targets
from maskrcnn.model.layers import ROI_LEVEL_NAMES
from maskrcnn.model.mask_head import build_mask_head, mask_inference, mask_loss, mask_targets, mask_training_rois
from maskrcnn.model.point_supervision import POINT_LOSS_AVERAGES, outside_box_loss, point_mask_loss, points_of_rois
from maskrcnn.model.roi_align import roi_align
from maskrcnn.model.threads import thread_pool

LEVEL_ASSIGNMENTS = ("torchvision", "detectron2")


class MultiLevelRoIAlign(nn.Module):
    """RoIAlign of each box on the FPN level that suits its size (FPN paper, eq. 1):
    level = floor(4 + log2(sqrt(area) / canonical_box_size)), clamped to the levels given. With
    the paper's canonical size 224 (ImageNet's image size) these are the same numbers as
    torchvision's `MultiScaleRoIAlign`, which has no `aligned` switch. On images much smaller
    than COCO's ~800 px every object falls to P2 with 224; a smaller canonical size spreads them
    over the levels again. `level_assignment` picks where the rounding guard goes, which decides
    boxes within float error of a level boundary: "torchvision" adds 1e-6 to the level,
    "detectron2" adds float64's epsilon inside the logarithm (in float32, nothing).

    features: name -> `[B, C, Hl, Wl]`; boxes: per image `[Ri, 4]` in input-image pixels;
    returns `[sum Ri, C, S, S]` in the order of the boxes. With `num_threads > 1`, CPU inference
    splits each level's boxes over that many threads (the same numbers: each box is pooled alone).
    """

    def __init__(
        self,
        *,
        featmap_names: tuple[str, ...] = ROI_LEVEL_NAMES,
        output_size: int,
        sampling_ratio: int,
        aligned: bool,
        canonical_box_size: float = 224.0,
        level_assignment: str = "torchvision",
    ) -> None:
        super().__init__()
        if canonical_box_size <= 0:
            raise ValueError(f"canonical_box_size must be > 0, got {canonical_box_size}")
        if level_assignment not in LEVEL_ASSIGNMENTS:
            raise ValueError(f"roi_level_assignment must be one of {LEVEL_ASSIGNMENTS}, got {level_assignment!r}")
        self.level_assignment = level_assignment
        self.canonical_box_size = float(canonical_box_size)
        self.featmap_names = tuple(featmap_names)
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.num_threads = 1  # > 1: CPU inference pools in that many threads (optimize_for_cpu sets it)

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]) -> Tensor:
        maps = [features[name] for name in self.featmap_names]
        # Each level's scale is a power of 2, read off the largest image height and its map's height.
        largest_height = max(height for height, _ in image_sizes)
        exponents = [round(math.log2(m.shape[-2] / largest_height)) for m in maps]  # -2, -3, -4, -5
        scales = [2.0**e for e in exponents]
        first_level, last_level = -exponents[0], -exponents[-1]

        image_index = torch.cat([torch.full((len(b),), i, device=b.device) for i, b in enumerate(boxes)])
        rois = torch.cat([image_index[:, None].to(boxes[0].dtype), torch.cat(boxes)], dim=1)  # [R, 5]
        size = torch.sqrt(box_area(rois[:, 1:]))
        if self.level_assignment == "detectron2":
            level = torch.floor(4 + torch.log2(size / self.canonical_box_size + sys.float_info.epsilon))
        else:
            level = torch.floor(4 + torch.log2(size / self.canonical_box_size) + torch.tensor(1e-6, dtype=size.dtype))
        level = level.clamp(min=first_level, max=last_level).to(torch.int64) - first_level

        # every box is on exactly one level (clamped above), so every row of `pooled` is written
        pooled = maps[0].new_empty((len(rois), maps[0].shape[1], self.output_size, self.output_size))
        # Per level (4), or per level and share of its boxes when pooling in threads: (boxes, map, scale).
        shares = self.num_threads if self._in_threads(maps[0]) else 1
        jobs = [(share, feature_map, scale) for index, (feature_map, scale) in enumerate(zip(maps, scales))
                for share in torch.where(level == index)[0].chunk(shares)]

        def pool(job: tuple[Tensor, Tensor, float]) -> Tensor:
            on_level, feature_map, scale = job
            return roi_align(feature_map, rois[on_level], self.output_size, spatial_scale=scale,
                             sampling_ratio=self.sampling_ratio, aligned=self.aligned)

        results = map(pool, jobs) if shares == 1 else thread_pool(shares).map(pool, jobs)
        for (on_level, _, _), result in zip(jobs, results):
            pooled.index_copy_(0, on_level, result.to(pooled.dtype))
        return pooled

    def _in_threads(self, feature_map: Tensor) -> bool:
        # torchvision's CPU kernel runs on one core and releases the GIL: threads split the boxes.
        # Inference only: the autograd graph of a threaded call is not worth the risk.
        return self.num_threads > 1 and feature_map.device.type == "cpu" and not torch.is_grad_enabled()


@dataclass
class SampledRoIs:
    """The RoIs chosen for training, per image: boxes `[Ri, 4]`, labels `[Ri]` (0 = background),
    matched instance index `[Ri]` (0 for background), and the encoded box targets `[Ri, 4]`."""

    boxes: list[Tensor]
    labels: list[Tensor]
    matched_idxs: list[Tensor]
    regression_targets: list[Tensor]


@dataclass(frozen=True)
class BoxTraining:
    """How proposals become the box head's training samples (torchvision's defaults)."""

    fg_iou_thresh: float = 0.5  # IoU with a ground-truth box from which a proposal is foreground
    bg_iou_thresh: float = 0.5  # below it, background
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    crowd_ioa_thresh: float = 0.7  # a proposal this much inside a crowd region is ignored


@dataclass(frozen=True)
class BoxInference:
    """Which box predictions become detections (box_head.box_inference)."""

    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    suppressed_labels: tuple[int, ...] = ()  # labels never predicted (torchvision's N/A slots)
    postprocess: str = "torchvision"


@dataclass(frozen=True)
class MaskTraining:
    """Which RoIs and which supervision train the mask head (mask_head.mask_training_rois,
    point_supervision.points_of_rois)."""

    train_on: str = "proposals"  # or "gt_boxes" (Birodkar et al.)
    gt_box_jitter: float = 0.0
    gt_box_copies: int = 1  # jittered copies of each ground-truth box
    mask_classes: tuple[int, ...] | list[int] | None = None  # None: every class
    point_supervision: bool = False
    points_per_instance: int | None = None
    point_loss_average: str = "valid_points"
    outside_box_weight: float = 0.0  # point supervision: weight of point_supervision.outside_box_loss
    loss_weight: float = 1.0  # multiplies loss_mask
    feature_gradient: float = 1.0  # share of the mask loss's gradient passed on to the pooled features

    def __post_init__(self) -> None:
        if self.train_on not in ("proposals", "gt_boxes"):
            raise ValueError(f"mask_head.train_on must be 'proposals' or 'gt_boxes', got {self.train_on!r}")
        if self.gt_box_copies != 1 and (self.train_on != "gt_boxes" or self.gt_box_jitter == 0):
            raise ValueError(f"mask_head.gt_box_copies={self.gt_box_copies} needs train_on='gt_boxes' and "
                             f"gt_box_jitter > 0 (unjittered copies of a box would be the same RoI)")
        if self.point_loss_average not in POINT_LOSS_AVERAGES:
            raise ValueError(
                f"mask_head.point_loss_average must be one of {POINT_LOSS_AVERAGES}, got {self.point_loss_average!r}"
            )
        if self.outside_box_weight and not self.point_supervision:
            raise ValueError(f"mask_head.outside_box_weight={self.outside_box_weight} needs point_supervision=true "
                             f"(dense mask targets are already 0 outside the instance's box)")


@dataclass(frozen=True)
class KeypointOptions:
    loss_weight: float = 1.0
    decoding: str = "torchvision"  # or "detectron2" (keypoint_head.heatmaps_to_keypoints)


class RoIHeads(nn.Module):
    """Box head (always), mask head and keypoint head (when given) on the RPN's proposals.

    forward(features, proposals [Ni, 4] per image, image_sizes (H, W) per image, targets) ->
    (detections: one dict per image with boxes / labels / scores [+ masks [N, 1, M, M]
    probabilities in box coordinates, keypoints [N, K, 3], keypoints_scores [N, K]],
    losses: loss_classifier, loss_box_reg [, loss_mask, loss_keypoint] in training).

    The options arrive grouped by stage and are kept as plain attributes under torchvision's names
    (`score_thresh`, `nms_thresh`, `detections_per_img`, ...), so that they can be changed on a
    built model as on torchvision's RoIHeads.
    """

    def __init__(
        self,
        *,
        box_pooler: MultiLevelRoIAlign,
        box_head: BoxHead,
        box_predictor: BoxPredictor,
        box_training: BoxTraining = BoxTraining(),
        box_inference: BoxInference = BoxInference(),
        mask_pooler: MultiLevelRoIAlign | None = None,
        mask_head: nn.Module | None = None,
        mask_training: MaskTraining = MaskTraining(),
        keypoint_pooler: MultiLevelRoIAlign | None = None,
        keypoint_head: KeypointHead | None = None,
        keypoint_options: KeypointOptions = KeypointOptions(),
    ) -> None:
        super().__init__()
        self.box_pooler, self.box_head, self.box_predictor = box_pooler, box_head, box_predictor
        sampling = box_training
        self.matcher = Matcher(
            high_threshold=sampling.fg_iou_thresh, low_threshold=sampling.bg_iou_thresh, allow_low_quality_matches=False
        )
        self.sampler = BalancedSampler(batch_size_per_image=sampling.batch_size_per_image,
                                       positive_fraction=sampling.positive_fraction)
        self.box_coder = BoxCoder(weights=tuple(sampling.bbox_reg_weights))
        self.crowd_ioa_thresh = sampling.crowd_ioa_thresh
        inference = box_inference
        self.score_thresh, self.nms_thresh = inference.score_thresh, inference.nms_thresh
        self.detections_per_img = inference.detections_per_img
        self.suppressed_labels = tuple(inference.suppressed_labels)
        self.box_postprocess = inference.postprocess
        self.mask_pooler, self.mask_head = mask_pooler, mask_head
        mask = mask_training
        self.mask_train_on, self.gt_box_jitter, self.mask_classes = mask.train_on, mask.gt_box_jitter, mask.mask_classes
        self.gt_box_copies = mask.gt_box_copies
        self.point_supervision, self.points_per_instance = mask.point_supervision, mask.points_per_instance
        self.point_loss_average, self.mask_loss_weight = mask.point_loss_average, mask.loss_weight
        self.mask_feature_gradient, self.outside_box_weight = mask.feature_gradient, mask.outside_box_weight
        self.keypoint_pooler, self.keypoint_head = keypoint_pooler, keypoint_head
        self.keypoint_loss_weight, self.keypoint_decoding = keypoint_options.loss_weight, keypoint_options.decoding

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if not self.training:
            detections = self._forward_box(features, proposals, image_sizes)
            self.run_on_boxes(features, image_sizes, detections)
            return detections, {}

        if targets is None:
            raise ValueError("RoIHeads: targets are required in training mode")
        samples = self.sample_proposals(proposals, targets)
        losses = self._forward_box(features, proposals, image_sizes, samples)
        if self.mask_head is not None:
            loss_mask = self._forward_mask(features, image_sizes, samples=samples, targets=targets)
            losses["loss_mask"] = loss_mask * self.mask_loss_weight
        if self.keypoint_head is not None:
            loss_keypoint = self._forward_keypoint(features, image_sizes, samples=samples, targets=targets)
            losses["loss_keypoint"] = loss_keypoint * self.keypoint_loss_weight
        return [], losses

    # ------------------------------------------------------------------ training samples
    @torch.no_grad()
    def sample_proposals(self, proposals: list[Tensor], targets: list[dict]) -> SampledRoIs:
        """Add the ground-truth boxes to the proposals, match them to the ground truth (IoU >=
        fg_iou_thresh: foreground, below bg_iou_thresh: background; proposals inside crowd regions
        are ignored), then sample `batch_size_per_image` RoIs per image with at most
        `positive_fraction` foreground, in torchvision's random order."""
        all_boxes, all_labels, all_matched = [], [], []
        for proposals_in_image, target in zip(proposals, targets):  # loop over images
            gt_boxes = target["boxes"].to(proposals_in_image.dtype)
            boxes = torch.cat([proposals_in_image, gt_boxes])
            matched = self.matcher.match_boxes(gt_boxes, boxes)  # [Ri], gt index or -1 / -2
            if "crowd_boxes" in target:
                matched = ignore_crowd(matched, boxes, target["crowd_boxes"], self.crowd_ioa_thresh)
            matched_or_zero = matched.clamp(min=0)
            if len(gt_boxes) == 0:
                labels = torch.zeros_like(matched)
            else:
                labels = target["labels"].to(torch.int64)[matched_or_zero]
            labels = torch.where(matched == BELOW_LOW_THRESHOLD, torch.zeros_like(labels), labels)
            labels = torch.where(matched == BETWEEN_THRESHOLDS, torch.full_like(labels, -1), labels)
            all_boxes.append(boxes)
            all_labels.append(labels)
            all_matched.append(matched_or_zero)

        positives, negatives = self.sampler(all_labels)
        samples = SampledRoIs([], [], [], [])
        for i, target in enumerate(targets):
            keep = torch.where(positives[i] | negatives[i])[0]
            boxes, labels, matched = all_boxes[i][keep], all_labels[i][keep], all_matched[i][keep]
            gt_boxes = target["boxes"].to(boxes.dtype)
            # Background RoIs get no box loss: encode them against themselves (zeros) when the image has no gt.
            matched_boxes = gt_boxes[matched] if len(gt_boxes) else boxes
            samples.boxes.append(boxes)
            samples.labels.append(labels)
            samples.matched_idxs.append(matched)
            samples.regression_targets.append(self.box_coder.encode(matched_boxes, boxes))
        return samples

    # ------------------------------------------------------------------ heads
    def _forward_box(self, features, proposals, image_sizes, samples: SampledRoIs | None = None):
        boxes = samples.boxes if samples is not None else proposals
        box_features = self.box_head(self.box_pooler(features, boxes, image_sizes))  # [R, fc_dim]
        class_logits, box_deltas = self.box_predictor(box_features)  # [R, K + 1], [R, (K + 1) * 4]
        if samples is None:
            return box_inference(
                class_logits,
                box_deltas,
                boxes,
                image_sizes,
                box_coder=self.box_coder,
                score_thresh=self.score_thresh,
                nms_thresh=self.nms_thresh,
                detections_per_img=self.detections_per_img,
                suppressed_labels=self.suppressed_labels,
                postprocess=self.box_postprocess,
            )
        loss_classifier, loss_box_reg = fast_rcnn_loss(
            class_logits, box_deltas, torch.cat(samples.labels), torch.cat(samples.regression_targets)
        )
        return {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}

    def _forward_mask(self, features, image_sizes, detections=None, *, samples=None, targets=None):
        """Inference: adds `masks [N, 1, M, M]` to each detection. Training: returns `loss_mask`."""
        if not self.training:
            boxes = [d["boxes"] for d in detections]
            labels = torch.cat([d["labels"] for d in detections])
            mask_logits = self.mask_head(self.mask_pooler(features, boxes, image_sizes))  # [N, C, M, M]
            masks = mask_inference(mask_logits, labels).split([len(b) for b in boxes])
            for detection, masks_in_image in zip(detections, masks):
                detection["masks"] = masks_in_image
            return None

        boxes, matched, labels = mask_training_rois(
            targets=targets, proposals=samples.boxes, proposal_labels=samples.labels,
            matched_idxs=samples.matched_idxs, image_sizes=image_sizes, train_on=self.mask_train_on,
            gt_box_jitter=self.gt_box_jitter, gt_box_copies=self.gt_box_copies, mask_classes=self.mask_classes,
        )
        pooled = scale_gradient(self.mask_pooler(features, boxes, image_sizes), self.mask_feature_gradient)
        # [R, 1, M, M]: each RoI's own class only, the one channel both losses read.
        mask_logits = self.mask_head(pooled, labels=torch.cat(labels))
        if self.point_supervision:
            return self._point_loss(mask_logits, boxes, matched, labels, targets)
        mask_size = mask_logits.shape[-1]
        aligned = self.mask_pooler.aligned
        per_image = [
            mask_targets(t["masks"], b, m, mask_size, aligned=aligned) for t, b, m in zip(targets, boxes, matched)
        ]
        return mask_loss(mask_logits, torch.cat(per_image), torch.cat(labels))

    def _point_loss(self, mask_logits, boxes, matched, labels, targets):
        """The point loss of the RoIs' instances (plus the outside-box term when weighted)."""
        rois, labels = torch.cat(boxes), torch.cat(labels)
        coords, point_labels = points_of_rois(targets, matched, points_per_instance=self.points_per_instance)
        loss = point_mask_loss(mask_logits, rois, coords, point_labels, labels, average=self.point_loss_average)
        if self.outside_box_weight:
            instance_boxes = torch.cat([t["boxes"][m] for t, m in zip(targets, matched)])
            loss = loss + self.outside_box_weight * outside_box_loss(mask_logits, rois, instance_boxes, labels)
        return loss

    def run_on_boxes(self, features: dict[str, Tensor], image_sizes: list[tuple[int, int]],
                     detections: list[dict[str, Tensor]]) -> None:
        """Inference of the mask and keypoint heads on the `boxes` / `labels` of `detections`
        (in the transformed images' coordinates), whatever produced them; adds `masks` and
        keypoints to each dict in place."""
        if self.mask_head is not None:
            self._forward_mask(features, image_sizes, detections)
        if self.keypoint_head is not None:
            self._forward_keypoint(features, image_sizes, detections)

    def _forward_keypoint(self, features, image_sizes, detections=None, *, samples=None, targets=None):
        """Inference: adds `keypoints [N, K, 3]` and `keypoints_scores [N, K]`. Training: `loss_keypoint`."""
        if not self.training:
            boxes = [d["boxes"] for d in detections]
            heatmaps = self.keypoint_head(self.keypoint_pooler(features, boxes, image_sizes))
            keypoints, scores = heatmaps_to_keypoints(heatmaps, torch.cat(boxes), decoding=self.keypoint_decoding)
            sizes = [len(b) for b in boxes]
            for detection, points, point_scores in zip(detections, keypoints.split(sizes), scores.split(sizes)):
                detection["keypoints"], detection["keypoints_scores"] = points, point_scores
            return None

        positives = [torch.where(labels > 0)[0] for labels in samples.labels]
        boxes = [b[p] for b, p in zip(samples.boxes, positives)]
        heatmaps = self.keypoint_head(self.keypoint_pooler(features, boxes, image_sizes))  # [R, K, S, S]
        per_image = [
            keypoint_targets(t["keypoints"][m[p]], b, heatmaps.shape[-1])
            for t, m, p, b in zip(targets, samples.matched_idxs, positives, boxes)
        ]
        return keypoint_loss(heatmaps, torch.cat([t for t, _ in per_image]), torch.cat([v for _, v in per_image]))


def _pooler(config: ModelConfig, head) -> MultiLevelRoIAlign:
    """A head's pooler: its own crop (resolution, sampling, alignment), the model's level mapping."""
    return MultiLevelRoIAlign(output_size=head.pooler_resolution, sampling_ratio=head.sampling_ratio,
                              aligned=head.aligned, canonical_box_size=config.roi_canonical_box_size,
                              level_assignment=config.roi_level_assignment)


def _mask_parts(config: ModelConfig, *, in_channels: int) -> dict:
    """RoIHeads' mask arguments from `model.mask_head` (none when the head is disabled)."""
    mask = config.mask_head
    if not mask.enabled:
        return {}
    head = build_mask_head(
        architecture=mask.architecture, in_channels=in_channels, num_classes=config.num_classes,
        conv_dim=mask.conv_dim, num_convs=mask.num_convs, norm=mask.norm, class_agnostic=mask.class_agnostic,
        block=mask.block,
    )
    training = MaskTraining(
        train_on=mask.train_on, gt_box_jitter=mask.gt_box_jitter, gt_box_copies=mask.gt_box_copies,
        mask_classes=mask.mask_classes,
        point_supervision=mask.point_supervision, points_per_instance=mask.points_per_instance,
        point_loss_average=mask.point_loss_average, outside_box_weight=mask.outside_box_weight,
        loss_weight=mask.loss_weight,
        feature_gradient=mask.feature_gradient,
    )
    return dict(mask_pooler=_pooler(config, mask), mask_head=head, mask_training=training)


def _keypoint_parts(config: ModelConfig, *, in_channels: int) -> dict:
    """RoIHeads' keypoint arguments from `model.keypoint_head` (none when the head is disabled)."""
    keypoint = config.keypoint_head
    if not keypoint.enabled:
        return {}
    head = KeypointHead(in_channels=in_channels, num_keypoints=keypoint.num_keypoints, conv_dim=keypoint.conv_dim,
                        num_convs=keypoint.num_convs)
    options = KeypointOptions(loss_weight=keypoint.loss_weight, decoding=keypoint.decoding)
    return dict(keypoint_pooler=_pooler(config, keypoint), keypoint_head=head, keypoint_options=options)


def build_roi_heads(config: ModelConfig, *, in_channels: int) -> RoIHeads:
    """The RoI heads a `ModelConfig` describes, on FPN features of `in_channels` channels."""
    box = config.box_head
    heads = {**_mask_parts(config, in_channels=in_channels), **_keypoint_parts(config, in_channels=in_channels)}
    return RoIHeads(
        box_pooler=_pooler(config, box),
        box_head=BoxHead(
            in_channels=in_channels,
            resolution=box.pooler_resolution,
            fc_dim=box.fc_dim,
            num_convs=box.num_convs,
            conv_dim=box.conv_dim,
            norm=box.norm,
            num_fcs=box.num_fcs,
        ),
        box_predictor=BoxPredictor(in_channels=box.fc_dim, num_classes=config.num_classes),
        box_training=BoxTraining(
            fg_iou_thresh=box.fg_iou_thresh, bg_iou_thresh=box.bg_iou_thresh,
            batch_size_per_image=box.batch_size_per_image, positive_fraction=box.positive_fraction,
            bbox_reg_weights=tuple(box.bbox_reg_weights), crowd_ioa_thresh=box.crowd_ioa_thresh,
        ),
        box_inference=BoxInference(
            score_thresh=box.score_thresh, nms_thresh=box.nms_thresh, detections_per_img=box.detections_per_img,
            suppressed_labels=tuple(box.suppressed_labels), postprocess=box.postprocess,
        ),
        **heads,
    )


def scale_gradient(x: Tensor, scale: float) -> Tensor:
    """`x` in the forward; its gradient times `scale` in the backward (0: detached)."""
    if scale == 1.0:
        return x
    return x.detach() + scale * (x - x.detach())
