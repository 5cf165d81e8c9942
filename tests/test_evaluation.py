"""evaluation.py against pycocotools itself: GT vs GT, hand-made detections, groups, empty."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn.engine.evaluation import (
    DETECTION_STAT_NAMES,
    KEYPOINT_STAT_NAMES,
    evaluate,
    flatten_metrics,
    format_table,
    predictions_to_coco,
)

SIZE = 64
SIGMAS = [0.05, 0.08, 0.06, 0.1]
CATEGORY_IDS = [3, 7, 11]  # non-contiguous on purpose: labels 1, 2, 3


def _square(x, y, s):
    return [[x, y, x + s, y, x + s, y + s, x, y + s]]


def make_gt() -> dict:
    """Four images, three categories with keypoints, objects of several sizes."""
    rng = np.random.default_rng(0)
    cats = [{"id": c, "name": f"shape{c}", "supercategory": "shape", "keypoints": ["top", "bottom", "left", "right"],
             "skeleton": [[1, 3], [3, 2], [2, 4], [4, 1]], "keypoint_sigmas": SIGMAS} for c in CATEGORY_IDS]
    images, annotations = [], []
    for image_id in (1, 2, 5, 9):
        images.append({"id": image_id, "width": SIZE, "height": SIZE, "file_name": f"{image_id}.png"})
        for _ in range(int(rng.integers(1, 4))):
            s = int(rng.integers(6, 30))
            x, y = (int(v) for v in rng.integers(0, SIZE - s, size=2))
            kps = [x + s // 2, y, 2, x + s // 2, y + s - 1, 2, x, y + s // 2, 1, x + s - 1, y + s // 2, 2]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(rng.choice(CATEGORY_IDS)), "segmentation": _square(x, y, s),
                                "bbox": [x, y, s, s], "area": float(s * s), "iscrowd": 0, "keypoints": kps,
                                "num_keypoints": 4})
    return {"images": images, "annotations": annotations, "categories": cats}


def load_coco(data: dict) -> COCO:
    coco = COCO()
    coco.dataset = copy.deepcopy(data)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class TinyDataset(torch.utils.data.Dataset):
    """The evaluation contract of CocoDataset: `.coco`, `.label_to_category_id`, items with image_id."""

    def __init__(self, data: dict):
        self.coco = load_coco(data)
        self.ids = [im["id"] for im in data["images"]]
        self.label_to_category_id = {i + 1: c for i, c in enumerate(CATEGORY_IDS)}

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        image = torch.zeros(3, SIZE, SIZE)
        image[0, 0, 0] = self.ids[index] / 255.0  # lets the fake model know which image it sees
        return image, {"image_id": self.ids[index]}


class ReplayModel(torch.nn.Module):
    """Returns prepared COCO-style detections as model outputs (torchvision's output format)."""

    def __init__(self, detections: list[dict], *, heads=("masks", "keypoints")):
        super().__init__()
        self.by_image: dict[int, list[dict]] = {}
        for d in detections:
            self.by_image.setdefault(d["image_id"], []).append(d)
        self.heads = heads

    def forward(self, images):
        return [self.output_for(round(float(im[0, 0, 0]) * 255), im.shape[-2:]) for im in images]

    def output_for(self, image_id, size):
        dets = self.by_image.get(image_id, [])
        label_of = {c: i + 1 for i, c in enumerate(CATEGORY_IDS)}
        xywh = torch.tensor([d["bbox"] for d in dets], dtype=torch.float32).reshape(-1, 4)
        out = {"boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
               "labels": torch.tensor([label_of[d["category_id"]] for d in dets], dtype=torch.int64),
               "scores": torch.tensor([d["score"] for d in dets], dtype=torch.float32)}
        if "masks" in self.heads:
            masks = [mask_util.decode(d["segmentation"]) for d in dets]
            out["masks"] = torch.as_tensor(np.stack(masks) if masks else np.zeros((0, *size)), dtype=torch.float32)[:, None]
        if "keypoints" in self.heads:
            kps = torch.tensor([d["keypoints"] for d in dets], dtype=torch.float32).reshape(len(dets), 4, 3)
            kps[..., :2] += 0.5  # model outputs are continuous coordinates
            kps[..., 2] = 1
            out["keypoints"] = kps
        return out


def gt_as_detections(data: dict) -> list[dict]:
    coco = load_coco(data)
    dets = []
    for a in data["annotations"]:
        rle = mask_util.encode(np.asfortranarray(coco.annToMask(a)))
        rle["counts"] = rle["counts"].decode("ascii")
        dets.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9,
                     "segmentation": rle, "keypoints": a["keypoints"]})
    return dets


