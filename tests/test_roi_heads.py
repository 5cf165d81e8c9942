"""RoIHeads as a whole against torchvision's RoIHeads with the same weights, features, proposals
and seed; the Birodkar et al. / Cheng et al. training options; empty cases."""

from __future__ import annotations

import re

import pytest
import torch
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads as TvRoIHeads
from torchvision.ops import MultiScaleRoIAlign, box_iou

from maskrcnn.config import ModelConfig
from maskrcnn.model.mask_head import jitter_boxes, mask_loss, mask_targets
from maskrcnn.model.point_supervision import outside_box_loss
from maskrcnn.model.roi_heads import MultiLevelRoIAlign, build_roi_heads

CHANNELS, NUM_CLASSES, NUM_KEYPOINTS, WIDTH = 8, 3, 4, 8
IMAGE_SIZES = [(128, 120), (100, 128)]  # padded batch: 128 x 128


def _config(*, masks: bool = True, keypoints: bool = True, **mask_options) -> ModelConfig:
    config = ModelConfig(num_classes=NUM_CLASSES)
    config.box_head.fc_dim = 32
    config.box_head.batch_size_per_image = 64
    config.mask_head.enabled, config.mask_head.num_convs, config.mask_head.conv_dim = masks, 2, WIDTH
    for key, value in mask_options.items():
        setattr(config.mask_head, key, value)
    config.keypoint_head.enabled, config.keypoint_head.num_keypoints = keypoints, NUM_KEYPOINTS
    config.keypoint_head.num_convs, config.keypoint_head.conv_dim = 2, WIDTH
    return config


def _torchvision_heads(ours) -> TvRoIHeads:
    """torchvision's RoIHeads with our weights, renamed as the head modules' docstrings say."""
    pool = lambda size: MultiScaleRoIAlign(["0", "1", "2", "3"], size, 2)  # noqa: E731
    theirs = TvRoIHeads(
        pool(7), TwoMLPHead(CHANNELS * 49, 32), FastRCNNPredictor(32, NUM_CLASSES + 1),
        0.5, 0.5, 64, 0.25, (10.0, 10.0, 5.0, 5.0), 0.05, 0.5, 100,
        mask_roi_pool=pool(14), mask_head=MaskRCNNHeads(CHANNELS, [WIDTH] * 2, 1),
        mask_predictor=MaskRCNNPredictor(WIDTH, WIDTH, NUM_CLASSES + 1),
        keypoint_roi_pool=pool(14), keypoint_head=KeypointRCNNHeads(CHANNELS, [WIDTH] * 2),
        keypoint_predictor=KeypointRCNNPredictor(WIDTH, NUM_KEYPOINTS),
    )
    renamed = {}
    for key, value in ours.state_dict().items():
        key = re.sub(r"^mask_head\.convs\.(\d+)\.", r"mask_head.\1.", key)
        key = key.replace("mask_head.deconv.", "mask_predictor.conv5_mask.")
        key = key.replace("mask_head.predictor.", "mask_predictor.mask_fcn_logits.")
        key = re.sub(r"^keypoint_head\.convs\.(\d+)\.", lambda m: f"keypoint_head.{2 * int(m[1])}.", key)
        key = key.replace("keypoint_head.deconv.", "keypoint_predictor.kps_score_lowres.")
        renamed[key] = value
    theirs.load_state_dict(renamed)  # strict: every name maps
    return theirs


