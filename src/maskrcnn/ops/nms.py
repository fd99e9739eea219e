"""Greedy non-maximum suppression: visit boxes by decreasing score and keep a box unless an
already kept box overlaps it with IoU > threshold.

The result is the same as torchvision's CPU kernel, index for index: scores are ordered by a
stable descending sort (equal scores keep their input order), IoU is computed with the same
operations in the boxes' dtype, and compared with the threshold as a double.

How it is computed. Two boxes reach IoU > t only if one starts within (1 - t) of the other's
width from the other's start, so the candidate pairs come from a sweep over the boxes sorted by
x1, and IoU is computed for those pairs only. The greedy pass works on the pairs above the
threshold: a box that no better box overlaps is kept whatever happens, and what it suppresses
is one array operation; the rest are visited in order of their better box.

On a GPU the pairs come from a brute-force pass instead: IoU for every pair, a block of rows at
a time, on the device, where that costs less than the sweep's bookkeeping on the host (the RPN's
two NMS calls of a two-image R50-FPN training step, about 8,600 boxes each, took 60 ms of its
126 ms on an H200 with the sweep). Only the pairs above the threshold come to the host.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from maskrcnn.ops.boxes import compute_dtype

_PAIRS = 1 << 20  # candidate pairs examined at once: bounds memory when most boxes overlap
_DENSE_ENTRIES = 1 << 22  # IoUs computed at once by the brute-force pass (16 MB in float32)


def _float_threshold(threshold: float, dtype: torch.dtype) -> float:
    """The value t' in ``dtype`` for which ``iou > t'`` equals ``double(iou) > threshold``."""
    if dtype == torch.float64:
        return threshold
    t = np.float32(threshold)
    if float(t) > threshold:  # rounded up: the last float32 below it gives the same test
        t = np.nextafter(t, np.float32(-np.inf))
    return float(t)


def _sweep(x1: np.ndarray, x2: np.ndarray, groups: np.ndarray | None, threshold: float
           ) -> tuple[np.ndarray, np.ndarray]:
    """Boxes sorted by (group, x1): positions (n,), and for each sorted position p the end of
    the run of boxes q > p of its group that start close enough to p's start to overlap it
    with IoU > ``threshold`` (n,).

    A box j that starts at or after box i overlaps it by at most ``x2_i - x1_j`` in x, and
    IoU <= (x overlap) / (width of i), so IoU > t needs ``x1_j < x1_i + (1 - t) (x2_i - x1_i)``.
    The bound here is looser by far more than float rounding can move an IoU (1e-5 of t, and
    1e-9 of the coordinates), so no pair above the threshold is missed.
    """
    x1d, x2d = x1.astype(np.float64), x2.astype(np.float64)
    reach = x1d + (1.0 - threshold * (1 - 1e-5)) * (x2d - x1d) + 1e-9 * (np.abs(x1d) + np.abs(x2d))
    by_x = np.argsort(x1, kind="stable") if groups is None else np.lexsort((x1, groups))
    xs, reach = x1[by_x], reach[by_x]
    if groups is None:
        return by_x, np.searchsorted(xs, reach, side="right")
    ends = np.empty(len(by_x), dtype=np.int64)
    bounds = np.flatnonzero(np.diff(groups[by_x])) + 1
    for s, e in zip(np.r_[0, bounds], np.r_[bounds, len(by_x)]):
        ends[s:e] = s + np.searchsorted(xs[s:e], reach[s:e], side="right")
    return by_x, ends


def _overlapping_pairs(coords: np.ndarray, groups: np.ndarray | None, threshold: float
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j), i < j, of boxes (rows of ``coords`` (n, 4), in score order) of one group
    whose IoU exceeds ``threshold``, computed as the reference kernel does."""
    x1, y1, x2, y2 = coords.T
    areas = (x2 - x1) * (y2 - y1)
    by_x, ends = _sweep(x1, x2, groups, threshold)
    n = len(by_x)
    counts = np.maximum(ends - np.arange(1, n + 1), 0)
    total = np.cumsum(counts)
    firsts, seconds = [], []
    start = 0
    while start < n:  # runs of sources with up to _PAIRS pairs (at least one source)
        stop = max(int(np.searchsorted(total, (total[start - 1] if start else 0) + _PAIRS, "right")),
                   start + 1)
        c = counts[start:stop]
        src = np.repeat(np.arange(start, stop), c)
        step = np.arange(len(src)) - np.repeat(np.cumsum(c) - c, c)
        a, b = by_x[src], by_x[src + 1 + step]
        i, j = np.minimum(a, b), np.maximum(a, b)
        w = np.minimum(x2[i], x2[j]) - np.maximum(x1[i], x1[j])
        h = np.minimum(y2[i], y2[j]) - np.maximum(y1[i], y1[j])
        inter = np.maximum(w, 0) * np.maximum(h, 0)
        with np.errstate(invalid="ignore", divide="ignore"):  # two empty boxes: 0 / 0, no overlap
            hit = inter / (areas[i] + areas[j] - inter) > threshold
        firsts.append(i[hit])
        seconds.append(j[hit])
        start = stop
    if not firsts:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    return np.concatenate(firsts), np.concatenate(seconds)


