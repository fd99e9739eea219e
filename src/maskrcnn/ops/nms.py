"""Greedy non-maximum suppression: visit boxes by decreasing score, keep a box unless a kept box
overlaps it with IoU > threshold."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Kept indices (K,) int64, by decreasing score (ties keep their input order).

    >>> nms(torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [20., 20., 30., 30.]]),
    ...     torch.tensor([0.9, 0.8, 0.7]), 0.5)
    tensor([0, 2])
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = scores.sort(stable=True, descending=True).indices
    b = boxes[order].detach().cpu().numpy()
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    area = (x2 - x1) * (y2 - y1)
    threshold = np.float64(iou_threshold)  # a float IoU > double threshold, as in C++
    suppressed = np.zeros(b.shape[0], dtype=bool)
    keep = []
    for i in range(b.shape[0]):
        if suppressed[i]:
            continue
        keep.append(i)
        w = np.maximum(np.minimum(x2[i], x2[i + 1:]) - np.maximum(x1[i], x1[i + 1:]), 0)
        h = np.maximum(np.minimum(y2[i], y2[i + 1:]) - np.maximum(y1[i], y1[i + 1:]), 0)
        inter = w * h
        suppressed[i + 1:] |= inter / (area[i] + area[i + 1:] - inter) > threshold
    return order[torch.as_tensor(keep, dtype=torch.int64, device=boxes.device)]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each category ``idxs`` (N,) independently; kept indices by decreasing score.

    Small inputs shift each category to its own coordinate range and run one NMS; large ones
    run one NMS per category. Both follow torchvision's choice and arithmetic exactly, so kept
    sets agree with it even for IoUs at the threshold.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if boxes.numel() <= (4000 if boxes.device.type == "cpu" else 20000):
        offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
        return nms(boxes + offsets[:, None], scores, iou_threshold)
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for category in torch.unique(idxs):
        members = torch.nonzero(idxs == category).squeeze(1)
        keep_mask[members[nms(boxes[members], scores[members], iou_threshold)]] = True
    keep = torch.nonzero(keep_mask).squeeze(1)
    return keep[scores[keep].sort(descending=True)[1]]
