"""detectron2 weights against detectron2's own outputs (../shared/detectron2/, read in place).

Each model folder there holds seeded weights, the resolved config.yaml, three images and what
detectron2 itself returned for them (see its README). The folder is found through
$MASKRCNN_SHARED (the folder that holds `detectron2/`) or as `shared/detectron2` beside the
project root or one of its parents; a missing folder fails these tests (it never skips them).
Each model is loaded and run once per module; the tests then compare the stored results.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn.checkpoint.detectron2 import from_detectron2, read_detectron2
from maskrcnn.model.mask_head import paste_masks

torch.set_num_threads(1)  # one thread per test process on this shared machine (see test_model.py)
MODELS = {
    "mask_rcnn_R_50_FPN": ("model_final.pkl", "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"),
    "keypoint_rcnn_R_50_FPN": ("model_final.pth", "COCO-Keypoints/keypoint_rcnn_R_50_FPN_3x.yaml"),
    "faster_rcnn_R_101_FPN": ("model_final.pth", "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml"),
}


def shared_detectron2() -> Path:
    """../shared/detectron2 of the project root, wherever the checkout lives."""
    if os.environ.get("MASKRCNN_SHARED"):
        candidates = [Path(os.environ["MASKRCNN_SHARED"]) / "detectron2"]
    else:
        root = Path(__file__).resolve().parents[1]
        candidates = [folder / "shared" / "detectron2" for folder in [root, *root.parents]]
    for candidate in candidates:
        if (candidate / "README.md").is_file():
            return candidate
    pytest.fail(f"detectron2 reference outputs not found (looked in {', '.join(map(str, candidates[:3]))}, ...): "
                "set MASKRCNN_SHARED to the folder that holds detectron2/")


@pytest.fixture(scope="module")
def shared() -> Path:
    return shared_detectron2()


def read_image(path: Path) -> torch.Tensor:
    """RGB floats in 0-1, our input convention."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255


def run_stages(model, image: torch.Tensor) -> dict:
    """One image through the model, keeping what detectron2's reference stores: the proposals and
    their logits, the 28 x 28 mask probabilities before pasting, and the final detections."""
    model.transform.min_size_test = min(image.shape[-2:])  # the reference ran each image at its own size
    with torch.no_grad():
        batch, _ = model.transform([image])
        features = model.backbone(batch.tensors)
        proposals, logits, _ = model.rpn.propose(batch, features)
        detections, _ = model.roi_heads(features, proposals, batch.image_sizes)
        final = model.transform.postprocess(detections, batch.image_sizes, [tuple(image.shape[-2:])])[0]
        if "masks" in final:  # pasted as model(images) pastes them
            final["masks"] = paste_masks(final["masks"], final["boxes"], tuple(image.shape[-2:]), padding=1,
                                         aligned=model.paste_aligned)
    return {"proposals": proposals[0], "logits": logits[0], "masks_28": detections[0].get("masks"), "final": final}


@pytest.fixture(scope="module", params=sorted(MODELS))
def reference(request, shared):
    """(name, [(detectron2's result, ours)] per image)."""
    name = request.param
    folder = shared / name
    model = from_detectron2(folder / MODELS[name][0], folder / "config.yaml")
    expected = json.loads(gzip.decompress((folder / "d2_outputs.json.gz").read_bytes()))["results"]
    return name, [(result, run_stages(model, read_image(folder / result["image"]))) for result in expected]


BOX_ATOL, SCORE_ATOL, MASK_PROB_ATOL = 1e-3, 1e-4, 2e-4


def tie_order(boxes: torch.Tensor, scores: torch.Tensor, expected_boxes: torch.Tensor,
              expected_scores: torch.Tensor) -> torch.Tensor:
    """`[len(expected)]`: the row of ours that stands for each of detectron2's rows, in its order.

    Rows keep their position, except that two of our rows whose scores tie within SCORE_ATOL (1e-6
    apart, say) may come in either order: the CPU's summation order (AVX2 against AVX-512) decides
    their sort, in detectron2 as in ours. A row moves only to a row of ours with the same box and
    score within the tolerances; any other difference stays in place and fails the comparison.
    """
    order, free = [], set(range(len(boxes)))
    for i in range(len(expected_boxes)):
        tied = [j for j in sorted(free) if i < len(scores) and abs(float(scores[j] - scores[i])) <= SCORE_ATOL
                and abs(float(scores[j] - expected_scores[i])) <= SCORE_ATOL
                and float((boxes[j] - expected_boxes[i]).abs().max()) <= BOX_ATOL]
        j = i if i in tied or not tied else min(tied, key=lambda j: abs(j - i))
        order.append(j)
        free.discard(j)
    return torch.tensor(order, dtype=torch.long)


