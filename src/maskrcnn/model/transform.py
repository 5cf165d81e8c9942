"""Input transform: normalise, resize, batch with padding; and map results back to the original size.

Numerically equal to torchvision's `GeneralizedRCNNTransform` (the same `interpolate` calls, the
same random choice of the training scale), so that the two models see identical input tensors.
Coordinates follow docs/design.md: boxes x1y1x2y2 and keypoints / points in continuous pixel
coordinates, which scale by plain multiplication when the image is resized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ImageBatch:
    """Resized, normalised images padded into one tensor.

    `tensors [B, 3, H_pad, W_pad]` (H_pad, W_pad multiples of `size_divisible`, zero padding on the
    bottom / right); `image_sizes[i] = (h, w)`, the size of image i inside the padding.
    (The attribute names match torchvision's `ImageList`.)
    """

    tensors: Tensor
    image_sizes: list[tuple[int, int]]

    def to(self, device: torch.device | str) -> ImageBatch:
        return ImageBatch(self.tensors.to(device), self.image_sizes)


def scale_boxes(boxes: Tensor, original_size: tuple[int, int], new_size: tuple[int, int]) -> Tensor:
    """Rescale `boxes [N, 4]` x1y1x2y2 from an image of `original_size (h, w)` to `new_size (h, w)`."""
    ratio_h, ratio_w = _ratios(original_size, new_size, boxes.device)
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack((x1 * ratio_w, y1 * ratio_h, x2 * ratio_w, y2 * ratio_h), dim=1)


def scale_points(points: Tensor, original_size: tuple[int, int], new_size: tuple[int, int]) -> Tensor:
    """Rescale `points [..., >=2]` whose last dimension starts with (x, y); further columns
    (keypoint visibility) are kept."""
    ratio_h, ratio_w = _ratios(original_size, new_size, points.device)
    scaled = points.clone()
    scaled[..., 0] *= ratio_w
    scaled[..., 1] *= ratio_h
    return scaled


def _ratios(original_size: tuple[int, int], new_size: tuple[int, int], device: torch.device) -> list[Tensor]:
    # float32 tensor division, as torchvision does, so that rescaled boxes agree to the last bit
    return [
        torch.tensor(new, dtype=torch.float32, device=device) / torch.tensor(old, dtype=torch.float32, device=device)
        for new, old in zip(new_size, original_size)
    ]


CHANNEL_ORDERS = ("RGB", "BGR")
SIZE_ROUNDINGS = ("floor", "round")


def rounded_size(original_size: tuple[int, int], min_size: int, max_size: int) -> tuple[int, int]:
    """detectron2's `ResizeShortestEdge` output size (h, w): the shorter side becomes `min_size`,
    then both shrink if the longer one exceeds `max_size`; sides rounded to the nearest pixel."""
    height, width = original_size
    scale = min_size / min(height, width)
    new_h, new_w = (min_size, scale * width) if height < width else (scale * height, min_size)
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return int(new_h + 0.5), int(new_w + 0.5)


class ImageTransform(nn.Module):
    """Normalise, resize and batch images (and resize their targets).

    Training picks one of `min_size` per image (torchvision's `torch_choice`, drawn from torch's
    global RNG); evaluation uses `min_size_test`. The shorter side becomes that size unless the
    longer side would then exceed `max_size`.

    Inputs are RGB, floats in 0-1 or uint8 in 0-255 (read as pixel / 255, the numbers
    `decode_image` gives: a uint8 image costs a quarter of the memory while the model runs, which
    on a 4000 x 3000 photo is 108 MB). Weights trained on other pixels say so with
    `channel_order` ("BGR": the channels are reversed first) and `pixel_scale` (255: the values are
    multiplied first); `image_mean` / `image_std` are in those channels and units (detectron2's
    `PIXEL_MEAN` / `PIXEL_STD`). `size_rounding` "floor" is torchvision's resized size
    (floor(side * scale)); "round" is detectron2's `ResizeShortestEdge` (int(side * scale + 0.5),
    with the scale worked out from the shorter side first and then the longer one).
    """

    def __init__(
        self,
        *,
        min_size: list[int] | tuple[int, ...],
        min_size_test: int,
        max_size: int,
        image_mean: list[float],
        image_std: list[float],
        size_divisible: int = 32,
        channel_order: str = "RGB",
        pixel_scale: float = 1.0,
        size_rounding: str = "floor",
    ) -> None:
        super().__init__()
        if channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"transform.channel_order must be one of {CHANNEL_ORDERS}, got {channel_order!r}")
        if size_rounding not in SIZE_ROUNDINGS:
            raise ValueError(f"transform.size_rounding must be one of {SIZE_ROUNDINGS}, got {size_rounding!r}")
        self.channel_order, self.pixel_scale, self.size_rounding = channel_order, float(pixel_scale), size_rounding
        self.min_size = tuple(int(s) for s in min_size)
        self.min_size_test = int(min_size_test)
        self.max_size = int(max_size)
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.size_divisible = int(size_divisible)

    def forward(
        self, images: list[Tensor], targets: list[dict] | None = None
    ) -> tuple[ImageBatch, list[dict] | None]:
        """`images`: list of `[3, H_i, W_i]` floats in 0-1 or uint8. Targets are copied, never modified in place."""
        resized_images, resized_targets = [], []
        for index, image in enumerate(images):
            if image.dim() != 3 or image.shape[0] != len(self.image_mean):
                raise ValueError(
                    f"image {index}: expected a [{len(self.image_mean)}, H, W] tensor, got shape {tuple(image.shape)}"
                )
            if not image.is_floating_point() and image.dtype != torch.uint8:
                raise TypeError(f"image {index}: expected floats in 0-1 or uint8, got dtype {image.dtype}")
            target = None if targets is None else dict(targets[index])
            image, target = self.resize(self.normalize(image), target)
            resized_images.append(image)
            resized_targets.append(target)
        image_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in resized_images]
        batch = ImageBatch(self.batch_images(resized_images), image_sizes)
        return batch, (resized_targets if targets is not None else None)

    def normalize(self, image: Tensor) -> Tensor:
        """`[3, H, W]` RGB in 0-1 (or uint8) -> the weights' channels and units, minus mean, over std."""
        owned = image.dtype == torch.uint8  # the float copy is ours to change in place
        if owned:
            image = image.float().div_(255.0)  # decode_image's conversion, to the bit
        if self.channel_order == "BGR":
            image = image.flip(0)
        if self.pixel_scale != 1.0:
            image = image * self.pixel_scale
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
        # in place on the difference (or on our own copy): the same numbers, one full-size temporary
        # fewer (a 4000 x 3000 image: 144 MB)
        centred = image.sub_(mean[:, None, None]) if owned else image - mean[:, None, None]
        return centred.div_(std[:, None, None])

    def choose_min_size(self) -> int:
        if not self.training:
            return self.min_size_test
        # torchvision's torch_choice: always one draw from torch's RNG, so seeded runs stay in step
        index = int(torch.empty(1).uniform_(0.0, float(len(self.min_size))).item())
        return self.min_size[index]

    def resize(self, image: Tensor, target: dict | None = None) -> tuple[Tensor, dict | None]:
        """Resize `image [3, H, W]` and, when given, its target (boxes, crowd_boxes, masks, keypoints,
        point_coords) to the chosen scale."""
        original_size = (int(image.shape[-2]), int(image.shape[-1]))
        min_size = self.choose_min_size()
        scale = min(min_size / min(original_size), self.max_size / max(original_size))
        if self.size_rounding == "floor":
            # The output size is floor(side * scale) and the sampling grid follows that size: the pixels
            # of torchvision's call (scale_factor with recompute_scale_factor=True). At least 1 pixel, so
            # that an extreme aspect ratio (10000 x 10) shrinks its short side to 1 instead of failing.
            size = tuple(max(1, math.floor(float(side) * scale)) for side in original_size)
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        else:
            size = tuple(max(1, side) for side in rounded_size(original_size, min_size, self.max_size))
            if size != original_size:  # the same size is the identity (detectron2 skips it too)
                image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        if target is None:
            return image, None
        new_size = (int(image.shape[-2]), int(image.shape[-1]))
        target["boxes"] = scale_boxes(target["boxes"], original_size, new_size)
        if "crowd_boxes" in target:
            target["crowd_boxes"] = scale_boxes(target["crowd_boxes"], original_size, new_size)
        if "keypoints" in target:
            target["keypoints"] = scale_points(target["keypoints"], original_size, new_size)
        if "point_coords" in target:
            target["point_coords"] = scale_points(target["point_coords"], original_size, new_size)
        if "masks" in target:
            masks = target["masks"]
            if isinstance(masks, Tensor):
                # nearest-neighbour on the dense masks, torchvision's call
                masks = F.interpolate(masks[:, None].float(), size=new_size)
                target["masks"] = masks[:, 0].byte()
            else:  # InstanceMasks (docs/design.md): resized lazily from polygons / RLE
                target["masks"] = masks.resize(*new_size)
        return image, target

    def batch_images(self, images: list[Tensor]) -> Tensor:
        """Zero-pad every image to the largest height / width rounded up to `size_divisible`:
        `[B, 3, H_pad, W_pad]` (FPN's strides need sizes divisible by 32)."""
        stride = self.size_divisible
        max_h = max(int(image.shape[-2]) for image in images)
        max_w = max(int(image.shape[-1]) for image in images)
        padded_h = int(math.ceil(max_h / stride) * stride)
        padded_w = int(math.ceil(max_w / stride) * stride)
        batch = images[0].new_zeros((len(images), images[0].shape[0], padded_h, padded_w))
        for index, image in enumerate(images):  # one copy per image, not per instance
            batch[index, :, : image.shape[-2], : image.shape[-1]].copy_(image)
        return batch

    def postprocess(
        self,
        detections: list[dict[str, Tensor]],
        image_sizes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Map `boxes` and `keypoints` from the resized image back to the original one.
        (Masks are pasted afterwards at the original size by the mask head's `paste_masks`.)"""
        results = []
        for detection, image_size, original_size in zip(detections, image_sizes, original_sizes):
            detection = dict(detection)
            detection["boxes"] = scale_boxes(detection["boxes"], image_size, original_size)
            if "keypoints" in detection:
                detection["keypoints"] = scale_points(detection["keypoints"], image_size, original_size)
            results.append(detection)
        return results

    def extra_repr(self) -> str:
        return (
            f"min_size={self.min_size}, min_size_test={self.min_size_test}, max_size={self.max_size}, "
            f"mean={self.image_mean}, std={self.image_std}, size_divisible={self.size_divisible}, "
            f"channel_order={self.channel_order}, pixel_scale={self.pixel_scale}, size_rounding={self.size_rounding}"
        )
