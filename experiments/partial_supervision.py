"""Partial supervision in miniature (Birodkar et al. 2021, Table 1's question on `shapes`).

Boxes for all six shape classes, masks for half of them only; mask AP on the other half (the
"novel" classes, never seen with a mask). Mask prediction is class-agnostic in every run (a
class-specific channel of a novel class would never be trained). Runs:

    proposals + fcn      Mask R-CNN's default: the mask head trains on positive proposals
    gt_boxes + fcn       the mask head trains on the ground-truth boxes only
    gt_boxes + resnet    ... with a stack of residual blocks
    gt_boxes + hourglass ... with an hourglass (encoder-decoder with skips)
    full masks (ceiling) masks for every class, standard training

    .venv/bin/python experiments/partial_supervision.py --out runs/experiments/partial [--iterations N]

Results are written after each run to OUT/results.json; a rerun skips finished runs.
"""

from __future__ import annotations

import argparse
import json

from _common import (
    add_common_arguments,
    check_only,
    class_names,
    filled_box_reference,
    make_config,
    percent,
    print_table,
    reevaluate,
    save_results,
    set_threads,
    train_and_evaluate,
)


def run_dir_name(name: str) -> str:
    return name.replace(" ", "").replace("+", "_").replace("(", "_").replace(")", "")


def variants(mask_classes: list[int], resnet_blocks: int, hourglass_levels: int) -> dict[str, list[str]]:
    partial = [f"model.mask_head.mask_classes={mask_classes}", "model.mask_head.class_agnostic=true"]
    return {
        "proposals + fcn": partial + ["model.mask_head.train_on=proposals", "model.mask_head.architecture=fcn"],
        "gt_boxes + fcn": partial + ["model.mask_head.train_on=gt_boxes", "model.mask_head.architecture=fcn"],
        "gt_boxes + resnet": partial + [
            "model.mask_head.train_on=gt_boxes", "model.mask_head.architecture=resnet",
            f"model.mask_head.num_convs={resnet_blocks}",
        ],
        "gt_boxes + hourglass": partial + [
            "model.mask_head.train_on=gt_boxes", "model.mask_head.architecture=hourglass",
            f"model.mask_head.num_convs={hourglass_levels}",
        ],
        "full masks (ceiling)": ["model.mask_head.mask_classes=null", "model.mask_head.class_agnostic=true"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--mask-classes", default="1,3,5", help="labels trained with masks (default: circle, triangle, hexagon)")
    parser.add_argument("--resnet-blocks", type=int, default=8)
    parser.add_argument("--hourglass-levels", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)

    mask_classes = [int(v) for v in args.mask_classes.split(",")]
    novel = [label for label in range(1, 7) if label not in mask_classes]
    groups = {"with_masks": mask_classes, "novel": novel}
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}

    runs = variants(mask_classes, args.resnet_blocks, args.hourglass_levels)
    check_only(args, list(runs))
    for name, overrides in runs.items():
        if args.only and name not in args.only:
            continue
        if name in results:
            if args.reevaluate or "gt_boxes/mIoU" not in results[name]:
                results[name] = reevaluate(args.out / run_dir_name(name), results[name], groups)
                save_results(results_path, results)
            print(f"{name}: done before, kept", flush=True)
            continue
        config = make_config(args, run_dir_name(name), overrides)
        print(f"=== {name}: {' '.join(overrides)}", flush=True)
        results[name] = train_and_evaluate(config, groups)
        save_results(results_path, results)

    rows = [
        [
            name,
            percent(m.get("gt_boxes/novel/mIoU")),
            percent(m.get("gt_boxes/with_masks/mIoU")),
            percent(m.get("segm/novel/AP")),
            percent(m.get("segm/with_masks/AP")),
            percent(m.get("bbox/AP")),
            f"{m['iterations']}",
            f"{m['train_seconds'] / 60:.1f}",
        ]
        for name, m in results.items()
    ]
    box = filled_box_reference(args, groups)
    rows.append(["filled GT box (reference)", percent(box["gt_boxes/novel/mIoU"]),
                 percent(box["gt_boxes/with_masks/mIoU"]), "-", "-", "-", "-", "-"])  # fmt: skip
    table = print_table(
        f"Partial supervision on shapes: masks for {class_names(mask_classes)}; novel: {class_names(novel)}",
        ["run", "GT-box mIoU novel", "GT-box mIoU with masks", "mask AP novel", "mask AP with masks", "box AP",
         "iters", "train min"],
        rows,
    )
    (args.out / "table.txt").write_text(table + "\n")


if __name__ == "__main__":
    main()
