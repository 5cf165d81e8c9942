"""Pictures: predictions drawn on images (torchvision.utils.draw_*) and training curves (matplotlib).

Images here are `uint8 [3, H, W]` tensors. Boxes are x1y1x2y2 in continuous pixel coordinates
and keypoints `(x, y, v)` in continuous coordinates, as the model returns them (docs/design.md);
at this drawing precision a pixel index and a continuous coordinate are the same point.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import draw_bounding_boxes, draw_keypoints, draw_segmentation_masks

# Distinct, saturated colours (Tableau 10); label k gets PALETTE[k % 10].
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def label_color(label: int) -> tuple[int, int, int]:
    return PALETTE[int(label) % len(PALETTE)]


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """`float [3, H, W]` in 0-1 (the model's input) or `uint8` -> `uint8 [3, H, W]` on the CPU."""
    image = image.detach().cpu()
    if image.dtype == torch.uint8:
        return image
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def coco_skeleton(category: Mapping) -> list[tuple[int, int]]:
    """A COCO category's 1-based `skeleton` pairs -> 0-based pairs for `draw_keypoints`."""
    return [(int(a) - 1, int(b) - 1) for a, b in category.get("skeleton", [])]


def draw_predictions(
    image: torch.Tensor,
    prediction: Mapping[str, torch.Tensor],
    *,
    category_names: Mapping[int, str] | None = None,
    skeleton: Sequence[tuple[int, int]] | None = None,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    scale: int = 1,
    font_size: int | None = None,
    show_scores: bool = True,
) -> torch.Tensor:
    """Draw masks, boxes with "name score" captions, and keypoint skeletons.

    image: `[3, H, W]` float 0-1 or uint8, the image the prediction was made on.
    prediction: `boxes [N, 4]`, `labels [N]`, `scores [N]`, optional `masks [N, 1, H, W]`
        probabilities and `keypoints [N, K, 3]` (x, y, visibility); detections below
        `score_threshold` are left out.
    category_names: label -> name; missing labels are shown as their number.
    skeleton: 0-based keypoint index pairs to connect.
    scale: enlarge the image this many times first (nearest neighbour: the pixels stay visible)
        and draw at that size, so that small images get readable captions.
    font_size: the captions' size in pixels (a scalable font, on a filled label); None keeps
        torchvision's small bitmap font.
    show_scores: False writes only the class names (ground truth).
    Returns `uint8 [3, scale * H, scale * W]`.
    """
    canvas = to_uint8(image)
    if scale > 1:
        canvas = canvas.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    keep = prediction["scores"].detach().cpu() >= score_threshold
    if not bool(keep.any()):
        return canvas
    boxes = prediction["boxes"].detach().cpu().float()[keep] * scale
    labels = prediction["labels"].detach().cpu()[keep].tolist()
    scores = prediction["scores"].detach().cpu()[keep].tolist()
    colors = [label_color(label) for label in labels]
    if "masks" in prediction:
        masks = prediction["masks"].detach().cpu()[keep][:, 0] > mask_threshold  # [N, H, W] bool
        masks = masks.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
        canvas = draw_segmentation_masks(canvas, masks, alpha=0.45, colors=colors)
    names = category_names or {}
    captions = [names.get(label, str(label)) + (f" {score:.2f}" if show_scores else "")
                for label, score in zip(labels, scores)]
    if font_size is None:
        canvas = draw_bounding_boxes(canvas, boxes, labels=captions, colors=colors, width=2)
    else:
        canvas = draw_bounding_boxes(canvas, boxes, colors=colors, width=max(2, scale))
        canvas = _draw_captions(canvas, boxes, captions, colors, font_size=font_size)
    if "keypoints" in prediction:
        keypoints = prediction["keypoints"].detach().cpu().float()[keep]  # [N, K, 3]
        canvas = draw_keypoints(
            canvas, keypoints[..., :2] * scale, connectivity=list(skeleton or []) or None, colors=(255, 255, 255),
            radius=2 * scale, width=scale, visibility=keypoints[..., 2] > 0,
        )
    return canvas


def _draw_captions(canvas: torch.Tensor, boxes: torch.Tensor, captions: list[str], colors: list, *,
                   font_size: int) -> torch.Tensor:
    """White text on a label of the box's colour at each box's top-left corner (inside the
    image: a box at the top edge gets its label below the corner instead of cut off)."""
    picture = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=font_size)
    for (x1, y1, _, _), caption, color in zip(boxes.tolist(), captions, colors):
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        width, height = right - left + 6, bottom - top + 4
        x = min(max(x1, 0), max(picture.width - width, 0))
        y = y1 - height if y1 - height >= 0 else max(y1, 0)
        draw.rectangle((x, y, x + width, y + height), fill=tuple(color))
        draw.text((x + 3 - left, y + 2 - top), caption, fill=(255, 255, 255), font=font)
    return torch.from_numpy(np.array(picture)).permute(2, 0, 1).contiguous()


