"""Keypoint head layers, targets, loss and decoding against torchvision's own code."""

from __future__ import annotations

import torch
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.models.detection.roi_heads import heatmaps_to_keypoints as tv_heatmaps_to_keypoints
from torchvision.models.detection.roi_heads import keypointrcnn_loss, keypoints_to_heatmap

from maskrcnn.model.keypoint_head import KeypointHead, heatmaps_to_keypoints, keypoint_loss, keypoint_targets


def _rois(n: int, generator: torch.Generator, max_side: float = 30) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * 50
    wh = torch.rand(n, 2, generator=generator) * max_side + 0.5
    return torch.cat([xy, xy + wh], dim=1)


def _keypoints_in(rois: torch.Tensor, num_keypoints: int, generator: torch.Generator) -> torch.Tensor:
    """Keypoints mostly inside their RoI, some outside, some exactly on the far edges, some unlabelled."""
    n = len(rois)
    frac = torch.rand(n, num_keypoints, 2, generator=generator) * 1.4 - 0.2
    xy = rois[:, None, :2] + frac * (rois[:, None, 2:] - rois[:, None, :2])
    xy[:, 0] = rois[:, None, 2:].squeeze(1)  # on the right / bottom edge
    visibility = torch.randint(0, 3, (n, num_keypoints), generator=generator).float()
    return torch.cat([xy, visibility[..., None]], dim=-1)


def test_layers_equal_torchvision_with_the_same_weights():
    torch.manual_seed(0)
    ours = KeypointHead(in_channels=8, num_keypoints=5, conv_dim=16, num_convs=8)
    tv_head = KeypointRCNNHeads(8, [16] * 8)
    tv_predictor = KeypointRCNNPredictor(16, 5)
    state = ours.state_dict()
    # The module docstring's mapping: convs.{i} -> {2 i}, deconv -> kps_score_lowres.
    tv_head.load_state_dict(
        {f"{2 * int(k.split('.')[1])}.{k.split('.')[2]}": v for k, v in state.items() if k.startswith("convs.")}
    )
    tv_predictor.load_state_dict(
        {k.replace("deconv", "kps_score_lowres"): v for k, v in state.items() if "deconv" in k}
    )
    features = torch.randn(3, 8, 14, 14)
    heatmaps = ours(features)
    assert heatmaps.shape == (3, 5, 56, 56)
    torch.testing.assert_close(heatmaps, tv_predictor(tv_head(features)))


def test_targets_equal_torchvision():
    g = torch.Generator().manual_seed(1)
    rois = _rois(20, g)
    keypoints = _keypoints_in(rois, 7, g)
    targets, valid = keypoint_targets(keypoints, rois, 56)
    tv_targets, tv_valid = keypoints_to_heatmap(keypoints, rois, 56)
    assert torch.equal(valid, tv_valid.bool())
    assert torch.equal(targets[valid], tv_targets[valid])
    assert 0 < valid.sum() < valid.numel()  # the test data has both kinds


def test_loss_equals_torchvision():
    g = torch.Generator().manual_seed(2)
    rois = [_rois(6, g), _rois(4, g)]
    gt_keypoints = [_keypoints_in(_rois(3, g), 5, g), _keypoints_in(_rois(2, g), 5, g)]
    matched = [torch.randint(0, 3, (6,), generator=g), torch.randint(0, 2, (4,), generator=g)]
    # Put the matched instances' keypoints into the RoIs so most of them count.
    for r, kp, m in zip(rois, gt_keypoints, matched):
        kp[m[:len(kp)], :, :2] = _keypoints_in(r, 5, g)[: len(kp), :, :2]
    logits = torch.randn(10, 5, 56, 56, generator=g, requires_grad=True)

    per_image = [keypoint_targets(kp[m], r, 56) for kp, m, r in zip(gt_keypoints, matched, rois)]
    targets = torch.cat([t for t, _ in per_image])
    valid = torch.cat([v for _, v in per_image])
    ours = keypoint_loss(logits, targets, valid)
    theirs = keypointrcnn_loss(logits, rois, gt_keypoints, matched)
    torch.testing.assert_close(ours, theirs)
    assert valid.any()


