"""Simulate point annotations from full masks (Cheng, Parkhi, Kirillov 2021).

The paper measures how far a box plus ~10 labelled points per object get Mask R-CNN, and it
simulates those annotations from COCO's masks: points drawn uniformly in the object's box, each
labelled 1 when it falls on the object's mask and 0 otherwise. This module does the same for
any COCO instances file and backs `maskrcnn points` (cli.py):

    maskrcnn points ANNOTATIONS --num-points 10 --out OUT.json [--seed S] [--keep-masks]

Output format (read by `CocoDataset`, docs/design.md): each usable annotation gains
    "point_coords": [[x, y], ...]   continuous image coordinates (pixel i covers [i, i + 1)),
                                    rounded to 0.01 px
    "point_labels": [1, 0, ...]     1 on the mask, 0 off it
and loses its "segmentation" unless `keep_masks`.

Rules for annotations that are not plain instances:
- Crowd annotations (`iscrowd: 1`) are copied unchanged: no points, and their segmentation is
  kept even without `keep_masks`. They are not instances to segment but regions that training
  (as `crowd_boxes`) and COCO evaluation ignore, and evaluation needs their RLE to do so.
- An annotation without a usable segmentation (missing, empty, polygons of fewer than 3
  points) cannot be labelled: it is copied unchanged without points (it still trains the box
  branch), and counted in a warning that names the first few annotation ids.

Randomness: one generator per image, seeded from (seed, image id), drawing for the image's
annotations in order of annotation id, so an image gets the same points whatever the order
or subset of the file.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


class PointSimulationError(ValueError):
    pass


def _rle(segmentation: Any, height: int, width: int, annotation_id: Any, image_id: Any) -> dict | None:
    """One compressed RLE for a COCO segmentation, or None when it cannot describe a mask."""
    if isinstance(segmentation, list):
        parts = [p for p in segmentation if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        if not parts:
            return None
        return mask_utils.merge(mask_utils.frPyObjects(parts, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if list(segmentation["size"]) != [height, width]:
            raise PointSimulationError(
                f"annotation {annotation_id} (image {image_id}): segmentation size "
                f"{segmentation['size']} differs from the image's [height, width] [{height}, {width}]"
            )
        if isinstance(segmentation["counts"], list):  # uncompressed RLE
            return mask_utils.frPyObjects(segmentation, height, width)
        return segmentation
    return None


def _image_sizes(coco: dict) -> dict[Any, tuple[int, int]]:
    sizes = {}
    for image in coco["images"]:
        try:
            sizes[image["id"]] = (int(image["height"]), int(image["width"]))
        except (KeyError, TypeError, ValueError):
            raise PointSimulationError(
                f"image {image.get('id', '?')}: needs integer 'id', 'height' and 'width', got "
                f"{ {k: image.get(k) for k in ('id', 'height', 'width')} }"
            ) from None
    return sizes


def _simulate_image(
    annotations: list[dict], height: int, width: int, image_id: Any, *, num_points: int, seed: int
) -> tuple[list[dict], list[Any]]:
    """Add points to one image's annotations (sorted by id); returns (annotations, skipped ids)."""
    rles, usable, skipped = [], [], []
    for index, annotation in enumerate(annotations):
        if annotation.get("iscrowd", 0):
            continue
        rle = _rle(annotation.get("segmentation"), height, width, annotation.get("id"), image_id)
        if rle is None:
            skipped.append(annotation.get("id"))
            continue
        rles.append(rle)
        usable.append(index)
    if not usable:
        return annotations, skipped

    masks = mask_utils.decode(rles)  # [H, W, n] uint8
    boxes = np.array(
        [
            annotations[i]["bbox"] if len(annotations[i].get("bbox") or ()) == 4 else mask_utils.toBbox(rle).tolist()
            for i, rle in zip(usable, rles)
        ],
        dtype=np.float64,
    )  # [n, 4] x, y, w, h
    rng = np.random.default_rng([seed, int(image_id) % 2**63])
    uniform = rng.random((len(usable), num_points, 2))  # [n, P, 2] in [0, 1)
    points = boxes[:, None, :2] + uniform * boxes[:, None, 2:]
    # Round first and label the rounded points, so a point and its label always agree.
    points = np.round(points, 2)
    columns = np.clip(np.floor(points[..., 0]).astype(np.int64), 0, width - 1)
    rows = np.clip(np.floor(points[..., 1]).astype(np.int64), 0, height - 1)
    labels = masks[rows, columns, np.arange(len(usable))[:, None]]  # [n, P] 0/1

    for slot, index in enumerate(usable):
        annotations[index]["point_coords"] = points[slot].tolist()
        annotations[index]["point_labels"] = labels[slot].astype(int).tolist()
    return annotations, skipped


