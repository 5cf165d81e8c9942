"""box_ops against torchvision's detection/_utils.py (a reference nobody here wrote)."""

import math

import pytest
import torch
from torchvision.models.detection import _utils as tv_utils
from torchvision.ops import box_iou

from maskrcnn.model.box_ops import (
    BELOW_LOW_THRESHOLD,
    BETWEEN_THRESHOLDS,
    BalancedSampler,
    BoxCoder,
    Matcher,
    ignore_crowd,
    intersection_over_area,
)


def random_boxes(n: int, size: float = 100.0, generator: torch.Generator | None = None) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * size
    wh = torch.rand(n, 2, generator=generator) * size / 2 + 1
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_encode_decode_equal_torchvision(weights):
    g = torch.Generator().manual_seed(0)
    reference, targets = random_boxes(50, generator=g), random_boxes(50, generator=g)
    ours, theirs = BoxCoder(weights=weights), tv_utils.BoxCoder(weights)
    deltas = ours.encode(targets, reference)
    torch.testing.assert_close(deltas, theirs.encode_single(targets, reference), rtol=0, atol=0)
    # Class-specific deltas: [N, 4 * K] with large values so that the clamp is exercised.
    class_deltas = torch.randn(50, 4 * 3, generator=g) * 4
    decoded = ours.decode(class_deltas, reference)
    assert decoded.shape == (50, 3, 4)
    torch.testing.assert_close(decoded, theirs.decode(class_deltas, [reference]), rtol=0, atol=0)
    # Round trip
    torch.testing.assert_close(ours.decode(deltas, reference)[:, 0], targets, rtol=1e-5, atol=1e-4)


def test_box_coder_clamps_scale():
    coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    box = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    decoded = coder.decode(torch.tensor([[0.0, 0.0, 50.0, 50.0]]), box)[0, 0]
    width = decoded[2] - decoded[0]
    assert math.isclose(width.item(), 1000.0, rel_tol=1e-5)


@pytest.mark.parametrize("allow_low_quality", [False, True])
def test_matcher_equals_torchvision(allow_low_quality):
    g = torch.Generator().manual_seed(1)
    gt, predictions = random_boxes(7, generator=g), random_boxes(300, generator=g)
    # duplicates create ties for the low-quality matching
    predictions[10] = predictions[11]
    quality = box_iou(gt, predictions)
    ours = Matcher(high_threshold=0.7, low_threshold=0.3, allow_low_quality_matches=allow_low_quality)
    theirs = tv_utils.Matcher(0.7, 0.3, allow_low_quality_matches=allow_low_quality)
    expected = theirs(quality.clone())
    got = ours(quality.clone())
    assert torch.equal(got, expected)
    assert (got == BETWEEN_THRESHOLDS).any() and (got == BELOW_LOW_THRESHOLD).any()


def test_matcher_empty_gt_is_background_and_empty_predictions_are_empty():
    matcher = Matcher(high_threshold=0.5, low_threshold=0.5, allow_low_quality_matches=False)
    assert torch.equal(matcher(torch.zeros(0, 4)), torch.full((4,), -1, dtype=torch.int64))
    assert matcher(torch.zeros(3, 0)).shape == (0,)
    with pytest.raises(ValueError, match="low_threshold"):
        Matcher(high_threshold=0.3, low_threshold=0.7, allow_low_quality_matches=False)


def test_intersection_over_area_closed_form():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 40.0]])
    regions = torch.tensor([[5.0, 0.0, 100.0, 100.0]])
    ioa = intersection_over_area(boxes, regions)
    torch.testing.assert_close(ioa, torch.tensor([[0.5], [1.0]]))


def test_ignore_crowd_only_turns_background_inside_crowd_into_ignored():
    boxes = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0], [52.0, 52.0, 58.0, 58.0], [0.0, 50.0, 10.0, 60.0]]
    )
    crowd = torch.tensor([[45.0, 45.0, 70.0, 70.0], [5.0, 50.0, 100.0, 60.0]])
    matched = torch.tensor([-1, -1, 0, -1])
    out = ignore_crowd(matched, boxes, crowd, ioa_threshold=0.7)
    # box 1 is inside the crowd (background -> ignored); box 2 is a positive and stays one;
    # box 3 is half inside the second crowd box (0.5 < 0.7) and stays background.
    assert out.tolist() == [-1, -2, 0, -1]
    assert ignore_crowd(matched, boxes, torch.zeros(0, 4), 0.7) is matched


