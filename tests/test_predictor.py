"""predictor.py: every input kind gives the detections of `model([...])` on the same pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn import Predictor
from maskrcnn.model.mask_head import paste_masks
from maskrcnn.predictor import paste_in_chunks
from tiny_models import tiny_model

CATEGORIES = [{"id": 7, "name": "circle"}, {"id": 3, "name": "square"}, {"id": 11, "name": "star"}]
THRESHOLD = 0.3


@pytest.fixture(scope="module")
def model():
    return tiny_model("all", score_thresh=0.0)


def _pixels(seed: int, height: int = 50, width: int = 70) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)  # [H, W, 3] RGB


def _reference(model, arrays: list[np.ndarray]) -> list[dict]:
    """model([...]) on the same float pixels, the detections at or above THRESHOLD kept."""
    images = [torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays]
    with torch.no_grad():
        outputs = model(images)
    return [{k: v[o["scores"] >= THRESHOLD] for k, v in o.items()} for o in outputs]


def _assert_same(result: dict, expected: dict) -> None:
    assert len(expected["boxes"]) > 0  # the comparison means something
    for key in ("boxes", "labels", "scores", "masks", "keypoints", "keypoints_scores"):
        torch.testing.assert_close(result[key], expected[key], rtol=0, atol=0, msg=key)


def test_each_input_kind_gives_the_models_detections(model, tmp_path):
    pixels = _pixels(0)
    expected = _reference(model, [pixels])[0]
    Image.fromarray(pixels).save(tmp_path / "image.png")
    predictor = Predictor(model, device="cpu", score_threshold=THRESHOLD, categories=CATEGORIES)
    bgr = Predictor(model, device="cpu", score_threshold=THRESHOLD, input_format="BGR")
    tensor = torch.from_numpy(pixels).permute(2, 0, 1)
    for result in (
        predictor(tmp_path / "image.png"),
        predictor(str(tmp_path / "image.png")),
        predictor(Image.fromarray(pixels)),
        predictor(pixels),
        bgr(np.ascontiguousarray(pixels[:, :, ::-1])),  # as OpenCV reads it
        predictor(tensor),  # uint8
        predictor(tensor.float() / 255),
    ):
        _assert_same(result, expected)


def test_a_list_runs_batched_like_the_model_on_that_batch(model):
    arrays = [_pixels(1), _pixels(2, 64, 48), _pixels(3)]
    expected = _reference(model, arrays)  # one batch: the padding is the batch's, as in the predictor
    predictor = Predictor(model, device="cpu", score_threshold=THRESHOLD, batch_size=3)
    results = predictor([arrays[0], Image.fromarray(arrays[1]), torch.from_numpy(arrays[2]).permute(2, 0, 1)])
    assert isinstance(results, list) and len(results) == 3
    for result, reference in zip(results, expected):
        _assert_same(result, reference)
    same_size = torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in (arrays[0], arrays[2])])  # [2, 3, H, W]
    stacked = Predictor(model, device="cpu", score_threshold=THRESHOLD, batch_size=2)(same_size)
    for result, reference in zip(stacked, _reference(model, [arrays[0], arrays[2]])):
        _assert_same(result, reference)


def test_uint8_tensors_reach_our_model_as_they_are_and_other_models_as_floats(model):
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    pixels = torch.from_numpy(_pixels(4)).permute(2, 0, 1)  # uint8 [3, H, W]
    result = Predictor(model, device="cpu", score_threshold=THRESHOLD).predict_tensors([pixels])[0]
    _assert_same(result, _reference(model, [_pixels(4)])[0])
    torch.manual_seed(0)
    theirs = MaskRCNN(resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5), num_classes=3,
                      min_size=64, max_size=64, box_score_thresh=0.0).eval()  # its transform wants floats
    predictor = Predictor(theirs, device="cpu", score_threshold=0.0)
    from_pixels, from_floats = predictor.predict_tensors([pixels])[0], predictor.predict_tensors([pixels.float() / 255])[0]
    assert len(from_floats["boxes"]) > 0
    for key in ("boxes", "scores", "masks"):
        assert torch.equal(from_pixels[key], from_floats[key]), key


def test_results_name_their_classes_and_category_ids(model):
    result = Predictor(model, device="cpu", score_threshold=THRESHOLD, categories=CATEGORIES)(_pixels(0))
    by_label = {1: ("square", 3), 2: ("circle", 7), 3: ("star", 11)}  # labels follow ascending ids
    assert result["names"] == [by_label[label][0] for label in result["labels"].tolist()]
    assert result["category_ids"].tolist() == [by_label[label][1] for label in result["labels"].tolist()]


def test_box_masks_paste_to_the_models_masks(model):
    pixels = _pixels(0)
    expected = _reference(model, [pixels])[0]
    result = Predictor(model, device="cpu", score_threshold=THRESHOLD, masks="box")(pixels)
    assert result["masks"].shape == (len(expected["boxes"]), 1, 28, 28)
    torch.testing.assert_close(result["boxes"], expected["boxes"], rtol=0, atol=0)
    size = pixels.shape[:2]
    torch.testing.assert_close(paste_masks(result["masks"], result["boxes"], size, padding=1), expected["masks"])
    chunks = list(paste_in_chunks(result["masks"], result["boxes"], size, aligned=False, max_values=3 * 50 * 70))
    assert [start for start, _ in chunks] == list(range(0, len(expected["boxes"]), 3))
    torch.testing.assert_close(torch.cat([c for _, c in chunks]), expected["masks"][:, 0] > 0.5)


def test_bad_inputs_are_named_by_position(model):
    predictor = Predictor(model, device="cpu")
    with pytest.raises(TypeError, match="input 1: numpy images must be uint8"):
        predictor([_pixels(0), np.zeros((8, 8, 3), np.float64)])
    with pytest.raises(ValueError, match=r"input 0: expected a \[3, H, W\] tensor"):
        predictor(torch.zeros(4, 8, 8))
    with pytest.raises(FileNotFoundError, match="input 0: .*missing.png is not a file"):
        predictor("missing.png")


def test_cpu_inference_modes(model):
    """inference_mode runs optimize_for_cpu: strict gives the model's boxes, labels and scores
    exactly, fast within float tolerance; a bad mode is named."""
    arrays = [_pixels(3)]
    expected = _reference(model, arrays)[0]
    strict = Predictor(model, device="cpu", score_threshold=THRESHOLD, inference_mode="strict")(arrays[0])
    fast = Predictor(model, device="cpu", score_threshold=THRESHOLD, inference_mode="fast")(arrays[0])
    assert strict["names"] == fast["names"]
    for key in ("boxes", "labels", "scores"):
        torch.testing.assert_close(strict[key], expected[key], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(fast[key], expected[key], rtol=1e-4, atol=1e-3, msg=key)
    with pytest.raises(ValueError, match="inference_mode must be one of"):
        Predictor(model, device="cpu", inference_mode="turbo")
