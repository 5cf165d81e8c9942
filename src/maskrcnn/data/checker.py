"""`maskrcnn check-data ANNOTATIONS --images DIR`: summary and every problem of a COCO file.

The checks are CocoDataset's own (data/coco.py), so what the checker reports is exactly what
training would repair or skip. Exit codes: 0 clean (warnings allowed unless --strict),
1 problems that skip data (errors), 2 the file cannot be used at all.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import TextIO

from maskrcnn.data.coco import CocoDataset, CocoFormatError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("annotations", help="COCO instances or person-keypoints JSON file")
    parser.add_argument("--images", default=None,
                        help="image folder that file_name is relative to (without it, image files are not checked)")
    parser.add_argument("--check-images", choices=("header", "full", "exists", "none"), default="header",
                        help="header: open each image's header (size, EXIF); full: also decode every image "
                             "(finds truncated files); exists: only look for the file")
    parser.add_argument("--full", action="store_const", const="full", dest="check_images",
                        help="same as --check-images full")
    parser.add_argument("--strict", action="store_true", help="exit non-zero on repaired problems (warnings) too")


def format_report(dataset: CocoDataset) -> str:
    summary = dataset.summary()
    lines = [
        f"images: {summary['images_in_file']} in the file, {summary['images']} usable "
        f"({summary['empty_images']} without annotations)",
        f"annotations: {summary['annotations']} instances, {summary['crowd']} crowd regions (ignored in "
        f"training, counted here), {summary['without_mask']} without a usable mask",
        "per class (label: category id, name, instances):",
    ]
    for label, category_id in dataset.label_to_category_id.items():
        name = dataset.category_names[label - 1]
        lines.append(f"  {label:3d}: id {category_id}, {name}: {summary['per_class'][name]}")
    if dataset.keypoint_names:
        lines.append(f"keypoints: {len(dataset.keypoint_names)} per instance {dataset.keypoint_names}, flip map "
                     f"{dataset.keypoint_flip_map}, sigmas {dataset.keypoint_sigmas or 'not given'}")
        lines.append(f"  {summary['keypoint_instances']} instances with labelled keypoints, "
                     f"{summary['labelled_keypoints']} labelled keypoints")
    if dataset.has_points:
        lines.append("points: point_coords / point_labels present")
    lines.append(f"problems: {summary['errors']} errors (data skipped), {summary['warnings']} warnings (repaired)")
    lines += [f"  {problem}" for problem in dataset.problems]
    return "\n".join(lines)


def run(args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    check_images = args.check_images if args.images is not None else "none"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # every problem is printed below instead
            dataset = CocoDataset(args.annotations, args.images or ".", check_images=check_images, warn=False)
    except CocoFormatError as error:
        print(f"check-data: {error}", file=err)
        return 2
    print(f"check-data: {args.annotations}" + (f" (images in {args.images})" if args.images else
                                               " (image files not checked: no --images)"), file=out)
    print(format_report(dataset), file=out)
    errors = sum(p.severity == "error" for p in dataset.problems)
    warnings_found = len(dataset.problems) - errors
    failed = errors > 0 or (args.strict and warnings_found > 0)
    print(f"result: {'FAILED' if failed else 'OK'}", file=out)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="maskrcnn check-data", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
