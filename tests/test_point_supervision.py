"""Point-supervised mask loss (Cheng et al. 2021) against independent computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from maskrcnn.model.point_supervision import outside_box_loss, point_mask_loss, sample_point_subset

M = 6


def _problem(num_rois: int = 3, num_points: int = 7, num_classes: int = 1, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rois, num_classes, M, M, generator=generator, dtype=torch.float64) * 2
    top_left = torch.rand(num_rois, 2, generator=generator, dtype=torch.float64) * 20
    size = torch.rand(num_rois, 2, generator=generator, dtype=torch.float64) * 30 + 5
    boxes = torch.cat([top_left, top_left + size], dim=1)
    # Points spread over the box and a margin around it: some fall outside.
    relative = torch.rand(num_rois, num_points, 2, generator=generator, dtype=torch.float64) * 1.4 - 0.2
    points = top_left[:, None] + relative * size[:, None]
    point_labels = torch.randint(-1, 2, (num_rois, num_points), generator=generator).to(torch.float64)
    labels = torch.randint(1, max(num_classes, 2), (num_rois,), generator=generator)
    return logits, boxes, points, point_labels, labels


def _bilinear_by_hand(grid: list[list[float]], x: float, y: float) -> float:
    """Value of an M x M grid of cells at continuous cell coordinates (x, y), cell j covering
    [j, j + 1): cell centres at j + 0.5, clamped to the outermost centres (edge value)."""
    size = len(grid)
    gx = min(max(x - 0.5, 0.0), size - 1.0)
    gy = min(max(y - 0.5, 0.0), size - 1.0)
    x0, y0 = int(math.floor(gx)), int(math.floor(gy))
    x1, y1 = min(x0 + 1, size - 1), min(y0 + 1, size - 1)
    ax, ay = gx - x0, gy - y0
    return (
        grid[y0][x0] * (1 - ax) * (1 - ay)
        + grid[y0][x1] * ax * (1 - ay)
        + grid[y1][x0] * (1 - ax) * ay
        + grid[y1][x1] * ax * ay
    )


def _reference_loss(logits, boxes, points, point_labels, labels, *, average: str = "valid_points") -> float:
    """The loss written out point by point: box frame -> cell coordinates -> bilinear -> BCE,
    divided by the points used ("valid_points") or by every labelled point ("all_points")."""
    total, count, labelled = 0.0, 0, 0
    for r in range(logits.shape[0]):
        channel = 0 if logits.shape[1] == 1 else int(labels[r])
        grid = logits[r, channel].tolist()
        x1, y1, x2, y2 = boxes[r].tolist()
        for (x, y), target in zip(points[r].tolist(), point_labels[r].tolist()):
            labelled += target >= 0
            if target < 0 or not (x1 <= x <= x2 and y1 <= y <= y2):
                continue
            value = _bilinear_by_hand(grid, (x - x1) / (x2 - x1) * M, (y - y1) / (y2 - y1) * M)
            # BCE with logits: softplus(z) - t * z
            total += math.log1p(math.exp(-abs(value))) + max(value, 0.0) - target * value
            count += 1
    return total / (count if average == "valid_points" else labelled)


@pytest.mark.parametrize("num_classes", [1, 4])
def test_equals_hand_written_bilinear_bce(num_classes):
    logits, boxes, points, point_labels, labels = _problem(num_classes=num_classes)
    loss = point_mask_loss(logits, boxes, points, point_labels, labels)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - _reference_loss(logits, boxes, points, point_labels, labels)) < 1e-5


@pytest.mark.parametrize("num_classes", [1, 4])
def test_all_points_average_equals_hand_written(num_classes):
    """PointSup's normalisation: the same sum over the points inside their RoI, divided by every
    labelled point (those outside count as zero), i.e. valid / labelled times our average."""
    logits, boxes, points, point_labels, labels = _problem(num_rois=4, num_points=9, num_classes=num_classes, seed=5)
    loss = point_mask_loss(logits, boxes, points, point_labels, labels, average="all_points")
    expected = _reference_loss(logits, boxes, points, point_labels, labels, average="all_points")
    assert abs(loss.item() - expected) < 1e-5
    valid = point_mask_loss(logits, boxes, points, point_labels, labels)
    assert loss.item() < valid.item()  # some labelled points of this problem lie outside their RoI
    with pytest.raises(ValueError, match="average"):
        point_mask_loss(logits, boxes, points, point_labels, labels, average="points")


def test_equals_roi_align_sampling():
    """torchvision's roi_align on a zero-size box at the point, one sample, aligned=True, is a
    bilinear read of the logits at that point: a second formulation nobody here wrote."""
    logits, boxes, points, point_labels, labels = _problem(num_rois=4, num_points=9, seed=3)
    logits, boxes, points = logits.float(), boxes.float(), points.float()
    num_rois, num_points = point_labels.shape
    scale = M / (boxes[:, 2:] - boxes[:, :2])  # [R, 2] cells per pixel
    cell_xy = (points - boxes[:, None, :2]) * scale[:, None]  # [R, P, 2] cell coordinates
    point_boxes = torch.cat([cell_xy, cell_xy], dim=-1).reshape(-1, 4)
    batch_index = torch.arange(num_rois).repeat_interleave(num_points)[:, None].float()
    sampled = roi_align(logits, torch.cat([batch_index, point_boxes], dim=1), output_size=1, sampling_ratio=1, aligned=True)
    sampled = sampled.reshape(num_rois, num_points)
    inside = ((cell_xy >= 0) & (cell_xy <= M)).all(dim=-1)
    valid = inside & (point_labels >= 0)
    expected = F.binary_cross_entropy_with_logits(sampled[valid], point_labels[valid].float())
    loss = point_mask_loss(logits, boxes, points, point_labels.float(), labels)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_cell_centres_read_exact_logits():
    logits = torch.arange(M * M, dtype=torch.float32).reshape(1, 1, M, M) / 10 - 1.5
    boxes = torch.tensor([[10.0, 20.0, 22.0, 26.0]])  # 2 px wide cells, 1 px tall cells
    cells = torch.tensor([[0, 0], [5, 5], [2, 3], [4, 1]])  # (column, row)
    points = torch.stack([10.0 + (cells[:, 0] + 0.5) * 2.0, 20.0 + (cells[:, 1] + 0.5) * 1.0], dim=1)[None]
    targets = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    loss = point_mask_loss(logits, boxes, points, targets, torch.ones(1, dtype=torch.int64))
    values = logits[0, 0, cells[:, 1], cells[:, 0]]
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(values, targets[0]))


def test_outside_and_ignored_points_add_nothing():
    logits, boxes, points, point_labels, labels = _problem()
    base = point_mask_loss(logits, boxes, points, point_labels, labels)
    # Extra points: labelled but outside their RoI, and inside but labelled -1.
    outside = boxes[:, None, 2:] + torch.tensor([[[0.5, 0.5], [3.0, -1.0]]], dtype=torch.float64)
    ignored = (boxes[:, None, :2] + boxes[:, None, 2:]) / 2
    more_points = torch.cat([points, outside, ignored], dim=1)
    more_labels = torch.cat([point_labels, torch.ones(3, 2, dtype=torch.float64), -torch.ones(3, 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(point_mask_loss(logits, boxes, more_points, more_labels, labels), base)


def test_gradient_only_at_sampled_cells():
    logits = torch.randn(2, 3, M, M, requires_grad=True)
    boxes = torch.tensor([[0.0, 0.0, 12.0, 12.0], [5.0, 5.0, 11.0, 17.0]])
    # RoI 0 (2 x 2 px cells): one point between four cell centres, one ignored.
    # RoI 1 (1 x 2 px cells): one point between two cell centres of a column, one outside.
    points = torch.tensor([[[4.0, 6.0], [1.0, 1.0]], [[8.5, 9.0], [30.0, 30.0]]])
    point_labels = torch.tensor([[1.0, -1.0], [0.0, 1.0]])
    labels = torch.tensor([2, 1])
    point_mask_loss(logits, boxes, points, point_labels, labels).backward()
    nonzero = logits.grad != 0
    expected = torch.zeros_like(nonzero)
    # (4, 6) -> cell coordinates (2.0, 3.0): halfway between the centres of columns 1, 2 and rows
    # 2, 3, in channel labels[0] = 2 only.
    expected[0, 2, 2:4, 1:3] = True
    # (8.5, 9.0) -> relative (3.5, 4.0) -> cells (3.5, 2.0): on column 3's centre, between rows 1, 2.
    expected[1, 1, 1:3, 3] = True
    assert torch.equal(nonzero, expected)


def test_empty_is_zero_and_connected():
    for num_rois, num_points in [(0, 5), (3, 0)]:
        logits = torch.randn(num_rois, 2, M, M, requires_grad=True)
        loss = point_mask_loss(
            logits,
            torch.zeros(num_rois, 4),
            torch.zeros(num_rois, num_points, 2),
            torch.zeros(num_rois, num_points),
            torch.ones(num_rois, dtype=torch.int64),
        )
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
    # All points outside or ignored.
    logits = torch.randn(2, 1, M, M, requires_grad=True)
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 4.0, 4.0]])
    points = torch.tensor([[[5.0, 1.0]], [[2.0, 2.0]]])
    loss = point_mask_loss(logits, boxes, points, torch.tensor([[1.0], [-1.0]]), torch.ones(2, dtype=torch.int64))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() == 0


def test_shape_errors_are_named():
    with pytest.raises(ValueError, match="point_coords"):
        point_mask_loss(torch.zeros(2, 1, M, M), torch.zeros(2, 4), torch.zeros(3, 4, 2), torch.zeros(2, 4), torch.ones(2))


def test_sample_point_subset():
    point_labels = torch.tensor(
        [[1.0, 0.0, 1.0, -1.0, 0.0, 1.0], [-1.0, 1.0, -1.0, -1.0, -1.0, -1.0], [-1.0] * 6]
    )
    counts = torch.zeros(3, 6)
    for seed in range(200):
        subset = sample_point_subset(point_labels, 2, torch.Generator().manual_seed(seed))
        kept = subset >= 0
        assert kept.sum(dim=1).tolist() == [2, 1, 0]  # min(k, labelled points) per instance
        assert torch.equal(subset[kept], point_labels[kept])  # kept points keep their labels
        counts += kept
    # Each of the five labelled points of row 0 is kept with probability 2 / 5.
    frequency = counts[0, point_labels[0] >= 0] / 200
    assert ((frequency - 0.4).abs() < 0.12).all(), frequency
    one = sample_point_subset(point_labels, 3, torch.Generator().manual_seed(7))
    assert torch.equal(one, sample_point_subset(point_labels, 3, torch.Generator().manual_seed(7)))
    assert torch.equal(sample_point_subset(point_labels, 10), point_labels)


@pytest.mark.parametrize("num_classes", [1, 4])
def test_outside_box_loss_equals_hand_written(num_classes):
    """RoI [0, 8] x [0, 8] on a 4 x 4 grid (cell centres 1, 3, 5, 7); instance box x in [0, 4.5],
    y in [2.5, 8]: row 0 (y = 1) and columns 2, 3 (x = 5, 7) lie outside, 10 of the 16 cells."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, num_classes, 4, 4, generator=generator, dtype=torch.float64) * 3
    rois = torch.tensor([[0.0, 0.0, 8.0, 8.0], [10.0, 10.0, 18.0, 18.0]], dtype=torch.float64)
    instance_boxes = torch.tensor([[0.0, 2.5, 4.5, 8.0], [10.0, 10.0, 18.0, 18.0]], dtype=torch.float64)
    labels = torch.tensor([num_classes - 1, 0])
    grid = logits[0, num_classes - 1].tolist()
    outside = [(r, c) for r in range(4) for c in range(4) if r == 0 or c >= 2]
    assert len(outside) == 10
    # BCE towards 0 with logits: softplus(z)
    expected = sum(math.log1p(math.exp(-abs(grid[r][c]))) + max(grid[r][c], 0.0) for r, c in outside) / 10
    loss = outside_box_loss(logits, rois, instance_boxes, labels)
    assert loss.item() == pytest.approx(expected, rel=1e-6)

    logits.requires_grad_(True)
    outside_box_loss(logits, rois, instance_boxes, labels).backward()
    touched = logits.grad.abs() > 0
    assert touched[1].sum() == 0  # the second RoI is its instance's box: nothing outside
    assert {(r, c) for r, c in touched[0, num_classes - 1].nonzero().tolist()} == set(outside)
    assert touched[0].sum() == 10  # only the RoI's own class channel


def test_outside_box_loss_is_zero_and_connected_without_outside_cells():
    boxes = torch.tensor([[2.0, 3.0, 20.0, 30.0]])
    for logits, rois in ((torch.randn(1, 1, 6, 6, requires_grad=True), boxes),
                         (torch.randn(0, 1, 6, 6, requires_grad=True), boxes[:0])):
        loss = outside_box_loss(logits, rois, rois, torch.zeros(len(rois), dtype=torch.long))
        assert loss.item() == 0.0
        loss.backward()
        assert logits.grad is not None and logits.grad.abs().sum() == 0