def _inputs(seed: int = 0, num_instances: tuple[int, ...] = (3, 2)):
    g = torch.Generator().manual_seed(seed)
    features = {name: torch.randn(2, CHANNELS, 128 // s, 128 // s, generator=g)
                for name, s in zip(["0", "1", "2", "3", "pool"], [4, 8, 16, 32, 64])}
    proposals, targets = [], []
    for (height, width), n in zip(IMAGE_SIZES, num_instances):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([width * 0.6, height * 0.6])
        wh = torch.rand(n, 2, generator=g) * 40 + 12
        boxes = torch.cat([xy, xy + wh], dim=1)
        masks = torch.zeros(n, height, width, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.round().int().tolist()):  # test data, not model code
            masks[i, y1 + 2 : y2 - 2, x1 + 1 : x2 - 3] = 1
        keypoints = torch.cat([boxes[:, None, :2] + torch.rand(n, NUM_KEYPOINTS, 2, generator=g) * wh[:, None],
                               torch.randint(0, 3, (n, NUM_KEYPOINTS, 1), generator=g).float()], dim=-1)
        targets.append({"boxes": boxes, "labels": torch.randint(1, NUM_CLASSES + 1, (n,), generator=g),
                        "masks": masks, "keypoints": keypoints})
        # Proposals: jittered copies of the gt boxes (positives) and random boxes (mostly negatives).
        near = boxes.repeat(6, 1) + torch.randn(6 * n, 4, generator=g) * 3
        far_xy = torch.rand(40, 2, generator=g) * torch.tensor([width - 20.0, height - 20.0])
        far = torch.cat([far_xy, far_xy + torch.rand(40, 2, generator=g) * 60 + 4], dim=1)
        proposals.append(torch.cat([near, far]).clamp(min=0))
    return features, proposals, targets


def test_multilevel_roi_align_equals_torchvision():
    features, proposals, _ = _inputs()
    proposals[0] = torch.cat([proposals[0], torch.tensor([[0.0, 0, 127, 120], [5.0, 5, 6, 6]])])  # P5 and P2
    ours = MultiLevelRoIAlign(output_size=7, sampling_ratio=2, aligned=False)(features, proposals, IMAGE_SIZES)
    theirs = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)(features, proposals, IMAGE_SIZES)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("canonical,level,scale", [(224.0, "0", 1 / 4), (56.0, "2", 1 / 16), (14.0, "3", 1 / 32)])
def test_canonical_box_size_picks_the_fpn_level(canonical, level, scale):
    from torchvision.ops import roi_align

    features, _, _ = _inputs()
    box = torch.tensor([[20.0, 30.0, 76.0, 86.0]])  # 56 x 56: P2 at 224, P4 at 56, P5 (clamped) at 14
    pooler = MultiLevelRoIAlign(output_size=7, sampling_ratio=2, aligned=True, canonical_box_size=canonical)
    pooled = pooler(features, [box, torch.zeros(0, 4)], IMAGE_SIZES)
    expected = roi_align(features[level], [box], 7, spatial_scale=scale, sampling_ratio=2, aligned=True)
    torch.testing.assert_close(pooled, expected)


