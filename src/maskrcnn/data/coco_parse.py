"""Reading and checking a COCO instances / person-keypoints file (used by CocoDataset and check-data).

Reading is forgiving per annotation and strict per file (CocoFormatError). The rules that
`parse_coco` applies, each problem reported with its image id and annotation id:

  image entry without id / file_name, duplicate id      -> image skipped (error)
  image file missing or header unreadable                -> image skipped (error)
  pixels that do not decode (check_images="full")        -> image skipped (error)
  height / width missing (check_images="header")         -> taken from the file (repaired)
  decoded size differs from the JSON's width/height      -> see EXIF policy; else skipped (error)
  annotation without id, unknown image or category id    -> annotation skipped (error)
  bbox missing / not 4 finite numbers                    -> taken from the segmentation if there
                                                            is one (repaired), else skipped (error)
  bbox of zero area, or nothing left inside the image    -> annotation skipped (error)
  bbox partly outside the image                          -> clipped to the image (repaired); the
                                                            message asks whether the file writes
                                                            x1,y1,x2,y2 when those would fit
  bbox that disagrees with its segmentation as x,y,w,h
    but matches it as x1,y1,x2,y2 corners                -> read as corners (repaired)
  polygon part with < 3 points / odd length / NaN        -> part dropped (repaired)
  no usable segmentation left (empty, all parts dropped,
    RLE of the wrong size) in a data set with masks      -> kept as a box, has_mask False (repaired)
  keypoints of the wrong length or bad visibility flags  -> all keypoints unlabelled, v=0 (repaired)
  labelled keypoints outside the image                   -> those unlabelled, v=0 (repaired)
  keypoint_flip_map not a permutation / out of range     -> reported (error); CocoDataset refuses
                                                            to flip images with it
  point_coords / point_labels of mismatched lengths      -> points dropped (repaired)
  iscrowd: 1                                             -> target["crowd_boxes"], counted
  iscrowd neither 0 nor 1 (as number, bool or string)    -> annotation skipped (error)
  numbers written as strings ("iscrowd": "0", "area":
    "12", bbox, ids, height / width)                     -> read as numbers (repaired)
  area not a number >= 0                                 -> computed from the mask (repaired)
  num_keypoints differing from the labelled keypoints    -> corrected (repaired)
  annotation id repeated, 0, negative or not an integer  -> renumbered in the evaluation copy
                                                            (pycocotools indexes by id) (repaired)

EXIF policy: pixels are turned upright by their EXIF orientation (as a camera viewer shows
them, as detectron2 reads them), and the JSON's width/height must then match. If instead the
JSON matches the raw, un-rotated pixels, the annotations were drawn on those: that image is
read without applying the orientation (repaired, reported), so pixels and annotations agree.

Keypoints: COCO stores integer pixel indices; we add 0.5 (the pixel centre in continuous
coordinates, docs/design.md) and results subtract it again.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from maskrcnn.data.masks import InstanceMasks, compress_rle

_EXIF_ORIENTATION = 0x0112
_ROTATING_ORIENTATIONS = (5, 6, 7, 8)  # these swap width and height


class CocoFormatError(ValueError):
    """The annotation file cannot be used at all (missing, not JSON, no images/categories)."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong in the file. `severity` is "error" when data was skipped, "warning" when repaired."""

    severity: str
    image_id: Any
    annotation_id: Any
    field: str
    message: str

    def __str__(self) -> str:
        return (f"{self.severity}: image {self.image_id} annotation {self.annotation_id} "
                f"[{self.field}]: {self.message}")


@dataclass
class ImageRecord:
    """Everything an item needs, parsed once; arrays per instance so __getitem__ has no loops."""

    image_id: int
    file_name: str
    height: int
    width: int
    apply_exif: bool = True
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # [N,4] x1y1x2y2
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [N] 1..K
    masks: InstanceMasks | None = None  # N compact masks, built once here (immutable, shared by items)
    has_mask: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # [N]
    keypoints: np.ndarray | None = None  # [N, K, 3] continuous x, y, v
    point_coords: np.ndarray | None = None  # [N, P, 2]
    point_labels: np.ndarray | None = None  # [N, P], -1 = padding
    crowd_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # [M, 4]
    annotation_ids: list = field(default_factory=list)  # [N] the file's ids, for messages


