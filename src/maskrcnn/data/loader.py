"""Batching: collate, an infinite aspect-ratio grouped batch sampler, and the DataLoader builders.

Training is iteration-based. The sampler's output is a pure function of (seed, rank,
world_size, batch_size, the images' sizes): epoch e shuffles all indices with a generator seeded
by (seed, e), each rank takes its slice, and images are put into one bucket per orientation
(landscape / portrait) that emits a batch when full. Every item carries its augmentation seed,
derived from (seed, epoch, index), so the augmented images do not depend on worker processes
either. A resumed run passes `start_iteration` and continues with exactly the batches it would
have seen (the skipped batches are recomputed, which costs index arithmetic only).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Images stay a list (sizes differ; the model's transform batches and pads them)."""
    return [image for image, _ in batch], [target for _, target in batch]


def derived_seed(*values: int) -> int:
    """A 63-bit seed mixing the values (numpy's SeedSequence: nearby inputs give unrelated seeds)."""
    state = np.random.SeedSequence([int(v) for v in values]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


class GroupedBatchSampler:
    """Infinite iterator of batches, each a list of (dataset index, augmentation seed).

    Args:
        image_sizes: (height, width) per dataset index; None disables grouping.
        batch_size: images per batch on this rank.
        seed: the run's seed.
        rank, world_size: this process's shard; every rank gets the same number of images per
            epoch (the shuffled order is cut to a multiple of world_size).
        start_iteration: batches to skip, to resume a run where it stopped.
        aspect_ratio_grouping: batch landscape with landscape and portrait with portrait images,
            so that padding to a common size wastes less.
    """

    def __init__(self, *, num_images: int, image_sizes: Sequence[tuple[int, int]] | None, batch_size: int,
                 seed: int, rank: int = 0, world_size: int = 1, start_iteration: int = 0,
                 aspect_ratio_grouping: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if num_images < world_size:
            raise ValueError(f"{num_images} images cannot be shared among {world_size} processes")
        if start_iteration < 0:
            raise ValueError(f"start_iteration must be >= 0, got {start_iteration}")
        self.num_images, self.batch_size, self.seed = num_images, batch_size, seed
        self.rank, self.world_size, self.start_iteration = rank, world_size, start_iteration
        if aspect_ratio_grouping and image_sizes is not None:
            sizes = np.asarray(image_sizes, dtype=np.int64).reshape(-1, 2)
            self.groups = (sizes[:, 1] >= sizes[:, 0]).astype(np.int64)  # 1 = landscape (or square)
        else:
            self.groups = np.zeros(num_images, np.int64)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return itertools.islice(self._batches(), self.start_iteration, None)

    def _batches(self) -> Iterator[list[tuple[int, int]]]:
        buckets: dict[int, list[tuple[int, int]]] = {0: [], 1: []}
        per_rank = self.num_images // self.world_size
        for epoch in itertools.count():
            generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
            order = torch.randperm(self.num_images, generator=generator)
            shard = order[self.rank * per_rank:(self.rank + 1) * per_rank].tolist()
            for index in shard:
                bucket = buckets[int(self.groups[index])]
                bucket.append((index, derived_seed(self.seed, epoch, index)))
                if len(bucket) == self.batch_size:
                    yield list(bucket)
                    bucket.clear()


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers should not each spawn a full thread pool


def build_train_loader(dataset: Dataset, *, batch_size: int, seed: int, num_workers: int,
                       aspect_ratio_grouping: bool = True, rank: int = 0, world_size: int = 1,
                       start_iteration: int = 0) -> DataLoader:
    """Infinite DataLoader of (images, targets) for iteration-based training.

    `dataset[(index, augmentation_seed)]` must accept the sampler's keys (CocoDataset does);
    grouping reads `dataset.image_sizes` when it exists.
    """
    sampler = GroupedBatchSampler(
        num_images=len(dataset), image_sizes=getattr(dataset, "image_sizes", None), batch_size=batch_size,
        seed=seed, rank=rank, world_size=world_size, start_iteration=start_iteration,
        aspect_ratio_grouping=aspect_ratio_grouping)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                      worker_init_fn=_worker_init if num_workers > 0 else None,
                      persistent_workers=num_workers > 0)
