"""Mask head: pooled RoI features -> per-class 28 x 28 mask logits; its loss, inference and pasting.

Layers of the FCN head (our name -> torchvision's name in a `maskrcnn_resnet50_fpn` state dict,
inside `roi_heads.`):

    mask_head.convs.{i}.0  -> mask_head.{i}.0                   conv3x3 C -> 256, i = 0..3
    mask_head.convs.{i}.1  -> mask_head.{i}.1                   norm (only with norm != "none")
    mask_head.deconv       -> mask_predictor.conv5_mask         ConvTranspose2d 256 -> 256, 2x2, s2
    mask_head.predictor    -> mask_predictor.mask_fcn_logits    conv1x1 256 -> K + 1 (or 1)

The head outputs one channel per class, background included (channel = label, as in torchvision),
or a single channel when class-agnostic. Loss, inference and pasting are pure functions below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from maskrcnn.model.layers import conv3x3_norm_relu
from maskrcnn.model.threads import thread_pool

MASK_ARCHITECTURES = ("fcn", "deep_fcn", "resnet", "hourglass")
_WIDTH_GROUPS = 4  # paste_masks pastes masks in this many groups of similar width


class MaskFCNHead(nn.Module):
    """`num_convs` x (conv3x3 + norm + ReLU), ConvTranspose 2x2 stride 2 + ReLU, conv1x1 predictor.

    features: `[R, in_channels, S, S]` -> logits `[R, out_channels, 2S, 2S]` (`out_channels`:
    K + 1 per-class masks, or 1 class-agnostic).
    """

    def __init__(
        self, *, in_channels: int, out_channels: int, conv_dim: int = 256, num_convs: int = 4, norm: str = "none"
    ) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            *[conv3x3_norm_relu(in_channels if i == 0 else conv_dim, conv_dim, norm) for i in range(num_convs)]
        )
        deconv_in = conv_dim if num_convs > 0 else in_channels
        self.deconv = nn.ConvTranspose2d(deconv_in, conv_dim, kernel_size=2, stride=2)
        self.relu = nn.ReLU()  # a module (no weights): CPU inference folds it into the deconvolution
        self.predictor = nn.Conv2d(conv_dim, out_channels, kernel_size=1)
        # torchvision's initialisation: kaiming (fan_out) weights, default biases for these two.
        nn.init.kaiming_normal_(self.deconv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.kaiming_normal_(self.predictor.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, features: Tensor, labels: Tensor | None = None) -> Tensor:
        """`labels [R]`: only each RoI's own class, `[R, 1, 2S, 2S]` (training: the loss reads no other)."""
        x = self.convs(features)
        if labels is not None:
            return upsample_and_predict(x, self.deconv, self.predictor, labels)
        return self.predictor(self.relu(self.deconv(x)))


def own_class_logits(x: Tensor, predictor: nn.Conv2d, labels: Tensor | None) -> Tensor:
    """The 1x1 `predictor`'s logits `[R, C, H, W]` of `x [R, D, H, W]`, or with `labels [R]` only each
    RoI's own channel `[R, 1, H, W]`: one dot product per pixel instead of C (C - 1 of them unused)."""
    if labels is None or predictor.out_channels == 1:
        return predictor(x)
    num_rois, channels, height, width = x.shape
    weight = predictor.weight[labels].view(num_rois, 1, channels).to(x.dtype)  # [R, 1, D]
    logits = torch.matmul(weight, x.reshape(num_rois, channels, height * width)).view(num_rois, 1, height, width)
    return logits if predictor.bias is None else logits + predictor.bias[labels].view(-1, 1, 1, 1)


