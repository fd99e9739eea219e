"""The Fast R-CNN box branch: 2 x FC 1024, classification and class-specific regression (SPEC §1.8, §2.3, §3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.ops import batched_nms, clip_boxes, decode, non_empty_boxes, remove_small_boxes
from maskrcnn.ops.linear_relu import (fusable, linear_relu, linear_relu_trained, onednn_float32,
                                      packed)
from maskrcnn.ops.weight_cache import WeightCache


class BoxHead(nn.Module):
    """(R, C, S, S) pooled features -> FC -> ReLU -> FC -> ReLU -> (R, fc_dim).

    Predicting on channels-last features on the CPU (the fast path), fc6 multiplies each RoI's
    features in the order they lie in memory, (S, S, C), by a copy of its weights permuted to
    that order, made on first use and kept until they change: no copy of the features into
    (C, S, S) order. 1000 RoIs of 256 x 7 x 7 on two Zen 3 EPYC cores (AVX2): 174 ms, against
    215 ms with that copy and 2.9 s for the same product as oneDNN's 7 x 7 convolution. In
    float32 both layers then run with their ReLUs through oneDNN (``ops.linear_relu``); other
    layouts keep PyTorch's product, torchvision's.
    Training on more channels-last RoIs than fc6 has outputs permutes the weights the same way
    under autograd, each step, as the smaller of the two copies (2048 RoIs of 256 x 7 x 7 into
    1024 outputs: a training step of R18-FPN took 0.98x-0.99x the time); on channels-last
    float32 RoIs both layers then train through oneDNN's products too.
    """

    def __init__(self, in_features: int, fc_dim: int = 1024, init: str = "detectron2"):
        """``init``: "detectron2" (``c2_xavier_fill``) or "torchvision" (``nn.Linear``'s own)."""
        super().__init__()
        self.fc6 = nn.Linear(in_features, fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.out_features = fc_dim
        if init == "detectron2":
            for fc in (self.fc6, self.fc7):
                nn.init.kaiming_uniform_(fc.weight, a=1)
                nn.init.zeros_(fc.bias)
        self._fc6_rows = WeightCache(_channels_last_columns)
        self._fc6_packed = WeightCache(_packed_fc6)
        self._fc7_packed = WeightCache(packed)

    def forward(self, x: Tensor) -> Tensor:
        channels_last = (x.device.type == "cpu" and x.dim() == 4 and not x.is_contiguous()
                         and x.is_contiguous(memory_format=torch.channels_last))
        if channels_last and fusable(x):
            return self._predict(x)
        weight = self.fc6.weight
        if channels_last:
            if not torch.is_grad_enabled():
                weight = self._fc6_rows(self.fc6.weight, x.shape[1:])
            elif len(x) > self.out_features:  # the weights are the smaller copy to make
                weight = _channels_last_columns(self.fc6.weight, x.shape[1:])
        rows = x.flatten(1) if weight is self.fc6.weight else x.permute(0, 2, 3, 1).flatten(1)
        if channels_last and torch.is_grad_enabled() and onednn_float32(x):
            x = linear_relu_trained(rows, weight, self.fc6.bias)
            return linear_relu_trained(x, self.fc7.weight, self.fc7.bias)
        x = F.relu(F.linear(rows, weight, self.fc6.bias), inplace=True)
        return F.relu(self.fc7(x), inplace=True)

    def _predict(self, x: Tensor) -> Tensor:
        """Both layers and their ReLUs through oneDNN, on channels-last RoIs (R, C, S, S)."""
        fc6 = self._fc6_packed(self.fc6.weight, x.shape[1:])
        x = linear_relu(x.permute(0, 2, 3, 1).flatten(1), fc6, self.fc6.bias)
        return linear_relu(x, self._fc7_packed(self.fc7.weight), self.fc7.bias)


def _channels_last_columns(weight: Tensor, chw: torch.Size) -> Tensor:
    """(D, C*S*S) fully connected weights, columns in (C, S, S) order -> (D, S*S*C), columns
    in the (S, S, C) order of a channels-last RoI's memory."""
    return weight.view(weight.shape[0], *chw).permute(0, 2, 3, 1).flatten(1).contiguous()


def _packed_fc6(weight: Tensor, chw: torch.Size) -> Tensor:
    """fc6's weights packed for ``linear_relu``, their columns in channels-last order."""
    return packed(_channels_last_columns(weight, chw))


class BoxPredictor(nn.Module):
    """Class logits (R, K + 1), background first, and class-specific deltas (R, 4K)."""

    def __init__(self, in_features: int, num_classes: int, init: str = "detectron2"):
        """``init``: "detectron2" (normal, std 0.01 and 0.001) or "torchvision" (``nn.Linear``'s)."""
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, 4 * num_classes)
        if init == "detectron2":
            nn.init.normal_(self.cls_score.weight, std=0.01)
            nn.init.normal_(self.bbox_pred.weight, std=0.001)
            nn.init.zeros_(self.cls_score.bias)
            nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(1)
        return self.cls_score(x).float(), self.bbox_pred(x).float()  # float32 under bf16 too


def box_losses(class_logits: Tensor, deltas: Tensor, labels: Tensor, target_deltas: Tensor,
               beta: float) -> dict[str, Tensor]:
    """Softmax CE averaged over sampled RoIs; box loss on foreground RoIs' own class deltas,
    summed and divided by the number of sampled RoIs (SPEC §2.3).

    class_logits (R, K+1), deltas (R, 4K), labels (R,) in 0..K, target_deltas (R, 4).
    """
    cls = F.cross_entropy(class_logits, labels)
    fg = torch.nonzero(labels > 0).squeeze(1)
    fg_deltas = deltas.view(deltas.shape[0], -1, 4)[fg, labels[fg] - 1]
    box = F.smooth_l1_loss(fg_deltas, target_deltas[fg], beta=beta, reduction="sum")
    return {"loss_classifier": cls, "loss_box_reg": box / max(1, labels.numel())}


def detect(class_logits: Tensor, deltas: Tensor, proposals: Tensor, image_hw: tuple[int, int], *,
           weights: tuple[float, ...], score_thresh: float, nms_thresh: float, topk: int,
           min_size: float) -> tuple[Tensor, Tensor, Tensor]:
    """Final detections of one image (SPEC §3 step 3).

    class_logits (R, K+1), deltas (R, 4K), proposals (R, 4). Every (proposal, class) pair gets
    its own decoded box; pairs scoring above ``score_thresh`` go through per-class NMS and the
    best ``topk`` remain. With ``min_size`` > 0, boxes with a side under it are dropped before
    the NMS (torchvision); with 0, empty boxes are dropped after it (Detectron2's
    ``detector_postprocess``), so that they may take places among the ``topk``, as there.
    Returns boxes (D, 4), scores (D,), labels (D,) in 1..K.
    """
    num_classes = class_logits.shape[1] - 1
    boxes = decode(deltas, proposals, weights).view(-1, num_classes, 4)
    boxes = clip_boxes(boxes, image_hw).reshape(-1, 4)
    scores = F.softmax(class_logits, -1)[:, 1:].reshape(-1)
    labels = torch.arange(1, num_classes + 1, device=scores.device).repeat(class_logits.shape[0])
    keep = torch.nonzero(scores > score_thresh).squeeze(1)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    if min_size > 0:
        keep = remove_small_boxes(boxes, min_size)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = batched_nms(boxes, scores, labels, nms_thresh)[:topk]
    if min_size == 0:
        keep = keep[non_empty_boxes(boxes[keep])]
    return boxes[keep], scores[keep], labels[keep]