def hand_made_detections(data: dict) -> list[dict]:
    """Shifted / resized boxes, eroded masks, moved keypoints, wrong classes, false positives."""
    rng = np.random.default_rng(1)
    dets = []
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        for shift in (0, 2, 5):
            dx, dy = (int(v) for v in rng.integers(-shift, shift + 1, size=2))
            nx, ny, nw, nh = max(x + dx, 0), max(y + dy, 0), max(w - shift, 2), max(h - shift // 2, 2)
            mask = np.zeros((SIZE, SIZE), np.uint8)
            mask[ny : ny + nh, nx : nx + nw] = 1
            rle = mask_util.encode(np.asfortranarray(mask))
            rle["counts"] = rle["counts"].decode("ascii")
            kps = np.array(a["keypoints"], dtype=float).reshape(-1, 3)
            kps[:, :2] += rng.normal(0, 1 + shift, size=(len(kps), 2)).round(2)
            category = a["category_id"] if shift < 5 else int(rng.choice(CATEGORY_IDS))
            dets.append({"image_id": a["image_id"], "category_id": category, "bbox": [nx, ny, nw, nh],
                         "score": round(float(rng.uniform(0.05, 1.0)), 2), "segmentation": rle,
                         "keypoints": [round(float(v), 2) for v in kps.ravel()]})
    return dets


def pycocotools_stats(data: dict, dets: list[dict], iou_type: str, cat_ids=None) -> np.ndarray:
    """The reference: pycocotools called directly, the way its README shows."""
    coco = load_coco(data)
    field = {"bbox": None, "segm": "segmentation", "keypoints": "keypoints"}[iou_type]
    typed = [{k: v for k, v in d.items() if k in ("image_id", "category_id", "bbox", "score", field)} for d in dets]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco, coco.loadRes(typed), iou_type)
        if iou_type == "keypoints":
            coco_eval.params.kpt_oks_sigmas = np.array(SIGMAS)
        if cat_ids is not None:
            coco_eval.params.catIds = cat_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats


def test_ground_truth_against_itself_scores_one():
    data = make_gt()
    dataset = TinyDataset(data)
    metrics = evaluate(ReplayModel(gt_as_detections(data)), dataset, device="cpu", batch_size=3)
    assert set(metrics) == {"bbox", "segm", "keypoints"}
    for iou_type in metrics:
        assert metrics[iou_type]["AP"] == pytest.approx(1.0), iou_type
        assert metrics[iou_type]["AP50"] == pytest.approx(1.0), iou_type
        assert all(ap == pytest.approx(1.0) for ap in metrics[iou_type]["per_class"].values() if ap is not None)


def test_hand_made_detections_match_pycocotools(tmp_path):
    data = make_gt()
    dets = hand_made_detections(data)
    results_path = tmp_path / "results.json"
    metrics = evaluate(ReplayModel(dets), TinyDataset(data), device="cpu", results_path=results_path)
    for iou_type, names in (("bbox", DETECTION_STAT_NAMES), ("segm", DETECTION_STAT_NAMES),
                            ("keypoints", KEYPOINT_STAT_NAMES)):
        expected = pycocotools_stats(data, dets, iou_type)
        ours = [metrics[iou_type][n] for n in names]
        np.testing.assert_allclose(ours, expected, atol=1e-12, err_msg=iou_type)
        assert 0.05 < metrics[iou_type]["AP"] < 0.95  # a real, unsaturated test case
    written = json.loads(results_path.read_text())
    assert len(written) == len(dets)
    assert {r["category_id"] for r in written} <= set(CATEGORY_IDS)  # labels mapped back to COCO ids