def upsample_and_predict(x: Tensor, deconv: nn.ConvTranspose2d, predictor: nn.Conv2d, labels: Tensor | None) -> Tensor:
    """`predictor(relu(deconv(x)))`: `[R, D, S, S]` -> `[R, C, 2S, 2S]`, or `[R, 1, 2S, 2S]` with `labels`.

    With `labels` and a 2 x 2 stride-2 deconvolution, computed on the S x S grid: such a deconvolution
    writes each output 2 x 2 cell from one input pixel, `out[o, 2i + a, 2j + b] = bias[o] +
    sum_d x[d, i, j] W[d, o, a, b]`, so it is one 1x1 convolution to O x 4 channels, one per (o, a, b);
    the ReLU and the own-class dot product run there, and only the final one-channel logits are
    interleaved into 2S x 2S. The same sums as the deconvolution, without its slower CPU kernels
    and the full-resolution per-class logits (float rounding only).
    """
    if labels is None or predictor.out_channels == 1 or not _is_2x2_stride_2(deconv):
        return own_class_logits(F.relu(deconv(x)), predictor, labels)
    num_rois, _, height, width = x.shape
    weight = deconv.weight.permute(1, 2, 3, 0).reshape(-1, deconv.in_channels, 1, 1)  # [(o, a, b), D, 1, 1]
    bias = None if deconv.bias is None else deconv.bias.repeat_interleave(4)
    upsampled = F.relu(F.conv2d(x, weight, bias))  # [R, O * 4, S, S]
    # Read as O channels over a (a, b, i) x j grid, so that the own-class dot product is the 1x1 one
    # (a copy only when `x` came in channels_last).
    cells = own_class_logits(upsampled.reshape(num_rois, deconv.out_channels, 4 * height, width), predictor, labels)  # [R, 1, 4S, S]
    return cells.view(num_rois, 2, 2, height, width).permute(0, 3, 1, 4, 2).reshape(num_rois, 1, 2 * height, 2 * width)


def _is_2x2_stride_2(deconv: nn.Module) -> bool:
    """A plain `ConvTranspose2d` whose output 2 x 2 cells each come from one input pixel."""
    return type(deconv) is nn.ConvTranspose2d and (
        deconv.kernel_size, deconv.stride, deconv.padding, deconv.output_padding, deconv.dilation, deconv.groups
    ) == ((2, 2), (2, 2), (0, 0), (0, 0), (1, 1), 1)


def build_mask_head(
    *,
    architecture: str,
    in_channels: int,
    num_classes: int,
    conv_dim: int = 256,
    num_convs: int = 4,
    norm: str = "none",
    class_agnostic: bool = False,
    block: str = "bottleneck",
) -> nn.Module:
    """The mask head named by `architecture`; `num_classes` is K (foreground classes).

    "fcn" is Mask R-CNN's head (num_convs = 4); "deep_fcn" is the same FCN meant to be used with
    more convs (Birodkar et al. compare heads by depth); "resnet" and "hourglass" are the deeper
    heads of Birodkar et al. in `mask_architectures.py`. All map `[R, C, S, S]` to
    `[R, K + 1 or 1, 2S, 2S]`, and with `head(features, labels)` to `[R, 1, 2S, 2S]`, each RoI's own
    class (`upsample_and_predict`). `block` ("bottleneck" | "basic") is the residual block of the
    resnet and hourglass heads; the FCN heads have none.
    """
    out_channels = 1 if class_agnostic else num_classes + 1
    match architecture:
        case "fcn" | "deep_fcn":
            return MaskFCNHead(
                in_channels=in_channels, out_channels=out_channels, conv_dim=conv_dim, num_convs=num_convs, norm=norm
            )
        case "resnet":
            from maskrcnn.model.mask_architectures import ResidualMaskHead

            return ResidualMaskHead(
                in_channels=in_channels, out_channels=out_channels, conv_dim=conv_dim, num_convs=num_convs, norm=norm,
                block=block,
            )
        case "hourglass":
            from maskrcnn.model.mask_architectures import HourglassMaskHead

            return HourglassMaskHead(
                in_channels=in_channels, out_channels=out_channels, conv_dim=conv_dim, num_convs=num_convs, norm=norm,
                block=block,
            )
        case _:
            raise ValueError(f"mask_head.architecture must be one of {MASK_ARCHITECTURES}, got {architecture!r}")


