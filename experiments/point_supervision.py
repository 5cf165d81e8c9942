"""Point supervision in miniature (Cheng, Parkhi, Kirillov 2021, on `shapes`).

The same model and schedule trained twice: once with full masks, once with a box and 10
simulated points per object (`maskrcnn points`, no masks in the training file); mask AP of
the second as a percentage of the first (the paper reports 94-98 % on COCO, VOC, Cityscapes
and LVIS).

    .venv/bin/python experiments/point_supervision.py --out runs/experiments/points [--iterations N]

Results are written after each run to OUT/results.json; a rerun skips finished runs.
"""

from __future__ import annotations

import argparse
import json

from _common import (
    add_common_arguments,
    check_only,
    filled_box_reference,
    make_config,
    percent,
    print_table,
    reevaluate,
    save_results,
    set_threads,
    shapes_paths,
    train_and_evaluate,
)

from maskrcnn.data.points import simulate_points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--num-points", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated points")
    args = parser.parse_args()
    set_threads(args.threads)

    paths = shapes_paths(make_config(args, "unused", []))
    points_file = args.out / f"train_points{args.num_points}.json"
    if not points_file.is_file():
        coco = json.loads(paths["train_annotations"].read_text())
        points_file.parent.mkdir(parents=True, exist_ok=True)
        points_file.write_text(json.dumps(simulate_points(coco, num_points=args.num_points, seed=args.seed)))

    # Both runs read the files as a plain COCO data set, so that only the annotations differ.
    files = [
        "data.name=coco",
        f"data.train.images={paths['train_images']}",
        f"data.val.annotations={paths['val_annotations']}",
        f"data.val.images={paths['val_images']}",
    ]
    runs = {
        "full masks": files + [f"data.train.annotations={paths['train_annotations']}"],
        f"{args.num_points} points": files + [
            f"data.train.annotations={points_file}", "model.mask_head.point_supervision=true",
        ],
    }
    check_only(args, list(runs))
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for name, overrides in runs.items():
        if args.only and name not in args.only:
            continue
        if name in results:
            if args.reevaluate or "gt_boxes/mIoU" not in results[name]:
                results[name] = reevaluate(args.out / name.replace(" ", "_"), results[name], None)
                save_results(results_path, results)
            print(f"{name}: done before, kept", flush=True)
            continue
        config = make_config(args, name.replace(" ", "_"), overrides)
        print(f"=== {name}: {' '.join(overrides)}", flush=True)
        results[name] = train_and_evaluate(config, None)
        save_results(results_path, results)

    def ratio(metrics: dict, key: str) -> str:
        full, value = results.get("full masks", {}).get(key), metrics.get(key)
        return f"{100 * value / full:.0f} %" if full and value is not None and full > 0 else "-"

    rows = [
        [name, percent(m.get("gt_boxes/mIoU")), ratio(m, "gt_boxes/mIoU"), percent(m.get("segm/AP")),
         ratio(m, "segm/AP"), percent(m.get("bbox/AP")), f"{m['iterations']}", f"{m['train_seconds'] / 60:.1f}"]
        for name, m in results.items()
    ]  # fmt: skip
    box = filled_box_reference(args, None)
    rows.append(["filled GT box (reference)", percent(box["gt_boxes/mIoU"]), "-", "-", "-", "-", "-", "-"])
    table = print_table(
        f"Point supervision on shapes: {args.num_points} points per object against full masks",
        ["run", "GT-box mIoU", "of full masks", "mask AP", "of full masks", "box AP", "iters", "train min"],
        rows,
    )
    (args.out / "table.txt").write_text(table + "\n")


if __name__ == "__main__":
    main()