def test_training_losses_equal_torchvision():
    torch.manual_seed(0)
    ours = build_roi_heads(_config(), in_channels=CHANNELS).train()
    theirs = _torchvision_heads(ours).train()
    features, proposals, targets = _inputs()
    torch.manual_seed(1)
    _, our_losses = ours(features, proposals, IMAGE_SIZES, targets)
    torch.manual_seed(1)  # the same seed samples the same RoIs
    _, their_losses = theirs(features, proposals, IMAGE_SIZES, targets)
    assert set(our_losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_keypoint"}
    for name, value in their_losses.items():
        torch.testing.assert_close(our_losses[name], value, msg=name)
        assert value > 0, name


@pytest.mark.parametrize("head, loss", [("keypoint_head", "loss_keypoint"), ("mask_head", "loss_mask")])
def test_loss_weight_scales_only_its_own_loss(head, loss):
    features, proposals, targets = _inputs()
    config = _config()
    torch.manual_seed(0)
    plain = build_roi_heads(config, in_channels=CHANNELS).train()
    getattr(config, head).loss_weight = 0.25
    weighted = build_roi_heads(config, in_channels=CHANNELS).train()
    weighted.load_state_dict(plain.state_dict())
    torch.manual_seed(1)
    _, expected = plain(features, proposals, IMAGE_SIZES, targets)
    torch.manual_seed(1)
    _, losses = weighted(features, proposals, IMAGE_SIZES, targets)
    torch.testing.assert_close(losses.pop(loss), 0.25 * expected.pop(loss))
    torch.testing.assert_close(losses, expected)


@pytest.mark.parametrize("share", [0.25, 0.0])
def test_feature_gradient_scales_what_the_mask_loss_passes_to_the_features(share):
    """The mask loss and the mask head's gradients stay; the features' gradient from the mask loss
    is `share` times the plain one (none at 0)."""
    features, proposals, targets = _inputs()
    config = _config()
    torch.manual_seed(0)
    plain = build_roi_heads(config, in_channels=CHANNELS).train()
    config.mask_head.feature_gradient = share
    scaled = build_roi_heads(config, in_channels=CHANNELS).train()
    scaled.load_state_dict(plain.state_dict())

    def mask_gradients(heads):
        inputs = {name: f.detach().requires_grad_(True) for name, f in features.items()}
        torch.manual_seed(1)
        _, losses = heads(inputs, proposals, IMAGE_SIZES, targets)
        losses["loss_mask"].backward()
        head = {name: p.grad for name, p in heads.mask_head.named_parameters()}
        return losses["loss_mask"], head, {name: f.grad for name, f in inputs.items()}

    expected_loss, expected_head, expected_features = mask_gradients(plain)
    loss, head, feature_grads = mask_gradients(scaled)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(head, expected_head)
    reached = {name: grad for name, grad in expected_features.items() if grad is not None}  # the pooled levels
    assert any(grad.abs().sum() > 0 for grad in reached.values())
    for name, grad in reached.items():
        torch.testing.assert_close(feature_grads[name], share * grad, msg=name)


def test_detections_equal_torchvision():
    torch.manual_seed(0)
    ours = build_roi_heads(_config(), in_channels=CHANNELS).eval()
    theirs = _torchvision_heads(ours).eval()
    features, proposals, _ = _inputs(seed=3)
    with torch.no_grad():
        our_detections, losses = ours(features, proposals, IMAGE_SIZES)
        their_detections, _ = theirs(features, proposals, IMAGE_SIZES)
    assert losses == {}
    assert all(len(d["boxes"]) > 5 for d in their_detections)
    for mine, reference in zip(our_detections, their_detections):
        assert set(mine) == set(reference)
        assert torch.equal(mine["labels"], reference["labels"])
        for key in ("boxes", "scores", "masks", "keypoints", "keypoints_scores"):
            torch.testing.assert_close(mine[key], reference[key], msg=key)


def test_image_without_objects_trains_with_zero_connected_head_losses():
    torch.manual_seed(0)
    heads = build_roi_heads(_config(), in_channels=CHANNELS).train()
    features, proposals, targets = _inputs(num_instances=(0, 0))
    _, losses = heads(features, proposals, IMAGE_SIZES, targets)
    assert losses["loss_classifier"] > 0
    for name in ("loss_box_reg", "loss_mask", "loss_keypoint"):
        assert losses[name].item() == 0 and losses[name].requires_grad, name
    sum(losses.values()).backward()
    assert heads.mask_head.predictor.weight.grad is not None
    assert heads.keypoint_head.deconv.weight.grad is not None


def test_no_proposals_and_no_objects():
    heads = build_roi_heads(_config(), in_channels=CHANNELS).train()
    features, _, targets = _inputs(num_instances=(0, 0))
    _, losses = heads(features, [torch.zeros(0, 4)] * 2, IMAGE_SIZES, targets)
    assert all(v.item() == 0 and v.requires_grad for v in losses.values())
    heads.eval()
    with torch.no_grad():
        detections, _ = heads(features, [torch.zeros(0, 4)] * 2, IMAGE_SIZES)
    for d in detections:
        assert d["boxes"].shape == (0, 4) and d["labels"].shape == (0,) and d["scores"].shape == (0,)
        assert d["masks"].shape == (0, 1, 28, 28)
        assert d["keypoints"].shape == (0, NUM_KEYPOINTS, 3) and d["keypoints_scores"].shape == (0, NUM_KEYPOINTS)


def test_crowd_regions_are_never_background():
    heads = build_roi_heads(_config(masks=False, keypoints=False), in_channels=CHANNELS).train()
    _, proposals, targets = _inputs()
    crowd = torch.tensor([[0.0, 0, 60, 60]])
    inside = torch.tensor([[5.0, 5, 25, 25], [30.0, 30, 55, 58]])
    targets[0] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "crowd_boxes": crowd}
    proposals[0] = torch.cat([inside, torch.tensor([[70.0, 70, 100, 100]])])
    samples = heads.sample_proposals(proposals, targets)
    # Only the proposal outside the crowd is sampled (as background).
    assert torch.equal(samples.boxes[0], torch.tensor([[70.0, 70, 100, 100]]))
    assert samples.labels[0].tolist() == [0]


