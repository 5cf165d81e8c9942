"""Partial supervision in miniature (Birodkar et al. 2021, Table 1's question on `shapes`).

Boxes for all six shape classes, masks for half of them only; mask AP on the other half (the
"novel" classes, never seen with a mask). Mask prediction is class-agnostic in every run (a
class-specific channel of a novel class would never be trained). Rows:

    proposals + fcn      Mask R-CNN's default: the mask head trains on positive proposals
    gt_boxes + fcn       the mask head trains on the ground-truth boxes only
    gt_boxes + resnet    ... with a stack of residual blocks
    gt_boxes + hourglass ... with an hourglass (encoder-decoder with skips)
    gt_boxes x8 jittered + hourglass
                         ... each GT box 8 times, every copy's sides moved by up to 10 % of its
                         size (as many views of an object per step as the positive proposals give,
                         and boxes as loose as the detector's)
    full masks (ceiling) masks for every class, standard training

Each row runs once per seed (--seeds, default 0 1 2) on the demo's recipe stretched to
--iterations; the table gives mean ± sd and the per-seed values:

    .venv/bin/python experiments/partial_supervision.py --out runs/experiments/partial \\
        --readme experiments/README.md

A rerun reads the finished runs back (OUT/<row>/seed<S>/result.json) instead of training them
again; --table-only prints (and with --readme writes) the table of what is done.
"""

from __future__ import annotations

import argparse

import _common
from _common import Run
from _tables import Column, mean_and_sd, results_table

EXPERIMENT = "partial_supervision"
STRONG_HEADS = ("gt_boxes + resnet", "gt_boxes + hourglass", "gt_boxes x8 jittered + hourglass")
COLUMNS = [
    Column("GT-box mIoU novel", "gt_boxes/novel/mIoU"),
    Column("GT-box mIoU with masks", "gt_boxes/with_masks/mIoU"),
    Column("mask AP novel", "segm/novel/AP"),
    Column("mask AP with masks", "segm/with_masks/AP"),
    Column("box AP", "bbox/AP"),
    Column("train min", "train_minutes", percent=False),
]


def folder_name(name: str) -> str:
    return name.replace(" ", "").replace("+", "_").replace("(", "_").replace(")", "")


def rows(mask_classes: list[int], resnet_blocks: int, hourglass_levels: int) -> list[Run]:
    partial = [f"model.mask_head.mask_classes={mask_classes}", "model.mask_head.class_agnostic=true"]
    on_gt = partial + ["model.mask_head.train_on=gt_boxes"]
    overrides = {
        "proposals + fcn": partial + ["model.mask_head.train_on=proposals", "model.mask_head.architecture=fcn"],
        "gt_boxes + fcn": on_gt + ["model.mask_head.architecture=fcn"],
        "gt_boxes + resnet": on_gt + [
            "model.mask_head.architecture=resnet", f"model.mask_head.num_convs={resnet_blocks}",
        ],
        "gt_boxes + hourglass": on_gt + [
            "model.mask_head.architecture=hourglass", f"model.mask_head.num_convs={hourglass_levels}",
        ],
        "gt_boxes x8 jittered + hourglass": on_gt + [
            "model.mask_head.architecture=hourglass", f"model.mask_head.num_convs={hourglass_levels}",
            "model.mask_head.gt_box_jitter=0.1", "model.mask_head.gt_box_copies=8",
        ],
        "full masks (ceiling)": ["model.mask_head.mask_classes=null", "model.mask_head.class_agnostic=true"],
    }
    return [Run(name, folder_name(name), values) for name, values in overrides.items()]


def verdict(results: dict[str, dict[int, dict]]) -> str:
    """The issue's target: novel-class mask AP of the strongest GT-box row against proposals +
    fcn, and whether the gap is larger than either row's spread over the seeds."""
    def values(name: str) -> list[float]:
        return [m["segm/novel/AP"] for m in results.get(name, {}).values() if m.get("segm/novel/AP", -1) >= 0]

    strong = [name for name in STRONG_HEADS if len(values(name)) > 1]
    if len(values("proposals + fcn")) < 2 or not strong:
        return "Target (novel-class mask AP, gap larger than the seeds' spread): needs two seeds or more of the rows."
    best = max(strong, key=lambda name: mean_and_sd(values(name))[0])
    (base_mean, base_sd), (best_mean, best_sd) = mean_and_sd(values("proposals + fcn")), mean_and_sd(values(best))
    gap, spread = best_mean - base_mean, max(base_sd, best_sd)
    answer = "yes" if gap > spread else "no"
    return (f"Target: novel-class mask AP of {best} (the stronger GT-box head) minus proposals + fcn = "
            f"{100 * gap:.1f} points; the larger sd of the two rows = {100 * spread:.1f}: gap larger than the spread: "
            f"**{answer}**.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_arguments(parser)
    parser.add_argument("--mask-classes", default="1,3,5",
                        help="labels trained with masks (default: circle, triangle, hexagon)")
    parser.add_argument("--resnet-blocks", type=int, default=8)
    parser.add_argument("--hourglass-levels", type=int, default=2,
                        help="levels of the hourglass head (28 -> 14 -> 7 with 2)")
    args = _common.parse_arguments(parser, argv, script=EXPERIMENT)

    mask_classes = [int(v) for v in args.mask_classes.split(",")]
    novel = [label for label in range(1, 7) if label not in mask_classes]
    groups = {"with_masks": mask_classes, "novel": novel}
    runs = rows(mask_classes, args.resnet_blocks, args.hourglass_levels)
    _common.run_all(args, runs, groups)

    results = _common.collect_results(args, runs)
    reference = _common.filled_box_reference(args, groups)
    filled = ["filled GT box (reference)", "-", f"{100 * reference['gt_boxes/novel/mIoU']:.1f}",
              f"{100 * reference['gt_boxes/with_masks/mIoU']:.1f}"] + ["-"] * (len(COLUMNS) - 2)
    text = "\n\n".join([
        f"Partial supervision on shapes: masks for {_common.class_names(mask_classes)}; "
        f"novel: {_common.class_names(novel)}. "
        + _common.budget_line(results, args),
        results_table(results, COLUMNS, seeds=args.seeds, extra_rows=[filled]),
        verdict(results),
    ])
    _common.write_outputs(args, _common.summary_json(args, results, reference, experiment=EXPERIMENT), text,
                          experiment=EXPERIMENT)


if __name__ == "__main__":
    main()
