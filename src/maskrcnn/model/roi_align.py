"""RoIAlign with a vectorised CPU backward; torchvision's kernel everywhere else.

`roi_align(features, rois, output_size, spatial_scale=, sampling_ratio=, aligned=)` takes
`torchvision.ops.roi_align`'s arguments (a square output) and gives its numbers. On the CPU its
forward is torchvision's, and its backward is one sparse-dense matrix product instead of
torchvision's scalar loop of atomic adds (one add per channel, bin, sample and corner).

Why the backward is a matrix: RoIAlign is linear in the features. Output bin (r, ph, pw) is the
mean over a gh x gw grid of samples of bilinear interpolation, and bilinear weights are a product
of a weight along y and one along x; torchvision's rules (a sample beyond [-1, H] or [-1, W] reads
zero, coordinates below 0 are clamped to 0, the last row / column repeats) act on each axis alone.
So each bin's weights over the feature map are an outer product wy[r, ph, :] x wx[r, pw, :] of two
short rows, and the backward is `grad_features = A^T @ grad_output` with A `[R * S * S, B * H * W]`
holding those weights (Ky * Kx per row, Ky / Kx the rows / columns one bin touches).

On other devices (CUDA) torchvision's own kernel and its autograd run unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import roi_align as torchvision_roi_align


def roi_align(
    features: Tensor, rois: Tensor, output_size: int, *, spatial_scale: float, sampling_ratio: int, aligned: bool
) -> Tensor:
    """features `[B, C, H, W]`, rois `[R, 5]` (image index, x1, y1, x2, y2 in input pixels) ->
    `[R, C, output_size, output_size]`, as `torchvision.ops.roi_align` computes it."""
    if features.device.type != "cpu" or not (features.requires_grad and torch.is_grad_enabled()):
        return torchvision_roi_align(features, rois, output_size, spatial_scale=spatial_scale,
                                     sampling_ratio=sampling_ratio, aligned=aligned)
    return _RoIAlignCPU.apply(features, rois, output_size, spatial_scale, sampling_ratio, aligned)


class _RoIAlignCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, rois, output_size, spatial_scale, sampling_ratio, aligned):
        ctx.save_for_backward(rois)
        ctx.feature_shape, ctx.feature_dtype = features.shape, features.dtype
        ctx.settings = (output_size, spatial_scale, sampling_ratio, aligned)
        # torchvision's autocast rule (float32 inside, the input's dtype out), written out here
        # because a custom Function runs its body with autocast's dispatch already passed.
        compute = _compute_dtype(features.dtype)
        with torch.autocast("cpu", enabled=False):
            pooled = torchvision_roi_align(features.to(compute), rois.to(compute), output_size,
                                           spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                                           aligned=aligned)
        return pooled.to(features.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (rois,) = ctx.saved_tensors
        output_size, spatial_scale, sampling_ratio, aligned = ctx.settings
        batch, channels, height, width = ctx.feature_shape
        compute = _compute_dtype(ctx.feature_dtype)
        grad = grad_output.to(compute)
        if len(rois) == 0:
            return grad.new_zeros(ctx.feature_shape).to(ctx.feature_dtype), None, None, None, None, None
        weights_t = interpolation_matrix_t(rois.to(compute), feature_shape=(batch, height, width),
                                           output_size=output_size, spatial_scale=spatial_scale,
                                           sampling_ratio=sampling_ratio, aligned=aligned)
        rows = grad.permute(0, 2, 3, 1).reshape(-1, channels)  # [R * S * S, C], bins in (r, ph, pw) order
        grad_features = torch.sparse.mm(weights_t, rows)  # [B * H * W, C]
        grad_features = grad_features.view(batch, height, width, channels).permute(0, 3, 1, 2)
        return grad_features.contiguous().to(ctx.feature_dtype), None, None, None, None, None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32  # bfloat16 / float16 in float32


def interpolation_matrix_t(
    rois: Tensor,
    *,
    feature_shape: tuple[int, int, int],
    output_size: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """A^T as a sparse COO tensor `[B * H * W, R * S * S]` (CPU): entry (pixel, bin) is the weight of
    that feature-map pixel in that output bin. A pixel may repeat within a bin (two samples on
    the same row, or window cells past the map's edge with weight 0): a sparse product sums them."""
    batch, height, width = feature_shape
    offset = 0.5 if aligned else 0.0  # aligned: pixel centres at half-integers
    start = rois[:, 1:3] * spatial_scale - offset  # [R, 2] x, y
    size = rois[:, 3:5] * spatial_scale - offset - start  # [R, 2] w, h
    if not aligned:
        size = size.clamp(min=1.0)  # the legacy RoIAlign's at-least-one-pixel RoIs
    if sampling_ratio > 0:
        grid = torch.full_like(size, sampling_ratio, dtype=torch.int64)
    else:  # adaptive: about one sample per feature-map pixel of the bin (ROIAlignV2's choice)
        grid = torch.ceil(size / output_size).to(torch.int64)
    # The mean over the gh * gw samples; an empty grid (a zero-size adaptive RoI) reads 0.
    count = (grid[:, 0] * grid[:, 1]).clamp(min=1).to(rois.dtype)  # [R]
    y_rows, y_weights = _axis_weights(start[:, 1], size[:, 1], grid[:, 1], output_size=output_size, length=height)
    x_rows, x_weights = _axis_weights(start[:, 0], size[:, 0], grid[:, 0], output_size=output_size, length=width)
    # Entries in [Ky, Kx, S(ph), S(pw), R] order: R innermost keeps the broadcasts below vectorised.
    image = rois[:, 0].to(torch.int64)
    y_part = ((image * height + y_rows) * width)[:, None, :, None, :]  # [Ky, 1, S, 1, R]
    x_part = x_rows[None, :, None, :, :]  # [1, Kx, 1, S, R]
    values = y_weights[:, None, :, None, :] * (x_weights / count)[None, :, None, :, :]
    num_rois = len(rois)
    bins = torch.arange(num_rois * output_size * output_size).view(num_rois, output_size, output_size).permute(1, 2, 0)
    indices = torch.empty((2, *values.shape), dtype=torch.int64)
    torch.add(y_part, x_part, out=indices[0])
    indices[1].copy_(bins)  # the bin (r, ph, pw) of each entry, numbered (r * S + ph) * S + pw
    shape = (batch * height * width, num_rois * output_size * output_size)
    return torch.sparse_coo_tensor(indices.view(2, -1), values.reshape(-1), shape, check_invariants=False)


def _axis_weights(
    start: Tensor, size: Tensor, grid: Tensor, *, output_size: int, length: int
) -> tuple[Tensor, Tensor]:
    """Along one axis, for each RoI and bin, the map rows its samples read and their bilinear
    weights: `rows [K, S, R]`, `weights [K, S, R]`, K entries per bin.

    start / size `[R]` in feature-map pixels, grid `[R]` samples per bin, `length` rows in the map.
    K is the smaller of two layouts: each sample's two rows (2 * G, G the largest grid), or the
    window of rows a bin's samples span, with the samples' weights summed per row.
    """
    most_samples = max(int(grid.max()), 1)
    bin_size = size / output_size  # [R]
    sample = torch.arange(most_samples, dtype=start.dtype)[:, None, None]  # [G, 1, 1]
    bin_index = torch.arange(output_size, dtype=start.dtype)[None, :, None]  # [1, S, 1]
    # [G, S, R] sample positions as torchvision's loop computes them; samples past a RoI's own grid are padding
    position = start + bin_index * bin_size + (sample + 0.5) * bin_size / grid.clamp(min=1)
    used = (sample < grid) & (position >= -1.0) & (position <= length)
    position = position.clamp(min=0)
    low = position.to(torch.int64)  # floor: the position is >= 0 here
    at_edge = low >= length - 1
    low = low.clamp(max=length - 1)
    high_weight = torch.where(at_edge, 0.0, position - low) * used  # torchvision's ly (0 at the last row)
    low_weight = (1.0 - high_weight) * used  # torchvision's hy
    high = torch.where(at_edge, low, low + 1)
    first = torch.where(used, low, length - 1).amin(dim=0)  # [S, R]
    span = int((torch.where(used, high, 0) - first).max()) + 1
    if span >= 2 * most_samples:
        return torch.cat([low, high]), torch.cat([low_weight, high_weight])
    weights = start.new_zeros((span + 1, output_size, len(start)))  # row span: a dump row for unused samples
    for rows, weight in ((low, low_weight), (high, high_weight)):
        weights.scatter_add_(0, torch.where(used, rows - first, span), weight)
    rows = (first + torch.arange(span)[:, None, None]).clamp(max=length - 1)  # [K, S, R]
    return rows, weights[:span]