def final_order(expected: dict, ours: dict) -> torch.Tensor:
    """`tie_order` of the final detections (their masks and keypoints follow the same rows)."""
    final = ours["final"]
    return tie_order(final["boxes"], final["scores"], torch.tensor(expected["boxes"]), torch.tensor(expected["scores"]))


def test_tie_order_swaps_only_tied_rows():
    boxes = torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20], [7, 7, 9, 9], [1, 1, 2, 2]])
    scores = torch.tensor([0.9, 0.5000004, 0.5, 0.1])
    swapped = [0, 2, 1, 3]  # the two tied rows in the other order
    assert tie_order(boxes, scores, boxes[swapped], scores[swapped]).tolist() == swapped
    assert tie_order(boxes, scores, boxes, scores).tolist() == [0, 1, 2, 3]
    # a real difference keeps its place, so the comparison after it fails
    other = boxes.clone()
    other[1, 0] += 1
    assert tie_order(boxes, scores, other, scores).tolist() == [0, 1, 2, 3]
    scores_apart = torch.tensor([0.9, 0.6, 0.5, 0.1])
    assert tie_order(boxes, scores_apart, boxes[swapped], scores_apart[swapped]).tolist() == [0, 1, 2, 3]


def test_proposals_equal(reference):
    _, pairs = reference
    for expected, ours in pairs:
        assert len(ours["proposals"]) == expected["num_proposals"], expected["image"]
        proposals, logits = torch.tensor(expected["proposals"]), torch.tensor(expected["proposal_logits"])
        order = tie_order(ours["proposals"], ours["logits"], proposals, logits)
        torch.testing.assert_close(ours["proposals"][order], proposals, rtol=0, atol=BOX_ATOL)
        torch.testing.assert_close(ours["logits"][order], logits, rtol=0, atol=SCORE_ATOL)


def test_detections_equal(reference):
    _, pairs = reference
    for expected, ours in pairs:
        final = ours["final"]
        assert len(final["boxes"]) == len(expected["boxes"]) > 0, expected["image"]
        order = final_order(expected, ours)
        assert final["labels"][order].tolist() == [c + 1 for c in expected["classes"]], expected["image"]  # ours: 1..K
        torch.testing.assert_close(final["boxes"][order], torch.tensor(expected["boxes"]), rtol=0, atol=BOX_ATOL)
        torch.testing.assert_close(final["scores"][order], torch.tensor(expected["scores"]), rtol=0, atol=SCORE_ATOL)


def test_masks_equal(reference):
    name, pairs = reference
    if "mask_probs_28" not in pairs[0][0]:
        assert "masks" not in pairs[0][1]["final"], f"{name} has no mask head in detectron2"
        return
    for expected, ours in pairs:
        order = final_order(expected, ours)
        probabilities = torch.tensor(expected["mask_probs_28"]).reshape(-1, 1, 28, 28)
        # MASK_PROB_ATOL: the reference's mask predictor weights are scaled by 300, which carries the
        # convolutions' summation order into the probabilities (1.03-1.07e-4 on an AVX2 CPU)
        torch.testing.assert_close(ours["masks_28"][order], probabilities, rtol=0, atol=MASK_PROB_ATOL)
        pasted = ours["final"]["masks"][order, 0] >= 0.5  # detectron2 thresholds its pasted masks at 0.5
        theirs = torch.from_numpy(mask_utils.decode(expected["masks_rle"])).permute(2, 0, 1).bool()
        intersection = (pasted & theirs).flatten(1).sum(1)
        union = (pasted | theirs).flatten(1).sum(1)
        iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union, dtype=torch.float))
        assert iou.min() >= 0.99, (expected["image"], iou.min().item(), int(iou.argmin()))


