"""What a training run leaves beside `last.pth` / `best.pth` (rank 0 writes, the others do nothing):

    log.txt                 everything the terminal showed: the config, warnings, loss lines, AP tables
    metrics.json            the last evaluation in full (per-class AP included); printed as a table
    training_curves.png     losses, learning rate and AP against the iteration (redrawn at each evaluation)
    contact_sheet.png       validation images, ground truth beside prediction, enlarged (at the end)
    predictions/<name>.png  the same images' predictions at their own size
    model_0000500.pth ...   the last `train.keep_checkpoints` periodic checkpoints

The progress display is a tqdm bar on a terminal, and one line every `log_every` iterations
when the output goes to a file or a pipe (a bar there would write thousands of carriage returns).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm import tqdm

LOG, METRICS, CURVES, SHEET = "log.txt", "metrics.json", "training_curves.png", "contact_sheet.png"
PICTURE_SCALE = 3  # nearest-neighbour enlargement of the pictures: 192 px -> 576 px


class _Tee(io.TextIOBase):
    """Writes to the terminal stream and to the log file."""

    def __init__(self, stream: TextIO, log: TextIO) -> None:
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()


class RunLog:
    """While open, stdout and stderr (so also warnings and tracebacks printed by callers) are
    copied into `path`; `path` None (other ranks) copies nothing. A resumed run appends."""

    def __init__(self, path: Path | None, *, append: bool) -> None:
        self.path, self.append = path, append
        self.file: TextIO | None = None
        self.terminal: TextIO = sys.stderr  # where a progress bar may draw (never into the file)

    def __enter__(self) -> RunLog:
        self.terminal = sys.stderr
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("a" if self.append else "w", buffering=1)
            self._saved = sys.stdout, sys.stderr
            sys.stdout, sys.stderr = _Tee(sys.stdout, self.file), _Tee(sys.stderr, self.file)
        return self

    def to_file(self, line: str) -> None:
        """A line for the log file only (what a terminal shows in its progress bar instead)."""
        if self.file is not None:
            self.file.write(line + "\n")

    def __exit__(self, *exc_info: Any) -> None:
        if self.file is not None:
            sys.stdout, sys.stderr = self._saved
            self.file.close()
            self.file = None


class Progress:
    """A tqdm bar on a terminal, else a line every `log_every` iterations (see the module docstring)."""

    def __init__(self, *, total: int, initial: int, log: RunLog, enabled: bool) -> None:
        self.total, self.log, self.enabled = total, log, enabled
        self.bar = None
        if enabled and log.terminal.isatty():
            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, file=log.terminal)

    def step(self, iteration: int, values: dict[str, float] | None) -> None:
        """After each iteration; `values` (lr, losses, seconds_per_iteration) on logging iterations."""
        if self.bar is not None:
            self.bar.update(1)
        if not self.enabled or values is None:
            return
        line = _progress_line(iteration, self.total, values)
        if self.bar is not None:
            losses = {k.removeprefix("loss_"): f"{v:.3f}" for k, v in values.items() if k.startswith("loss")}
            self.bar.set_postfix(losses)
            self.log.to_file(line)
        else:
            print(line, flush=True)

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)  # through the log's copy of stderr
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _progress_line(iteration: int, total: int, values: dict[str, float]) -> str:
    """`iteration 20/600  loss 2.913 (classifier 0.61, box_reg 0.42, ...)  lr 0.0004  0.48 s/it  eta 4m 38s`."""
    terms = ", ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in values.items() if k.startswith("loss_"))
    seconds = values.get("seconds_per_iteration", 0.0)
    eta = int(seconds * (total - iteration))
    return (f"iteration {iteration}/{total}  loss {values.get('loss', float('nan')):.3f} ({terms})  "
            f"lr {values.get('lr', float('nan')):.3g}  {seconds:.2f} s/it  eta {eta // 60}m {eta % 60:02d}s")


def report_evaluation(metrics: dict, *, iteration: int, output_dir: Path) -> None:
    """Print the AP table (per class too) and write it to metrics.json, the curves beside it."""
    from maskrcnn.engine.evaluation import format_table

    print(f"evaluation at iteration {iteration}:\n{format_table(metrics)}", flush=True)
    (output_dir / METRICS).write_text(json.dumps(metrics, indent=1))  # as `maskrcnn evaluate` writes it
    write_curves(output_dir)


def write_curves(output_dir: Path) -> None:
    from maskrcnn.visualize import plot_training_curves

    if (output_dir / "metrics.jsonl").exists():
        plot_training_curves(output_dir / "metrics.jsonl", output_dir / CURVES)


def keep_periodic_checkpoint(last_path: Path, *, iteration: int, keep: int) -> None:
    """Copy the just-written `last.pth` to `model_<iteration>.pth`; delete all but the newest `keep`."""
    if keep <= 0:
        return
    folder = last_path.parent
    target = folder / f"model_{iteration:07d}.pth"
    partial = target.with_suffix(".pth.partial")
    shutil.copyfile(last_path, partial)
    os.replace(partial, target)  # never a half-written model_*.pth
    periodic = sorted(folder.glob("model_[0-9]*.pth"))
    for old in periodic[:-keep]:
        old.unlink()


@torch.no_grad()
def write_pictures(model: torch.nn.Module, dataset: Any, *, count: int, output_dir: Path, device: torch.device,
                   tensorboard: Any = None, iteration: int = 0) -> Path | None:
    """Predictions on the first `count` validation images: `predictions/<name>.png` each, and
    one contact sheet with the ground truth beside each prediction, enlarged PICTURE_SCALE times.
    Returns the contact sheet's path (None when there is nothing to draw)."""
    from maskrcnn.visualize import contact_sheet, draw_predictions, save_png

    count = min(count, len(dataset)) if dataset is not None else 0
    if count <= 0:
        return None
    names, skeleton = _category_names(dataset)
    was_training = model.training
    model.eval()
    tiles = []
    try:
        for index in range(count):
            image, target = dataset[index]
            prediction = {k: v.cpu() for k, v in model([image.to(device)])[0].items()}
            name = _picture_name(dataset, index, target)
            options = dict(category_names=names, skeleton=skeleton)
            save_png(draw_predictions(image, prediction, **options), output_dir / "predictions" / f"{name}.png")
            drawn = dict(scale=PICTURE_SCALE, font_size=7 * PICTURE_SCALE, **options)
            truth = draw_predictions(image, _as_prediction(target, image), show_scores=False, **drawn)
            tiles.append((name, truth, draw_predictions(image, prediction, **drawn)))
    finally:
        model.train(was_training)
    sheet = save_png(contact_sheet(tiles, columns=2), output_dir / SHEET)
    if tensorboard is not None:
        tensorboard.add_image("predictions", contact_sheet(tiles, columns=2), iteration)
    return sheet


