"""`maskrcnn check-data ANNOTATIONS --images DIR` (cli.py): summary and every problem of a COCO file.

The checks are CocoDataset's own (data/coco.py), so what the checker reports is exactly what
training would repair or skip. Exit codes: 0 clean (warnings allowed unless --strict),
1 problems that skip data (errors), 2 the file cannot be used at all.
"""

from __future__ import annotations

import warnings

from maskrcnn.data.coco import CocoDataset


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


def check_data(annotations: str, *, images: str | None, check_images: str = "header") -> CocoDataset:
    """The data set with every problem recorded (none is warned about: the report lists them).
    Without `images` the image files are not looked at. Raises CocoFormatError for an unusable file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every problem is in the report instead
        return CocoDataset(annotations, images or ".", check_images=check_images if images is not None else "none",
                           warn=False)


def failed(dataset: CocoDataset, *, strict: bool = False) -> bool:
    """True when a problem skipped data (an error), or with `strict`, when any problem was found."""
    errors = sum(p.severity == "error" for p in dataset.problems)
    return errors > 0 or (strict and len(dataset.problems) > errors)
