"""InstanceMasks against pycocotools' decoding and roi_align on the dense masks."""

from __future__ import annotations

import pickle

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from torchvision.ops import roi_align

from maskrcnn.data.masks import InstanceMasks

H, W = 60, 80
TRIANGLE = [10.0, 5.0, 40.0, 12.5, 15.3, 44.0]
SQUARE_PARTS = [[50.0, 30.0, 70.0, 30.0, 70.0, 50.0, 50.0, 50.0], [45.0, 5.0, 55.0, 5.0, 50.0, 20.0]]


def _blob() -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    return (((yy - 35) / 15.0) ** 2 + ((xx - 30) / 22.0) ** 2 < 1).astype(np.uint8)


def _segmentations() -> list:
    compressed = mask_utils.encode(np.asfortranarray(_blob()))
    compressed = {"size": compressed["size"], "counts": compressed["counts"].decode()}  # as in JSON
    uncompressed_mask = np.zeros((H, W), np.uint8)
    uncompressed_mask[40:58, 2:20] = 1
    flat = uncompressed_mask.reshape(-1, order="F")
    changes = np.flatnonzero(np.diff(np.r_[0, flat, 0]))
    counts = np.diff(np.r_[0, changes, len(flat)]).tolist()
    if counts[-1] == 0:
        counts = counts[:-1]
    uncompressed = {"size": [H, W], "counts": counts}
    return [[TRIANGLE], SQUARE_PARTS, compressed, uncompressed, []]


def _reference_dense(segmentations: list) -> torch.Tensor:
    """pycocotools' own decoding (what COCO.annToMask does)."""
    out = []
    for seg in segmentations:
        if isinstance(seg, list):
            mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, H, W))) if seg else np.zeros((H, W), np.uint8)
        else:
            rle = mask_utils.frPyObjects(seg, H, W) if isinstance(seg["counts"], list) else seg
            mask = mask_utils.decode(rle)
        out.append(torch.from_numpy(mask))
    return torch.stack(out)


@pytest.fixture
def masks():
    return InstanceMasks(_segmentations(), image_size=(H, W))


def test_to_tensor_matches_pycocotools(masks):
    dense = masks.to_tensor()
    assert dense.dtype == torch.uint8 and dense.shape == (5, H, W)
    torch.testing.assert_close(dense, _reference_dense(_segmentations()))
    assert dense[3, 40:58, 2:20].all() and dense[3].sum() == 18 * 18
    assert dense[4].sum() == 0


def test_flip_moves_pixels(masks):
    dense = masks.to_tensor()
    flipped = masks.flip_horizontal()
    assert flipped.image_size == (H, W) and len(flipped) == 5
    # RLE and axis-aligned polygons flip exactly; slanted edges may differ where pycocotools'
    # rasteriser breaks ties differently for the mirrored outline
    torch.testing.assert_close(flipped.to_tensor()[1:], dense[1:].flip(-1))
    assert (flipped.to_tensor()[0] != dense[0].flip(-1)).sum() <= 0.05 * dense[0].sum()
    torch.testing.assert_close(flipped.flip_horizontal().to_tensor(), dense)


def test_resize_scales_masks(masks):
    resized = masks.resize(2 * H, 2 * W)
    assert resized.image_size == (2 * H, 2 * W) and masks.image_size == (H, W)  # masks untouched
    big = resized.to_tensor()
    reference = torch.nn.functional.interpolate(masks.to_tensor()[:, None].float(), scale_factor=2.0, mode="nearest")[:, 0]
    for k in range(4):
        intersection = (big[k].bool() & reference[k].bool()).sum()
        union = (big[k].bool() | reference[k].bool()).sum()
        assert intersection / union > 0.9
    assert big[3, 80:116, 4:40].all()  # the uncompressed box doubles exactly


def _dense_crops(dense: torch.Tensor, boxes: torch.Tensor, indices: torch.Tensor, size: int) -> torch.Tensor:
    rois = torch.cat([indices[:, None].float(), boxes], dim=1)
    return roi_align(dense[:, None].float(), rois, output_size=size, spatial_scale=1.0, sampling_ratio=0, aligned=True)[:, 0]


@pytest.mark.parametrize("flip", [False, True])
def test_crop_and_resize_rle_equals_dense_roi_align(masks, flip):
    current = masks.flip_horizontal() if flip else masks
    boxes = torch.tensor([[5.0, 20.0, 55.0, 52.0], [0.0, 38.0, 25.0, 60.0], [10.3, 30.1, 40.7, 50.9], [60.0, 0.0, 80.0, 10.0]])
    indices = torch.tensor([2, 3, 2, 3])
    crops = current.crop_and_resize(boxes, indices, 14)
    assert crops.shape == (4, 14, 14) and crops.dtype == torch.float32
    torch.testing.assert_close(crops, _dense_crops(current.to_tensor(), boxes, indices, 14), atol=1e-5, rtol=0)


