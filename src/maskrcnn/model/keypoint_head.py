"""Keypoint head: pooled RoI features -> one 56 x 56 heatmap per keypoint; its loss and decoding.

Layers (our name -> torchvision's name in a `keypointrcnn_resnet50_fpn` state dict, inside
`roi_heads.`):

    keypoint_head.convs.{i}  -> keypoint_head.{2 * i}                  conv3x3 C -> 512, i = 0..7
    keypoint_head.deconv     -> keypoint_predictor.kps_score_lowres    ConvTranspose2d 512 -> K, 4x4, s2

Each keypoint's heatmap is a 56^2-way classification ("which cell holds keypoint k"), trained
with softmax cross-entropy over the cells (He et al. 2017, section 5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KEYPOINT_DECODINGS = ("torchvision", "detectron2")
_SIZE_GROUPS = 4  # heatmaps_to_keypoints decodes RoIs in this many groups of similar size


class KeypointHead(nn.Module):
    """`num_convs` x (conv3x3 + ReLU), ConvTranspose 4x4 stride 2, then 2x bilinear upsampling.

    features: `[R, in_channels, S, S]` -> heatmap logits `[R, num_keypoints, 4S, 4S]`.
    """

    def __init__(self, *, in_channels: int, num_keypoints: int, conv_dim: int = 512, num_convs: int = 8) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else conv_dim, conv_dim, kernel_size=3, padding=1) for i in range(num_convs)
        )
        deconv_in = conv_dim if num_convs > 0 else in_channels
        self.deconv = nn.ConvTranspose2d(deconv_in, num_keypoints, kernel_size=4, stride=2, padding=1)
        for layer in [*self.convs, self.deconv]:
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, features: Tensor) -> Tensor:
        x = features
        for conv in self.convs:
            x = F.relu(conv(x))
        x = self.deconv(x)  # [R, K, 2S, 2S]
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False, recompute_scale_factor=False)


def keypoint_targets(keypoints: Tensor, rois: Tensor, heatmap_size: int) -> tuple[Tensor, Tensor]:
    """Where each ground-truth keypoint falls on its RoI's heatmap.

    keypoints `[R, K, 3]` (x, y, visibility; continuous image coordinates) of the instance each
    RoI `[R, 4]` is matched to. Returns `targets [R, K]` int64, the flat index `y * size + x` of
    the heatmap cell, and `valid [R, K]` bool: labelled (v > 0) and inside the RoI. A keypoint
    exactly on the RoI's right / bottom edge goes to the last cell (as torchvision does).
    """
    start = rois[:, None, :2]  # [R, 1, 2]
    end = rois[:, None, 2:]
    scale = heatmap_size / (end - start)
    xy = keypoints[..., :2]
    cell = ((xy - start) * scale).floor().long()  # [R, K, 2]
    cell = torch.where(xy == end, torch.full_like(cell, heatmap_size - 1), cell)
    inside = ((cell >= 0) & (cell < heatmap_size)).all(dim=-1)
    valid = inside & (keypoints[..., 2] > 0)
    targets = torch.where(valid, cell[..., 1] * heatmap_size + cell[..., 0], torch.zeros_like(cell[..., 0]))
    return targets, valid


def keypoint_loss(keypoint_logits: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
    """Softmax cross-entropy over the `S * S` heatmap cells, averaged over the valid keypoints.

    keypoint_logits `[R, K, S, S]`, targets / valid `[R, K]` from `keypoint_targets`. Keypoints
    that are not labelled or fall outside their RoI add nothing; with none valid the loss is
    exactly 0 and connected to the graph.
    """
    if not valid.any():
        return keypoint_logits.sum() * 0
    num_rois, num_keypoints, height, width = keypoint_logits.shape
    logits = keypoint_logits.reshape(num_rois * num_keypoints, height * width)
    flat_valid = valid.reshape(-1)
    return F.cross_entropy(logits[flat_valid], targets.reshape(-1)[flat_valid])


def _bicubic_matrix(output_size: Tensor, window: int, input_size: int) -> Tensor:
    """`[R, window, input_size]` matrices that resize `input_size` pixels to `output_size [R]` pixels
    as `F.interpolate(mode="bicubic", align_corners=False)` does (A = -0.75, borders clamped):
    row j holds the 4 weights of output pixel j (rows >= output_size are unused)."""
    a = -0.75
    scale = input_size / output_size.to(torch.float32)  # [R]
    pixels = torch.arange(window, device=output_size.device, dtype=torch.float32)
    source = scale[:, None] * (pixels + 0.5) - 0.5  # [R, window]; no clamp for bicubic
    first = source.floor()
    t = source - first

    def near(x: Tensor) -> Tensor:  # the cubic convolution kernel for |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: Tensor) -> Tensor:  # and for 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    matrix = torch.zeros((*source.shape, input_size), device=source.device)
    for tap, weight in enumerate([far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]):
        index = (first.long() - 1 + tap).clamp(0, input_size - 1)  # taps beyond a border repeat it
        matrix.scatter_add_(2, index[..., None], weight[..., None])
    return matrix


def _resized_argmax(heatmaps: Tensor, out_h: Tensor, out_w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Resize each `heatmaps [n, K, S, S]` to `out_h [n] x out_w [n]` bicubically and return the
    argmax row, column (`[n, K]` int64, the first maximum in row-major order, as torchvision's
    argmax) and the maximum."""
    num_rois, num_keypoints, size = heatmaps.shape[0], heatmaps.shape[1], heatmaps.shape[-1]
    window_h, window_w = int(out_h.max()), int(out_w.max())
    rows = _bicubic_matrix(out_h, window_h, size)  # [n, window_h, S]
    columns_t = _bicubic_matrix(out_w, window_w, size).transpose(1, 2)  # [n, S, window_w]
    device = heatmaps.device
    outside = (torch.arange(window_h, device=device)[None, :, None] >= out_h[:, None, None]) | (
        torch.arange(window_w, device=device)[None, None, :] >= out_w[:, None, None]
    )  # [n, window_h, window_w]: beyond the RoI's own size

    maps = heatmaps.to(torch.float32)
    best_index = torch.zeros((num_rois, num_keypoints), dtype=torch.int64, device=device)
    best_score = torch.zeros((num_rois, num_keypoints), dtype=torch.float32, device=device)
    for k in range(num_keypoints):  # a loop over keypoint types, not instances: memory n * window
        resized = torch.bmm(torch.bmm(rows, maps[:, k]), columns_t)  # [n, window_h, window_w]
        resized = resized.masked_fill_(outside, float("-inf")).flatten(1)
        best_index[:, k] = resized.argmax(dim=1)
        best_score[:, k] = resized.gather(1, best_index[:, k, None])[:, 0]
    best_y = torch.div(best_index, window_w, rounding_mode="floor")
    return best_y, best_index - best_y * window_w, best_score


