"""detectron2's YAML configs, read without detectron2: the `_BASE_` chain, its defaults
underneath (detectron2_defaults.py), its literal strings decoded, and the check that every
setting is one `detectron2.py` implements (a refusal names the key and its value).
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path
from typing import Any

import yaml

from .detectron2_defaults import DETECTRON2_DEFAULTS

FPN_FEATURES = ["res2", "res3", "res4", "res5"]
RPN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
ROI_FEATURES = ["p2", "p3", "p4", "p5"]
BATCH_NORMS = ("FrozenBN", "BN", "SyncBN", "nnSyncBN", "naiveSyncBN")  # all the same at inference

# What must hold for the loader to reproduce detectron2: key -> the values it implements.
SUPPORTED: dict[str, tuple[Any, ...]] = {
    "VERSION": (2,),
    "MODEL.META_ARCHITECTURE": ("GeneralizedRCNN",),
    "MODEL.LOAD_PROPOSALS": (False,),
    "MODEL.BACKBONE.NAME": ("build_resnet_fpn_backbone",),
    "MODEL.RESNETS.OUT_FEATURES": (FPN_FEATURES,),
    "MODEL.RESNETS.RES5_DILATION": (1,),
    "MODEL.RESNETS.DEFORM_ON_PER_STAGE": ([False] * 4,),
    "MODEL.RESNETS.NORM": BATCH_NORMS,
    "MODEL.FPN.IN_FEATURES": (FPN_FEATURES,),
    "MODEL.FPN.NORM": ("",),
    "MODEL.FPN.FUSE_TYPE": ("sum",),
    "MODEL.PROPOSAL_GENERATOR.NAME": ("RPN",),
    "MODEL.ANCHOR_GENERATOR.NAME": ("DefaultAnchorGenerator",),
    "MODEL.RPN.HEAD_NAME": ("StandardRPNHead",),
    "MODEL.RPN.IN_FEATURES": (RPN_FEATURES,),
    "MODEL.RPN.BBOX_REG_WEIGHTS": ([1.0, 1.0, 1.0, 1.0],),
    "MODEL.ROI_HEADS.NAME": ("StandardROIHeads",),
    "MODEL.ROI_HEADS.IN_FEATURES": (ROI_FEATURES,),
    "MODEL.ROI_BOX_HEAD.NAME": ("FastRCNNConvFCHead",),
    "MODEL.ROI_BOX_HEAD.NUM_FC": (1, 2),
    "MODEL.ROI_BOX_HEAD.NORM": ("",),
    "MODEL.ROI_BOX_HEAD.POOLER_TYPE": ("ROIAlignV2", "ROIAlign"),
    "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE": (False,),
    "MODEL.ROI_BOX_HEAD.USE_FED_LOSS": (False,),
    "INPUT.FORMAT": ("BGR", "RGB"),
    "INPUT.MIN_SIZE_TRAIN_SAMPLING": ("choice", "range"),
}
SUPPORTED_MASK = {
    "MODEL.ROI_MASK_HEAD.NAME": ("MaskRCNNConvUpsampleHead",),
    "MODEL.ROI_MASK_HEAD.NORM": ("",),
    "MODEL.ROI_MASK_HEAD.POOLER_TYPE": ("ROIAlignV2",),  # detectron2 pastes in continuous coordinates
}
SUPPORTED_KEYPOINT = {
    "MODEL.ROI_KEYPOINT_HEAD.NAME": ("KRCNNConvDeconvUpsampleHead",),
    "MODEL.ROI_KEYPOINT_HEAD.POOLER_TYPE": ("ROIAlignV2", "ROIAlign"),
}


# --------------------------------------------------------------------------- config files
def read_config_file(path: str | Path, *, _chain: tuple[Path, ...] = ()) -> dict:
    """A detectron2 YAML with its `_BASE_` files merged underneath (relative to the file that
    names them, as detectron2 resolves them). Values are as written; see `resolved_config`."""
    path = Path(path).expanduser()
    if not path.is_file():
        named_by = f" (the _BASE_ of {_chain[-1]})" if _chain else ""
        raise FileNotFoundError(f"detectron2 config {path}{named_by} does not exist")
    if path.resolve() in _chain:
        raise ValueError(f"detectron2 config {path}: its _BASE_ chain loops back to itself")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"detectron2 config {path} is not valid YAML: {error}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"detectron2 config {path}: expected a mapping at the top level")
    base = loaded.pop("_BASE_", None)
    if base is None:
        return loaded
    base = str(base)
    if "://" in base:
        raise ValueError(f"detectron2 config {path}: _BASE_ {base!r} is a URL; download it next to the file")
    base_path = Path(base).expanduser()
    base_path = base_path if base_path.is_absolute() else path.parent / base_path
    merged = read_config_file(base_path, _chain=(*_chain, path.resolve()))
    _merge_into(merged, loaded)
    return merged


def _merge_into(base: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge_into(base[key], value)
        else:
            base[key] = value


def resolved_config(cfg: dict) -> dict:
    """detectron2's defaults (config/defaults.py, for the keys this loader reads) with `cfg` on
    top. As detectron2's CfgNode does, strings are read as Python literals where the default is
    not a string: zoo files write tuples such as `MIN_SIZE_TRAIN: (640, 672, 704)`."""
    merged = copy.deepcopy(DETECTRON2_DEFAULTS)
    _merge_into(merged, copy.deepcopy(cfg))
    _decode_literals(merged, DETECTRON2_DEFAULTS)
    return merged


def _decode_literals(node: dict, defaults: dict) -> None:
    for key, default in defaults.items():
        value = node.get(key)
        if isinstance(default, dict) and isinstance(value, dict):
            _decode_literals(value, default)
        elif isinstance(value, str) and not isinstance(default, str):
            try:
                node[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass  # left as written: check_supported or the reader names it
        if isinstance(node.get(key), tuple):
            node[key] = _as_lists(node[key])


def _as_lists(value: Any) -> Any:
    return [_as_lists(v) for v in value] if isinstance(value, (list, tuple)) else value


def setting(cfg: dict, key: str) -> Any:
    """`cfg["MODEL"]["RPN"]["NMS_THRESH"]` for "MODEL.RPN.NMS_THRESH"."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"detectron2 config has no {key}")
        node = node[part]
    return node


