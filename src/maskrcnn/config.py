"""Configuration: dataclasses with meaningful defaults, loaded from YAML, overridden by `key.sub=value`.

One setting lives in one place. Modules never take a whole config: `build_model(config.model)`
and friends turn these dataclasses into keyword arguments.

The model defaults reproduce torchvision's `maskrcnn_resnet50_fpn` (v1) behaviour.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

RECIPES = Path(__file__).parent / "configs"  # shipped recipes: package data, found without a checkout


# --------------------------------------------------------------------------- model
@dataclass
class BackboneConfig:
    depth: int = 50  # ResNet-18/34/50/101
    # "frozen_bn" (pretrained weights; "frozen_bn_detectron2": detectron2's arithmetic) | "bn" | "gn" (from scratch)
    norm: str = "frozen_bn"
    trainable_stages: int = 3  # 0..5: how many of (layer4, layer3, layer2, layer1, stem) train
    fpn_channels: int = 256
    fpn_norm: str = "none"  # "none" | "bn" | "gn" after each FPN conv (torchvision's *_fpn_v2: "bn")
    weights: str | None = None  # optional local path of ImageNet ResNet weights (torchvision layout)
    # ResNet-50 and deeper; the defaults are torchvision's ResNets, the others describe detectron2's models
    stem_channels: int = 64  # the stem conv's output channels
    res2_channels: int = 256  # stage 2's output channels (doubled by each later stage)
    groups: int = 1  # ResNeXt cardinality of the 3x3 convs
    width_per_group: int = 64  # bottleneck width per group in stage 2 (ResNeXt-32x8d: 8)
    stride_in_1x1: bool = False  # stride in the first 1x1 conv of a block (MSRA/Caffe2 ResNets), not in the 3x3


@dataclass
class TransformConfig:
    min_size: list[int] = field(default_factory=lambda: [800])  # train: one chosen per image
    min_size_test: int = 800
    max_size: int = 1333
    size_divisible: int = 32
    image_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    image_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # What the weights were trained on; the model's input is always RGB in 0-1.
    channel_order: str = "RGB"  # "RGB" | "BGR" (image_mean / image_std are in this order)
    pixel_scale: float = 1.0  # inputs are multiplied by this before the mean / std (255 for detectron2's)
    size_rounding: str = "floor"  # resized sides: "floor" (torchvision) | "round" (detectron2)


@dataclass
class RPNConfig:
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # one per level P2..P6
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    num_convs: int = 1  # shared conv3x3 + ReLU layers of the head (torchvision's *_fpn_v2: 2)
    pre_nms_top_n_train: int = 2000  # per level
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_train: int = 2000  # per image
    post_nms_top_n_test: int = 1000
    nms_thresh: float = 0.7
    score_thresh: float = 0.0
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    crowd_ioa_thresh: float = 0.7  # background anchors this much inside a crowd box are ignored
    # "torchvision": cell anchors rounded to integers, level stride = padded size // grid size;
    # "detectron2": exact cell anchors, nominal level strides (4 ... 64)
    anchor_convention: str = "torchvision"
    anchor_offset: float = 0.0  # first anchor centre, in strides from the image corner
    min_proposal_size: float = 1e-3  # proposals with a side below this (pixels) are dropped
    # "torchvision": NMS ranks by probability, sides >= min_proposal_size; "detectron2": by logit, sides >
    proposal_selection: str = "torchvision"


@dataclass
class BoxHeadConfig:
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    batch_size_per_image: int = 512  # sampled RoIs per image
    positive_fraction: float = 0.25
    pooler_resolution: int = 7
    sampling_ratio: int = 2
    aligned: bool = False  # torchvision's MultiScaleRoIAlign uses aligned=False
    num_convs: int = 0  # 0 = Mask R-CNN's "2fc" head; >0 adds conv3x3 layers before the FC layers
    conv_dim: int = 256  # width of those conv layers
    norm: str = "none"  # "none" | "gn" | "bn" after each of those conv layers
    num_fcs: int = 2  # fully connected layers after them: 2 ("2fc"), or 1 (torchvision's *_fpn_v2: 4 convs + 1 fc)
    fc_dim: int = 1024
    bbox_reg_weights: list[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    # labels never predicted: slots of the classifier that stand for no category (the ten N/A
    # slots of torchvision's 91-slot COCO heads; checkpoint/label_space.py)
    suppressed_labels: list[int] = field(default_factory=list)
    crowd_ioa_thresh: float = 0.7  # background proposals this much inside a crowd box are ignored
    # degenerate boxes: "torchvision" drops sides < 0.01 px before NMS; "detectron2" drops empty ones after it
    postprocess: str = "torchvision"


@dataclass
class MaskHeadConfig:
    enabled: bool = True
    architecture: str = "fcn"  # "fcn" | "deep_fcn" | "resnet" | "hourglass"
    num_convs: int = 4  # conv layers (fcn/deep_fcn), residual blocks (resnet), levels (hourglass)
    conv_dim: int = 256
    norm: str = "none"  # "none" | "gn" | "bn" after each conv layer of the head
    block: str = "bottleneck"  # residual block of the resnet / hourglass heads: "bottleneck" | "basic"
    pooler_resolution: int = 14  # RoI crop; the mask is 2x this (28 x 28)
    sampling_ratio: int = 2
    # RoIAlign's half-pixel shift for the mask pooler, the mask targets and pasting: True is exact in
    # continuous coordinates (a 1-pixel object survives); False reproduces torchvision.
    aligned: bool = False
    class_agnostic: bool = False
    # Birodkar et al. 2021: which boxes train the mask head, and which classes have masks
    train_on: str = "proposals"  # "proposals" (Mask R-CNN) | "gt_boxes"
    gt_box_jitter: float = 0.0  # relative jitter of ground-truth boxes when train_on == "gt_boxes"
    # train_on == "gt_boxes": each box trains the head this many times, each copy jittered on its own
    # (positive proposals give several views of an object per step; one GT box gives one)
    gt_box_copies: int = 1
    mask_classes: list[int] | None = None  # labels whose masks train the head; None = all
    # Cheng et al. 2021: point supervision
    point_supervision: bool = False
    points_per_instance: int | None = None  # random subset each iteration; None = all points
    # "valid_points": the point loss averages over the labelled points inside each RoI;
    # "all_points": over all labelled points of the RoIs' objects (PointSup's code), see point_supervision.py
    point_loss_average: str = "valid_points"
    # With point_supervision: the weight of a second term, the BCE towards 0 of the RoI's mask cells
    # outside its instance's box (points are drawn inside the box, so nothing else labels them);
    # 0 = off, the paper's loss. See point_supervision.outside_box_loss.
    outside_box_weight: float = 0.0
    loss_weight: float = 1.0  # multiplies loss_mask (the point loss too, with point_supervision)
    # The share of the mask loss's gradient that reaches the shared backbone, FPN and RPN (the mask
    # head itself gets all of it): 0 trains the head on detached features. Unlike loss_weight it
    # leaves the head's own learning as it is (the point loss's gradient on the backbone costs box AP).
    feature_gradient: float = 1.0


@dataclass
class KeypointHeadConfig:
    enabled: bool = False
    num_keypoints: int = 17
    num_convs: int = 8
    conv_dim: int = 512
    pooler_resolution: int = 14  # heatmaps are 4x this (56 x 56)
    sampling_ratio: int = 2
    aligned: bool = False
    loss_weight: float = 1.0  # multiplies loss_keypoint (detectron2's ROI_KEYPOINT_HEAD.LOSS_WEIGHT)
    decoding: str = "torchvision"  # keypoint scores: the heatmap logit (torchvision) | detectron2's softmax score


@dataclass
class ModelConfig:
    num_classes: int = 90  # foreground classes; label 0 is background
    # Box side (input pixels) that the RoI poolers take from P4; smaller boxes go to finer levels
    # (FPN paper, eq. 1). 224 is the paper's and torchvision's; scale it with the input size.
    roi_canonical_box_size: float = 224.0
    roi_level_assignment: str = "torchvision"  # "torchvision" | "detectron2": its rounding guard at level boundaries
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    box_head: BoxHeadConfig = field(default_factory=BoxHeadConfig)
    mask_head: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    keypoint_head: KeypointHeadConfig = field(default_factory=KeypointHeadConfig)


# --------------------------------------------------------------------------- data
@dataclass
class DatasetConfig:
    annotations: str = ""  # COCO JSON
    images: str = ""  # image folder


@dataclass
class DataConfig:
    name: str = "shapes"  # "shapes" (generated on first use) | "coco" (the paths below)
    root: str = "data/shapes"  # where `shapes` is generated
    train: DatasetConfig = field(default_factory=DatasetConfig)
    val: DatasetConfig = field(default_factory=DatasetConfig)
    keep_empty_images: bool = True  # images without annotations train as negatives
    horizontal_flip: float = 0.5
    color_jitter: float = 0.0  # strength of photometric jitter; 0 disables it
    keypoint_flip_map: list[list[int]] | None = None  # [[left, right], ...]; None = from the dataset
    num_workers: int = 2
    aspect_ratio_grouping: bool = True
    check_images: str = "header"  # "header" (open each image header: size, EXIF) | "full" (decode each) | "exists" | "none"
    bad_images: str = "skip"  # a training image that cannot be decoded: "skip" it (counted warning) | "fail"
    # shapes generator
    shapes_train_images: int = 800
    shapes_val_images: int = 200
    shapes_image_size: int = 192
    shapes_seed: int = 0


# --------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1" ...
    seed: int = 0
    iterations: int = 90_000
    batch_size: int = 2  # images per process
    optimizer: str = "sgd"  # "sgd" | "adamw"
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_norm_bias: float | None = None  # decay of norm layers and biases; None = weight_decay
    schedule: str = "step"  # "step" | "cosine" | "constant"
    steps: list[int] = field(default_factory=lambda: [60_000, 80_000])
    gamma: float = 0.1
    warmup_iterations: int = 1000
    warmup_factor: float = 0.001
    clip_grad_norm: float | None = None
    # exponential moving average of the weights, used for evaluation and saved as the model
    # (engine/ema.py): ema = decay * ema + (1 - decay) * weights after each iteration; 0 = off
    ema_decay: float = 0.0
    ema_start: int = 0  # the average starts after this many iterations (their weights are its first value)
    amp: bool = False  # mixed precision: float16 on CUDA, bfloat16 on CPUs with bf16 units, AMX or AVX-512 bf16 (float32 elsewhere, with a warning)
    checkpoint_every: int = 5000
    keep_checkpoints: int = 0  # also keep the last N periodic checkpoints as model_<iteration>.pth; 0 = only last.pth
    pictures: int = 8  # validation images drawn at the end (contact_sheet.png, predictions/); 0 = none
    eval_every: int = 0  # 0 = only at the end
    log_every: int = 20
    best_metric: str = "auto"  # flat metric name kept for best.pth, e.g. "segm/AP"; auto = segm, bbox, keypoints AP
    tensorboard: bool = True  # also write TensorBoard event files (metrics.jsonl is always written)
    cpu_threads: int | None = None  # torch.set_num_threads for this run; None = PyTorch's default (one per core)
    # weights to start from: our checkpoint or torchvision's .pth; class-dependent predictor
    # tensors of another class count are re-initialised, and the run prints which
    init_weights: str | None = None
    # detectron2's YAML (config.yaml of the run, or a zoo file) when init_weights is detectron2's
    # .pkl / .pth; the model section must follow detectron2's conventions: start from the recipe
    # that `maskrcnn convert --config` writes
    init_weights_config: str | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --------------------------------------------------------------------------- loading
class ConfigError(ValueError):
    pass


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check and convert a YAML value to the field's declared type; errors name the key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, prefix=key + ".")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, args[0], f"{key}[{i}]") if args else v for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if as_float != int(as_float):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if annotation is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + u for u in unknown)}; "
            f"valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _yaml_place(error: yaml.YAMLError) -> str:
    """" at line L column C: what" of a YAML error (lines counted from 1), on one line."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f" at line {mark.line + 1} column {mark.column + 1}: {problem}" if mark else f": {problem}"


