"""Starting a run from other weights (`train.init_weights`): ours, torchvision's, or detectron2's
(with `train.init_weights_config`, its YAML).

Everything must fit the configured model except the class-dependent predictor tensors, which a
new data set with another number of classes (or keypoints) cannot reuse: those keep the model's
fresh initialisation and are reported. Any other difference (another depth or width, a typo'd
file, a different head) is an error that names the first mismatching tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from .format import is_checkpoint, load_state_dict_checked, read_weights_file

# tensor name prefix -> (what it is, the axis that counts classes or keypoints)
CLASS_DEPENDENT: dict[str, tuple[str, int]] = {
    "roi_heads.box_predictor.cls_score.": ("class scores", 0),  # [K + 1, fc_dim]
    "roi_heads.box_predictor.bbox_pred.": ("box deltas", 0),  # [(K + 1) * 4, fc_dim]
    "roi_heads.mask_head.predictor.": ("mask predictor", 0),  # [K or 1, conv_dim, 1, 1]
    "roi_heads.keypoint_head.deconv.weight": ("keypoint predictor", 1),  # ConvTranspose [conv_dim, keypoints, 4, 4]
    "roi_heads.keypoint_head.deconv.bias": ("keypoint predictor", 0),  # [keypoints]
}


class WeightsMismatchError(ValueError):
    """The weights do not fit the configured model beyond the class-dependent tensors."""


@dataclass(frozen=True)
class SkippedTensor:
    name: str
    source_shape: tuple[int, ...]
    model_shape: tuple[int, ...]
    reason: str

    def __str__(self) -> str:
        return f"{self.name} {list(self.source_shape)} -> {list(self.model_shape)} ({self.reason})"


def read_source_state(path: str | Path, *, detectron2_config: str | Path | None = None
                      ) -> tuple[dict[str, Tensor], str]:
    """(state dict in our names, what the file is) for one of our checkpoints, torchvision's
    weights, or detectron2's (which need their YAML config)."""
    if detectron2_config is not None:
        from .detectron2 import read_detectron2

        return read_detectron2(weights=path, config=detectron2_config)[1], "detectron2 weights"
    if Path(path).suffix == ".pkl":
        raise ValueError(f"{path} looks like detectron2 weights: set train.init_weights_config to its config YAML")
    obj = read_weights_file(path, what="train.init_weights:")
    if is_checkpoint(obj):
        return obj["model"], "a maskrcnn checkpoint"
    from .torchvision import convert_torchvision_state_dict, torchvision_state_dict

    return convert_torchvision_state_dict(torchvision_state_dict(obj)), "torchvision weights"


def class_dependent_reason(name: str, source_shape: tuple[int, ...], model_shape: tuple[int, ...]) -> str | None:
    """Why `name` may be left out, or None when it must fit: it is a class-dependent predictor
    tensor whose shapes differ only along the class (keypoint) axis."""
    for prefix, (what, axis) in CLASS_DEPENDENT.items():
        if not name.startswith(prefix) or len(source_shape) != len(model_shape) or len(model_shape) <= axis:
            continue
        others_agree = all(a == b for i, (a, b) in enumerate(zip(source_shape, model_shape)) if i != axis)
        if others_agree:
            count = "keypoint" if what == "keypoint predictor" else "class"
            return f"{what}: another {count} count"
    return None


def load_fine_tuning_state(model: nn.Module, state: dict[str, Tensor], *, what: str) -> list[SkippedTensor]:
    """Load `state` into `model` except the class-dependent tensors of another shape, which keep
    the model's initialisation; returns those. WeightsMismatchError for anything else."""
    own = model.state_dict()
    # BatchNorm's step counters are not weights: a model with frozen BatchNorm in their place
    # (model.backbone.norm=frozen_bn, to fine-tune on small batches) has none
    state = {k: v for k, v in state.items() if k in own or not k.endswith(".num_batches_tracked")}
    skipped = []
    for name, tensor in state.items():
        if name in own and tensor.shape != own[name].shape:
            reason = class_dependent_reason(name, tuple(tensor.shape), tuple(own[name].shape))
            if reason is not None:
                skipped.append(SkippedTensor(name, tuple(tensor.shape), tuple(own[name].shape), reason))
    fitting = {**state, **{entry.name: own[entry.name] for entry in skipped}}
    try:
        load_state_dict_checked(model, fitting, what=what)
    except ValueError as error:
        raise WeightsMismatchError(str(error)) from None
    return skipped


def load_initial_weights(model: nn.Module, path: str | Path, *, detectron2_config: str | Path | None = None
                         ) -> tuple[str, list[SkippedTensor]]:
    """`train.init_weights`: (what the file was, the re-initialised tensors)."""
    try:
        state, kind = read_source_state(path, detectron2_config=detectron2_config)
        skipped = load_fine_tuning_state(model, state, what=kind)
    except ValueError as error:  # unreadable, not a detection model's weights, or not fitting
        raise WeightsMismatchError(f"train.init_weights: {path} does not fit the configured model: {error}") from None
    return kind, skipped
