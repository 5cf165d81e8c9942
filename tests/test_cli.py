"""The `maskrcnn` command: help everywhere, overrides reach the saved config, the demo / evaluate /
predict chain end to end on a tiny model and tiny shapes set, and the other parts' subcommands."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image

from maskrcnn.checkpoint.label_space import trained_categories
from maskrcnn.cli import build_parser, main

SUBCOMMANDS = ["demo", "train", "evaluate", "predict", "export", "convert", "check-data", "points"]

# A model and data set small enough for seconds on a CPU (the recipe is src/maskrcnn/configs/shapes_demo.yaml).
TINY = [
    "model.backbone.fpn_channels=16", "model.box_head.fc_dim=32", "model.mask_head.conv_dim=8",
    "model.keypoint_head.conv_dim=8", "model.transform.min_size=[64]", "model.transform.min_size_test=64",
    "model.transform.max_size=64", "data.shapes_train_images=6", "data.shapes_val_images=3",
    "data.shapes_image_size=64", "data.num_workers=0", "train.iterations=2", "train.batch_size=2",
    "train.warmup_iterations=1", "train.log_every=1",
]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: maskrcnn {command}" in capsys.readouterr().out


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(command in out for command in SUBCOMMANDS)


def test_bad_override_is_a_clear_error(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  iterations: 1\n")
    assert main(["train", str(config), "train.itrations=5"]) == 2
    assert "train.itrations" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["predict", "--weights", str(tmp_path / "nope.pth"), str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "nope.pth does not exist" in capsys.readouterr().err


def test_train_override_values_parse_like_yaml():
    args = build_parser().parse_args(["train", "c.yaml", "train.lr=0.5", "model.transform.min_size=[64,72]", "--resume"])
    assert args.overrides == ["train.lr=0.5", "model.transform.min_size=[64,72]"] and args.resume


def test_points_subcommand_is_wired(tmp_path):
    coco = {"images": [{"id": 1, "width": 20, "height": 20, "file_name": "a.png"}],
            "categories": [{"id": 1, "name": "thing"}],
            "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [2, 2, 10, 10],
                             "area": 100, "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]}]}
    source, out = tmp_path / "in.json", tmp_path / "points.json"
    source.write_text(json.dumps(coco))
    assert main(["points", str(source), "--num-points", "5", "--out", str(out)]) == 0
    (annotation,) = json.loads(out.read_text())["annotations"]
    assert len(annotation["point_coords"]) == 5


def test_check_data_subcommand_is_wired_or_says_it_is_missing(tmp_path, capsys):
    coco = {"images": [{"id": 1, "width": 8, "height": 8, "file_name": "a.png"}], "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, 0, 0], "iscrowd": 0}]}
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "a.png")
    (tmp_path / "a.json").write_text(json.dumps(coco))
    code = main(["check-data", str(tmp_path / "a.json"), "--images", str(tmp_path / "img")])
    assert code == 1  # the zero-area box of annotation 3 is an error
    assert "3" in capsys.readouterr().out


def test_train_saves_the_overridden_config(tmp_path):
    out = tmp_path / "run"
    code = main(["train", "shapes_demo", *TINY, f"data.root={tmp_path / 'shapes'}",
                 f"train.output_dir={out}", "train.lr=0.011", "model.mask_head.num_convs=1"])
    assert code == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["lr"] == 0.011 and saved["model"]["mask_head"]["num_convs"] == 1
    assert saved["model"]["transform"]["min_size"] == [64] and saved["train"]["iterations"] == 2
    assert saved["model"]["backbone"]["depth"] == 18  # from the YAML file, under the overrides
    checkpoint = torch.load(out / "last.pth", weights_only=True)
    # The training data's categories travel with the weights, so predict can name the labels.
    train_json = json.loads((tmp_path / "shapes" / "train.json").read_text())
    assert checkpoint["categories"] == train_json["categories"]
    assert trained_categories(checkpoint, annotations=None) == train_json["categories"]


def test_demo_then_evaluate_then_predict(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--pictures", "2", *TINY, f"data.root={tmp_path / 'shapes'}"]) == 0
    printed = capsys.readouterr().out
    assert "bbox" in printed and "segm" in printed and "keypoints" in printed and "AP per class" in printed
    assert len(list((out / "predictions").glob("*.png"))) == 2
    assert (out / "training_curves.png").is_file() and (out / "metrics.json").is_file()

    assert main(["evaluate", "--weights", str(out / "last.pth"), "--out", str(tmp_path / "eval"),
                 "--num-workers", "0"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"bbox", "segm", "keypoints"}
    assert isinstance(json.loads((tmp_path / "eval" / "results.json").read_text()), list)

    images = tmp_path / "shapes" / "val"
    (images / "broken.png").write_bytes(b"not a png")
    code = main(["predict", "--weights", str(out / "last.pth"), str(images), str(tmp_path / "missing.png"),
                 "--out", str(tmp_path / "pred"), "--score-threshold", "0.0"])
    err = capsys.readouterr().err
    assert code == 1 and "broken.png" in err and "missing.png" in err
    assert len(list((tmp_path / "pred").glob("*.png"))) == 3
    assert isinstance(json.loads((tmp_path / "pred" / "results.json").read_text()), list)


def test_convert_gives_a_checkpoint_that_detects_like_torchvision(tmp_path, capsys):
    import torch
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    from maskrcnn.checkpoint.format import load_checkpoint

    torch.manual_seed(0)
    reference = MaskRCNN(resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5),
                         num_classes=4, min_size=96, max_size=96).eval()
    with torch.no_grad():
        reference.roi_heads.box_predictor.cls_score.weight *= 30  # random weights: make some detections confident
    torch.save(reference.state_dict(), tmp_path / "tv.pth")
    assert main(["convert", str(tmp_path / "tv.pth"), str(tmp_path / "ours.pth")]) == 0
    assert "3 classes" in capsys.readouterr().out
    ours = load_checkpoint(tmp_path / "ours.pth")
    ours.transform.min_size, ours.transform.max_size = reference.transform.min_size, reference.transform.max_size
    image = torch.rand(3, 80, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = reference([image])[0], ours([image])[0]
    assert len(expected["boxes"]) > 0
    torch.testing.assert_close(got["boxes"], expected["boxes"], atol=1e-3, rtol=1e-4)
    assert torch.equal(got["labels"], expected["labels"])
