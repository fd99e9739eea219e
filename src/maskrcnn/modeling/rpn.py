"""Region Proposal Network (Ren et al. 2015) over the pyramid levels (SPEC §1.5, §2.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.modeling.anchors import AnchorGenerator
from maskrcnn.modeling.matcher import BETWEEN, match, sample_balanced
from maskrcnn.ops import (batched_nms, box_iou, clip_boxes, decode, encode, non_empty_boxes,
                          remove_small_boxes)
from maskrcnn.ops.conv_relu import conv_relu


class RPNHead(nn.Module):
    """3x3 conv + ReLU shared by all levels, then 1x1 objectness (A) and 1x1 deltas (4A)."""

    def __init__(self, channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.objectness = nn.Conv2d(channels, num_anchors, 1)
        self.deltas = nn.Conv2d(channels, 4 * num_anchors, 1)
        for conv in (self.conv, self.objectness, self.deltas):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Levels (N, C, H_l, W_l) -> logits (N, sum H_l W_l A), deltas (N, sum H_l W_l A, 4)."""
        logits, deltas = [], []
        for x in features:
            x = conv_relu(self.conv, x)
            n, _, h, w = x.shape
            logits.append(self.objectness(x).permute(0, 2, 3, 1).reshape(n, -1))
            d = self.deltas(x).view(n, -1, 4, h, w)  # (N, A, 4, H, W)
            deltas.append(d.permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
        return torch.cat(logits, 1).float(), torch.cat(deltas, 1).float()  # float32 under bf16 too


def top_per_level(logits: Tensor, level_counts: list[int], k: int) -> tuple[Tensor, Tensor]:
    """Indices (N, K) of each image's ``k`` highest ``logits`` (N, P) on every level (fewer where
    a level has fewer anchors), and the level of each column (K,)."""
    top, levels, start = [], [], 0
    for level, count in enumerate(level_counts):
        n = min(k, count)
        top.append(logits[:, start:start + count].topk(n, dim=1).indices + start)
        levels.append(torch.full((n,), level, dtype=torch.int64, device=logits.device))
        start += count
    return torch.cat(top, 1), torch.cat(levels)


def select_proposals(boxes: Tensor, logits: Tensor, levels: Tensor, image_hw: tuple[int, int],
                     *, post_nms_topk: int, nms_thresh: float, min_size: float) -> Tensor:
    """Proposals of one image from its per-level top candidates: ``boxes`` (K, 4), ``logits``
    (K,) and ``levels`` (K,).

    Clip to the image; drop boxes with a side below ``min_size``; NMS per level; keep the best
    ``post_nms_topk`` overall. Returns boxes (R, 4) sorted by decreasing objectness.
    """
    boxes = clip_boxes(boxes, image_hw)
    scores = torch.sigmoid(logits)
    big = remove_small_boxes(boxes, min_size) if min_size > 0 else non_empty_boxes(boxes)
    boxes, scores, levels = boxes[big], scores[big], levels[big]
    keep = batched_nms(boxes, scores, levels, nms_thresh)[:post_nms_topk]
    return boxes[keep]


def anchor_labels(anchors: Tensor, gt_boxes: Tensor, fg_iou: float, bg_iou: float
                  ) -> tuple[Tensor, Tensor]:
    """Objectness labels (P,) float (1 fg, 0 bg, -1 ignored) and matched GT boxes (P, 4)."""
    if gt_boxes.numel() == 0:
        return anchors.new_zeros(anchors.shape[0]), torch.zeros_like(anchors)
    matches = match(box_iou(gt_boxes, anchors), fg_iou, bg_iou, allow_low_quality=True)
    labels = (matches >= 0).to(anchors.dtype)
    labels[matches == BETWEEN] = -1.0
    return labels, gt_boxes[matches.clamp(min=0)]


def rpn_losses(logits: Tensor, deltas: Tensor, labels: Tensor, target_deltas: Tensor, *,
               pos: Tensor, neg: Tensor, beta: float, norm: str, num_images: int,
               batch_size_per_image: int) -> dict[str, Tensor]:
    """Objectness BCE on sampled anchors and smooth-L1 (L1 when beta = 0) on sampled positives.

    Inputs are flattened over the batch: logits (P,), deltas (P, 4), labels (P,), pos/neg (P,)
    bool, and target_deltas (#pos, 4) of the positives in order. ``norm="torchvision"``: BCE
    mean over sampled, box sum / #sampled. ``norm="detectron2"``: both sums /
    (batch_size_per_image * N).
    """
    sampled = pos | neg
    box = F.smooth_l1_loss(deltas[pos], target_deltas, beta=beta, reduction="sum")
    if norm == "detectron2":
        denom = batch_size_per_image * num_images
        cls = F.binary_cross_entropy_with_logits(logits[sampled], labels[sampled], reduction="sum")
        return {"loss_objectness": cls / denom, "loss_rpn_box_reg": box / denom}
    cls = F.binary_cross_entropy_with_logits(logits[sampled], labels[sampled])
    return {"loss_objectness": cls, "loss_rpn_box_reg": box / max(1, int(sampled.sum()))}


class RPN(nn.Module):
    """Anchors + head + proposal selection, and the RPN losses in training."""

    def __init__(self, *, head: RPNHead, anchors: AnchorGenerator, fg_iou: float, bg_iou: float,
                 batch_size_per_image: int, positive_fraction: float,
                 pre_nms_topk: tuple[int, int], post_nms_topk: tuple[int, int],
                 nms_thresh: float, min_size: float, smooth_l1_beta: float, loss_norm: str):
        super().__init__()
        self.head = head
        self.anchors = anchors
        self.fg_iou, self.bg_iou = fg_iou, bg_iou
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction
        self.pre_nms_topk, self.post_nms_topk = pre_nms_topk, post_nms_topk  # (train, test)
        self.nms_thresh, self.min_size = nms_thresh, min_size
        self.beta, self.loss_norm = smooth_l1_beta, loss_norm

    def forward(self, features: list[Tensor], padded_hw: tuple[int, int],
                image_sizes: list[tuple[int, int]], gt_boxes: list[Tensor] | None = None
                ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Proposals per image (R_i, 4) in input pixels, and the losses when ``gt_boxes`` is given."""
        logits, deltas = self.head(features)  # (N, P), (N, P, 4)
        level_anchors = self.anchors(padded_hw, [f.shape[-2:] for f in features], logits.device)
        anchors = torch.cat(level_anchors)
        counts = [a.shape[0] for a in level_anchors]
        mode = 0 if self.training else 1
        n = len(image_sizes)
        proposals = []
        with torch.no_grad():  # proposals are constants for the second stage (SPEC §2.6)
            # only each level's top candidates are decoded: a box depends on its anchor alone
            top, levels = top_per_level(logits.detach(), counts, self.pre_nms_topk[mode])
            image = torch.arange(n, device=top.device)[:, None]
            boxes = decode(deltas.detach()[image, top].reshape(-1, 4), anchors[top].reshape(-1, 4),
                           (1.0, 1.0, 1.0, 1.0)).view(n, -1, 4)
            top_logits = logits.detach()[image, top]
            for i, hw in enumerate(image_sizes):
                proposals.append(select_proposals(
                    boxes[i], top_logits[i], levels, hw, post_nms_topk=self.post_nms_topk[mode],
                    nms_thresh=self.nms_thresh, min_size=self.min_size))
        if gt_boxes is None:
            return proposals, {}
        labels, matched = zip(*(anchor_labels(anchors, g, self.fg_iou, self.bg_iou) for g in gt_boxes))
        pos, neg = sample_balanced(list(labels), self.batch_size_per_image, self.positive_fraction)
        pos, neg = torch.cat(pos), torch.cat(neg)
        # regression targets of the sampled positives only, the rest of the batch has none
        targets = encode(anchors.repeat(n, 1)[pos], torch.cat(matched)[pos], (1.0, 1.0, 1.0, 1.0))
        losses = rpn_losses(logits.reshape(-1), deltas.reshape(-1, 4), torch.cat(labels), targets,
                            pos=pos, neg=neg, beta=self.beta,
                            norm=self.loss_norm, num_images=n,
                            batch_size_per_image=self.batch_size_per_image)
        return proposals, losses
