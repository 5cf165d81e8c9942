"""CocoDataset on small COCO files built here: decoding against pycocotools, image modes, EXIF,
the problems planted in the file, and the shapes round trip through COCOeval (AP 1.0)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image, ImageOps
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn.data import shapes
from maskrcnn.data.coco import CocoDataset, CocoFormatError

H, W = 40, 50
KEYPOINTS = ["nose", "left_eye", "right_eye"]


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def _uncompressed(mask: np.ndarray) -> dict:
    flat = mask.reshape(-1, order="F").astype(np.int64)
    changes = np.flatnonzero(np.diff(np.r_[0, flat, 0]))
    counts = np.diff(np.r_[0, changes, flat.size]).tolist()
    return {"size": list(mask.shape), "counts": counts[:-1] if counts[-1] == 0 else counts}


def _write_images(folder) -> dict:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(folder / "grey.png")
    Image.fromarray(np.dstack([rgb, np.full((H, W), 7, np.uint8)])).save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 65536, (H, W), dtype=np.uint16)).save(folder / "deep.png")
    Image.fromarray(rgb).quantize(16).save(folder / "palette.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": raw 50 high x 40 wide shows as 40 x 50
    Image.fromarray(rgb.transpose(1, 0, 2).copy()).save(folder / "exif.jpg", exif=exif, quality=95)
    Image.fromarray(rgb.transpose(1, 0, 2).copy()).save(folder / "exif_raw.jpg", exif=exif, quality=95)
    (folder / "corrupt.png").write_bytes(b"not an image at all")
    return {"rgb": rgb}


def _coco_file(tmp_path) -> tuple:
    folder = tmp_path / "images"
    folder.mkdir()
    _write_images(folder)
    names = ["rgb.png", "grey.png", "rgba.png", "deep.png", "palette.png", "exif.jpg", "exif_raw.jpg",
             "missing.png", "corrupt.png", "rgb.png"]
    images = [{"id": 10 + i, "file_name": n, "height": H, "width": W} for i, n in enumerate(names)]
    images[6].update(height=W, width=H)  # matches the raw pixels of exif_raw.jpg, not the upright ones
    images[9].update(height=H + 1)  # wrong size for rgb.png
    images.append({"id": 30, "file_name": "rgb.png", "height": H, "width": W})  # no annotations
    blob = np.zeros((H, W), np.uint8)
    blob[5:20, 10:30] = 1
    ring = np.zeros((H, W), np.uint8)
    ring[20:38, 2:22] = 1
    ring[25:30, 8:14] = 0
    kp = [10, 12, 2, 0, 0, 0, 30, 5, 1]
    anns = [  # (planted problem) in the trailing comment
        {"id": 1, "image_id": 10, "category_id": 7, "bbox": [5, 5, 20, 20], "iscrowd": 0, "area": 300.0, "keypoints": kp, "num_keypoints": 2,
         "segmentation": [[5, 5, 25, 5, 25, 15], [5, 18, 15, 18, 15, 25, 5, 25]]},
        {"id": 2, "image_id": 10, "category_id": 3, "bbox": [10, 5, 20, 15], "iscrowd": 0, "segmentation": _rle(blob)},
        {"id": 3, "image_id": 10, "category_id": 3, "bbox": [2, 20, 20, 18], "iscrowd": 0, "segmentation": _uncompressed(ring)},
        {"id": 4, "image_id": 10, "category_id": 12, "bbox": [30, 20, 15, 15], "iscrowd": 1, "segmentation": _uncompressed(ring)},
        {"id": 5, "image_id": 11, "category_id": 12, "bbox": [1, 1, 10, 10], "segmentation": [[1, 1, 11, 1, 11, 11], [3, 3, 4, 4]]},  # part < 3 points
        {"id": 6, "image_id": 11, "category_id": 12, "bbox": [20, 1, 10, 10], "segmentation": []},  # empty segmentation
        {"id": 7, "image_id": 11, "category_id": 12, "bbox": [20, 1, 0, 10], "segmentation": [[20, 1, 30, 1, 30, 10]]},  # zero area
        {"id": 8, "image_id": 11, "category_id": 12, "bbox": [60, 50, 10, 10], "segmentation": [[60, 50, 70, 50, 70, 60]]},  # outside
        {"id": 9, "image_id": 12, "category_id": 7, "bbox": [40, 30, 20, 20], "segmentation": [[40, 30, 49, 30, 49, 39]]},  # clipped
        {"id": 10, "image_id": 12, "category_id": 7, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 6, 1, 6, 6]], "keypoints": [1, 2, 2]},  # bad keypoints
        {"id": 11, "image_id": 12, "category_id": 99, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 6, 1, 6, 6]]},  # unknown category
        {"id": 12, "image_id": 77, "category_id": 7, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 6, 1, 6, 6]]},  # unknown image
        {"id": 13, "image_id": 17, "category_id": 7, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 6, 1, 6, 6]]},  # image missing
        {"id": 14, "image_id": 13, "category_id": 3, "bbox": [2, 2, 8, 8], "segmentation": [[2, 2, 10, 2, 10, 10]],
         "point_coords": [[3.5, 4.25], [9.0, 9.5]], "point_labels": [1, 0]},
        {"id": 15, "image_id": 13, "category_id": 3, "bbox": [20, 2, 8, 8], "segmentation": [[20, 2, 28, 2, 28, 10]],
         "point_coords": [[21.0, 3.0]], "point_labels": [1, 0]},  # mismatched points
    ]
    categories = [{"id": 12, "name": "c"}, {"id": 3, "name": "a"},
                  {"id": 7, "name": "b", "keypoints": KEYPOINTS, "skeleton": [[1, 2], [1, 3]]}]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return path, folder


@pytest.fixture
def coco_file(tmp_path):
    return _coco_file(tmp_path)


@pytest.fixture
def dataset(coco_file):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CocoDataset(*coco_file)


def _item(dataset, image_id):
    return dataset[dataset.image_ids.index(image_id)]


def test_problems_match_the_planted_ones(coco_file):
    with pytest.warns(UserWarning, match=r"14 annotation problems \(8 skipped, 6 repaired\)"):
        dataset = CocoDataset(*coco_file)
    found = {(p.severity, p.image_id, p.annotation_id, p.field) for p in dataset.problems}
    assert found == {
        ("warning", 16, None, "height/width"),  # exif_raw.jpg: orientation not applied
        ("error", 17, None, "file_name"), ("error", 18, None, "file_name"), ("error", 19, None, "height/width"),
        ("warning", 11, 5, "segmentation"), ("warning", 11, 6, "segmentation"),
        ("error", 11, 7, "bbox"), ("error", 11, 8, "bbox"), ("warning", 12, 9, "bbox"),
        ("warning", 12, 10, "keypoints"), ("error", 12, 11, "category_id"), ("error", 77, 12, "image_id"),
        ("error", 17, 13, "image_id"), ("warning", 13, 15, "point_coords"),
    }
    assert all(str(p.image_id) in str(p) and str(p.annotation_id) in str(p) for p in dataset.problems)


def test_masks_match_pycocotools(dataset, coco_file):
    reference = COCO(str(coco_file[0]))
    for image_id in (10, 11, 12, 13):
        _, target = _item(dataset, image_id)
        record = dataset.records[dataset.image_ids.index(image_id)]
        dense = target["masks"].to_tensor()
        for row, ann_id in enumerate(record.annotation_ids):
            if ann_id in (5, 6):
                continue  # repaired: compared below
            np.testing.assert_array_equal(dense[row].numpy(), reference.annToMask(reference.anns[ann_id]))
    _, target = _item(dataset, 11)
    only_good_part = mask_utils.decode(mask_utils.frPyObjects([[1, 1, 11, 1, 11, 11]], H, W))[..., 0]
    np.testing.assert_array_equal(target["masks"].to_tensor()[0].numpy(), only_good_part)
    assert target["has_mask"].tolist() == [True, False] and target["masks"].to_tensor()[1].sum() == 0


def test_labels_boxes_crowd(dataset):
    assert dataset.label_to_category_id == {1: 3, 2: 7, 3: 12}
    assert dataset.category_id_to_label == {3: 1, 7: 2, 12: 3}
    assert dataset.category_names == ["a", "b", "c"]
    _, target = _item(dataset, 10)
    assert target["labels"].tolist() == [2, 1, 1] and target["labels"].dtype == torch.int64
    torch.testing.assert_close(target["boxes"], torch.tensor([[5.0, 5, 25, 25], [10, 5, 30, 20], [2, 20, 22, 38]]))
    torch.testing.assert_close(target["crowd_boxes"], torch.tensor([[30.0, 20, 45, 35]]))
    _, clipped = _item(dataset, 12)
    torch.testing.assert_close(clipped["boxes"][0], torch.tensor([40.0, 30, 50, 40]))
    summary = dataset.summary()
    assert summary["crowd"] == 1 and summary["per_class"] == {"a": 4, "b": 3, "c": 2}
    assert summary["empty_images"] == 4 and summary["images"] == 8  # 14, 15, 16 and 30 are empty


def test_keypoints_shift_to_pixel_centres(dataset):
    assert dataset.keypoint_names == KEYPOINTS and dataset.keypoint_flip_map == [[1, 2]]
    _, target = _item(dataset, 10)
    assert target["keypoints"].shape == (3, 3, 3)
    torch.testing.assert_close(target["keypoints"][0], torch.tensor([[10.5, 12.5, 2], [0, 0, 0], [30.5, 5.5, 1]]))
    assert target["keypoints"][1:].abs().sum() == 0  # annotations without keypoints: unlabelled
    _, bad = _item(dataset, 12)
    assert bad["keypoints"][1].abs().sum() == 0


def test_points_padded(dataset):
    _, target = _item(dataset, 13)
    torch.testing.assert_close(target["point_coords"], torch.tensor([[[3.5, 4.25], [9.0, 9.5]], [[0.0, 0.0], [0.0, 0.0]]]))
    torch.testing.assert_close(target["point_labels"], torch.tensor([[1.0, 0.0], [-1.0, -1.0]]))
    _, other = _item(dataset, 30)
    assert other["point_coords"].shape == (0, 0, 2) and other["boxes"].shape == (0, 4)


def test_image_modes(dataset, coco_file):
    folder = coco_file[1]
    rgb = np.asarray(Image.open(folder / "rgb.png"), dtype=np.float32) / 255
    grey, _ = _item(dataset, 11)
    assert grey.shape == (3, H, W) and grey.dtype == torch.float32
    for channel in grey:
        np.testing.assert_allclose(channel.numpy(), rgb[..., 0], atol=1e-6)
    rgba, _ = _item(dataset, 12)
    np.testing.assert_allclose(rgba.permute(1, 2, 0).numpy(), rgb, atol=1e-6)
    deep, _ = _item(dataset, 13)
    np.testing.assert_allclose(deep[1].numpy(), np.asarray(Image.open(folder / "deep.png"), np.float32) / 65535, atol=1e-6)
    palette, _ = _item(dataset, 14)
    np.testing.assert_allclose(palette.permute(1, 2, 0).numpy() * 255, np.asarray(Image.open(folder / "palette.png").convert("RGB")), atol=1e-3)


def test_exif_policy(dataset, coco_file):
    upright, _ = _item(dataset, 15)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(coco_file[1] / "exif.jpg")), np.float32) / 255
    assert upright.shape == (3, H, W)
    np.testing.assert_allclose(upright.permute(1, 2, 0).numpy(), expected, atol=1e-6)
    raw, _ = _item(dataset, 16)
    assert raw.shape == (3, W, H)  # the JSON described the raw pixels: orientation not applied


def test_empty_images_configurable(coco_file):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = CocoDataset(*coco_file)
        dropped = CocoDataset(*coco_file, keep_empty_images=False)
    assert 30 in kept.image_ids and 30 not in dropped.image_ids and 15 not in dropped.image_ids
    assert len(kept) == len(dropped) + 4
    image, target = _item(kept, 30)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,) and len(target["masks"]) == 0
    assert target["keypoints"].shape == (0, 3, 3)


def test_unusable_files_stop_clearly(tmp_path):
    with pytest.raises(CocoFormatError, match="does not exist"):
        CocoDataset(tmp_path / "nope.json", tmp_path)
    (tmp_path / "bad.json").write_text("{\"images\": [")
    with pytest.raises(CocoFormatError, match="not valid JSON.*line 1"):
        CocoDataset(tmp_path / "bad.json", tmp_path)
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(CocoFormatError, match="expected a JSON object"):
        CocoDataset(tmp_path / "list.json", tmp_path)
    with pytest.raises(CocoFormatError, match="'categories'"):
        CocoDataset({"images": [], "annotations": []}, tmp_path)
    with pytest.raises(CocoFormatError, match="duplicate category ids \\[1\\]"):
        CocoDataset({"images": [], "categories": [{"id": 1}, {"id": 1}]}, tmp_path)
    with pytest.raises(CocoFormatError, match="image folder"):
        CocoDataset({"images": [], "categories": [{"id": 1}]}, tmp_path / "none")


def test_unreadable_image_at_load_names_it(tmp_path):
    folder = tmp_path / "im"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"garbage")
    data = {"images": [{"id": 5, "file_name": "x.png", "height": 4, "width": 4}], "categories": [{"id": 1}]}
    dataset = CocoDataset(data, folder, check_images="exists")
    with pytest.raises(RuntimeError, match=r"image 5 .*x.png.*cannot be read"):
        dataset[0]


def _as_results(dataset) -> list[dict]:
    """Ground truth written as detections (score 1), in COCO's result format."""
    results = []
    for index in range(len(dataset)):
        _, target = dataset[index]
        masks = target["masks"].to_tensor().numpy()
        for row in range(len(target["labels"])):
            x1, y1, x2, y2 = target["boxes"][row].tolist()
            keypoints = target["keypoints"][row].clone()
            keypoints[:, :2] -= 0.5  # back to COCO's pixel indices
            rle = mask_utils.encode(np.asfortranarray(masks[row]))
            rle["counts"] = rle["counts"].decode()
            results.append({"image_id": target["image_id"], "score": 1.0,
                            "category_id": dataset.label_to_category_id[int(target["labels"][row])],
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "segmentation": rle,
                            "keypoints": keypoints.reshape(-1).tolist()})
    return results


