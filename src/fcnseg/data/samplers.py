"""A distributed sampler for evaluation that splits the dataset exactly, without padding.

torch's ``DistributedSampler`` pads the index list so every rank gets the same number of samples; in
evaluation the padded samples are seen twice and counted twice in the confusion matrix. This sampler gives each
rank a disjoint strided slice instead (ranks may differ by one sample), so the union over ranks is the dataset,
exactly once. Lightning's copy of this idea (``lightning.pytorch.overrides.distributed.UnrepeatedDistributedSampler``)
is internal API, ignores ``seed`` and refuses ranks with no samples, hence this small version.

It subclasses ``DistributedSampler`` so Lightning (``use_distributed_sampler=True``) keeps it instead of swapping in
a padding one. Use it for validation / test only: with uneven per-rank batch counts, any collective call made per
step (e.g. ``self.log(..., sync_dist=True, on_step=True)``) would wait forever on the rank that has finished.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import DistributedSampler


class UnpaddedDistributedSampler(DistributedSampler):
    """Rank ``r`` of ``R`` gets positions ``r, r + R, r + 2R, …`` of the (optionally shuffled) index list."""

    def __init__(self, dataset: Sized, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = False, seed: int = 0) -> None:
        # drop_last=False: nothing is dropped either; the parent's padded sizes are replaced below.
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.total_size = len(dataset)
        self.num_samples = len(range(self.rank, self.total_size, self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            # Same permutation on every rank (seed + epoch), as in DistributedSampler, so slices stay disjoint.
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.total_size, generator=generator).tolist()
        else:
            indices = list(range(self.total_size))
        return iter(indices[self.rank : self.total_size : self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


class EpochSeededSampler(DistributedSampler):
    """Training sampler whose every draw is a function of ``(seed, epoch)``: the shuffle, and, through the
    ``(index, epoch)`` pairs it yields, each sample's augmentation (see :class:`EpochSeededDataset`).

    So a run killed mid-way and resumed from its last checkpoint sees exactly the batches and crops the
    uninterrupted run would have, whatever the number of (persistent) workers. It is a ``DistributedSampler``, so
    Lightning keeps it and calls ``set_epoch``; under DDP each rank takes its padded share as torch's does.
    """

    def __init__(self, dataset: Sized, num_replicas: int | None = None, rank: int | None = None,
                 seed: int = 0, drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=drop_last)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((index, self.epoch) for index in super().__iter__())


class EpochSeededDataset(torch.utils.data.Dataset):
    """Wraps a dataset whose ``transform`` is an albumentations ``Compose``: item ``(index, epoch)`` is
    augmented with a seed derived from ``(seed, epoch, index)`` only, never from worker or process state."""

    def __init__(self, dataset, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int | tuple[int, int]):
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        transform = getattr(self.dataset, "transform", None)
        if hasattr(transform, "set_random_seed"):
            mixed = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 7_919 + index)
            transform.set_random_seed(int(torch.randint(0, 2**31 - 1, (), generator=mixed)))
        return self.dataset[index]
