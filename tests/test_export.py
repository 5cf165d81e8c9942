"""export.py: ONNX (onnxruntime) and TorchScript (torch.jit.load) files equal the eager model.

Small seeded models (ResNet-18, 16-channel FPN, 96 px); several image sizes, one of them an image
on which the eager model has no detection at all; a box-only, a mask and a keypoint model.
"""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch

from maskrcnn.checkpoint import save_checkpoint
from maskrcnn.cli import main
from maskrcnn.export import export_model
from maskrcnn.model.mask_rcnn import build_model
from tiny_models import tiny_config, tiny_model

KINDS = ("box", "mask", "keypoint")
# Tolerances for onnxruntime (its resize and convolutions round differently); TorchScript runs
# torch's own kernels and is compared at float precision.
TOLERANCE = {"boxes": 1e-3, "scores": 1e-5, "masks": 1e-4, "keypoints": 1e-3, "keypoints_scores": 1e-4}


def _tiny_model(kind: str) -> torch.nn.Module:
    model = tiny_model(kind)
    _threshold_between_images(model)
    return model


def _images() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [
        torch.rand(3, 60, 80, generator=generator),
        torch.rand(3, 90, 40, generator=generator),  # portrait: the longer side limits the scale
        torch.rand(3, 35, 150, generator=generator),  # wide
        torch.full((3, 60, 80), 0.5),  # no detection (see _threshold_between_images)
    ]


def _threshold_between_images(model: torch.nn.Module) -> None:
    """Set the box score threshold between the gray image's best score and the others' lowest
    best score, so that the same graph must give detections on three images and none on one."""
    model.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        best = [float(model([image])[0]["scores"].max()) for image in _images()]
    assert best[-1] < min(best[:-1]) - 1e-3, best  # the seeded model leaves a margin
    model.roi_heads.score_thresh = (best[-1] + min(best[:-1])) / 2


def _run_exported(path, format: str, images: torch.Tensor) -> list[np.ndarray]:
    if format == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        return [t.numpy() for t in torch.jit.load(str(path))(images)]


def _assert_equal(outputs: list[np.ndarray], expected: dict[str, torch.Tensor], names: list[str], format: str) -> None:
    assert len(outputs) == len(names)
    for name, value in zip(names, outputs):
        reference = expected[name].numpy()
        assert value.shape == reference.shape, (name, value.shape, reference.shape)
        if name == "labels" or name == "image_index":
            np.testing.assert_array_equal(value, reference)
        else:
            atol = TOLERANCE[name] if format == "onnx" else 1e-5
            np.testing.assert_allclose(value, reference, atol=atol, rtol=0, err_msg=name)


@pytest.fixture(scope="module", params=KINDS)
def model(request):
    return request.param, _tiny_model(request.param)


@pytest.mark.parametrize("format", ["onnx", "torchscript"])
def test_exported_model_equals_eager_model_on_every_size_and_on_no_detections(model, format, tmp_path):
    kind, model = model
    path = export_model(model, tmp_path / f"{kind}.{format}", format=format, example_size=(64, 80))
    names = ["boxes", "labels", "scores"] + {"box": [], "mask": ["masks"], "keypoint": ["keypoints", "keypoints_scores"]}[kind]
    counts = []
    for image in _images():
        with torch.no_grad():
            expected = model([image])[0]
        outputs = _run_exported(path, format, image[None])
        _assert_equal(outputs, expected, names, format)
        counts.append(len(outputs[0]))
    assert counts[-1] == 0 and min(counts[:-1]) > 0  # the same graph with and without detections


def test_box_masks_are_the_heads_28x28_masks_with_their_boxes(tmp_path):
    model = _tiny_model("mask")
    path = export_model(model, tmp_path / "box.onnx", format="onnx", masks="box", example_size=(64, 80))
    image = _images()[0]
    with torch.no_grad():
        expected = model([image])[0]
        batch, _ = model.transform([image])
        features = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, features)
        unpasted = model.roi_heads(features, proposals, batch.image_sizes)[0][0]["masks"]  # [N, 1, 28, 28]
    boxes, labels, scores, masks = _run_exported(path, "onnx", image[None])
    assert masks.shape == (len(boxes), 1, 28, 28) and len(boxes) > 0
    np.testing.assert_allclose(boxes, expected["boxes"].numpy(), atol=1e-3)
    np.testing.assert_allclose(masks, unpasted.numpy(), atol=1e-4)


def test_batch_of_two_gives_each_image_its_own_detections(tmp_path):
    model = _tiny_model("mask")
    path = export_model(model, tmp_path / "batch.pt", format="torchscript", batch_size=2, example_size=(64, 80))
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 70, 90, generator=generator)
    with torch.no_grad():
        expected = model(list(images))
    boxes, labels, scores, masks, image_index = _run_exported(path, "torchscript", images)
    for index in range(2):
        mine = image_index == index
        assert mine.sum() == len(expected[index]["boxes"]) > 0
        np.testing.assert_allclose(boxes[mine], expected[index]["boxes"].numpy(), atol=1e-5)
        np.testing.assert_array_equal(labels[mine], expected[index]["labels"].numpy())
        np.testing.assert_allclose(masks[mine], expected[index]["masks"].numpy(), atol=1e-5)


def test_cli_exports_a_checkpoint_that_onnxruntime_runs(tmp_path, capsys):
    model = _tiny_model("keypoint")
    save_checkpoint(tmp_path / "model.pth", model, model_config=model.config)
    out = tmp_path / "model.onnx"
    argv = ["export", "--weights", str(tmp_path / "model.pth"), "--format", "onnx", "--out", str(out), "--example-size", "64", "80"]
    assert main(argv) == 0
    assert str(out) in capsys.readouterr().out
    image = _images()[1]
    # the checkpoint keeps the config, not the threshold set on the module above: compare what it rebuilds
    rebuilt = build_model(model.config).eval()
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        expected = rebuilt([image])[0]
    outputs = _run_exported(out, "onnx", image[None])
    _assert_equal(outputs, expected, ["boxes", "labels", "scores", "keypoints", "keypoints_scores"], "onnx")


def test_cli_export_reports_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    argv = ["export", "--weights", str(tmp_path / "nope.pth"), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("maskrcnn export:") and "nope.pth" in error and "\n" not in error


def test_detectron2_style_options_export_too(tmp_path):
    # BGR 0-255 inputs, detectron2's size rounding, box post-processing and keypoint scores, a suppressed label
    config = tiny_config("all")
    transform = config.transform
    transform.channel_order, transform.pixel_scale, transform.size_rounding = "BGR", 255.0, "round"
    transform.image_mean, transform.image_std = [103.5, 116.3, 123.7], [57.4, 57.1, 58.4]
    config.box_head.postprocess, config.box_head.suppressed_labels = "detectron2", [2]
    config.keypoint_head.decoding = "detectron2"
    torch.manual_seed(0)
    model = build_model(config).eval()
    _threshold_between_images(model)
    path = export_model(model, tmp_path / "d2.onnx", format="onnx", example_size=(64, 80))
    names = ["boxes", "labels", "scores", "masks", "keypoints", "keypoints_scores"]
    for image in _images():
        with torch.no_grad():
            expected = model([image])[0]
        _assert_equal(_run_exported(path, "onnx", image[None]), expected, names, "onnx")
        assert 2 not in expected["labels"].tolist()
