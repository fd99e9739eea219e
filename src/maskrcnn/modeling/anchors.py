"""Anchors: one size per pyramid level, several aspect ratios, centred on every cell (SPEC §1.4)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def cell_anchors(sizes: tuple[float, ...], aspect_ratios: tuple[float, ...],
                 rounded: bool = False) -> Tensor:
    """Anchors centred at the origin: (A, 4) with A = len(aspect_ratios) * len(sizes).

    Aspect ratio is h / w and every anchor keeps the area size**2. ``rounded`` rounds the
    half-extents to integers as torchvision does; Detectron2 keeps floats.

    >>> cell_anchors((32,), (1.0,))
    tensor([[-16., -16.,  16.,  16.]])
    """
    anchors = []
    for ratio in aspect_ratios:
        for size in sizes:
            h = size * math.sqrt(ratio)
            w = size / math.sqrt(ratio)
            anchors.append([-w / 2, -h / 2, w / 2, h / 2])
    anchors = torch.tensor(anchors, dtype=torch.float32)
    return anchors.round() if rounded else anchors


def grid_anchors(cells: Tensor, feature_hw: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    """Place (A, 4) cell anchors at every cell of an (H, W) map: (H * W * A, 4).

    Order is row-major over cells with the A anchors of a cell contiguous, which is the order
    of the RPN head's flattened (N, H, W, A) outputs.
    """
    h, w = feature_hw
    device = cells.device
    ys = torch.arange(h, device=device, dtype=torch.float32) * stride[0]
    xs = torch.arange(w, device=device, dtype=torch.float32) * stride[1]
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([x, y, x, y], dim=-1).reshape(-1, 1, 4)
    return (shifts + cells.view(1, -1, 4)).reshape(-1, 4)


class AnchorGenerator(nn.Module):
    """Anchors for every level of a padded batch; those of the last input and feature sizes
    are kept, so a run of same-sized batches computes them once.

    ``strides`` (one per level) are Detectron2's nominal strides; without them each level's
    stride is the integer ratio of padded input to feature size, as torchvision computes it
    (the same but where a map's size was rounded up: P6 of an 800-pixel input is 13 cells high,
    and 800 // 13 = 61, not 64).
    """

    def __init__(self, sizes_per_level: list[tuple[float, ...]], aspect_ratios: tuple[float, ...],
                 rounded: bool = False, strides: tuple[int, ...] | None = None):
        super().__init__()
        if strides is not None and len(strides) != len(sizes_per_level):
            raise ValueError(f"{len(strides)} strides for {len(sizes_per_level)} levels of anchor sizes")
        self.cells = [cell_anchors(s, aspect_ratios, rounded) for s in sizes_per_level]
        self.strides = strides
        self.num_anchors = self.cells[0].shape[0]
        self._cache: dict = {}

    def forward(self, padded_hw: tuple[int, int], feature_sizes: list[tuple[int, int]],
                device: torch.device) -> list[Tensor]:
        """Per level (H_l * W_l * A, 4) anchors in input pixels; the same for every image."""
        key = (tuple(padded_hw), tuple(map(tuple, feature_sizes)), str(device))
        if key not in self._cache:
            strides = ([(s, s) for s in self.strides] if self.strides is not None else
                       [(padded_hw[0] // fs[0], padded_hw[1] // fs[1]) for fs in feature_sizes])
            self._cache.clear()
            self._cache[key] = [grid_anchors(cells.to(device), fs, stride)
                                for cells, fs, stride in zip(self.cells, feature_sizes, strides)]
        return self._cache[key]