def load_json(annotations: str | Path | dict) -> dict:
    """The file as a dict, or CocoFormatError with a message a user can act on."""
    if isinstance(annotations, dict):
        data = annotations
        source = "annotations"
    else:
        path = Path(annotations)
        if not path.is_file():
            raise CocoFormatError(f"annotation file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except UnicodeDecodeError as error:
            raise CocoFormatError(f"{path} is not a text (JSON) file: {error}") from None
        except json.JSONDecodeError as error:
            raise CocoFormatError(f"{path} is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
        source = str(path)
    if not isinstance(data, dict):
        raise CocoFormatError(f"{source}: expected a JSON object with 'images' and 'categories', got {type(data).__name__}")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise CocoFormatError(f"{source}: missing or malformed '{key}' list (is this a COCO instances file?)")
    if not isinstance(data.get("annotations", []), list):
        raise CocoFormatError(f"{source}: 'annotations' must be a list")
    if not data["categories"]:
        raise CocoFormatError(f"{source}: 'categories' is empty")
    for index, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or not isinstance(category.get("id"), int):
            raise CocoFormatError(f"{source}: categories[{index}] has no integer 'id': {category!r}")
    ids = [c["id"] for c in data["categories"]]
    if len(set(ids)) != len(ids):
        raise CocoFormatError(f"{source}: duplicate category ids {sorted({i for i in ids if ids.count(i) > 1})}")
    return data


def flip_map_from_names(names: list[str]) -> list[list[int]]:
    """[[i, j], ...] pairing left*/right* keypoint names (COCO's left_eye/right_eye, our left/right)."""
    pairs = []
    for i, name in enumerate(names):
        if "left" in name and name.replace("left", "right") in names:
            pairs.append([i, names.index(name.replace("left", "right"))])
    return pairs


def flip_map_problem(flip_map: Any, num_keypoints: int) -> str | None:
    """What is wrong with a keypoint flip map ([[left, right], ...] indices), or None.

    Each index may appear in one pair only (the map is a permutation made of swaps); a map
    that names a keypoint twice would move the wrong values into it on every flipped image.
    """
    if not isinstance(flip_map, (list, tuple)):
        return f"expected a list of [left, right] index pairs, got {flip_map!r}"
    seen: dict[int, list] = {}
    for pair in flip_map:
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair)):
            return f"entry {pair!r} is not a pair of keypoint indices"
        for index in pair:
            if not 0 <= index < num_keypoints:
                return f"pair {list(pair)} is out of range for {num_keypoints} keypoints (indices 0..{num_keypoints - 1})"
            if index in seen and seen[index] is not pair:
                return f"keypoint {index} is in two pairs, {list(seen[index])} and {list(pair)}: not a permutation"
            seen[index] = pair
    return None


def unpaired_sided_names(names: list[str], flip_map: list[list[int]] | None) -> list[str]:
    """Keypoint names that read as left or right (left_eye, L_eye, eye_r) but are in no flip pair."""
    paired = {index for pair in flip_map or [] for index in pair}
    sided = re.compile(r"left|right|(^|[_\-. ])[lr]([_\-. ]|$)", re.IGNORECASE)
    return [name for i, name in enumerate(names) if i not in paired and sided.search(name)]


def read_image_header(path: Path) -> tuple[tuple[int, int], int]:
    """((height, width) of the raw pixels, EXIF orientation 1..8) without decoding the pixels."""
    with Image.open(path) as image:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        return (image.height, image.width), int(orientation) if orientation in range(1, 9) else 1


@dataclass
class ParsedCoco:
    records: list[ImageRecord]
    problems: list[Problem]
    categories: list[dict]
    keypoint_names: list[str]
    keypoint_sigmas: list[float] | None
    keypoint_flip_map: list[list[int]] | None
    has_masks: bool
    has_points: bool
    clean_dataset: dict  # kept images and annotations, repaired boxes: what evaluation reads