def contact_sheet(tiles: Sequence[tuple[str, torch.Tensor, torch.Tensor]], *, columns: int = 2,
                  gap: int = 12, font_size: int = 20) -> torch.Tensor:
    """One picture of (title, ground truth, prediction) pairs, `columns` pairs per row, each pair
    under its title with "ground truth" and "prediction" written over the two halves.

    tiles: uint8 `[3, h, w]` images, all the same size. Returns uint8 `[3, H, W]` on white.
    """
    _, height, width = tiles[0][1].shape
    header = font_size + 10
    cell_width, cell_height = 2 * width + gap, height + header
    rows = math.ceil(len(tiles) / columns)
    sheet = Image.new("RGB", (columns * cell_width + (columns + 1) * gap, rows * cell_height + (rows + 1) * gap),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=font_size)
    for index, (title, truth, prediction) in enumerate(tiles):
        x = gap + (index % columns) * (cell_width + gap)
        y = gap + (index // columns) * (cell_height + gap)
        for offset, (caption, picture) in enumerate(((f"{title}: ground truth", truth), ("prediction", prediction))):
            left = x + offset * (width + gap)
            draw.text((left, y + 2), caption, fill=(0, 0, 0), font=font)
            sheet.paste(Image.fromarray(picture.permute(1, 2, 0).numpy()), (left, y + header))
    return torch.from_numpy(np.array(sheet)).permute(2, 0, 1).contiguous()


def overlay_masks(
    canvas: torch.Tensor,
    chunks: Iterable[tuple[int, torch.Tensor]],
    *,
    colors: Sequence[tuple[int, int, int]],
    alpha: float = 0.45,
) -> torch.Tensor:
    """Blend masks into `canvas uint8 [3, H, W]` from chunks `(start, bool [n, H, W])` of masks
    `start..start + n`, so that all N masks never have to be dense at once. The blend of
    `draw_segmentation_masks`, except where masks overlap: the later one shows there (torchvision
    paints overlaps black). `colors[i]` is mask i's colour."""
    layer = canvas.clone()
    covered = torch.zeros(canvas.shape[-2:], dtype=torch.bool)
    for start, masks in chunks:
        for offset, mask in enumerate(masks.cpu()):  # drawing: one in-place fill per mask and channel
            for channel, value in enumerate(colors[start + offset]):
                layer[channel].masked_fill_(mask, value)
            covered |= mask
    out = canvas.clone()
    for rows in torch.arange(canvas.shape[-2]).split(256):  # float blending a band of rows at a time
        band = (canvas[:, rows].float() * (1 - alpha) + layer[:, rows].float() * alpha).to(torch.uint8)
        out[:, rows] = torch.where(covered[rows], band, canvas[:, rows])
    return out


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """Write a `uint8 [3, H, W]` tensor as a PNG (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(image).permute(1, 2, 0).numpy()).save(path)
    return path


def read_metrics(metrics_path: str | Path) -> list[dict]:
    """The JSON-lines metrics file written by the trainer: one object per logged iteration."""
    records = []
    for number, line in enumerate(Path(metrics_path).read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{metrics_path}, line {number}: not JSON ({error.msg})") from None
    return records


def plot_training_curves(metrics_path: str | Path, out_path: str | Path) -> Path:
    """Plot losses, learning rate and evaluation AP against the iteration into a PNG.

    Reads the records' `iteration` and every numeric `loss*` key (total and terms), `lr`, and
    every key with `AP` in its name (periodic evaluation, e.g. `segm/AP`).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot's import
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(metrics_path) if isinstance(r.get("iteration"), (int, float))]
    if not records:
        raise ValueError(f"{metrics_path}: no records with an 'iteration' field to plot")

    def series(key: str) -> tuple[list[float], list[float]]:
        points = [(r["iteration"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        points = [(x, y) for x, y in points if math.isfinite(y)]
        return [x for x, _ in points], [y for _, y in points]

    keys = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    loss_keys = [k for k in keys if k.startswith("loss") or k.endswith("loss")]
    ap_keys = [k for k in keys if "AP" in k and "/" in k and k.split("/")[-1] in ("AP", "AP50")]
    panels = [("losses", loss_keys, True), ("learning rate", ["lr"] if "lr" in keys else [], False),
              ("evaluation", ap_keys, False)]
    panels = [p for p in panels if p[1]]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for axis, (title, panel_keys, log_scale) in zip(axes[0], panels):
        for key in panel_keys:
            xs, ys = series(key)
            axis.plot(xs, ys, label=key, linewidth=2.0 if key in ("loss", "total_loss") else 1.0,
                      marker="o" if len(xs) < 20 and title == "evaluation" else None)
        if log_scale and all(y > 0 for key in panel_keys for y in series(key)[1]):
            axis.set_yscale("log")
        axis.set_title(title)
        axis.set_xlabel("iteration")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
    return out_path