def _set_override(data: dict, dotted: str, raw: str) -> None:
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {dotted}={raw}: invalid YAML value{_yaml_place(error)}") from None
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}={raw}: {part} is not a section")
    node[parts[-1]] = value


def recipe_names() -> list[str]:
    """The recipes shipped with the package (src/maskrcnn/configs/, installed as package data)."""
    return sorted(path.stem for path in RECIPES.glob("*.yaml"))


def recipe_path(name_or_path: str | Path) -> Path:
    """A YAML file as given, or a shipped recipe by name (`shapes_demo` or `shapes_demo.yaml`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    recipe = RECIPES / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if len(path.parts) == 1 and recipe.is_file():
        return recipe
    raise ConfigError(f"config file {name_or_path} does not exist, and it is not one of the shipped recipes "
                      f"({', '.join(recipe_names())})")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file (a path, or a shipped recipe's name) <- `key.sub=value` overrides
    (values parsed as YAML)."""
    data: dict = {}
    if path is not None:
        path = recipe_path(path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: invalid YAML{_yaml_place(error)}") from None
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path}: cannot be read ({error})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        data = loaded
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        _set_override(data, key.strip(), raw)
    return validate_config(from_dict(Config, data))


# --------------------------------------------------------------------------- checking values
_FLOAT32_MAX = 3.4028234663852886e38  # weights and optimizer states are float32: a larger value is inf there

