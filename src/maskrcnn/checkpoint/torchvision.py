"""torchvision's detection weights: `from_torchvision(source)` converts `fasterrcnn_resnet50_fpn`,
`maskrcnn_resnet50_fpn`, `keypointrcnn_resnet50_fpn` or the v2 builders `fasterrcnn_resnet50_fpn_v2`
/ `maskrcnn_resnet50_fpn_v2` (a model, its state dict, or a saved .pth) into our `MaskRCNN`,
configured with torchvision's settings so that it reproduces torchvision's outputs; `convert_torchvision` writes the result as our checkpoint (format.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from torch import Tensor, nn

from ..config import ModelConfig
from ..model.mask_rcnn import MaskRCNN, build_model
from .format import load_state_dict_checked, read_weights_file
from .label_space import PERSON_LABELS, torchvision_coco_labels, torchvision_coco_slots, unused_labels

# torchvision name (regex) -> our name. Everything not listed keeps its name (the ResNet body and
# the box head keep torchvision's names). Old (v1) torchvision layouts without the `.0` of
# Conv2dNormActivation are accepted too.
TORCHVISION_TO_OURS: list[tuple[str, str | Callable[[re.Match], str]]] = [
    (r"^backbone\.fpn\.inner_blocks\.(\d+)\.(?:0\.)?(weight|bias)$", r"backbone.fpn.lateral_convs.\1.\2"),
    (r"^backbone\.fpn\.layer_blocks\.(\d+)\.(?:0\.)?(weight|bias)$", r"backbone.fpn.output_convs.\1.\2"),
    # v2: a norm after each FPN conv
    (r"^backbone\.fpn\.inner_blocks\.(\d+)\.1\.", r"backbone.fpn.lateral_norms.\1."),
    (r"^backbone\.fpn\.layer_blocks\.(\d+)\.1\.", r"backbone.fpn.output_norms.\1."),
    (r"^rpn\.head\.conv\.(?:0\.0\.)?(weight|bias)$", r"rpn.head.conv.\1"),
    # v2: more RPN convs (torchvision's conv.1.0, conv.2.0, ...)
    (r"^rpn\.head\.conv\.(\d+)\.0\.", lambda m: f"rpn.head.extra_convs.{int(m[1]) - 1}."),
    # v2 box head (FastRCNNConvFCHead): conv blocks `i.0` / `i.1`; its Linear layers are renamed
    # by _box_head_fc_names, since their index depends on the number of convs
    (r"^roi_heads\.box_head\.(\d+)\.(\d+)\.", r"roi_heads.box_head.convs.\1.\2."),
    (r"^rpn\.head\.cls_logits\.", r"rpn.head.objectness_logits."),
    (r"^rpn\.head\.bbox_pred\.", r"rpn.head.box_deltas."),
    # mask head (see mask_head.py): torchvision's Sequential of conv blocks, or the v1 mask_fcn{n}
    (r"^roi_heads\.mask_head\.(\d+)\.(\d+)\.", r"roi_heads.mask_head.convs.\1.\2."),
    (r"^roi_heads\.mask_head\.mask_fcn(\d+)\.", lambda m: f"roi_heads.mask_head.convs.{int(m[1]) - 1}.0."),
    (r"^roi_heads\.mask_predictor\.conv5_mask\.", r"roi_heads.mask_head.deconv."),
    (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.", r"roi_heads.mask_head.predictor."),
    # keypoint head (see keypoint_head.py): torchvision interleaves ReLUs, so its convs are 0, 2, 4, ...
    (r"^roi_heads\.keypoint_head\.(\d+)\.", lambda m: f"roi_heads.keypoint_head.convs.{int(m[1]) // 2}."),
    (r"^roi_heads\.keypoint_predictor\.kps_score_lowres\.", r"roi_heads.keypoint_head.deconv."),
]
REQUIRED_TORCHVISION_KEYS = (
    "backbone.body.conv1.weight",
    "backbone.fpn.inner_blocks.0.0.weight",
    "rpn.head.cls_logits.weight",
    "roi_heads.box_predictor.cls_score.weight",
)
V1_BOX_HEAD_KEY = "roi_heads.box_head.fc6.weight"  # TwoMLPHead; v2's FastRCNNConvFCHead is a Sequential
MASK_KEY = "roi_heads.mask_predictor.mask_fcn_logits.weight"
KEYPOINT_KEY = "roi_heads.keypoint_predictor.kps_score_lowres.weight"
# torchvision's keypointrcnn_resnet50_fpn trains on several scales (its other settings are the defaults)
KEYPOINT_RCNN_TRAIN_SIZES = [640, 672, 704, 736, 768, 800]


def from_torchvision(source: nn.Module | dict | str | Path) -> MaskRCNN:
    """Our model, in eval mode, equal to the torchvision detection model the weights come from.

    Infers the architecture (Faster / Mask / Keypoint R-CNN), the ResNet depth, the norm (frozen
    BatchNorm for pretrained weights, BatchNorm for a model built without them), the number of
    classes (ours excludes background) and keypoints from the weights. A 91-slot COCO head gets
    torchvision's COCO label table (`model.label_space`, label = COCO category id) and never
    predicts its ten N/A slots; a 1-class keypoint head is COCO's person.
    """
    state = torchvision_state_dict(source)
    config = config_for_torchvision(state)
    if isinstance(source, nn.Module):  # a live model also tells its settings, which may differ from the builders'
        copy_torchvision_settings(source, config)
    model = build_model(config)
    load_state_dict_checked(model, convert_torchvision_state_dict(state), what="torchvision weights")
    model.label_space = torchvision_labels(config)
    return model.eval()


def torchvision_state_dict(source: nn.Module | dict | str | Path) -> dict[str, Tensor]:
    """The state dict of a torchvision model, a state dict, a reference-script checkpoint
    (`{"model": state_dict, ...}`) or a .pth path of either."""
    if isinstance(source, nn.Module):
        return source.state_dict()
    if isinstance(source, (str, Path)):
        source = read_weights_file(source, what="torchvision weights")
    if not isinstance(source, dict):
        raise TypeError(f"expected a torchvision model, a state dict or a .pth path, got {type(source).__name__}")
    if "model" in source and isinstance(source["model"], dict):
        source = source["model"]
    missing = [key for key in REQUIRED_TORCHVISION_KEYS if _find(source, key) is None]
    if V1_BOX_HEAD_KEY not in source and not _box_head_fc_keys(source):
        missing.append(f"{V1_BOX_HEAD_KEY} (or the Linear layers of a v2 roi_heads.box_head)")
    if missing:
        sample = ", ".join(list(source)[:5])
        raise ValueError(
            "not the state dict of a torchvision fasterrcnn/maskrcnn/keypointrcnn_resnet*_fpn model: "
            f"missing {', '.join(missing)} (its keys start with: {sample})"
        )
    return source


def _find(state: dict, key: str, old_key: str | None = None) -> Tensor | None:
    """`state[key]`, or the same weight under torchvision's v1 name (`inner_blocks.0.weight` for
    `inner_blocks.0.0.weight`, or `old_key`)."""
    for candidate in (key, old_key or key.replace(".0.0.", ".0.")):
        if candidate in state:
            return state[candidate]
    return None


def config_for_torchvision(state: dict[str, Tensor]) -> ModelConfig:
    """torchvision's builder settings for the model these weights come from."""
    config = ModelConfig()
    config.num_classes = state["roi_heads.box_predictor.cls_score.weight"].shape[0] - 1  # minus background
    if config.num_classes == len(torchvision_coco_slots()) - 1:
        config.box_head.suppressed_labels = unused_labels(torchvision_coco_labels(), num_classes=config.num_classes)
    config.backbone.depth = _resnet_depth(state)
    # Built without pretrained weights, torchvision uses trainable BatchNorm in all stages;
    # with them, FrozenBatchNorm2d (which has no num_batches_tracked) and 3 trainable stages.
    trained_with_bn = any(k.startswith("backbone.body.") and k.endswith("num_batches_tracked") for k in state)
    config.backbone.norm = "bn" if trained_with_bn else "frozen_bn"
    config.backbone.trainable_stages = 5 if trained_with_bn else 3
    config.backbone.fpn_channels = _find(state, "backbone.fpn.inner_blocks.0.0.weight").shape[0]
    config.backbone.fpn_norm = "bn" if "backbone.fpn.inner_blocks.0.1.running_mean" in state else "none"
    config.rpn.num_convs = max(1, sum(1 for k in state if re.fullmatch(r"rpn\.head\.conv\.\d+\.0\.weight", k)))
    config.rpn.aspect_ratios = [0.5, 1.0, 2.0]
    if state["rpn.head.cls_logits.weight"].shape[0] != len(config.rpn.aspect_ratios):
        raise ValueError(
            f"rpn.head.cls_logits has {state['rpn.head.cls_logits.weight'].shape[0]} anchors per location; "
            "torchvision's builders use 3 (aspect ratios 0.5, 1, 2)"
        )
    _infer_box_head(state, config)
    config.mask_head.enabled = MASK_KEY in state
    if config.mask_head.enabled:
        config.mask_head.num_convs = sum(1 for k in state if re.fullmatch(r"roi_heads\.mask_head\.\d+\.0\.weight", k)
                                         or re.fullmatch(r"roi_heads\.mask_head\.mask_fcn\d+\.weight", k))
        first_conv = _find(state, "roi_heads.mask_head.0.0.weight", "roi_heads.mask_head.mask_fcn1.weight")
        config.mask_head.conv_dim = first_conv.shape[0]
        config.mask_head.class_agnostic = state[MASK_KEY].shape[0] == 1
        config.mask_head.norm = "bn" if "roi_heads.mask_head.0.1.running_mean" in state else "none"
    config.keypoint_head.enabled = KEYPOINT_KEY in state
    if config.keypoint_head.enabled:
        config.keypoint_head.num_keypoints = state[KEYPOINT_KEY].shape[1]  # ConvTranspose: [in, out, k, k]
        keypoint_convs = [k for k in state if re.fullmatch(r"roi_heads\.keypoint_head\.\d+\.weight", k)]
        config.keypoint_head.num_convs = len(keypoint_convs)
        config.keypoint_head.conv_dim = state["roi_heads.keypoint_head.0.weight"].shape[0]
        config.transform.min_size = list(KEYPOINT_RCNN_TRAIN_SIZES)
    return config


