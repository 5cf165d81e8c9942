"""detectron2's weights and configs -> our model, without detectron2.

`from_detectron2(weights, config)` reads a model-zoo `.pkl` (`{"model": {name: numpy array}}`)
or a `DetectionCheckpointer` `.pth` (`{"model": state_dict}`) and detectron2's YAML config (the
resolved `config.yaml` of a training run, or a zoo file with its `_BASE_` chain), and returns our
`MaskRCNN` set to detectron2's conventions (model/ holds the options, this module picks them):

    input            RGB 0-1 -> INPUT.FORMAT channels in 0-255, minus PIXEL_MEAN, over PIXEL_STD;
                     ResizeShortestEdge sizes (MIN_SIZE_TEST, MAX_SIZE_TEST, rounded sides)
    backbone         ResNet / ResNeXt (NUM_GROUPS, WIDTH_PER_GROUP, STRIDE_IN_1X1) + FPN
    anchors          exact cell anchors, nominal strides, ANCHOR_GENERATOR.OFFSET
    proposals        ranked by logit, sides > PROPOSAL_GENERATOR.MIN_SIZE, RPN test top-k / NMS
    RoI pooling      ROIAlignV2 (aligned) with POOLER_SAMPLING_RATIO 0 (adaptive), eq. 1 levels
    box head         background-last scores and class-specific (or agnostic) deltas, moved to our
                     background-first layout; empty boxes dropped after NMS; test thresholds
    mask head        class-specific or CLS_AGNOSTIC_MASK; pasted in continuous coordinates
    keypoint head    detectron2's keypoint score

Widths (stem, stages, FPN, head convs and FCs), class and keypoint counts come off the weights;
the config gives everything else. A setting this loader does not implement (C4 / DC5 backbones,
cascade heads, deformable convs, RetinaNet, norms in the heads, ...) is refused with a ValueError
naming the key and its value: a model is never loaded half-right. detectron2 itself is neither
imported nor needed; the YAML is read with PyYAML.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import ModelConfig
from ..model.mask_rcnn import MaskRCNN, build_model
from .detectron2_config import anchor_settings, check_supported, read_config_file, resolved_config, setting
from .format import load_state_dict_checked, read_weights_file
from .label_space import PERSON_LABELS, coco_categories, labels_from_categories

BOTTLENECK_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}

# detectron2 name (regex) -> ours. detectron2 counts res2..res5, FPN levels 2..5 and head convs from 1;
# ours are layer1..layer4 and 0-based lists. Norms are `<conv>.norm.*` there, `bn<n>` / `downsample.1` here.
DETECTRON2_TO_OURS: list[tuple[str, Callable[[re.Match], str]]] = [
    (r"backbone\.bottom_up\.stem\.conv1\.norm\.(.+)", lambda m: f"backbone.body.bn1.{m[1]}"),
    (r"backbone\.bottom_up\.stem\.conv1\.(.+)", lambda m: f"backbone.body.conv1.{m[1]}"),
    (r"backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.norm\.(.+)",
     lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.downsample.1.{m[3]}"),
    (r"backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.(.+)",
     lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.downsample.0.{m[3]}"),
    (r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.norm\.(.+)",
     lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}.{m[4]}"),
    (r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.(.+)",
     lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}.{m[4]}"),
    (r"backbone\.fpn_lateral(\d)\.(.+)", lambda m: f"backbone.fpn.lateral_convs.{int(m[1]) - 2}.{m[2]}"),
    (r"backbone\.fpn_output(\d)\.(.+)", lambda m: f"backbone.fpn.output_convs.{int(m[1]) - 2}.{m[2]}"),
    (r"proposal_generator\.rpn_head\.(conv|objectness_logits)\.(.+)", lambda m: f"rpn.head.{m[1]}.{m[2]}"),
    (r"proposal_generator\.rpn_head\.anchor_deltas\.(.+)", lambda m: f"rpn.head.box_deltas.{m[1]}"),
    (r"roi_heads\.box_head\.conv(\d+)\.(weight|bias)", lambda m: f"roi_heads.box_head.convs.{int(m[1]) - 1}.0.{m[2]}"),
    (r"roi_heads\.box_head\.fc([12])\.(.+)", lambda m: f"roi_heads.box_head.fc{int(m[1]) + 5}.{m[2]}"),
    (r"roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(.+)", lambda m: m[0]),
    (r"roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)",
     lambda m: f"roi_heads.mask_head.convs.{int(m[1]) - 1}.0.{m[2]}"),
    (r"roi_heads\.mask_head\.(deconv|predictor)\.(.+)", lambda m: m[0]),
    (r"roi_heads\.keypoint_head\.conv_fcn(\d+)\.(weight|bias)",
     lambda m: f"roi_heads.keypoint_head.convs.{int(m[1]) - 1}.{m[2]}"),
    (r"roi_heads\.keypoint_head\.score_lowres\.(.+)", lambda m: f"roi_heads.keypoint_head.deconv.{m[1]}"),
]
# Buffers detectron2 saves that carry nothing the config does not (or that FrozenBN drops).
IGNORED_KEYS = re.compile(r"^(pixel_mean|pixel_std|proposal_generator\.anchor_generator\..*|.*num_batches_tracked)$")


# --------------------------------------------------------------------------- public API
def from_detectron2(weights: str | Path, config: str | Path) -> MaskRCNN:
    """Our model, in eval mode, giving detectron2's detections for its weights and config.

    Takes the same input as every `MaskRCNN` (a list of RGB `[3, H, W]` floats in 0-1) and
    returns labels 1..K for detectron2's classes 0..K-1.
    """
    cfg, model_config, state = _read(weights=weights, config=config)
    model = build_model(model_config)
    load_state_dict_checked(model, state, what=f"detectron2 weights {weights}")
    model.label_space = detectron2_labels(cfg, model_config)
    return model.eval()


def detectron2_labels(cfg: dict, config: ModelConfig) -> list[dict] | None:
    """The label table of a model trained on COCO (DATASETS.TRAIN names a coco_* set): detectron2
    numbers COCO's 80 categories contiguously by ascending id, and its keypoint models detect COCO's
    person. None for other data: labels are then just numbers."""
    trained_on = [str(name) for name in _as_list(setting(cfg, "DATASETS.TRAIN"))]
    if not trained_on or not all(name.startswith(("coco_", "keypoints_coco_")) for name in trained_on):
        return None
    if config.keypoint_head.enabled and config.num_classes == 1:
        return [dict(entry) for entry in PERSON_LABELS]
    categories = coco_categories()
    return labels_from_categories(categories) if config.num_classes == len(categories) else None


def read_detectron2(*, weights: str | Path, config: str | Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The `ModelConfig` and the state dict in our layout for detectron2 files (what
    `from_detectron2` builds, and what fine-tuning starts from)."""
    _, model_config, state = _read(weights=weights, config=config)
    return model_config, state


