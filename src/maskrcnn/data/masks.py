"""InstanceMasks: per-instance masks kept as polygons or RLE, with lazy resize and flip.

An image with 1,000 instances at 1333 x 800 would need ~1 GB as a dense uint8 tensor; as
polygons it needs a few hundred kilobytes. Nothing is rasterised until the RoI heads ask for
`crop_and_resize` (only the sampled RoIs, at size x size) or someone calls `to_tensor`.

Coordinates are continuous (pixel i covers [i, i+1)); pycocotools rasterises polygons in that
convention (a square with corners 2 and 6 covers pixels 2..5), so a horizontal flip maps x to
W - x exactly. The protocol (docs/design.md) is duck-typed: the model never imports this file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

# decoded RLE masks are processed this many at a time, so memory stays bounded by a chunk
_CHUNK = 16
# Boxes thinner than this are widened for rasterising: pycocotools' polygon rasteriser allocates
# in proportion to the outline's length in output pixels, which a near-zero box sends to infinity.
_MIN_BOX_SIDE = 0.1


def compress_rle(rle: dict, height: int, width: int) -> dict:
    """COCO RLE (compressed str/bytes counts, or uncompressed list counts) -> compressed, bytes counts."""
    if isinstance(rle.get("counts"), list):
        return mask_utils.frPyObjects(rle, height, width)
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


class InstanceMasks:
    """N instance masks of one image, each a list of polygons or one RLE, in original coordinates.

    Args:
        segmentations: one entry per instance: a list of polygons (flat [x0, y0, x1, y1, ...]
            in original image pixels, at least 3 points each; an empty list means an empty mask)
            or a COCO RLE dict whose size is `image_size`.
        image_size: (H, W) of the image the segmentations refer to.

    The object is immutable: `resize` and `flip_horizontal` return new objects that share the
    segmentations and only record the transform.
    """

    def __init__(self, segmentations: Sequence[Any], *, image_size: tuple[int, int]) -> None:
        height, width = int(image_size[0]), int(image_size[1])
        self._polygons: list[list[np.ndarray] | None] = []  # per instance, None when it is RLE
        self._rles: list[dict | None] = []
        for index, segmentation in enumerate(segmentations):
            if isinstance(segmentation, dict):
                rle = compress_rle(segmentation, height, width)
                if tuple(rle["size"]) != (height, width):
                    raise ValueError(f"instance {index}: RLE size {rle['size']} differs from the image size {(height, width)}")
                self._polygons.append(None)
                self._rles.append(rle)
            else:
                parts = [np.asarray(part, dtype=np.float64).reshape(-1, 2) for part in segmentation]
                if any(len(part) < 3 for part in parts):
                    raise ValueError(f"instance {index}: a polygon has fewer than 3 points")
                self._polygons.append(parts)
                self._rles.append(None)
        self._original_size = (height, width)
        self._size = (height, width)
        self._flipped = False

    # ------------------------------------------------------------------ protocol
    def __len__(self) -> int:
        return len(self._polygons)

    @property
    def image_size(self) -> tuple[int, int]:
        return self._size

    def resize(self, height: int, width: int) -> InstanceMasks:
        out = self._with_state(self._polygons, self._rles)
        out._size = (int(height), int(width))
        return out

    def flip_horizontal(self) -> InstanceMasks:
        out = self._with_state(self._polygons, self._rles)
        out._flipped = not self._flipped
        return out

    def __getitem__(self, index: Any) -> InstanceMasks:
        if not isinstance(index, slice):
            index = torch.as_tensor(index).cpu()  # a keep-mask may come from the model's device
        positions = torch.arange(len(self))[index]
        positions = positions.reshape(-1).tolist()
        return self._with_state([self._polygons[i] for i in positions], [self._rles[i] for i in positions])

    def to(self, device: Any) -> InstanceMasks:
        return self  # CPU-side data: rasterised on demand, results moved to the boxes' device

    def crop_and_resize(self, boxes: torch.Tensor, indices: torch.Tensor, size: int) -> torch.Tensor:
        """Mask targets for RoIs.

        Args:
            boxes: [R, 4] x1y1x2y2 in current image coordinates (continuous).
            indices: [R] int64, which instance each RoI takes its mask from.
            size: output side M.
        Returns:
            float [R, M, M] in [0, 1] on boxes' device: polygons are rasterised directly in the
            box frame (binary); RLE masks are decoded and sampled with roi_align(aligned=True),
            which averages sub-samples (soft edges), as on a dense mask.
        """
        device = boxes.device
        boxes = boxes.detach().to("cpu", torch.float64)
        indices = torch.as_tensor(indices).to("cpu", torch.int64)
        out = torch.zeros((len(boxes), size, size), dtype=torch.float32)
        if len(boxes) == 0:
            return out.to(device)
        is_polygon = torch.tensor([self._polygons[i] is not None for i in indices.tolist()], dtype=torch.bool)
        if is_polygon.any():
            rows = is_polygon.nonzero()[:, 0]
            out[rows] = self._crop_polygons(boxes[rows], indices[rows], size)
        if (~is_polygon).any():
            rows = (~is_polygon).nonzero()[:, 0]
            out[rows] = self._crop_rles(boxes[rows], indices[rows], size)
        return out.to(device)

    def to_tensor(self) -> torch.Tensor:
        """Dense uint8 [N, H, W] at the current size (costs N * H * W bytes)."""
        height, width = self._size
        out = torch.zeros((len(self), height, width), dtype=torch.uint8)
        polygon_rows = [i for i, p in enumerate(self._polygons) if p is not None]
        if polygon_rows:
            frames = torch.tensor([[0.0, 0.0, width, height]], dtype=torch.float64).expand(len(polygon_rows), 4)
            out[polygon_rows] = self._rasterise(frames, torch.tensor(polygon_rows), height, width).to(torch.uint8)
        rle_rows = [i for i, r in enumerate(self._rles) if r is not None]
        for start in range(0, len(rle_rows), _CHUNK):
            rows = rle_rows[start:start + _CHUNK]
            masks = self._decode(rows)  # [k, H0, W0] float
            if (height, width) != self._original_size:
                masks = F.interpolate(masks[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
            if self._flipped:
                masks = masks.flip(-1)
            out[rows] = (masks >= 0.5).to(torch.uint8)
        return out

    # ------------------------------------------------------------------ extras
    @property
    def nbytes(self) -> int:
        """Bytes held by the segmentations (polygon vertices and RLE counts)."""
        polygon_bytes = sum(part.nbytes for parts in self._polygons if parts for part in parts)
        rle_bytes = sum(len(r["counts"]) for r in self._rles if r is not None)
        return polygon_bytes + rle_bytes

    def __repr__(self) -> str:
        kinds = sum(p is not None for p in self._polygons)
        return (f"InstanceMasks(n={len(self)}, image_size={self._size}, polygons={kinds}, "
                f"rle={len(self) - kinds}, flipped={self._flipped})")

    # ------------------------------------------------------------------ internals
    def _with_state(self, polygons: list, rles: list) -> InstanceMasks:
        out = object.__new__(InstanceMasks)
        out._polygons, out._rles = polygons, rles
        out._original_size, out._size, out._flipped = self._original_size, self._size, self._flipped
        return out

    def _scale(self) -> tuple[float, float]:
        return self._size[1] / self._original_size[1], self._size[0] / self._original_size[0]

    def _rasterise(self, frames: torch.Tensor, instance_rows: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
        """Polygons of instances `instance_rows` mapped from frame [x1, y1, x2, y2] (current image
        coordinates) onto an out_h x out_w grid and rasterised by pycocotools: bool [R, out_h, out_w]."""
        scale_x, scale_y = self._scale()
        parts, owner = [], []
        for row, instance in enumerate(instance_rows.tolist()):
            parts += self._polygons[instance]
            owner += [row] * len(self._polygons[instance])
        result = torch.zeros((len(frames), out_h, out_w), dtype=torch.bool)
        if not parts:
            return result
        lengths = [len(p) for p in parts]
        vertices = np.concatenate(parts)  # [V, 2] original coordinates
        frames = frames.numpy()[np.repeat(owner, lengths)]  # [V, 4] the frame of each vertex
        x = vertices[:, 0] * scale_x
        if self._flipped:
            x = self._size[1] - x
        y = vertices[:, 1] * scale_y
        x = (x - frames[:, 0]) * out_w / np.maximum(frames[:, 2] - frames[:, 0], _MIN_BOX_SIDE)
        y = (y - frames[:, 1]) * out_h / np.maximum(frames[:, 3] - frames[:, 1], _MIN_BOX_SIDE)
        flat = np.stack([x, y], axis=1).reshape(-1)
        polygons = [chunk.tolist() for chunk in np.split(flat, np.cumsum(lengths)[:-1] * 2)]
        rles = mask_utils.frPyObjects(polygons, out_h, out_w)  # one C call for every part
        decoded = mask_utils.decode(rles)  # [out_h, out_w, parts]
        # parts are contiguous per RoI: OR them with one reduceat
        starts = np.flatnonzero(np.r_[True, np.diff(owner) != 0])
        merged = np.maximum.reduceat(decoded, starts, axis=2)
        result[np.asarray(owner)[starts]] = torch.from_numpy(np.ascontiguousarray(merged.transpose(2, 0, 1))).bool()
        return result

    def _crop_polygons(self, boxes: torch.Tensor, indices: torch.Tensor, size: int) -> torch.Tensor:
        return self._rasterise(boxes, indices, size, size).float()

    def _decode(self, instances: list[int]) -> torch.Tensor:
        decoded = mask_utils.decode([self._rles[i] for i in instances])  # [H0, W0, k] uint8
        return torch.from_numpy(np.ascontiguousarray(decoded.transpose(2, 0, 1))).float()

    def _crop_rles(self, boxes: torch.Tensor, indices: torch.Tensor, size: int) -> torch.Tensor:
        scale_x, scale_y = self._scale()
        original = boxes.clone()
        if self._flipped:  # sample the unflipped mask in the mirrored box, then mirror the crop
            original[:, 0], original[:, 2] = self._size[1] - boxes[:, 2], self._size[1] - boxes[:, 0]
        original[:, 0::2] /= scale_x
        original[:, 1::2] /= scale_y
        out = torch.zeros((len(boxes), size, size), dtype=torch.float32)
        unique = indices.unique()
        for start in range(0, len(unique), _CHUNK):
            chunk = unique[start:start + _CHUNK]
            masks = self._decode(chunk.tolist())[:, None]  # [k, 1, H0, W0]
            rows = torch.isin(indices, chunk).nonzero()[:, 0]
            slot = torch.searchsorted(chunk, indices[rows]).to(torch.float32)
            rois = torch.cat([slot[:, None], original[rows].float()], dim=1)
            out[rows] = roi_align(masks, rois, output_size=size, spatial_scale=1.0, sampling_ratio=0, aligned=True)[:, 0]
        return out.flip(-1) if self._flipped else out