def torchvision_labels(config: ModelConfig) -> list[dict] | None:
    """The label table of torchvision's COCO weights (see from_torchvision); None for other heads."""
    if config.num_classes == len(torchvision_coco_slots()) - 1:
        return torchvision_coco_labels()
    if config.keypoint_head.enabled and config.num_classes == 1:
        return [dict(entry) for entry in PERSON_LABELS]
    return None


def _box_head_fc_keys(state: dict[str, Tensor]) -> list[str]:
    """The weights of a v2 box head's Linear layers (`roi_heads.box_head.{i}.weight`, 2-D), in order."""
    keys = [k for k in state if re.fullmatch(r"roi_heads\.box_head\.\d+\.weight", k) and state[k].dim() == 2]
    return sorted(keys, key=lambda k: int(k.split(".")[2]))


def _infer_box_head(state: dict[str, Tensor], config: ModelConfig) -> None:
    """v1: TwoMLPHead (fc6, fc7). v2: FastRCNNConvFCHead, conv blocks (with BatchNorm) then Linear layers."""
    box = config.box_head
    if V1_BOX_HEAD_KEY in state:
        box.num_fcs, box.fc_dim = 2, state[V1_BOX_HEAD_KEY].shape[0]
        return
    fc_keys = _box_head_fc_keys(state)
    if len(fc_keys) > 2:
        raise ValueError(f"roi_heads.box_head has {len(fc_keys)} Linear layers; 1 or 2 are supported")
    convs = [k for k in state if re.fullmatch(r"roi_heads\.box_head\.\d+\.0\.weight", k)]
    box.num_convs, box.num_fcs, box.fc_dim = len(convs), len(fc_keys), state[fc_keys[0]].shape[0]
    if convs:
        box.conv_dim = state["roi_heads.box_head.0.0.weight"].shape[0]
        box.norm = "bn" if "roi_heads.box_head.0.1.running_mean" in state else "none"


