"""Point simulation from masks (`maskrcnn points`), checked against pycocotools' own decoding."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from maskrcnn.cli import main
from maskrcnn.data.points import PointSimulationError, simulate_points

HEIGHT, WIDTH = 24, 32


def _disc(cx: float, cy: float, radius: float) -> np.ndarray:
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH] + 0.5
    return ((xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2).astype(np.uint8)


def _box(mask: np.ndarray) -> list[float]:
    return mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask))).tolist()


def _coco() -> dict:
    """Two images; a polygon, a compressed RLE, an uncompressed RLE, a crowd region and an
    annotation without a segmentation."""
    disc = _disc(10, 12, 7)
    compressed = mask_utils.encode(np.asfortranarray(disc))
    compressed["counts"] = compressed["counts"].decode("ascii")
    ring = _disc(22, 10, 8) - _disc(22, 10, 4)
    uncompressed_counts = []  # column-major run lengths starting with zeros
    flat, value, run_length = ring.flatten(order="F"), 0, 0
    for pixel in flat:
        if pixel == value:
            run_length += 1
        else:
            uncompressed_counts.append(run_length)
            value, run_length = pixel, 1
    uncompressed_counts.append(run_length)
    triangle = [2.0, 2.0, 28.0, 4.0, 6.0, 20.0]
    return {
        "info": {"description": "test"},
        "images": [
            {"id": 7, "file_name": "a.png", "height": HEIGHT, "width": WIDTH},
            {"id": 3, "file_name": "b.png", "height": HEIGHT, "width": WIDTH},
        ],
        "categories": [{"id": 1, "name": "thing"}, {"id": 5, "name": "other"}],
        "annotations": [
            {"id": 11, "image_id": 7, "category_id": 1, "iscrowd": 0, "segmentation": [triangle],
             "bbox": [2.0, 2.0, 26.0, 18.0], "area": 250.0},
            {"id": 12, "image_id": 7, "category_id": 5, "iscrowd": 0, "segmentation": compressed,
             "bbox": _box(disc), "area": float(disc.sum())},
            {"id": 21, "image_id": 3, "category_id": 5, "iscrowd": 0,
             "segmentation": {"size": [HEIGHT, WIDTH], "counts": uncompressed_counts},
             "bbox": _box(ring), "area": float(ring.sum())},
            {"id": 22, "image_id": 3, "category_id": 1, "iscrowd": 1, "segmentation": compressed,
             "bbox": _box(disc), "area": float(disc.sum())},
            {"id": 23, "image_id": 3, "category_id": 1, "iscrowd": 0, "segmentation": [],
             "bbox": [1.0, 1.0, 5.0, 5.0], "area": 25.0},
        ],
    }


def _coco_api(data: dict) -> COCO:
    api = COCO()
    api.dataset = copy.deepcopy(data)
    api.createIndex()
    return api


def _simulate(data, **kwargs):
    with pytest.warns(UserWarning, match=r"1 non-crowd annotation.*\[23\]"):
        return simulate_points(data, **kwargs)


def test_labels_agree_with_pycocotools_masks():
    data = _coco()
    result = _simulate(data, num_points=50, seed=0)
    api = _coco_api(data)
    labelled = {a["id"]: a for a in result["annotations"] if "point_labels" in a}
    assert sorted(labelled) == [11, 12, 21]
    for annotation_id, annotation in labelled.items():
        mask = api.annToMask(api.anns[annotation_id])  # [H, W], pycocotools' own decoding
        points = np.array(annotation["point_coords"])
        labels = np.array(annotation["point_labels"])
        assert points.shape == (50, 2) and labels.shape == (50,)
        x, y, w, h = api.anns[annotation_id]["bbox"]
        assert (points[:, 0] >= x).all() and (points[:, 0] <= x + w).all()
        assert (points[:, 1] >= y).all() and (points[:, 1] <= y + h).all()
        # A pixel i covers [i, i + 1): the point's pixel is floor(coordinate).
        expected = mask[np.floor(points[:, 1]).astype(int), np.floor(points[:, 0]).astype(int)]
        assert labels.tolist() == expected.tolist(), annotation_id
        assert 0 < labels.sum() < 50  # both kinds appear for these shapes


def test_fraction_inside_matches_area_over_box():
    data = _coco()
    result = _simulate(data, num_points=4000, seed=1)
    disc = next(a for a in result["annotations"] if a["id"] == 12)
    x, y, w, h = disc["bbox"]
    fraction = np.mean(disc["point_labels"])
    assert math.isclose(fraction, disc["area"] / (w * h), abs_tol=0.03)


def test_deterministic_per_seed_and_per_image():
    data = _coco()
    first = _simulate(data, num_points=10, seed=4)
    assert first == _simulate(data, num_points=10, seed=4)
    other = _simulate(data, num_points=10, seed=5)
    assert first["annotations"][0]["point_coords"] != other["annotations"][0]["point_coords"]
    # The same image gets the same points when the file is reordered or cut down.
    shuffled = _coco()
    shuffled["annotations"] = shuffled["annotations"][::-1]
    again = {a["id"]: a for a in _simulate(shuffled, num_points=10, seed=4)["annotations"]}
    for annotation in first["annotations"]:
        assert annotation.get("point_coords") == again[annotation["id"]].get("point_coords")
    only_first_image = _coco()
    only_first_image["annotations"] = only_first_image["annotations"][:2]
    cut = simulate_points(only_first_image, num_points=10, seed=4)
    assert cut["annotations"] == first["annotations"][:2]


def test_masks_removed_unless_kept_and_crowd_rule():
    data = _coco()
    original = copy.deepcopy(data)
    result = _simulate(data, num_points=5, seed=0)
    assert data == original  # the input is not modified
    by_id = {a["id"]: a for a in result["annotations"]}
    assert all("segmentation" not in by_id[i] for i in (11, 12, 21, 23))
    crowd = by_id[22]  # crowd: unchanged, segmentation kept, no points
    assert crowd == original["annotations"][3]
    assert by_id[23].get("point_coords") is None  # no usable segmentation: no points
    kept = _simulate(data, num_points=5, seed=0, keep_masks=True)
    for before, after in zip(original["annotations"], kept["annotations"]):
        assert after["segmentation"] == before["segmentation"]
    assert result["info"]["point_simulation"] == {"num_points": 5, "seed": 0, "keep_masks": False}
    assert result["info"]["description"] == "test"


def test_bad_input_names_the_problem():
    data = _coco()
    data["annotations"][1]["image_id"] = 99
    with pytest.raises(PointSimulationError, match=r"annotation 12: image_id 99"):
        simulate_points(data, num_points=3)
    data = _coco()
    data["annotations"][1]["segmentation"]["size"] = [10, 10]
    with pytest.raises(PointSimulationError, match=r"annotation 12 \(image 7\).*\[10, 10\]"):
        simulate_points(data, num_points=3)
    with pytest.raises(PointSimulationError, match="num_points"):
        simulate_points(_coco(), num_points=0)
    with pytest.raises(PointSimulationError, match="'annotations'"):
        simulate_points({"images": []}, num_points=3)


def test_command_line(tmp_path, capsys):
    source = tmp_path / "in.json"
    source.write_text(json.dumps(_coco()))
    out = tmp_path / "sub" / "out.json"
    with pytest.warns(UserWarning):
        assert main(["points", str(source), "--num-points", "6", "--out", str(out), "--seed", "2"]) == 0
    written = json.loads(out.read_text())
    with pytest.warns(UserWarning):
        assert written == json.loads(json.dumps(simulate_points(_coco(), num_points=6, seed=2)))
    assert "3 of 5 annotations with 6 points each" in capsys.readouterr().out

    assert main(["points", str(tmp_path / "nope.json"), "--out", str(out)]) == 2
    assert "nope.json" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert main(["points", str(broken), "--out", str(out)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
