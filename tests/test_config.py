"""Config: YAML over dataclass defaults, key.sub=value overrides, errors that name the key."""

import pytest
import yaml

from maskrcnn.config import Config, ConfigError, config_from_dict, config_to_dict, load_config, save_config


def test_defaults_match_torchvision_maskrcnn_resnet50_fpn():
    config = Config()
    assert config.model.backbone.depth == 50
    assert config.model.rpn.pre_nms_top_n_train == 2000 and config.model.rpn.post_nms_top_n_test == 1000
    assert config.model.box_head.batch_size_per_image == 512
    assert config.model.box_head.positive_fraction == 0.25
    assert config.model.mask_head.pooler_resolution * 2 == 28


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"num_classes": 3, "backbone": {"depth": 18}}, "train": {"lr": 0.1}}))
    config = load_config(path, ["train.lr=0.5", "model.rpn.aspect_ratios=[1.0]", "model.mask_head.mask_classes=[1, 2]"])
    assert config.model.num_classes == 3
    assert config.model.backbone.depth == 18
    assert config.train.lr == 0.5
    assert config.model.rpn.aspect_ratios == [1.0]
    assert config.model.mask_head.mask_classes == [1, 2]
    assert config.train.clip_grad_norm is None
    assert load_config(None, ["train.clip_grad_norm=null"]).train.clip_grad_norm is None
    assert load_config(None, ["train.clip_grad_norm=5"]).train.clip_grad_norm == 5.0


def test_round_trip(tmp_path):
    config = load_config(None, ["model.num_classes=7", "train.steps=[10, 20]"])
    save_config(config, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == config
    assert config_from_dict(config_to_dict(config)) == config


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.num_clases=3", "model.num_clases"),
        ("model.num_classes=abc", "model.num_classes"),
        ("model.num_classes=2.5", "model.num_classes"),
        ("train.amp=maybe", "train.amp"),
        ("model.backbone=3", "model.backbone"),
        ("no_equals_sign", "key.sub=value"),
        ("model.mask_head.point_loss_average=mean", "model.mask_head.point_loss_average=mean: expected one of "
         "valid_points, all_points"),
        ("train.ema_decay=1", "train.ema_decay=1: expected a value < 1"),
        ("train.ema_decay=1.5", "train.ema_decay=1.5: expected a value >= 0 and <= 1"),
        ("train.ema_decay=-0.1", "train.ema_decay=-0.1: expected a value >= 0"),
        ("train.ema_start=-1", "train.ema_start=-1: expected a value >= 0"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, [override])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