def mask_targets(
    gt_masks: Tensor,  # [N, H, W] uint8 / bool / float, or an InstanceMasks (docs/design.md)
    boxes: Tensor,  # [R, 4] x1y1x2y2 in the same image coordinates as the masks
    matched_idxs: Tensor,  # [R] int64 index of each box's instance in gt_masks
    size: int,
    *,
    aligned: bool = False,
) -> Tensor:
    """The part of each matched instance's mask under its box, resampled to `[R, size, size]`
    floats in [0, 1] (soft at the edges).

    Dense masks go through one `roi_align` call per image (each box reads the mask of its own
    instance through the batch index); adaptive sampling (`sampling_ratio=-1`) averages over each
    bin, as torchvision does. `aligned=False` is torchvision's convention; `aligned=True` shifts by
    half a pixel so that a box `[x1, x2)` in continuous coordinates covers exactly its pixels.
    Compact masks crop and resize themselves (`InstanceMasks.crop_and_resize`).
    """
    if not isinstance(gt_masks, Tensor):
        return gt_masks.crop_and_resize(boxes, matched_idxs, size).to(boxes.dtype)
    if len(boxes) == 0:
        return boxes.new_zeros((0, size, size))
    rois = torch.cat([matched_idxs[:, None].to(boxes.dtype), boxes], dim=1)  # [R, 5] (instance, box)
    masks = gt_masks[:, None].to(boxes.dtype)  # [N, 1, H, W]
    return roi_align(masks, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=aligned)[:, 0]


def jitter_boxes(boxes: Tensor, *, image_size: tuple[int, int], fraction: float) -> Tensor:
    """Boxes [N, 4] with each side moved by up to `fraction` times the box's width / height
    (uniformly at random), kept inside the (height, width) image and at least 1 px wide."""
    if fraction == 0 or len(boxes) == 0:
        return boxes
    size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)  # [N, 4] w, h, w, h
    jittered = boxes + (torch.rand(boxes.shape, device=boxes.device) * 2 - 1) * fraction * size
    height, width = image_size
    x1 = jittered[:, 0].clamp(0, width - 1)
    y1 = jittered[:, 1].clamp(0, height - 1)
    x2 = torch.maximum(jittered[:, 2].clamp(max=width), x1 + 1)
    y2 = torch.maximum(jittered[:, 3].clamp(max=height), y1 + 1)
    return torch.stack([x1, y1, x2, y2], dim=1)


