"""The synthetic `shapes` data set: PNG images plus COCO JSON, generated from a seed.

Six classes of filled shapes (circle, square, triangle, star, hexagon, cross) with random
colours, sizes, aspect ratios and rotations on textured, noisy backgrounds. Objects may overlap;
annotations describe what is visible:

- masks / boxes / areas are the visible pixels (later objects are drawn on top of earlier ones);
  an object that is not occluded keeps its exact outline as a COCO polygon, an occluded one is
  written as a compressed RLE of its visible pixels;
- a placement that would hide more than `_MIN_VISIBLE_FRACTION` of an earlier object is rejected,
  so every object drawn is annotated (nothing in the image is an unlabelled object);
- four keypoints per object, its top-, bottom-, left- and rightmost pixels (of the full shape),
  COCO integer pixel indices; v=2 where that pixel is visible, v=1 where an object on top hides it.
  The flip map swaps left and right.

Masks are rasterised with pycocotools from the same polygons that paint the image, so image,
masks and boxes agree to the pixel. Each image draws from its own generator seeded by
(seed, split, index): the output is identical for a seed, whatever order it is generated in.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

SHAPE_NAMES = ("circle", "square", "triangle", "star", "hexagon", "cross")
KEYPOINT_NAMES = ["top", "bottom", "left", "right"]
SKELETON = [[1, 3], [3, 2], [2, 4], [4, 1]]  # 1-based, COCO style: a diamond through the extremes
KEYPOINT_FLIP_MAP = [[2, 3]]  # 0-based indices: left <-> right
KEYPOINT_SIGMAS = [0.05, 0.05, 0.05, 0.05]  # OKS sigmas (COCO's range is 0.025 - 0.107)

_MIN_VISIBLE_FRACTION = 0.4
_EMPTY_IMAGE_FRACTION = 0.05
_OBJECTS_PER_IMAGE = (2, 6)  # inclusive
_SIZE_RANGE = (0.15, 0.6)  # object extent as a fraction of the image side
_FORMAT_VERSION = 1  # bump when the generator's output changes


def _unit_outline(name: str) -> np.ndarray:
    """Vertices [V, 2] of a shape centred at 0 with radius ~1, counter-clockwise."""
    def ring(count: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
        angles = phase + 2 * np.pi * np.arange(count) / count
        return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)

    if name == "circle":
        return ring(48)
    if name == "square":
        return ring(4, phase=np.pi / 4) / np.sqrt(0.5) * 0.75
    if name == "triangle":
        return ring(3, phase=-np.pi / 2)
    if name == "star":
        outer, inner = ring(5, 1.0, -np.pi / 2), ring(5, 0.45, -np.pi / 2 + np.pi / 5)
        return np.stack([outer, inner], axis=1).reshape(10, 2)
    if name == "hexagon":
        return ring(6)
    if name == "cross":
        a, b = 1.0, 0.34
        return np.array([[b, a], [b, b], [a, b], [a, -b], [b, -b], [b, -a],
                         [-b, -a], [-b, -b], [-a, -b], [-a, b], [-b, b], [-b, a]])
    raise ValueError(f"unknown shape {name!r}; expected one of {SHAPE_NAMES}")


_OUTLINES = {name: _unit_outline(name) for name in SHAPE_NAMES}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Float [size, size, 3] in 0-255: a colour gradient, low-frequency blobs, stripes and noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(40, 200, size=3)
    direction = rng.normal(size=(2, 3)) * 40
    image = base + xx[..., None] * direction[0] + yy[..., None] * direction[1]
    coarse = rng.normal(0, 18, size=(6, 6, 3)).astype(np.float32)
    coarse = np.kron(coarse, np.ones((size // 6 + 1, size // 6 + 1, 1), np.float32))[:size, :size]
    image = image + coarse
    if rng.random() < 0.5:  # stripes: texture the detector must learn to ignore
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 20)
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) * size * 2 * np.pi / period
        image = image + (rng.uniform(8, 25) * np.sin(phase))[..., None]
    return image + 6 * rng.standard_normal(size=image.shape, dtype=np.float32)


def place_shape(rng: np.random.Generator, size: int) -> tuple[int, np.ndarray]:
    """Draws a class and its polygon [V, 2] in continuous pixel coordinates, inside the image."""
    category = int(rng.integers(len(SHAPE_NAMES)))
    extent = rng.uniform(*_SIZE_RANGE) * size / 2
    aspect = rng.uniform(0.75, 1.33)
    theta = rng.uniform(0, 2 * np.pi)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    points = _OUTLINES[SHAPE_NAMES[category]] * np.array([extent * aspect, extent / aspect])
    points = points @ rotation.T
    low, high = points.min(0), points.max(0)
    centre = rng.uniform(-low + 1, size - high - 1)  # whole outline inside, 1 px margin
    # rounded here, before rasterising, so that the polygon written to JSON gives the same pixels
    return category, np.round(points + centre, 2)


def rasterise(polygon: np.ndarray, size: int) -> np.ndarray:
    """bool [size, size]: the pixels a polygon [V, 2] covers, as COCO's tools draw it."""
    rle = mask_utils.frPyObjects([polygon.reshape(-1).tolist()], size, size)
    return mask_utils.decode(rle)[..., 0].astype(bool)


