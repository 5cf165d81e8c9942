"""RPN against torchvision's RegionProposalNetwork / AnchorGenerator with the same weights."""

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TvAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork as TvRPN
from torchvision.models.detection.rpn import RPNHead as TvRPNHead

from maskrcnn.model.rpn import AnchorGenerator, RegionProposalNetwork
from maskrcnn.model.transform import ImageBatch

SIZES, RATIOS = [32, 64, 128, 256, 512], [0.5, 1.0, 2.0]
CHANNELS = 8
SETTINGS = dict(pre_nms_top_n_train=300, pre_nms_top_n_test=150, post_nms_top_n_train=200, post_nms_top_n_test=100,
                nms_thresh=0.7, score_thresh=0.0, fg_iou_thresh=0.7, bg_iou_thresh=0.3,
                batch_size_per_image=64, positive_fraction=0.5)


def make_pair(score_thresh=0.0):
    torch.manual_seed(0)
    theirs = TvRPN(
        TvAnchorGenerator(tuple((s,) for s in SIZES), (tuple(RATIOS),) * 5), TvRPNHead(CHANNELS, 3),
        0.7, 0.3, 64, 0.5, dict(training=300, testing=150), dict(training=200, testing=100), 0.7, score_thresh,
    )
    with torch.no_grad():  # weights that produce varied scores and deltas
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
    ours = RegionProposalNetwork(in_channels=CHANNELS, anchor_sizes=SIZES, aspect_ratios=RATIOS,
                                 **{**SETTINGS, "score_thresh": score_thresh})
    state = theirs.head.state_dict()
    ours.head.load_state_dict({
        "conv.weight": state["conv.0.0.weight"], "conv.bias": state["conv.0.0.bias"],
        "objectness_logits.weight": state["cls_logits.weight"], "objectness_logits.bias": state["cls_logits.bias"],
        "box_deltas.weight": state["bbox_pred.weight"], "box_deltas.bias": state["bbox_pred.bias"],
    })
    return ours, theirs


def make_inputs(padded=(96, 128), image_sizes=((90, 128), (96, 70))):
    g = torch.Generator().manual_seed(1)
    features = {}
    for name, stride in zip(["0", "1", "2", "3"], [4, 8, 16, 32]):
        features[name] = torch.randn(len(image_sizes), CHANNELS, padded[0] // stride, padded[1] // stride, generator=g)
    features["pool"] = features["3"][:, :, ::2, ::2].clone()
    tensors = torch.zeros(len(image_sizes), 3, *padded)
    return ImageBatch(tensors, list(image_sizes)), ImageList(tensors, list(image_sizes)), features


def make_targets():
    return [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 50.0], [70.0, 20.0, 120.0, 85.0]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[5.0, 5.0, 30.0, 90.0]]), "labels": torch.tensor([1])},
    ]


def test_anchors_equal_torchvision():
    batch, image_list, features = make_inputs()
    ours = AnchorGenerator(sizes=SIZES, aspect_ratios=RATIOS)
    theirs = TvAnchorGenerator(tuple((s,) for s in SIZES), (tuple(RATIOS),) * 5)
    got = torch.cat(ours(tuple(batch.tensors.shape[-2:]), list(features.values())))
    expected = theirs(image_list, list(features.values()))
    assert len(expected) == 2
    torch.testing.assert_close(got, expected[0], rtol=0, atol=0)
    # cell anchors are centred and rounded: size 32, ratio 0.5 (h/w) -> 45 x 23 rounded half-sizes
    torch.testing.assert_close(ours.cell_anchors[0][0], torch.tensor([-23.0, -11.0, 23.0, 11.0]))


@pytest.mark.parametrize("score_thresh", [0.0, 0.6])
def test_proposals_equal_torchvision_eval(score_thresh):
    ours, theirs = make_pair(score_thresh)
    ours.eval(), theirs.eval()
    batch, image_list, features = make_inputs()
    with torch.no_grad():
        got, losses = ours(batch, features)
        expected, _ = theirs(image_list, features)
    assert losses == {}
    for g, e in zip(got, expected):
        assert len(e) > 0
        torch.testing.assert_close(g, e, rtol=0, atol=0)
        assert len(g) <= 100


def test_train_proposals_and_losses_equal_torchvision_with_same_seed():
    ours, theirs = make_pair()
    ours.train(), theirs.train()
    batch, image_list, features = make_inputs()
    torch.manual_seed(7)
    got, losses = ours(batch, features, make_targets())
    torch.manual_seed(7)
    expected, expected_losses = theirs(image_list, features, make_targets())
    for g, e in zip(got, expected):
        assert len(g) == len(e) > 100  # train top-k values
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg"}
    for name in losses:
        assert losses[name] > 0
        torch.testing.assert_close(losses[name], expected_losses[name], rtol=1e-6, atol=1e-7)
    # gradients reach the head
    sum(losses.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ours.head.parameters())


