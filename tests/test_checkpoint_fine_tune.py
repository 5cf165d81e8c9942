"""Fine-tuning onto another class count through `maskrcnn train ... train.init_weights=...`: from a
91-class torchvision checkpoint and from a 6-class `shapes` checkpoint onto a 3-class data set."""

import json

import pytest
import torch
import yaml
from torchvision.models.detection import MaskRCNN as TvMaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d

from maskrcnn.checkpoint.fine_tune import class_dependent_reason
from maskrcnn.checkpoint.format import read_checkpoint
from maskrcnn.checkpoint.torchvision import convert_torchvision_state_dict
from maskrcnn.cli import main
from maskrcnn.data.shapes import generate_shapes

torch.set_num_threads(1)
BOX_AND_MASK_PREDICTORS = {
    f"roi_heads.{name}.{kind}" for name in ("box_predictor.cls_score", "box_predictor.bbox_pred", "mask_head.predictor")
    for kind in ("weight", "bias")
}
# training with lr 0 leaves the weights as loaded, so that last.pth shows what init_weights loaded
NO_UPDATES = ["train.lr=0.0", "train.iterations=1", "train.batch_size=2", "train.warmup_iterations=1",
              "train.log_every=1", "train.tensorboard=false", "train.device=cpu", "data.num_workers=0"]


def three_classes_overrides(root) -> list[str]:
    """Config overrides for a COCO-format set with 3 categories, written under `root`: the shapes
    generator's first three shapes."""
    paths = generate_shapes(root / "shapes", num_train=4, num_val=2, image_size=64, seed=1)
    overrides = []
    for split in ("train", "val"):
        coco = json.loads(paths[f"{split}_annotations"].read_text())
        coco["categories"] = [c for c in coco["categories"] if c["id"] <= 3]
        coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] <= 3]
        (root / f"{split}.json").write_text(json.dumps(coco))
        overrides += [f"data.{split}.annotations={root / f'{split}.json'}", f"data.{split}.images={paths[f'{split}_images']}"]
    return ["data.name=coco", "model.num_classes=3", *overrides]


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):
    return three_classes_overrides(tmp_path_factory.mktemp("three"))


def _loaded_as_expected(source: dict, fine_tuned: dict, skipped: set[str]) -> None:
    assert set(source) == set(fine_tuned)
    for name, tensor in source.items():
        if name in skipped:
            assert fine_tuned[name].shape != tensor.shape, name
        else:
            assert torch.equal(fine_tuned[name], tensor), name


