"""Region Proposal Network: anchors, objectness + box-delta head, proposal selection, RPN losses.

Equal to torchvision's `rpn.py` / `anchor_utils.py` on the same weights and seed. Boxes are
`[N, 4]` x1y1x2y2 in the coordinates of the resized (not padded) image.
Parameter names -> torchvision's: `head.conv` -> `rpn.head.conv.0.0`, `head.objectness_logits`
-> `rpn.head.cls_logits`, `head.box_deltas` -> `rpn.head.bbox_pred`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import clip_boxes_to_image, remove_small_boxes

from .box_ops import (
    BELOW_LOW_THRESHOLD,
    BETWEEN_THRESHOLDS,
    BalancedSampler,
    BoxCoder,
    Matcher,
    batched_nms_top_k,
    ignore_crowd,
)
from .transform import ImageBatch

# Proposals narrower or shorter than this (in pixels) are dropped: they cannot be RoIAligned sensibly.
MIN_PROPOSAL_SIZE = 1e-3


ANCHOR_CONVENTIONS = ("torchvision", "detectron2")
PROPOSAL_SELECTIONS = ("torchvision", "detectron2")


class AnchorGenerator(nn.Module):
    """Anchors of every FPN level: one size per level times `aspect_ratios` (height / width).

    Cell anchors are centred on 0 and shifted to every feature-map location, the first one
    `offset` strides from the image corner. The anchors of one level are ordered (y, x, ratio),
    matching the flattened head outputs. The two conventions differ in two details:
    "torchvision" rounds the cell anchors to integers and takes each level's stride as the padded
    image size over the grid size; "detectron2" keeps the exact sizes (computed in float64) and
    uses the level's nominal stride (`strides`). The strides differ on P6 when a side is an odd
    multiple of 32 (P6 then has ceil(side / 64) cells).
    """

    def __init__(self, *, sizes: list[int], aspect_ratios: list[float], strides: tuple[int, ...] = (4, 8, 16, 32, 64),
                 convention: str = "torchvision", offset: float = 0.0) -> None:
        super().__init__()
        if convention not in ANCHOR_CONVENTIONS:
            raise ValueError(f"rpn.anchor_convention must be one of {ANCHOR_CONVENTIONS}, got {convention!r}")
        self.sizes = list(sizes)
        self.aspect_ratios = list(aspect_ratios)
        self.strides, self.convention, self.offset = tuple(strides), convention, float(offset)
        self.cell_anchors = [self._cell_anchors(size) for size in self.sizes]  # [A, 4] per level

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.aspect_ratios)

    def _cell_anchors(self, size: int) -> Tensor:
        if self.convention == "detectron2":  # w = sqrt(size^2 / ratio), h = ratio * w, in float64
            ratios = torch.as_tensor(self.aspect_ratios, dtype=torch.float64)
            widths = torch.sqrt(float(size) ** 2 / ratios)
            heights = ratios * widths
            return (torch.stack([-widths, -heights, widths, heights], dim=1) / 2).to(torch.float32)
        ratios = torch.as_tensor(self.aspect_ratios, dtype=torch.float32)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios  # area stays size**2
        widths = w_ratios * size
        heights = h_ratios * size
        return (torch.stack([-widths, -heights, widths, heights], dim=1) / 2).round()

    def forward(self, batch_shape: tuple[int, int], feature_maps: list[Tensor]) -> list[Tensor]:
        """Anchors `[H_l * W_l * A, 4]` per level for a padded batch of size `batch_shape (H, W)`."""
        anchors = []
        for level, (feature, cell) in enumerate(zip(feature_maps, self.cell_anchors)):
            grid_h, grid_w = feature.shape[-2:]
            if self.convention == "detectron2":
                stride_h = stride_w = self.strides[level]
            else:
                # The padded size over the grid size (torchvision's definition; for P6 of an image whose
                # side is an odd multiple of 32 it is not exactly 64, and parity needs the same).
                stride_h, stride_w = batch_shape[0] // grid_h, batch_shape[1] // grid_w
            device = feature.device
            shifts_x = (torch.arange(grid_w, dtype=torch.float32, device=device) + self.offset) * stride_w
            shifts_y = (torch.arange(grid_h, dtype=torch.float32, device=device) + self.offset) * stride_h
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=2).reshape(-1, 1, 4)
            cell = cell.to(dtype=feature.dtype, device=device)
            anchors.append((shifts.to(feature.dtype) + cell[None]).reshape(-1, 4))
        return anchors


class RPNHead(nn.Module):
    """Shared 3x3 conv + ReLU layers (`conv`, then `extra_convs`: one in all, two in torchvision's
    v2 builders), then per anchor an objectness logit and 4 box deltas."""

    def __init__(self, *, in_channels: int, num_anchors: int, num_convs: int = 1) -> None:
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"the RPN head needs at least one conv, got num_convs={num_convs}")
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1)
        self.extra_convs = nn.ModuleList(
            nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1) for _ in range(num_convs - 1)
        )
        self.relu = nn.ReLU()  # a module (no weights): CPU inference folds it into the conv (model/onednn.py)
        self.objectness_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.box_deltas = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=1)
        for conv in (self.conv, *self.extra_convs, self.objectness_logits, self.box_deltas):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level: logits `[B, A, H, W]` and deltas `[B, A * 4, H, W]`."""
        logits, deltas = [], []
        for feature in features:
            hidden = self.relu(self.conv(feature))
            for conv in self.extra_convs:
                hidden = self.relu(conv(hidden))
            logits.append(self.objectness_logits(hidden))
            deltas.append(self.box_deltas(hidden))
        return logits, deltas


