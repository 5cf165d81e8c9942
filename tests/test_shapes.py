"""The synthetic shapes generator: determinism, idempotence, and annotations that match the pixels."""

from __future__ import annotations

import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image
from pycocotools.coco import COCO

from maskrcnn.data import shapes


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    paths = shapes.generate_shapes(root, num_train=24, num_val=6, image_size=96, seed=3)
    return root, paths


def test_layout_and_categories(generated):
    root, paths = generated
    assert sorted(p.name for p in paths["train_images"].glob("*.png"))[:2] == ["000000.png", "000001.png"]
    assert len(list(paths["val_images"].glob("*.png"))) == 6
    data = json.loads(paths["train_annotations"].read_text())
    assert len(data["images"]) == 24
    assert [c["name"] for c in data["categories"]] == list(shapes.SHAPE_NAMES)
    assert len(shapes.SHAPE_NAMES) >= 6
    for category in data["categories"]:
        assert category["keypoints"] == ["top", "bottom", "left", "right"]
        assert len(category["keypoint_sigmas"]) == 4 and category["skeleton"]
    for ann in data["annotations"]:
        assert ann["iscrowd"] == 0 and ann["num_keypoints"] == 4 and len(ann["keypoints"]) == 12
        assert set(ann["keypoints"][2::3]) <= {1, 2}


def test_deterministic_and_seed_dependent(generated, tmp_path):
    root, _ = generated
    shapes.generate_shapes(tmp_path / "a", num_train=24, num_val=6, image_size=96, seed=3)
    assert shapes.digest(tmp_path / "a") == shapes.digest(root)
    shapes.generate_shapes(tmp_path / "b", num_train=24, num_val=6, image_size=96, seed=4)
    assert shapes.digest(tmp_path / "b") != shapes.digest(root)


def test_ensure_regenerates_only_when_needed(tmp_path):
    paths = shapes.ensure_shapes(tmp_path, num_train=3, num_val=2, image_size=64, seed=0)
    stamp = paths["train_annotations"].stat().st_mtime_ns
    shapes.ensure_shapes(tmp_path, num_train=3, num_val=2, image_size=64, seed=0)
    assert paths["train_annotations"].stat().st_mtime_ns == stamp  # untouched
    (tmp_path / "train" / "mine.png").write_bytes(b"a user's file")
    shapes.ensure_shapes(tmp_path, num_train=2, num_val=2, image_size=64, seed=0)
    assert len(json.loads(paths["train_annotations"].read_text())["images"]) == 2
    assert sorted(p.name for p in paths["train_images"].iterdir()) == ["000000.png", "000001.png", "mine.png"]
    paths["val_annotations"].unlink()
    shapes.ensure_shapes(tmp_path, num_train=4, num_val=2, image_size=64, seed=0)
    assert paths["val_annotations"].exists()


def test_annotations_describe_visible_pixels(generated):
    """Masks (decoded by pycocotools) are disjoint, boxes and areas come from them, keypoints lie on them."""
    root, paths = generated
    coco = COCO(str(paths["train_annotations"]))
    counts = []
    for image_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        counts.append(len(anns))
        if not anns:
            continue
        masks = np.stack([coco.annToMask(a) for a in anns])
        assert masks.sum(0).max() == 1, "visible masks of one image must not overlap"
        pixels = np.asarray(Image.open(paths["train_images"] / coco.imgs[image_id]["file_name"]))
        assert pixels.shape == (96, 96, 3)
        for ann, mask in zip(anns, masks):
            assert ann["area"] == mask.sum() > 0
            ys, xs = np.nonzero(mask)
            np.testing.assert_allclose(ann["bbox"], [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1])
            keypoints = np.array(ann["keypoints"]).reshape(4, 3)
            for x, y, v in keypoints:
                assert (mask[y, x] == 1) == (v == 2)
            # the extreme points: nothing of a visible keypoint's object lies beyond it
            x_top, y_top, v_top = keypoints[0]
            if v_top == 2:
                assert ys.min() == y_top
    assert 2 <= max(counts) <= 6


def test_extreme_pixels_closed_form():
    mask = np.zeros((10, 12), bool)
    mask[2:6, 3:9] = True  # rows 2..5, columns 3..8
    np.testing.assert_array_equal(shapes.extreme_pixels(mask), [[5, 2], [5, 5], [3, 3], [8, 3]])


def test_polygon_of_unoccluded_object_matches_rle():
    rng = np.random.default_rng(0)
    _, polygon = shapes.place_shape(rng, 64)
    full = shapes.rasterise(polygon, 64)
    rle = mask_utils.frPyObjects([polygon.reshape(-1).tolist()], 64, 64)
    np.testing.assert_array_equal(mask_utils.decode(rle)[..., 0], full)
    assert polygon.min() >= 0 and polygon.max() <= 64