def _read(*, weights: str | Path, config: str | Path) -> tuple[dict, ModelConfig, dict[str, Tensor]]:
    cfg = resolved_config(read_config_file(config))
    where = f"detectron2 config {config}"
    check_supported(cfg, where=where)
    state = read_detectron2_weights(weights)
    model_config = model_config_from(cfg, state, where=where)
    return cfg, model_config, convert_state_dict(state, model_config, weights=weights)


# --------------------------------------------------------------------------- weights files
class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays in builtin containers and nothing else: any other class or function
    the file names is refused before it is looked up, so no code from the file can run."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: only numpy arrays and builtin containers")
        return super().find_class(module, name)


def read_pickle_weights(path: str | Path) -> Any:
    """A model-zoo .pkl through `_ArraysOnlyUnpickler` (latin1: Detectron's pickles are Python 2's)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"detectron2 weights {path} do not exist")
    with path.open("rb") as file:
        try:
            return _ArraysOnlyUnpickler(file, encoding="latin1").load()
        except pickle.UnpicklingError as error:
            raise ValueError(f"detectron2 weights {path}: {error}") from None
        except Exception as error:  # truncated or not a pickle
            raise ValueError(f"detectron2 weights {path} cannot be read ({type(error).__name__}: {error})") from None


def read_detectron2_weights(path: str | Path) -> dict[str, Tensor]:
    """detectron2's parameter names -> tensors, from a .pkl (numpy) or a .pth (torch)."""
    is_pickle = Path(path).suffix == ".pkl"
    loaded = read_pickle_weights(path) if is_pickle else read_weights_file(path, what="detectron2 weights")
    if not isinstance(loaded, dict) or not isinstance(loaded.get("model", None), dict):
        found = sorted(loaded)[:5] if isinstance(loaded, dict) else type(loaded).__name__
        hint = " (Detectron1 / Caffe2 'blobs' are not supported)" if isinstance(loaded, dict) and "blobs" in loaded else ""
        raise ValueError(f"detectron2 weights {path}: expected a dict with a 'model' dict, found {found}{hint}")
    state = {}
    for name, value in loaded["model"].items():
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in "fiub":
                raise ValueError(f"detectron2 weights {path}: {name} has dtype {value.dtype}, expected numbers")
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, Tensor):
            raise ValueError(f"detectron2 weights {path}: {name} is a {type(value).__name__}, expected an array")
        state[name] = value
    if "backbone.bottom_up.stem.conv1.weight" not in state:
        raise ValueError(f"detectron2 weights {path}: no backbone.bottom_up.stem.conv1.weight; not a detectron2 "
                         f"ResNet model (its names start with {sorted(state)[:3]})")
    return state