def _mask_loss_on(heads, features, boxes, matched, labels, targets):
    logits = heads.mask_head(heads.mask_pooler(features, boxes, IMAGE_SIZES))
    per_image = [mask_targets(t["masks"], b, m, 28) for t, b, m in zip(targets, boxes, matched)]
    return mask_loss(logits, torch.cat(per_image), torch.cat(labels))


def test_mask_head_trains_on_ground_truth_boxes():
    torch.manual_seed(0)
    heads = build_roi_heads(_config(keypoints=False, train_on="gt_boxes"), in_channels=CHANNELS).train()
    features, proposals, targets = _inputs()
    _, losses = heads(features, proposals, IMAGE_SIZES, targets)
    expected = _mask_loss_on(
        heads, features, [t["boxes"] for t in targets], [torch.arange(len(t["boxes"])) for t in targets],
        [t["labels"] for t in targets], targets,
    )
    torch.testing.assert_close(losses["loss_mask"], expected)

    jittered = jitter_boxes(targets[0]["boxes"], image_size=IMAGE_SIZES[0], fraction=0.1)
    assert not torch.equal(jittered, targets[0]["boxes"])
    assert torch.all(jittered[:, 2:] >= jittered[:, :2] + 1)
    assert (jittered - targets[0]["boxes"]).abs().max() <= 0.1 * 52 + 1e-4  # boxes are at most 52 px


def test_jittered_copies_of_ground_truth_boxes_train_the_mask_head(monkeypatch):
    """`gt_box_copies=3`: every GT box three times, instance after instance, each copy jittered on its own."""
    import maskrcnn.model.mask_head as mask_head_module

    jittered = []
    def recording_jitter(boxes, **options):
        jittered.append((boxes, jitter_boxes(boxes, **options)))
        return jittered[-1][1]

    monkeypatch.setattr(mask_head_module, "jitter_boxes", recording_jitter)
    torch.manual_seed(0)
    heads = build_roi_heads(_config(keypoints=False, train_on="gt_boxes", gt_box_jitter=0.1, gt_box_copies=3),
                            in_channels=CHANNELS).train()
    features, proposals, targets = _inputs()
    _, losses = heads(features, proposals, IMAGE_SIZES, targets)
    instances = [torch.arange(len(t["boxes"])).repeat_interleave(3) for t in targets]
    for (given, out), target, instance in zip(jittered, targets, instances):
        torch.testing.assert_close(given, target["boxes"][instance])
        copies = out.reshape(len(target["boxes"]), 3, 4)
        assert not torch.equal(copies[:, 0], copies[:, 1])  # each copy drawn on its own
    expected = _mask_loss_on(heads, features, [out for _, out in jittered], instances,
                             [t["labels"][i] for t, i in zip(targets, instances)], targets)
    torch.testing.assert_close(losses["loss_mask"], expected)


@pytest.mark.parametrize("options", [{"gt_box_jitter": 0.0}, {"train_on": "proposals", "gt_box_jitter": 0.1}])
def test_copies_of_ground_truth_boxes_need_jittered_ground_truth_boxes(options):
    options = {"train_on": "gt_boxes", "gt_box_copies": 2, **options}
    with pytest.raises(ValueError, match="gt_box_copies=2 needs train_on='gt_boxes' and gt_box_jitter > 0"):
        build_roi_heads(_config(keypoints=False, **options), in_channels=CHANNELS)


@pytest.mark.parametrize("restriction", ["mask_classes", "has_mask"])
def test_only_instances_with_masks_of_chosen_classes_train_the_mask_head(restriction):
    torch.manual_seed(0)
    features, proposals, targets = _inputs()
    if restriction == "mask_classes":
        heads = build_roi_heads(_config(keypoints=False, train_on="gt_boxes", mask_classes=[2]), in_channels=CHANNELS)
        chosen = [t["labels"] == 2 for t in targets]
    else:
        heads = build_roi_heads(_config(keypoints=False, train_on="gt_boxes"), in_channels=CHANNELS)
        for t in targets:
            t["has_mask"] = torch.arange(len(t["boxes"])) % 2 == 0
        chosen = [t["has_mask"] for t in targets]
    heads.train()
    _, losses = heads(features, proposals, IMAGE_SIZES, targets)
    expected = _mask_loss_on(
        heads, features, [t["boxes"][c] for t, c in zip(targets, chosen)], [torch.where(c)[0] for c in chosen],
        [t["labels"][c] for t, c in zip(targets, chosen)], targets,
    )
    torch.testing.assert_close(losses["loss_mask"], expected)

    # No chosen instance at all: zero mask loss, connected, and no gradient reaches the mask head.
    for t in targets:
        t["has_mask"] = torch.zeros(len(t["boxes"]), dtype=torch.bool)
    _, losses = heads(features, proposals, IMAGE_SIZES, targets)
    assert losses["loss_mask"].item() == 0 and losses["loss_mask"].requires_grad
    losses["loss_mask"].backward()
    assert all(p.grad is None or torch.all(p.grad == 0) for p in heads.mask_head.parameters())