# key -> the values it may take
_CHOICES: dict[str, tuple] = {
    "model.backbone.depth": (18, 34, 50, 101, 152),
    "model.backbone.norm": ("frozen_bn", "frozen_bn_detectron2", "bn", "gn"),  # model/layers.py BACKBONE_NORMS
    "model.backbone.fpn_norm": ("none", "bn", "gn"),
    "model.transform.channel_order": ("RGB", "BGR"),
    "model.transform.size_rounding": ("floor", "round"),
    "model.rpn.anchor_convention": ("torchvision", "detectron2"),
    "model.rpn.proposal_selection": ("torchvision", "detectron2"),
    "model.box_head.postprocess": ("torchvision", "detectron2"),
    "model.keypoint_head.decoding": ("torchvision", "detectron2"),
    "model.roi_level_assignment": ("torchvision", "detectron2"),
    "model.box_head.norm": ("none", "gn", "bn"),
    "model.mask_head.norm": ("none", "gn", "bn"),
    "model.mask_head.architecture": ("fcn", "deep_fcn", "resnet", "hourglass"),
    "model.mask_head.block": ("bottleneck", "basic"),
    "model.mask_head.train_on": ("proposals", "gt_boxes"),
    "model.mask_head.point_loss_average": ("valid_points", "all_points"),
    "data.name": ("shapes", "coco"),
    "data.check_images": ("header", "exists", "none", "full"),
    "data.bad_images": ("skip", "fail"),
    "train.optimizer": ("sgd", "adamw"),
    "train.schedule": ("step", "cosine", "constant"),
}
# key -> (lowest, highest, whether the lowest itself is allowed); None = unbounded
_RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "model.num_classes": (1, None, True),
    "model.roi_canonical_box_size": (0, None, False),
    "model.backbone.trainable_stages": (0, 5, True),
    "model.backbone.fpn_channels": (1, None, True),
    "model.backbone.stem_channels": (1, None, True), "model.backbone.res2_channels": (1, None, True),
    "model.backbone.groups": (1, None, True), "model.backbone.width_per_group": (1, None, True),
    "model.transform.pixel_scale": (0, None, False),
    "model.rpn.anchor_offset": (0, 1, True),
    "model.rpn.min_proposal_size": (0, None, True),
    "model.transform.min_size": (1, None, True),
    "model.transform.min_size_test": (1, None, True),
    "model.transform.max_size": (1, None, True),
    "model.transform.size_divisible": (1, None, True),
    "model.transform.image_std": (0, None, False),
    "model.rpn.anchor_sizes": (0, None, False),
    "model.rpn.aspect_ratios": (0, None, False),
    "model.rpn.nms_thresh": (0, 1, True), "model.box_head.nms_thresh": (0, 1, True),
    "model.rpn.fg_iou_thresh": (0, 1, True), "model.rpn.bg_iou_thresh": (0, 1, True),
    "model.box_head.fg_iou_thresh": (0, 1, True), "model.box_head.bg_iou_thresh": (0, 1, True),
    "model.rpn.positive_fraction": (0, 1, False), "model.box_head.positive_fraction": (0, 1, False),
    "model.rpn.batch_size_per_image": (1, None, True), "model.box_head.batch_size_per_image": (1, None, True),
    "model.box_head.score_thresh": (0, 1, True), "model.box_head.detections_per_img": (1, None, True),
    "model.keypoint_head.num_keypoints": (1, None, True),
    "model.mask_head.loss_weight": (0, None, True), "model.keypoint_head.loss_weight": (0, None, True),
    "model.mask_head.gt_box_copies": (1, None, True), "model.mask_head.feature_gradient": (0, 1, True),
    "model.mask_head.outside_box_weight": (0, None, True),
    "data.horizontal_flip": (0, 1, True), "data.color_jitter": (0, None, True), "data.num_workers": (0, None, True),
    "train.iterations": (0, None, True), "train.batch_size": (1, None, True),
    "train.lr": (0, None, True), "train.momentum": (0, 1, True), "train.weight_decay": (0, None, True),
    "train.gamma": (0, None, False), "train.warmup_iterations": (0, None, True),
    "train.warmup_factor": (0, 1, False), "train.clip_grad_norm": (0, None, False),
    "train.ema_decay": (0, 1, True), "train.ema_start": (0, None, True),
    "train.checkpoint_every": (1, None, True), "train.eval_every": (0, None, True),
    "train.log_every": (1, None, True), "train.cpu_threads": (1, None, True),
}


