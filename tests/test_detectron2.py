"""detectron2 weights against detectron2's own outputs (../shared/detectron2/, read in place).

Each model folder there holds seeded weights, the resolved config.yaml, three images and what
detectron2 itself returned for them (see its README). The folder is found through
$MASKRCNN_SHARED (the folder that holds `detectron2/`) or as `shared/detectron2` beside the
project root or one of its parents; a missing folder fails these tests (it never skips them).
Each model is loaded and run once per module; the tests then compare the stored results.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn.checkpoint.detectron2 import from_detectron2, read_detectron2

torch.set_num_threads(1)  # one thread per test process on this shared machine (see test_model.py)
MODELS = {
    "mask_rcnn_R_50_FPN": ("model_final.pkl", "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"),
    "keypoint_rcnn_R_50_FPN": ("model_final.pth", "COCO-Keypoints/keypoint_rcnn_R_50_FPN_3x.yaml"),
    "faster_rcnn_R_101_FPN": ("model_final.pth", "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml"),
}


def shared_detectron2() -> Path:
    """../shared/detectron2 of the project root, wherever the checkout lives."""
    if os.environ.get("MASKRCNN_SHARED"):
        candidates = [Path(os.environ["MASKRCNN_SHARED"]) / "detectron2"]
    else:
        root = Path(__file__).resolve().parents[1]
        candidates = [folder / "shared" / "detectron2" for folder in [root, *root.parents]]
    for candidate in candidates:
        if (candidate / "README.md").is_file():
            return candidate
    pytest.fail(f"detectron2 reference outputs not found (looked in {', '.join(map(str, candidates[:3]))}, ...): "
                "set MASKRCNN_SHARED to the folder that holds detectron2/")


@pytest.fixture(scope="module")
def shared() -> Path:
    return shared_detectron2()


def read_image(path: Path) -> torch.Tensor:
    """RGB floats in 0-1, our input convention."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255


def run_stages(model, image: torch.Tensor) -> dict:
    """One image through the model, keeping what detectron2's reference stores: the proposals and
    their logits, the 28 x 28 mask probabilities before pasting, and the final detections."""
    model.transform.min_size_test = min(image.shape[-2:])  # the reference ran each image at its own size
    with torch.no_grad():
        batch, _ = model.transform([image])
        features = model.backbone(batch.tensors)
        proposals, logits, _ = model.rpn.propose(batch, features)
        detections, _ = model.roi_heads(features, proposals, batch.image_sizes)
        final = model._to_original_size(detections, batch.image_sizes, [tuple(image.shape[-2:])])[0]
    return {"proposals": proposals[0], "logits": logits[0], "masks_28": detections[0].get("masks"), "final": final}


@pytest.fixture(scope="module", params=sorted(MODELS))
def reference(request, shared):
    """(name, [(detectron2's result, ours)] per image)."""
    name = request.param
    folder = shared / name
    model = from_detectron2(folder / MODELS[name][0], folder / "config.yaml")
    expected = json.loads(gzip.decompress((folder / "d2_outputs.json.gz").read_bytes()))["results"]
    return name, [(result, run_stages(model, read_image(folder / result["image"]))) for result in expected]


def test_proposals_equal(reference):
    _, pairs = reference
    for expected, ours in pairs:
        assert len(ours["proposals"]) == expected["num_proposals"], expected["image"]
        count = len(expected["proposals"])
        torch.testing.assert_close(ours["proposals"][:count], torch.tensor(expected["proposals"]), rtol=0, atol=1e-3)
        torch.testing.assert_close(ours["logits"][:count], torch.tensor(expected["proposal_logits"]), rtol=0, atol=1e-4)


def test_detections_equal(reference):
    _, pairs = reference
    for expected, ours in pairs:
        final = ours["final"]
        assert len(final["boxes"]) == len(expected["boxes"]) > 0, expected["image"]
        assert final["labels"].tolist() == [c + 1 for c in expected["classes"]], expected["image"]  # ours: 1..K
        torch.testing.assert_close(final["boxes"], torch.tensor(expected["boxes"]), rtol=0, atol=1e-3)
        torch.testing.assert_close(final["scores"], torch.tensor(expected["scores"]), rtol=0, atol=1e-4)


def test_masks_equal(reference):
    name, pairs = reference
    if "mask_probs_28" not in pairs[0][0]:
        assert "masks" not in pairs[0][1]["final"], f"{name} has no mask head in detectron2"
        return
    for expected, ours in pairs:
        probabilities = torch.tensor(expected["mask_probs_28"]).reshape(-1, 1, 28, 28)
        torch.testing.assert_close(ours["masks_28"], probabilities, rtol=0, atol=1e-4)
        pasted = ours["final"]["masks"][:, 0] >= 0.5  # detectron2 thresholds its pasted masks at 0.5
        theirs = torch.from_numpy(mask_utils.decode(expected["masks_rle"])).permute(2, 0, 1).bool()
        intersection = (pasted & theirs).flatten(1).sum(1)
        union = (pasted | theirs).flatten(1).sum(1)
        iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union, dtype=torch.float))
        assert iou.min() >= 0.99, (expected["image"], iou.min().item(), int(iou.argmin()))


def test_keypoints_equal(reference):
    name, pairs = reference
    if "keypoints" not in pairs[0][0]:
        assert "keypoints" not in pairs[0][1]["final"], f"{name} has no keypoint head in detectron2"
        return
    for expected, ours in pairs:
        keypoints = torch.tensor(expected["keypoints"])  # [N, K, 3]: x, y, detectron2's score
        torch.testing.assert_close(ours["final"]["keypoints"][..., :2], keypoints[..., :2], rtol=0, atol=0.05)
        torch.testing.assert_close(ours["final"]["keypoints_scores"], keypoints[..., 2], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_zoo_yaml_gives_the_resolved_settings(shared, name):
    """The zoo file with its _BASE_ chain and the resolved config.yaml describe the same model;
    they differ only in the test sizes (the references ran at 320 / 512, the zoo's are 800 / 1333)."""
    weights = shared / name / MODELS[name][0]
    resolved, _ = read_detectron2(weights=weights, config=shared / name / "config.yaml")
    zoo, _ = read_detectron2(weights=weights, config=shared / "zoo_configs" / MODELS[name][1])
    assert (resolved.transform.min_size_test, resolved.transform.max_size) == (320, 512)
    assert (zoo.transform.min_size_test, zoo.transform.max_size) == (800, 1333)
    zoo.transform.min_size_test, zoo.transform.max_size = 320, 512
    assert dataclasses.asdict(zoo) == dataclasses.asdict(resolved)
    assert zoo.transform.min_size == [640, 672, 704, 736, 768, 800]  # a tuple written as a string in the zoo file
