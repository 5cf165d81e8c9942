"""Training augmentation: horizontal flip of every annotation type, optional photometric jitter.

Resizing to the training scales is the model's transform (docs/design.md), not done here.
Randomness comes only from the `generator` argument, which the training loader seeds from
(seed, epoch, index): a resumed run, or one with another number of workers, sees the same
augmented images.

Flip in continuous coordinates (pixel i covers [i, i+1)): x' = W - x. For boxes that maps
[x1, x2] to [W - x2, W - x1]; keypoints hold continuous pixel centres (COCO index + 0.5,
see data/coco.py), so pixel index i goes to W - 1 - i, as the image's pixels do.
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision.transforms.v2.functional as TF


def flip_permutation(flip_map: list[list[int]] | None, num_keypoints: int) -> torch.Tensor:
    """int64 [K]: after a flip, keypoint k takes the values of keypoint permutation[k]."""
    permutation = torch.arange(num_keypoints)
    for left, right in flip_map or []:
        if not (0 <= left < num_keypoints and 0 <= right < num_keypoints):
            raise ValueError(f"keypoint flip map pair {[left, right]} out of range for {num_keypoints} keypoints")
        permutation[left], permutation[right] = right, left
    return permutation


def _flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    # [N, 4] x1y1x2y2 -> [W - x2, y1, W - x1, y2]
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def flip_horizontal(image: torch.Tensor, target: dict[str, Any], *,
                    keypoint_flip_map: list[list[int]] | None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mirrors image [C, H, W] and every spatial key of the target (docs/design.md's table).

    Keypoints swap left/right through `keypoint_flip_map` ([[left, right], ...] indices);
    unlabelled keypoints (v = 0) keep their zero coordinates.
    """
    width = image.shape[-1]
    target = dict(target)
    for key in ("boxes", "crowd_boxes"):
        if key in target:
            target[key] = _flip_boxes(target[key], width)
    if "masks" in target:
        masks = target["masks"]
        target["masks"] = masks.flip(-1) if isinstance(masks, torch.Tensor) else masks.flip_horizontal()
    if "keypoints" in target:
        keypoints = target["keypoints"].clone()  # [N, K, 3]
        labelled = keypoints[..., 2] > 0
        keypoints[..., 0] = torch.where(labelled, width - keypoints[..., 0], keypoints[..., 0])
        target["keypoints"] = keypoints[:, flip_permutation(keypoint_flip_map, keypoints.shape[1])]
    if "point_coords" in target:
        coords = target["point_coords"].clone()  # [N, P, 2]; padding (label -1) is ignored anyway
        coords[..., 0] = width - coords[..., 0]
        target["point_coords"] = coords
    return image.flip(-1), target


def color_jitter(image: torch.Tensor, *, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation, each scaled by a factor in [1 - s, 1 + s]; [3, H, W] in 0-1."""
    factors = 1.0 + (torch.rand(3, generator=generator) * 2 - 1) * strength
    image = TF.adjust_brightness(image, float(factors[0]))
    image = TF.adjust_contrast(image, float(factors[1]))
    return TF.adjust_saturation(image, float(factors[2])).clamp_(0, 1)


class TrainAugmentation:
    """`(image, target, generator) -> (image, target)`: flip with probability `horizontal_flip`,
    then photometric jitter of strength `color_jitter` (0 disables it)."""

    def __init__(self, *, horizontal_flip: float = 0.5, color_jitter: float = 0.0,
                 keypoint_flip_map: list[list[int]] | None = None) -> None:
        if not 0.0 <= horizontal_flip <= 1.0:
            raise ValueError(f"horizontal_flip is a probability, got {horizontal_flip}")
        if not 0.0 <= color_jitter < 1.0:
            raise ValueError(f"color_jitter must be in [0, 1), got {color_jitter}")
        self.horizontal_flip = horizontal_flip
        self.color_jitter = color_jitter
        self.keypoint_flip_map = keypoint_flip_map

    def __call__(self, image: torch.Tensor, target: dict[str, Any],
                 generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        # the flip draw is always taken, so turning jitter on or off does not change which images flip
        if float(torch.rand((), generator=generator)) < self.horizontal_flip:
            image, target = flip_horizontal(image, target, keypoint_flip_map=self.keypoint_flip_map)
        if self.color_jitter > 0:
            image = color_jitter(image, strength=self.color_jitter, generator=generator)
        return image, target

    def __repr__(self) -> str:
        return (f"TrainAugmentation(horizontal_flip={self.horizontal_flip}, color_jitter={self.color_jitter}, "
                f"keypoint_flip_map={self.keypoint_flip_map})")