def _overlapping_pairs_dense(coords: Tensor, groups: Tensor | None, threshold: float,
                             entries: int = _DENSE_ENTRIES) -> tuple[Tensor, Tensor]:
    """The pairs of ``_overlapping_pairs`` (same IoU operations, same threshold) from every
    pair's IoU within each group, on the device of ``coords`` (n, 4); ``entries`` IoUs at a
    time. Returns (E,) int64 ``first`` < ``second``."""
    if groups is None:
        return _dense_pairs(coords, threshold, entries)
    firsts, seconds = [], []
    for group in groups.unique().tolist():
        members = torch.nonzero(groups == group).squeeze(1)  # ascending, so pairs stay ordered
        first, second = _dense_pairs(coords[members], threshold, entries)
        firsts.append(members[first])
        seconds.append(members[second])
    return torch.cat(firsts), torch.cat(seconds)


def _dense_pairs(coords: Tensor, threshold: float, entries: int) -> tuple[Tensor, Tensor]:
    """Pairs i < j of rows of ``coords`` (n, 4) with IoU > ``threshold``: a block of rows i
    against the columns j > i at a time."""
    x1, y1, x2, y2 = coords.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    n = coords.shape[0]
    rows = max(entries // max(n, 1), 1)
    firsts, seconds = [coords.new_empty(0, dtype=torch.int64)], [coords.new_empty(0, dtype=torch.int64)]
    for r0 in range(0, n - 1, rows):
        i = torch.arange(r0, min(r0 + rows, n - 1), device=coords.device)[:, None]
        j = torch.arange(r0 + 1, n, device=coords.device)[None, :]
        w = torch.minimum(x2[i], x2[j]) - torch.maximum(x1[i], x1[j])
        h = torch.minimum(y2[i], y2[j]) - torch.maximum(y1[i], y1[j])
        inter = w.clamp(min=0) * h.clamp(min=0)
        hit = (inter / (areas[i] + areas[j] - inter) > threshold) & (j > i)  # 0 / 0 is no hit
        first, second = hit.nonzero().unbind(1)
        firsts.append(first + r0)
        seconds.append(second + r0 + 1)
    return torch.cat(firsts), torch.cat(seconds)


def _greedy(n: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Positions (K,) kept by the greedy pass over n boxes in score order, given the pairs
    ``first`` < ``second`` (E,) that overlap above the threshold."""
    contested = np.zeros(n, dtype=bool)
    contested[second] = True  # a better box overlaps these
    certain = ~contested[first]  # pairs whose better box is kept whatever happens
    suppressed = np.zeros(n, dtype=bool)
    suppressed[second[certain]] = True
    rest = ~certain & ~suppressed[first]
    if rest.any():  # the others in order of their better box, whose fate is known by then
        first, second = first[rest], second[rest]
        order = np.argsort(first, kind="stable")
        flags = bytearray(suppressed.tobytes())
        for i, j in zip(first[order].tolist(), second[order].tolist()):
            if not flags[i]:
                flags[j] = 1
        suppressed = np.frombuffer(bytes(flags), dtype=bool)
    return np.flatnonzero(~suppressed)


def _nms(boxes: Tensor, scores: Tensor, groups: Tensor | None, iou_threshold: float) -> Tensor:
    """Kept indices (K,) by decreasing score; boxes suppress only boxes of their own group."""
    if iou_threshold < 0:
        raise ValueError(f"iou_threshold must be >= 0 (IoU is never negative), got {iou_threshold}")
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = scores.sort(stable=True, descending=True).indices
    ordered = boxes.detach()[order]
    ordered = ordered.to(compute_dtype(ordered.dtype))
    g = None if groups is None else groups[order]
    threshold = _float_threshold(float(iou_threshold), ordered.dtype)
    if ordered.device.type == "cpu":
        first, second = _overlapping_pairs(ordered.numpy(), None if g is None else g.numpy(), threshold)
    else:  # the pairs above the threshold come over; the greedy pass is numpy's, on the host
        first, second = (t.cpu().numpy() for t in _overlapping_pairs_dense(ordered, g, threshold))
    keep = _greedy(n, first, second)
    return order[torch.from_numpy(keep).to(boxes.device)]


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Kept indices (K,) int64 of boxes (N, 4) with scores (N,), by decreasing score.

    >>> nms(torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [20., 20., 30., 30.]]),
    ...     torch.tensor([0.9, 0.8, 0.7]), 0.5)
    tensor([0, 2])
    """
    return _nms(boxes, scores, None, iou_threshold)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each category of ``idxs`` (N,); kept indices (K,) by decreasing score.

    Like torchvision, small inputs move each category to its own coordinate range and run one
    NMS, large ones run NMS per category. The two differ in rounding at IoUs next to the
    threshold, so the same switch point is used to keep the same boxes.

    >>> batched_nms(torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.]]),
    ...             torch.tensor([0.9, 0.8]), torch.tensor([0, 1]), 0.5)
    tensor([0, 1])
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if boxes.numel() <= (4000 if boxes.device.type == "cpu" else 100_000):
        # in half precision the offset corners would overflow (float16) or round (bfloat16)
        boxes = boxes.to(compute_dtype(boxes.dtype))
        offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
        return nms(boxes + offsets[:, None], scores, iou_threshold)
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    keep_mask[_nms(boxes, scores, idxs, iou_threshold)] = True
    keep = torch.nonzero(keep_mask).squeeze(1)
    return keep[scores[keep].sort(descending=True)[1]]
