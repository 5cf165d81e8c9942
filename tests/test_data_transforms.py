"""Flip of every annotation type (checked against the flipped pixels and by flipping back), jitter,
and augmentation as a pure function of the generator's seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskrcnn.data.masks import InstanceMasks
from maskrcnn.data.transforms import TrainAugmentation, color_jitter, flip_horizontal, flip_permutation

H, W = 30, 50


def _sample():
    image = torch.zeros(3, H, W)
    image[0, 4:10, 6:20] = 1.0  # the object, red
    image[1, 12, 10] = 1.0  # the "left" keypoint pixel (COCO index x=10, y=12), green
    image[2, 7, 30] = 1.0  # the "right" keypoint pixel (x=30, y=7), blue
    polygon = [[6.0, 4.0, 20.0, 4.0, 20.0, 10.0, 6.0, 10.0]]  # the red rectangle in continuous coords
    target = {
        "boxes": torch.tensor([[6.0, 4.0, 20.0, 10.0]]),
        "labels": torch.tensor([1]),
        "crowd_boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0]]),
        "masks": InstanceMasks([polygon], image_size=(H, W)),
        # keypoints: nose unlabelled, left at pixel (10, 12), right at pixel (30, 7): +0.5 centres
        "keypoints": torch.tensor([[[0.0, 0.0, 0.0], [10.5, 12.5, 2.0], [30.5, 7.5, 1.0]]]),
        "point_coords": torch.tensor([[[7.25, 5.0], [19.0, 9.5]]]),
        "point_labels": torch.tensor([[1.0, -1.0]]),
        "image_id": 3,
    }
    return image, target


FLIP_MAP = [[1, 2]]


def test_flip_moves_annotations_with_the_pixels():
    image, target = _sample()
    flipped_image, flipped = flip_horizontal(image, target, keypoint_flip_map=FLIP_MAP)
    torch.testing.assert_close(flipped_image, image.flip(-1))
    torch.testing.assert_close(flipped["boxes"], torch.tensor([[30.0, 4.0, 44.0, 10.0]]))
    torch.testing.assert_close(flipped["crowd_boxes"], torch.tensor([[45.0, 0.0, 50.0, 5.0]]))
    # the mask is the red channel of the flipped image, exactly
    torch.testing.assert_close(flipped["masks"].to_tensor()[0], flipped_image[0].to(torch.uint8))
    # the box is the red pixels' extent
    ys, xs = torch.nonzero(flipped_image[0], as_tuple=True)
    torch.testing.assert_close(flipped["boxes"][0], torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float())
    # keypoints land on their pixels, and left/right swapped: the blue (formerly right) pixel is now "left"
    keypoints = flipped["keypoints"][0]
    assert keypoints[0].tolist() == [0.0, 0.0, 0.0]
    left_x, left_y = int(keypoints[1, 0]), int(keypoints[1, 1])
    right_x, right_y = int(keypoints[2, 0]), int(keypoints[2, 1])
    assert flipped_image[2, left_y, left_x] == 1 and keypoints[1, 2] == 1
    assert flipped_image[1, right_y, right_x] == 1 and keypoints[2, 2] == 2
    assert (left_x, right_x) == (W - 1 - 30, W - 1 - 10)  # COCO pixel index i -> W - 1 - i
    torch.testing.assert_close(flipped["point_coords"][0, 0], torch.tensor([42.75, 5.0]))
    assert flipped["labels"] is target["labels"] and flipped["image_id"] == 3


@pytest.mark.parametrize("dense", [False, True])
def test_flip_twice_is_identity(dense):
    image, target = _sample()
    if dense:
        target["masks"] = target["masks"].to_tensor()
    once_image, once = flip_horizontal(image, target, keypoint_flip_map=FLIP_MAP)
    twice_image, twice = flip_horizontal(once_image, once, keypoint_flip_map=FLIP_MAP)
    torch.testing.assert_close(twice_image, image)
    for key in ("boxes", "crowd_boxes", "keypoints", "point_coords", "point_labels"):
        torch.testing.assert_close(twice[key], target[key])
    masks = twice["masks"] if dense else twice["masks"].to_tensor()
    reference = target["masks"] if dense else target["masks"].to_tensor()
    torch.testing.assert_close(masks, reference)


def test_flip_of_empty_target():
    image = torch.rand(3, H, W)
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
              "masks": InstanceMasks([], image_size=(H, W)), "keypoints": torch.zeros(0, 3, 3)}
    _, flipped = flip_horizontal(image, target, keypoint_flip_map=FLIP_MAP)
    assert flipped["boxes"].shape == (0, 4) and flipped["keypoints"].shape == (0, 3, 3)
    assert flipped["masks"].to_tensor().shape == (0, H, W)


def test_flip_permutation():
    assert flip_permutation([[1, 2], [3, 4]], 5).tolist() == [0, 2, 1, 4, 3]
    assert flip_permutation(None, 3).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="out of range"):
        flip_permutation([[1, 5]], 3)


def test_augmentation_is_a_function_of_the_seed():
    image, target = _sample()
    augment = TrainAugmentation(horizontal_flip=0.5, color_jitter=0.4, keypoint_flip_map=FLIP_MAP)
    first = augment(image, target, torch.Generator().manual_seed(11))
    again = augment(image, target, torch.Generator().manual_seed(11))
    torch.testing.assert_close(first[0], again[0])
    torch.testing.assert_close(first[1]["boxes"], again[1]["boxes"])
    flips = [augment(image, target, torch.Generator().manual_seed(s))[1]["boxes"][0, 0].item() != 6.0 for s in range(200)]
    assert 0.35 < np.mean(flips) < 0.65
    never = TrainAugmentation(horizontal_flip=0.0)
    always = TrainAugmentation(horizontal_flip=1.0, keypoint_flip_map=FLIP_MAP)
    assert never(image, target, torch.Generator().manual_seed(0))[1]["boxes"][0, 0] == 6.0
    assert always(image, target, torch.Generator().manual_seed(0))[1]["boxes"][0, 0] == 30.0
    with pytest.raises(ValueError, match="probability"):
        TrainAugmentation(horizontal_flip=1.5)


def test_color_jitter_stays_in_range_and_matches_brightness_closed_form():
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    out = color_jitter(image, strength=0.5, generator=torch.Generator().manual_seed(1))
    assert out.shape == image.shape and out.min() >= 0 and out.max() <= 1 and not torch.equal(out, image)
    torch.testing.assert_close(color_jitter(image, strength=0.0, generator=torch.Generator()), image)
    # one step by hand: brightness multiplies, contrast blends with the grey mean, saturation with grey
    factors = 1.0 + (torch.rand(3, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 0.5
    grey_weights = torch.tensor([0.2989, 0.587, 0.114])[:, None, None]
    step = (image * factors[0]).clamp(0, 1)
    mean = (step * grey_weights).sum(0).mean()
    step = (factors[1] * step + (1 - factors[1]) * mean).clamp(0, 1)
    grey = (step * grey_weights).sum(0, keepdim=True)
    step = (factors[2] * step + (1 - factors[2]) * grey).clamp(0, 1)
    torch.testing.assert_close(out, step, atol=1e-5, rtol=0)