@pytest.mark.parametrize("average", ["valid_points", "all_points"])
def test_point_supervision_uses_point_mask_loss(average):
    from maskrcnn.model.point_supervision import point_mask_loss

    torch.manual_seed(0)
    heads = build_roi_heads(
        _config(keypoints=False, train_on="gt_boxes", point_supervision=True, point_loss_average=average),
        in_channels=CHANNELS,
    ).train()
    features, proposals, targets = _inputs()
    g = torch.Generator().manual_seed(5)
    for t in targets:
        del t["masks"]  # points replace masks
        n = len(t["boxes"])
        t["point_coords"] = t["boxes"][:, None, :2] + torch.rand(n, 6, 2, generator=g) * 30
        t["point_labels"] = torch.randint(-1, 2, (n, 6), generator=g).float()
    _, losses = heads(features, proposals, IMAGE_SIZES, targets)
    boxes = [t["boxes"] for t in targets]
    logits = heads.mask_head(heads.mask_pooler(features, boxes, IMAGE_SIZES))
    arguments = (logits, torch.cat(boxes), torch.cat([t["point_coords"] for t in targets]),
                 torch.cat([t["point_labels"] for t in targets]), torch.cat([t["labels"] for t in targets]))
    expected = point_mask_loss(*arguments, average=average)
    torch.testing.assert_close(losses["loss_mask"], expected)
    assert expected > 0
    # Some points lie outside their (30 px or smaller) boxes, so the two averages differ.
    other = "all_points" if average == "valid_points" else "valid_points"
    assert not torch.allclose(expected, point_mask_loss(*arguments, average=other))


def test_point_subset_each_iteration():
    from maskrcnn.model.point_supervision import point_mask_loss, sample_point_subset

    heads = build_roi_heads(
        _config(keypoints=False, train_on="gt_boxes", point_supervision=True, points_per_instance=2),
        in_channels=CHANNELS,
    ).train()
    features, proposals, targets = _inputs()
    for t in targets:
        n = len(t["boxes"])
        t["point_coords"] = t["boxes"][:, None, :2] + torch.rand(n, 8, 2) * 30
        t["point_labels"] = torch.randint(0, 2, (n, 8)).float()
    torch.manual_seed(7)
    _, losses = heads(features, proposals, IMAGE_SIZES, targets)
    torch.manual_seed(7)  # the same draws: first the sampler's, then one subset per image
    heads.sample_proposals(proposals, targets)
    subsets = [sample_point_subset(t["point_labels"], 2) for t in targets]
    assert all(((s >= 0).sum(dim=1) == 2).all() for s in subsets)
    boxes = [t["boxes"] for t in targets]
    logits = heads.mask_head(heads.mask_pooler(features, boxes, IMAGE_SIZES))
    expected = point_mask_loss(
        logits, torch.cat(boxes), torch.cat([t["point_coords"] for t in targets]), torch.cat(subsets),
        torch.cat([t["labels"] for t in targets]),
    )
    torch.testing.assert_close(losses["loss_mask"], expected)


def test_point_supervision_with_different_point_counts_per_image():
    """One image with 6 points per object, the other without objects ([0, 0, 2]): the batch pads."""
    from maskrcnn.model.point_supervision import point_mask_loss

    torch.manual_seed(0)
    heads = build_roi_heads(
        _config(keypoints=False, train_on="gt_boxes", point_supervision=True), in_channels=CHANNELS
    ).train()
    features, proposals, targets = _inputs()
    first, second = targets[0], targets[1]
    del first["masks"], second["masks"]
    n = len(first["boxes"])
    first["point_coords"] = first["boxes"][:, None, :2] + torch.rand(n, 6, 2) * 30
    first["point_labels"] = torch.randint(0, 2, (n, 6)).float()
    second["boxes"], second["labels"] = second["boxes"][:0], second["labels"][:0]
    second["point_coords"], second["point_labels"] = torch.zeros(0, 0, 2), torch.zeros(0, 0)
    _, losses = heads(features, proposals, IMAGE_SIZES, targets)
    logits = heads.mask_head(heads.mask_pooler(features, [first["boxes"]], IMAGE_SIZES[:1]))
    expected = point_mask_loss(logits, first["boxes"], first["point_coords"], first["point_labels"], first["labels"])
    torch.testing.assert_close(losses["loss_mask"], expected)