def _clean_segmentation(segmentation: Any, height: int, width: int) -> tuple[Any, list[str]]:
    """(usable segmentation or [], notes on what was dropped) following the module's rules."""
    if segmentation is None or (isinstance(segmentation, (list, dict)) and len(segmentation) == 0):
        return [], []
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if list(size or []) != [height, width]:
            return [], [f"RLE size {size} differs from the image size [{height}, {width}]: mask dropped"]
        if isinstance(counts, list) and sum(counts) != height * width:
            return [], [f"uncompressed RLE counts sum to {sum(counts)}, expected {height * width}: mask dropped"]
        if not isinstance(counts, (list, str, bytes)):
            return [], [f"RLE counts of type {type(counts).__name__}: mask dropped"]
        return segmentation, []
    if not isinstance(segmentation, list):
        return [], [f"segmentation of type {type(segmentation).__name__}: mask dropped"]
    if all(isinstance(v, (int, float)) for v in segmentation):  # a flat polygon without its list
        segmentation = [segmentation]
    parts, notes = [], []
    for i, part in enumerate(segmentation):
        if not isinstance(part, list) or not all(isinstance(v, (int, float)) for v in part):
            notes.append(f"polygon part {i} is not a list of numbers: part dropped")
        elif len(part) % 2 or len(part) < 6:
            notes.append(f"polygon part {i} has {len(part) / 2:g} points (< 3 or odd length): part dropped")
        elif not all(math.isfinite(v) for v in part):
            notes.append(f"polygon part {i} has non-finite coordinates: part dropped")
        else:
            parts.append([float(v) for v in part])
    return parts, notes


def _segmentation_rle(segmentation: Any, height: int, width: int) -> dict:
    """One compressed RLE of a cleaned segmentation (polygon parts merged)."""
    if isinstance(segmentation, dict):
        return compress_rle(segmentation, height, width)
    return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))


def _keypoints(values: Any, count: int) -> tuple[np.ndarray, str | None]:
    """[K, 3] x, y, v as COCO stores them (pixel indices; the +0.5 is applied per image)."""
    empty = np.zeros((count, 3), np.float32)
    if values is None:
        return empty, None
    # plain Python checks: this runs once per annotation, and numpy calls on 51 numbers cost more
    if not isinstance(values, list) or len(values) != 3 * count or not all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        got = f"{len(values)} values" if isinstance(values, list) else type(values).__name__
        return empty, f"expected {3 * count} numbers ({count} keypoints x 3), got {got}: all keypoints unlabelled"
    flags = values[2::3]
    if any(flag not in (0, 1, 2) for flag in flags):
        return empty, f"visibility flags {flags} not in 0/1/2: all keypoints unlabelled"
    return np.array(values, dtype=np.float32).reshape(count, 3), None


@dataclass
class _Report:
    """Records problems for one image entry or one annotation, in the module's message form."""

    problems: list[Problem]
    image_id: Any
    annotation_id: Any = None

    def skip(self, field_name: str, message: str) -> None:
        what = "image" if self.annotation_id is None else "annotation"
        self.problems.append(Problem("error", self.image_id, self.annotation_id, field_name,
                                     f"{message}; {what} skipped"))

    def repair(self, field_name: str, message: str) -> None:
        self.problems.append(Problem("warning", self.image_id, self.annotation_id, field_name, message))


@dataclass
class _Images:
    """The kept image entries of a file: records by id, the ids skipped, the entries for evaluation."""

    records: dict[int, ImageRecord]
    skipped: set
    clean: list[dict]


@dataclass
class _Annotation:
    """One kept annotation: what its image's arrays need, and its repaired entry for evaluation."""

    image_id: int
    annotation_id: Any
    index: int  # position in the file's annotations list, for messages
    box: tuple[float, float, float, float]  # x1y1x2y2, clipped to the image
    label: int
    segmentation: Any  # cleaned polygon parts or RLE; [] when there is no usable mask
    crowd: bool
    clean: dict
    keypoints: np.ndarray | None = None  # [K, 3] COCO pixel indices
    point_coords: np.ndarray | None = None  # [P, 2]
    point_labels: np.ndarray | None = None  # [P]


@dataclass(frozen=True)
class _Schema:
    """What every annotation is read against."""

    category_to_label: dict[int, int]
    num_keypoints: int
    has_masks: bool
    has_points: bool


