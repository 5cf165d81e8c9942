"""Export a trained model to ONNX or TorchScript: the whole detector, pre- and post-processing included.

Route: **tracing**. `ExportableMaskRCNN` is the eval-mode forward of a `MaskRCNN` written so that a
trace of it holds for every image size and every number of detections: sizes are read from
tensor shapes (never turned into Python numbers), proposal and detection counts stay tensors,
and the two steps with a loop that depends on the data (keypoint decoding per RoI) are scripted
inside the trace (`torch.jit.script_if_tracing`). One trace gives both formats: `torch.jit.trace`
for TorchScript and the TorchScript-based `torch.onnx.export` for ONNX, so the two files hold
the same graph. Tracing was chosen over `torch.jit.script` of the model itself because the
training path (InstanceMasks duck typing, samplers, point supervision) and the eager speed-ups
(numpy-backed paste, grouped keypoint decoding) would all have to be rewritten in TorchScript's
subset, while the ONNX exporter traces anyway (torchvision's detection models take the same
route to ONNX). It uses the model's own layers and settings (thresholds, sizes, poolers) and
the pure functions of the heads; tests pin its outputs to the eager model's.

Inputs and outputs of the exported graph (B = `batch_size`, fixed when exporting):
    images   float32 [B, 3, H, W] in 0-1, any H and W (the B images of one call share one size)
    boxes    float32 [N, 4] x1y1x2y2 in input pixels; labels int64 [N]; scores float32 [N]
    masks    float32 [N, 1, H, W] probabilities pasted at the image size (masks="image"), or
             [N, 1, M, M] over each box (masks="box", M = 28 by default)
    keypoints float32 [N, K, 3] (x, y, 1), keypoints_scores float32 [N, K]   (keypoint models)
    image_index int64 [N]: which of the B images each detection belongs to (only when B > 1)
Detections of image 0 come first, each image's best first.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import nms, roi_align

from maskrcnn.model.mask_head import _bilinear_taps, _mask_spans
from maskrcnn.model.rpn import MIN_PROPOSAL_SIZE, flatten_predictions

FORMATS = ("onnx", "torchscript")
MASK_MODES = ("image", "box")
ONNX_OPSET = 17


class ExportableMaskRCNN(nn.Module):
    """`model`'s inference as a traceable module: `forward(images [B, 3, H, W]) -> tuple of tensors`
    (see the module docstring for the outputs). `masks="image"` pastes the masks at the image size,
    as `model(images)` returns them; `masks="box"` keeps the `[N, 1, 28, 28]` masks over their boxes
    (memory N * 28 * 28 instead of N * H * W: paste only the ones you draw)."""

    def __init__(self, model: nn.Module, *, masks: str = "image", batch_size: int = 1) -> None:
        super().__init__()
        if masks not in MASK_MODES:
            raise ValueError(f"masks must be one of {MASK_MODES}, got {masks!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.transform, self.backbone, self.rpn, self.roi_heads = model.transform, model.backbone, model.rpn, model.roi_heads
        self.masks, self.batch_size, self.paste_aligned = masks, batch_size, model.paste_aligned
        self.has_masks = model.roi_heads.mask_head is not None
        self.has_keypoints = model.roi_heads.keypoint_head is not None

    @property
    def output_names(self) -> list[str]:
        names = ["boxes", "labels", "scores"]
        names += ["masks"] * self.has_masks + ["keypoints", "keypoints_scores"] * self.has_keypoints
        return names + ["image_index"] * (self.batch_size > 1)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        original_size = torch._shape_as_tensor(images)[-2:]  # (H, W), a tensor: traced, not a constant
        batch, resized_size = self.preprocess(images)  # [B, 3, H_pad, W_pad], (h, w) inside the padding
        features = self.backbone(batch)
        feature_maps = list(features.values())
        logits, deltas = self.rpn.head(feature_maps)  # per level [B, A, h, w], [B, 4A, h, w]
        anchors = self.rpn.anchor_generator(batch.shape[-2:], feature_maps)  # per level [h * w * A, 4]
        per_image = []
        for index in range(self.batch_size):  # unrolled by the trace: B is fixed at export
            proposals = self.proposals(logits, deltas, anchors, index, resized_size)
            per_image.append(self.detect(features, proposals, index, resized_size, original_size))
        outputs = [torch.cat(parts) for parts in zip(*per_image)]
        if self.batch_size > 1:
            outputs.append(torch.cat([torch.full_like(parts[1], i) for i, parts in enumerate(per_image)]))
        return tuple(outputs)

    # ------------------------------------------------------------------ steps
    def preprocess(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Normalise (the eager transform's own `normalize`), resize to the eager transform's size in
        the same float64 arithmetic, and pad to a multiple of `size_divisible`."""
        transform = self.transform
        normalized = torch.stack([transform.normalize(image) for image in images.unbind(0)])
        resized_size = _resized_size(torch._shape_as_tensor(images)[-2:], transform)  # [2] (h, w)
        resized = F.interpolate(normalized, size=(resized_size[0], resized_size[1]), mode="bilinear", align_corners=False)
        stride = transform.size_divisible
        padding = torch.div(resized_size + stride - 1, stride, rounding_mode="floor") * stride - resized_size
        return F.pad(resized, (0, padding[1], 0, padding[0])), resized_size

    def proposals(self, logits: list[Tensor], deltas: list[Tensor], anchors: list[Tensor], index: int,
                  image_size: Tensor) -> Tensor:
        """The RPN's proposals `[P, 4]` for image `index`: per level the top `pre_nms_top_n_test`,
        clipped, without tiny boxes, above `score_thresh`, NMS per level, the best `post_nms_top_n_test`."""
        rpn = self.rpn
        boxes, scores, levels = [], [], []
        for level, (level_logits, level_deltas, level_anchors) in enumerate(zip(logits, deltas, anchors)):
            flat_logits, flat_deltas = flatten_predictions([level_logits[index : index + 1]], [level_deltas[index : index + 1]])
            count = torch._shape_as_tensor(flat_logits)[1]
            top = flat_logits[0].topk(_at_most(count, rpn.pre_nms_top_n["test"])).indices
            decoded = rpn.box_coder.decode(flat_deltas[0, top], level_anchors[top])[:, 0]
            boxes.append(decoded)
            scores.append(torch.sigmoid(flat_logits[0, top]))
            levels.append(torch.full_like(top, level))
        boxes, scores, levels = _clip(torch.cat(boxes), image_size), torch.cat(scores), torch.cat(levels)
        widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        keep = torch.where((widths >= MIN_PROPOSAL_SIZE) & (heights >= MIN_PROPOSAL_SIZE) & (scores >= rpn.score_thresh))[0]
        boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        keep = _batched_nms(boxes, scores, levels, rpn.nms_thresh)[: rpn.post_nms_top_n["test"]]
        return boxes[keep]

    def detect(self, features: dict[str, Tensor], proposals: Tensor, index: int, image_size: Tensor,
               original_size: Tensor) -> list[Tensor]:
        """Box head on the proposals, per-class NMS, then masks and keypoints on the detections;
        everything mapped back to the original image size."""
        heads = self.roi_heads
        box_features = heads.box_head(_pool(heads.box_pooler, features, proposals, index, image_size))
        class_logits, box_deltas = heads.box_predictor(box_features)  # [R, K + 1], [R, (K + 1) * 4]
        boxes, scores, labels = self.box_inference(class_logits, box_deltas, proposals, image_size)
        ratio = original_size.to(torch.float32) / image_size.to(torch.float32)  # (h, w) as the eager transform
        outputs = [boxes * ratio.flip(0).repeat(2)[None], labels, scores]
        if self.has_masks:
            logits = heads.mask_head(_pool(heads.mask_pooler, features, boxes, index, image_size))  # [N, C, M, M]
            channel = labels if logits.shape[1] > 1 else torch.zeros_like(labels)
            masks = logits.gather(1, channel[:, None, None, None].expand(-1, 1, logits.shape[2], logits.shape[3]))
            masks = masks.sigmoid()
            if self.masks == "image":
                masks = paste_masks_dense(masks, outputs[0], original_size, aligned=self.paste_aligned)
            outputs.append(masks)
        if self.has_keypoints:
            heatmaps = heads.keypoint_head(_pool(heads.keypoint_pooler, features, boxes, index, image_size))
            keypoints, keypoint_scores = decode_keypoints(heatmaps, boxes, heads.keypoint_decoding == "detectron2")
            ratio_xy = torch.cat([ratio.flip(0), torch.ones(1)])
            outputs += [keypoints * ratio_xy, keypoint_scores]
        return outputs

    def box_inference(self, class_logits: Tensor, box_deltas: Tensor, proposals: Tensor,
                      image_size: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The eager `box_inference` for one image: one box per (proposal, class) pair (suppressed
        labels left out), kept above `score_thresh`, NMS per class, the best `detections_per_img`;
        degenerate boxes dropped before NMS ("torchvision") or empty ones after it ("detectron2")."""
        heads = self.roi_heads
        num_classes = class_logits.shape[-1]
        classes = torch.tensor([c for c in range(1, num_classes) if c not in heads.suppressed_labels], dtype=torch.int64)
        boxes = _clip(heads.box_coder.decode(box_deltas, proposals).reshape(-1, 4), image_size)
        boxes = boxes.reshape(-1, num_classes, 4)[:, classes].reshape(-1, 4)
        scores = F.softmax(class_logits, dim=-1)[:, classes].reshape(-1)
        labels = classes[None].expand(class_logits.shape[0], -1).reshape(-1)
        keep = scores > heads.score_thresh
        if heads.box_postprocess == "torchvision":
            keep = keep & (boxes[:, 2] - boxes[:, 0] >= 1e-2) & (boxes[:, 3] - boxes[:, 1] >= 1e-2)  # no &=: ONNX
        keep = torch.where(keep)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = _batched_nms(boxes, scores, labels, heads.nms_thresh)[: heads.detections_per_img]
        if heads.box_postprocess == "detectron2":
            keep = keep[((boxes[keep, 2:] - boxes[keep, :2]) > 0).all(dim=1)]
        return boxes[keep], scores[keep], labels[keep]


# --------------------------------------------------------------------------- traceable pieces
def _resized_size(size: Tensor, transform: nn.Module) -> Tensor:
    """`ImageTransform.resize`'s output size for an image of `size [2]` (h, w), as int64 `[2]`:
    floor(side * scale) ("floor", torchvision's) or detectron2's rounding ("round"), >= 1 pixel."""
    size = size.to(torch.float64)
    # float64 tensors on both sides: a Python number over a tensor becomes a float32 reciprocal in ONNX
    shorter, longer = (torch.tensor(float(s), dtype=torch.float64) for s in (transform.min_size_test, transform.max_size))
    if transform.size_rounding == "floor":
        resized = torch.floor(size * torch.minimum(shorter / size.min(), longer / size.max()))
    else:  # the shorter side becomes min_size exactly, then both shrink to fit max_size; rounded
        scaled = size * (shorter / size.min())
        height_shorter = size[0] < size[1]
        resized = torch.stack([torch.where(height_shorter, shorter, scaled[0]), torch.where(height_shorter, scaled[1], shorter)])
        resized = resized * torch.clamp(longer / resized.max(), max=1.0)
        resized = torch.floor(resized + 0.5)
    return resized.clamp(min=1).to(torch.int64)


def _at_most(count: Tensor, limit: int) -> Tensor | int:
    """min(count, limit) that stays a tensor in a trace (so topk's k follows the image size)."""
    if torch.jit.is_tracing():
        return torch.clamp(count, max=limit)
    return min(int(count), limit)


def _clip(boxes: Tensor, image_size: Tensor) -> Tensor:
    """Clip `boxes [N, 4]` to an image of `image_size [2]` (h, w)."""
    height, width = image_size[0].to(boxes.dtype), image_size[1].to(boxes.dtype)
    x = boxes[:, 0::2].clamp(min=0).minimum(width)
    y = boxes[:, 1::2].clamp(min=0).minimum(height)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


def _batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each group (torchvision's offset trick: each group moved beyond the others'
    coordinates), indices best first. The offset is taken over the boxes and a zero, so that no
    detection at all is an empty result rather than a reduction over nothing."""
    largest = torch.cat([boxes.flatten(), boxes.new_zeros(1)]).max()
    shifted = boxes + (groups.to(boxes.dtype) * (largest + 1))[:, None]
    return nms(shifted, scores, iou_threshold)


def _pool(pooler: nn.Module, features: dict[str, Tensor], boxes: Tensor, index: int, image_size: Tensor) -> Tensor:
    """The eager `MultiLevelRoIAlign` for the boxes `[R, 4]` of image `index`: each box on its FPN
    level (FPN eq. 1 with the pooler's canonical box size), `[R, C, S, S]` in the boxes' order.

    As in the eager pooler (and torchvision's), a level's scale is 2 ** round(log2(map height /
    image height)), which for a small image far from its padded size is not 1 / stride: it stays a
    tensor here and scales the boxes (exact: a power of 2), since ONNX's RoiAlign takes its
    spatial_scale as a constant."""
    maps = [features[name] for name in pooler.featmap_names]
    height = image_size[0].to(torch.float32)
    exponents = [torch.round(torch.log2(torch._shape_as_tensor(m)[-2].to(torch.float32) / height)) for m in maps]
    first_level, last_level = -exponents[0], -exponents[-1]
    size = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    level = torch.floor(4 + torch.log2(size / pooler.canonical_box_size) + torch.tensor(1e-6, dtype=size.dtype))
    level = (torch.minimum(torch.maximum(level, first_level), last_level) - first_level).to(torch.int64)
    image_column = torch.full_like(boxes[:, :1], index)
    pooled, positions = [], []
    for number, (feature_map, exponent) in enumerate(zip(maps, exponents)):
        on_level = torch.where(level == number)[0]
        rois = torch.cat([image_column[on_level], boxes[on_level] * torch.pow(2.0, exponent)], dim=1)  # [r, 5]
        pooled.append(roi_align(feature_map, rois, pooler.output_size, spatial_scale=1.0,
                                sampling_ratio=pooler.sampling_ratio, aligned=pooler.aligned))
        positions.append(on_level)
    return torch.cat(pooled)[torch.cat(positions).argsort()]


def paste_masks_dense(masks: Tensor, boxes: Tensor, image_size: Tensor, *, padding: int = 1,
                      aligned: bool = False) -> Tensor:
    """`masks [N, 1, M, M]` over `boxes [N, 4]` -> `[N, 1, H, W]` with the numbers of the eager
    `paste_masks` (the same spans and bilinear taps), as two gathers over every image pixel: no
    data-dependent size, so it traces; memory N * H * W (the eager paste touches only the boxes)."""
    height, width = image_size[0], image_size[1]
    padded = F.pad(masks[:, 0], (padding,) * 4)  # [N, P, P]
    source_size = padded.shape[-1]
    start, length, first, last = _mask_spans(boxes.to(torch.float32), masks.shape[-1], padding, aligned)
    cols = torch.arange(width)[None]  # [1, W]
    rows = torch.arange(height)[None]  # [1, H]
    left, right, weight_x = _bilinear_taps(cols, start[:, :1], length[:, :1], source_size)  # [N, W]
    top, bottom, weight_y = _bilinear_taps(rows, start[:, 1:], length[:, 1:], source_size)  # [N, H]
    inside_x = ((cols >= first[:, :1]) & (cols <= last[:, :1])).to(padded.dtype)
    inside_y = ((rows >= first[:, 1:]) & (rows <= last[:, 1:])).to(padded.dtype)

    def along_x(index: Tensor) -> Tensor:  # [N, W] -> [N, P, W]
        return padded.gather(2, index[:, None, :].expand(-1, source_size, -1))

    resized_x = (along_x(left) * (1 - weight_x)[:, None] + along_x(right) * weight_x[:, None]) * inside_x[:, None]

    def along_y(index: Tensor) -> Tensor:  # [N, H] -> [N, H, W]
        return resized_x.gather(1, index[:, :, None].expand(-1, -1, resized_x.shape[-1]))

    pasted = along_y(top) * (1 - weight_y)[:, :, None] + along_y(bottom) * weight_y[:, :, None]
    return (pasted * inside_y[:, :, None])[:, None]


@torch.jit.script_if_tracing
def decode_keypoints(heatmaps: Tensor, rois: Tensor, softmax_scores: bool) -> tuple[Tensor, Tensor]:
    """The eager `heatmaps_to_keypoints`, one RoI at a time (scripted inside a trace, since each
    RoI's heatmap is resized to its own size): `heatmaps [R, K, S, S]`, `rois [R, 4]` ->
    keypoints `[R, K, 3]` (x, y, 1) and scores `[R, K]`: the resized logit at the argmax, or with
    `softmax_scores` its softmax weight over the S x S cells (decoding "detectron2")."""
    num_keypoints = heatmaps.shape[1]
    widths = (rois[:, 2] - rois[:, 0]).clamp(min=1)
    heights = (rois[:, 3] - rois[:, 1]).clamp(min=1)
    out_w, out_h = widths.ceil(), heights.ceil()
    keypoints = torch.zeros((0, num_keypoints, 3), dtype=torch.float32, device=heatmaps.device)
    scores = torch.zeros((0, num_keypoints), dtype=torch.float32, device=heatmaps.device)
    for i in range(rois.shape[0]):
        h, w = int(out_h[i]), int(out_w[i])
        resized = F.interpolate(heatmaps[i : i + 1], size=(h, w), mode="bicubic", align_corners=False)[0]
        flat = resized.reshape(num_keypoints, -1)
        best = flat.argmax(dim=1)
        row_length = out_w[i].to(torch.int64)  # a tensor, not `w`: ONNX keeps integer division integer
        y = torch.div(best, row_length, rounding_mode="floor")
        x = best - y * row_length
        point_x = (x.float() + 0.5) * (widths[i] / out_w[i]) + rois[i, 0]
        point_y = (y.float() + 0.5) * (heights[i] / out_h[i]) + rois[i, 1]
        points = torch.stack([point_x, point_y, torch.ones_like(point_x)], dim=1)
        keypoints = torch.cat([keypoints, points[None]])
        scores = torch.cat([scores, flat.gather(1, best[:, None])[:, 0][None]])
    if softmax_scores:
        scores = 1 / (heatmaps.to(torch.float32) - scores[:, :, None, None]).exp().sum(dim=(2, 3))
    return keypoints, scores


# --------------------------------------------------------------------------- the entry point
def export_model(
    model_or_weights: nn.Module | str | Path,
    out: str | Path,
    *,
    format: str,
    masks: str = "image",
    batch_size: int = 1,
    example_size: tuple[int, int] = (480, 640),
    opset: int = ONNX_OPSET,
) -> Path:
    """Write `model_or_weights` (a `MaskRCNN` or a checkpoint path) to `out` as ONNX or TorchScript.

    format: "onnx" (run it with onnxruntime) or "torchscript" (`torch.jit.load`).
    masks: "image" (default: `[N, 1, H, W]` pasted at the image size, what `model(images)` returns,
        so the file is a drop-in replacement) or "box" (`[N, 1, 28, 28]` over each box: N * H * W
        floats is 4.8 GB for 100 detections on a 4000 x 3000 image; paste what you need).
    batch_size: images per call, fixed in the graph (tracing unrolls the loop over images); H and
        W are free, the images of one call share one size.
    example_size: (H, W) of the random images traced; any size works at run time.
    The graph runs on the CPU (it is traced there); returns `out`.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    model = _as_model(model_or_weights)
    wrapper = ExportableMaskRCNN(model, masks=masks, batch_size=batch_size).eval()
    example = _example_images(wrapper, batch_size, example_size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), _quiet_tracer():
        if format == "torchscript":
            traced = torch.jit.trace(wrapper, (example,), check_trace=False)
            traced.save(str(out))
        else:
            _export_onnx(wrapper, example, out, opset)
    return out


def _as_model(model_or_weights: nn.Module | str | Path) -> nn.Module:
    if isinstance(model_or_weights, nn.Module):
        model = model_or_weights
    else:
        from maskrcnn import load_checkpoint

        model = load_checkpoint(model_or_weights)
    return model.to("cpu").eval()


def _example_images(wrapper: ExportableMaskRCNN, batch_size: int, size: tuple[int, int]) -> Tensor:
    """Seeded random images for the trace. The graph does not depend on what they show: no step
    branches on the number of proposals or detections (zero detections run the same ops)."""
    generator = torch.Generator().manual_seed(0)
    return torch.rand((batch_size, 3, *size), generator=generator)


def _export_onnx(wrapper: ExportableMaskRCNN, example: Tensor, out: Path, opset: int) -> None:
    dynamic = {"images": {2: "height", 3: "width"}}
    for name in wrapper.output_names:
        dynamic[name] = {0: "detections"}
    if wrapper.has_masks and wrapper.masks == "image":
        dynamic["masks"] = {0: "detections", 2: "height", 3: "width"}
    torch.onnx.export(wrapper, (example,), str(out), dynamo=False, opset_version=opset, input_names=["images"],
                      output_names=wrapper.output_names, dynamic_axes=dynamic, do_constant_folding=True)


@contextlib.contextmanager
def _quiet_tracer() -> Iterator[None]:
    """Silence the warnings this route expects: tracer warnings about shapes used as numbers (each
    such value is the same for every input, e.g. the number of FPN levels), and torch's notices that
    TorchScript and the TorchScript-based ONNX exporter are deprecated (they remain the route to a
    file that torch.jit.load and onnxruntime run with data-dependent shapes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        yield