def test_shapes_round_trip_gives_ap_one(tmp_path):
    paths = shapes.generate_shapes(tmp_path, num_train=1, num_val=12, image_size=96, seed=1)
    dataset = CocoDataset(paths["val_annotations"], paths["val_images"])
    assert dataset.problems == [] and dataset.keypoint_sigmas == shapes.KEYPOINT_SIGMAS
    results = _as_results(dataset)
    for iou_type in ("bbox", "segm", "keypoints"):
        evaluator = COCOeval(dataset.coco, dataset.coco.loadRes(results), iou_type)
        if iou_type == "keypoints":
            evaluator.params.kpt_oks_sigmas = np.array(dataset.keypoint_sigmas)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        assert evaluator.stats[0] == pytest.approx(1.0), iou_type


def _one_image(tmp_path, annotations, categories=None):
    folder = tmp_path / "one"
    folder.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(folder / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png", "height": H, "width": W}], "annotations": annotations,
            "categories": categories or [{"id": 1, "name": "x"}]}
    return data, folder


def test_missing_bbox_taken_from_compressed_rle(tmp_path):
    mask = np.zeros((H, W), np.uint8)
    mask[3:9, 4:20] = 1
    data, folder = _one_image(tmp_path, [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": _rle(mask)}])
    with pytest.warns(UserWarning, match="1 annotation problems"):
        dataset = CocoDataset(data, folder)
    assert [(p.severity, p.field) for p in dataset.problems] == [("warning", "bbox")]
    torch.testing.assert_close(dataset[0][1]["boxes"], torch.tensor([[4.0, 3.0, 20.0, 9.0]]))
    assert dataset.coco.anns[1]["bbox"] == [4.0, 3.0, 16.0, 6.0]  # evaluation sees the repaired box


def test_detection_only_file_has_no_masks_and_dense_option(tmp_path):
    data, folder = _one_image(tmp_path, [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]}])
    _, target = CocoDataset(data, folder)[0]
    assert "masks" not in target and "keypoints" not in target and "point_coords" not in target
    data["annotations"][0]["segmentation"] = [[1, 2, 4, 2, 4, 6]]
    _, dense = CocoDataset(data, folder, dense_masks=True)[0]
    assert dense["masks"].dtype == torch.uint8 and dense["masks"].shape == (1, H, W)
    np.testing.assert_array_equal(dense["masks"][0].numpy(), mask_utils.decode(mask_utils.frPyObjects([[1, 2, 4, 2, 4, 6]], H, W))[..., 0])