def test_keypoints_equal(reference):
    name, pairs = reference
    if "keypoints" not in pairs[0][0]:
        assert "keypoints" not in pairs[0][1]["final"], f"{name} has no keypoint head in detectron2"
        return
    for expected, ours in pairs:
        order = final_order(expected, ours)
        keypoints = torch.tensor(expected["keypoints"])  # [N, K, 3]: x, y, detectron2's score
        torch.testing.assert_close(ours["final"]["keypoints"][order, :, :2], keypoints[..., :2], rtol=0, atol=0.05)
        torch.testing.assert_close(ours["final"]["keypoints_scores"][order], keypoints[..., 2], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_zoo_yaml_gives_the_resolved_settings(shared, name):
    """The zoo file with its _BASE_ chain and the resolved config.yaml describe the same model;
    they differ only in the test sizes (the references ran at 320 / 512, the zoo's are 800 / 1333)."""
    weights = shared / name / MODELS[name][0]
    resolved, _ = read_detectron2(weights=weights, config=shared / name / "config.yaml")
    zoo, _ = read_detectron2(weights=weights, config=shared / "zoo_configs" / MODELS[name][1])
    assert (resolved.transform.min_size_test, resolved.transform.max_size) == (320, 512)
    assert (zoo.transform.min_size_test, zoo.transform.max_size) == (800, 1333)
    zoo.transform.min_size_test, zoo.transform.max_size = 320, 512
    assert dataclasses.asdict(zoo) == dataclasses.asdict(resolved)
    assert zoo.transform.min_size == [640, 672, 704, 736, 768, 800]  # a tuple written as a string in the zoo file


# --------------------------------------------------------------------------- other detectron2 settings
MASK_MODEL = "mask_rcnn_R_50_FPN"


def write_variant(tmp_path: Path, shared: Path, overrides: str, state: dict | None = None,
                  model: str = MASK_MODEL) -> tuple[Path, Path]:
    """A config whose _BASE_ is the reference's resolved config.yaml (by absolute path) with
    `overrides` (YAML) on top, and weights: `state` saved as a DetectionCheckpointer .pth, or the
    reference's own file."""
    config = tmp_path / "config.yaml"
    config.write_text(f"_BASE_: {shared / model / 'config.yaml'}\n{overrides}")
    if state is None:
        return shared / model / MODELS[model][0], config
    weights = tmp_path / "model_final.pth"
    torch.save({"model": state, "iteration": 1}, weights)
    return weights, config


def reference_state(shared: Path, model: str = MASK_MODEL) -> dict:
    from maskrcnn.checkpoint.detectron2 import read_detectron2_weights

    return {k: v.clone() for k, v in read_detectron2_weights(shared / model / MODELS[model][0]).items()}


def detect(weights: Path, config: Path, image: torch.Tensor) -> dict:
    model = from_detectron2(weights, config)
    model.transform.min_size_test = min(image.shape[-2:])
    with torch.no_grad():
        return model([image])[0]


def assert_same_detections(got: dict, expected: dict) -> None:
    assert got["labels"].tolist() == expected["labels"].tolist()
    # the reference's tolerances: another channel order sums the stem conv in another order
    for key, tolerance in (("boxes", BOX_ATOL), ("scores", SCORE_ATOL), ("masks", MASK_PROB_ATOL)):
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=tolerance, msg=key)


FEW = "TEST:\n  DETECTIONS_PER_IMAGE: 20\n"  # fewer masks to paste: these tests compare two runs of ours


def test_rgb_format_equals_bgr_with_the_channels_swapped(tmp_path, shared):
    """INPUT.FORMAT RGB with PIXEL_MEAN / PIXEL_STD and the stem's input channels reversed is the
    same model as the BGR original: the same detections."""
    image = read_image(shared / MASK_MODEL / "image2.png")
    expected = detect(*write_variant(tmp_path, shared, FEW), image)
    state = reference_state(shared)
    state["backbone.bottom_up.stem.conv1.weight"] = state["backbone.bottom_up.stem.conv1.weight"].flip(1)
    rgb = write_variant(tmp_path, shared, FEW + "INPUT:\n  FORMAT: RGB\nMODEL:\n"
                        "  PIXEL_MEAN: [123.675, 116.28, 103.53]\n  PIXEL_STD: [1.0, 1.0, 1.0]\n", state)
    assert_same_detections(detect(*rgb, image), expected)


