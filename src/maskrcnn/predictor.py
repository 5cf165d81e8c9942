"""Predictor: a trained model behind one call, for images in the forms people hold them.

Like detectron2's `DefaultPredictor`: load the weights once, then call it on a path, a PIL image,
an `[H, W, 3]` uint8 numpy array (RGB, or BGR with `input_format="BGR"`, as OpenCV reads them),
a `[3, H, W]` tensor (float in 0-1 or uint8; a `[B, 3, H, W]` tensor is B images), or a list of
any of these; the images run through the model in batches of `batch_size`. Each result is the
model's output dict (`boxes`, `labels`, `scores`, `masks`, `keypoints`, ... on the CPU) with the
detections scoring >= `score_threshold`, plus `names` (one class name per detection) and
`category_ids` (the COCO category id of each label, from the checkpoint's label table).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from maskrcnn.checkpoint.label_space import category_id_table, label_names, labels_from_categories
from maskrcnn.data.coco import decode_image, image_to_tensor
from maskrcnn.model.mask_head import paste_masks

ImageInput = str | Path | Image.Image | np.ndarray | Tensor
MASK_MODES = ("image", "box")
INPUT_FORMATS = ("RGB", "BGR")


class Predictor:
    """`Predictor(weights)(image_or_list)` -> one result dict, or a list of them for a list.

    weights: a checkpoint path (`maskrcnn.load_checkpoint`) or a model (ours, torchvision's, or
        anything with the same `model(list_of_images)` call).
    device: "auto" (CUDA when available), "cpu", "cuda:1", ...
    score_threshold: detections scoring below it are dropped.
    input_format: channel order of numpy arrays, "RGB" or "BGR" (tensors and PIL images are RGB).
    masks: "image" gives `[N, 1, H, W]` probabilities at the image size, as `model(images)`;
        "box" keeps `[N, 1, 28, 28]` over each box (N * 28 * 28 instead of N * H * W values: a
        100-detection 4000 x 3000 image needs 4.8 GB dense); `paste_in_chunks` pastes them later.
    categories: COCO categories naming the labels when the model carries no label table.
    inference_mode: on the CPU, "eager" (the model as it is), or an `optimize_for_cpu` mode for our
        MaskRCNN: "strict" (outputs identical to torchvision's), "fast" (fused oneDNN convolutions,
        within float tolerance), "bf16" (CPUs with AMX or AVX-512 bf16; "fast" elsewhere). See docs/results.md.
    """

    def __init__(
        self,
        weights: str | Path | nn.Module,
        *,
        device: str | torch.device = "auto",
        score_threshold: float = 0.5,
        batch_size: int = 4,
        input_format: str = "RGB",
        masks: str = "image",
        categories: Sequence[Mapping] | None = None,
        inference_mode: str = "eager",
    ) -> None:
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {input_format!r}")
        if masks not in MASK_MODES:
            raise ValueError(f"masks must be one of {MASK_MODES}, got {masks!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(weights, nn.Module):
            model = weights
        else:
            from maskrcnn.checkpoint import load_checkpoint

            model = load_checkpoint(weights)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = self._for_device(model.to(self.device).eval(), inference_mode)
        self.score_threshold, self.batch_size, self.input_format = score_threshold, batch_size, input_format
        table = getattr(model, "label_space", None) or (labels_from_categories(categories) if categories else None)
        self.label_names: dict[int, str] = label_names(table) if table else {}
        self.category_ids: Tensor | None = category_id_table(table) if table else None
        # Only our model can keep masks over their boxes; others always paste.
        self.reads_uint8 = hasattr(model, "detect")  # our MaskRCNN: its transform reads uint8 images
        self.masks_over_boxes = masks == "box" and self.reads_uint8
        self.paste_aligned = bool(getattr(model, "paste_aligned", False))

    def _for_device(self, model: nn.Module, inference_mode: str) -> nn.Module:
        from maskrcnn.engine.cpu_inference import INFERENCE_MODES, optimize_for_cpu

        if inference_mode not in INFERENCE_MODES:
            raise ValueError(f"inference_mode must be one of {INFERENCE_MODES}, got {inference_mode!r}")
        if inference_mode == "eager":
            return model
        if self.device.type != "cpu":
            raise ValueError(f"inference_mode {inference_mode!r} is for the CPU; the device is {self.device}")
        if not hasattr(model, "paste_per_box_threads"):  # our MaskRCNN
            raise ValueError(f"inference_mode {inference_mode!r} needs our MaskRCNN, got {type(model).__name__}")
        return optimize_for_cpu(model, mode=inference_mode)

    def __call__(self, inputs: ImageInput | Sequence[ImageInput]) -> dict[str, Any] | list[dict[str, Any]]:
        single = not isinstance(inputs, (list, tuple)) and not (isinstance(inputs, Tensor) and inputs.dim() == 4)
        images = [self.to_tensor(item, index=i) for i, item in enumerate([inputs] if single else list(inputs))]
        results = self.predict_tensors(images)
        return results[0] if single else results

    @torch.no_grad()
    def predict_tensors(self, images: Sequence[Tensor]) -> list[dict[str, Any]]:
        """`[3, H, W]` images, floats in 0-1 or uint8, -> results, in batches of `batch_size`.

        Our MaskRCNN takes uint8 as it is (a quarter of the memory while it runs); other models
        (torchvision's) get floats, converted a batch at a time."""
        results: list[dict[str, Any]] = []
        for start in range(0, len(images), self.batch_size):
            batch = [image.to(self.device) for image in images[start : start + self.batch_size]]
            if not self.reads_uint8:
                batch = [_tensor_image(image, index=start + i) for i, image in enumerate(batch)]
            if self.masks_over_boxes:
                outputs = self.model.detect(batch, paste_masks=False)
            else:
                outputs = self.model(batch)
            results.extend(self._finish(output) for output in outputs)
        return results

    def _finish(self, output: Mapping[str, Tensor]) -> dict[str, Any]:
        keep = output["scores"] >= self.score_threshold
        result: dict[str, Any] = {key: value[keep].cpu() for key, value in output.items()}
        labels = result["labels"].tolist()
        result["names"] = [self.label_names.get(label, str(label)) for label in labels]
        if self.category_ids is not None:  # labels the table does not name get id 0
            labels, ids = result["labels"], torch.zeros_like(result["labels"])
            named = labels < len(self.category_ids)
            ids[named] = self.category_ids[labels[named]]
            result["category_ids"] = ids
        return result

    def to_tensor(self, item: ImageInput, *, index: int = 0) -> Tensor:
        """One input -> float32 `[3, H, W]` in 0-1 (RGB). Errors name the input's position."""
        if isinstance(item, (str, Path)):
            if not Path(item).is_file():
                raise FileNotFoundError(f"input {index}: {item} is not a file")
            return decode_image(Path(item))
        if isinstance(item, Image.Image):
            return image_to_tensor(item)
        if isinstance(item, np.ndarray):
            return _array_to_tensor(item, bgr=self.input_format == "BGR", index=index)
        if isinstance(item, Tensor):
            return _tensor_image(item, index=index)
        raise TypeError(f"input {index}: expected a path, PIL image, numpy array or tensor, got {type(item).__name__}")


def _array_to_tensor(array: np.ndarray, *, bgr: bool, index: int) -> Tensor:
    """`uint8 [H, W, 3]` (or `[H, W]` grey) -> float32 `[3, H, W]` in 0-1."""
    if array.dtype != np.uint8:
        raise TypeError(f"input {index}: numpy images must be uint8 (0-255), got {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"input {index}: expected an [H, W, 3] array, got shape {array.shape}")
    if bgr:
        array = array[:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float().div_(255.0)


def _tensor_image(image: Tensor, *, index: int) -> Tensor:
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"input {index}: expected a [3, H, W] tensor, got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.float().div_(255.0)
    if not image.is_floating_point():
        raise TypeError(f"input {index}: expected float (0-1) or uint8 pixels, got {image.dtype}")
    return image


def paste_in_chunks(
    masks: Tensor, boxes: Tensor, image_size: tuple[int, int], *, aligned: bool, threshold: float = 0.5,
    max_values: int = 1 << 24,
) -> Iterator[tuple[int, Tensor]]:
    """Paste `masks [N, 1, M, M]` over `boxes [N, 4]` a few at a time and yield `(start, bool
    [n, H, W])` for masks `start..start + n`: at most `max_values` pasted floats live at once
    (64 MB by default; on a 4000 x 3000 image one mask at a time)."""
    height, width = image_size
    per_chunk = max(1, max_values // max(1, height * width))
    for start in range(0, len(masks), per_chunk):
        pasted = paste_masks(masks[start : start + per_chunk], boxes[start : start + per_chunk], image_size,
                             padding=1, aligned=aligned)
        yield start, pasted[:, 0] > threshold