# --------------------------------------------------------------------------- settings
def model_config_from(cfg: dict, state: dict[str, Tensor], *, where: str) -> ModelConfig:
    """Our `ModelConfig` for detectron2's `cfg` (checked) and weights (the widths)."""
    config = ModelConfig()
    config.num_classes = _num_classes(cfg, state, where=where)
    _backbone_settings(config, cfg, state, where=where)
    _transform_settings(config, cfg)
    _rpn_settings(config, cfg, where=where)
    _box_head_settings(config, cfg, state)
    _mask_head_settings(config, cfg, state, where=where)
    _keypoint_head_settings(config, cfg, state, where=where)
    config.roi_level_assignment = "detectron2"
    return config


def _num_classes(cfg: dict, state: dict[str, Tensor], *, where: str) -> int:
    num_classes = _weight(state, "roi_heads.box_predictor.cls_score.weight").shape[0] - 1  # minus background
    configured = setting(cfg, "MODEL.ROI_HEADS.NUM_CLASSES")
    if configured != num_classes:
        raise ValueError(f"{where}: MODEL.ROI_HEADS.NUM_CLASSES = {configured} but the weights' "
                         f"roi_heads.box_predictor.cls_score has {num_classes} classes (+ background)")
    return num_classes


def _weight(state: dict[str, Tensor], name: str) -> Tensor:
    if name not in state:
        raise ValueError(f"detectron2 weights have no {name}")
    return state[name]


def _backbone_settings(config: ModelConfig, cfg: dict, state: dict[str, Tensor], *, where: str) -> None:
    blocks = tuple(len({k.split(".")[3] for k in state if k.startswith(f"backbone.bottom_up.res{s}.")})
                   for s in (2, 3, 4, 5))
    depth = setting(cfg, "MODEL.RESNETS.DEPTH")
    if BOTTLENECK_DEPTHS.get(blocks) != depth:
        raise ValueError(f"{where}: MODEL.RESNETS.DEPTH = {depth!r} is not supported with these weights "
                         f"(blocks per stage {blocks}; supported: bottleneck ResNets {sorted(BOTTLENECK_DEPTHS.values())})")
    width = _weight(state, "backbone.bottom_up.res2.0.conv1.weight").shape[0]
    groups = width // _weight(state, "backbone.bottom_up.res2.0.conv2.weight").shape[1]
    if groups != setting(cfg, "MODEL.RESNETS.NUM_GROUPS"):
        raise ValueError(f"{where}: MODEL.RESNETS.NUM_GROUPS = {setting(cfg, 'MODEL.RESNETS.NUM_GROUPS')} but the "
                         f"weights' res2 3x3 convs have {groups} groups")
    backbone = config.backbone
    backbone.depth, backbone.norm, backbone.groups, backbone.width_per_group = depth, "frozen_bn_detectron2", groups, width // groups
    backbone.stem_channels = _weight(state, "backbone.bottom_up.stem.conv1.weight").shape[0]
    backbone.res2_channels = _weight(state, "backbone.bottom_up.res2.0.conv3.weight").shape[0]
    backbone.stride_in_1x1 = bool(setting(cfg, "MODEL.RESNETS.STRIDE_IN_1X1"))
    backbone.fpn_channels = _weight(state, "backbone.fpn_lateral2.weight").shape[0]
    backbone.trainable_stages = min(max(5 - int(setting(cfg, "MODEL.BACKBONE.FREEZE_AT")), 0), 5)