def check_supported(cfg: dict, *, where: str) -> None:
    """Refuse any setting the loader does not implement, naming the key and its value."""
    rules = dict(SUPPORTED)
    if setting(cfg, "MODEL.MASK_ON"):
        rules.update(SUPPORTED_MASK)
    if setting(cfg, "MODEL.KEYPOINT_ON"):
        rules.update(SUPPORTED_KEYPOINT)
    for key, allowed in rules.items():
        value = _as_lists(setting(cfg, key))
        if value not in [_as_lists(a) for a in allowed]:
            raise ValueError(f"{where}: {key} = {value!r} is not supported (supported: "
                             f"{', '.join(repr(a) for a in allowed)})")
    _check_number(cfg, "INPUT.MIN_SIZE_TEST", lambda v: v > 0, "> 0 (0 disables resizing, not supported)", where)
    _check_number(cfg, "MODEL.ANCHOR_GENERATOR.OFFSET", lambda v: 0 <= v < 1, "in [0, 1)", where)
    for key in ("MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD"):
        _check_number(cfg, key, lambda v: len(v) == 3, "3 values (one per channel)", where)
    if len(setting(cfg, "MODEL.RPN.CONV_DIMS")) != 1:
        raise ValueError(f"{where}: MODEL.RPN.CONV_DIMS = {setting(cfg, 'MODEL.RPN.CONV_DIMS')!r} is not "
                         "supported (one conv: [-1] or [FPN.OUT_CHANNELS])")
    anchor_settings(cfg, where=where)


def _check_number(cfg: dict, key: str, test, expected: str, where: str) -> None:
    value = setting(cfg, key)
    try:
        ok = bool(test(value))
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{where}: {key} = {value!r} is not supported (expected {expected})")


def anchor_settings(cfg: dict, *, where: str) -> tuple[list[float], list[float]]:
    """One anchor size per RPN level and the same aspect ratios on every level (what our anchor
    generator implements), after detectron2's broadcasting of a single list to all levels."""
    levels = len(RPN_FEATURES)
    sizes, ratios = setting(cfg, "MODEL.ANCHOR_GENERATOR.SIZES"), setting(cfg, "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS")
    sizes = _broadcast(sizes, levels)
    ratios = _broadcast(ratios, levels)
    if sizes is None or any(len(s) != 1 for s in sizes):
        raise ValueError(f"{where}: MODEL.ANCHOR_GENERATOR.SIZES = {setting(cfg, 'MODEL.ANCHOR_GENERATOR.SIZES')!r} "
                         f"is not supported (one size per level for the {levels} levels, e.g. [[32], [64], ...])")
    if ratios is None or any(r != ratios[0] for r in ratios):
        raise ValueError(f"{where}: MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = "
                         f"{setting(cfg, 'MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS')!r} is not supported "
                         "(the same ratios on every level)")
    return [float(s[0]) for s in sizes], [float(r) for r in ratios[0]]


def _broadcast(values: Any, levels: int) -> list[list[float]] | None:
    """detectron2's `_broadcast_params`: a flat list, or one list, applies to every level."""
    if not isinstance(values, list) or not values:
        return None
    if not isinstance(values[0], list):
        return [values] * levels
    if len(values) == 1:
        return values * levels
    return values if len(values) == levels else None
