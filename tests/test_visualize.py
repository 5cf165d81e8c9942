"""visualize.py: what gets drawn where, and the training-curve plot."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from maskrcnn.visualize import coco_skeleton, draw_predictions, label_color, plot_training_curves, save_png


def _prediction():
    masks = torch.zeros(2, 1, 48, 64)
    masks[0, 0, 10:30, 10:30] = 0.9
    masks[1, 0, 34:44, 40:60] = 0.9
    return {"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0], [40.0, 34.0, 60.0, 44.0]]),
            "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.2]), "masks": masks,
            "keypoints": torch.tensor([[[20.5, 10.5, 1.0], [20.5, 29.5, 1.0]], [[50.0, 34.0, 1.0], [50.0, 43.0, 1.0]]])}


def test_masks_boxes_and_keypoints_are_drawn_above_the_threshold_only():
    image = torch.full((3, 48, 64), 100, dtype=torch.uint8)
    drawn = draw_predictions(image, _prediction(), category_names={1: "circle"}, skeleton=[(0, 1)], score_threshold=0.5)
    assert drawn.shape == (3, 48, 64) and drawn.dtype == torch.uint8
    # Inside the first mask (away from the box edge, the caption and the keypoints): alpha blend with its colour.
    expected = (100 * 0.55 + torch.tensor(label_color(1), dtype=torch.float32) * 0.45).to(torch.uint8)
    assert torch.equal(drawn[:, 25, 13], expected)
    # The box outline uses the label's colour.
    assert torch.equal(drawn[:, 29, 25], torch.tensor(label_color(1), dtype=torch.uint8))
    # The skeleton line between the two keypoints is white.
    assert torch.equal(drawn[:, 20, 20], torch.tensor([255, 255, 255], dtype=torch.uint8))
    # The second detection (score 0.2) is not drawn at all.
    assert torch.equal(drawn[:, 34:45, 40:61], image[:, 34:45, 40:61])


def test_nothing_to_draw_returns_the_image_and_float_images_are_converted():
    image = torch.rand(3, 20, 30)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
             "masks": torch.zeros(0, 1, 20, 30)}
    drawn = draw_predictions(image, empty)
    assert torch.equal(drawn, (image * 255).round().to(torch.uint8))


def test_save_png_and_coco_skeleton(tmp_path):
    image = torch.randint(0, 255, (3, 10, 12), dtype=torch.uint8)
    path = save_png(image, tmp_path / "sub" / "a.png")
    assert torch.equal(torch.from_numpy(__import__("numpy").array(Image.open(path))).permute(2, 0, 1), image)
    assert coco_skeleton({"skeleton": [[1, 3], [2, 4]]}) == [(0, 2), (1, 3)]


def test_plot_training_curves_writes_a_png(tmp_path):
    lines = [{"iteration": i, "loss": 3.0 / (i + 1), "loss_mask": 0.7 / (i + 1), "lr": 0.01} for i in range(0, 50, 5)]
    lines.append({"iteration": 50, "bbox/AP": 0.3, "segm/AP": 0.35})
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = plot_training_curves(metrics, tmp_path / "curves.png")
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.width > picture.height > 100


def test_plot_training_curves_names_the_bad_line(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"iteration": 1, "loss": 1.0}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        plot_training_curves(metrics, tmp_path / "c.png")


def test_overlay_masks_in_chunks_blends_like_torchvision_where_masks_do_not_overlap():
    from torchvision.utils import draw_segmentation_masks

    from maskrcnn.visualize import overlay_masks

    generator = torch.Generator().manual_seed(0)
    canvas = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8, generator=generator)
    masks = torch.rand((3, 40, 50), generator=generator) > 0.6
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    ours = overlay_masks(canvas, [(0, masks[:2]), (2, masks[2:])], colors=colors)
    reference = draw_segmentation_masks(canvas, masks, alpha=0.45, colors=colors)
    once = masks.sum(0) == 1
    assert torch.equal(ours[:, once], reference[:, once])
    assert torch.equal(ours[:, ~masks.any(0)], canvas[:, ~masks.any(0)])
    twice = masks[1] & masks[2]  # the later mask shows
    assert torch.equal(ours[:, twice], (canvas[:, twice].float() * 0.55 + torch.tensor([0, 0, 255.0])[:, None] * 0.45).to(torch.uint8))
