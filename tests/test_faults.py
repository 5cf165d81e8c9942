"""Bad data and faults, tried as a user meets them: through `maskrcnn ...` (cli.main) and the
public API (CocoDataset, train, evaluate). Each test asserts the message, the exit code and
that nothing is lost (checkpoints, annotations)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn.cli import main
from maskrcnn.data.coco import CocoDataset, CocoFormatError
from maskrcnn.engine.evaluation import coco_evaluate

SIZE = 32
# A model small enough for a second per iteration on a CPU, over src/maskrcnn/configs/shapes_demo.yaml.
TINY = [
    "model.backbone.fpn_channels=8", "model.box_head.fc_dim=16", "model.mask_head.conv_dim=8",
    "model.keypoint_head.enabled=false", "model.transform.min_size=[32]", "model.transform.min_size_test=32",
    "model.transform.max_size=32", "model.rpn.pre_nms_top_n_train=50", "model.rpn.post_nms_top_n_train=20",
    "model.rpn.pre_nms_top_n_test=50", "model.rpn.post_nms_top_n_test=20", "data.num_workers=0",
    "data.horizontal_flip=0", "train.batch_size=1", "train.warmup_iterations=1", "train.log_every=1",
]


def _square(image_id: int, ann_id: int, x: float, y: float, side: float, **extra) -> dict:
    polygon = [x, y, x + side, y, x + side, y + side, x, y + side]
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": [x, y, side, side], "iscrowd": 0,
            "area": side * side, "segmentation": [polygon], **extra}


def _write(tmp_path: Path, annotations: list, *, images: int = 2, categories: list | None = None,
           name: str = "train") -> tuple[Path, Path]:
    """A COCO file over `images` 32x32 PNGs with a bright square per annotation."""
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    for i in range(1, images + 1):
        pixels = np.full((SIZE, SIZE, 3), 20, np.uint8)
        for ann in annotations:
            if isinstance(ann, dict) and ann.get("image_id") == i and isinstance(ann.get("bbox"), list):
                x, y, w, h = (int(float(v)) for v in ann["bbox"])
                pixels[y:y + h, x:x + w] = 230
        Image.fromarray(pixels).save(folder / f"{i}.png")
    data = {"images": [{"id": i, "file_name": f"{i}.png", "height": SIZE, "width": SIZE} for i in range(1, images + 1)],
            "annotations": annotations, "categories": categories or [{"id": 1, "name": "square"}]}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return path, folder


def _dataset(path: Path, folder: Path, **options) -> CocoDataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CocoDataset(path, folder, **options)


def _train_args(tmp_path: Path, path: Path, folder: Path, *extra: str) -> list[str]:
    return ["train", "shapes_demo", *TINY, "data.name=coco", f"data.train.annotations={path}",
            f"data.train.images={folder}", "model.num_classes=1", f"train.output_dir={tmp_path / 'run'}", "train.iterations=1", *extra]


# --------------------------------------------------------------------------- 1. duplicate annotation ids
def test_duplicate_annotation_ids_are_reported_and_renumbered_for_evaluation(tmp_path, capsys):
    # two files merged: both number their annotations from 1
    anns = [_square(1, 1, 2, 2, 10), _square(1, 2, 18, 18, 10), _square(2, 1, 4, 4, 12), _square(2, 2, 16, 3, 9)]
    path, folder = _write(tmp_path, anns)
    assert main(["check-data", str(path), "--images", str(folder)]) == 0
    out = capsys.readouterr().out
    assert out.count("[id]: duplicate annotation id") == 2 and "2 warnings" in out
    assert main(["check-data", str(path), "--images", str(folder), "--strict"]) == 1
    capsys.readouterr()

    with pytest.warns(UserWarning, match="annotation problems"):
        dataset = CocoDataset(path, folder)
    assert sum(len(r.labels) for r in dataset.records) == 4  # nothing dropped
    ids = [a["id"] for a in dataset.coco.dataset["annotations"]]
    assert len(set(ids)) == 4 and min(ids) >= 1
    # a prediction equal to the ground truth scores AP 1.0 (it scored 0.58 with the ids colliding)
    results = [{"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.9,
                "segmentation": a["segmentation"]} for a in json.loads(path.read_text())["annotations"]]
    metrics = coco_evaluate(dataset.coco, results, iou_types=["bbox"])
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("bad_id", [0, -3, "a7", 2.5, True])
def test_annotation_ids_pycocotools_cannot_index_are_renumbered(tmp_path, bad_id):
    anns = [_square(1, bad_id, 2, 2, 10), _square(1, 5, 18, 18, 10)]
    dataset = _dataset(*_write(tmp_path, anns, images=1))
    assert any(p.field == "id" and p.annotation_id == bad_id and "renumbered" in p.message for p in dataset.problems)
    ids = [a["id"] for a in dataset.coco.dataset["annotations"]]
    assert 5 in ids and len(set(ids)) == 2 and all(isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in ids)
    results = [{"image_id": 1, "category_id": 1, "bbox": a["bbox"], "score": 0.9} for a in anns]
    assert coco_evaluate(dataset.coco, results, iou_types=["bbox"])["bbox"]["AP"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- 4. numbers written as strings
def test_numbers_written_as_strings_are_read_as_numbers_and_reported(tmp_path, capsys):
    anns = [_square(1, 1, 2, 2, 10, iscrowd="0"), _square(1, 2, 18, 18, 10, iscrowd="1"),
            _square(2, 3, 4, 4, 12, area="144"), {**_square(2, 4, 16, 3, 9), "category_id": "1", "image_id": "2"},
            {**_square(2, 5, 3, 18, 8), "bbox": ["3", "18", "8", "8"]}]
    path, folder = _write(tmp_path, anns)
    data = json.loads(path.read_text())
    data["images"][0].update(height=str(SIZE), width=str(SIZE))
    path.write_text(json.dumps(data))
    assert main(["check-data", str(path), "--images", str(folder)]) == 0
    out = capsys.readouterr().out
    for field, annotation in (("iscrowd", 1), ("iscrowd", 2), ("area", 3), ("category_id", 4), ("image_id", 4),
                              ("bbox", 5), ("height/width", None)):
        assert f"[{field}]" in out and f"annotation {annotation} [{field}]" in out
    dataset = _dataset(path, folder)
    first, second = dataset.records
    assert len(first.labels) == 1 and len(first.crowd_boxes) == 1  # "0" stays an object, "1" is a crowd region
    assert len(second.labels) == 3 and second.boxes[2].tolist() == [3, 18, 11, 26]
    gt = dataset.coco.dataset["annotations"]
    assert [a["iscrowd"] for a in gt] == [0, 1, 0, 0, 0] and all(isinstance(a["area"], (int, float)) for a in gt)
    results = [{"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.9,
                "segmentation": a["segmentation"]} for a in gt if not a["iscrowd"]]
    metrics = coco_evaluate(dataset.coco, results, iou_types=["bbox", "segm"])  # crashed on the string area
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("value", ["yes", 2, [0], "0.5"])
def test_an_iscrowd_that_is_neither_0_nor_1_skips_the_annotation_with_a_message(tmp_path, value):
    dataset = _dataset(*_write(tmp_path, [_square(1, 1, 2, 2, 10, iscrowd=value), _square(1, 2, 18, 18, 10)], images=1))
    (problem,) = dataset.problems
    assert (problem.severity, problem.annotation_id, problem.field) == ("error", 1, "iscrowd")
    assert repr(value) in problem.message and len(dataset.records[0].labels) == 1


def test_a_string_area_that_is_no_number_is_computed_from_the_mask(tmp_path):
    dataset = _dataset(*_write(tmp_path, [_square(1, 1, 2, 2, 10, area="large")], images=1))
    (problem,) = dataset.problems
    assert problem.field == "area" and "'large'" in problem.message
    assert dataset.coco.dataset["annotations"][0]["area"] == pytest.approx(100.0, abs=12)


# --------------------------------------------------------------------------- training: CLI errors, signals, saves
def _last_iteration(run: Path) -> int:
    return int(torch.load(run / "last.pth", map_location="cpu", weights_only=True)["iteration"])


def _one_line_error(err: str, command: str = "train") -> str:
    # the progress bar shares stderr; everything else there is the one error line
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not line.startswith("train:")]
    assert len(lines) == 1 and lines[0].startswith(f"maskrcnn {command}: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("override, key", [
    ("train.lr=nan", "train.lr"), ("train.lr=1e39", "train.lr"), ("train.lr=inf", "train.lr"),
    ("train.device=gpu", "train.device"), ("model.num_classes=0", "model.num_classes"),
    ("train.batch_size=0", "train.batch_size"), ("train.checkpoint_every=0", "train.checkpoint_every"),
    ("train.optimizer=adam", "train.optimizer"), ("model.rpn.nms_thresh=1.5", "model.rpn.nms_thresh"),
    ("data.horizontal_flip=-1", "data.horizontal_flip"), ("model.transform.image_std=[0,1,1]", "model.transform.image_std"),
])
def test_invalid_values_name_the_key_in_one_line_with_exit_2(tmp_path, capsys, override, key):
    path, folder = _write(tmp_path, [_square(1, 1, 2, 2, 10)], images=1)
    assert main(_train_args(tmp_path, path, folder, override)) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"{key}=" in line and "expected" in line
    assert not (tmp_path / "run" / "last.pth").exists()


def test_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  lr: 0.1\n  steps: [10, 20\nmodel:\n  num_classes: 2\n")
    assert main(["train", str(recipe)]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert str(recipe) in line and "line 4" in line


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 10, b"PK\x03\x04 not really a zip"])
def test_a_corrupt_or_empty_init_weights_file_names_the_file(tmp_path, capsys, content):
    path, folder = _write(tmp_path, [_square(1, 1, 2, 2, 10)], images=1)
    weights = tmp_path / "start.pth"
    weights.write_bytes(content)
    assert main(_train_args(tmp_path, path, folder, f"train.init_weights={weights}")) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "train.init_weights" in line and str(weights) in line


def test_errors_that_are_not_config_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    path, folder = _write(tmp_path, [_square(1, 1, 2, 2, 10)], images=1)
    missing = tmp_path / "nowhere.json"
    args = _train_args(tmp_path, missing, folder)
    assert main(args) == 2
    assert str(missing) in _one_line_error(capsys.readouterr().err)
    with pytest.raises(Exception, match="nowhere.json"):
        main([*args, "--debug"])
    monkeypatch.setenv("MASKRCNN_DEBUG", "1")
    with pytest.raises(Exception, match="nowhere.json"):
        main(args)


def test_resume_accepts_options_after_the_overrides_and_a_changed_optimizer_is_named(tmp_path, capsys):
    path, folder = _write(tmp_path, [_square(1, 1, 2, 2, 10)], images=1)
    assert main(_train_args(tmp_path, path, folder, "train.iterations=1")) == 0
    before = (tmp_path / "run" / "last.pth").read_bytes()
    # options after the overrides (--resume last), and a changed optimizer (the recipe's adamw -> sgd)
    assert main([*_train_args(tmp_path, path, folder, "train.iterations=2", "train.optimizer=sgd"), "--resume"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "optimizer state" in line and "adamw" in line and "sgd" in line
    assert (tmp_path / "run" / "last.pth").read_bytes() == before  # nothing lost
    assert main(["train", "shapes_demo", "--resume", *_train_args(tmp_path, path, folder, "train.iterations=2")[2:]]) == 0
    assert _last_iteration(tmp_path / "run") == 2


@pytest.mark.parametrize("command", ["train", "demo"])
@pytest.mark.parametrize("signal_number, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_exits_non_zero_saying_interrupted_and_how_to_resume(tmp_path, capsys, monkeypatch, command,
                                                                      signal_number, code):
    from maskrcnn.engine import trainer

    step = trainer.train_step

    def signalled_step(parts, state, **kwargs):
        if state.iteration == 1:
            os.kill(os.getpid(), signal_number)  # arrives during the second iteration
        return step(parts, state, **kwargs)

    monkeypatch.setattr(trainer, "train_step", signalled_step)
    if command == "train":
        path, folder = _write(tmp_path, [_square(1, 1, 2, 2, 10)], images=1)
        args = _train_args(tmp_path, path, folder, "train.iterations=5")
    else:
        args = ["demo", "--out", str(tmp_path / "run"), "--pictures", "1", *TINY, "model.num_classes=6",
                "data.shapes_train_images=2", "data.shapes_val_images=1", "data.shapes_image_size=32",
                f"data.root={tmp_path / 'shapes'}", "train.iterations=5"]
    assert main(args) == code
    captured = capsys.readouterr()
    assert "trained to iteration" not in captured.out
    line = _one_line_error(captured.err, command)
    assert "interrupted" in line and signal.Signals(signal_number).name in line and "iteration 2" in line
    assert f"maskrcnn train {tmp_path / 'run' / 'config.yaml'} --resume" in line
    assert _last_iteration(tmp_path / "run") == 2


def test_num_classes_below_the_data_categories_is_refused_at_start_up(tmp_path, capsys):
    categories = [{"id": 1, "name": "square"}, {"id": 4, "name": "other"}, {"id": 9, "name": "third"}]
    path, folder = _write(tmp_path, [_square(1, 1, 2, 2, 10), {**_square(1, 2, 18, 18, 10), "category_id": 9}],
                          images=1, categories=categories)
    assert main(_train_args(tmp_path, path, folder, "model.num_classes=2")) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "model.num_classes=2" in line and "3 categories" in line and str(path) in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # before the first iteration


def test_a_file_with_images_but_no_annotations_trains_on_negatives(tmp_path, capsys):
    path, folder = _write(tmp_path, [], images=2)
    assert main(_train_args(tmp_path, path, folder, "train.iterations=2")) == 0
    assert _last_iteration(tmp_path / "run") == 2
    capsys.readouterr()
    assert main(_train_args(tmp_path, path, folder, "data.keep_empty_images=false", f"train.output_dir={tmp_path / 'b'}")) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "no usable training image" in line and "data.keep_empty_images=false" in line


def test_box_only_data_with_the_mask_head_on_is_refused_at_start_up(tmp_path, capsys):
    anns = [{k: v for k, v in _square(1, 1, 2, 2, 10).items() if k != "segmentation"}]
    path, folder = _write(tmp_path, anns, images=1)
    assert main(_train_args(tmp_path, path, folder, "train.iterations=1")) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "model.mask_head.enabled" in line and "segmentation" in line
    assert main(_train_args(tmp_path, path, folder, "train.iterations=1", "model.mask_head.enabled=false")) == 0


# --------------------------------------------------------------------------- 2, 3. what is saved, and when
class PoisonWeights(torch.nn.Module):
    """Wraps a model; at the n-th forward a weight becomes inf after the (finite) loss is computed,
    as a blow-up reaches the weights one step before it reaches the loss."""

    def __init__(self, model: torch.nn.Module, *, poison_at: int, signal_at: int | None = None) -> None:
        super().__init__()
        self.inner, self.poison_at, self.signal_at, self.calls = model, poison_at, signal_at, 0

    def forward(self, images, targets=None):
        self.calls += 1
        losses = self.inner(images, targets)
        if self.calls == self.poison_at:  # this step's gradient, hence the weight after the step, is inf
            next(self.inner.parameters()).register_hook(lambda grad: torch.full_like(grad, float("inf")))
        if self.calls == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return losses


@pytest.mark.parametrize("when", ["periodic", "signal", "final"])
def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path, when):
    from maskrcnn.engine import trainer
    from test_trainer import Rectangles, tiny_config, tiny_model

    data = Rectangles(4)
    trainer.train(tiny_config(tmp_path, iterations=1), model=PoisonWeights(tiny_model(), poison_at=0), train_dataset=data)
    good = (tmp_path / "last.pth").read_bytes()
    config = tiny_config(tmp_path, iterations=3, checkpoint_every=3 if when == "periodic" else 100)
    # the resumed run's calls 1 and 2 are iterations 2 and 3
    model = PoisonWeights(tiny_model(), poison_at=2 if when != "signal" else 1, signal_at=1 if when == "signal" else None)
    with pytest.raises(trainer.NonFiniteStateError) as error:
        trainer.train(config, resume=True, model=model, train_dataset=data)
    message = str(error.value)
    stopped_at = 2 if when == "signal" else 3
    assert f"iteration {stopped_at}:" in message and "not finite" in message and "last.pth was not written" in message
    assert "the last good checkpoint" in message and "(iteration 1) is kept" in message  # and it is true:
    assert (tmp_path / "last.pth").read_bytes() == good


def test_the_optimizer_state_is_checked_too():
    from maskrcnn.engine.trainer import non_finite_entries

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    weight.grad = torch.tensor([1.0, float("inf"), 1.0])
    optimizer.step()
    assert "state.0.exp_avg" in non_finite_entries(optimizer.state_dict())
    assert non_finite_entries({"a": torch.zeros(2), "b": [torch.ones(1), {"c": torch.arange(3)}]}) == []


def test_the_final_checkpoint_is_saved_before_the_final_evaluation(tmp_path):
    from maskrcnn.engine import trainer
    from test_trainer import Rectangles, tiny_config, tiny_model

    class BrokenValidation(Rectangles):
        def __getitem__(self, key):
            raise RuntimeError("image 3 (val/3.png): cannot be read: image file is truncated")

    with pytest.raises(RuntimeError, match="truncated"):
        trainer.train(tiny_config(tmp_path, iterations=3, checkpoint_every=2), model=tiny_model(),
                      train_dataset=Rectangles(4), val_dataset=BrokenValidation(2))
    assert _last_iteration(tmp_path) == 3  # the last iteration's weights are not lost


# --------------------------------------------------------------------------- 5. keypoint flip maps
def _keypoint_file(tmp_path: Path, names: list[str], flip_map: list | None = None) -> tuple[Path, Path]:
    category = {"id": 1, "name": "square", "keypoints": names}
    if flip_map is not None:
        category["keypoint_flip_map"] = flip_map
    keypoints = [v for i in range(len(names)) for v in (4 + 2 * i, 5, 2)]
    return _write(tmp_path, [_square(1, 1, 2, 2, 20, keypoints=keypoints, num_keypoints=len(names))],
                  images=1, categories=[category])


@pytest.mark.parametrize("flip_map, says", [([[0, 1], [1, 2]], "not a permutation"), ([[0, 5]], "out of range"),
                                            ([[0]], "not a pair")])
def test_a_bad_flip_map_fails_check_data_and_is_refused_before_flipping(tmp_path, capsys, flip_map, says):
    path, folder = _keypoint_file(tmp_path, ["left_eye", "right_eye", "nose"], flip_map)
    assert main(["check-data", str(path), "--images", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "[keypoint_flip_map]" in out and says in out
    with pytest.raises(CocoFormatError, match=f"keypoint_flip_map.*{says}"):
        _dataset(path, folder, horizontal_flip=0.5)
    assert main(_train_args(tmp_path, path, folder, "data.horizontal_flip=0.5")) == 2
    assert says in _one_line_error(capsys.readouterr().err)
    (tmp_path / "good").mkdir()
    good = _keypoint_file(tmp_path / "good", ["left_eye", "right_eye", "nose"])
    with pytest.raises(ValueError, match="data.keypoint_flip_map.*permutation"):  # the config's map, the same way
        _dataset(*good, keypoint_flip_map=[[0, 1], [1, 2]])


def test_sided_names_that_no_flip_pair_swaps_warn_when_images_are_flipped(tmp_path, capsys):
    path, folder = _keypoint_file(tmp_path, ["L_eye", "R_eye", "nose"])
    with pytest.warns(UserWarning, match=r"\['L_eye', 'R_eye'\].*flip"):
        dataset = CocoDataset(path, folder, horizontal_flip=0.5)
    assert dataset.keypoint_flip_map == []
    assert main(["check-data", str(path), "--images", str(folder)]) == 0
    assert "L_eye" in capsys.readouterr().out
    (tmp_path / "paired").mkdir()
    assert _dataset(*_keypoint_file(tmp_path / "paired", ["left_eye", "right_eye", "nose"])).problems == []


# --------------------------------------------------------------------------- 8. truncated images
def _truncate_one(folder: Path) -> Path:
    """2.png becomes a JPEG cut short: its header reads, its pixels do not decode."""
    full = folder / "2.full.jpg"
    Image.open(folder / "2.png").convert("RGB").save(full, quality=95)
    cut = folder / "2.jpg"
    data = full.read_bytes()
    scan = data.index(b"\xff\xda")  # start of the compressed pixels: cut half way through them
    cut.write_bytes(data[: scan + (len(data) - scan) // 2])
    full.unlink()
    return cut


def test_a_truncated_jpeg_is_found_by_check_data_full_and_skipped_in_training_by_default(tmp_path, capsys):
    path, folder = _write(tmp_path, [_square(1, 1, 2, 2, 10), _square(2, 2, 5, 5, 10)], images=2)
    cut = _truncate_one(folder)
    data = json.loads(path.read_text())
    data["images"][1]["file_name"] = cut.name
    path.write_text(json.dumps(data))
    assert main(["check-data", str(path), "--images", str(folder)]) == 0  # the header alone looks fine
    capsys.readouterr()
    assert main(["check-data", str(path), "--images", str(folder), "--full"]) == 1
    out = capsys.readouterr().out
    assert "error: image 2 annotation None [file_name]" in out and "cannot be decoded" in out and "2.jpg" in out

    with pytest.warns(UserWarning, match=r"image 2 .*2\.jpg.*skipped .*1 image\(s\) skipped"):
        assert main(_train_args(tmp_path, path, folder, "train.iterations=3")) == 0
    assert _last_iteration(tmp_path / "run") == 3
    capsys.readouterr()
    assert main(_train_args(tmp_path, path, folder, "train.iterations=3", "data.bad_images=fail",
                            f"train.output_dir={tmp_path / 'strict'}")) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "image 2" in line and "2.jpg" in line


# --------------------------------------------------------------------------- 14. boxes as corners, keypoints outside
def test_boxes_written_as_corners_and_keypoints_outside_the_image_are_reported(tmp_path, capsys):
    corners = {**_square(1, 1, 12, 14, 10), "bbox": [12, 14, 22, 24]}  # x1,y1,x2,y2 beside its polygon
    past = {k: v for k, v in _square(1, 2, 20, 18, 8).items() if k != "segmentation"}
    past["bbox"] = [20, 18, 28, 26]  # box only: as x,y,w,h it runs past the 32x32 image
    outside = _square(2, 3, 4, 4, 10, keypoints=[6, 6, 2, 40, 5, 2, -3, 8, 1], num_keypoints=3)
    category = {"id": 1, "name": "square", "keypoints": ["a", "b", "c"]}
    path, folder = _write(tmp_path, [corners, past, outside], categories=[category])
    assert main(["check-data", str(path), "--images", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "annotation 1 [bbox]" in out and "as x1,y1,x2,y2 corners" in out
    assert "annotation 2 [bbox]" in out and "does the file write corners" in out
    assert "annotation 3 [keypoints]: 2 labelled keypoint(s) lie outside the 32x32 image" in out
    dataset = _dataset(path, folder)
    assert dataset.records[0].boxes[0].tolist() == [12, 14, 22, 24]
    keypoints = dataset.records[1].keypoints[0]
    assert keypoints[:, 2].tolist() == [2, 0, 0] and keypoints[0, :2].tolist() == [6.5, 6.5]
    assert dataset.coco.dataset["annotations"][2]["keypoints"][3:] == [0, 0, 0, 0, 0, 0]
    assert dataset.coco.dataset["annotations"][2]["num_keypoints"] == 1


# --------------------------------------------------------------------------- 16. partial files of a killed save
def test_stale_temporary_checkpoints_are_removed_at_start_and_a_live_save_is_not(tmp_path, capsys):
    from maskrcnn.checkpoint.format import writer_tag

    path, folder = _write(tmp_path, [_square(1, 1, 2, 2, 10)], images=1)
    run = tmp_path / "run"
    run.mkdir()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = writer_tag().rsplit("-", 1)[0]
    killed = run / f".last.pth.{host}-{finished.stdout.strip()}.k1ll3d.tmp"  # its writer is gone
    old = run / ".best.pth.a8x2_q.tmp"  # an older name without its writer, untouched for two hours
    live = run / f".last.pth.{host}-{os.getpid()}.w0rk1n.tmp"  # a save in progress (this process)
    elsewhere = run / ".last.pth.other-host-1.abc.tmp"  # another machine's save on a shared disk
    for file in (killed, old, live, elsewhere):
        file.write_bytes(b"x" * 1000)
    os.utime(old, (os.path.getmtime(old) - 7200,) * 2)
    assert main(_train_args(tmp_path, path, folder)) == 0
    assert not killed.exists() and not old.exists() and live.exists() and elsewhere.exists()
    assert "removed 2 stale temporary checkpoint file(s)" in capsys.readouterr().err
    assert _last_iteration(run) == 1 and sorted(run.glob(".*.tmp")) == sorted([live, elsewhere])


# --------------------------------------------------------------------------- 12. crowded images
@pytest.mark.parametrize("low_quality", [True, False])
def test_chunked_matching_equals_the_full_iou_matrix(low_quality):
    from torchvision.ops import box_iou

    from maskrcnn.model.box_ops import Matcher

    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(300, 2, generator=generator) * 200
    gt = torch.cat([corners, corners + 5 + torch.rand(300, 2, generator=generator) * 40], dim=1)
    gt = torch.cat([gt, gt[:40]])  # repeated objects: ties that must keep the first gt, across chunks too
    points = torch.rand(2000, 4, generator=generator) * 250
    anchors = torch.cat([gt[::3] + 1.0, torch.cat([points[:, :2].minimum(points[:, 2:]),
                                                   points[:, :2].maximum(points[:, 2:]) + 1], dim=1)])
    matcher = Matcher(high_threshold=0.7, low_threshold=0.3, allow_low_quality_matches=low_quality)
    full = matcher(box_iou(gt, anchors))
    for chunk_elements in (1, 2100 * 7, 2100 * 64, 10**9):  # one gt per chunk ... all at once
        assert torch.equal(matcher.match_boxes(gt, anchors, chunk_elements=chunk_elements), full)
    assert (full >= 0).sum() > 50 and (full == -2).any() and (full == -1).any()  # every outcome occurs
    empty = torch.zeros((0, 4))
    assert torch.equal(matcher.match_boxes(empty, anchors, chunk_elements=1), matcher(box_iou(empty, anchors)))