def copy_torchvision_settings(model: nn.Module, config: ModelConfig) -> None:
    """Read the inference and training settings of a torchvision GeneralizedRCNN into `config`."""
    transform, rpn, heads = model.transform, model.rpn, model.roi_heads
    config.transform.min_size = [int(s) for s in transform.min_size]
    config.transform.min_size_test = int(transform.min_size[-1])  # torchvision evaluates at the last one
    config.transform.max_size = int(transform.max_size)
    config.transform.image_mean, config.transform.image_std = list(transform.image_mean), list(transform.image_std)
    config.transform.size_divisible = int(transform.size_divisible)
    anchor_sizes, ratios = rpn.anchor_generator.sizes, rpn.anchor_generator.aspect_ratios
    if any(len(sizes) != 1 for sizes in anchor_sizes) or len(set(map(tuple, ratios))) != 1:
        raise ValueError(f"anchors {anchor_sizes} x {ratios}: one size per level, the same ratios everywhere expected")
    config.rpn.anchor_sizes = [int(sizes[0]) for sizes in anchor_sizes]
    config.rpn.aspect_ratios = [float(r) for r in rpn.anchor_generator.aspect_ratios[0]]
    config.rpn.pre_nms_top_n_train = rpn._pre_nms_top_n["training"]
    config.rpn.pre_nms_top_n_test = rpn._pre_nms_top_n["testing"]
    config.rpn.post_nms_top_n_train = rpn._post_nms_top_n["training"]
    config.rpn.post_nms_top_n_test = rpn._post_nms_top_n["testing"]
    config.rpn.nms_thresh, config.rpn.score_thresh = rpn.nms_thresh, rpn.score_thresh
    config.rpn.fg_iou_thresh = rpn.proposal_matcher.high_threshold
    config.rpn.bg_iou_thresh = rpn.proposal_matcher.low_threshold
    config.rpn.batch_size_per_image = rpn.fg_bg_sampler.batch_size_per_image
    config.rpn.positive_fraction = rpn.fg_bg_sampler.positive_fraction
    box = config.box_head
    box.fg_iou_thresh, box.bg_iou_thresh = heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold
    box.batch_size_per_image = heads.fg_bg_sampler.batch_size_per_image
    box.positive_fraction = heads.fg_bg_sampler.positive_fraction
    box.bbox_reg_weights = [float(w) for w in heads.box_coder.weights]
    box.score_thresh, box.nms_thresh = heads.score_thresh, heads.nms_thresh
    box.detections_per_img = heads.detections_per_img
    box.pooler_resolution, box.sampling_ratio = _pooler_settings(heads.box_roi_pool)
    if config.mask_head.enabled:
        config.mask_head.pooler_resolution, config.mask_head.sampling_ratio = _pooler_settings(heads.mask_roi_pool)
    if config.keypoint_head.enabled:
        config.keypoint_head.pooler_resolution, config.keypoint_head.sampling_ratio = _pooler_settings(
            heads.keypoint_roi_pool
        )


