"""`check-data` against the problems planted in test_coco's file, a clean shapes file, and unusable files."""

from __future__ import annotations

import contextlib
import io
import json

from maskrcnn.cli import main
from maskrcnn.data import shapes
from test_coco import _coco_file


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["check-data", *argv])
    return code, out.getvalue(), err.getvalue()


def test_reports_every_planted_problem(tmp_path):
    annotations, images = _coco_file(tmp_path)
    code, out, _ = _run(str(annotations), "--images", str(images))
    assert code == 1 and "result: FAILED" in out
    assert "problems: 8 errors (data skipped), 6 warnings (repaired)" in out
    planted = [("error", 11, 7, "bbox"), ("error", 11, 8, "bbox"), ("error", 12, 11, "category_id"),
               ("error", 77, 12, "image_id"), ("error", 17, 13, "image_id"), ("error", 17, None, "file_name"),
               ("error", 18, None, "file_name"), ("error", 19, None, "height/width"),
               ("warning", 11, 5, "segmentation"), ("warning", 11, 6, "segmentation"), ("warning", 12, 9, "bbox"),
               ("warning", 12, 10, "keypoints"), ("warning", 13, 15, "point_coords"), ("warning", 16, None, "height/width")]
    for severity, image_id, annotation_id, field in planted:
        assert f"{severity}: image {image_id} annotation {annotation_id} [{field}]" in out
    assert out.count("  error: ") == 8 and out.count("  warning: ") == 6
    assert "images: 11 in the file, 8 usable (4 without annotations)" in out
    assert "1 crowd regions" in out and "  2: id 7, b: 3" in out
    assert "flip map [[1, 2]]" in out


def test_clean_file_passes_and_strict_counts_warnings(tmp_path):
    paths = shapes.generate_shapes(tmp_path / "s", num_train=1, num_val=4, image_size=64, seed=0)
    code, out, _ = _run(str(paths["val_annotations"]), "--images", str(paths["val_images"]))
    assert code == 0 and "result: OK" in out and "problems: 0 errors" in out
    data = json.loads(paths["val_annotations"].read_text())
    first = data["annotations"][0]
    first["bbox"][2] += 1000  # partly outside: clipped, a warning only
    (tmp_path / "warn.json").write_text(json.dumps(data))
    assert _run(str(tmp_path / "warn.json"), "--images", str(paths["val_images"]))[0] == 0
    code, out, _ = _run(str(tmp_path / "warn.json"), "--images", str(paths["val_images"]), "--strict")
    assert code == 1 and f"warning: image {first['image_id']} annotation {first['id']} [bbox]" in out


def test_unusable_file_exits_2_with_a_message(tmp_path):
    (tmp_path / "x.json").write_text('{"images": []}')
    code, out, err = _run(str(tmp_path / "x.json"))
    assert code == 2 and out == "" and "'categories'" in err and "Traceback" not in err
    code, _, err = _run(str(tmp_path / "missing.json"))
    assert code == 2 and "does not exist" in err


def test_without_images_folder_skips_file_checks(tmp_path):
    annotations, _ = _coco_file(tmp_path)
    code, out, _ = _run(str(annotations))
    assert "image files not checked" in out
    assert "[file_name]" not in out and code == 1  # annotation errors are still found