def heatmaps_to_keypoints(heatmaps: Tensor, rois: Tensor, *, decoding: str = "torchvision") -> tuple[Tensor, Tensor]:
    """Keypoint positions and scores from heatmap logits, for all RoIs at once.

    heatmaps `[R, K, S, S]`, rois `[R, 4]` x1y1x2y2 (continuous coordinates). Each heatmap is
    resized bicubically to its RoI's size in whole pixels (ceil of width and height); the argmax
    cell's centre (+0.5: a cell covers [i, i + 1)) is mapped back into the RoI. Returns keypoints
    `[R, K, 3]` (x, y, 1) and scores `[R, K]`: with `decoding="torchvision"` the resized logit at the
    argmax (torchvision's `heatmaps_to_keypoints`, which resizes one RoI at a time); with
    "detectron2" its softmax over the heatmap's own S x S cells, `1 / sum(exp(heatmap - max))`
    with the resized maximum (detectron2's score, comparable across RoI sizes).

    The resize is separable, so it is two batched matrix products per keypoint channel
    (`rows @ heatmap @ columns^T`) over a window as large as the largest RoI of a group of
    similar-size RoIs; cells beyond a RoI's own size are masked out.
    """
    if decoding not in KEYPOINT_DECODINGS:
        raise ValueError(f"keypoint_head.decoding must be one of {KEYPOINT_DECODINGS}, got {decoding!r}")
    num_rois, num_keypoints = heatmaps.shape[0], heatmaps.shape[1]
    device = heatmaps.device
    keypoints = torch.zeros((num_rois, num_keypoints, 3), dtype=torch.float32, device=device)
    scores = torch.zeros((num_rois, num_keypoints), dtype=torch.float32, device=device)
    if num_rois == 0:
        return keypoints, scores

    widths = (rois[:, 2] - rois[:, 0]).clamp(min=1)
    heights = (rois[:, 3] - rois[:, 1]).clamp(min=1)
    out_w, out_h = widths.ceil().long(), heights.ceil().long()  # [R] resized heatmap sizes
    best_x = torch.zeros((num_rois, num_keypoints), dtype=torch.int64, device=device)
    best_y = torch.zeros_like(best_x)
    # RoIs of similar size share a window: a few groups sorted by area keep it close to their sizes.
    for group in (out_w * out_h).argsort().chunk(_SIZE_GROUPS):
        best_y[group], best_x[group], scores[group] = _resized_argmax(heatmaps[group], out_h[group], out_w[group])
    # Cell centres (+0.5), scaled back from whole pixels to the RoI's true size.
    keypoints[..., 0] = (best_x.float() + 0.5) * (widths / out_w)[:, None] + rois[:, 0, None]
    keypoints[..., 1] = (best_y.float() + 0.5) * (heights / out_h)[:, None] + rois[:, 1, None]
    keypoints[..., 2] = 1
    if decoding == "detectron2":  # the resized maximum's softmax weight over the S x S heatmap cells
        scores = 1 / (heatmaps.to(torch.float32) - scores[..., None, None]).exp().sum(dim=(2, 3))
    return keypoints, scores