def mask_training_rois(
    *,
    targets: list[dict],
    proposals: list[Tensor],  # per image [R, 4]: the sampled proposals
    proposal_labels: list[Tensor],  # per image [R] int64: their labels, 0 for background
    matched_idxs: list[Tensor],  # per image [R] int64: each proposal's instance in its target
    image_sizes: list[tuple[int, int]],
    train_on: str,
    gt_box_jitter: float,
    mask_classes: list[int] | None,
    gt_box_copies: int = 1,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Per image: the boxes that train the mask head [M, 4], their instance indices [M] and labels [M].

    `train_on="proposals"`: the positive proposals (Mask R-CNN); `"gt_boxes"`: the ground-truth boxes,
    jittered by `gt_box_jitter` (Birodkar et al.), each one `gt_box_copies` times (copies jittered
    independently, instance after instance). Then only the instances with a mask annotation
    (`has_mask`, when the target has it) and, when `mask_classes` is given, a label among them.
    """
    boxes, matched, labels = [], [], []
    for i, target in enumerate(targets):  # loop over images
        if train_on == "gt_boxes":
            instance = torch.arange(len(target["boxes"]), device=target["boxes"].device)
            instance = instance.repeat_interleave(gt_box_copies)
            roi_boxes = target["boxes"].to(proposals[i].dtype)[instance]
            roi_boxes = jitter_boxes(roi_boxes, image_size=image_sizes[i], fraction=gt_box_jitter)
            roi_labels = target["labels"][instance]
        else:
            positive = torch.where(proposal_labels[i] > 0)[0]
            instance = matched_idxs[i][positive]
            roi_boxes, roi_labels = proposals[i][positive], proposal_labels[i][positive]
        keep = torch.ones_like(instance, dtype=torch.bool)
        if "has_mask" in target:
            keep &= target["has_mask"].to(torch.bool)[instance]
        if mask_classes is not None:
            keep &= torch.isin(roi_labels, torch.as_tensor(mask_classes, device=roi_labels.device))
        boxes.append(roi_boxes[keep])
        matched.append(instance[keep])
        labels.append(roi_labels[keep])
    return boxes, matched, labels


def _select_class_channel(mask_logits: Tensor, labels: Tensor) -> Tensor:
    """`[R, C, M, M]` -> `[R, M, M]`: channel `labels[r]`, or channel 0 when class-agnostic (C == 1)."""
    channel = labels if mask_logits.shape[1] > 1 else torch.zeros_like(labels)
    return mask_logits[torch.arange(len(labels), device=labels.device), channel]


def mask_loss(mask_logits: Tensor, mask_targets: Tensor, labels: Tensor) -> Tensor:
    """Mean per-pixel sigmoid BCE between the logits of each RoI's own class and its target.

    mask_logits `[R, C, M, M]` (or `[R, 1, M, M]`: class-agnostic, or already each RoI's own class,
    as the heads give with `labels`), mask_targets `[R, M, M]` in [0, 1], labels `[R]` (>= 1;
    positive RoIs only). Other classes' channels get no loss (no competition between classes, the
    paper's key choice). Exactly 0 and connected to the graph when `R == 0`.
    """
    if len(labels) == 0:
        return mask_logits.sum() * 0
    return F.binary_cross_entropy_with_logits(_select_class_channel(mask_logits, labels), mask_targets)


def mask_inference(mask_logits: Tensor, labels: Tensor) -> Tensor:
    """Probabilities `[R, 1, M, M]` of each detection's predicted class (`labels [R]`)."""
    return _select_class_channel(mask_logits, labels).sigmoid()[:, None]


def _bilinear_taps(pixels: Tensor, start: Tensor, length: Tensor, source_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Bilinear sampling of a `source_size`-pixel mask stretched over `[start, start + length)`
    (continuous image coordinates) at the centres of image `pixels`: the two source indices and
    the weight of the second, as `F.interpolate(mode="bilinear", align_corners=False)` computes
    them (pixel centres at +0.5, clamped at the borders)."""
    source = ((pixels.to(torch.float32) + 0.5 - start) * (source_size / length) - 0.5).clamp(0, source_size - 1)
    first = source.floor()
    weight = source - first
    first = first.long()
    return first, (first + 1).clamp(max=source_size - 1), weight


def _mask_spans(boxes: Tensor, mask_size: int, padding: int, aligned: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Where each padded mask lies in the image: `start [N, 2]`, `length [N, 2]` (x, y; continuous
    coordinates) and the first / last image pixels it is pasted on, `first [N, 2]`, `last [N, 2]`."""
    source_size = mask_size + 2 * padding
    size = boxes[:, 2:] - boxes[:, :2]
    if aligned:
        # Continuous coordinates: the mask covers its box exactly, the padding one mask pixel more
        # on each side; pixels whose centre falls between the outer mask pixel centres get a value.
        start = boxes[:, :2] - size * (padding / mask_size)
        length = (size * (source_size / mask_size)).clamp(min=1e-6)  # an empty box pastes nothing (no NaN)
        half_source_pixel = 0.5 * length / source_size
        first = torch.ceil(start + half_source_pixel - 0.5).to(torch.int64)
        last = torch.floor(start + length - half_source_pixel - 0.5).to(torch.int64)
        return start, length, first, last
    # torchvision: grow the box like the mask, truncate to integer pixels, ends inclusive.
    centre = (boxes[:, :2] + boxes[:, 2:]) * 0.5
    half = size * (0.5 * source_size / mask_size)
    first, last = (centre - half).to(torch.int64), (centre + half).to(torch.int64)
    length = (last - first + 1).clamp(min=1)
    return first.to(torch.float32), length.to(torch.float32), first, last


def paste_masks(
    masks: Tensor, boxes: Tensor, image_size: tuple[int, int], padding: int = 1, *, aligned: bool = False
) -> Tensor:
    """Paste `masks [N, 1, M, M]` (probabilities over their `boxes [N, 4]`) into `[N, 1, H, W]`.

    `aligned=False` gives the numbers of torchvision's `paste_masks_in_image`: pad the mask by
    `padding` zero pixels, grow the box by the same factor, truncate it to integer pixels
    [x1, x2] (ends inclusive), resize the mask to that many pixels bilinearly, clip to the image.
    The truncation moves masks by up to a pixel, which a 1-pixel object does not survive.
    `aligned=True` works in continuous coordinates (as detectron2): the mask covers its box
    exactly and each pixel samples it at its centre; use it with aligned RoIAlign targets.

    Batched: bilinear resizing is separable, so each mask is first resized along x over a window
    of columns as wide as the widest box of its group, then each of its rows inside the image is
    interpolated from two of those rows and written in one indexed copy. The work grows with the
    pasted area (zeroing the output is one memset of N * H * W); there is no Python loop over masks.
    """
    num_masks, height, width = len(masks), *image_size
    device, dtype = masks.device, masks.dtype
    # torch.zeros, not numpy.zeros: numpy asks the kernel for transparent huge pages on arrays this
    # large, and after a forward has fragmented memory the first write makes the kernel compact it
    # (tens of ms, more than writing the zeros). With the allocator off mmap (optimize_for_cpu) the
    # zeros land in pages already mapped.
    pasted = torch.zeros((num_masks, 1, height, width), dtype=dtype, device=device)
    if num_masks == 0:
        return pasted

    padded = F.pad(masks[:, 0], (padding,) * 4).to(torch.float32)  # [N, P, P], P = M + 2 * padding
    start, length, first, last = _mask_spans(boxes.to(torch.float32), masks.shape[-1], padding, aligned)
    first = first.clamp(min=0)
    last = torch.minimum(last, torch.tensor([width - 1, height - 1], device=device))
    # Masks of similar width share a window of columns: pasting them in a few groups sorted by width
    # keeps each window close to its masks' own width (a fixed number of groups, not a loop over masks).
    order = (last[:, 0] - first[:, 0]).argsort()
    for group in order.chunk(_WIDTH_GROUPS):
        _paste_group(pasted, group, padded[group], start[group], length[group], first[group], last[group])
    return pasted


def _paste_group(
    pasted: Tensor, group: Tensor, padded: Tensor, start: Tensor, length: Tensor, first: Tensor, last: Tensor
) -> None:
    """Write the resized `padded [n, P, P]` masks into images `group [n]` of `pasted [N, 1, H, W]`
    between the image pixels `first [n, 2]` and `last [n, 2]` (x, y; inclusive, inside the image);
    the padded masks span `[start, start + length)` in continuous coordinates."""
    num_masks, height, width = len(group), pasted.shape[-2], pasted.shape[-1]
    source_size, device = padded.shape[-1], padded.device
    num_inside = (last - first + 1).clamp(min=0)  # [n, 2] pasted columns, rows
    window, num_rows = int(num_inside[:, 0].max()), int(num_inside[:, 1].sum())
    if window == 0 or num_rows == 0:
        return

    # 1. Along x, over `window` image columns per mask (zero outside the span): [n, P, window].
    window_start = first[:, 0].clamp(max=width - window)  # [n]
    cols = window_start[:, None] + torch.arange(window, device=device)  # [n, window]
    left, right, weight_x = _bilinear_taps(cols, start[:, :1], length[:, :1], source_size)
    inside = ((cols >= first[:, :1]) & (cols <= last[:, :1])).to(torch.float32)

    def columns(index: Tensor) -> Tensor:  # [n, window] -> [n, P, window]
        return padded.gather(2, index[:, None, :].expand(-1, source_size, -1))

    resized_x = ((1 - weight_x)[:, None] * columns(left) + weight_x[:, None] * columns(right)) * inside[:, None]

    # 2. Along y, only for the rows inside the image: pasted row k belongs to mask owner[k].
    rows_per_mask = num_inside[:, 1]
    owner = torch.repeat_interleave(torch.arange(num_masks, device=device), rows_per_mask)  # [num_rows]
    row_in_mask = torch.arange(num_rows, device=device) - (rows_per_mask.cumsum(0) - rows_per_mask)[owner]
    rows = first[owner, 1] + row_in_mask  # image row of each pasted row
    top, bottom, weight_y = _bilinear_taps(rows, start[owner, 1], length[owner, 1], source_size)
    resized_rows = resized_x.reshape(num_masks * source_size, window)
    values = resized_rows[owner * source_size + top]  # [num_rows, window], the upper source row
    values.lerp_(resized_rows[owner * source_size + bottom], weight_y[:, None])

    # Each pasted row fills `window` consecutive pixels of one image row. `unfold` views every image
    # row as all its windows of that width (overlapping views of the same memory); the windows written
    # here never overlap, so every pixel is written at most once, by one row copy.
    windows = pasted.view(-1, width).unfold(1, window, 1)  # [N * H, W - window + 1, window]
    windows[group[owner] * height + rows, window_start[owner]] = values.to(pasted.dtype)


def paste_masks_per_box(
    masks: Tensor, boxes: Tensor, image_size: tuple[int, int], padding: int = 1, *, num_threads: int = 1
) -> Tensor:
    """torchvision's `paste_masks_in_image` to the bit: `masks [N, 1, M, M]` over `boxes [N, 4]`
    -> `[N, 1, H, W]`, one `F.interpolate` per mask to its truncated box, as torchvision does.

    For the strict CPU mode, whose outputs must equal torchvision's: `paste_masks` computes the same
    interpolation separably and differs in the last bits. Unlike torchvision this writes into one
    zeroed `[N, 1, H, W]` instead of stacking N zeroed images, and spreads the masks over
    `num_threads` threads (each interpolation is single-threaded and releases the GIL).
    """
    from torchvision.models.detection.roi_heads import expand_boxes, expand_masks

    height, width = image_size
    pasted = torch.zeros((len(masks), 1, height, width), dtype=masks.dtype, device=masks.device)
    if len(masks) == 0:
        return pasted
    padded, scale = expand_masks(masks, padding=padding)  # [N, 1, P, P], P = M + 2 * padding
    integer_boxes = expand_boxes(boxes, scale).to(torch.int64).tolist()  # ends inclusive

    def paste(indices: range) -> None:
        for index in indices:
            x0, y0, x1, y1 = integer_boxes[index]
            size = (max(y1 - y0 + 1, 1), max(x1 - x0 + 1, 1))
            resized = F.interpolate(padded[index : index + 1], size=size, mode="bilinear", align_corners=False)
            left, right, top, bottom = max(x0, 0), min(x1 + 1, width), max(y0, 0), min(y1 + 1, height)
            if right > left and bottom > top:
                pasted[index, 0, top:bottom, left:right] = resized[0, 0, top - y0 : bottom - y0, left - x0 : right - x0]

    if num_threads <= 1 or masks.device.type != "cpu":
        paste(range(len(masks)))
    else:
        chunks = [range(start, len(masks), num_threads) for start in range(num_threads)]
        list(thread_pool(num_threads).map(paste, chunks))
    return pasted