def extreme_pixels(mask: np.ndarray) -> np.ndarray:
    """[4, 2] integer (x, y) of the top, bottom, left and rightmost pixels of a mask.

    Where several pixels tie (a flat top), the middle one is taken, so that a flipped
    shape has its keypoints at the flipped positions (to within half a pixel).
    """
    ys, xs = np.nonzero(mask)
    def middle(select: np.ndarray, along: np.ndarray) -> int:
        values = np.sort(along[select])
        return int(values[(len(values) - 1) // 2])
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    return np.array([
        [middle(ys == top, xs), top], [middle(ys == bottom, xs), bottom],
        [left, middle(xs == left, ys)], [right, middle(xs == right, ys)],
    ])


def _generate_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[dict]]:
    """One image (uint8 [size, size, 3]) and its objects (category, polygon, full and visible masks)."""
    image = _background(rng, size)
    object_noise = 8 * rng.standard_normal(size=image.shape, dtype=np.float32)
    rows = np.broadcast_to(np.linspace(-1, 1, size, dtype=np.float32)[:, None], (size, size))
    objects: list[dict] = []
    wanted = 0 if rng.random() < _EMPTY_IMAGE_FRACTION else int(rng.integers(_OBJECTS_PER_IMAGE[0], _OBJECTS_PER_IMAGE[1] + 1))
    for _ in range(wanted * 4):  # a few tries per object; crowded images end up with fewer
        if len(objects) == wanted:
            break
        category, polygon = place_shape(rng, size)
        full = rasterise(polygon, size)
        if full.sum() < 20:
            continue
        too_hidden = any((obj["visible"] & ~full).sum() < _MIN_VISIBLE_FRACTION * obj["full"].sum() for obj in objects)
        if too_hidden:
            continue
        for obj in objects:
            obj["visible"] = obj["visible"] & ~full
        objects.append({"category": category, "polygon": polygon, "full": full, "visible": full.copy()})
        # a flat colour with a shading gradient and its own noise: colour alone does not give the class
        colour = rng.uniform(0, 255, size=3).astype(np.float32)
        shade = rng.normal(0, 25, size=3).astype(np.float32)
        image[full] = colour + rows[full][:, None] * shade + object_noise[full]
    return np.clip(image, 0, 255).round().astype(np.uint8), objects


def _annotations(objects: list[dict], image_id: int, first_id: int) -> list[dict]:
    annotations = []
    for offset, obj in enumerate(objects):
        visible = obj["visible"]
        occluded = bool((visible != obj["full"]).any())
        if occluded:
            rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
            segmentation = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
        else:  # the exact outline: rasterising it gives the same pixels as `full`
            segmentation = [obj["polygon"].reshape(-1).tolist()]
            rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
        extremes = extreme_pixels(obj["full"])
        flags = np.where(visible[extremes[:, 1], extremes[:, 0]], 2, 1)
        keypoints = np.concatenate([extremes, flags[:, None]], axis=1).reshape(-1)
        annotations.append({
            "id": first_id + offset, "image_id": image_id, "category_id": obj["category"] + 1,
            "segmentation": segmentation, "area": float(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0,
            "keypoints": [int(v) for v in keypoints], "num_keypoints": 4,
        })
    return annotations


def categories() -> list[dict]:
    """COCO categories with person-keypoints fields and our `keypoint_sigmas` extension."""
    return [{"id": i + 1, "name": name, "supercategory": "shape", "keypoints": list(KEYPOINT_NAMES),
             "skeleton": [list(edge) for edge in SKELETON], "keypoint_sigmas": list(KEYPOINT_SIGMAS),
             "keypoint_flip_map": [list(pair) for pair in KEYPOINT_FLIP_MAP]}
            for i, name in enumerate(SHAPE_NAMES)]


def _write_split(root: Path, split: str, split_code: int, count: int, size: int, seed: int) -> Path:
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    # images of a larger earlier generation would sit there unannotated: remove only our own names
    for old in image_dir.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png"):
        if int(old.stem) >= count:
            old.unlink()
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng([seed, split_code, index])
        pixels, objects = _generate_image(rng, size)
        file_name = f"{index:06d}.png"
        Image.fromarray(pixels).save(image_dir / file_name, compress_level=1)  # noise barely compresses
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        annotations += _annotations(objects, image_id, first_id=image_id * 100)
    coco = {"info": {"description": f"maskrcnn shapes ({split})", "version": str(_FORMAT_VERSION)},
            "licenses": [], "images": images, "annotations": annotations, "categories": categories()}
    path = root / f"{split}.json"
    path.write_text(json.dumps(coco, separators=(",", ":")))
    return path


def _paths(root: Path) -> dict[str, Path]:
    return {"train_images": root / "train", "train_annotations": root / "train.json",
            "val_images": root / "val", "val_annotations": root / "val.json"}


def generate_shapes(root: str | Path, *, num_train: int, num_val: int, image_size: int = 192,
                    seed: int = 0) -> dict[str, Path]:
    """Writes root/{train,val}/*.png and root/{train,val}.json; returns their paths.

    Keys: train_images, train_annotations, val_images, val_annotations. Same arguments give the
    same bytes. A manifest (root/manifest.json) records the arguments for `ensure_shapes`.
    """
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    manifest = root / "manifest.json"
    manifest.unlink(missing_ok=True)  # an interrupted run must not look complete
    _write_split(root, "train", 0, num_train, image_size, seed)
    _write_split(root, "val", 1, num_val, image_size, seed)
    manifest.write_text(json.dumps(_parameters(num_train, num_val, image_size, seed), sort_keys=True))
    return _paths(root)


def _parameters(num_train: int, num_val: int, image_size: int, seed: int) -> dict:
    return {"num_train": num_train, "num_val": num_val, "image_size": image_size, "seed": seed,
            "version": _FORMAT_VERSION}


def ensure_shapes(root: str | Path, *, num_train: int, num_val: int, image_size: int = 192,
                  seed: int = 0) -> dict[str, Path]:
    """`generate_shapes` unless root already holds a complete set made with the same arguments."""
    root = Path(root)
    manifest = root / "manifest.json"
    wanted = _parameters(num_train, num_val, image_size, seed)
    paths = _paths(root)
    try:
        current = json.loads(manifest.read_text())
    except (OSError, ValueError):
        current = None
    if current == wanted and all(p.exists() for p in paths.values()):
        return paths
    return generate_shapes(root, num_train=num_train, num_val=num_val, image_size=image_size, seed=seed)


def digest(root: str | Path) -> str:
    """SHA-256 over the JSON files and PNGs of a generated set (to compare two generations)."""
    hasher = hashlib.sha256()
    root = Path(root)
    for path in sorted(list(root.glob("*.json")) + list(root.glob("*/*.png"))):
        if path.name == "manifest.json":
            continue
        hasher.update(path.relative_to(root).as_posix().encode())
        hasher.update(path.read_bytes())
    return hasher.hexdigest()