def test_per_class_and_groups_match_restricted_cocoeval():
    data = make_gt()
    dets = hand_made_detections(data)
    groups = {"seen": [1, 2], "novel": [3]}  # labels -> category ids 3, 7 and 11
    metrics = evaluate(ReplayModel(dets), TinyDataset(data), device="cpu", class_groups=groups)
    for iou_type in ("bbox", "segm", "keypoints"):
        for name, cat_ids in (("seen", [3, 7]), ("novel", [11])):
            expected = pycocotools_stats(data, dets, iou_type, cat_ids=cat_ids)
            names = KEYPOINT_STAT_NAMES if iou_type == "keypoints" else DETECTION_STAT_NAMES
            ours = [metrics[iou_type]["groups"][name][n] for n in names]
            np.testing.assert_allclose(ours, expected, atol=1e-12, err_msg=f"{iou_type} {name}")
        for cid in CATEGORY_IDS:
            expected = pycocotools_stats(data, dets, iou_type, cat_ids=[cid])[0]
            assert metrics[iou_type]["per_class"][f"shape{cid}"] == pytest.approx(expected, abs=1e-12)
    flat = flatten_metrics(metrics)
    assert flat["segm/novel/AP"] == metrics["segm"]["groups"]["novel"]["AP"]
    table = format_table(metrics)
    assert "shape11" in table and "segm novel" in table


def test_no_detections_scores_zero_without_crashing():
    data = make_gt()
    metrics = evaluate(ReplayModel([]), TinyDataset(data), device="cpu")
    assert set(metrics) == {"bbox", "segm", "keypoints"}  # heads known from the empty outputs' keys
    for entry in metrics.values():
        assert entry["AP"] == 0.0 and entry["AP50"] == 0.0


def test_box_only_model_gets_box_metrics_only():
    data = make_gt()
    metrics = evaluate(ReplayModel(gt_as_detections(data), heads=()), TinyDataset(data), device="cpu")
    assert set(metrics) == {"bbox"} and metrics["bbox"]["AP"] == pytest.approx(1.0)


def test_gather_hook_merges_ranks_and_non_main_ranks_return_nothing():
    data = make_gt()
    dataset, model = TinyDataset(data), ReplayModel(hand_made_detections(data))
    full = evaluate(model, dataset, device="cpu")
    shards = []

    def gather_on_rank0(part):
        shards.append(part)
        return shards if len(shards) == 2 else None  # rank 1 first, then rank 0 sees everything

    assert evaluate(model, dataset, device="cpu", indices=[1, 3], gather=gather_on_rank0) == {}
    merged = evaluate(model, dataset, device="cpu", indices=[0, 2], gather=gather_on_rank0)
    assert flatten_metrics(merged) == flatten_metrics(full)


def test_keypoints_are_written_in_coco_pixel_indices_and_boxes_as_xywh():
    prediction = {"boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]]), "labels": torch.tensor([2]),
                  "scores": torch.tensor([0.5]), "masks": torch.zeros(1, 1, 64, 64),
                  "keypoints": torch.tensor([[[10.5, 20.5, 1.0], [29.5, 59.5, 1.0]]])}
    prediction["masks"][0, 0, 20:60, 10:30] = 0.8
    (result,) = predictions_to_coco(prediction, image_id=4, category_ids=torch.tensor([0, 3, 7]))
    assert result["bbox"] == [10.0, 20.0, 20.0, 40.0] and result["category_id"] == 7
    assert result["keypoints"] == [10.0, 20.0, 1.0, 29.0, 59.0, 1.0]
    assert mask_util.area(result["segmentation"]) == 20 * 40
    assert mask_util.toBbox(result["segmentation"]).tolist() == [10.0, 20.0, 20.0, 40.0]
    with pytest.raises(ValueError, match="image 4: predicted labels"):
        predictions_to_coco({**prediction, "labels": torch.tensor([5])}, image_id=4, category_ids=torch.tensor([0, 3]))
