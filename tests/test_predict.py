"""predict.py: pictures and results JSON for a folder, bad paths and unreadable images reported."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from maskrcnn.engine.predict import collect_images, predict

CATEGORIES = [{"id": 5, "name": "circle", "keypoints": ["top", "bottom"], "skeleton": [[1, 2]]},
              {"id": 9, "name": "square", "keypoints": ["top", "bottom"], "skeleton": [[1, 2]]}]  # fmt: skip


class CentreModel(torch.nn.Module):
    """Two detections per image: a confident centre square (label 2) and a weak one (label 1)."""

    def __init__(self):
        super().__init__()
        self.seen_sizes = []

    def forward(self, images):
        outputs = []
        for image in images:
            h, w = image.shape[-2:]
            self.seen_sizes.append((h, w))
            boxes = torch.tensor([[w / 4, h / 4, 3 * w / 4, 3 * h / 4], [0.0, 0.0, w / 2, h / 2]])
            masks = torch.zeros(2, 1, h, w)
            masks[0, 0, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 0.9
            masks[1, 0, : h // 2, : w // 2] = 0.7
            keypoints = torch.tensor([[[w / 2, h / 4, 1.0], [w / 2, 3 * h / 4, 1.0]], [[1.0, 1.0, 1.0], [2.0, 2.0, 1.0]]])
            outputs.append({"boxes": boxes, "labels": torch.tensor([2, 1]), "scores": torch.tensor([0.9, 0.3]),
                            "masks": masks, "keypoints": keypoints})  # fmt: skip
        return outputs


def _folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(folder / "a_rgb.png")
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(folder / "b_gray.jpg")
    Image.fromarray(np.full((24, 20), 65535, dtype=np.uint16)).save(folder / "c_16bit.png")
    (folder / "d_broken.png").write_bytes(b"\x89PNG not really")
    (folder / "notes.txt").write_text("not an image, ignored by suffix")
    return folder


def test_folder_gives_one_png_per_image_and_a_valid_results_json(tmp_path):
    folder = _folder(tmp_path)
    out = tmp_path / "out"
    model = CentreModel()
    report = predict(model, [folder, tmp_path / "missing.jpg"], out_dir=out, device="cpu", batch_size=2,
                     score_threshold=0.5, categories=CATEGORIES)  # fmt: skip
    assert [p.name for p in report.pictures] == ["a_rgb.png", "b_gray.png", "c_16bit.png"]
    for picture, size in zip(report.pictures, [(40, 60), (32, 32), (24, 20)]):
        with Image.open(picture) as written:
            assert written.format == "PNG" and (written.height, written.width) == size
    assert model.seen_sizes == [(40, 60), (32, 32), (24, 20)]
    # The bad file and the missing path are named; the rest was processed.
    assert len(report.problems) == 2
    assert any("d_broken.png" in p and "cannot read image" in p for p in report.problems)
    assert any("missing.jpg" in p and "no such file" in p for p in report.problems)

    results = json.loads(report.results_path.read_text())
    assert len(results) == 3 == report.detections  # the 0.3 detections are below the threshold
    assert [r["image_id"] for r in results] == [1, 2, 3]
    assert {r["category_id"] for r in results} == {9}  # label 2 -> the second category by id
    assert results[0]["bbox"] == [15.0, 10.0, 30.0, 20.0]
    assert results[0]["keypoints"][:3] == [29.5, 9.5, 1.0]  # continuous -> COCO pixel indices
    rle = results[0]["segmentation"]
    assert mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()}).sum() == 30 * 20
    assert results[2]["file_name"].endswith("c_16bit.png")


def test_score_threshold_keeps_weak_detections_and_labels_without_categories(tmp_path):
    folder = _folder(tmp_path)
    report = predict(CentreModel(), [folder / "a_rgb.png"], out_dir=tmp_path / "o", device="cpu", score_threshold=0.2)
    results = json.loads(report.results_path.read_text())
    assert sorted(r["category_id"] for r in results) == [1, 2] and report.problems == []


def test_same_stem_in_two_folders_gives_two_pictures(tmp_path):
    for name in ("x", "y"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / name / "img.png")
    report = predict(CentreModel(), [tmp_path / "x", tmp_path / "y"], out_dir=tmp_path / "o", device="cpu")
    assert sorted(p.name for p in report.pictures) == ["img.png", "img_2.png"]


def test_empty_folder_is_a_problem_and_results_are_still_written(tmp_path):
    (tmp_path / "empty").mkdir()
    report = predict(CentreModel(), [tmp_path / "empty"], out_dir=tmp_path / "o", device="cpu")
    assert report.pictures == [] and "has no image files" in report.problems[0]
    assert json.loads(report.results_path.read_text()) == []


def test_collect_images_expands_folders_and_reports_missing_paths(tmp_path):
    for name in ("b.png", "a.JPG", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    files, problems = collect_images([tmp_path, tmp_path / "nope"])
    assert [f.name for f in files] == ["a.JPG", "b.png"]
    assert problems == [f"{tmp_path / 'nope'}: no such file or folder"]


def test_torchvision_mask_rcnn_runs_through_predict(tmp_path):
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    model = MaskRCNN(backbone, num_classes=3, min_size=64, max_size=64, box_score_thresh=0.0,
                     rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, box_detections_per_img=5)
    folder = _folder(tmp_path)
    report = predict(model, [folder], out_dir=tmp_path / "o", device="cpu", score_threshold=0.0, categories=CATEGORIES)
    results = json.loads(report.results_path.read_text())
    assert len(report.pictures) == 3 and len(results) == report.detections > 0
    assert {r["category_id"] for r in results} <= {5, 9}
