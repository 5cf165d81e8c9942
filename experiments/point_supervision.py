"""Point supervision in miniature (Cheng, Parkhi, Kirillov 2021, on `shapes`).

The same model and schedule trained with full masks, and with a box and 10 simulated points per
object (`maskrcnn points`, no masks in the training file); mask AP of the point runs as a
percentage of the full-mask run of the same seed (the paper reports 94-98 % on COCO, VOC,
Cityscapes and LVIS). Rows:

    full masks                   the training file with masks
    10 points                    the point loss averaged over the labelled points in each RoI
    10 points, PointSup's loss   the paper's code (detectron2 PointSup): the point loss averaged
                                 over every point slot of every RoI (points outside a RoI count as
                                 zero), and 5 of the 10 points drawn anew each iteration
    10 points, loss weight 0.5   the first with the point loss halved (model.mask_head.loss_weight)
    10 points, loss weight 0.25  ... quartered
    10 points, feature gradient 0.25
                                 the first with a quarter of the point loss's gradient passed on to
                                 the shared backbone (model.mask_head.feature_gradient); the mask
                                 head itself learns from all of it
    10 points, detached features the mask head trained on detached features (feature_gradient=0)
    10 points, outside-box negatives
                                 the first plus the BCE towards 0 of the RoI's mask cells outside its
                                 instance's box (model.mask_head.outside_box_weight=1): the points lie
                                 inside the box, so nothing else tells the head where a larger RoI's
                                 object ends
    10 points, outside-box negatives, detached features
                                 the same on detached features
    no mask loss                 no mask head at all (boxes and keypoints only): what the detector
                                 reaches without the masks' supervision of the shared backbone, to
                                 read the point runs' box AP against

Each row runs once per seed (--seeds, default 0 1 2) on the demo's recipe stretched to
--iterations; the table gives mean ± sd and the per-seed values:

    .venv/bin/python experiments/point_supervision.py --out runs/experiments/points \\
        --readme experiments/README.md

A rerun reads the finished runs back (OUT/<row>/seed<S>/result.json) instead of training them
again; --table-only prints (and with --readme writes) the table of what is done.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _common
from _common import Run
from _tables import Column, mean_and_sd, results_table

from maskrcnn.data.points import simulate_points

EXPERIMENT = "point_supervision"
FULL = "full masks"
NO_MASKS = "no mask loss"
COLUMNS = [
    Column("GT-box mIoU", "gt_boxes/mIoU"),
    Column("GT-box mIoU of full masks", "gt_boxes/mIoU of full masks"),
    Column("mask AP", "segm/AP"),
    Column("mask AP of full masks", "segm/AP of full masks"),
    Column("box AP", "bbox/AP"),
    Column("train min", "train_minutes", percent=False),
]


def points_file(args: argparse.Namespace, paths: dict[str, Path]) -> Path:
    """The simulated point annotations of the training set (made once per --points-seed)."""
    path = args.out / f"train_points{args.num_points}_seed{args.points_seed}.json"
    if not path.is_file():
        coco = json.loads(paths["train_annotations"].read_text())
        _common.write_json(path, simulate_points(coco, num_points=args.num_points, seed=args.points_seed))
    return path


def rows(args: argparse.Namespace, paths: dict[str, Path]) -> list[Run]:
    # Every run reads the files as a plain COCO data set, so that only the annotations differ.
    files = [
        "data.name=coco",
        f"data.train.images={paths['train_images']}",
        f"data.val.annotations={paths['val_annotations']}",
        f"data.val.images={paths['val_images']}",
    ]
    points = files + [f"data.train.annotations={points_file(args, paths)}", "model.mask_head.point_supervision=true"]
    named = {
        FULL: files + [f"data.train.annotations={paths['train_annotations']}"],
        f"{args.num_points} points": points,
        f"{args.num_points} points, PointSup's loss": points + [
            "model.mask_head.point_loss_average=all_points", "model.mask_head.points_per_instance=5",
        ],
        f"{args.num_points} points, loss weight 0.5": points + ["model.mask_head.loss_weight=0.5"],
        f"{args.num_points} points, loss weight 0.25": points + ["model.mask_head.loss_weight=0.25"],
        f"{args.num_points} points, feature gradient 0.25": points + ["model.mask_head.feature_gradient=0.25"],
        f"{args.num_points} points, detached features": points + ["model.mask_head.feature_gradient=0"],
        f"{args.num_points} points, outside-box negatives": points + ["model.mask_head.outside_box_weight=1"],
        f"{args.num_points} points, outside-box negatives, detached features": points + [
            "model.mask_head.outside_box_weight=1", "model.mask_head.feature_gradient=0",
        ],
        NO_MASKS: files + [f"data.train.annotations={paths['train_annotations']}", "model.mask_head.enabled=false"],
    }
    return [Run(name, name.replace(",", "").replace("'", "").replace(" ", "_"), values) for name, values in named.items()]


def add_ratios(results: dict[str, dict[int, dict]]) -> None:
    """`<metric> of full masks`: each point run's metric over the full-mask run's of the same seed."""
    for by_seed in results.values():
        for seed, metrics in by_seed.items():
            full = results.get(FULL, {}).get(seed)
            for key in ("gt_boxes/mIoU", "segm/AP"):
                if full and full.get(key, 0) > 0 and metrics.get(key, -1) >= 0:
                    metrics[f"{key} of full masks"] = metrics[key] / full[key]


def verdict(results: dict[str, dict[int, dict]], runs: list[Run]) -> str:
    """The issue's target: >= 94 % of the full-mask mask AP, as the mean over seeds."""
    lines = []
    for run in runs[1:]:
        ratios = [m["segm/AP of full masks"] for m in results[run.name].values() if "segm/AP of full masks" in m]
        if ratios:
            mean, _ = mean_and_sd(ratios)
            answer = "yes" if mean >= 0.94 else "no"
            lines.append(f"{run.name}: {100 * mean:.0f} % of the full-mask mask AP (mean over {len(ratios)} seed(s)); "
                         f">= 94 %: **{answer}**.")
    return "Target (>= 94 % of the full-mask mask AP): " + (" ".join(lines) or "no paired runs yet.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_arguments(parser)
    parser.add_argument("--num-points", type=int, default=10)
    parser.add_argument("--points-seed", type=int, default=0, help="seed of the simulated points (one set for all runs)")
    args = _common.parse_arguments(parser, argv, script=EXPERIMENT)

    paths = _common.shapes_paths(_common.make_config(args, Run("data", "data", []), 0))
    runs = rows(args, paths)
    _common.run_all(args, runs, None)

    results = _common.collect_results(args, runs)
    add_ratios(results)
    reference = _common.filled_box_reference(args, None)
    filled = ["filled GT box (reference)", "-", f"{100 * reference['gt_boxes/mIoU']:.1f}"] + ["-"] * (len(COLUMNS) - 1)
    text = "\n\n".join([
        f"Point supervision on shapes: {args.num_points} points per object against full masks "
        f"(the ratios pair runs of the same seed). " + _common.budget_line(results, args),
        results_table(results, COLUMNS, seeds=args.seeds, extra_rows=[filled]),
        verdict(results, runs),
    ])
    _common.write_outputs(args, _common.summary_json(args, results, reference, experiment=EXPERIMENT), text,
                          experiment=EXPERIMENT)


if __name__ == "__main__":
    main()
