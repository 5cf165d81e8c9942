"""Bad data and faults, tried as a user meets them: through `maskrcnn ...` (cli.main) and the
public API (CocoDataset, train, evaluate). Each test asserts the message, the exit code and
that nothing is lost (checkpoints, annotations)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn.cli import main
from maskrcnn.data.coco import CocoDataset, CocoFormatError
from maskrcnn.engine.evaluation import coco_evaluate

SIZE = 32
# A model small enough for a second per iteration on a CPU, over src/maskrcnn/configs/shapes_demo.yaml.
TINY = [
    "model.backbone.fpn_channels=8", "model.box_head.fc_dim=16", "model.mask_head.conv_dim=8",
    "model.keypoint_head.enabled=false", "model.transform.min_size=[32]", "model.transform.min_size_test=32",
    "model.transform.max_size=32", "model.rpn.pre_nms_top_n_train=50", "model.rpn.post_nms_top_n_train=20",
    "model.rpn.pre_nms_top_n_test=50", "model.rpn.post_nms_top_n_test=20", "data.num_workers=0",
    "data.horizontal_flip=0", "train.batch_size=1", "train.warmup_iterations=1", "train.log_every=1",
]  # fmt: skip


def _square(image_id: int, ann_id: int, x: float, y: float, side: float, **extra) -> dict:
    polygon = [x, y, x + side, y, x + side, y + side, x, y + side]
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": [x, y, side, side], "iscrowd": 0,
            "area": side * side, "segmentation": [polygon], **extra}


def _write(tmp_path: Path, annotations: list, *, images: int = 2, categories: list | None = None,
           name: str = "train") -> tuple[Path, Path]:
    """A COCO file over `images` 32x32 PNGs with a bright square per annotation."""
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    for i in range(1, images + 1):
        pixels = np.full((SIZE, SIZE, 3), 20, np.uint8)
        for ann in annotations:
            if isinstance(ann, dict) and ann.get("image_id") == i and isinstance(ann.get("bbox"), list):
                x, y, w, h = (int(float(v)) for v in ann["bbox"])
                pixels[y:y + h, x:x + w] = 230
        Image.fromarray(pixels).save(folder / f"{i}.png")
    data = {"images": [{"id": i, "file_name": f"{i}.png", "height": SIZE, "width": SIZE} for i in range(1, images + 1)],
            "annotations": annotations, "categories": categories or [{"id": 1, "name": "square"}]}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return path, folder


def _dataset(path: Path, folder: Path, **options) -> CocoDataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CocoDataset(path, folder, **options)


def _train_args(tmp_path: Path, path: Path, folder: Path, *extra: str) -> list[str]:
    return ["train", "shapes_demo", *TINY, "data.name=coco", f"data.train.annotations={path}",
            f"data.train.images={folder}", "model.num_classes=1", f"train.output_dir={tmp_path / 'run'}", *extra]


# --------------------------------------------------------------------------- 1. duplicate annotation ids
def test_duplicate_annotation_ids_are_reported_and_renumbered_for_evaluation(tmp_path, capsys):
    # two files merged: both number their annotations from 1
    anns = [_square(1, 1, 2, 2, 10), _square(1, 2, 18, 18, 10), _square(2, 1, 4, 4, 12), _square(2, 2, 16, 3, 9)]
    path, folder = _write(tmp_path, anns)
    assert main(["check-data", str(path), "--images", str(folder)]) == 0
    out = capsys.readouterr().out
    assert out.count("[id]: duplicate annotation id") == 2 and "2 warnings" in out
    assert main(["check-data", str(path), "--images", str(folder), "--strict"]) == 1
    capsys.readouterr()

    with pytest.warns(UserWarning, match="annotation problems"):
        dataset = CocoDataset(path, folder)
    assert sum(len(r.labels) for r in dataset.records) == 4  # nothing dropped
    ids = [a["id"] for a in dataset.coco.dataset["annotations"]]
    assert len(set(ids)) == 4 and min(ids) >= 1
    # a prediction equal to the ground truth scores AP 1.0 (it scored 0.58 with the ids colliding)
    results = [{"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.9,
                "segmentation": a["segmentation"]} for a in json.loads(path.read_text())["annotations"]]
    metrics = coco_evaluate(dataset.coco, results, iou_types=["bbox"])
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("bad_id", [0, -3, "a7", 2.5, True])
def test_annotation_ids_pycocotools_cannot_index_are_renumbered(tmp_path, bad_id):
    anns = [_square(1, bad_id, 2, 2, 10), _square(1, 5, 18, 18, 10)]
    dataset = _dataset(*_write(tmp_path, anns, images=1))
    assert any(p.field == "id" and p.annotation_id == bad_id and "renumbered" in p.message for p in dataset.problems)
    ids = [a["id"] for a in dataset.coco.dataset["annotations"]]
    assert 5 in ids and len(set(ids)) == 2 and all(isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in ids)
    results = [{"image_id": 1, "category_id": 1, "bbox": a["bbox"], "score": 0.9} for a in anns]
    assert coco_evaluate(dataset.coco, results, iou_types=["bbox"])["bbox"]["AP"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- 4. numbers written as strings
def test_numbers_written_as_strings_are_read_as_numbers_and_reported(tmp_path, capsys):
    anns = [_square(1, 1, 2, 2, 10, iscrowd="0"), _square(1, 2, 18, 18, 10, iscrowd="1"),
            _square(2, 3, 4, 4, 12, area="144"), {**_square(2, 4, 16, 3, 9), "category_id": "1", "image_id": "2"},
            {**_square(2, 5, 3, 18, 8), "bbox": ["3", "18", "8", "8"]}]
    path, folder = _write(tmp_path, anns)
    data = json.loads(path.read_text())
    data["images"][0].update(height=str(SIZE), width=str(SIZE))
    path.write_text(json.dumps(data))
    assert main(["check-data", str(path), "--images", str(folder)]) == 0
    out = capsys.readouterr().out
    for field, annotation in (("iscrowd", 1), ("iscrowd", 2), ("area", 3), ("category_id", 4), ("image_id", 4),
                              ("bbox", 5), ("height/width", None)):
        assert f"[{field}]" in out and f"annotation {annotation} [{field}]" in out
    dataset = _dataset(path, folder)
    first, second = dataset.records
    assert len(first.labels) == 1 and len(first.crowd_boxes) == 1  # "0" stays an object, "1" is a crowd region
    assert len(second.labels) == 3 and second.boxes[2].tolist() == [3, 18, 11, 26]
    gt = dataset.coco.dataset["annotations"]
    assert [a["iscrowd"] for a in gt] == [0, 1, 0, 0, 0] and all(isinstance(a["area"], (int, float)) for a in gt)
    results = [{"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.9,
                "segmentation": a["segmentation"]} for a in gt if not a["iscrowd"]]
    metrics = coco_evaluate(dataset.coco, results, iou_types=["bbox", "segm"])  # crashed on the string area
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("value", ["yes", 2, [0], "0.5"])
def test_an_iscrowd_that_is_neither_0_nor_1_skips_the_annotation_with_a_message(tmp_path, value):
    dataset = _dataset(*_write(tmp_path, [_square(1, 1, 2, 2, 10, iscrowd=value), _square(1, 2, 18, 18, 10)], images=1))
    (problem,) = dataset.problems
    assert (problem.severity, problem.annotation_id, problem.field) == ("error", 1, "iscrowd")
    assert repr(value) in problem.message and len(dataset.records[0].labels) == 1


def test_a_string_area_that_is_no_number_is_computed_from_the_mask(tmp_path):
    dataset = _dataset(*_write(tmp_path, [_square(1, 1, 2, 2, 10, area="large")], images=1))
    (problem,) = dataset.problems
    assert problem.field == "area" and "'large'" in problem.message
    assert dataset.coco.dataset["annotations"][0]["area"] == pytest.approx(100.0, abs=12)
