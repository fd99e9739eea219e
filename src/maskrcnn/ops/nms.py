"""Greedy non-maximum suppression: visit boxes by decreasing score and keep a box unless an
already kept box overlaps it with IoU > threshold.

The result is the same as torchvision's CPU kernel, index for index: scores are ordered by a
stable descending sort (equal scores keep their input order), IoU is computed with the same
operations in the boxes' dtype, and compared with the threshold as a double.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

_BLOCK = 256  # boxes decided together; their overlaps with all later boxes are one array op


def _float_threshold(threshold: float, dtype: torch.dtype) -> float:
    """The value t' in ``dtype`` for which ``iou > t'`` equals ``double(iou) > threshold``."""
    if dtype == torch.float64:
        return threshold
    t = np.float32(threshold)
    if float(t) > threshold:  # rounded up: the last float32 below it gives the same test
        t = np.nextafter(t, np.float32(-np.inf))
    return float(t)


def _overlaps(coords: Tensor, areas: Tensor, rows: np.ndarray, start: int,
              threshold: float) -> np.ndarray:
    """Boolean (R, N - start): IoU of boxes ``rows`` with boxes ``start:`` exceeds threshold.

    ``coords`` (4, N): the rows x1, y1, x2, y2, each contiguous, and ``areas`` (N,), all of one
    dtype. Each line's first operation allocates and the rest work in place: the values of the
    plain expressions, with two temporaries, not twelve.
    """
    r = torch.from_numpy(rows)
    x1, y1, x2, y2 = coords[:, r, None]
    w = torch.minimum(x2, coords[2, start:])
    w -= torch.maximum(x1, coords[0, start:])
    w.clamp_(min=0)
    h = torch.minimum(y2, coords[3, start:])
    h -= torch.maximum(y1, coords[1, start:])
    h.clamp_(min=0)
    inter = w.mul_(h)
    union = torch.add(areas[r, None], areas[start:], out=h)
    union -= inter
    return (inter.div_(union) > threshold).numpy()  # two empty boxes: 0 / 0 is no overlap


def _bits(flags: np.ndarray) -> int:
    """A boolean vector as a Python integer, element i as bit i."""
    return int.from_bytes(np.packbits(flags, bitorder="little").tobytes(), "little")


def _greedy(over: np.ndarray, rows: np.ndarray, suppressed: np.ndarray) -> np.ndarray:
    """The greedy pass inside one block of B boxes: boolean (B,), the boxes kept.

    ``over`` (R, B): overlaps of the block's boxes ``rows`` (R,) (positions in the block, the
    ones not ``suppressed`` (B,) by earlier blocks) with every box of the block; changed in place.
    Only a box that an earlier box of the block overlaps depends on the order of visiting: the
    others are kept whatever happens, and what they suppress is one array operation. The rest
    are visited in order, each row of overlaps a Python integer: a bit test and an OR per box.
    """
    over &= np.arange(over.shape[1]) > rows[:, None]  # only later boxes can be suppressed
    contested = over.any(0) & ~suppressed
    kept = ~suppressed & ~contested
    taken = _bits(over[kept[rows]].any(0))  # suppressed by boxes that are certainly kept
    for position in np.flatnonzero(contested).tolist():
        if taken >> position & 1:
            continue
        kept[position] = True
        row = np.searchsorted(rows, position)
        taken |= _bits(over[row])
    return kept


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Kept indices (K,) int64 of boxes (N, 4) with scores (N,), by decreasing score.

    >>> nms(torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [20., 20., 30., 30.]]),
    ...     torch.tensor([0.9, 0.8, 0.7]), 0.5)
    tensor([0, 2])
    """
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = scores.sort(stable=True, descending=True).indices
    ordered = boxes.detach()[order]
    if ordered.dtype not in (torch.float32, torch.float64):
        ordered = ordered.float()
    threshold = _float_threshold(float(iou_threshold), ordered.dtype)
    # GPU boxes come over once (N x 4); the bookkeeping is numpy's, on the calling thread
    coords = ordered.cpu().t().contiguous()  # (4, N): unit-stride broadcasting
    areas = (coords[2] - coords[0]) * (coords[3] - coords[1])
    suppressed = np.zeros(n, dtype=bool)
    keep = []
    for start in range(0, n, _BLOCK):
        end = min(start + _BLOCK, n)
        rows = np.flatnonzero(~suppressed[start:end]) + start
        if rows.size == 0:
            continue
        over = _overlaps(coords, areas, rows, start, threshold)
        kept = _greedy(over[:, : end - start], rows - start, suppressed[start:end])
        keep.extend((np.flatnonzero(kept) + start).tolist())
        if end < n:
            suppressed[end:] |= over[kept[rows - start], end - start:].any(0)
    return order[torch.as_tensor(keep, dtype=torch.int64, device=boxes.device)]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each category of ``idxs`` (N,); kept indices (K,) by decreasing score.

    Like torchvision, small inputs move each category to its own coordinate range and run one
    NMS, large ones run one NMS per category. The two differ in rounding at IoUs next to the
    threshold, so the same switch point is used to keep the same boxes.

    >>> batched_nms(torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.]]),
    ...             torch.tensor([0.9, 0.8]), torch.tensor([0, 1]), 0.5)
    tensor([0, 1])
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if boxes.numel() <= (4000 if boxes.device.type == "cpu" else 100_000):
        offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
        return nms(boxes + offsets[:, None], scores, iou_threshold)
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for category in torch.unique(idxs):
        members = torch.nonzero(idxs == category).squeeze(1)
        keep_mask[members[nms(boxes[members], scores[members], iou_threshold)]] = True
    keep = torch.nonzero(keep_mask).squeeze(1)
    return keep[scores[keep].sort(descending=True)[1]]
