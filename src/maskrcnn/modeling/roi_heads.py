"""The second stage: RoI sampling, the box branch and the parallel mask branch (SPEC §2.2-2.4, §3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maskrcnn.modeling.box_head import box_losses, detect
from maskrcnn.modeling.mask_head import mask_loss, mask_targets
from maskrcnn.modeling.matcher import match, sample_balanced
from maskrcnn.ops import box_iou, encode
from maskrcnn.ops.roi_align import as_rois


def label_proposals(proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor, fg_iou: float
                    ) -> tuple[Tensor, Tensor]:
    """Class label (P,) (0 = background) and matched GT index (P,) of each proposal.

    Foreground when IoU >= ``fg_iou`` with its best GT, background otherwise (no ignore band).
    """
    if gt_boxes.numel() == 0:
        zeros = proposals.new_zeros(proposals.shape[0], dtype=torch.int64)
        return zeros, zeros
    matched = match(box_iou(gt_boxes, proposals), fg_iou, fg_iou, allow_low_quality=False)
    labels = gt_labels[matched.clamp(min=0)].to(torch.int64)
    labels[matched < 0] = 0
    return labels, matched.clamp(min=0)


_ROIS_PER_CHUNK = 250  # see RoIHeads._box_head_features


class RoIHeads(nn.Module):
    """Box and mask branches on pooled RoI features.

    FPN: separate 7x7 box and 14x14 mask poolers. C4: ``res5`` is shared; both branches use the
    res5 output of the same pooled RoIs (SPEC §5.1).
    """

    def __init__(self, *, box_pooler: nn.Module, box_head: nn.Module, box_predictor: nn.Module,
                 mask_pooler: nn.Module | None, mask_head: nn.Module, res5: nn.Module | None,
                 fg_iou: float, batch_size_per_image: int, positive_fraction: float,
                 box_reg_weights: tuple[float, ...], smooth_l1_beta: float, mask_target: str,
                 score_thresh: float, nms_thresh: float, detections_per_img: int,
                 min_box_size: float):
        super().__init__()
        self.box_pooler, self.box_head, self.box_predictor = box_pooler, box_head, box_predictor
        self.mask_pooler, self.mask_head, self.res5 = mask_pooler, mask_head, res5
        self.fg_iou = fg_iou
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction
        self.weights, self.beta, self.mask_target = box_reg_weights, smooth_l1_beta, mask_target
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.detections_per_img, self.min_box_size = detections_per_img, min_box_size

    def _box_features(self, features: list[Tensor], boxes: list[Tensor] | Tensor) -> Tensor:
        x = self.box_pooler(features, boxes)
        return x if self.res5 is None else self.res5(x)

    def _box_head_features(self, features: list[Tensor], boxes: list[Tensor]) -> Tensor:
        """The box head's features (R, D) of the RoIs ``boxes`` (per image (R_i, 4)). When
        predicting, ``_ROIS_PER_CHUNK`` RoIs at a time: 1000 RoIs pooled to 256 x 7 x 7 are 50
        MB, which glibc maps afresh on every call and the kernel faults in page by page, where
        a chunk's 12.5 MB is reused memory. Pooler and head on 1000 RoIs (a 300x1333 image)
        took 0.94x-0.96x the time on 2 Zen 4 EPYC cores, with no page faults instead of 12251."""
        if torch.is_grad_enabled():
            return self.box_head(self._box_features(features, boxes))
        rois = as_rois(boxes, features[0])
        return torch.cat([self.box_head(self._box_features(features, rois[i:i + _ROIS_PER_CHUNK]))
                          for i in range(0, max(len(rois), 1), _ROIS_PER_CHUNK)])

    def _mask_features(self, features: list[Tensor], boxes: list[Tensor]) -> Tensor:
        if self.res5 is not None:
            return self._box_features(features, boxes)
        return self.mask_pooler(features, boxes)

    def sample(self, proposals: list[Tensor], targets: list[dict]
               ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """GT boxes join the proposals; ``batch_size_per_image`` RoIs sampled per image, of
        which at most ``positive_fraction`` foreground. Per image: RoIs (S, 4), labels (S,),
        matched GT indices (S,)."""
        labels, matched = [], []
        proposals = [torch.cat([p, t["boxes"].to(p)]) for p, t in zip(proposals, targets)]
        for p, t in zip(proposals, targets):
            lab, idx = label_proposals(p, t["boxes"].to(p), t["labels"], self.fg_iou)
            labels.append(lab)
            matched.append(idx)
        pos, neg = sample_balanced(labels, self.batch_size_per_image, self.positive_fraction)
        keep = [torch.nonzero(p | n).squeeze(1) for p, n in zip(pos, neg)]
        return ([p[k] for p, k in zip(proposals, keep)], [lab[k] for lab, k in zip(labels, keep)],
                [m[k] for m, k in zip(matched, keep)])

    def forward_train(self, features: list[Tensor], proposals: list[Tensor], targets: list[dict],
                      mask_scales: list[Tensor]) -> dict[str, Tensor]:
        """The box and mask losses. ``mask_scales`` (4,) per image map input pixels to the
        coordinates of that image's GT masks."""
        rois, labels, matched = self.sample(proposals, targets)
        x = self._box_features(features, rois)
        class_logits, deltas = self.box_predictor(self.box_head(x))
        target_deltas = torch.cat([
            encode(r, t["boxes"].to(r)[m], self.weights) if t["boxes"].numel() else torch.zeros_like(r)
            for r, t, m in zip(rois, targets, matched)])  # an image without objects has no foreground
        cat_labels = torch.cat(labels)
        losses = box_losses(class_logits, deltas, cat_labels, target_deltas, self.beta)

        fg = [torch.nonzero(lab > 0).squeeze(1) for lab in labels]
        fg_rois = [r[f] for r, f in zip(rois, fg)]
        if self.res5 is not None:  # C4: the mask branch reuses the fg RoIs' res5 features
            mask_x = x[torch.nonzero(cat_labels > 0).squeeze(1)]
        else:
            mask_x = self._mask_features(features, fg_rois)
        mask_logits = self.mask_head(mask_x)
        size = mask_logits.shape[-1]
        gt = torch.cat([
            mask_targets(t["masks"], r / s, m[f], size, self.mask_target)
            for t, r, m, f, s in zip(targets, fg_rois, matched, fg, mask_scales)])
        losses["loss_mask"] = mask_loss(mask_logits, cat_labels[cat_labels > 0], gt)
        return losses

    def forward_test(self, features: list[Tensor], proposals: list[Tensor],
                     image_sizes: list[tuple[int, int]], min_score: float = 0.0
                     ) -> list[dict[str, Tensor]]:
        """Detections per image in input pixels: boxes (D, 4), scores (D,), labels (D,) and
        mask probabilities (D, m, m) of the predicted class; those scoring below ``min_score``
        are dropped before the mask head."""
        class_logits, deltas = self.box_predictor(self._box_head_features(features, proposals))
        results = []
        for logits, d, p, hw in zip(class_logits.split([len(p) for p in proposals]),
                                    deltas.split([len(p) for p in proposals]), proposals, image_sizes):
            boxes, scores, labels = detect(
                logits, d, p, hw, weights=self.weights, score_thresh=self.score_thresh,
                nms_thresh=self.nms_thresh, topk=self.detections_per_img, min_size=self.min_box_size)
            if min_score > 0:
                keep = scores >= min_score
                boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            results.append({"boxes": boxes, "scores": scores, "labels": labels})
        boxes = [r["boxes"] for r in results]
        labels = torch.cat([r["labels"] for r in results])
        probs = self.mask_head(self._mask_features(features, boxes), labels).sigmoid()
        for r, p in zip(results, probs.split([len(b) for b in boxes])):
            r["mask_probs"] = p
        return results