def test_empty_targets_give_zero_connected_box_loss_like_torchvision():
    ours, theirs = make_pair()
    ours.train(), theirs.train()
    batch, image_list, features = make_inputs()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    torch.manual_seed(3)
    _, losses = ours(batch, features, empty)
    torch.manual_seed(3)
    _, expected = theirs(image_list, features, empty)
    assert losses["loss_rpn_box_reg"].item() == 0.0 and losses["loss_rpn_box_reg"].requires_grad
    assert torch.isfinite(losses["loss_objectness"]) and losses["loss_objectness"] > 0
    torch.testing.assert_close(losses["loss_objectness"], expected["loss_objectness"])
    losses["loss_rpn_box_reg"].backward()  # connected: backward works and gives zero gradients
    assert ours.head.box_deltas.weight.grad.abs().sum() == 0


def test_crowd_regions_are_ignored():
    ours, _ = make_pair()
    batch, _, features = make_inputs()
    anchors = torch.cat(ours.anchor_generator(tuple(batch.tensors.shape[-2:]), list(features.values())))
    target = {"boxes": torch.tensor([[10.0, 12.0, 60.0, 50.0]]), "labels": torch.tensor([1])}
    labels, _ = ours.label_anchors(anchors, target)
    crowd = torch.tensor([[64.0, 0.0, 128.0, 96.0]])
    crowd_labels, _ = ours.label_anchors(anchors, {**target, "crowd_boxes": crowd})
    inside = (anchors[:, 0] >= 64) & (anchors[:, 2] <= 128) & (anchors[:, 1] >= 0) & (anchors[:, 3] <= 96)
    assert (labels[inside] == 0).all() and inside.sum() > 10
    assert (crowd_labels[inside] == -1).all()
    assert torch.equal(crowd_labels[labels == 1], labels[labels == 1])  # positives are untouched


def test_detectron2_anchors_closed_form():
    """detectron2's DefaultAnchorGenerator: w = sqrt(size^2 / ratio), h = ratio * w, unrounded,
    centred at (offset + i) * stride with the level's nominal stride."""
    import math

    generator = AnchorGenerator(sizes=SIZES, aspect_ratios=RATIOS, convention="detectron2", offset=0.5)
    # a 288 x 384 batch: P6 has ceil(9 / 2) = 5 rows, where torchvision's stride would be 288 // 5 = 57
    grids = [(72, 96), (36, 48), (18, 24), (9, 12), (5, 6)]
    anchors = generator((288, 384), [torch.zeros(1, 1, h, w) for h, w in grids])
    for level, (size, (grid_h, grid_w)) in enumerate(zip(SIZES, grids)):
        stride = 4 * 2**level
        assert anchors[level].shape == (grid_h * grid_w * 3, 4)
        last = anchors[level].view(grid_h, grid_w, 3, 4)[-1, -1]  # the bottom-right location
        for ratio, box in zip(RATIOS, last.tolist()):
            w = math.sqrt(size**2 / ratio)
            h = ratio * w
            cx, cy = (grid_w - 1 + 0.5) * stride, (grid_h - 1 + 0.5) * stride
            assert box == pytest.approx([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], abs=1e-4)
    rounded = AnchorGenerator(sizes=SIZES, aspect_ratios=RATIOS)([288, 384], [torch.zeros(1, 1, 5, 6)])
    # torchvision: row 1, column 0, ratio 1 sits at y = 288 // 5 = 57, not 64
    assert rounded[0][(1 * 6 + 0) * 3 + 1].tolist() == [-16.0, 57.0 - 16, 16.0, 57.0 + 16]


def test_detectron2_proposal_selection_ranks_by_logit_and_drops_empty_boxes():
    rpn = RegionProposalNetwork(in_channels=CHANNELS, anchor_sizes=SIZES, aspect_ratios=RATIOS,
                                **SETTINGS, proposal_selection="detectron2", min_proposal_size=0.0).eval()
    boxes = torch.tensor([[[0.0, 0, 10, 10], [20, 20, 20, 30], [30, 30, 40, 41], [0, 0, 10, 10.5]]])
    # logits so large that their sigmoids are all exactly 1.0 in float32: only the logits rank them
    logits = torch.tensor([[20.0, 40.0, 30.0, 25.0]])
    assert torch.sigmoid(logits).unique().tolist() == [1.0]
    selected, selected_logits = rpn.select_proposals(boxes, logits, [(50, 50)], [4])
    # the zero-width box goes; [0, 0, 10, 10.5] overlaps [0, 0, 10, 10] and has the higher logit
    assert selected[0].tolist() == [[30.0, 30, 40, 41], [0, 0, 10, 10.5]]
    assert selected_logits[0].tolist() == [30.0, 25.0]