def parse_coco(data: dict, image_dir: Path, *, check_images: str) -> ParsedCoco:
    """Applies the module's rules to a loaded COCO dict (see the module docstring)."""
    problems: list[Problem] = []
    categories = sorted(data["categories"], key=lambda c: c["id"])
    keypoint_names, sigmas, flip_map = _keypoint_schema(categories, problems)
    images = _read_images(data["images"], image_dir, check_images=check_images, problems=problems)
    annotations = data.get("annotations", [])
    usable = [a for a in annotations if isinstance(a, dict) and _crowd_flag(a.get("iscrowd")) is False]
    schema = _Schema({c["id"]: i + 1 for i, c in enumerate(categories)}, len(keypoint_names),
                     # no object at all (negatives only) contradicts no head: empty masks then
                     has_masks=any(a.get("segmentation") for a in usable) or not usable,
                     has_points=any("point_coords" in a for a in usable))
    instances: dict[int, list[_Annotation]] = {image_id: [] for image_id in images.records}
    crowds: dict[int, list] = {image_id: [] for image_id in images.records}
    kept = [read for index, ann in enumerate(annotations)
            if (read := _read_annotation(ann, index, images=images, schema=schema, problems=problems)) is not None]
    for read in kept:
        if read.crowd:
            crowds[read.image_id].append(read.box)
        else:
            instances[read.image_id].append(read)
    _renumber_for_evaluation(kept, problems)
    clean_annotations = [read.clean for read in kept]
    for image_id, record in images.records.items():
        _fill_record(record, instances[image_id], crowds[image_id], schema=schema)
    clean_dataset = {key: value for key, value in data.items() if key not in ("images", "annotations")}
    clean_dataset.update(images=images.clean, annotations=clean_annotations)
    return ParsedCoco(list(images.records.values()), problems, categories, keypoint_names, sigmas, flip_map,
                      schema.has_masks, schema.has_points, clean_dataset)