def test_detectron2_level_assignment_at_a_level_boundary():
    """A box a hair under 112 px (sqrt area): detectron2's floor(4 + log2(s / 224 + eps)) puts it
    on P2 (level 3 - 1); torchvision's floor(4 + log2(s / 224) + 1e-6) rounds it up to P3."""
    from maskrcnn.model.roi_heads import MultiLevelRoIAlign

    side = 111.99998  # sqrt(area) / 224 is 2e-7 under 0.5
    boxes = [torch.tensor([[0.0, 0.0, side, side]])]
    # P2..P5 of a 1024-px image (strides 4..32), map i filled with the value i: the pooled value names the level
    features = {name: torch.full((1, 1, 256 // 2**i, 256 // 2**i), float(i)) for i, name in enumerate("0123")}
    for assignment, level in (("detectron2", 0), ("torchvision", 1)):
        pooler = MultiLevelRoIAlign(output_size=2, sampling_ratio=2, aligned=True, level_assignment=assignment)
        assert pooler(features, boxes, [(1024, 1024)]).unique().tolist() == [float(level)], assignment


def _with_points(targets, num_points: int = 10, seed: int = 5):
    """Each instance gets `num_points` points drawn in its box, labelled from its mask."""
    g = torch.Generator().manual_seed(seed)
    for t in targets:
        boxes = t["boxes"]
        coords = boxes[:, None, :2] + torch.rand(len(boxes), num_points, 2, generator=g) * (boxes[:, None, 2:] - boxes[:, None, :2])
        rows, columns = coords[..., 1].long(), coords[..., 0].long()
        t["point_coords"] = coords
        t["point_labels"] = t["masks"][torch.arange(len(boxes))[:, None], rows, columns].float()
    return targets


def test_outside_box_weight_adds_the_weighted_outside_box_loss(monkeypatch):
    """loss_mask = point loss + w * outside_box_loss, on the instances' own boxes; on GT-box RoIs
    (train_on=gt_boxes) no cell is outside and the term is exactly 0."""
    import maskrcnn.model.roi_heads as roi_heads_module

    calls = []
    def recording(mask_logits, rois, instance_boxes, labels):
        calls.append((rois, instance_boxes, outside_box_loss(mask_logits, rois, instance_boxes, labels)))
        return calls[-1][2]

    monkeypatch.setattr(roi_heads_module, "outside_box_loss", recording)
    features, proposals, targets = _inputs()
    targets = _with_points(targets)
    for train_on in ("proposals", "gt_boxes"):
        losses = {}
        for weight in (0.0, 0.5):
            torch.manual_seed(0)
            heads = build_roi_heads(_config(keypoints=False, point_supervision=True, outside_box_weight=weight,
                                            train_on=train_on), in_channels=CHANNELS).train()
            torch.manual_seed(1)
            losses[weight] = heads(features, proposals, IMAGE_SIZES, targets)[1]["loss_mask"]
        rois, instance_boxes, outside = calls.pop()
        assert not calls
        torch.testing.assert_close(losses[0.5], losses[0.0] + 0.5 * outside)
        all_boxes = torch.cat([t["boxes"] for t in targets])
        assert all(bool((box == all_boxes).all(dim=1).any()) for box in instance_boxes)
        if train_on == "gt_boxes":
            torch.testing.assert_close(rois, instance_boxes)
            assert outside.item() == 0.0
        else:
            assert outside.item() > 0 and box_iou(rois, instance_boxes).diagonal().min() >= 0.5


def test_outside_box_weight_needs_point_supervision():
    with pytest.raises(ValueError, match="outside_box_weight=0.5 needs point_supervision=true"):
        build_roi_heads(_config(keypoints=False, outside_box_weight=0.5), in_channels=CHANNELS)