def test_class_agnostic_masks_and_box_deltas(tmp_path, shared):
    """CLS_AGNOSTIC_MASK and CLS_AGNOSTIC_BBOX_REG: one mask channel and one set of deltas for every
    class give what class-specific weights with every class's rows equal to those give."""
    image = read_image(shared / MASK_MODEL / "image2.png")
    state = reference_state(shared)
    mask_w, mask_b = state["roi_heads.mask_head.predictor.weight"], state["roi_heads.mask_head.predictor.bias"]
    box_w, box_b = state["roi_heads.box_predictor.bbox_pred.weight"], state["roi_heads.box_predictor.bbox_pred.bias"]
    tied = dict(state)
    tied["roi_heads.mask_head.predictor.weight"] = mask_w[:1].expand_as(mask_w).clone()
    tied["roi_heads.mask_head.predictor.bias"] = mask_b[:1].expand_as(mask_b).clone()
    tied["roi_heads.box_predictor.bbox_pred.weight"] = box_w[:4].repeat(80, 1)
    tied["roi_heads.box_predictor.bbox_pred.bias"] = box_b[:4].repeat(80)
    (tmp_path / "tied").mkdir()
    expected = detect(*write_variant(tmp_path / "tied", shared, FEW, tied), image)
    agnostic = dict(state)
    agnostic["roi_heads.mask_head.predictor.weight"], agnostic["roi_heads.mask_head.predictor.bias"] = mask_w[:1], mask_b[:1]
    agnostic["roi_heads.box_predictor.bbox_pred.weight"] = box_w[:4]
    agnostic["roi_heads.box_predictor.bbox_pred.bias"] = box_b[:4]
    (tmp_path / "agnostic").mkdir()
    overrides = FEW + "MODEL:\n  ROI_MASK_HEAD:\n    CLS_AGNOSTIC_MASK: true\n  ROI_BOX_HEAD:\n    CLS_AGNOSTIC_BBOX_REG: true\n"
    weights, config = write_variant(tmp_path / "agnostic", shared, overrides, agnostic)
    model_config, _ = read_detectron2(weights=weights, config=config)
    assert model_config.mask_head.class_agnostic
    assert_same_detections(detect(weights, config, image), expected)


def test_resnext_without_stride_in_1x1_loads_its_widths(tmp_path, shared):
    """A ResNeXt (NUM_GROUPS 4, WIDTH_PER_GROUP 8, STRIDE_IN_1X1 false) in detectron2's names:
    groups and widths come off the weights, the strides off the config, and the backbone computes
    what the model the weights came from computes."""
    from maskrcnn.checkpoint.detectron2 import our_name
    from maskrcnn.model.backbone import ResNetFPN

    torch.manual_seed(0)
    source = ResNetFPN(depth=50, norm="frozen_bn", fpn_channels=64, stem_channels=32, res2_channels=64,
                       groups=4, width_per_group=8).eval()
    state = reference_state(shared)
    for name in [n for n in state if n.startswith("backbone.")]:  # the same names, ResNeXt shapes
        state[name] = source.state_dict()[our_name(name)[len("backbone."):]].clone()
    overrides = "MODEL:\n  RESNETS:\n    NUM_GROUPS: 4\n    WIDTH_PER_GROUP: 8\n    STRIDE_IN_1X1: false\n"
    weights, config = write_variant(tmp_path, shared, overrides, state)
    model = from_detectron2(weights, config)
    backbone = model.config.backbone
    assert (backbone.groups, backbone.width_per_group, backbone.stride_in_1x1) == (4, 8, False)
    assert model.backbone.body.layer2[0].conv2.stride == (2, 2) and model.backbone.body.layer2[0].conv1.stride == (1, 1)
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for name, expected in source(images).items():
            torch.testing.assert_close(model.backbone(images)[name], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key,value", [
    ("MODEL.RESNETS.RES5_DILATION", 2),  # DC5
    ("MODEL.BACKBONE.NAME", "build_resnet_backbone"),  # C4
    ("MODEL.ROI_HEADS.NAME", "CascadeROIHeads"),
    ("MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False, True, True, True]),
    ("MODEL.META_ARCHITECTURE", "RetinaNet"),
    ("MODEL.PROPOSAL_GENERATOR.NAME", "RRPN"),
    ("MODEL.FPN.NORM", "GN"),
    ("MODEL.ROI_MASK_HEAD.NORM", "GN"),
    ("MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIPool"),
    ("MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", True),
    ("MODEL.ANCHOR_GENERATOR.SIZES", [[32, 64], [64], [128], [256], [512]]),
    ("INPUT.FORMAT", "L"),
    ("INPUT.MIN_SIZE_TEST", 0),
])
def test_unsupported_settings_are_refused_naming_key_and_value(tmp_path, shared, key, value):
    parts = key.split(".")
    overrides = "".join(f"{'  ' * i}{part}:\n" for i, part in enumerate(parts[:-1]))
    overrides += f"{'  ' * (len(parts) - 1)}{parts[-1]}: {json.dumps(value)}\n"
    weights, config = write_variant(tmp_path, shared, overrides)
    with pytest.raises(ValueError, match="not supported") as error:
        read_detectron2(weights=weights, config=config)
    assert key in str(error.value) and repr(value) in str(error.value)


