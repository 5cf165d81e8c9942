"""`maskrcnn convert` for detectron2 files (../shared/detectron2, made by detectron2 itself): the
checkpoint carries COCO's 80 names (or the given file's categories), the recipe beside it
rebuilds the model, and both a converted and a raw detectron2 checkpoint fine-tune onto 3 classes."""

import json

import pytest
import torch

from maskrcnn.checkpoint.convert import recipe_path
from maskrcnn.checkpoint.detectron2 import from_detectron2
from maskrcnn.checkpoint.format import load_checkpoint, read_checkpoint
from maskrcnn.checkpoint.label_space import coco_categories, labels_from_categories
from maskrcnn.cli import main
from maskrcnn.config import load_config
from maskrcnn.data.coco import decode_image
from test_detectron2 import shared_detectron2

torch.set_num_threads(1)
DETECTRON2 = shared_detectron2()  # found as test_detectron2.py finds it; missing fails, never skips
MASK_RCNN = DETECTRON2 / "mask_rcnn_R_50_FPN"
KEYPOINT_RCNN = DETECTRON2 / "keypoint_rcnn_R_50_FPN"


def test_detectron2_zoo_model_converts_with_coco_names(tmp_path, capsys):
    destination = tmp_path / "mask_rcnn.pth"
    assert main(["convert", str(MASK_RCNN / "model_final.pkl"), str(destination),
                 "--config", str(MASK_RCNN / "config.yaml")]) == 0
    assert "80 COCO categories" in capsys.readouterr().out
    checkpoint = read_checkpoint(destination)
    assert checkpoint["labels"] == labels_from_categories(coco_categories())
    assert checkpoint["labels"][11] == {"label": 12, "id": 13, "name": "stop sign"}  # 80 in a row, COCO's ids

    ours, reference = load_checkpoint(destination), from_detectron2(MASK_RCNN / "model_final.pkl", MASK_RCNN / "config.yaml")
    image = decode_image(MASK_RCNN / "image2.png")
    with torch.no_grad():
        got, expected = ours([image])[0], reference([image])[0]
    assert len(expected["boxes"]) > 0 and set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    recipe = load_config(recipe_path(destination))  # the model as a recipe to fine-tune from
    assert recipe.model.backbone == ours.config.backbone and recipe.model.rpn == ours.config.rpn
    assert recipe.model.roi_level_assignment == "detectron2" and recipe.model.transform == ours.config.transform


def test_keypoint_model_is_person_and_annotations_name_the_labels(tmp_path):
    weights, config = KEYPOINT_RCNN / "model_final.pth", KEYPOINT_RCNN / "config.yaml"
    assert main(["convert", str(weights), str(tmp_path / "a.pth"), "--config", str(config)]) == 0
    assert read_checkpoint(tmp_path / "a.pth")["labels"] == [{"label": 1, "id": 1, "name": "person"}]
    (tmp_path / "train.json").write_text(json.dumps({"images": [], "annotations": [],
                                                     "categories": [{"id": 7, "name": "climber"}]}))
    assert main(["convert", str(weights), str(tmp_path / "b.pth"), "--config", str(config),
                 "--annotations", str(tmp_path / "train.json")]) == 0
    assert read_checkpoint(tmp_path / "b.pth")["labels"] == [{"label": 1, "id": 7, "name": "climber"}]


def test_missing_or_unsupported_detectron2_files_are_one_line_errors(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nowhere.pkl"), str(tmp_path / "x.pth"),
                 "--config", str(MASK_RCNN / "config.yaml")]) == 2
    assert "nowhere.pkl do not exist" in capsys.readouterr().err
    (tmp_path / "c4.yaml").write_text("MODEL:\n  BACKBONE:\n    NAME: build_resnet_backbone\n")
    assert main(["convert", str(MASK_RCNN / "model_final.pkl"), str(tmp_path / "x.pth"),
                 "--config", str(tmp_path / "c4.yaml")]) == 2
    assert "MODEL.BACKBONE.NAME" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["converted", "raw"])
def test_detectron2_model_fine_tunes_onto_three_classes(how, tmp_path, capsys):
    from test_checkpoint_fine_tune import BOX_AND_MASK_PREDICTORS, NO_UPDATES, three_classes_overrides

    converted = tmp_path / "d2.pth"
    assert main(["convert", str(MASK_RCNN / "model_final.pkl"), str(converted),
                 "--config", str(MASK_RCNN / "config.yaml")]) == 0
    source = [f"train.init_weights={converted}"] if how == "converted" else [
        f"train.init_weights={MASK_RCNN / 'model_final.pkl'}", f"train.init_weights_config={MASK_RCNN / 'config.yaml'}"]
    small = ["model.transform.min_size=[64]", "model.transform.min_size_test=64", "model.transform.max_size=64"]
    capsys.readouterr()
    assert main(["train", str(recipe_path(converted)), *three_classes_overrides(tmp_path), *NO_UPDATES, *small,
                 *source, f"train.output_dir={tmp_path / 'run'}"]) == 0
    printed = capsys.readouterr().out
    kind = "a maskrcnn checkpoint" if how == "converted" else "detectron2 weights"
    assert f"({kind}): loaded all weights but 6" in printed
    assert sorted(line.split()[2] for line in printed.splitlines() if "re-initialised" in line) == sorted(
        BOX_AND_MASK_PREDICTORS
    )
    fine_tuned, original = read_checkpoint(tmp_path / "run" / "last.pth")["model"], read_checkpoint(converted)["model"]
    for name, tensor in original.items():
        assert torch.equal(fine_tuned[name], tensor) or name in BOX_AND_MASK_PREDICTORS, name