def flatten_predictions(logits: list[Tensor], deltas: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-level head outputs -> `logits [B, sum_l H_l W_l A]`, `deltas [B, sum_l H_l W_l A, 4]`,
    in the anchors' (level, y, x, ratio) order."""
    flat_logits, flat_deltas = [], []
    for level_logits, level_deltas in zip(logits, deltas):
        batch, num_anchors, height, width = level_logits.shape
        flat_logits.append(level_logits.permute(0, 2, 3, 1).reshape(batch, -1))
        level_deltas = level_deltas.view(batch, num_anchors, 4, height, width).permute(0, 3, 4, 1, 2)
        flat_deltas.append(level_deltas.reshape(batch, -1, 4))
    return torch.cat(flat_logits, dim=1), torch.cat(flat_deltas, dim=1)


class RegionProposalNetwork(nn.Module):
    """Proposes object boxes: `forward(images, features, targets) -> (proposals, losses)`.

    `proposals[i]`: `[P_i, 4]` boxes of image i (at most `post_nms_top_n`), best first.
    Training also returns `loss_objectness` and `loss_rpn_box_reg` (torchvision's names).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        anchor_sizes: list[int],
        aspect_ratios: list[float],
        pre_nms_top_n_train: int,
        pre_nms_top_n_test: int,
        post_nms_top_n_train: int,
        post_nms_top_n_test: int,
        nms_thresh: float,
        score_thresh: float,
        fg_iou_thresh: float,
        bg_iou_thresh: float,
        batch_size_per_image: int,
        positive_fraction: float,
        crowd_ioa_thresh: float = 0.7,
        num_convs: int = 1,
        strides: tuple[int, ...] = (4, 8, 16, 32, 64),
        anchor_convention: str = "torchvision",
        anchor_offset: float = 0.0,
        min_proposal_size: float = MIN_PROPOSAL_SIZE,
        proposal_selection: str = "torchvision",
    ) -> None:
        """`proposal_selection` "torchvision" ranks proposals by their sigmoid probability and
        keeps boxes with both sides >= `min_proposal_size` above `score_thresh`; "detectron2"
        ranks by the logits (no ties where the sigmoid saturates in float32) and keeps boxes with
        both sides > `min_proposal_size`."""
        super().__init__()
        if proposal_selection not in PROPOSAL_SELECTIONS:
            raise ValueError(f"rpn.proposal_selection must be one of {PROPOSAL_SELECTIONS}, got {proposal_selection!r}")
        self.anchor_generator = AnchorGenerator(sizes=anchor_sizes, aspect_ratios=aspect_ratios, strides=strides,
                                                convention=anchor_convention, offset=anchor_offset)
        self.min_proposal_size, self.proposal_selection = float(min_proposal_size), proposal_selection
        self.head = RPNHead(in_channels=in_channels, num_anchors=len(aspect_ratios), num_convs=num_convs)
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        # Low-quality matches: every gt keeps its best anchors even below fg_iou_thresh.
        self.matcher = Matcher(
            high_threshold=fg_iou_thresh, low_threshold=bg_iou_thresh, allow_low_quality_matches=True
        )
        self.sampler = BalancedSampler(batch_size_per_image=batch_size_per_image, positive_fraction=positive_fraction)
        self.pre_nms_top_n = {"train": pre_nms_top_n_train, "test": pre_nms_top_n_test}
        self.post_nms_top_n = {"train": post_nms_top_n_train, "test": post_nms_top_n_test}
        self.nms_thresh = nms_thresh
        self.score_thresh = score_thresh
        self.crowd_ioa_thresh = crowd_ioa_thresh

    def forward(
        self, images: ImageBatch, features: dict[str, Tensor], targets: list[dict] | None = None
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        proposals, _, (logits, deltas, anchors) = self.propose(images, features)
        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("RegionProposalNetwork: targets are required in training mode")
            losses = self.losses(logits, deltas, anchors, targets)
        return proposals, losses

    def propose(
        self, images: ImageBatch, features: dict[str, Tensor]
    ) -> tuple[list[Tensor], list[Tensor], tuple[Tensor, Tensor, Tensor]]:
        """Proposals `[P_i, 4]` per image, best first, with their objectness logits `[P_i]`; and
        the raw head outputs the losses need: logits `[B, A_total]`, deltas `[B, A_total, 4]`,
        anchors `[A_total, 4]`."""
        feature_maps = list(features.values())
        logits, deltas = self.head(feature_maps)
        anchors_per_level = self.anchor_generator(tuple(images.tensors.shape[-2:]), feature_maps)
        anchors = torch.cat(anchors_per_level)  # [A_total, 4], the same for every image of the batch
        num_anchors_per_level = [len(a) for a in anchors_per_level]
        logits, deltas = flatten_predictions(logits, deltas)  # [B, A_total], [B, A_total, 4]

        num_images = logits.shape[0]
        proposals = self.box_coder.decode(deltas.detach().reshape(-1, 4), anchors.repeat(num_images, 1))
        proposals = proposals.view(num_images, -1, 4)
        proposals, proposal_logits = self.select_proposals(
            proposals, logits.detach(), images.image_sizes, num_anchors_per_level
        )
        return proposals, proposal_logits, (logits, deltas, anchors)

    def select_proposals(
        self, proposals: Tensor, logits: Tensor, image_sizes: list[tuple[int, int]], num_anchors_per_level: list[int]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """`proposals [B, A_total, 4]`, `logits [B, A_total]` -> per image boxes `[P_i, 4]` and
        their logits `[P_i]`.

        The top `pre_nms_top_n` per level, clipped to the image, without tiny boxes, above
        `score_thresh`, NMS within each level, then the best `post_nms_top_n` of the image.
        """
        mode = "train" if self.training else "test"
        device = proposals.device
        top_indices, top_levels = [], []
        offset = 0
        for level, level_logits in enumerate(logits.split(num_anchors_per_level, dim=1)):
            k = min(self.pre_nms_top_n[mode], level_logits.shape[1])
            top_indices.append(level_logits.topk(k, dim=1).indices + offset)
            top_levels.append(torch.full((k,), level, dtype=torch.int64, device=device))
            offset += level_logits.shape[1]
        top_indices = torch.cat(top_indices, dim=1)  # [B, K]
        levels = torch.cat(top_levels)  # [K]
        image_index = torch.arange(len(proposals), device=device)[:, None]
        top_logits = logits[image_index, top_indices]
        boxes = proposals[image_index, top_indices]

        selected, selected_logits = [], []
        for image_boxes, image_logits, image_size in zip(boxes, top_logits, image_sizes):
            image_boxes = clip_boxes_to_image(image_boxes, image_size)
            if self.proposal_selection == "detectron2":
                sides = image_boxes[:, 2:] - image_boxes[:, :2]
                keep = torch.where((sides > self.min_proposal_size).all(dim=1))[0]
                ranking = image_logits
            else:
                keep = remove_small_boxes(image_boxes, self.min_proposal_size)
                ranking = torch.sigmoid(image_logits)
                keep = keep[ranking[keep] >= self.score_thresh]
            keep = keep[batched_nms_top_k(image_boxes[keep], ranking[keep], levels[keep], self.nms_thresh,
                                          self.post_nms_top_n[mode])]
            selected.append(image_boxes[keep])
            selected_logits.append(image_logits[keep])
        return selected, selected_logits

    def label_anchors(self, anchors: Tensor, target: dict) -> tuple[Tensor, Tensor]:
        """Match one image's anchors `[A_total, 4]` to its gt boxes.

        Returns labels `[A_total]` float (1 object, 0 background, -1 ignored) and the matched gt
        box of every anchor `[A_total, 4]` (meaningful where the label is 1). Background anchors
        mostly inside a crowd region are ignored (see box_ops.ignore_crowd).
        """
        gt_boxes = target["boxes"].to(anchors.dtype)
        matched_idxs = self.matcher.match_boxes(gt_boxes, anchors)
        if "crowd_boxes" in target:
            matched_idxs = ignore_crowd(matched_idxs, anchors, target["crowd_boxes"], self.crowd_ioa_thresh)
        labels = (matched_idxs >= 0).to(torch.float32)
        labels[matched_idxs == BELOW_LOW_THRESHOLD] = 0.0
        labels[matched_idxs == BETWEEN_THRESHOLDS] = -1.0
        if len(gt_boxes) == 0:
            return labels, torch.zeros_like(anchors)
        return labels, gt_boxes[matched_idxs.clamp(min=0)]

    def losses(self, logits: Tensor, deltas: Tensor, anchors: Tensor, targets: list[dict]) -> dict[str, Tensor]:
        """Binary cross-entropy on the sampled anchors; smooth-L1 (beta 1/9) on the sampled positives,
        summed and divided by the number of sampled anchors (torchvision's normalisation).

        `logits [B, A_total]`, `deltas [B, A_total, 4]`, `anchors [A_total, 4]`.
        """
        labels, matched_gt_boxes = zip(*(self.label_anchors(anchors, target) for target in targets))
        positive_masks, negative_masks = self.sampler(list(labels))
        positive = torch.where(torch.cat(positive_masks))[0]  # indices into the B * A_total anchors
        negative = torch.where(torch.cat(negative_masks))[0]
        sampled = torch.cat([positive, negative])

        # Regression targets only for the sampled positives (the others never enter the loss).
        positive_anchors = anchors.repeat(len(targets), 1)[positive]
        regression_targets = self.box_coder.encode(torch.cat(matched_gt_boxes)[positive], positive_anchors)
        box_loss = F.smooth_l1_loss(
            deltas.reshape(-1, 4)[positive], regression_targets, beta=1 / 9, reduction="sum"
        ) / sampled.numel()
        objectness_loss = F.binary_cross_entropy_with_logits(logits.flatten()[sampled], torch.cat(labels)[sampled])
        return {"loss_objectness": objectness_loss, "loss_rpn_box_reg": box_loss}
