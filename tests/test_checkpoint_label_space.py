"""Label spaces: torchvision's 91-slot COCO table, COCO's 80 names, and evaluate / predict writing
the file's own category ids for a converted torchvision COCO model."""

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from torchvision.models.detection import MaskRCNN as TvMaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from maskrcnn.checkpoint.format import load_checkpoint, read_checkpoint
from maskrcnn.checkpoint.label_space import (
    category_id_table,
    coco_categories,
    labels_from_categories,
    torchvision_coco_labels,
    unused_labels,
)
from maskrcnn.checkpoint.torchvision import from_torchvision
from maskrcnn.cli import main
from maskrcnn.data.coco import decode_image
from maskrcnn.visualize import save_png

torch.set_num_threads(1)
NA_SLOTS = [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]  # torchvision's "N/A" entries: ids COCO never used


def test_coco_tables():
    categories = coco_categories()
    assert len(categories) == 80 and categories[0] == {"id": 1, "name": "person"}
    assert categories[-1] == {"id": 90, "name": "toothbrush"}
    slots = torchvision_coco_labels()
    assert all(entry["label"] == entry["id"] for entry in slots) and len(slots) == 80
    assert {e["label"]: e["name"] for e in slots}[13] == "stop sign"
    assert unused_labels(slots, num_classes=90) == NA_SLOTS
    contiguous = labels_from_categories(coco_categories())  # detectron2's zoo: the 80 categories in a row
    assert (contiguous[11]["label"], contiguous[11]["id"], contiguous[11]["name"]) == (12, 13, "stop sign")
    assert category_id_table(contiguous)[[1, 12, 80]].tolist() == [1, 13, 90]


def coco_torchvision_model(seed=0):
    """A torchvision Mask R-CNN with COCO's 91-slot head (ResNet-18 for speed), random weights whose
    detections are confident and of many classes.

    Random box features share one large common direction, which would give every RoI the same
    class; the classifier is made blind to it (rows orthogonal to the mean feature) and sharp."""
    torch.manual_seed(seed)
    model = TvMaskRCNN(resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5),
                       num_classes=91, min_size=128, max_size=128).eval()
    features = []
    hook = model.roi_heads.box_head.register_forward_hook(lambda module, args, output: features.append(output))
    with torch.no_grad():
        model([torch.rand(3, 96, 128), torch.rand(3, 128, 96)])
        hook.remove()
        features = torch.cat(features)  # [R, 1024]
        mean = features.mean(0) / features.mean(0).norm()
        weight = torch.randn(91, features.shape[1])
        weight -= (weight @ mean)[:, None] * mean  # [91, 1024], orthogonal to the common direction
        spread = (features @ weight.T).std()
        model.roi_heads.box_predictor.cls_score.weight.copy_(weight * 8 / spread)
        model.roi_heads.box_predictor.cls_score.bias.zero_()
    return model


def test_na_slots_are_never_predicted():
    theirs = coco_torchvision_model()
    theirs.roi_heads.detections_per_img = 20
    image = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        favourite = theirs([image])[0]["labels"].mode().values  # the class these random weights predict most
        classifier = theirs.roi_heads.box_predictor.cls_score
        classifier.weight[26], classifier.bias[26] = classifier.weight[favourite], classifier.bias[favourite] + 0.5
        # the N/A slot 26 now outscores it wherever it is predicted
        ours = from_torchvision(theirs)
        expected, got = theirs([image])[0], ours([image])[0]
    assert ours.config.box_head.suppressed_labels == NA_SLOTS and ours.label_space == torchvision_coco_labels()
    assert set(expected["labels"].tolist()) & set(NA_SLOTS)  # torchvision does predict them
    assert len(got["labels"]) > 0 and not set(got["labels"].tolist()) & set(NA_SLOTS)
    real = ~torch.isin(expected["labels"], torch.tensor(NA_SLOTS))  # the rest is torchvision's own output
    best = expected["scores"][real][: len(got["scores"])]
    torch.testing.assert_close(got["scores"][: len(best)], best, rtol=1e-4, atol=1e-5)


