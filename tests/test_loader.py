"""Sampler determinism, resumption, sharding, grouping; DataLoader with and without workers."""

from __future__ import annotations

import itertools

import pytest
import torch

from maskrcnn.data import shapes
from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.loader import GroupedBatchSampler, build_train_loader, collate
from maskrcnn.data.transforms import flip_horizontal

SIZES = [(30, 40), (40, 30)] * 10 + [(50, 50)] * 3  # 13 landscape/square, 10 portrait


def _take(sampler, count):
    return list(itertools.islice(iter(sampler), count))


def _sampler(**overrides):
    arguments = dict(num_images=len(SIZES), image_sizes=SIZES, batch_size=3, seed=5)
    return GroupedBatchSampler(**{**arguments, **overrides})


def test_deterministic_and_seed_dependent():
    assert _take(_sampler(), 30) == _take(_sampler(), 30)
    assert _take(_sampler(), 30) != _take(_sampler(seed=6), 30)


def test_start_iteration_continues_the_same_order():
    full = _take(_sampler(), 40)
    assert _take(_sampler(start_iteration=17), 23) == full[17:]


def test_grouping_by_orientation():
    for batch in _take(_sampler(), 50):
        assert len(batch) == 3
        orientations = {SIZES[index][1] >= SIZES[index][0] for index, _ in batch}
        assert len(orientations) == 1
    mixed = _take(_sampler(aspect_ratio_grouping=False), 50)
    assert any(len({SIZES[i][1] >= SIZES[i][0] for i, _ in batch}) == 2 for batch in mixed)


def test_epochs_cover_every_image_and_augmentation_seeds_change_per_epoch():
    sampler = _sampler(batch_size=1, aspect_ratio_grouping=False)
    items = [batch[0] for batch in _take(sampler, 2 * len(SIZES))]
    first, second = items[:len(SIZES)], items[len(SIZES):]
    assert sorted(i for i, _ in first) == list(range(len(SIZES))) == sorted(i for i, _ in second)
    seeds_first, seeds_second = dict(first), dict(second)
    assert all(seeds_first[i] != seeds_second[i] for i in seeds_first)
    assert [i for i, _ in first] != [i for i, _ in second]  # reshuffled


def test_shards_are_disjoint_and_equal():
    per_epoch = len(SIZES) // 3  # 7 each, 2 images left out of this epoch
    shards = [[b[0][0] for b in _take(_sampler(batch_size=1, aspect_ratio_grouping=False, rank=r, world_size=3), per_epoch)]
              for r in range(3)]
    assert all(len(set(s)) == per_epoch for s in shards)
    assert not set(shards[0]) & set(shards[1]) and not set(shards[1]) & set(shards[2])
    with pytest.raises(ValueError, match="rank 3"):
        _sampler(rank=3, world_size=3)


def test_collate_keeps_lists():
    images, targets = collate([(torch.zeros(3, 4, 5), {"a": 1}), (torch.zeros(3, 6, 5), {"a": 2})])
    assert [i.shape[1] for i in images] == [4, 6] and [t["a"] for t in targets] == [1, 2]


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    return shapes.generate_shapes(tmp_path_factory.mktemp("shapes"), num_train=8, num_val=5, image_size=64, seed=0)


def _batches(loader, count):
    out = []
    for images, targets in itertools.islice(loader, count):
        out.append((torch.stack(images), [t["boxes"] for t in targets], [t["image_id"] for t in targets]))
    return out


def test_loader_same_batches_with_any_number_of_workers(tiny_shapes):
    dataset = CocoDataset(tiny_shapes["train_annotations"], tiny_shapes["train_images"], horizontal_flip=0.5, color_jitter=0.2)
    arguments = dict(batch_size=2, seed=1, aspect_ratio_grouping=True)
    serial = _batches(build_train_loader(dataset, num_workers=0, **arguments), 6)
    parallel = _batches(build_train_loader(dataset, num_workers=2, **arguments), 6)
    resumed = _batches(build_train_loader(dataset, num_workers=0, start_iteration=4, **arguments), 2)
    for a, b in zip(serial, parallel):
        torch.testing.assert_close(a[0], b[0])
        assert a[2] == b[2] and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    for a, b in zip(serial[4:], resumed):
        torch.testing.assert_close(a[0], b[0])
        assert a[2] == b[2]


def test_dataset_flip_matches_flip_horizontal(tiny_shapes):
    plain = CocoDataset(tiny_shapes["val_annotations"], tiny_shapes["val_images"])
    flipping = CocoDataset(tiny_shapes["val_annotations"], tiny_shapes["val_images"], horizontal_flip=1.0)
    index = next(i for i in range(len(plain)) if len(plain[i][1]["boxes"]))
    image, target = plain[index]
    expected_image, expected = flip_horizontal(image, target, keypoint_flip_map=shapes.KEYPOINT_FLIP_MAP)
    got_image, got = flipping[(index, 123)]
    torch.testing.assert_close(got_image, expected_image)
    for key in ("boxes", "keypoints"):
        torch.testing.assert_close(got[key], expected[key])
    torch.testing.assert_close(got["masks"].to_tensor(), expected["masks"].to_tensor())
    # the flipped "left" keypoint is the leftmost visible point: its x is the box's left edge + 0.5
    visible_left = got["keypoints"][:, 2, 2] == 2
    torch.testing.assert_close(got["keypoints"][visible_left, 2, 0], got["boxes"][visible_left, 0] + 0.5)