def _as_prediction(target: dict, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """A ground-truth target as a detection dict with score 1 (masks `[N, 1, H, W]`)."""
    boxes = target["boxes"]
    drawn = {"boxes": boxes, "labels": target["labels"], "scores": torch.ones(len(boxes))}
    if "masks" in target:
        masks = target["masks"]
        masks = masks if isinstance(masks, torch.Tensor) else masks.to_tensor()  # compact InstanceMasks
        drawn["masks"] = masks.reshape(len(boxes), 1, *image.shape[-2:]).float()
    if "keypoints" in target:
        drawn["keypoints"] = target["keypoints"]
    return drawn


def _category_names(dataset: Any) -> tuple[dict[int, str], list[tuple[int, int]] | None]:
    """label -> category name, and the keypoint skeleton, from a CocoDataset-like set (else numbers)."""
    from maskrcnn.visualize import coco_skeleton

    categories = sorted(getattr(dataset, "categories", None) or [], key=lambda c: c["id"])
    to_category = getattr(dataset, "label_to_category_id", {}) or {}
    by_id = {c["id"]: c for c in categories}
    names = {int(label): by_id[cid]["name"] for label, cid in to_category.items() if cid in by_id}
    skeleton = coco_skeleton(categories[0]) if categories and categories[0].get("skeleton") else None
    return names, skeleton


def _picture_name(dataset: Any, index: int, target: dict) -> str:
    """The image's file stem when the dataset has COCO records, else its position."""
    coco = getattr(dataset, "coco", None)
    image_id = target.get("image_id")
    if coco is not None and image_id in getattr(coco, "imgs", {}):
        return Path(coco.imgs[image_id]["file_name"]).stem
    return f"{index:04d}"