def test_torchvision_coco_checkpoint_fine_tunes_onto_three_classes(tmp_path, three_classes, capsys):
    torch.manual_seed(0)  # torchvision's pretrained layout: FrozenBatchNorm, COCO's 91 slots (ResNet-18 for speed)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3, norm_layer=FrozenBatchNorm2d)
    torchvision_state = TvMaskRCNN(backbone, num_classes=91).state_dict()
    torch.save(torchvision_state, tmp_path / "coco.pth")
    recipe = {"model": {"backbone": {"depth": 18}, "transform": {"min_size": [64], "min_size_test": 64, "max_size": 64},
                        "rpn": {"pre_nms_top_n_train": 100, "post_nms_top_n_train": 50, "pre_nms_top_n_test": 100,
                                "post_nms_top_n_test": 50, "batch_size_per_image": 32},
                        "box_head": {"batch_size_per_image": 16, "detections_per_img": 10}}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert main(["train", str(tmp_path / "recipe.yaml"), *three_classes, *NO_UPDATES, f"train.output_dir={out}",
                 f"train.init_weights={tmp_path / 'coco.pth'}"]) == 0
    printed = capsys.readouterr().out
    assert "(torchvision weights): loaded all weights but 6" in printed
    for name in BOX_AND_MASK_PREDICTORS:
        assert f"re-initialised {name} [" in printed
    assert "re-initialised roi_heads.box_predictor.cls_score.weight [91, 1024] -> [4, 1024] (class scores" in printed
    fine_tuned = read_checkpoint(out / "last.pth")["model"]
    _loaded_as_expected(convert_torchvision_state_dict(torchvision_state), fine_tuned, BOX_AND_MASK_PREDICTORS)


def test_shapes_checkpoint_fine_tunes_onto_three_classes(tmp_path, three_classes, capsys):
    from test_cli import TINY  # the tiny shapes model of the CLI tests

    source_run, out = tmp_path / "shapes_run", tmp_path / "run"
    assert main(["train", "shapes_demo", *TINY, f"data.root={tmp_path / 'shapes'}",
                 f"train.output_dir={source_run}"]) == 0
    source = read_checkpoint(source_run / "last.pth")
    assert source["model_config"]["num_classes"] == 6 and source["model_config"]["keypoint_head"]["num_keypoints"] == 4
    capsys.readouterr()
    assert main(["train", "shapes_demo", *TINY, *three_classes, *NO_UPDATES, f"train.output_dir={out}",
                 f"train.init_weights={source_run / 'last.pth'}"]) == 0
    printed = capsys.readouterr().out
    assert "(a maskrcnn checkpoint): loaded all weights but 6" in printed
    assert sorted(line.split()[2] for line in printed.splitlines() if "re-initialised" in line) == sorted(
        BOX_AND_MASK_PREDICTORS
    )
    assert "keypoint" not in " ".join(line for line in printed.splitlines() if "re-initialised" in line)  # same 4
    _loaded_as_expected(source["model"], read_checkpoint(out / "last.pth")["model"], BOX_AND_MASK_PREDICTORS)

    # another depth, or a file that is not weights at all, is an error naming what does not fit
    code = main(["train", "shapes_demo", *TINY, *three_classes, *NO_UPDATES, "model.backbone.depth=34",
                 f"train.output_dir={tmp_path / 'deeper'}", f"train.init_weights={source_run / 'last.pth'}"])
    error = capsys.readouterr().err
    assert code == 2 and "does not fit the configured model" in error and "missing (e.g. ['backbone.body.layer1.2" in error
    (tmp_path / "notes.pth").write_text("not weights")
    code = main(["train", "shapes_demo", *TINY, *three_classes, *NO_UPDATES,
                 f"train.output_dir={tmp_path / 'typo'}", f"train.init_weights={tmp_path / 'notes.pth'}"])
    assert code == 2 and "notes.pth cannot be read" in capsys.readouterr().err


def test_only_the_class_axis_of_predictors_may_differ():
    assert class_dependent_reason("roi_heads.box_predictor.cls_score.weight", (91, 1024), (4, 1024))
    assert class_dependent_reason("roi_heads.box_predictor.cls_score.weight", (91, 1024), (4, 256)) is None
    assert class_dependent_reason("roi_heads.keypoint_head.deconv.weight", (64, 17, 4, 4), (64, 4, 4, 4))
    assert class_dependent_reason("roi_heads.keypoint_head.deconv.weight", (64, 17, 4, 4), (32, 17, 4, 4)) is None
    assert class_dependent_reason("roi_heads.box_head.fc6.weight", (1024, 12544), (256, 12544)) is None


def test_batchnorm_weights_load_into_frozen_batchnorm():
    """torchvision's v2 weights use BatchNorm; fine-tuning on small batches freezes it
    (model.backbone.norm=frozen_bn), which has no step counters to load."""
    import dataclasses

    from maskrcnn.checkpoint.fine_tune import load_fine_tuning_state
    from maskrcnn.model.mask_rcnn import build_model
    from test_trainer import tiny_model_config

    config = tiny_model_config()
    with_bn = build_model(dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, norm="bn")))
    frozen = build_model(dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, norm="frozen_bn")))
    source = with_bn.state_dict()
    assert any(k.endswith("num_batches_tracked") for k in source) and load_fine_tuning_state(frozen, source, what="x") == []
    for name, tensor in frozen.state_dict().items():
        assert torch.equal(tensor, source[name]), name


def test_another_keypoint_count_restarts_only_the_keypoint_predictor():
    import dataclasses

    from maskrcnn.checkpoint.fine_tune import load_fine_tuning_state
    from maskrcnn.model.mask_rcnn import build_model
    from test_trainer import tiny_model_config

    config = tiny_model_config()
    source = build_model(config).state_dict()  # 4 keypoints
    more = dataclasses.replace(config, keypoint_head=dataclasses.replace(config.keypoint_head, num_keypoints=6))
    skipped = load_fine_tuning_state(build_model(more), source, what="x")
    assert [(s.name, s.reason) for s in skipped] == [
        ("roi_heads.keypoint_head.deconv.weight", "keypoint predictor: another keypoint count"),
        ("roi_heads.keypoint_head.deconv.bias", "keypoint predictor: another keypoint count"),
    ]