def simulate_points(coco: dict, *, num_points: int, seed: int = 0, keep_masks: bool = False) -> dict:
    """Return a copy of a COCO instances dict with simulated `point_coords` / `point_labels`.

    Args:
        coco: a COCO instances file as loaded by `json.load` (not modified).
        num_points: points per object, drawn uniformly in its box (the paper uses 10).
        seed: the draw is a function of (seed, image id).
        keep_masks: keep each annotation's `segmentation` (default: remove it, as the paper's
            point-only annotations have none). Crowd annotations keep theirs in any case.
    """
    if num_points < 1:
        raise PointSimulationError(f"num_points must be >= 1, got {num_points}")
    for key in ("images", "annotations"):
        if not isinstance(coco.get(key), list):
            raise PointSimulationError(f"not a COCO instances file: '{key}' is missing or not a list")
    sizes = _image_sizes(coco)
    result = {key: copy.deepcopy(value) for key, value in coco.items() if key != "annotations"}
    annotations = [dict(annotation) for annotation in coco["annotations"]]

    by_image: dict[Any, list[dict]] = defaultdict(list)
    for annotation in annotations:
        image_id = annotation.get("image_id")
        if image_id not in sizes:
            raise PointSimulationError(
                f"annotation {annotation.get('id')}: image_id {image_id!r} is not in 'images'"
            )
        by_image[image_id].append(annotation)

    skipped: list[Any] = []
    for image_id, image_annotations in by_image.items():
        image_annotations.sort(key=lambda a: a.get("id", 0))
        height, width = sizes[image_id]
        _, image_skipped = _simulate_image(
            image_annotations, height, width, image_id, num_points=num_points, seed=seed
        )
        skipped.extend(image_skipped)
    if skipped:
        warnings.warn(
            f"{len(skipped)} non-crowd annotation(s) have no usable segmentation and got no points "
            f"(first ids: {skipped[:10]})",
            stacklevel=2,
        )
    if not keep_masks:
        for annotation in annotations:
            if not annotation.get("iscrowd", 0):
                annotation.pop("segmentation", None)

    result["annotations"] = annotations
    info = dict(result.get("info") or {})
    info["point_simulation"] = {"num_points": num_points, "seed": seed, "keep_masks": keep_masks}
    result["info"] = info
    return result


# --------------------------------------------------------------------------- files
def read_coco(path: str | Path) -> dict:
    """A COCO JSON object; ValueError naming the file when it cannot be read or is not one."""
    try:
        with open(path) as file:
            coco = json.load(file)
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(coco, dict):
        raise ValueError(f"{path}: expected a COCO JSON object")
    return coco


def write_coco(coco: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as file:
        json.dump(coco, file)


def point_summary(result: dict) -> dict:
    """What `simulate_points` produced: annotations with points, all annotations, crowd ones
    (copied unchanged), and the share of points labelled inside their object (None: no points)."""
    with_points = [a for a in result["annotations"] if "point_labels" in a]
    labels = np.array([label for a in with_points for label in a["point_labels"]], dtype=np.float64)
    return {"with_points": len(with_points), "annotations": len(result["annotations"]),
            "crowd": sum(1 for a in result["annotations"] if a.get("iscrowd", 0)),
            "inside": float(labels.mean()) if labels.size else None}
