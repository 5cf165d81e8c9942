"""Mask R-CNN: transform -> backbone -> RPN -> RoI heads -> postprocess (He et al. 2017, Fig. 1).

`model(images)` in eval mode takes a list of `[3, H, W]` images (floats in 0-1, or uint8) and returns one dict
per image (`boxes`, `labels`, `scores`, and `masks [N, 1, H, W]` / `keypoints [N, K, 3]` /
`keypoints_scores [N, K]` when those heads exist), at the original image size.
`model(images, targets)` in train mode returns the losses under torchvision's names.
`build_model(config)` turns a `ModelConfig` into the modules: box only (Faster R-CNN), + masks,
+ keypoints, or all three.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..config import ModelConfig, RPNConfig
from .backbone import ResNetFPN
from .mask_head import paste_masks, paste_masks_per_box
from .roi_heads import build_roi_heads
from .rpn import RegionProposalNetwork
from .transform import ImageTransform


class MaskRCNN(nn.Module):
    """The whole detector. Build it with `build_model`; the pieces are plain attributes, and
    `model.config` is the `ModelConfig` that built it."""

    def __init__(
        self,
        *,
        transform: ImageTransform,
        backbone: ResNetFPN,
        rpn: RegionProposalNetwork,
        roi_heads: nn.Module,
        num_classes: int,
        num_keypoints: int | None = None,
        mask_supervision: str | None = "masks",
        paste_aligned: bool = False,
    ) -> None:
        """`num_classes` excludes background (labels are 1..num_classes); `num_keypoints` is None
        without a keypoint head; `mask_supervision` is "masks", "points" or None (no mask head) and
        says which target fields training needs; `paste_aligned` pastes masks in continuous
        coordinates (use it with an aligned mask pooler; False reproduces torchvision)."""
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.num_classes = num_classes
        self.num_keypoints = num_keypoints
        self.mask_supervision = mask_supervision
        self.paste_aligned = paste_aligned
        # > 0: paste torchvision's way (its exact numbers) in that many threads; the strict CPU
        # inference mode sets it (engine/cpu_inference.py). 0: the batched paste_masks.
        self.paste_per_box_threads = 0

    def forward(
        self, images: list[Tensor], targets: list[dict] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if not isinstance(images, (list, tuple)):
            raise TypeError(f"images: expected a list of [3, H, W] tensors, got {type(images).__name__}")
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode (model.eval() for inference)")
            check_targets(images, targets, num_classes=self.num_classes, num_keypoints=self.num_keypoints,
                          mask_supervision=self.mask_supervision)
        original_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]

        batch, targets = self.transform(images, targets)
        features = self.backbone(batch.tensors)
        proposals, rpn_losses = self.rpn(batch, features, targets)
        detections, head_losses = self.roi_heads(features, proposals, batch.image_sizes, targets)
        if self.training:
            return {**rpn_losses, **head_losses}

        return self._to_original_size(detections, batch.image_sizes, original_sizes)

    @torch.no_grad()
    def detect(self, images: list[Tensor], *, paste_masks: bool = True) -> list[dict[str, Tensor]]:
        """`model(images)` in eval mode; with `paste_masks=False` the masks stay `[N, 1, M, M]`
        probabilities over their boxes (boxes at the image's own size), N * M * M values instead of
        N * H * W: paste them when and where they must be dense (`mask_head.paste_masks`, with
        `aligned=model.paste_aligned`)."""
        if self.training:
            raise RuntimeError("detect runs in eval mode: call model.eval() first")
        if paste_masks:
            return self(images)
        original_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        batch, _ = self.transform(images)
        features = self.backbone(batch.tensors)
        proposals, _ = self.rpn(batch, features)
        detections, _ = self.roi_heads(features, proposals, batch.image_sizes)
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)

    @torch.no_grad()
    def segment_boxes(self, images: list[Tensor], boxes: list[Tensor], labels: list[Tensor]) -> list[dict[str, Tensor]]:
        """Run the mask (and keypoint) heads on given boxes instead of the detector's: the
        "ground-truth boxes" evaluation of Birodkar et al. 2021, or masks for boxes from elsewhere.

        boxes `[N, 4]` (x1, y1, x2, y2 in the image's pixels) and labels `[N]` (1..num_classes) per
        image; returns one dict per image like `forward` in eval mode (`boxes`, `labels`, `masks
        [N, 1, H, W]` probabilities at the image's size, keypoints when the model has them), in the
        order given. The model must be in eval mode.
        """
        if self.training:
            raise RuntimeError("segment_boxes runs in eval mode: call model.eval() first")
        if self.roi_heads.mask_head is None and self.roi_heads.keypoint_head is None:
            raise RuntimeError("segment_boxes: this model has neither a mask head nor a keypoint head")
        if not (len(images) == len(boxes) == len(labels)):
            raise ValueError(f"segment_boxes: {len(images)} images, {len(boxes)} box sets, {len(labels)} label sets")
        original_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        given = [{"boxes": b.float(), "labels": c.long()} for b, c in zip(boxes, labels)]
        batch, scaled = self.transform(images, given)
        features = self.backbone(batch.tensors)
        detections = [{"boxes": t["boxes"], "labels": t["labels"]} for t in scaled]
        self.roi_heads.run_on_boxes(features, batch.image_sizes, detections)
        return self._to_original_size(detections, batch.image_sizes, original_sizes)

    def _to_original_size(self, detections, image_sizes, original_sizes) -> list[dict[str, Tensor]]:
        """Boxes and keypoints back to each image's own size; masks pasted into it."""
        detections = self.transform.postprocess(detections, image_sizes, original_sizes)
        for detection, size in zip(detections, original_sizes):
            if "masks" not in detection:
                continue
            # [N, 1, M, M] probabilities over each box -> [N, 1, H, W] images
            if self.paste_per_box_threads > 0 and not self.paste_aligned:
                detection["masks"] = paste_masks_per_box(
                    detection["masks"], detection["boxes"], size, padding=1, num_threads=self.paste_per_box_threads
                )
            else:
                detection["masks"] = paste_masks(
                    detection["masks"], detection["boxes"], size, padding=1, aligned=self.paste_aligned
                )
        return detections


# --------------------------------------------------------------------------- target checks
def check_targets(
    images: list[Tensor],
    targets: list[dict],
    *,
    num_classes: int,
    num_keypoints: int | None,
    mask_supervision: str | None,
) -> None:
    """Raise a ValueError naming the image (index and image_id), the field and the value for any
    target the model cannot train on. Vectorised per image: no loop over instances."""
    if len(targets) != len(images):
        raise ValueError(f"got {len(images)} images but {len(targets)} targets")
    for index, (image, target) in enumerate(zip(images, targets)):
        where = _describe_image(index, target)
        if not isinstance(target, dict):
            raise ValueError(f"{where}: target must be a dict, got {type(target).__name__}")
        for key in ("boxes", "labels"):
            if key not in target:
                raise ValueError(f"{where}: target has no {key!r} (keys: {sorted(target)})")
        boxes = _tensor(target, "boxes", where, floating=True, shape=(None, 4))
        num_instances = len(boxes)
        if not torch.isfinite(boxes).all():
            bad = int((~torch.isfinite(boxes)).any(dim=1).nonzero()[0])
            raise ValueError(f"{where}: boxes[{bad}] = {boxes[bad].tolist()} is not finite")
        degenerate = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if degenerate.any():
            bad = int(degenerate.nonzero()[0])
            raise ValueError(
                f"{where}: boxes[{bad}] = {boxes[bad].tolist()} is degenerate or inverted "
                f"(expected x1 < x2 and y1 < y2, x1y1x2y2 in pixels)"
            )
        labels = _tensor(target, "labels", where, dtype=torch.int64, shape=(num_instances,))
        out_of_range = (labels < 1) | (labels > num_classes)
        if out_of_range.any():
            bad = int(out_of_range.nonzero()[0])
            raise ValueError(f"{where}: labels[{bad}] = {int(labels[bad])} is out of range 1..{num_classes}")
        if "crowd_boxes" in target:
            _tensor(target, "crowd_boxes", where, floating=True, shape=(None, 4))
        if "has_mask" in target:
            _tensor(target, "has_mask", where, dtype=torch.bool, shape=(num_instances,))
        height, width = int(image.shape[-2]), int(image.shape[-1])
        if mask_supervision == "masks" or (mask_supervision is not None and "masks" in target):
            _check_masks(target, where, num_instances, (height, width))
        if mask_supervision == "points" or "point_coords" in target:
            coords = _tensor(target, "point_coords", where, floating=True, shape=(num_instances, None, 2))
            _tensor(target, "point_labels", where, floating=True, shape=(num_instances, coords.shape[1]))
        if num_keypoints is not None:
            _tensor(target, "keypoints", where, floating=True, shape=(num_instances, num_keypoints, 3))


def _check_masks(target: dict, where: str, num_instances: int, image_size: tuple[int, int]) -> None:
    if "masks" not in target:
        raise ValueError(f"{where}: the mask head needs target 'masks' (keys: {sorted(target)})")
    masks = target["masks"]
    if isinstance(masks, Tensor):
        _tensor(target, "masks", where, shape=(num_instances, *image_size))
        return
    # InstanceMasks (docs/design.md), duck-typed
    if len(masks) != num_instances or tuple(masks.image_size) != image_size:
        raise ValueError(
            f"{where}: masks hold {len(masks)} instances of size {tuple(masks.image_size)}, expected "
            f"{num_instances} (one per box) of the image size {image_size}"
        )


def _tensor(
    target: dict,
    key: str,
    where: str,
    *,
    dtype: torch.dtype | None = None,
    floating: bool = False,
    shape: tuple[int | None, ...],
) -> Tensor:
    """Check type, dtype and shape (None = any size) of `target[key]` and return it."""
    if key not in target:
        raise ValueError(f"{where}: target has no {key!r} (keys: {sorted(target)})")
    value = target[key]
    if not isinstance(value, Tensor):
        raise ValueError(f"{where}: {key} must be a tensor, got {type(value).__name__}")
    if dtype is not None and value.dtype != dtype:
        raise ValueError(f"{where}: {key} must have dtype {dtype}, got {value.dtype}")
    if floating and not value.is_floating_point():
        raise ValueError(f"{where}: {key} must be a float tensor, got {value.dtype}")
    expected = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
    if value.dim() != len(shape) or any(s is not None and s != v for s, v in zip(shape, value.shape)):
        raise ValueError(f"{where}: {key} has shape {list(value.shape)}, expected {expected}")
    return value


def _describe_image(index: int, target: object) -> str:
    """"image 3 (image_id 42)": the position in the batch, and the data set's id when the target has one."""
    if not isinstance(target, dict) or "image_id" not in target:
        return f"image {index}"
    image_id = target["image_id"]
    if isinstance(image_id, Tensor) and image_id.numel() == 1:
        image_id = image_id.item()
    return f"image {index} (image_id {image_id})"


# --------------------------------------------------------------------------- building
def _build_rpn(rpn_config: RPNConfig, backbone: ResNetFPN) -> RegionProposalNetwork:
    """The RPN over the backbone's levels (their channels and strides), from `model.rpn`."""
    return RegionProposalNetwork(
        in_channels=backbone.out_channels,
        anchor_sizes=rpn_config.anchor_sizes,
        num_convs=rpn_config.num_convs,
        aspect_ratios=rpn_config.aspect_ratios,
        pre_nms_top_n_train=rpn_config.pre_nms_top_n_train,
        pre_nms_top_n_test=rpn_config.pre_nms_top_n_test,
        post_nms_top_n_train=rpn_config.post_nms_top_n_train,
        post_nms_top_n_test=rpn_config.post_nms_top_n_test,
        nms_thresh=rpn_config.nms_thresh,
        score_thresh=rpn_config.score_thresh,
        fg_iou_thresh=rpn_config.fg_iou_thresh,
        bg_iou_thresh=rpn_config.bg_iou_thresh,
        batch_size_per_image=rpn_config.batch_size_per_image,
        positive_fraction=rpn_config.positive_fraction,
        crowd_ioa_thresh=rpn_config.crowd_ioa_thresh,
        strides=backbone.strides,
        anchor_convention=rpn_config.anchor_convention,
        anchor_offset=rpn_config.anchor_offset,
        min_proposal_size=rpn_config.min_proposal_size,
        proposal_selection=rpn_config.proposal_selection,
    )


def build_model(config: ModelConfig) -> MaskRCNN:
    """Plain construction from the config: ResNet-FPN, RPN, and the RoI heads that are enabled."""
    transform = ImageTransform(
        min_size=config.transform.min_size,
        min_size_test=config.transform.min_size_test,
        max_size=config.transform.max_size,
        image_mean=config.transform.image_mean,
        image_std=config.transform.image_std,
        size_divisible=config.transform.size_divisible,
        channel_order=config.transform.channel_order,
        pixel_scale=config.transform.pixel_scale,
        size_rounding=config.transform.size_rounding,
    )
    backbone = ResNetFPN(
        depth=config.backbone.depth,
        norm=config.backbone.norm,
        trainable_stages=config.backbone.trainable_stages,
        fpn_channels=config.backbone.fpn_channels,
        fpn_norm=config.backbone.fpn_norm,
        weights=config.backbone.weights,
        stem_channels=config.backbone.stem_channels,
        res2_channels=config.backbone.res2_channels,
        groups=config.backbone.groups,
        width_per_group=config.backbone.width_per_group,
        stride_in_1x1=config.backbone.stride_in_1x1,
    )
    rpn = _build_rpn(config.rpn, backbone)
    roi_heads = build_roi_heads(config, in_channels=backbone.out_channels)

    mask_supervision = None
    if config.mask_head.enabled:
        mask_supervision = "points" if config.mask_head.point_supervision else "masks"
    num_keypoints = config.keypoint_head.num_keypoints if config.keypoint_head.enabled else None
    model = MaskRCNN(transform=transform, backbone=backbone, rpn=rpn, roi_heads=roi_heads,
                     num_classes=config.num_classes, num_keypoints=num_keypoints, mask_supervision=mask_supervision,
                     paste_aligned=config.mask_head.enabled and config.mask_head.aligned)
    model.config = copy.deepcopy(config)  # what built it: save_checkpoint stores it beside the weights
    # label -> COCO category id and name, plain data; the loaders fill it (checkpoint/label_space.py)
    model.label_space = None
    return model