def _transform_settings(config: ModelConfig, cfg: dict) -> None:
    transform = config.transform
    train_sizes = [int(s) for s in _as_list(setting(cfg, "INPUT.MIN_SIZE_TRAIN"))]
    if setting(cfg, "INPUT.MIN_SIZE_TRAIN_SAMPLING") == "range":  # one integer drawn from [low, high]
        train_sizes = list(range(train_sizes[0], train_sizes[-1] + 1))
    transform.min_size = train_sizes
    transform.min_size_test = int(setting(cfg, "INPUT.MIN_SIZE_TEST"))
    # One max_size serves training and test here; the test one is what reproduces detectron2's outputs.
    transform.max_size = int(setting(cfg, "INPUT.MAX_SIZE_TEST"))
    transform.image_mean = [float(v) for v in setting(cfg, "MODEL.PIXEL_MEAN")]
    transform.image_std = [float(v) for v in setting(cfg, "MODEL.PIXEL_STD")]
    transform.channel_order = setting(cfg, "INPUT.FORMAT")
    transform.pixel_scale = 255.0
    transform.size_rounding = "round"
    transform.size_divisible = 32  # the FPN backbone's size_divisibility


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _rpn_settings(config: ModelConfig, cfg: dict, *, where: str) -> None:
    rpn = config.rpn
    sizes, rpn.aspect_ratios = anchor_settings(cfg, where=where)
    rpn.anchor_sizes = [int(s) if float(s).is_integer() else s for s in sizes]
    rpn.anchor_convention, rpn.anchor_offset = "detectron2", float(setting(cfg, "MODEL.ANCHOR_GENERATOR.OFFSET"))
    rpn.pre_nms_top_n_train = int(setting(cfg, "MODEL.RPN.PRE_NMS_TOPK_TRAIN"))
    rpn.pre_nms_top_n_test = int(setting(cfg, "MODEL.RPN.PRE_NMS_TOPK_TEST"))
    rpn.post_nms_top_n_train = int(setting(cfg, "MODEL.RPN.POST_NMS_TOPK_TRAIN"))
    rpn.post_nms_top_n_test = int(setting(cfg, "MODEL.RPN.POST_NMS_TOPK_TEST"))
    rpn.nms_thresh, rpn.score_thresh = float(setting(cfg, "MODEL.RPN.NMS_THRESH")), 0.0
    rpn.bg_iou_thresh, rpn.fg_iou_thresh = (float(t) for t in setting(cfg, "MODEL.RPN.IOU_THRESHOLDS"))
    rpn.batch_size_per_image = int(setting(cfg, "MODEL.RPN.BATCH_SIZE_PER_IMAGE"))
    rpn.positive_fraction = float(setting(cfg, "MODEL.RPN.POSITIVE_FRACTION"))
    rpn.min_proposal_size = float(setting(cfg, "MODEL.PROPOSAL_GENERATOR.MIN_SIZE"))
    rpn.proposal_selection = "detectron2"