def test_flip_map_sources(tmp_path):
    person = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder"]
    data, folder = _one_image(tmp_path, [], [{"id": 1, "name": "person", "keypoints": person}])
    assert CocoDataset(data, folder).keypoint_flip_map == [[1, 2], [3, 4], [5, 6]]
    assert CocoDataset(data, folder, keypoint_flip_map=[[3, 4]]).keypoint_flip_map == [[3, 4]]
    data["categories"][0]["keypoint_flip_map"] = [[5, 6]]
    assert CocoDataset(data, folder).keypoint_flip_map == [[5, 6]]


def test_missing_area_is_the_mask_area_for_evaluation(tmp_path):
    polygon = [[2.0, 2.0, 12.0, 2.0, 12.0, 7.0]]
    data, folder = _one_image(tmp_path, [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 5], "segmentation": polygon},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [20, 2, 10, 5], "segmentation": [], "area": 7.0}])
    coco = CocoDataset(data, folder, warn=False).coco
    assert coco.anns[1]["area"] == mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(polygon, H, W)))
    assert coco.anns[2]["area"] == 7.0  # given areas are kept
    assert coco.anns[2]["segmentation"] == [[20.0, 2.0, 30.0, 2.0, 30.0, 7.0, 20.0, 7.0]]  # the box stands in