def validate_config(config: Config) -> Config:
    """ConfigError naming the key for a value the run cannot use (NaN, out of range, unknown name)."""
    values = _flatten(dataclasses.asdict(config))
    for key, value in values.items():
        for item in value if isinstance(value, list) else [value]:
            _check_value(key, item)
    device = config.train.device
    if not (device in ("auto", "cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"train.device={device}: expected auto, cpu, cuda, cuda:N or mps")
    if config.train.ema_decay == 1:
        raise ConfigError("train.ema_decay=1: expected a value < 1 (the average would never move); 0 turns it off")
    return config


def _check_value(key: str, value: Any) -> None:
    if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= _FLOAT32_MAX):
        raise ConfigError(f"{key}={value}: expected a finite number (within float32's range)")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(f"{key}={value}: expected one of {', '.join(map(str, _CHOICES[key]))}")
    if key in _RANGES and value is not None:
        low, high, low_allowed = _RANGES[key]
        below = low is not None and (value < low or (value == low and not low_allowed))
        if below or (high is not None and value > high):
            lowest = "" if low is None else f"{'>=' if low_allowed else '>'} {low}"
            highest = "" if high is None else f"<= {high}"
            raise ConfigError(f"{key}={value}: expected a value {' and '.join(filter(None, (lowest, highest)))}")


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, prefix + key + "."))
        else:
            flat[prefix + key] = value
    return flat


def config_differences(saved: dict, wanted: dict, *, defaults: dict) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, wanted value) for each key whose values differ between two
    configs as `config_to_dict` gives them (or one section of them). A key that `saved` lacks was
    added to the code after `saved` was written: it counts as its value in `defaults` (the same
    section of `config_to_dict(Config())`), which keeps the earlier behaviour."""
    saved_flat, wanted_flat, default_flat = _flatten(saved), _flatten(wanted), _flatten(defaults)
    saved_flat = {key: saved_flat.get(key, default_flat.get(key)) for key in set(saved_flat) | set(wanted_flat)}
    return [(key, saved_flat[key], wanted_flat.get(key)) for key in sorted(saved_flat)
            if saved_flat[key] != wanted_flat.get(key)]


def config_from_dict(data: dict) -> Config:
    return from_dict(Config, data)


def config_to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