def _box_head_settings(config: ModelConfig, cfg: dict, state: dict[str, Tensor]) -> None:
    box = config.box_head
    thresholds = [float(t) for t in setting(cfg, "MODEL.ROI_HEADS.IOU_THRESHOLDS")]  # [fg] or [bg, fg]
    box.bg_iou_thresh, box.fg_iou_thresh = thresholds[0], thresholds[-1]
    box.batch_size_per_image = int(setting(cfg, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE"))
    box.positive_fraction = float(setting(cfg, "MODEL.ROI_HEADS.POSITIVE_FRACTION"))
    box.pooler_resolution = int(setting(cfg, "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION"))
    box.sampling_ratio = int(setting(cfg, "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO"))
    box.aligned = setting(cfg, "MODEL.ROI_BOX_HEAD.POOLER_TYPE") == "ROIAlignV2"
    box.num_convs = _count(state, r"roi_heads\.box_head\.conv\d+\.weight")
    if box.num_convs:
        box.conv_dim = _weight(state, "roi_heads.box_head.conv1.weight").shape[0]
    box.num_fcs = _count(state, r"roi_heads\.box_head\.fc\d+\.weight")
    box.fc_dim = _weight(state, "roi_heads.box_head.fc1.weight").shape[0]
    box.bbox_reg_weights = [float(w) for w in setting(cfg, "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS")]
    box.score_thresh = float(setting(cfg, "MODEL.ROI_HEADS.SCORE_THRESH_TEST"))
    box.nms_thresh = float(setting(cfg, "MODEL.ROI_HEADS.NMS_THRESH_TEST"))
    box.detections_per_img = int(setting(cfg, "TEST.DETECTIONS_PER_IMAGE"))
    box.postprocess = "detectron2"


def _count(state: dict[str, Tensor], pattern: str) -> int:
    return sum(1 for key in state if re.fullmatch(pattern, key))


def _mask_head_settings(config: ModelConfig, cfg: dict, state: dict[str, Tensor], *, where: str) -> None:
    mask = config.mask_head
    mask.enabled = _head_enabled(cfg, state, "MODEL.MASK_ON", "roi_heads.mask_head.predictor.weight", where=where)
    if not mask.enabled:
        return
    mask.architecture, mask.norm = "fcn", "none"
    mask.num_convs = _count(state, r"roi_heads\.mask_head\.mask_fcn\d+\.weight")
    mask.conv_dim = _weight(state, "roi_heads.mask_head.deconv.weight").shape[1]  # ConvTranspose: [in, out, k, k]
    mask.pooler_resolution = int(setting(cfg, "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION"))
    mask.sampling_ratio = int(setting(cfg, "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO"))
    mask.aligned = True
    mask.class_agnostic = _weight(state, "roi_heads.mask_head.predictor.weight").shape[0] == 1
    if mask.class_agnostic != bool(setting(cfg, "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK")) and config.num_classes > 1:
        raise ValueError(f"{where}: MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK = "
                         f"{setting(cfg, 'MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK')} but the weights' mask predictor "
                         f"has {_weight(state, 'roi_heads.mask_head.predictor.weight').shape[0]} channels")


def _head_enabled(cfg: dict, state: dict[str, Tensor], key: str, weight: str, *, where: str) -> bool:
    enabled = bool(setting(cfg, key))
    if enabled != (weight in state):
        raise ValueError(f"{where}: {key} = {enabled} but the weights {'lack' if enabled else 'have'} {weight}")
    return enabled


def _keypoint_head_settings(config: ModelConfig, cfg: dict, state: dict[str, Tensor], *, where: str) -> None:
    keypoint = config.keypoint_head
    deconv = "roi_heads.keypoint_head.score_lowres.weight"
    keypoint.enabled = _head_enabled(cfg, state, "MODEL.KEYPOINT_ON", deconv, where=where)
    if not keypoint.enabled:
        return
    keypoint.num_keypoints = _weight(state, deconv).shape[1]  # ConvTranspose: [in, out, k, k]
    widths = {state[k].shape[0] for k in state if re.fullmatch(r"roi_heads\.keypoint_head\.conv_fcn\d+\.weight", k)}
    if len(widths) > 1:
        raise ValueError(f"{where}: MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS = "
                         f"{setting(cfg, 'MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS')!r} is not supported (one width)")
    keypoint.num_convs = _count(state, r"roi_heads\.keypoint_head\.conv_fcn\d+\.weight")
    keypoint.conv_dim = widths.pop() if widths else _weight(state, deconv).shape[0]
    keypoint.pooler_resolution = int(setting(cfg, "MODEL.ROI_KEYPOINT_HEAD.POOLER_RESOLUTION"))
    keypoint.sampling_ratio = int(setting(cfg, "MODEL.ROI_KEYPOINT_HEAD.POOLER_SAMPLING_RATIO"))
    keypoint.aligned = setting(cfg, "MODEL.ROI_KEYPOINT_HEAD.POOLER_TYPE") == "ROIAlignV2"
    keypoint.loss_weight = float(setting(cfg, "MODEL.ROI_KEYPOINT_HEAD.LOSS_WEIGHT"))
    keypoint.decoding = "detectron2"


# --------------------------------------------------------------------------- weights layout
def convert_state_dict(state: dict[str, Tensor], config: ModelConfig, *, weights: str | Path) -> dict[str, Tensor]:
    """Rename detectron2's tensors to ours and move the class-dependent ones to our layout;
    names nothing maps are an error (they would be a part this loader does not build)."""
    converted, unknown = {}, []
    for name, value in state.items():
        if IGNORED_KEYS.match(name):
            continue
        ours = our_name(name)
        if ours is None:
            unknown.append(name)
        converted[ours] = value.to(torch.float32) if value.is_floating_point() else value
    if unknown:
        raise ValueError(f"detectron2 weights {weights}: {len(unknown)} tensors of parts this loader does not "
                         f"implement, e.g. {unknown[:4]}")
    _background_first(converted, config.num_classes)
    _fill_running_stats(converted)
    return converted


def our_name(name: str) -> str | None:
    """Our name for detectron2's parameter `name` (DETECTRON2_TO_OURS); None for a part we do not build."""
    for pattern, rename in DETECTRON2_TO_OURS:
        match = re.fullmatch(pattern, name)
        if match:
            return rename(match)
    return None


def _background_first(state: dict[str, Tensor], num_classes: int) -> None:
    """detectron2 puts background last in the class scores and has no background box deltas or
    mask channel; ours has background first everywhere (channel = label)."""
    for part in ("weight", "bias"):
        scores = state[f"roi_heads.box_predictor.cls_score.{part}"]  # [K + 1, ...], background last
        state[f"roi_heads.box_predictor.cls_score.{part}"] = torch.cat([scores[num_classes:], scores[:num_classes]])
        deltas = state[f"roi_heads.box_predictor.bbox_pred.{part}"]  # [K * 4, ...] or [4, ...] class-agnostic
        if deltas.shape[0] == 4:  # the same deltas for every class, background included
            state[f"roi_heads.box_predictor.bbox_pred.{part}"] = deltas.repeat(num_classes + 1, *[1] * (deltas.dim() - 1))
        else:  # background gets zero deltas: its boxes are never used
            state[f"roi_heads.box_predictor.bbox_pred.{part}"] = torch.cat([torch.zeros_like(deltas[:4]), deltas])
        predictor = state.get(f"roi_heads.mask_head.predictor.{part}")
        if predictor is not None and predictor.shape[0] == num_classes and num_classes > 1:
            state[f"roi_heads.mask_head.predictor.{part}"] = torch.cat([torch.zeros_like(predictor[:1]), predictor])


def _fill_running_stats(state: dict[str, Tensor]) -> None:
    """Old detectron2 files may lack FrozenBN statistics; detectron2 then uses mean 0, variance 1."""
    for name in [n for n in state if re.search(r"\.(bn\d|downsample\.1)\.weight$", n)]:
        prefix = name[: -len("weight")]
        state.setdefault(prefix + "running_mean", torch.zeros_like(state[name]))
        state.setdefault(prefix + "running_var", torch.ones_like(state[name]))
