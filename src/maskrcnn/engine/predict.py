"""Batched inference on image files and folders: one annotated PNG per image plus a COCO results JSON.

A path that does not exist, a folder without images or a file that cannot be decoded is reported
with its name and skipped; the other images are still processed (`PredictionReport.problems`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import UnidentifiedImageError

from maskrcnn.checkpoint.label_space import category_id_table, label_names, labels_from_categories
from maskrcnn.data.coco import decode_image  # the same decoding as training and evaluation
from maskrcnn.engine.evaluation import predictions_to_coco
from maskrcnn.visualize import coco_skeleton, draw_predictions, save_png

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class PredictionReport:
    pictures: list[Path] = field(default_factory=list)  # one PNG per image that was processed
    results_path: Path | None = None  # COCO results JSON
    problems: list[str] = field(default_factory=list)  # one message per path that was skipped
    detections: int = 0


def collect_images(inputs: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """Expand files and folders (their image files, sorted, not recursive) -> (images, problems)."""
    images: list[Path] = []
    problems: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append(f"{path}: folder has no image files ({', '.join(IMAGE_SUFFIXES)})")
            images.extend(found)
        elif path.is_file():
            images.append(path)  # any suffix: decoding decides whether it is an image
        else:
            problems.append(f"{path}: no such file or folder")
    return images, problems


def _unique_picture_name(path: Path, taken: set[str]) -> str:
    """`<stem>.png`, with `_2`, `_3`... when two inputs share a stem (a/1.jpg and b/1.png)."""
    name, counter = f"{path.stem}.png", 1
    while name in taken:
        counter += 1
        name = f"{path.stem}_{counter}.png"
    taken.add(name)
    return name


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    inputs: Sequence[str | Path],
    *,
    out_dir: str | Path,
    device: torch.device | str,
    batch_size: int = 4,
    score_threshold: float = 0.5,
    categories: Sequence[Mapping] | None = None,
    results_name: str = "results.json",
) -> PredictionReport:
    """Predict on every image in `inputs` (files and folders) and write the outputs to `out_dir`.

    categories: the COCO categories the model was trained on (names, original ids, keypoint
        skeleton). Labels are named and written as category ids by the model's own label table
        (`model.label_space`) when it has one, else label k is the k-th category by ascending id;
        with neither, labels are shown as numbers and written as category ids.
    Writes `out_dir/<stem>.png` per image and `out_dir/<results_name>`: COCO results (boxes
    xywh, RLE masks, keypoints in pixel indices) with detections scoring >= `score_threshold`;
    image ids count the processed images from 1 and each result also names its `file_name`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, problems = collect_images(inputs)
    report = PredictionReport(problems=problems)
    ordered = sorted(categories or [], key=lambda c: c["id"])
    table = getattr(model, "label_space", None) or (labels_from_categories(ordered) if ordered else None)
    names = label_names(table) if table else {}
    skeleton = coco_skeleton(ordered[0]) if ordered and ordered[0].get("skeleton") else None
    known_ids = category_id_table(table) if table else None

    was_training = model.training
    model.eval()
    results: list[dict] = []
    taken: set[str] = set()
    try:
        for start in range(0, len(images), batch_size):
            batch: list[tuple[Path, torch.Tensor]] = []
            for path in images[start : start + batch_size]:
                try:
                    batch.append((path, decode_image(path)))
                except (UnidentifiedImageError, OSError, ValueError) as error:
                    report.problems.append(f"{path}: cannot read image ({error})")
            if not batch:
                continue
            outputs = model([image.to(device) for _, image in batch])
            for (path, image), output in zip(batch, outputs):
                keep = output["scores"] >= score_threshold
                output = {k: v[keep].cpu() for k, v in output.items()}
                picture = out_dir / _unique_picture_name(path, taken)
                save_png(draw_predictions(image, output, category_names=names, skeleton=skeleton,
                                          score_threshold=score_threshold), picture)  # fmt: skip
                image_id = len(report.pictures) + 1
                # Without a table a label is written as its own category id.
                identity = torch.arange(int(output["labels"].max()) + 1 if len(output["labels"]) else 1)
                category_ids = known_ids if known_ids is not None else identity
                detections = predictions_to_coco(output, image_id=image_id, category_ids=category_ids)
                for detection in detections:
                    detection["file_name"] = str(path)
                results.extend(detections)
                report.pictures.append(picture)
    finally:
        model.train(was_training)
    report.detections = len(results)
    report.results_path = out_dir / results_name
    report.results_path.write_text(json.dumps(results))
    return report