@pytest.mark.parametrize("overrides,message", [
    ("MODEL:\n  ROI_HEADS:\n    NUM_CLASSES: 5\n", "NUM_CLASSES = 5 but the weights' roi_heads.box_predictor.cls_score has 80"),
    ("MODEL:\n  MASK_ON: false\n", "MASK_ON = False but the weights have roi_heads.mask_head.predictor.weight"),
    ("MODEL:\n  RESNETS:\n    DEPTH: 101\n", "DEPTH = 101 is not supported with these weights"),
    ("MODEL:\n  RESNETS:\n    NUM_GROUPS: 32\n", "NUM_GROUPS = 32 but the weights' res2 3x3 convs have 1 groups"),
])
def test_config_that_does_not_fit_the_weights_is_refused(tmp_path, shared, overrides, message):
    weights, config = write_variant(tmp_path, shared, overrides)
    with pytest.raises(ValueError, match=re.escape(message)):
        read_detectron2(weights=weights, config=config)


def test_weights_of_parts_the_loader_does_not_build_are_refused(tmp_path, shared):
    state = reference_state(shared)
    state["roi_heads.mask_head.mask_fcn1.norm.weight"] = torch.ones(64)  # a GN mask head the config does not say
    weights, config = write_variant(tmp_path, shared, "", state)
    with pytest.raises(ValueError, match=r"1 tensors of parts this loader does not implement.*mask_fcn1\.norm"):
        read_detectron2(weights=weights, config=config)


_CALLED = []


def _payload() -> None:  # what a malicious pickle would run
    _CALLED.append(True)


class _Exploit:
    def __reduce__(self):
        return _payload, ()


def test_pickle_weights_cannot_run_code(tmp_path, shared):
    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps({"model": {"backbone.x": np.zeros(2, dtype=np.float32)}, "hook": _Exploit()}))
    with pytest.raises(ValueError, match=r"refused to load test_detectron2\._payload"):
        read_detectron2(weights=path, config=shared / MASK_MODEL / "config.yaml")
    assert _CALLED == []
    # numpy arrays in plain containers do load
    from maskrcnn.checkpoint.detectron2 import read_pickle_weights

    path.write_bytes(pickle.dumps({"model": {"a": np.arange(3.0, dtype=np.float32)}, "__author__": "zoo"}))
    assert read_pickle_weights(path)["model"]["a"].tolist() == [0.0, 1.0, 2.0]


