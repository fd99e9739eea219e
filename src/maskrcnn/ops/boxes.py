"""Box arithmetic on absolute (x1, y1, x2, y2) boxes; width is x2 - x1 (no +1)."""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 and float64 stay; half precisions become float32 (products of half-precision
    box sides overflow past 65504, and sums of many terms lose their precision)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _upcast(boxes: Tensor) -> Tensor:
    return boxes.to(compute_dtype(boxes.dtype))


def box_area(boxes: Tensor) -> Tensor:
    """Areas (N,) of boxes (N, 4).

    >>> box_area(torch.tensor([[0., 0., 2., 3.]]))
    tensor([6.])
    """
    boxes = _upcast(boxes)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise intersection over union of (N, 4) and (M, 4) boxes -> (N, M).

    >>> box_iou(torch.tensor([[0., 0., 2., 2.]]), torch.tensor([[1., 0., 3., 2.]]))
    tensor([[0.3333]])
    """
    area_a, area_b = box_area(a), box_area(b)
    lt = torch.max(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = _upcast(rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def clip_boxes(boxes: Tensor, size_hw: tuple[int, int]) -> Tensor:
    """Clamp x to [0, w] and y to [0, h]; boxes (..., 4k) hold k boxes per row.

    >>> clip_boxes(torch.tensor([[-5., 2., 30., 40.]]), (20, 25))
    tensor([[ 0.,  2., 25., 20.]])
    """
    h, w = size_hw
    x = boxes[..., 0::2].clamp(min=0, max=w)
    y = boxes[..., 1::2].clamp(min=0, max=h)
    return torch.stack((x, y), dim=-1).reshape(boxes.shape)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices (K,) int64 of the boxes (N, 4) whose width and height are both >= ``min_size``.

    >>> remove_small_boxes(torch.tensor([[0., 0., 1., 5.], [0., 0., 0.5, 5.]]), 1.0)
    tensor([0])
    """
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return torch.nonzero((w >= min_size) & (h >= min_size)).squeeze(1)


def non_empty_boxes(boxes: Tensor) -> Tensor:
    """Indices (K,) int64 of the boxes (N, 4) with positive width and height (Detectron2's
    ``nonempty``).

    >>> non_empty_boxes(torch.tensor([[0., 0., 1., 5.], [2., 0., 2., 5.]]))
    tensor([0])
    """
    return torch.nonzero((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).squeeze(1)
