"""Batches for training and evaluation.

The training stream is a pure function of (seed, iteration): which images form batch ``it`` and
whether each is flipped never depends on what ran before, so a resumed run sees exactly the
batches an uninterrupted one would, with any number of workers and across DDP ranks.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader

from maskrcnn.data.transforms import hflip


def collate(batch: list) -> tuple[list, list]:
    """[(image, target), ...] -> ([images], [targets]); the model pads images itself."""
    return [b[0] for b in batch], [b[1] for b in batch]


class _Flipping(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, bool]):
        image, target = self.dataset[key[0]]
        return hflip(image, target) if key[1] else (image, target)


class TrainSchedule:
    """Global batches of ``batch_size * world_size`` images per iteration; rank r gets slice r.

    Each epoch is a seeded permutation; with aspect-ratio grouping a batch holds only landscape
    (w >= h) or only portrait images, so padding wastes little.
    """

    def __init__(self, aspect_ratios: list[float], *, batch_size: int, seed: int, flip_prob: float,
                 aspect_ratio_grouping: bool, rank: int = 0, world_size: int = 1):
        self.ratios = aspect_ratios
        self.global_batch = batch_size * world_size
        self.batch_size, self.rank = batch_size, rank
        self.seed, self.flip_prob, self.grouping = seed, flip_prob, aspect_ratio_grouping
        if len(aspect_ratios) < self.global_batch:
            raise ValueError(f"the training set has {len(aspect_ratios)} images, fewer than one global "
                             f"batch of {self.global_batch}; lower solver.ims_per_batch")
        self.per_epoch = len(self._epoch(0))
        self._cache: tuple[int, list] = (-1, [])

    def _epoch(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.ratios), generator=g).tolist()
        groups = [[i for i in order if self.ratios[i] >= 1], [i for i in order if self.ratios[i] < 1]] \
            if self.grouping else [order]
        batches = [grp[s:s + self.global_batch] for grp in groups
                   for s in range(0, len(grp) - self.global_batch + 1, self.global_batch)]
        if not batches:  # every group smaller than a batch: mix orientations
            batches = [order[s:s + self.global_batch]
                       for s in range(0, len(order) - self.global_batch + 1, self.global_batch)]
        perm = torch.randperm(len(batches), generator=g).tolist()
        return [batches[p] for p in perm]

    def batch(self, iteration: int) -> list[tuple[int, bool]]:
        """This rank's (image index, flip) pairs for ``iteration``."""
        epoch, pos = divmod(iteration, self.per_epoch)
        if self._cache[0] != epoch:
            self._cache = (epoch, self._epoch(epoch))
        indices = self._cache[1][pos]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + iteration + 1)
        flips = (torch.rand(len(indices), generator=g) < self.flip_prob).tolist()
        lo = self.rank * self.batch_size
        return list(zip(indices, flips))[lo:lo + self.batch_size]


class _Batches(torch.utils.data.Sampler):
    def __init__(self, schedule: TrainSchedule, start_iter: int):
        self.schedule, self.start_iter = schedule, start_iter

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        it = self.start_iter
        while True:
            yield self.schedule.batch(it)
            it += 1


def build_train_loader(dataset, *, batch_size: int, num_workers: int = 0, aspect_ratio_grouping: bool = True,
                       seed: int = 0, start_iter: int = 0, rank: int = 0, world_size: int = 1,
                       flip_prob: float = 0.5) -> Iterator[tuple[list, list]]:
    """An endless iterator of (images, targets) starting at iteration ``start_iter``.

    >>> loader = build_train_loader(dataset, batch_size=4, seed=0)  # doctest: +SKIP
    >>> images, targets = next(loader)  # doctest: +SKIP
    """
    ratios = dataset.aspect_ratios() if hasattr(dataset, "aspect_ratios") else [1.0] * len(dataset)
    schedule = TrainSchedule(ratios, batch_size=batch_size, seed=seed, flip_prob=flip_prob,
                             aspect_ratio_grouping=aspect_ratio_grouping, rank=rank, world_size=world_size)
    loader = DataLoader(_Flipping(dataset), batch_sampler=_Batches(schedule, start_iter),
                        num_workers=num_workers, collate_fn=collate,
                        persistent_workers=False, prefetch_factor=2 if num_workers else None)
    return iter(loader)


def build_test_loader(dataset, batch_size: int = 1, num_workers: int = 0) -> DataLoader:
    """(images, targets) batches in data set order, unflipped."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate)