def test_config_file_errors_name_the_file(tmp_path, shared):
    weights = shared / MASK_MODEL / MODELS[MASK_MODEL][0]
    missing = tmp_path / "child.yaml"
    missing.write_text("_BASE_: ../nowhere/Base-RCNN-FPN.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"nowhere/Base-RCNN-FPN.yaml \(the _BASE_ of .*child.yaml\)"):
        read_detectron2(weights=weights, config=missing)
    url = tmp_path / "url.yaml"
    url.write_text("_BASE_: https://example.com/Base-RCNN-FPN.yaml\n")
    with pytest.raises(ValueError, match="is a URL"):
        read_detectron2(weights=weights, config=url)
    loop = tmp_path / "loop.yaml"
    loop.write_text("_BASE_: loop.yaml\n")
    with pytest.raises(ValueError, match="loops back"):
        read_detectron2(weights=weights, config=loop)


def test_convert_writes_a_checkpoint_with_coco_names(tmp_path, shared, capsys):
    """`maskrcnn convert --config`: the checkpoint rebuilds the same model, and an 80-class COCO model
    carries COCO's 80 categories (label k = the k-th category by ascending id, as detectron2 numbers them)."""
    from maskrcnn.checkpoint import load_checkpoint
    from maskrcnn.cli import main

    folder = shared / MASK_MODEL
    destination = tmp_path / "converted.pth"
    assert main(["convert", str(folder / "model_final.pkl"), str(destination), "--config", str(folder / "config.yaml")]) == 0
    assert "80 COCO categories" in capsys.readouterr().out
    converted, original = load_checkpoint(destination), from_detectron2(folder / "model_final.pkl", folder / "config.yaml")
    assert converted.label_space[0] == {"label": 1, "id": 1, "name": "person"}
    assert converted.label_space[-1] == {"label": 80, "id": 90, "name": "toothbrush"}
    assert dataclasses.asdict(converted.config) == dataclasses.asdict(original.config)
    for name, tensor in original.state_dict().items():
        assert torch.equal(converted.state_dict()[name], tensor), name
    keypoints = shared / "keypoint_rcnn_R_50_FPN"
    assert from_detectron2(keypoints / "model_final.pth", keypoints / "config.yaml").label_space == [
        {"label": 1, "id": 1, "name": "person"}]
    # a model-zoo .pkl without its config is refused in one line
    assert main(["convert", str(folder / "model_final.pkl"), str(tmp_path / "x.pth")]) == 2
    assert "needs its config: --config" in capsys.readouterr().err


def test_label_table_only_for_models_trained_on_coco():
    from maskrcnn.checkpoint.detectron2 import detectron2_labels
    from maskrcnn.checkpoint.detectron2_config import resolved_config
    from maskrcnn.config import ModelConfig

    coco = resolved_config({"DATASETS": {"TRAIN": "('coco_2017_train',)"}})  # a zoo file's tuple
    assert len(detectron2_labels(coco, ModelConfig(num_classes=80))) == 80
    assert detectron2_labels(resolved_config({"DATASETS": {"TRAIN": ["widgets_train"]}}), ModelConfig(num_classes=80)) is None
    assert detectron2_labels(coco, ModelConfig(num_classes=3)) is None


def test_conv_box_head_with_one_fc_loads_in_place(tmp_path, shared):
    """ROI_BOX_HEAD NUM_CONV 2, NUM_FC 1 (convs with bias, no norm): every detectron2 tensor lands
    in its place in our box head."""
    from maskrcnn.checkpoint.detectron2 import our_name

    g = torch.Generator().manual_seed(0)
    state = reference_state(shared)
    del state["roi_heads.box_head.fc2.weight"], state["roi_heads.box_head.fc2.bias"]
    extra = {"roi_heads.box_head.conv1.weight": torch.randn(32, 64, 3, 3, generator=g),
             "roi_heads.box_head.conv1.bias": torch.randn(32, generator=g),
             "roi_heads.box_head.conv2.weight": torch.randn(32, 32, 3, 3, generator=g),
             "roi_heads.box_head.conv2.bias": torch.randn(32, generator=g),
             "roi_heads.box_head.fc1.weight": torch.randn(128, 32 * 7 * 7, generator=g)}
    state.update(extra)
    overrides = "MODEL:\n  ROI_BOX_HEAD:\n    NUM_CONV: 2\n    CONV_DIM: 32\n    NUM_FC: 1\n"
    model = from_detectron2(*write_variant(tmp_path, shared, overrides, state))
    assert (model.config.box_head.num_convs, model.config.box_head.conv_dim, model.config.box_head.num_fcs) == (2, 32, 1)
    ours = model.state_dict()
    for name, tensor in extra.items():
        assert torch.equal(ours[our_name(name)], tensor), name