def _renumber_for_evaluation(kept: list[_Annotation], problems: list[Problem]) -> None:
    """Gives the evaluation copy of every annotation a unique positive integer id.

    pycocotools indexes ground truth by id (a duplicate replaces the first) and marks a match
    with the matched id, so that id 0 reads as "unmatched": either scores a perfect prediction
    below 1.0. Files merged from two sources repeat ids; the training arrays do not need them.
    """
    def usable(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    next_id = max((read.annotation_id for read in kept if usable(read.annotation_id)), default=0) + 1
    first_index: dict[int, int] = {}
    for read in kept:
        value = read.annotation_id
        if usable(value) and value not in first_index:
            first_index[value] = read.index
            continue
        reason = (f"duplicate annotation id (annotations[{first_index[value]}] has it too)" if usable(value)
                  else f"{value!r} is not a positive integer, which pycocotools needs")
        problems.append(Problem("warning", read.image_id, value, "id",
                                f"{reason}: renumbered to {next_id} for evaluation (annotations[{read.index}])"))
        read.clean["id"] = next_id
        next_id += 1


def _keypoint_schema(categories: list[dict], problems: list[Problem]
                     ) -> tuple[list[str], list[float] | None, list[list[int]] | None]:
    """(keypoint names, sigmas, flip map) of the first category that has keypoints."""
    keypoint_category = next((c for c in categories if c.get("keypoints")), None) or {}
    names = [str(n) for n in keypoint_category.get("keypoints", [])]
    sigmas, flip_map = keypoint_category.get("keypoint_sigmas"), keypoint_category.get("keypoint_flip_map")
    if sigmas is not None and len(sigmas) != len(names):
        problems.append(Problem("warning", None, None, "keypoint_sigmas",
                                f"{len(sigmas)} values for {len(names)} keypoints: ignored"))
        sigmas = None
    problem = flip_map_problem(flip_map, len(names)) if flip_map is not None else None
    if problem:  # kept as written: CocoDataset refuses to flip with it
        problems.append(Problem("error", None, None, "keypoint_flip_map",
                                f"{problem}; flipped images would get wrong keypoints"))
        return names, [float(s) for s in sigmas] if sigmas is not None else None, flip_map
    return (names, [float(s) for s in sigmas] if sigmas is not None else None,
            [list(p) for p in flip_map] if flip_map is not None else None)


def _read_images(entries: list, image_dir: Path, *, check_images: str, problems: list[Problem]) -> _Images:
    """The image entries that can be used; duplicates and unreadable ones are reported and skipped."""
    images = _Images({}, set(), [])
    for index, entry in enumerate(entries):
        image_id = entry.get("id") if isinstance(entry, dict) else None
        report = _Report(problems, image_id if image_id is not None else f"images[{index}]")
        if not isinstance(image_id, int):
            report.skip("id", f"missing or not an integer: {image_id!r}")
            images.skipped.add(image_id)
            continue
        if image_id in images.records or image_id in images.skipped:
            problems.append(Problem("error", image_id, None, "id",
                                    f"duplicate image id (images[{index}]); second entry skipped"))
            continue
        record = _read_image(entry, image_dir, check_images=check_images, report=report)
        if record is None:
            images.skipped.add(image_id)
            continue
        images.records[image_id] = record
        images.clean.append({**entry, "height": record.height, "width": record.width})
    return images


def _read_image(entry: dict, image_dir: Path, *, check_images: str, report: _Report) -> ImageRecord | None:
    """The record of one image entry with a valid id, or None (reported) when it must be skipped."""
    file_name = entry.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        report.skip("file_name", f"missing: {file_name!r}")
        return None
    height, width = entry.get("height"), entry.get("width")
    size = (height, width) if all(isinstance(v, int) and v > 0 for v in (height, width)) else None
    numbers = [_number(v) if isinstance(v, str) else None for v in (height, width)]
    if size is None and all(n is not None and n == int(n) and n > 0 for n in numbers):
        size = (int(numbers[0]), int(numbers[1]))
        report.repair("height/width", f"({height!r}, {width!r}) are strings: read as {size}")
    apply_exif = True
    path = image_dir / file_name
    if check_images != "none" and not path.is_file():
        report.skip("file_name", f"file {path} does not exist")
        return None
    if check_images in ("header", "full"):
        checked = _check_header(path, size, (height, width), report, full=check_images == "full")
        if checked is None:
            return None
        size, apply_exif = checked
    if size is None:
        report.skip("height/width", f"missing or invalid: ({height!r}, {width!r})")
        return None
    return ImageRecord(entry["id"], file_name, int(size[0]), int(size[1]), apply_exif)


def _check_header(path: Path, size: tuple[int, int] | None, given: tuple, report: _Report, *, full: bool
                  ) -> tuple[tuple[int, int], bool] | None:
    """((height, width), apply_exif) agreed between the JSON and the file's header, or None (reported)."""
    try:
        raw, orientation = read_image_header(path)
    except Exception as error:  # PIL raises several types for corrupt files
        report.skip("file_name", f"file {path} cannot be read: {error}")
        return None
    if full:
        try:
            with Image.open(path) as image:
                image.load()  # a truncated or damaged file fails here, not in the header
        except Exception as error:
            report.skip("file_name", f"file {path} cannot be decoded: {error}")
            return None
    upright = raw[::-1] if orientation in _ROTATING_ORIENTATIONS else raw
    if size is None:
        report.repair("height/width", f"missing or invalid ({given[0]!r}, {given[1]!r}): taken from the file {upright}")
        return upright, True
    if size != upright and size == raw:
        report.repair("height/width", f"{size} matches the raw pixels, not the EXIF orientation {orientation} "
                                      f"({upright}): orientation not applied")
        return size, False
    if size != upright:
        report.skip("height/width", f"{size} differs from the file's size {upright} (EXIF orientation {orientation} applied)")
        return None
    return size, True


def _read_annotation(ann: Any, index: int, *, images: _Images, schema: _Schema,
                     problems: list[Problem]) -> _Annotation | None:
    """One annotation read by the module's rules, or None when it is skipped (reported)."""
    ann_id = ann.get("id", f"annotations[{index}]") if isinstance(ann, dict) else f"annotations[{index}]"
    image_id = ann.get("image_id") if isinstance(ann, dict) else None
    report = _Report(problems, image_id, ann_id)
    if isinstance(ann, dict):
        ann = _numbers_repaired(ann, report)
        image_id = ann.get("image_id")
    if not _annotation_refers(ann, images=images, schema=schema, report=report):
        return None
    record = images.records[image_id]
    segmentation, notes = _clean_segmentation(ann.get("segmentation"), record.height, record.width)
    box = _annotation_box(ann.get("bbox"), segmentation, record, report)
    if box is None:
        return None
    for note in notes:
        report.repair("segmentation", note)
    read = _Annotation(image_id, ann["id"], index, box, schema.category_to_label[ann["category_id"]], segmentation,
                       crowd=bool(_crowd_flag(ann.get("iscrowd"))),
                       clean=_clean_entry(ann, box, segmentation, record, report))
    if read.crowd:
        return read
    if schema.has_masks and not segmentation:
        report.repair("segmentation", "no usable mask: kept as a box with has_mask False")
    read.keypoints = _read_keypoints(ann, read.clean, record, schema=schema, report=report)
    read.point_coords, read.point_labels = _points(ann, report)
    return read


def _annotation_refers(ann: Any, *, images: _Images, schema: _Schema, report: _Report) -> bool:
    """Whether the annotation has an id and names a kept image and a known category (else reported)."""
    if not isinstance(ann, dict):
        report.skip("annotation", f"not an object: {ann!r}")
        return False
    if "id" not in ann:
        report.skip("id", "missing")
        return False
    image_id = ann.get("image_id")
    if image_id in images.skipped:
        report.skip("image_id", f"its image {image_id} was skipped")
        return False
    if image_id not in images.records:
        report.skip("image_id", f"unknown image id {image_id!r}")
        return False
    if _crowd_flag(ann.get("iscrowd")) is None:
        report.skip("iscrowd", f"expected 0 or 1, got {ann.get('iscrowd')!r}")
        return False
    if ann.get("category_id") not in schema.category_to_label:
        report.skip("category_id", f"unknown category id {ann.get('category_id')!r}; "
                                   f"known ids: {sorted(schema.category_to_label)}")
        return False
    return True


def _annotation_box(bbox: Any, segmentation: Any, record: ImageRecord, report: _Report
                    ) -> tuple[float, float, float, float] | None:
    """The x1y1x2y2 box clipped to the image (from the segmentation when bbox is unusable), or None."""
    height, width = record.height, record.width
    if isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox):
        x, y, w, h = _as_corners_if_written_so([float(v) for v in bbox], segmentation, record, report)
    elif segmentation:
        x, y, w, h = mask_utils.toBbox(_segmentation_rle(segmentation, height, width)).tolist()
        report.repair("bbox", f"missing or invalid {bbox!r}: taken from the segmentation")
    else:
        report.skip("bbox", f"missing or invalid {bbox!r} and no segmentation to take it from")
        return None
    if w <= 0 or h <= 0:
        report.skip("bbox", f"zero or negative size {bbox!r}")
        return None
    box = (x, y, x + w, y + h)
    clipped = (min(max(x, 0.0), width), min(max(y, 0.0), height), min(x + w, width), min(y + h, height))
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        report.skip("bbox", f"{bbox!r} lies outside the {width}x{height} image")
        return None
    if clipped != box:
        # x1,y1,x2,y2 written where COCO wants x,y,width,height runs past the image but fits as corners
        hint = ("; as x1,y1,x2,y2 it would lie inside the image: does the file write corners instead of "
                "x,y,width,height?" if x < w <= width and y < h <= height else "")
        report.repair("bbox", f"{bbox!r} extends outside the {width}x{height} image: clipped{hint}")
    return clipped