def _ground_truth_from(model, image_paths, score_threshold):
    """A COCO file with COCO's 80 real categories whose annotations are the model's own detections."""
    images, annotations = [], []
    ids = category_id_table(model.label_space)
    for image_id, path in enumerate(image_paths, start=1):
        image = decode_image(path)
        images.append({"id": image_id, "file_name": path.name, "height": image.shape[1], "width": image.shape[2]})
        with torch.no_grad():
            output = model([image])[0]
        for box, label, score, mask in zip(output["boxes"], output["labels"], output["scores"], output["masks"]):
            assert score >= score_threshold  # the evaluation reproduces exactly these detections
            binary = np.asfortranarray((mask[0] > 0.5).numpy().astype(np.uint8))
            rle = mask_util.encode(binary)
            x1, y1, x2, y2 = box.tolist()
            assert binary.any() and x2 - x1 > 1 and y2 - y1 > 1, "pick another seed: a degenerate detection"
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(ids[label]), "iscrowd": 0,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(mask_util.area(rle)),
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
            })
    return {"images": images, "annotations": annotations, "categories": coco_categories()}


def test_converted_coco_model_evaluates_and_predicts_in_coco_ids(tmp_path, capsys):
    torch.save(coco_torchvision_model().state_dict(), tmp_path / "tv.pth")
    assert main(["convert", str(tmp_path / "tv.pth"), str(tmp_path / "ours.pth")]) == 0
    checkpoint = read_checkpoint(tmp_path / "ours.pth")
    assert checkpoint["labels"] == torchvision_coco_labels()
    # small images and few, confident detections keep the test in seconds; labels are what it checks
    config = checkpoint["model_config"]
    config["transform"].update(min_size_test=128, max_size=128)
    config["box_head"].update(score_thresh=0.5, detections_per_img=8)
    torch.save(checkpoint, tmp_path / "ours.pth")
    model = load_checkpoint(tmp_path / "ours.pth")

    generator = torch.Generator().manual_seed(5)
    paths = [save_png(torch.rand(3, 96, 128, generator=generator), tmp_path / "images" / f"{i}.png") for i in range(2)]
    truth = _ground_truth_from(model, paths, score_threshold=0.5)
    used_ids = sorted({a["category_id"] for a in truth["annotations"]})
    assert len(used_ids) >= 3 and max(used_ids) > 12  # beyond 12, "position + 1" and COCO's ids differ
    (tmp_path / "val.json").write_text(json.dumps(truth))

    out = tmp_path / "evaluation"
    assert main(["evaluate", "--weights", str(tmp_path / "ours.pth"), "--data", str(tmp_path / "val.json"),
                 "--images", str(tmp_path / "images"), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)
    results = json.loads((out / "results.json").read_text())
    assert sorted(r["category_id"] for r in results) == sorted(a["category_id"] for a in truth["annotations"])

    assert main(["predict", "--weights", str(tmp_path / "ours.pth"), str(tmp_path / "images"),
                 "--out", str(tmp_path / "pred"), "--score-threshold", "0.5"]) == 0
    predicted = json.loads((tmp_path / "pred" / "results.json").read_text())
    assert sorted(r["category_id"] for r in predicted) == sorted(a["category_id"] for a in truth["annotations"])

    # a file that numbers its categories differently is refused, naming the id and both names
    truth["categories"] = [dict(c, name="unicorn") if c["id"] == used_ids[-1] else c for c in truth["categories"]]
    (tmp_path / "renamed.json").write_text(json.dumps(truth))
    capsys.readouterr()
    assert main(["evaluate", "--weights", str(tmp_path / "ours.pth"), "--data", str(tmp_path / "renamed.json"),
                 "--images", str(tmp_path / "images"), "--out", str(out)]) == 2
    assert f"category id {used_ids[-1]} is 'unicorn' in the file" in capsys.readouterr().err
