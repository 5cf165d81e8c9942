"""Shared by the experiment scripts: one small CPU recipe, train-then-evaluate, table printing.

Every run trains a fresh model with `maskrcnn.engine.trainer.train` from the same config plus
the run's own overrides, then evaluates it on the `shapes` validation set with the same class
groups (so that the fully supervised ceiling also reports AP on the "novel" classes).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from maskrcnn.config import Config, load_config
from maskrcnn.data.shapes import SHAPE_NAMES

# On top of the shapes_demo recipe (the demo's recipe, tuned to learn `shapes` quickly on a
# CPU, and its data: data/shapes, 800 training and 200 validation images at 192 px). The keypoint
# head stays on: without its supervision the shared backbone learns far less in 600 iterations
# (box AP ~0.09 instead of ~0.22, experiments/README.md); pass model.keypoint_head.enabled=false
# to see that.
BASE_OVERRIDES = [
    "data.num_workers=0",
    "train.eval_every=0",
    "train.checkpoint_every=100000",
    "train.log_every=50",
]


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="shapes_demo", help="base recipe (a YAML path or a shipped recipe's name)")
    parser.add_argument("--iterations", type=int, default=None, help="training iterations per run (default: the recipe's)")
    parser.add_argument("--out", type=Path, required=True, help="folder for runs and the results JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 lets two runs share a 2-core machine)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these variants (names as in the table)")
    parser.add_argument("--reevaluate", action="store_true", help="evaluate finished runs again from their last.pth")
    parser.add_argument("overrides", nargs="*", default=[], help="extra key.sub=value config overrides for every run")


def check_only(args: argparse.Namespace, names: list[str]) -> None:
    """`--only` takes run names; anything else (a `key=value` override typed after it, which
    argparse hands to `--only`) is an error instead of being silently ignored."""
    unknown = [name for name in args.only or [] if name not in names]
    if unknown:
        hint = " (put key.sub=value overrides before --only)" if any("=" in name for name in unknown) else ""
        raise SystemExit(f"--only: unknown run name(s) {unknown}{hint}; the runs are {names}")


def make_config(args: argparse.Namespace, run_name: str, overrides: list[str]) -> Config:
    base = args.config or None
    extra = [f"train.output_dir={args.out / run_name}"]
    if args.iterations is not None:
        extra.append(f"train.iterations={args.iterations}")
    return load_config(base, BASE_OVERRIDES + list(args.overrides) + overrides + extra)


def shapes_paths(config: Config) -> dict[str, Path]:
    from maskrcnn.data.shapes import ensure_shapes

    data = config.data
    return ensure_shapes(
        data.root, num_train=data.shapes_train_images, num_val=data.shapes_val_images,
        image_size=data.shapes_image_size, seed=data.shapes_seed,
    )  # fmt: skip


def train_and_evaluate(config: Config, class_groups: dict[str, list[int]] | None) -> dict:
    """Train one run, evaluate it on the shapes validation set; returns flat metrics + timing."""
    from maskrcnn.engine.distributed import DistributedContext
    from maskrcnn.engine.trainer import build_datasets, train

    train_set, val_set = build_datasets(config, DistributedContext())
    started = time.perf_counter()
    # No validation set inside `train`: it is evaluated once below, with the class groups.
    summary = train(config, train_dataset=train_set, val_dataset=None)
    train_seconds = time.perf_counter() - started
    flat = evaluate_model(summary["model"], val_set, class_groups)
    flat["train_seconds"] = train_seconds
    flat["iterations"] = summary["iteration"]
    return flat


def evaluate_model(model: torch.nn.Module, val_set, class_groups: dict[str, list[int]] | None) -> dict:
    """COCO box / mask AP of the whole model, plus the mask head alone on ground-truth boxes."""
    from maskrcnn.engine.evaluation import evaluate, flatten_metrics

    device = next(model.parameters()).device
    metrics = evaluate(model, val_set, device=device, batch_size=4, iou_types=["bbox", "segm"], class_groups=class_groups)
    flat = flatten_metrics(metrics)
    flat.update(mask_iou_on_gt_boxes(model, val_set, class_groups))
    return flat


@torch.no_grad()
def mask_iou_on_gt_boxes(model: torch.nn.Module, dataset, class_groups: dict[str, list[int]] | None) -> dict:
    """Mean mask IoU of the mask head run on the ground-truth boxes and labels ("no detector at
    all", as Birodkar et al. also report): what the mask head knows, whatever the detector does.
    Returns {"gt_boxes/mIoU": .., "gt_boxes/<group>/mIoU": ..}."""
    from pycocotools import mask as mask_utils

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ious, labels = [], []
    for start in range(0, len(dataset), 4):
        items = [dataset[i] for i in range(start, min(start + 4, len(dataset)))]
        items = [(image, target) for image, target in items if len(target["boxes"])]
        if not items:
            continue
        images = [image.to(device) for image, _ in items]
        detections = model.segment_boxes(images, [t["boxes"].to(device) for _, t in items],
                                         [t["labels"].to(device) for _, t in items])  # fmt: skip
        for (_, target), detection in zip(items, detections):
            predicted = (detection["masks"][:, 0] >= 0.5).to(torch.uint8).cpu().numpy()  # [N, H, W]
            masks = target["masks"]
            truth = (masks if isinstance(masks, torch.Tensor) else masks.to_tensor()).to(torch.uint8).numpy()
            encode = lambda m: mask_utils.encode(m.transpose(1, 2, 0).copy(order="F"))  # noqa: E731
            pairwise = mask_utils.iou(encode(predicted), encode(truth), [0] * len(truth))  # [N, N]
            ious += list(pairwise.diagonal())
            labels += target["labels"].tolist()
    model.train(was_training)
    ious_t, labels_t = torch.tensor(ious, dtype=torch.float64), torch.tensor(labels)
    result = {"gt_boxes/mIoU": ious_t.mean().item()}
    for group, members in (class_groups or {}).items():
        chosen = torch.isin(labels_t, torch.tensor(members))
        result[f"gt_boxes/{group}/mIoU"] = ious_t[chosen].mean().item()
    return result


def filled_box_miou(coco, class_groups: dict[str, list[int]] | None, label_to_category: dict[int, int]) -> dict:
    """The reference a mask head must beat: the mean IoU of each ground-truth box, filled, with
    its object's mask (pycocotools rasterises both), in the same keys as `mask_iou_on_gt_boxes`."""
    from pycocotools import mask as mask_utils

    ious, categories = [], []
    for annotation in coco.dataset["annotations"]:
        if annotation.get("iscrowd", 0):
            continue
        image = coco.imgs[annotation["image_id"]]
        box = mask_utils.frPyObjects(np.array([annotation["bbox"]], dtype=np.float64), image["height"], image["width"])
        ious.append(float(mask_utils.iou(box, [coco.annToRLE(annotation)], [0])[0, 0]))
        categories.append(annotation["category_id"])
    ious_t, categories_t = torch.tensor(ious, dtype=torch.float64), torch.tensor(categories)
    result = {"gt_boxes/mIoU": ious_t.mean().item()}
    for group, members in (class_groups or {}).items():
        chosen = torch.isin(categories_t, torch.tensor([label_to_category[m] for m in members]))
        result[f"gt_boxes/{group}/mIoU"] = ious_t[chosen].mean().item()
    return result


def filled_box_reference(args: argparse.Namespace, class_groups: dict[str, list[int]] | None) -> dict:
    """`filled_box_miou` on the experiments' validation set."""
    from maskrcnn.data.coco import CocoDataset

    paths = shapes_paths(make_config(args, "unused", []))
    val = CocoDataset(paths["val_annotations"], paths["val_images"])
    return filled_box_miou(val.coco, class_groups, dict(val.label_to_category_id))


def reevaluate(run_dir: Path, previous: dict, class_groups: dict[str, list[int]] | None) -> dict:
    """Evaluate a finished run again from its last checkpoint (keeps its timing)."""
    import maskrcnn
    from maskrcnn.config import config_from_dict
    from maskrcnn.engine.distributed import DistributedContext
    from maskrcnn.engine.trainer import build_datasets

    config = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    _, val_set = build_datasets(config, DistributedContext())
    model = maskrcnn.load_checkpoint(run_dir / "last.pth")
    flat = evaluate_model(model, val_set, class_groups)
    return {**previous, **flat}


def class_names(labels: list[int]) -> str:
    return ", ".join(SHAPE_NAMES[label - 1] for label in labels)


def print_table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def percent(value: float | None) -> str:
    return "-" if value is None or value < 0 else f"{100 * value:.1f}"


def save_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))


def set_threads(count: int) -> None:
    torch.set_num_threads(count)
