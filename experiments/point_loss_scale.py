"""How large the point loss is, and what it sends into the shared backbone, next to the full-mask
loss on the same batches (the question of why point-supervised runs end with lower box AP).

A model of the demo's recipe is trained briefly on full masks (`--warm-iterations`, also 0 =
at initialisation), then, on `--batches` training batches that carry both the masks and the 10
simulated points of each object (no flip, the same RoIs for every loss: the sampler's seed is
reset), it measures each loss term and the norm of its gradient on the parameters that every
head shares (ResNet body + FPN), the cosine between the point loss's and the mask loss's
gradients there, and how many of each RoI's labelled points lie inside it. Nothing here trains
a table row; it takes a minute or two on one core:

    .venv/bin/python experiments/point_loss_scale.py --out runs/experiments/point_loss_scale
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import _common
import torch
from _common import Run

from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.points import simulate_points
from maskrcnn.model.point_supervision import point_coords_in_roi

DETECTOR_LOSSES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")


def both_kinds(args: argparse.Namespace, config) -> tuple[CocoDataset, CocoDataset]:
    """The training set twice, unflipped: with masks, and with the simulated points."""
    paths = _common.shapes_paths(config)
    points = args.out / "train_points10.json"
    if not points.is_file():
        _common.write_json(points, simulate_points(json.loads(paths["train_annotations"].read_text()), num_points=10))
    masks = CocoDataset(paths["train_annotations"], paths["train_images"], horizontal_flip=0.0)
    return masks, CocoDataset(points, paths["train_images"], horizontal_flip=0.0)


def batch(masks: CocoDataset, points: CocoDataset, indices: list[int]) -> tuple[list, list]:
    images, targets = [], []
    for index in indices:
        image, with_masks = masks[index]
        _, with_points = points[index]
        targets.append({**with_masks, "point_coords": with_points["point_coords"],
                        "point_labels": with_points["point_labels"]})
        images.append(image)
    return images, targets


def losses_on(model, images: list, targets: list, *, seed: int) -> dict[str, torch.Tensor]:
    """Every loss term, plus loss_mask three ways (masks; points averaged over the points in the
    RoI; over all labelled points), all on the same features and the same sampled RoIs."""
    heads = model.roi_heads
    batch_, targets = model.transform(images, targets)
    features = model.backbone(batch_.tensors)
    torch.manual_seed(seed)
    proposals, losses = model.rpn(batch_, features, targets)
    for name, points, average in (("mask", False, "valid_points"), ("points", True, "valid_points"),
                                  ("points_all", True, "all_points")):
        heads.point_supervision, heads.point_loss_average = points, average
        torch.manual_seed(seed)
        _, head_losses = heads(features, proposals, batch_.image_sizes, targets)
        losses[f"loss_{name}"] = head_losses.pop("loss_mask")
        losses.update(head_losses)
    heads.point_supervision = False
    losses["points_inside"] = inside_share(heads, proposals, targets, batch_.image_sizes, seed=seed)
    return losses


@torch.no_grad()
def inside_share(heads, proposals: list, targets: list, image_sizes: list, *, seed: int) -> torch.Tensor:
    """The share of the mask RoIs' labelled points that lie inside the RoI."""
    torch.manual_seed(seed)
    samples = heads.sample_proposals(proposals, targets)
    boxes, matched, _ = heads._mask_training_rois(samples, targets, image_sizes)
    inside, labelled = 0, 0
    for target, roi_boxes, instance in zip(targets, boxes, matched):
        _, in_roi = point_coords_in_roi(roi_boxes, target["point_coords"][instance])
        known = target["point_labels"][instance] >= 0
        inside, labelled = inside + int((in_roi & known).sum()), labelled + int(known.sum())
    return torch.tensor(inside / max(labelled, 1))


def gradient(loss: torch.Tensor, parameters: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, parameters)])


def measure(model, masks: CocoDataset, points: CocoDataset, *, batches: int, batch_size: int) -> list[dict]:
    shared = [p for p in model.backbone.parameters() if p.requires_grad]
    rows = []
    for b in range(batches):
        images, targets = batch(masks, points, list(range(b * batch_size, (b + 1) * batch_size)))
        losses = losses_on(model, images, targets, seed=b)
        grads = {name: gradient(losses[f"loss_{name}"], shared) for name in ("mask", "points", "points_all")}
        grads["detector"] = gradient(sum(losses[k] for k in DETECTOR_LOSSES), shared)
        grads["keypoint"] = gradient(losses["loss_keypoint"], shared)
        row = {name: float(losses[f"loss_{name}"].detach()) for name in ("mask", "points", "points_all")}
        row.update({f"grad/{name}": float(g.norm()) for name, g in grads.items()})
        for first, second in (("points", "mask"), ("points_all", "mask"), ("mask", "detector"), ("points", "detector"),
                              ("points_all", "detector")):
            cosine = torch.nn.functional.cosine_similarity(grads[first], grads[second], dim=0)
            row[f"cos({first}, {second})"] = float(cosine)
        row["points inside RoI"] = float(losses["points_inside"])
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="shapes_demo", help="base recipe (a YAML path or a shipped recipe's name)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the short runs and point_loss_scale.json")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("overrides", nargs="*", default=[], help="extra key.sub=value config overrides")
    parser.add_argument("--warm-iterations", type=int, nargs="+", default=[0, 60],
                        help="measure after this many full-mask iterations (each from scratch)")
    parser.add_argument("--batches", type=int, default=6)
    args = _common.parse_arguments(parser, argv, script="point_loss_scale")
    from maskrcnn.engine.trainer import build_model_from_config, seed_everything, train

    report = {}
    for warm in args.warm_iterations:
        args.iterations = max(warm, 1)
        config = _common.make_config(args, Run(f"warm{warm}", f"warm{warm}", [f"train.warmup_iterations={warm // 4}"]), 0)
        masks, points = both_kinds(args, config)
        seed_everything(config.train.seed)  # the initial weights of a training run with this seed
        model = train(config).model if warm else build_model_from_config(config)
        model.train()
        rows = measure(model, masks, points, batches=args.batches, batch_size=config.train.batch_size)
        report[str(warm)] = {key: statistics.fmean(r[key] for r in rows) for key in rows[0]}
        print(f"after {warm} full-mask iterations, mean of {args.batches} batches:", flush=True)
        for key, value in report[str(warm)].items():
            print(f"  {key:26s} {value:.4f}", flush=True)
    _common.write_json(args.out / "point_loss_scale.json", {"command": args.command, "means": report})


if __name__ == "__main__":
    main()
