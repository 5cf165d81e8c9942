"""Small seeded models for the tests that need a real `MaskRCNN` (export, Predictor, predict):
ResNet-18, a 16-channel FPN, 96 px inputs, thin heads; built in well under a second."""

from __future__ import annotations

import torch

from maskrcnn.config import ModelConfig
from maskrcnn.model.mask_rcnn import MaskRCNN, build_model

KINDS = {"box": (False, False), "mask": (True, False), "keypoint": (False, True), "all": (True, True)}


def tiny_config(kind: str = "mask", *, num_classes: int = 3) -> ModelConfig:
    with_masks, with_keypoints = KINDS[kind]
    config = ModelConfig(num_classes=num_classes)
    config.backbone.depth, config.backbone.norm, config.backbone.fpn_channels = 18, "bn", 16
    config.transform.min_size_test, config.transform.max_size = 96, 160
    config.rpn.pre_nms_top_n_test, config.rpn.post_nms_top_n_test = 200, 50
    config.box_head.fc_dim, config.box_head.detections_per_img = 32, 20
    config.mask_head.enabled, config.mask_head.conv_dim, config.mask_head.num_convs = with_masks, 8, 1
    keypoints = config.keypoint_head
    keypoints.enabled, keypoints.num_keypoints, keypoints.conv_dim, keypoints.num_convs = with_keypoints, 3, 8, 1
    return config


def tiny_model(kind: str = "mask", *, seed: int = 0, score_thresh: float | None = None) -> MaskRCNN:
    config = tiny_config(kind)
    if score_thresh is not None:
        config.box_head.score_thresh = score_thresh
    torch.manual_seed(seed)
    return build_model(config).eval()