def _pooler_settings(pooler: nn.Module) -> tuple[int, int]:
    output_size = pooler.output_size
    if len(set(output_size)) != 1:
        raise ValueError(f"RoI pooler output size {output_size}: square pooling expected")
    return int(output_size[0]), int(pooler.sampling_ratio)


def _resnet_depth(state: dict[str, Tensor]) -> int:
    blocks = {layer: len({k.split(".")[3] for k in state if k.startswith(f"backbone.body.{layer}.")})
              for layer in ("layer1", "layer2", "layer3", "layer4")}
    bottleneck = "backbone.body.layer1.0.conv3.weight" in state
    layout = (blocks["layer1"], blocks["layer2"], blocks["layer3"], blocks["layer4"], bottleneck)
    depths = {(2, 2, 2, 2, False): 18, (3, 4, 6, 3, False): 34, (3, 4, 6, 3, True): 50, (3, 4, 23, 3, True): 101}
    if layout not in depths:
        raise ValueError(f"backbone.body is not a ResNet-18/34/50/101: blocks per stage {layout[:4]}, "
                         f"bottleneck={bottleneck}")
    return depths[layout]


def convert_torchvision_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename torchvision's keys to ours (see TORCHVISION_TO_OURS)."""
    fc_names = {}
    for index, key in enumerate(_box_head_fc_keys(state) if V1_BOX_HEAD_KEY not in state else []):
        prefix = key.removesuffix("weight")
        fc_names.update({prefix + "weight": f"roi_heads.box_head.fc{6 + index}.weight",
                         prefix + "bias": f"roi_heads.box_head.fc{6 + index}.bias"})
    converted = {}
    for key, value in state.items():
        if key in fc_names:
            converted[fc_names[key]] = value
            continue
        for pattern, replacement in TORCHVISION_TO_OURS:
            key = re.sub(pattern, replacement, key)
        converted[key] = value
    return converted


def convert_torchvision(source: str | Path, destination: str | Path) -> MaskRCNN:
    """`maskrcnn convert`: torchvision .pth -> our checkpoint (and its recipe, see convert.py).
    Returns the converted model."""
    from .convert import convert  # convert.py imports this module

    return convert(source, destination)
