"""CocoDataset: a COCO instances / person-keypoints file + image folder -> (image, target) items.

Items follow docs/design.md: image float32 [3, H, W] in 0-1 at the original size (after the EXIF
policy), target with boxes, labels, masks (InstanceMasks, compact), keypoints, crowd_boxes,
point_coords / point_labels, has_mask, image_id. The file is read and checked by
`data/coco_parse.py`, whose docstring lists every rule (what is repaired, what is skipped, the
EXIF policy); problems are kept in `dataset.problems` and summarised in one warning.

Keypoints: COCO stores integer pixel indices; we add 0.5 (the pixel centre in continuous
coordinates, docs/design.md) and results subtract it again.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from pycocotools.coco import COCO

from maskrcnn.data.coco_parse import (
    CocoFormatError,
    ImageRecord,
    Problem,
    flip_map_from_names,
    flip_map_problem,
    load_json,
    parse_coco,
    read_image_header,
    unpaired_sided_names,
)
from maskrcnn.data.masks import InstanceMasks

__all__ = ["CocoDataset", "CocoFormatError", "Problem", "decode_image", "image_to_tensor", "read_image_header"]


def decode_image(path: Path, *, apply_exif: bool = True, keep_uint8: bool = False) -> torch.Tensor:
    """float32 [3, H, W] in 0-1 from grayscale, RGB, RGBA (alpha dropped), palette, CMYK, 16-bit.

    keep_uint8: 8-bit images come back as uint8 [3, H, W] (a quarter of the memory; the model
    reads them as pixel / 255, the same numbers); 16-bit and float images stay float32.
    """
    with Image.open(path) as image:
        return image_to_tensor(image, apply_exif=apply_exif, keep_uint8=keep_uint8)


def image_to_tensor(image: Image.Image, *, apply_exif: bool = True, keep_uint8: bool = False) -> torch.Tensor:
    """A PIL image in any mode -> float32 [3, H, W] in 0-1 (decode_image's conversion)."""
    if apply_exif:
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: keep the precision
        grey = np.asarray(image, dtype=np.float32) / 65535.0
        return torch.from_numpy(np.clip(grey, 0, 1))[None].expand(3, -1, -1).contiguous()
    if image.mode == "F":
        grey = np.clip(np.asarray(image, dtype=np.float32), 0, 1)
        return torch.from_numpy(grey)[None].expand(3, -1, -1).contiguous()
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    # uint8 [3, H, W], a view of the [H, W, 3] array; the float copy keeps its strides
    pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    return pixels if keep_uint8 else pixels.float().div_(255.0)


class CocoDataset(torch.utils.data.Dataset):
    """COCO file + image folder -> (image float32 [3, H, W] in 0-1, target dict) per docs/design.md.

    Args:
        annotations: path of a COCO JSON file, or the loaded dict.
        images: folder that `file_name` is relative to.
        keep_empty_images: keep images without (non-crowd) annotations, as negatives.
        transforms: optional `f(image, target, generator) -> (image, target)`; the generator is
            seeded per item by the loader, so augmentation is a function of (seed, epoch, index).
        horizontal_flip, color_jitter: build the standard training augmentation (data/transforms.py)
            with this data set's flip map, when `transforms` is not given.
        keypoint_flip_map: [[left, right], ...] overriding the one found in the categories.
        check_images: "header" (open every image's header: existence, size, EXIF), "full" (also
            decode every image: finds truncated files), "exists" (only that the file exists), or "none".
        bad_images: an item whose image cannot be decoded: "fail" (raise, naming the image) or
            "skip" (warn, counting, and give the next readable item instead; for training).
        dense_masks: targets carry uint8 [N, H, W] tensors instead of InstanceMasks.
        warn: emit one warning summarising the problems found.
    """

    def __init__(self, annotations: str | Path | dict, images: str | Path, *, keep_empty_images: bool = True,
                 transforms: Callable | None = None, horizontal_flip: float = 0.0, color_jitter: float = 0.0,
                 keypoint_flip_map: list[list[int]] | None = None, check_images: str = "header",
                 dense_masks: bool = False, warn: bool = True, bad_images: str = "fail") -> None:
        if check_images not in ("header", "full", "exists", "none"):
            raise ValueError(f"check_images must be 'header', 'full', 'exists' or 'none', got {check_images!r}")
        if bad_images not in ("fail", "skip"):
            raise ValueError(f"bad_images must be 'fail' or 'skip', got {bad_images!r}")
        self.bad_images, self.skipped_images = bad_images, set()  # indices that failed to decode
        self.source = "annotations" if isinstance(annotations, dict) else str(annotations)
        self.image_dir = Path(images)
        data = load_json(annotations)
        if check_images != "none" and not self.image_dir.is_dir():
            raise CocoFormatError(f"image folder {self.image_dir} does not exist")
        parsed = parse_coco(data, self.image_dir, check_images=check_images)
        self.problems: list[Problem] = parsed.problems
        self.categories: list[dict] = parsed.categories  # sorted by id; label = position + 1
        self.category_names = [c.get("name", str(c["id"])) for c in self.categories]
        self.label_to_category_id = {i + 1: c["id"] for i, c in enumerate(self.categories)}
        self.category_id_to_label = {c: label for label, c in self.label_to_category_id.items()}
        self.keypoint_names: list[str] = parsed.keypoint_names
        self.keypoint_sigmas: list[float] | None = parsed.keypoint_sigmas
        self.keypoint_flip_map = (
            [list(pair) for pair in keypoint_flip_map] if keypoint_flip_map is not None
            else parsed.keypoint_flip_map if parsed.keypoint_flip_map is not None
            else flip_map_from_names(self.keypoint_names))
        self._check_flip_map(explicit=keypoint_flip_map is not None, flipping=horizontal_flip > 0 and transforms is None)
        self.has_masks = parsed.has_masks
        self.has_points = parsed.has_points
        self.all_records = parsed.records
        self.num_file_images = len(data["images"])
        self.records = [r for r in parsed.records if keep_empty_images or len(r.labels) > 0]
        self.dense_masks = dense_masks
        self._clean_dataset = parsed.clean_dataset
        self._coco: COCO | None = None
        if transforms is None and (horizontal_flip > 0 or color_jitter > 0):
            from maskrcnn.data.transforms import TrainAugmentation

            transforms = TrainAugmentation(horizontal_flip=horizontal_flip, color_jitter=color_jitter,
                                           keypoint_flip_map=self.keypoint_flip_map)
        self.transforms = transforms
        if warn and self.problems:
            errors = sum(p.severity == "error" for p in self.problems)
            warnings.warn(f"{self.source}: {len(self.problems)} annotation problems ({errors} skipped, "
                          f"{len(self.problems) - errors} repaired), e.g. {self.problems[0]}; see "
                          f"dataset.problems or run `maskrcnn check-data`", stacklevel=2)

    def _check_flip_map(self, *, explicit: bool, flipping: bool) -> None:
        """A flip map that is no permutation or out of range is refused when images will be flipped
        (it would corrupt every flipped image's keypoints); sided names left out are a warning."""
        if not self.keypoint_names:
            return
        problem = flip_map_problem(self.keypoint_flip_map, len(self.keypoint_names))
        if problem and (explicit or flipping):
            where = "keypoint_flip_map (data.keypoint_flip_map)" if explicit else f"{self.source}: keypoint_flip_map"
            raise CocoFormatError(f"{where} {self.keypoint_flip_map}: {problem}; flipped images would get wrong "
                                  f"keypoints (keypoints {self.keypoint_names})")
        unpaired = [] if problem else unpaired_sided_names(self.keypoint_names, self.keypoint_flip_map)
        if unpaired:
            self.problems.append(Problem("warning", None, None, "keypoint_flip_map",
                                         f"keypoints {unpaired} read as left/right but no flip pair swaps them "
                                         f"(flip map {self.keypoint_flip_map}): a horizontal flip mirrors the image "
                                         "and leaves them on the wrong side; give the category a keypoint_flip_map "
                                         "or set data.keypoint_flip_map"))
            if flipping:
                warnings.warn(f"{self.source}: {self.problems[-1].message}", stacklevel=3)

    # ------------------------------------------------------------------ items
    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict]:
        """key: an index, or (index, augmentation seed) as the training loader passes it."""
        index, seed = (key, int(key)) if not isinstance(key, (tuple, list)) else (int(key[0]), int(key[1]))
        record = self.records[index]
        try:
            image = self.load_image(record)
        except RuntimeError as error:
            if self.bad_images == "fail":
                raise
            return self._instead_of(index, seed, error)
        target = self.target(record)
        if self.transforms is not None:
            generator = torch.Generator().manual_seed(seed)
            image, target = self.transforms(image, target, generator)
        return image, target

    def _instead_of(self, index: int, seed: int, error: RuntimeError) -> tuple[torch.Tensor, dict]:
        """bad_images="skip": the next readable item, with a warning that counts the images skipped."""
        self.skipped_images.add(index)
        warnings.warn(f"{error}; skipped (data.bad_images=skip): {len(self.skipped_images)} image(s) skipped so far "
                      f"in this process; `maskrcnn check-data --full` finds them all", stacklevel=3)
        following = [i % len(self) for i in range(index + 1, index + len(self)) if i % len(self) not in self.skipped_images]
        if not following:
            raise RuntimeError(f"{self.source}: no image could be decoded ({len(self.skipped_images)} skipped)")
        return self[(following[0], seed)]

    def load_image(self, record: ImageRecord) -> torch.Tensor:
        path = self.image_dir / record.file_name
        try:
            image = decode_image(path, apply_exif=record.apply_exif)
        except (OSError, ValueError) as error:
            raise RuntimeError(f"image {record.image_id} ({path}): cannot be read: {error}") from None
        if tuple(image.shape[1:]) != (record.height, record.width):
            raise RuntimeError(f"image {record.image_id} ({path}): decoded size {tuple(image.shape[1:])} differs "
                               f"from the annotation file's height/width {(record.height, record.width)}")
        return image

    def target(self, record: ImageRecord) -> dict:
        target: dict[str, Any] = {
            "boxes": torch.from_numpy(record.boxes),
            "labels": torch.from_numpy(record.labels),
            "crowd_boxes": torch.from_numpy(record.crowd_boxes),
            "image_id": record.image_id,
        }
        if self.has_masks:
            masks = record.masks if record.masks is not None else InstanceMasks([], image_size=(record.height, record.width))
            target["masks"] = masks.to_tensor() if self.dense_masks else masks
            if not record.has_mask.all():
                target["has_mask"] = torch.from_numpy(record.has_mask)
        if record.keypoints is not None:
            target["keypoints"] = torch.from_numpy(record.keypoints)
        if self.has_points:
            target["point_coords"] = torch.from_numpy(record.point_coords)
            target["point_labels"] = torch.from_numpy(record.point_labels)
        return target

    # ------------------------------------------------------------------ metadata
    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        """(height, width) per item, from the JSON (after the EXIF policy): for aspect-ratio grouping."""
        return [(r.height, r.width) for r in self.records]

    @property
    def image_ids(self) -> list[int]:
        return [r.image_id for r in self.records]

    @property
    def coco(self) -> COCO:
        """pycocotools COCO of the kept images and annotations (repaired boxes), for evaluation."""
        if self._coco is None:
            coco = COCO()
            coco.dataset = self._clean_dataset
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                coco.createIndex()
            self._coco = coco
        return self._coco

    def summary(self) -> dict[str, Any]:
        per_class = np.bincount(np.concatenate([r.labels for r in self.all_records] + [np.zeros(0, np.int64)]),
                                minlength=len(self.categories) + 1)[1:]
        keypoints = [r.keypoints for r in self.all_records if r.keypoints is not None and len(r.keypoints)]
        labelled = np.concatenate(keypoints)[..., 2] > 0 if keypoints else np.zeros((0, 0), bool)
        return {
            "images_in_file": self.num_file_images, "images": len(self.all_records), "images_used": len(self.records),
            "empty_images": sum(len(r.labels) == 0 for r in self.all_records),
            "annotations": int(per_class.sum()),
            "per_class": {name: int(n) for name, n in zip(self.category_names, per_class)},
            "crowd": sum(len(r.crowd_boxes) for r in self.all_records),
            "without_mask": sum(int((~r.has_mask).sum()) for r in self.all_records) if self.has_masks else 0,
            "keypoint_instances": int(labelled.any(axis=1).sum()) if labelled.size else 0,
            "labelled_keypoints": int(labelled.sum()),
            "errors": sum(p.severity == "error" for p in self.problems),
            "warnings": sum(p.severity == "warning" for p in self.problems),
        }
