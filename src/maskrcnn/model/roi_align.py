"""RoIAlign as one sparse matrix on the CPU in training; torchvision's kernel everywhere else.

`roi_align(features, rois, output_size, spatial_scale=, sampling_ratio=, aligned=)` takes
`torchvision.ops.roi_align`'s arguments (a square output) and gives its numbers (to float
rounding: the same terms, summed in another order). On the CPU with gradients on, the forward and
the backward are the two products of one sparse matrix, instead of torchvision's scalar loops (its
backward does one atomic add per channel, bin, sample and corner, and both run on one core).

Why a matrix: RoIAlign is linear in the features. Output bin (r, ph, pw) is the mean over a
gh x gw grid of samples of bilinear interpolation, and bilinear weights are a product of a weight
along y and one along x; torchvision's rules (a sample beyond [-1, H] or [-1, W] reads zero,
coordinates below 0 are clamped to 0, the last row / column repeats) act on each axis alone. So
each bin's weights over the feature map are an outer product wy[r, ph, :] x wx[r, pw, :] of two
short rows, and with A `[R * S * S, B * H * W]` holding those weights (Ky * Kx per row, Ky / Kx
the rows / columns one bin touches) the forward is `A @ features` and the backward
`A^T @ grad_output`. A is built in compressed-row form: its rows are the bins, in order, each with
the same number of entries, so no sort is needed.

Other devices (CUDA) and inference run torchvision's own kernel unchanged.
"""

from __future__ import annotations

import warnings

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
        batch, channels, height, width = features.shape
        ctx.feature_shape, ctx.feature_dtype = features.shape, features.dtype
        # torchvision's autocast rule (float32 inside, the input's dtype out), written out here
        # because a custom Function runs its body with autocast's dispatch already passed.
        compute = _compute_dtype(features.dtype)
        if len(rois) == 0:
            ctx.matrix = None
            return features.new_zeros((0, channels, output_size, output_size))
        ctx.matrix = interpolation_matrix(rois.to(compute), feature_shape=(batch, height, width),
                                          output_size=output_size, spatial_scale=spatial_scale,
                                          sampling_ratio=sampling_ratio, aligned=aligned)
        pixels = features.to(compute).permute(0, 2, 3, 1).reshape(-1, channels)  # [B * H * W, C]
        with torch.autocast("cpu", enabled=False):
            pooled = ctx.matrix @ pixels  # [R * S * S, C], bins in (r, ph, pw) order
        pooled = pooled.view(len(rois), output_size, output_size, channels).permute(0, 3, 1, 2)
        return pooled.to(features.dtype).contiguous()

    @staticmethod
    def backward(ctx, grad_output):
        batch, channels, height, width = ctx.feature_shape
        if ctx.matrix is None:
            return grad_output.new_zeros(ctx.feature_shape), None, None, None, None, None
        rows = grad_output.to(_compute_dtype(ctx.feature_dtype)).permute(0, 2, 3, 1).reshape(-1, channels)
        grad_features = _transposed(ctx.matrix) @ rows  # [B * H * W, C]
        grad_features = grad_features.view(batch, height, width, channels).permute(0, 3, 1, 2)
        return grad_features.contiguous().to(ctx.feature_dtype), None, None, None, None, None


def _transposed(matrix: Tensor) -> Tensor:
    """A^T in compressed-row form from A's (every row of A with the same number of entries).

    `matrix.t() @ x` would do the same; torch converts the transpose by a sort of 64-bit keys
    and two gathers, which here took ~3x as long as this one stable 32-bit sort."""
    num_rows, num_columns = matrix.shape
    columns, values = matrix.col_indices(), matrix.values()
    per_row = len(values) // max(num_rows, 1)
    keys = columns.to(torch.int32)
    order = torch.argsort(keys, stable=True)  # stable: each pixel's entries keep A's row order
    row_starts = torch.zeros(num_columns + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(keys, minlength=num_columns), dim=0, out=row_starts[1:])
    return _csr(row_starts, order.div(per_row, rounding_mode="floor"), values[order], (num_columns, num_rows))


def _csr(row_starts: Tensor, columns: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(row_starts, columns, values, shape, check_invariants=False)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32  # bfloat16 / float16 in float32


def interpolation_matrix(
    rois: Tensor,
    *,
    feature_shape: tuple[int, int, int],
    output_size: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """A as a sparse CSR tensor `[R * S * S, B * H * W]` (CPU): entry (bin, pixel) is the weight of
    that feature-map pixel in that output bin, bins numbered (r * S + ph) * S + pw. A pixel may
    repeat within a row (two samples on the same row, or window cells past the map's edge with
    weight 0): the products sum them."""
    batch, height, width = feature_shape
    (y_rows, y_weights), (x_rows, x_weights) = _both_axes(rois, height=height, width=width, output_size=output_size,
                                                          spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                                                          aligned=aligned)
    # Entries in [R, S(ph), S(pw), Ky, Kx] order: each bin's entries side by side, bins in order.
    image = rois[:, 0].to(torch.int64)
    y_part = ((image * height + y_rows) * width).permute(2, 1, 0)[:, :, None, :, None]  # [R, S, 1, Ky, 1]
    x_part = x_rows.permute(2, 1, 0)[:, None, :, None, :]  # [R, 1, S, 1, Kx]
    values = y_weights.permute(2, 1, 0)[:, :, None, :, None] * x_weights.permute(2, 1, 0)[:, None, :, None, :]
    num_bins, per_bin = len(rois) * output_size * output_size, y_rows.shape[0] * x_rows.shape[0]
    row_starts = torch.arange(0, num_bins * per_bin + 1, per_bin)
    return _csr(row_starts, (y_part + x_part).reshape(-1), values.reshape(-1), (num_bins, batch * height * width))


def _both_axes(
    rois: Tensor, *, height: int, width: int, output_size: int, spatial_scale: float, sampling_ratio: int,
    aligned: bool,
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """`_axis_weights` along y and along x, the x weights divided by each bin's sample count."""
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
    y_axis = _axis_weights(start[:, 1], size[:, 1], grid[:, 1], output_size=output_size, length=height)
    x_rows, x_weights = _axis_weights(start[:, 0], size[:, 0], grid[:, 0], output_size=output_size, length=width)
    return y_axis, (x_rows, x_weights / count)


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
