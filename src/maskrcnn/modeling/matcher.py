"""Assigning predictions (anchors, proposals) to ground truth, and fg/bg sampling (SPEC §2.1-2.2)."""

from __future__ import annotations

import torch
from torch import Tensor

BELOW_LOW = -1  # background
BETWEEN = -2  # ignored


def match(iou: Tensor, high: float, low: float, allow_low_quality: bool) -> Tensor:
    """Best ground truth per prediction from a (G, P) IoU matrix: (P,) int64.

    Entries are the matched GT index when IoU >= ``high``, ``BELOW_LOW`` when IoU < ``low`` and
    ``BETWEEN`` otherwise. With ``allow_low_quality`` every prediction that ties for a GT's best
    IoU is matched to its own argmax GT even below ``high`` (Faster R-CNN's RPN rule).
    """
    values, matches = iou.max(dim=0)
    best = matches.clone() if allow_low_quality else None
    matches[values < low] = BELOW_LOW
    matches[(values >= low) & (values < high)] = BETWEEN
    if allow_low_quality:
        best_per_gt = iou.max(dim=1).values
        _, preds = torch.nonzero(iou == best_per_gt[:, None], as_tuple=True)
        matches[preds] = best[preds]
    return matches


def sample_balanced(labels: list[Tensor], batch_size: int, positive_fraction: float
                    ) -> tuple[list[Tensor], list[Tensor]]:
    """Per image, sample ``batch_size`` indices with at most ``positive_fraction`` positives.

    ``labels``: per image (P,) with >= 1 positive, 0 negative, < 0 ignored.
    Returns per image the (P,) bool masks of sampled positives and sampled negatives. Random
    draws happen per image, positives first, so seeded runs are reproducible.
    """
    pos_masks, neg_masks = [], []
    for lab in labels:
        positive = torch.nonzero(lab >= 1).squeeze(1)
        negative = torch.nonzero(lab == 0).squeeze(1)
        num_pos = min(positive.numel(), int(batch_size * positive_fraction))
        num_neg = min(negative.numel(), batch_size - num_pos)
        pos = positive[torch.randperm(positive.numel(), device=lab.device)[:num_pos]]
        neg = negative[torch.randperm(negative.numel(), device=lab.device)[:num_neg]]
        pos_mask = torch.zeros_like(lab, dtype=torch.bool)
        neg_mask = torch.zeros_like(lab, dtype=torch.bool)
        pos_mask[pos] = True
        neg_mask[neg] = True
        pos_masks.append(pos_mask)
        neg_masks.append(neg_mask)
    return pos_masks, neg_masks