@pytest.mark.parametrize("num_pos,num_neg", [(3, 500), (200, 500), (0, 10), (0, 0)])
def test_balanced_sampler_same_samples_as_torchvision(num_pos, num_neg):
    g = torch.Generator().manual_seed(2)
    labels = torch.cat([torch.randint(1, 5, (num_pos,), generator=g), torch.zeros(num_neg, dtype=torch.int64),
                        torch.full((40,), -1)])
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    labels_per_image = [labels, labels.flip(0)]
    torch.manual_seed(123)
    pos, neg = BalancedSampler(batch_size_per_image=256, positive_fraction=0.25)(labels_per_image)
    torch.manual_seed(123)
    tv_pos, tv_neg = tv_utils.BalancedPositiveNegativeSampler(256, 0.25)(labels_per_image)
    for p, n, tp, tn, lab in zip(pos, neg, tv_pos, tv_neg, labels_per_image):
        assert torch.equal(p, tp.bool()) and torch.equal(n, tn.bool())
        assert int(p.sum()) == min(num_pos, 64)
        assert int(n.sum()) == min(num_neg, 256 - min(num_pos, 64))
        assert (lab[p] >= 1).all() and (lab[n] == 0).all()


@pytest.mark.parametrize("num_boxes,num_classes,k", [(3000, 20, 100), (3000, 3, 1000), (600, 4, 50), (5000, 1, 10)])
@pytest.mark.parametrize("ties", [False, True])
def test_batched_nms_top_k_equals_batched_nms_prefix(num_boxes, num_classes, k, ties):
    from torchvision.ops import batched_nms

    from maskrcnn.model.box_ops import batched_nms_top_k

    g = torch.Generator().manual_seed(num_boxes + k)
    boxes = random_boxes(num_boxes, size=300.0, generator=g)
    scores = torch.rand(num_boxes, generator=g)
    if ties:  # many exactly equal scores, which must come in batched_nms's order
        scores = (scores * 50).round() / 50
    idxs = torch.randint(num_classes, (num_boxes,), generator=g)
    for threshold in (0.3, 0.7):
        expected = batched_nms(boxes, scores, idxs, threshold)[:k]
        assert torch.equal(batched_nms_top_k(boxes, scores, idxs, threshold, k), expected)
    # more survivors wanted than exist: all of them; nothing in: nothing out
    assert torch.equal(batched_nms_top_k(boxes, scores, idxs, 0.5, 10**6), batched_nms(boxes, scores, idxs, 0.5))
    empty = batched_nms_top_k(boxes[:0], scores[:0], idxs[:0], 0.5, k)
    assert empty.shape == (0,) and empty.dtype == torch.int64


def test_batched_nms_top_k_stops_early(monkeypatch):
    """With distinct scores and many survivors it never runs NMS on the whole list."""
    from maskrcnn.model import box_ops

    g = torch.Generator().manual_seed(0)
    boxes, scores = random_boxes(20000, size=2000.0, generator=g), torch.rand(20000, generator=g)
    idxs = torch.randint(10, (20000,), generator=g)
    sizes = []
    real = box_ops._nms_per_class
    monkeypatch.setattr(box_ops, "_nms_per_class", lambda b, *a: sizes.append(len(b)) or real(b, *a))
    monkeypatch.setattr(box_ops, "batched_nms", lambda *a: pytest.fail("ran NMS on all candidates"))
    assert len(box_ops.batched_nms_top_k(boxes, scores, idxs, 0.5, 100)) == 100
    assert sizes == [box_ops._FIRST_PREFIX]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_batched_nms_top_k_on_low_precision_scores_runs_the_full_nms_once(monkeypatch, dtype):
    """bf16 / fp16 scores (the RPN's under autocast) are full of ties: the same indices as
    batched_nms, by one full run and no prefix tried first."""
    from torchvision.ops import batched_nms

    from maskrcnn.model import box_ops

    g = torch.Generator().manual_seed(1)
    boxes, scores = random_boxes(3000, size=300.0, generator=g), torch.rand(3000, generator=g).to(dtype)
    idxs = torch.randint(5, (3000,), generator=g)
    monkeypatch.setattr(box_ops, "_nms_per_class", lambda *a: pytest.fail("tried a prefix"))
    with torch.autocast("cpu", dtype=dtype):  # as in the model: nms's autocast rule casts to float32
        kept = box_ops.batched_nms_top_k(boxes, scores, idxs, 0.7, 300)
        expected = batched_nms(boxes, scores, idxs, 0.7)[:300]
    assert len(kept) == 300 and torch.equal(kept, expected)
