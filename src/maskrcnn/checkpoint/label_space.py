"""Label spaces: which COCO category (id and name) each predicted label stands for.

A label table is plain data, so that it travels inside a checkpoint (weights_only loading):

    [{"label": 1, "id": 1, "name": "person"}, {"label": 2, "id": 2, "name": "bicycle"}, ...]

Labels are the model's output indices (1..num_classes, 0 is background). Our own training
numbers a data set's categories by ascending id (`data/coco.py`: label = position + 1), so
its table follows from the categories. torchvision's COCO weights instead predict the
category id itself over 91 slots, ten of them `N/A` (ids COCO never used): their table maps
label i to id i and leaves the N/A slots out, and the model never predicts those
(`box_head.suppressed_labels`). Models with COCO's 80 classes (detectron2's zoo) number
the 80 categories contiguously, by ascending id.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

# torchvision's COCO layout, from its weights' meta["categories"]: slot i is COCO category id i;
# "__background__" is slot 0 and "N/A" marks ids that COCO does not use.
NOT_A_CATEGORY = "N/A"
# the table of keypoint models trained on COCO (torchvision's and detectron2's): one class, person
PERSON_LABELS = ({"label": 1, "id": 1, "name": "person"},)


def torchvision_coco_slots() -> list[str]:
    """The 91 names of torchvision's COCO heads (slot 0 background, ten "N/A")."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    return list(MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])


def coco_categories() -> list[dict]:
    """COCO's 80 categories: `[{"id": 1, "name": "person"}, ..., {"id": 90, "name": "toothbrush"}]`."""
    slots = torchvision_coco_slots()
    return [{"id": i, "name": name} for i, name in enumerate(slots) if i > 0 and name != NOT_A_CATEGORY]


def torchvision_coco_labels() -> list[dict]:
    """The 91-slot table of torchvision's COCO weights: label i is category id i (N/A slots left out)."""
    return [{"label": c["id"], "id": c["id"], "name": c["name"]} for c in coco_categories()]


def labels_from_categories(categories: Sequence[Mapping]) -> list[dict]:
    """Our training convention: categories by ascending id, label = position + 1."""
    ordered = sorted(categories, key=lambda c: int(c["id"]))
    return [{"label": label, "id": int(c["id"]), "name": str(c.get("name", c["id"]))}
            for label, c in enumerate(ordered, start=1)]


def checkpoint_labels(checkpoint: Mapping) -> list[dict] | None:
    """A checkpoint's label table: its own `labels`, else the one its training categories imply."""
    if checkpoint.get("labels"):
        return [dict(entry) for entry in checkpoint["labels"]]
    if checkpoint.get("categories"):
        return labels_from_categories(checkpoint["categories"])
    return None


def trained_categories(checkpoint: Mapping, *, annotations: str | Path | None = None) -> list[dict] | None:
    """The categories a model was trained on: those of the `annotations` file, the checkpoint's own
    list, or those of the training data named in its saved config (None when none says)."""
    if annotations:
        return _read_json(annotations)["categories"]
    if checkpoint.get("categories"):
        return checkpoint["categories"]
    data = (checkpoint.get("config") or {}).get("data") or {}
    if data.get("name") == "shapes":
        from maskrcnn.data.shapes import categories

        return categories()
    train_json = (data.get("train") or {}).get("annotations")
    if train_json and Path(train_json).is_file():
        return _read_json(train_json).get("categories")
    return None


def _read_json(path: str | Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None


def unused_labels(labels: Sequence[Mapping], *, num_classes: int) -> list[int]:
    """Labels 1..num_classes that the table does not name (torchvision's N/A slots)."""
    named = {int(entry["label"]) for entry in labels}
    return [label for label in range(1, num_classes + 1) if label not in named]


def category_id_table(labels: Sequence[Mapping]) -> Tensor:
    """`int64 [max label + 1]`: label -> category id (0 where the table names no category)."""
    table = torch.zeros(max((int(e["label"]) for e in labels), default=0) + 1, dtype=torch.int64)
    for entry in labels:
        table[int(entry["label"])] = int(entry["id"])
    return table


def label_names(labels: Sequence[Mapping]) -> dict[int, str]:
    return {int(entry["label"]): str(entry["name"]) for entry in labels}


def check_labels(labels: Sequence[Mapping], *, num_classes: int, where: str) -> None:
    """Each entry has label (1..num_classes, once), id and name; ids are unique."""
    seen_labels: set[int] = set()
    seen_ids: set[int] = set()
    for entry in labels:
        missing = [key for key in ("label", "id", "name") if key not in entry]
        if missing:
            raise ValueError(f"{where}: label table entry {dict(entry)} has no {', '.join(missing)}")
        label, category_id = int(entry["label"]), int(entry["id"])
        if not 1 <= label <= num_classes:
            raise ValueError(f"{where}: label {label} ({entry['name']}) outside 1..{num_classes}")
        if label in seen_labels or category_id in seen_ids:
            raise ValueError(f"{where}: label {label} or category id {category_id} appears twice")
        seen_labels.add(label)
        seen_ids.add(category_id)


def check_against_categories(labels: Sequence[Mapping], categories: Sequence[Mapping], *, where: str) -> None:
    """The table and an annotation file's categories must mean the same thing by the same id:
    an id they share has the same name, and they share at least one id."""
    names = {int(c["id"]): str(c.get("name", "")) for c in categories}
    shared = [e for e in labels if int(e["id"]) in names]
    if not shared:
        raise ValueError(
            f"{where}: none of the model's category ids ({_preview(labels)}) is a category of the file "
            f"({_preview([{'id': i, 'name': n} for i, n in names.items()])})"
        )
    for entry in shared:
        theirs = names[int(entry["id"])]
        if _normalised(theirs) != _normalised(str(entry["name"])):
            raise ValueError(
                f"{where}: category id {entry['id']} is {theirs!r} in the file but {entry['name']!r} for the model "
                f"(label {entry['label']}): the file and the model number their categories differently"
            )


def _normalised(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


def _preview(entries: Sequence[Mapping], count: int = 4) -> str:
    shown = ", ".join(f"{e['id']} {e.get('name', '')}".strip() for e in list(entries)[:count])
    return shown + (", ..." if len(entries) > count else "")
