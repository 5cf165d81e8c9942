"""`maskrcnn convert`: torchvision's or detectron2's weights -> our checkpoint with its label table,
plus a recipe (the model section of a config) to fine-tune or evaluate it with.

The label table (label -> COCO category id and name, label_space.py) comes from `categories`
when given (the annotation file the weights were trained on), else from the loader, which knows
COCO models (torchvision's 91-slot heads and its person keypoints: torchvision.py; detectron2
models trained on COCO: detectron2.py). Otherwise the checkpoint has none and labels stay numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from ..model.mask_rcnn import MaskRCNN
from .format import save_checkpoint
from .label_space import check_labels, labels_from_categories


def convert(source: str | Path, destination: str | Path, *, detectron2_config: str | Path | None = None,
            categories: Sequence[Mapping] | None = None) -> MaskRCNN:
    """Convert `source` (torchvision's .pth, or detectron2's .pkl / .pth with its YAML
    `detectron2_config`), write our checkpoint to `destination` and the recipe beside it
    (`recipe_path(destination)`). Returns the converted model, its `label_space` set."""
    if detectron2_config is not None:
        from .detectron2 import from_detectron2

        model = from_detectron2(source, detectron2_config)
    else:
        from .torchvision import from_torchvision

        model = from_torchvision(source)
    if categories is not None:
        model.label_space = labels_from_categories(categories)
        check_labels(model.label_space, num_classes=model.config.num_classes, where="the categories given")
    extra = {"converted_from": str(source)} | ({"categories": [dict(c) for c in categories]} if categories else {})
    save_checkpoint(destination, model, model_config=model.config, **extra)
    recipe = {"model": dataclasses.asdict(model.config)}
    recipe["model"]["box_head"]["suppressed_labels"] = []  # slots of the source's label space, not of yours
    recipe_path(destination).write_text(
        f"# The model of {Path(destination).name}, converted from {source}. Fine-tune it with\n"
        f"#   maskrcnn train {recipe_path(destination).name} model.num_classes=K data.name=coco ... "
        f"train.init_weights={Path(destination).name}\n" + yaml.safe_dump(recipe, sort_keys=False)
    )
    return model


def recipe_path(destination: str | Path) -> Path:
    """Where `convert` writes the recipe: the checkpoint's name with .yaml."""
    return Path(destination).with_suffix(".yaml")
