"""`maskrcnn predict`: images and videos in; annotated pictures / videos and COCO results out.

Built on `maskrcnn.Predictor`. Inputs are files and folders (not recursive). In a folder, a file
is an image when its suffix says so or when PIL recognises its content (`.ppm`, `.jfif`, no
suffix...), a video when its suffix is a video one; the other files are listed as skipped. A
path that does not exist, an image that cannot be decoded or on which the model fails is reported
with its name and skipped; the other inputs are still processed (`PredictionReport.problems`).

Images stay uint8 while the model runs (a quarter of float32's memory). Masks stay
`[N, 1, 28, 28]` over their boxes (`Predictor(masks="box")`) and are pasted a few at a time where
they must be dense (drawing, RLE, PNG), so memory does not grow with N * H * W.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_util

from maskrcnn.data.coco import decode_image  # the same decoding as training and evaluation
from maskrcnn.engine.evaluation import predictions_to_coco
from maskrcnn.predictor import Predictor, paste_in_chunks
from maskrcnn.visualize import coco_skeleton, draw_predictions, label_color, overlay_masks, save_png

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")
SAVE_MASKS = ("rle", "png", "none")


@dataclass
class PredictionReport:
    pictures: list[Path] = field(default_factory=list)  # one PNG per image that was processed
    videos: list[Path] = field(default_factory=list)  # one annotated video per input video (when drawing)
    video_results: list[Path] = field(default_factory=list)  # one per-frame JSON per input video
    results_path: Path | None = None  # COCO results JSON of the images
    problems: list[str] = field(default_factory=list)  # one message per input that was skipped
    skipped: list[Path] = field(default_factory=list)  # files in folders that are neither images nor videos
    detections: int = 0  # image detections written to results_path


@dataclass
class Inputs:
    images: list[Path] = field(default_factory=list)
    videos: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)


def is_image_file(path: Path) -> bool:
    """PIL recognises the content (it reads the header only)."""
    try:
        with Image.open(path):
            return True
    except (UnidentifiedImageError, OSError, ValueError):
        return False


def collect_inputs(inputs: Sequence[str | Path]) -> Inputs:
    """Expand files and folders (sorted, not recursive) into images and videos; see the module docstring."""
    found = Inputs()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file())
            before = len(found.images) + len(found.videos)
            for file in files:
                if file.suffix.lower() in VIDEO_SUFFIXES:
                    found.videos.append(file)
                elif file.suffix.lower() in IMAGE_SUFFIXES or is_image_file(file):
                    found.images.append(file)
                else:
                    found.skipped.append(file)
            if len(found.images) + len(found.videos) == before:
                found.problems.append(f"{path}: folder has no images or videos")
        elif path.is_file():  # any suffix: the content decides
            is_video = path.suffix.lower() in VIDEO_SUFFIXES or (not is_image_file(path) and _is_video_file(path))
            (found.videos if is_video else found.images).append(path)
        else:
            found.problems.append(f"{path}: no such file or folder")
    return found


def _is_video_file(path: Path) -> bool:
    import av

    try:
        with av.open(str(path)) as container:
            return bool(container.streams.video) and container.format.name != "tty"  # tty: FFmpeg reads text as video
    except (av.FFmpegError, OSError, ValueError):
        return False


def _unique_name(path: Path, suffix: str, taken: set[str]) -> str:
    """`<stem><suffix>`, with `_2`, `_3`... when two inputs share a stem (a/1.jpg and b/1.png)."""
    name, counter = f"{path.stem}{suffix}", 1
    while name in taken:
        counter += 1
        name = f"{path.stem}_{counter}{suffix}"
    taken.add(name)
    return name


@dataclass
class _Writer:
    """What one image's or frame's result turns into: a drawn picture, COCO results, mask files."""

    predictor: Predictor
    out_dir: Path
    skeleton: list[tuple[int, int]] | None
    draw: bool
    save_masks: str

    def draw_picture(self, image: torch.Tensor, result: Mapping) -> torch.Tensor:
        """`image` (uint8, or floats in 0-1) -> `uint8 [3, H, W]` with masks (pasted in chunks), boxes,
        names and keypoints."""
        canvas = image if image.dtype == torch.uint8 else (image.clamp(0, 1) * 255).round().to(torch.uint8)
        size = (canvas.shape[-2], canvas.shape[-1])
        if "masks" in result and len(result["masks"]):
            colors = [label_color(label) for label in result["labels"].tolist()]
            canvas = overlay_masks(canvas, self.binary_masks(result, size), colors=colors)
        boxes_only = {key: value for key, value in result.items() if key in ("boxes", "labels", "scores", "keypoints")}
        return draw_predictions(canvas, boxes_only, category_names=self.predictor.label_names, skeleton=self.skeleton,
                                score_threshold=self.predictor.score_threshold)

    def binary_masks(self, result: Mapping, size: tuple[int, int]):
        if self.predictor.masks_over_boxes:
            return paste_in_chunks(result["masks"], result["boxes"], size, aligned=self.predictor.paste_aligned)
        return ((0, result["masks"][:, 0] > 0.5),)  # already dense (a model without `detect`)

    def coco_results(self, result: Mapping, size: tuple[int, int], *, image_id: int, mask_stem: str) -> list[dict]:
        """COCO result dicts; masks as RLE (`segmentation`) or PNG files (`mask_file`), or none."""
        plain = {key: value for key, value in result.items() if key in ("boxes", "labels", "scores", "keypoints")}
        labels = result["labels"]
        if self.predictor.category_ids is not None:
            category_ids = self.predictor.category_ids
        else:  # without a table a label is written as its own category id
            category_ids = torch.arange(int(labels.max()) + 1 if len(labels) else 1)
        detections = predictions_to_coco(plain, image_id=image_id, category_ids=category_ids)
        if "masks" in result and len(detections) and self.save_masks != "none":
            for start, binary in self.binary_masks(result, size):
                self._write_masks(detections[start : start + len(binary)], binary, mask_stem, start)
        return detections

    def _write_masks(self, detections: list[dict], binary: torch.Tensor, stem: str, start: int) -> None:
        """`binary [n, H, W]` for `detections` (whose first is detection number `start`)."""
        if self.save_masks == "rle":
            # pycocotools wants a Fortran-ordered [H, W, n] uint8 array and encodes all n in one call
            rles = mask_util.encode(np.asfortranarray(binary.permute(1, 2, 0).numpy().astype(np.uint8)))
            for detection, rle in zip(detections, rles):
                detection["segmentation"] = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
            return
        folder = self.out_dir / "masks"
        folder.mkdir(parents=True, exist_ok=True)
        for number, (detection, mask) in enumerate(zip(detections, binary), start=start):
            path = folder / f"{stem}_{number}.png"
            Image.fromarray(mask.numpy().astype(np.uint8) * 255).save(path)
            detection["mask_file"] = str(path.relative_to(self.out_dir))


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
    draw: bool = True,
    save_masks: str = "rle",
    image_ids: Mapping[str, int] | None = None,
) -> PredictionReport:
    """Predict on every image and video in `inputs` (files and folders) and write to `out_dir`.

    categories: the COCO categories the model was trained on (names, ids, keypoint skeleton).
        Labels are named and written as category ids by the model's label table
        (`model.label_space`) when it has one, else label k is the k-th category by ascending id;
        with neither, labels are shown as numbers and written as category ids.
    draw: write `out_dir/<stem>.png` per image and `out_dir/<stem>.mp4` per video.
    save_masks: "rle" (COCO RLE in each result's `segmentation`), "png" (one PNG per detection in
        `out_dir/masks/`, named by the result's `mask_file`) or "none".
    image_ids: file name -> image id, from a COCO file (`image_ids_from_coco`): results carry
        those ids, so they can be scored; an image the file does not list is reported and left out
        of the results. Without it, image ids count the processed images from 1.
    Images: `out_dir/<results_name>`, COCO results of detections scoring >= `score_threshold`, each
    naming its `file_name`. Videos: `out_dir/<stem>.json` with one entry per frame.
    """
    if save_masks not in SAVE_MASKS:
        raise ValueError(f"save_masks must be one of {SAVE_MASKS}, got {save_masks!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    found = collect_inputs(inputs)
    report = PredictionReport(problems=list(found.problems), skipped=found.skipped)
    predictor = Predictor(model, device=device, score_threshold=score_threshold, batch_size=batch_size,
                          masks="box", categories=categories)
    ordered = sorted(categories or [], key=lambda c: c["id"])
    skeleton = coco_skeleton(ordered[0]) if ordered and ordered[0].get("skeleton") else None
    writer = _Writer(predictor, out_dir, skeleton, draw, save_masks)
    was_training = model.training
    taken: set[str] = set()
    try:
        results = _predict_images(writer, found.images, report, taken, image_ids)
        for video in found.videos:
            _predict_video(writer, video, report, taken)
    finally:
        model.train(was_training)
    report.detections = len(results)
    report.results_path = out_dir / results_name
    report.results_path.write_text(json.dumps(results))
    return report


def _predict_images(writer: _Writer, images: list[Path], report: PredictionReport, taken: set[str],
                    image_ids: Mapping[str, int] | None) -> list[dict]:
    results: list[dict] = []
    processed = 0  # without image_ids, an image's id is its number among the processed images
    batch_size = writer.predictor.batch_size
    for start in range(0, len(images), batch_size):
        batch: list[tuple[Path, torch.Tensor]] = []
        for path in images[start : start + batch_size]:
            try:
                batch.append((path, decode_image(path, keep_uint8=True)))  # the model reads uint8 too
            except (UnidentifiedImageError, OSError, ValueError) as error:
                report.problems.append(f"{path}: cannot read image ({error})")
        for (path, image), result in zip(batch, _run(writer.predictor, batch, report)):
            if result is None:
                continue
            processed += 1
            picture_name = _unique_name(path, ".png", taken)
            if writer.draw:
                report.pictures.append(save_png(writer.draw_picture(image, result), writer.out_dir / picture_name))
            image_id = _image_id(path, image_ids, fallback=processed, report=report)
            if image_id is None:
                continue
            size = (image.shape[-2], image.shape[-1])
            detections = writer.coco_results(result, size, image_id=image_id, mask_stem=Path(picture_name).stem)
            for detection in detections:
                detection["file_name"] = str(path)
            results.extend(detections)
    return results


def _run(predictor: Predictor, batch: list[tuple[Path, torch.Tensor]], report: PredictionReport) -> list:
    """Results of a batch; when the batch fails, image by image, naming (and skipping) the failing ones."""
    if not batch:
        return []
    try:
        return predictor.predict_tensors([image for _, image in batch])
    except (RuntimeError, ValueError) as error:
        if len(batch) == 1:
            path, image = batch[0]
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            report.problems.append(f"{path}: the model failed on this {image.shape[-2]} x {image.shape[-1]} image ({first_line})")
            return [None]
        return [result for item in batch for result in _run(predictor, [item], report)]


def _image_id(path: Path, image_ids: Mapping[str, int] | None, *, fallback: int, report: PredictionReport) -> int | None:
    if image_ids is None:
        return fallback
    image_id = match_image_id(path, image_ids)
    if image_id is None:
        report.problems.append(f"{path}: not an image of the annotation file (no file_name matches it); left out of the results")
    return image_id


def image_ids_from_coco(coco: Mapping) -> dict[str, int]:
    """A COCO dict's `file_name -> id` (file names as written, e.g. "val/0001.png")."""
    return {str(image["file_name"]): int(image["id"]) for image in coco.get("images", [])}


def match_image_id(path: Path, image_ids: Mapping[str, int]) -> int | None:
    """The id of the longest `file_name` that `path` ends with (as whole path components)."""
    parts = Path(path).resolve().parts
    best: tuple[int, int] | None = None
    for file_name, image_id in image_ids.items():
        name_parts = Path(file_name).parts
        if name_parts and tuple(parts[-len(name_parts):]) == name_parts and (best is None or len(name_parts) > best[0]):
            best = (len(name_parts), image_id)
    return None if best is None else best[1]


def _predict_video(writer: _Writer, path: Path, report: PredictionReport, taken: set[str]) -> None:
    """Frames through the predictor in batches; an annotated video and one JSON with an entry per frame."""
    import av

    from maskrcnn.engine.video import VideoReader, VideoWriter

    try:
        reader = VideoReader(path)
    except (OSError, ValueError) as error:
        report.problems.append(f"{path}: cannot read video ({error})")
        return
    stem = Path(_unique_name(path, ".mp4", taken)).stem
    video_out = VideoWriter(writer.out_dir / f"{stem}.mp4", fps=reader.fps) if writer.draw else None
    frames: list[dict] = []
    with reader:
        try:
            for batch in reader.batches(writer.predictor.batch_size):  # [(index, time, float [3, H, W])]
                for (index, time, image), result in zip(batch, writer.predictor.predict_tensors([b[2] for b in batch])):
                    if video_out is not None:
                        video_out.write(writer.draw_picture(image, result))
                    detections = writer.coco_results(result, (image.shape[-2], image.shape[-1]), image_id=index,
                                                     mask_stem=f"{stem}_frame{index}")
                    frames.append({"frame": index, "time": round(time, 6), "detections": detections})
        except (av.FFmpegError, OSError, ValueError) as error:  # a damaged stream
            report.problems.append(f"{path}: stopped after {len(frames)} frame(s): {error}")
    if video_out is not None:
        report.videos.append(video_out.close())
    summary = {"video": str(path), "fps": reader.fps, "width": reader.width, "height": reader.height, "frames": frames}
    results_path = writer.out_dir / f"{stem}.json"
    results_path.write_text(json.dumps(summary))
    report.video_results.append(results_path)