def test_invisible_and_outside_keypoints_add_nothing():
    g = torch.Generator().manual_seed(3)
    rois = torch.tensor([[10.0, 10, 30, 30]])
    keypoints = torch.tensor([[[15.0, 15, 2], [20.0, 25, 0], [50.0, 12, 2]]])  # visible, unlabelled, outside
    targets, valid = keypoint_targets(keypoints, rois, 56)
    assert valid.tolist() == [[True, False, False]]
    logits = torch.randn(1, 3, 56, 56, generator=g)
    changed = logits.clone()
    changed[0, 1:] = torch.randn(2, 56, 56, generator=g)  # only the ignored keypoints' logits change
    torch.testing.assert_close(keypoint_loss(logits, targets, valid), keypoint_loss(changed, targets, valid))
    expected = torch.nn.functional.cross_entropy(logits[0, :1].flatten(1), targets[0, :1])
    torch.testing.assert_close(keypoint_loss(logits, targets, valid), expected)


def test_all_invisible_gives_zero_connected_loss():
    rois = torch.tensor([[0.0, 0, 20, 20], [5.0, 5, 9, 9]])
    keypoints = torch.rand(2, 4, 3) * 10
    keypoints[..., 2] = 0
    targets, valid = keypoint_targets(keypoints, rois, 56)
    logits = torch.randn(2, 4, 56, 56, requires_grad=True)
    loss = keypoint_loss(logits, targets, valid)
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert torch.all(logits.grad == 0)

    empty = torch.zeros(0, 4, 56, 56, requires_grad=True)
    targets, valid = keypoint_targets(torch.zeros(0, 4, 3), torch.zeros(0, 4), 56)
    assert keypoint_loss(empty, targets, valid).item() == 0


def test_heatmaps_to_keypoints_equals_torchvision():
    g = torch.Generator().manual_seed(4)
    rois = torch.cat([_rois(9, g, max_side=60), torch.tensor([[3.0, 4.0, 3.5, 4.2], [0.0, 0.0, 70.0, 12.0]])])
    # Smooth peaked heatmaps (like a trained head's), plus noise so that the argmax is unique.
    centres = torch.rand(len(rois), 4, 2, generator=g) * 56
    grid = torch.arange(56.0)
    peaks = -((grid[None, None, None, :] - centres[..., 0, None, None]) ** 2) / 30 - (
        (grid[None, None, :, None] - centres[..., 1, None, None]) ** 2
    ) / 30
    heatmaps = peaks + torch.randn(len(rois), 4, 56, 56, generator=g) * 0.3
    keypoints, scores = heatmaps_to_keypoints(heatmaps, rois)
    tv_keypoints, tv_scores = tv_heatmaps_to_keypoints(heatmaps, rois)
    assert keypoints.shape == (11, 4, 3) and scores.shape == (11, 4)
    torch.testing.assert_close(keypoints, tv_keypoints)
    torch.testing.assert_close(scores, tv_scores)


def test_heatmaps_to_keypoints_empty():
    keypoints, scores = heatmaps_to_keypoints(torch.zeros(0, 17, 56, 56), torch.zeros(0, 4))
    assert keypoints.shape == (0, 17, 3) and scores.shape == (0, 17)


def test_detectron2_keypoint_scores_follow_its_formula():
    """detectron2's score of a keypoint: the resized heatmap's maximum, exp(max - max) = 1, over the
    sum of exp(heatmap - max) across the S x S cells of the unresized heatmap; written per RoI
    with F.interpolate here, as detectron2 does. Positions are torchvision's."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(5)
    rois = _rois(6, g)
    heatmaps = torch.randn(6, 3, 14, 14, generator=g) * 2
    keypoints, scores = heatmaps_to_keypoints(heatmaps, rois, decoding="detectron2")
    tv_keypoints, _ = tv_heatmaps_to_keypoints(heatmaps, rois)
    torch.testing.assert_close(keypoints[..., :2], tv_keypoints[..., :2])
    for i, roi in enumerate(rois):
        width, height = (roi[2] - roi[0]).clamp(min=1), (roi[3] - roi[1]).clamp(min=1)
        resized = F.interpolate(heatmaps[i : i + 1], size=(int(height.ceil()), int(width.ceil())), mode="bicubic",
                                align_corners=False)[0]
        maximum = resized.flatten(1).max(dim=1).values
        expected = 1 / (heatmaps[i] - maximum[:, None, None]).exp().sum(dim=(1, 2))
        torch.testing.assert_close(scores[i], expected, rtol=1e-5, atol=1e-7)