def _as_corners_if_written_so(bbox: list[float], segmentation: Any, record: ImageRecord, report: _Report) -> list[float]:
    """[x, y, w, h]; a bbox that disagrees with its own segmentation as x,y,w,h but agrees with it
    as x1,y1,x2,y2 corners is read as corners (repaired, reported)."""
    x, y, w, h = bbox
    if not segmentation or w <= x or h <= y:
        return bbox
    if isinstance(segmentation, list):  # polygons: their extent, without rasterising
        xs = [v for part in segmentation for v in part[0::2]]
        ys = [v for part in segmentation for v in part[1::2]]
        mask_box = (min(xs), min(ys), max(xs), max(ys))
    else:
        mask_x, mask_y, mask_w, mask_h = mask_utils.toBbox(_segmentation_rle(segmentation, record.height, record.width)).tolist()
        mask_box = (mask_x, mask_y, mask_x + mask_w, mask_y + mask_h)
    as_size, as_corners = _iou((x, y, x + w, y + h), mask_box), _iou((x, y, w, h), mask_box)
    if as_size >= 0.5 or as_corners < 0.8:
        return bbox
    report.repair("bbox", f"{bbox!r} disagrees with its segmentation as x,y,width,height (IoU {as_size:.2f}) but "
                          f"matches it as x1,y1,x2,y2 corners (IoU {as_corners:.2f}): read as corners")
    return [x, y, w - x, h - y]


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """IoU of two x1y1x2y2 boxes (plain floats: one pair per annotation)."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _read_keypoints(ann: dict, clean: dict, record: ImageRecord, *, schema: _Schema, report: _Report) -> np.ndarray:
    """[K, 3] keypoints of one annotation by the module's rules; `clean` gets the evaluation's copy."""
    keypoints, note = _keypoints(ann.get("keypoints"), schema.num_keypoints)
    if note:
        report.repair("keypoints", note)
        clean["keypoints"] = [0] * (3 * schema.num_keypoints)
    elif schema.num_keypoints:
        labelled = int((keypoints[:, 2] > 0).sum())
        if "num_keypoints" in ann and ann["num_keypoints"] != labelled:
            report.repair("num_keypoints", f"{ann['num_keypoints']!r} differs from the {labelled} labelled keypoints: "
                                           f"set to {labelled}")
        _keypoints_outside(keypoints, record, clean, report)
    if schema.num_keypoints:  # COCOeval reads num_keypoints (0 = ignored) and fails without it
        clean["num_keypoints"] = int((keypoints[:, 2] > 0).sum())
    return keypoints


def _keypoints_outside(keypoints: np.ndarray, record: ImageRecord, clean: dict, report: _Report) -> None:
    """Marks labelled keypoints [K, 3] outside the image unlabelled, in place and in the evaluation
    copy `clean` (reported)."""
    x, y, v = keypoints[:, 0], keypoints[:, 1], keypoints[:, 2]
    outside = (v > 0) & ((x < 0) | (y < 0) | (x > record.width) | (y > record.height))
    if not outside.any():
        return
    where = ", ".join(f"{i} at ({x[i]:g}, {y[i]:g})" for i in np.flatnonzero(outside)[:5])
    report.repair("keypoints", f"{int(outside.sum())} labelled keypoint(s) lie outside the {record.width}x"
                               f"{record.height} image ({where}): marked unlabelled")
    keypoints[outside] = 0
    values = list(clean.get("keypoints") or [])
    for i in np.flatnonzero(outside):
        values[3 * i:3 * i + 3] = [0, 0, 0]
    clean["keypoints"] = values


def _clean_entry(ann: dict, box: tuple[float, float, float, float], segmentation: Any, record: ImageRecord,
                 report: _Report) -> dict:
    """The annotation as evaluation reads it: the repaired box, a mask for every ground truth, an area."""
    x1, y1, x2, y2 = box
    clean = {**ann, "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
             "iscrowd": int(bool(_crowd_flag(ann.get("iscrowd"))))}
    # evaluation needs a mask for every ground truth: the box stands in for a missing one
    clean["segmentation"] = segmentation or [[x1, y1, x2, y1, x2, y2, x1, y2]]
    area = _number(ann.get("area"))
    if area is None or area < 0:  # COCOeval's small / medium / large ranges read it: the mask's area, as COCO's
        rle = _segmentation_rle(segmentation, record.height, record.width) if segmentation else None
        clean["area"] = float(mask_utils.area(rle)) if rle else float((x2 - x1) * (y2 - y1))
        if "area" in ann:
            report.repair("area", f"{ann['area']!r} is not a number >= 0: computed from the mask ({clean['area']:g})")
    elif not isinstance(ann["area"], (int, float)):
        report.repair("area", f"{ann['area']!r} is a string: read as {area:g}")
        clean["area"] = area
    return clean


def _number(value: Any) -> float | None:
    """A finite number given as a number or a numeric string ("12.5"); None for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _crowd_flag(value: Any) -> bool | None:
    """iscrowd as a bool (missing = 0); None when it is neither 0 nor 1 (as number, bool or string)."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    number = _number(value)
    return bool(number) if number in (0.0, 1.0) else None


def _numbers_repaired(ann: dict, report: _Report) -> dict:
    """The annotation with numbers that were written as strings ("iscrowd": "0") read as numbers.

    Python's truth of "0" is True: read as written, such a string would turn an object into a
    crowd region. Strings that are no number are left for the checks that follow to report.
    """
    repaired = dict(ann)
    for key in ("image_id", "category_id"):
        number = _number(ann.get(key)) if isinstance(ann.get(key), str) else None
        if number is not None and number == int(number):
            repaired[key] = int(number)
            report.repair(key, f"{ann[key]!r} is a string: read as {int(number)}")
    if isinstance(ann.get("iscrowd"), str) and _crowd_flag(ann["iscrowd"]) is not None:
        repaired["iscrowd"] = int(_crowd_flag(ann["iscrowd"]))
        report.repair("iscrowd", f"{ann['iscrowd']!r} is a string: read as {repaired['iscrowd']}")
    bbox = ann.get("bbox")
    if isinstance(bbox, list) and any(isinstance(v, str) for v in bbox) and all(_number(v) is not None for v in bbox):
        repaired["bbox"] = [_number(v) for v in bbox]
        report.repair("bbox", f"{bbox!r} holds strings: read as numbers {repaired['bbox']}")
    return repaired


def _points(ann: dict, report: _Report) -> tuple[np.ndarray, np.ndarray]:
    """(point_coords [P, 2], point_labels [P]) of a point-supervised annotation; empty when unusable."""
    empty = np.zeros((0, 2), np.float32), np.zeros(0, np.float32)
    if "point_coords" not in ann:
        return empty
    try:
        coords = np.asarray(ann["point_coords"], dtype=np.float32).reshape(-1, 2)
        labels = np.asarray(ann.get("point_labels"), dtype=np.float32).reshape(-1)
        if len(coords) != len(labels) or not np.isfinite(coords).all():
            raise ValueError(f"{len(coords)} coordinates, {len(labels)} labels")
    except (ValueError, TypeError) as error:
        report.repair("point_coords", f"unusable points ({error}): dropped")
        return empty
    return coords, labels


def _fill_record(record: ImageRecord, found: list[_Annotation], crowds: list, *, schema: _Schema) -> None:
    """Sets the record's per-instance arrays from its kept annotations."""
    if crowds:
        record.crowd_boxes = np.array(crowds, np.float32).reshape(-1, 4)
    if schema.num_keypoints:
        record.keypoints = np.zeros((0, schema.num_keypoints, 3), np.float32)
    if schema.has_points:
        record.point_coords, record.point_labels = np.zeros((0, 0, 2), np.float32), np.zeros((0, 0), np.float32)
    if not found:
        return
    record.annotation_ids = [a.annotation_id for a in found]
    record.boxes = np.array([a.box for a in found], np.float32).reshape(-1, 4)
    record.labels = np.array([a.label for a in found], np.int64)
    if schema.has_masks:
        record.masks = InstanceMasks([a.segmentation for a in found], image_size=(record.height, record.width))
    record.has_mask = np.array([bool(a.segmentation) for a in found], bool)
    if schema.num_keypoints:
        record.keypoints = np.stack([a.keypoints for a in found])  # [N, K, 3]
        # COCO pixel index -> continuous pixel centre; unlabelled keypoints (v = 0) sit at 0
        labelled = record.keypoints[..., 2:] > 0
        record.keypoints[..., :2] = np.where(labelled, record.keypoints[..., :2] + 0.5, 0.0)
    if schema.has_points:  # pad to the image's largest count; label -1 marks padding
        most = max(len(a.point_coords) for a in found)
        record.point_coords = np.zeros((len(found), most, 2), np.float32)
        record.point_labels = np.full((len(found), most), -1.0, np.float32)
        for row, a in enumerate(found):
            record.point_coords[row, :len(a.point_coords)] = a.point_coords
            record.point_labels[row, :len(a.point_labels)] = a.point_labels