@pytest.mark.parametrize("flip", [False, True])
def test_crop_and_resize_polygons_close_to_dense(masks, flip):
    current = masks.resize(90, 120)
    current = current.flip_horizontal() if flip else current
    boxes = torch.tensor([[10.0, 5.0, 70.0, 70.0], [60.0, 0.0, 110.0, 80.0], [20.0, 10.0, 50.0, 40.0]])
    indices = torch.tensor([0, 1, 0])
    crops = current.crop_and_resize(boxes, indices, 28)
    reference = _dense_crops(current.to_tensor(), boxes, indices, 28)
    assert set(crops.unique().tolist()) <= {0.0, 1.0}
    # edges differ by at most about one output pixel along the outline
    assert (crops - reference).abs().mean() < 0.06
    assert ((crops > 0.5) == (reference > 0.5)).float().mean() > 0.93


def test_mixed_crop_and_resize_and_empty(masks):
    boxes = torch.tensor([[0.0, 0.0, 80.0, 60.0]] * 5)
    crops = masks.crop_and_resize(boxes, torch.arange(5), 20)
    assert crops[4].sum() == 0  # the empty segmentation
    assert crops[:4].flatten(1).sum(1).gt(0).all()
    none = masks.crop_and_resize(torch.zeros((0, 4)), torch.zeros(0, dtype=torch.int64), 28)
    assert none.shape == (0, 28, 28)
    empty = InstanceMasks([], image_size=(H, W))
    assert len(empty) == 0 and empty.to_tensor().shape == (0, H, W)
    assert empty.resize(10, 20).to_tensor().shape == (0, 10, 20)


def test_indexing(masks):
    dense = masks.to_tensor()
    keep = torch.tensor([True, False, True, True, False])
    torch.testing.assert_close(masks[keep].to_tensor(), dense[keep])
    order = torch.tensor([3, 0], dtype=torch.int64)
    torch.testing.assert_close(masks[order].to_tensor(), dense[order])
    assert len(masks[torch.zeros(5, dtype=torch.bool)]) == 0
    assert masks.to("cpu") is masks


def test_bad_segmentations_are_rejected():
    with pytest.raises(ValueError, match="fewer than 3 points"):
        InstanceMasks([[[1.0, 2.0, 3.0, 4.0]]], image_size=(H, W))
    with pytest.raises(ValueError, match="RLE size"):
        InstanceMasks([{"size": [10, 10], "counts": [100]}], image_size=(H, W))


def test_thousand_instances_stay_small():
    """1,000 instances at 1333 x 800: dense would be ~1 GB; compact stays well under 1 MB."""
    rng = np.random.default_rng(0)
    centres = rng.uniform([50, 50], [1283, 750], size=(1000, 2))
    angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    outline = np.stack([np.cos(angles), np.sin(angles)], 1) * 30
    polygons = [[(outline + c).reshape(-1).tolist()] for c in centres]
    masks = InstanceMasks(polygons, image_size=(800, 1333)).resize(1000, 1666).flip_horizontal()
    dense_bytes = 1000 * 800 * 1333
    assert masks.nbytes < 300_000 and len(pickle.dumps(masks)) < 0.001 * dense_bytes
    boxes = torch.tensor([[100.0, 100.0, 300.0, 300.0]]).repeat(512, 1)
    crops = masks.crop_and_resize(boxes, torch.arange(512), 28)
    assert crops.shape == (512, 28, 28)
    rles = [mask_utils.frPyObjects(p, 800, 1333)[0] for p in polygons[:200]]
    rle_masks = InstanceMasks(rles, image_size=(800, 1333))
    assert rle_masks.nbytes < 200 * 1000 and len(pickle.dumps(rle_masks)) < 1_000_000
    assert rle_masks.crop_and_resize(boxes[:64], torch.arange(64), 28).shape == (64, 28, 28)


def test_degenerate_boxes_are_bounded(masks):
    """Zero-size RoIs must not make pycocotools rasterise an outline millions of pixels long."""
    boxes = torch.tensor([[20.0, 10.0, 20.0, 10.0], [20.0, 10.0, 20.0, 10.0], [20.0, 10.0, 20.01, 10.01]])
    crops = masks.crop_and_resize(boxes, torch.tensor([0, 2, 0]), 28)
    assert crops.shape == (3, 28, 28) and torch.isfinite(crops).all()
    # the point (20, 10) lies inside the triangle: a zero-size box there is all foreground
    assert crops[0].min() == 1 and crops[2].min() == 1
