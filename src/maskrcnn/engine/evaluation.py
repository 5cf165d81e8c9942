"""COCO evaluation: run the model, write COCO results, score them with pycocotools' COCOeval.

Results follow COCO's conventions (docs/design.md): boxes `[x, y, w, h]` in absolute pixels,
masks as RLE (binarised at 0.5), keypoints as integer-pixel-index coordinates (our continuous
coordinates minus 0.5), and the dataset's original category ids: a label becomes the category id
of the model's own label table (`model.label_space`, checkpoint/label_space.py) when it has one,
else of the data set's numbering (categories by ascending id).

Numbers are pycocotools' own (`COCOeval.evaluate/accumulate/summarize`); the per-class and
per-group figures are read from the same `eval["precision"]` / `eval["recall"]` arrays with
`summarize`'s rules, so they agree with running COCOeval restricted to those categories.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn.data.loader import collate

IOU_TYPES = ("bbox", "segm", "keypoints")
DETECTION_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
KEYPOINT_STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")

# COCO's per-keypoint OKS sigmas for the 17 person keypoints (pycocotools' defaults).
COCO_PERSON_KEYPOINT_SIGMAS = np.array(
    [0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89]
) / 10.0
# Used when the categories carry no `keypoint_sigmas` and K != 17: the mean of COCO's person
# sigmas, i.e. the tolerance of an "average" COCO keypoint, for every keypoint.
DEFAULT_KEYPOINT_SIGMA = float(COCO_PERSON_KEYPOINT_SIGMAS.mean())


# --------------------------------------------------------------------------- results
def predictions_to_coco(
    prediction: Mapping[str, torch.Tensor],
    *,
    image_id: int,
    category_ids: torch.Tensor,
    mask_threshold: float = 0.5,
) -> list[dict]:
    """One image's model output -> COCO result dicts (one per detection).

    prediction: `boxes [N, 4]` x1y1x2y2 continuous pixels, `labels [N]` 1..K, `scores [N]`,
        optional `masks [N, 1, H, W]` probabilities at the image's size, optional
        `keypoints [N, K, 3]` (x, y, v) in continuous coordinates.
    category_ids: `int64 [num_classes + 1]`, label -> original COCO category id (index 0 unused).
    """
    boxes = prediction["boxes"].detach().float().cpu()
    if len(boxes) == 0:
        return []
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    labels = prediction["labels"].cpu()
    if labels.numel() and (labels.min() < 1 or labels.max() >= len(category_ids)):
        raise ValueError(
            f"image {image_id}: predicted labels must be in 1..{len(category_ids) - 1}, got "
            f"{labels.min().item()}..{labels.max().item()}"
        )
    categories = category_ids[labels].tolist()
    scores = prediction["scores"].detach().float().cpu().tolist()
    results = [
        {"image_id": int(image_id), "category_id": int(c), "bbox": [round(v, 3) for v in b], "score": round(s, 5)}
        for c, b, s in zip(categories, xywh, scores)
    ]
    if "masks" in prediction:
        binary = (prediction["masks"][:, 0] > mask_threshold).to(torch.uint8).cpu().numpy()  # [N, H, W]
        # pycocotools wants a Fortran-ordered [H, W, N] array and encodes all N in one call.
        rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
        for result, rle in zip(results, rles):
            result["segmentation"] = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
    if "keypoints" in prediction:
        keypoints = prediction["keypoints"].detach().float().cpu().clone()  # [N, K, 3]
        # Our keypoints are continuous coordinates (pixel centres at i + 0.5); COCO's are
        # integer pixel indices, so undo the +0.5 applied on load (design.md).
        keypoints[..., :2] -= 0.5
        for result, kps in zip(results, keypoints.flatten(1).tolist()):
            result["keypoints"] = [round(v, 3) for v in kps]
    return results


def category_id_table(dataset: object, coco_gt: COCO, label_space: Sequence[Mapping] | None = None) -> torch.Tensor:
    """`int64 [K + 1]` label -> category id: from the model's `label_space` (checked against the
    file's categories), else `dataset.label_to_category_id` (mapping or sequence), else COCO's
    sorted category ids mapped to 1..K."""
    if label_space:
        from maskrcnn.checkpoint.label_space import category_id_table as from_labels
        from maskrcnn.checkpoint.label_space import check_against_categories

        check_against_categories(label_space, coco_gt.dataset.get("categories", []), where="the model's label table")
        return from_labels(label_space)
    mapping = getattr(dataset, "label_to_category_id", None)
    if mapping is None:
        return torch.tensor([0] + sorted(coco_gt.getCatIds()), dtype=torch.int64)
    if isinstance(mapping, Mapping):
        table = torch.zeros(max(mapping) + 1, dtype=torch.int64)
        for label, category in mapping.items():
            table[int(label)] = int(category)
        return table
    values = [int(v) for v in mapping]
    # A sequence either starts with the background slot or lists labels 1..K.
    return torch.tensor(values if len(values) == len(coco_gt.getCatIds()) + 1 else [0] + values, dtype=torch.int64)


# --------------------------------------------------------------------------- scoring
def keypoint_sigmas(coco_gt: COCO, category_ids: Sequence[int]) -> np.ndarray:
    """OKS sigmas for the keypoint categories: their `keypoint_sigmas` field when present, COCO's
    person sigmas when K == 17, else `DEFAULT_KEYPOINT_SIGMA` for every keypoint."""
    found: dict[tuple, list[int]] = {}
    for cid in category_ids:
        category = coco_gt.cats[cid]
        num_keypoints = len(category["keypoints"])
        sigmas = category.get("keypoint_sigmas")
        if sigmas is None:
            sigmas = COCO_PERSON_KEYPOINT_SIGMAS if num_keypoints == 17 else [DEFAULT_KEYPOINT_SIGMA] * num_keypoints
        if len(sigmas) != num_keypoints:
            raise ValueError(
                f"category {cid} ({category.get('name')}): keypoint_sigmas has {len(sigmas)} values "
                f"for {num_keypoints} keypoints"
            )
        found.setdefault(tuple(float(s) for s in sigmas), []).append(cid)
    if len(found) > 1:
        # COCOeval takes one sigma vector for all categories.
        raise ValueError(f"keypoint categories disagree on keypoint_sigmas: {list(found.values())}")
    return np.array(next(iter(found)))


def _summary(coco_eval: COCOeval, category_indices: Sequence[int] | None = None) -> list[float]:
    """COCOeval.summarize's numbers (same rules, same order), optionally restricted to a subset
    of the evaluated categories (indices into `params.catIds`)."""
    params = coco_eval.params
    cats = list(range(len(params.catIds))) if category_indices is None else list(category_indices)

    def one(ap: bool, iou: float | None = None, area: str = "all", max_dets: int = 100) -> float:
        values = coco_eval.eval["precision" if ap else "recall"]  # [T, R, K, A, M] / [T, K, A, M]
        if iou is not None:
            values = values[np.where(iou == params.iouThrs)[0]]
        values = values[..., cats, params.areaRngLbl.index(area), params.maxDets.index(max_dets)]
        valid = values[values > -1]
        return float(valid.mean()) if valid.size else -1.0

    if params.iouType == "keypoints":
        d = 20
        return [one(True, None, "all", d), one(True, 0.5, "all", d), one(True, 0.75, "all", d),
                one(True, None, "medium", d), one(True, None, "large", d), one(False, None, "all", d),
                one(False, 0.5, "all", d), one(False, 0.75, "all", d), one(False, None, "medium", d),
                one(False, None, "large", d)]
    d0, d1, d2 = params.maxDets
    return [one(True), one(True, 0.5, "all", d2), one(True, 0.75, "all", d2), one(True, None, "small", d2),
            one(True, None, "medium", d2), one(True, None, "large", d2), one(False, None, "all", d0),
            one(False, None, "all", d1), one(False, None, "all", d2), one(False, None, "small", d2),
            one(False, None, "medium", d2), one(False, None, "large", d2)]


def _results_as_coco(coco_gt: COCO, results: list[dict]) -> COCO:
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes(copy.deepcopy(results))
    # loadRes cannot take an empty list; an empty result set scores AP 0 against any ground truth.
    empty = COCO()
    empty.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                     "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        empty.createIndex()
    return empty


def coco_evaluate(
    coco_gt: COCO,
    results: list[dict],
    *,
    iou_types: Sequence[str] = ("bbox",),
    image_ids: Sequence[int] | None = None,
    class_groups: Mapping[str, Sequence[int]] | None = None,
) -> dict:
    """Score COCO results with COCOeval.

    class_groups: name -> original category ids; each group gets its own summary numbers,
        e.g. {"with_masks": [...], "novel": [...]} for the mask AP of seen vs unseen classes.
    Returns `{iou_type: {"AP": .., "AP50": .., ..., "per_class": {name: AP or None},
    "groups": {name: {...}}}}` with values on COCO's 0-1 scale (-1 where COCO has no data).
    """
    metrics: dict = {}
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"unknown iou type {iou_type!r}; expected one of {IOU_TYPES}")
        # Keep only the field this type scores: loadRes recomputes boxes from masks (or from
        # keypoints) when those are present, which would change the box AP.
        drop = {"bbox": ("segmentation", "keypoints"), "segm": ("keypoints",), "keypoints": ("segmentation",)}[iou_type]
        needed = {"bbox": "bbox", "segm": "segmentation", "keypoints": "keypoints"}[iou_type]
        typed = [{k: v for k, v in r.items() if k not in drop} for r in results if needed in r]
        coco_eval = COCOeval(coco_gt, _results_as_coco(coco_gt, typed), iou_type)
        category_ids = sorted(coco_gt.getCatIds())
        if iou_type == "keypoints":
            category_ids = [c for c in category_ids if coco_gt.cats[c].get("keypoints")]
            if not category_ids:
                raise ValueError("keypoint evaluation needs categories with a `keypoints` list")
            coco_eval.params.kpt_oks_sigmas = keypoint_sigmas(coco_gt, category_ids)
        coco_eval.params.catIds = category_ids
        if image_ids is not None:
            coco_eval.params.imgIds = sorted(int(i) for i in image_ids)
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        names = KEYPOINT_STAT_NAMES if iou_type == "keypoints" else DETECTION_STAT_NAMES
        entry: dict = dict(zip(names, (float(s) for s in coco_eval.stats)))
        entry["per_class"] = {}
        for index, cid in enumerate(category_ids):
            ap = _summary(coco_eval, [index])[0]
            entry["per_class"][coco_gt.cats[cid]["name"]] = None if ap < 0 else ap
        entry["groups"] = {}
        for group, members in (class_groups or {}).items():
            indices = [category_ids.index(c) for c in members if c in category_ids]
            if indices:
                entry["groups"][group] = dict(zip(names, _summary(coco_eval, indices)))
        metrics[iou_type] = entry
    return metrics


# --------------------------------------------------------------------------- the model
@torch.no_grad()
def run_inference(
    model: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    device: torch.device | str,
    category_ids: torch.Tensor,
    batch_size: int = 2,
    indices: Sequence[int] | None = None,
    num_workers: int = 0,
) -> tuple[list[dict], list[int], set[str]]:
    """Predict on `dataset[indices]` -> (COCO results, image ids seen, output keys seen).

    The output keys tell which heads the model has, even when it detects nothing (empty
    outputs still carry `masks [0, 1, H, W]` / `keypoints [0, K, 3]`).
    """
    indices = list(range(len(dataset))) if indices is None else list(indices)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_size=batch_size, shuffle=False,
        num_workers=num_workers, collate_fn=collate,
    )
    was_training = model.training
    model.eval()
    results: list[dict] = []
    image_ids: list[int] = []
    keys: set[str] = set()
    try:
        for images, targets in loader:
            outputs = model([image.to(device) for image in images])
            for target, output in zip(targets, outputs):
                if "image_id" not in target:
                    raise ValueError("evaluation needs target['image_id'] (the COCO image id) in every item")
                image_id = int(target["image_id"])
                image_ids.append(image_id)
                keys.update(output)
                results.extend(predictions_to_coco(output, image_id=image_id, category_ids=category_ids))
    finally:
        model.train(was_training)
    return results, image_ids, keys


def evaluate(
    model: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    device: torch.device | str,
    batch_size: int = 2,
    iou_types: Sequence[str] | None = None,
    class_groups: Mapping[str, Sequence[int]] | None = None,
    results_path: str | Path | None = None,
    indices: Sequence[int] | None = None,
    gather: Callable[[list], list | None] | None = None,
    num_workers: int = 0,
) -> dict:
    """Run `model` over `dataset` and score it with COCOeval.

    dataset: items `(image [3, H, W] 0-1, target)` with `target["image_id"]`; it provides
        `dataset.coco` (pycocotools COCO of its annotations) and `label_to_category_id`, which
        map labels to category ids unless the model has its own table (`model.label_space`).
    iou_types: None = every type the model predicts and the annotations support.
    class_groups: name -> labels (1..K, like `MaskHeadConfig.mask_classes`) to summarise apart.
    indices / gather (distributed): each rank predicts its own `indices`; `gather(list)` returns
        the concatenation over ranks on the main rank and None elsewhere, where this returns {}.
    results_path: where to write the COCO results JSON (main rank).
    """
    coco_gt: COCO = dataset.coco
    category_ids = category_id_table(dataset, coco_gt, getattr(model, "label_space", None))
    results, image_ids, keys = run_inference(
        model, dataset, device=device, category_ids=category_ids, batch_size=batch_size,
        indices=indices, num_workers=num_workers,
    )
    if gather is not None:
        gathered = gather([results, image_ids, sorted(keys)])
        if gathered is None:
            return {}
        results = [r for part in gathered for r in part[0]]
        image_ids = [i for part in gathered for i in part[1]]
        keys = {k for part in gathered for k in part[2]}
    if results_path is not None:
        Path(results_path).parent.mkdir(parents=True, exist_ok=True)
        Path(results_path).write_text(json.dumps(results))
    if iou_types is None:
        annotations = coco_gt.dataset.get("annotations", [])
        iou_types = ["bbox"]
        if "masks" in keys and any("segmentation" in a for a in annotations):
            iou_types.append("segm")
        if "keypoints" in keys and any(c.get("keypoints") for c in coco_gt.dataset["categories"]):
            iou_types.append("keypoints")
    groups = {name: [int(category_ids[label]) for label in labels] for name, labels in (class_groups or {}).items()}
    return coco_evaluate(coco_gt, results, iou_types=iou_types, image_ids=sorted(set(image_ids)), class_groups=groups)


# --------------------------------------------------------------------------- reporting
def flatten_metrics(metrics: Mapping[str, Mapping]) -> dict[str, float]:
    """`{"bbox/AP": 0.61, "segm/AP50": ..., "segm/novel/AP": ...}` for logs and TensorBoard."""
    flat: dict[str, float] = {}
    for iou_type, entry in metrics.items():
        for name, value in entry.items():
            if isinstance(value, float):
                flat[f"{iou_type}/{name}"] = value
        for group, stats in entry.get("groups", {}).items():
            for name, value in stats.items():
                flat[f"{iou_type}/{group}/{name}"] = value
    return flat


def format_table(metrics: Mapping[str, Mapping]) -> str:
    """A plain-text table in percent: one row per IoU type (and class group), then AP per class."""
    def cell(value: float | None) -> str:
        return f"{'-':>7s}" if value is None or value < 0 or math.isnan(value) else f"{100 * value:7.1f}"

    columns = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    rows = [(iou_type, entry) for iou_type, entry in metrics.items()]
    rows += [(f"{iou_type} {group}", stats) for iou_type, entry in metrics.items()
             for group, stats in entry.get("groups", {}).items()]
    width = max([len(name) for name, _ in rows] + [12]) + 1
    lines = [f"{'':{width}s}" + "".join(f"{c:>7s}" for c in columns)]
    lines += [f"{name:{width}s}" + "".join(cell(stats.get(c)) for c in columns) for name, stats in rows]
    classes = list(next(iter(metrics.values()), {}).get("per_class", {}))
    if classes:
        width = max([len(name) for name in classes] + [12]) + 1
        lines += ["", f"{'AP per class':{width}s}" + "".join(f"{t:>10s}" for t in metrics)]
        for name in classes:
            lines.append(f"{name:{width}s}" + "".join(f"{cell(metrics[t]['per_class'].get(name)):>10s}" for t in metrics))
    return "\n".join(lines)
