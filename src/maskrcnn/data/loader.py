"""Batches for training and evaluation.

The training stream is a pure function of (seed, iteration): which images form global batch
``it``, and the random draws of each image's augmentation, never depend on what ran before.
So a run resumed at ``start_iter`` sees exactly the batches an uninterrupted run would, with any
number of loader workers, and DDP ranks split each global batch between them.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from maskrcnn.data.transforms import TrainTransform
from maskrcnn.structures.image_list import ImageList


def collate(batch: list) -> tuple[list, list]:
    """[(image, target), ...] -> ([images], [targets]); the model pads images itself.

    >>> collate([("a", {"id": 1}), ("b", {"id": 2})])
    (['a', 'b'], [{'id': 1}, {'id': 2}])
    """
    return [b[0] for b in batch], [b[1] for b in batch]


def pad_batch(images: Sequence[Tensor], divisor: int = 32) -> Tensor:
    """Stack (C, H_i, W_i) images into (N, C, Hp, Wp), zero-padded at the bottom and right to
    the largest size rounded up to a multiple of ``divisor`` (FPN's coarsest stride).

    >>> pad_batch([torch.ones(3, 20, 40), torch.ones(3, 33, 10)]).shape
    torch.Size([2, 3, 64, 64])
    """
    if not images:
        raise ValueError("pad_batch needs at least one image")
    return ImageList.from_tensors(list(images), divisor).tensor


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) % 2**63 for k in keys]))


class TrainSchedule:
    """Which images every iteration trains on: global batches of ``batch_size * world_size``.

    Epochs are seeded permutations cut into global batches; rank r takes slice r of each. With
    aspect-ratio grouping a batch holds only landscape (w >= h) or only portrait images, so
    little padding is wasted; each epoch's leftovers of both groups form at most one mixed batch
    (so a small group is not starved) and the rest, fewer than a batch, waits for the next epoch.

    >>> schedule = TrainSchedule([1.5, 0.5, 1.2, 0.8], batch_size=2, seed=0)
    >>> sorted(schedule.global_batch(0)) in ([0, 2], [1, 3])
    True
    """

    def __init__(self, aspect_ratios: Sequence[float], *, batch_size: int, seed: int = 0,
                 aspect_ratio_grouping: bool = True, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got batch_size="
                             f"{batch_size}, rank={rank}, world_size={world_size}")
        self.landscape = np.asarray(aspect_ratios, dtype=np.float64) >= 1.0
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.global_size = batch_size * world_size
        self.seed, self.grouping = int(seed), aspect_ratio_grouping
        if len(self.landscape) < self.global_size:
            raise ValueError(f"the training set has {len(self.landscape)} images, fewer than one global "
                             f"batch of {self.global_size} ({batch_size} per process x {world_size}); "
                             "use a smaller batch size")
        self._cached: tuple[int, list[list[int]]] = (-1, [])
        self.batches_per_epoch = len(self._epoch(0))

    def _epoch(self, epoch: int) -> list[list[int]]:
        if self._cached[0] == epoch:
            return self._cached[1]
        rng = _rng(self.seed, epoch)
        order = rng.permutation(len(self.landscape))
        n = self.global_size
        if self.grouping:
            batches, leftovers = [], []
            for group in (order[self.landscape[order]], order[~self.landscape[order]]):
                full = len(group) // n * n
                batches += [group[s:s + n].tolist() for s in range(0, full, n)]
                leftovers += group[full:].tolist()
            if len(leftovers) >= n:
                batches.append(leftovers[:n])
        else:
            batches = [order[s:s + n].tolist() for s in range(0, len(order) // n * n, n)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cached = (epoch, batches)
        return batches

    def global_batch(self, iteration: int) -> list[int]:
        """Image indices of the whole global batch of ``iteration`` (all ranks)."""
        epoch, position = divmod(int(iteration), self.batches_per_epoch)
        return self._epoch(epoch)[position]

    def batch(self, iteration: int) -> list[tuple[int, int]]:
        """This rank's (image index, augmentation seed) pairs for ``iteration``; the seed depends
        on (seed, iteration, position in the global batch) only."""
        indices = self.global_batch(iteration)
        lo = self.rank * self.batch_size
        return [(indices[p], int(_rng(self.seed, iteration, p).integers(2**62)))
                for p in range(lo, lo + self.batch_size)]


class _Stream(Sampler):
    """Endless batches of (index, seed) keys from ``start_iter`` on."""

    def __init__(self, schedule: TrainSchedule, start_iter: int):
        self.schedule, self.start_iter = schedule, int(start_iter)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        iteration = self.start_iter
        while True:
            yield self.schedule.batch(iteration)
            iteration += 1


class _Augmented(Dataset):
    """Loads ``(index, seed)`` keys and augments with torch's RNG seeded by ``seed``, so any
    transform drawing from torch's generator repeats exactly, in any worker."""

    def __init__(self, dataset, flip_prob: float):
        self.dataset = dataset
        own = getattr(dataset, "transforms", None)
        self.split = own is not None and hasattr(dataset, "load")
        # with transforms of its own but no ``load``, ``dataset[i]`` already applies them
        self.transform = TrainTransform(flip_prob) if own is None else own if self.split else None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            image, target = self.dataset.load(index) if self.split else self.dataset[index]
            return (image, target) if self.transform is None else self.transform(image, target)


def build_train_loader(dataset, *, batch_size: int, num_workers: int = 0, aspect_ratio_grouping: bool = True,
                       seed: int = 0, start_iter: int = 0, rank: int = 0, world_size: int = 1,
                       flip_prob: float = 0.5) -> Iterator[tuple[list, list]]:
    """An endless iterator of this rank's ``(images, targets)`` from iteration ``start_iter`` on.

    Augmentation: the dataset's own ``transforms`` if it has them (applied to ``dataset.load(i)``,
    or by ``dataset[i]`` itself when it has no ``load``), else ``TrainTransform(flip_prob)``; either
    is seeded per (seed, iteration, position).
    Orientation groups come from ``dataset.aspect_ratios()`` when the dataset has it.

    >>> loader = build_train_loader(dataset, batch_size=4, seed=0)  # doctest: +SKIP
    >>> images, targets = next(loader)  # doctest: +SKIP
    """
    ratios = dataset.aspect_ratios() if hasattr(dataset, "aspect_ratios") else [1.0] * len(dataset)
    schedule = TrainSchedule(ratios, batch_size=batch_size, seed=seed, aspect_ratio_grouping=aspect_ratio_grouping,
                             rank=rank, world_size=world_size)
    loader = DataLoader(_Augmented(dataset, flip_prob), batch_sampler=_Stream(schedule, start_iter),
                        num_workers=num_workers, collate_fn=collate,
                        prefetch_factor=2 if num_workers else None)
    return iter(loader)


class _Plain(Dataset):
    """The dataset without its training transforms."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset.load(index) if hasattr(self.dataset, "load") else self.dataset[index]


def build_test_loader(dataset, batch_size: int = 1, num_workers: int = 0) -> DataLoader:
    """``(images, targets)`` batches in data set order, without augmentation: ``dataset.load(i)``
    where the data set has it, else ``dataset[i]`` as it is.

    >>> for images, targets in build_test_loader(dataset):  # doctest: +SKIP
    ...     outputs = model(images)
    """
    return DataLoader(_Plain(dataset), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate)
