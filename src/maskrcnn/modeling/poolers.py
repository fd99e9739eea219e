"""RoI feature extraction from the pyramid: each box pools from one level (SPEC §1.7)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from maskrcnn.modeling.fpn import pyramid_table
from maskrcnn.ops import box_area, roi_align
from maskrcnn.ops.roi_align import as_rois, roi_align_pyramid


def assign_levels(boxes: Tensor, min_level: int, max_level: int, canonical_size: float = 224.0,
                  canonical_level: int = 4, eps: float = 1e-6) -> Tensor:
    """FPN level per box, ``floor(4 + log2(sqrt(area) / 224))`` clamped to [min, max]: (R,) int64.

    >>> assign_levels(torch.tensor([[0., 0., 224., 224.], [0., 0., 20., 20.]]), 2, 5)
    tensor([4, 2])
    """
    size = box_area(boxes).sqrt()
    level = torch.floor(canonical_level + torch.log2(size / canonical_size) + eps)
    return level.clamp(min_level, max_level).to(torch.int64)


class MultiLevelRoIAlign(nn.Module):
    """RoIAlign of each box on its assigned level.

    ``forward(features, boxes)``: features is the list of maps with the given ``strides``
    (N, C, H_l, W_l), boxes a list of per-image (R_i, 4) in input pixels, or (R, 5) rows
    ``[batch_index, x1, y1, x2, y2]``.
    Returns (sum R_i, C, S, S) in the order of the concatenated boxes. On the CPU, every box is
    pooled from one table of the levels' rows in one product (``roi_align_pyramid``) when the
    maps lie level after level in one channels-last buffer (FPN's when predicting), and when
    training: their rows are then copied into one table (a 256-channel pyramid on 4 maps of
    64x88 and the levels above: 31 MB), which costs less than putting each level's pooled boxes
    back in the boxes' order (2048 RoIs of 256 x 7 x 7: 103 MB) and gathering their gradients.
    Otherwise level by level.
    """

    def __init__(self, *, output_size: int, strides: tuple[int, ...], sampling_ratio: int,
                 aligned: bool):
        super().__init__()
        self.output_size = output_size
        self.strides = strides
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.levels = [int(math.log2(s)) for s in strides]

    def forward(self, features: list[Tensor], boxes: list[Tensor] | Tensor) -> Tensor:
        first = features[0]
        rois = as_rois(boxes, first)  # (R, 5): batch index, x1, y1, x2, y2
        if len(features) == 1 or rois.shape[0] == 0:
            return self._pool(first, rois, self.strides[0])
        level = assign_levels(rois[:, 1:], self.levels[0], self.levels[-1]) - self.levels[0]
        if first.device.type == "cpu":
            if torch.is_grad_enabled() and any(f.requires_grad for f in features):
                table = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for f in features])
            else:
                table = pyramid_table(features)
            if table is not None:
                return roi_align_pyramid(table, [f.shape[-2:] for f in features], rois, level,
                                         self.output_size, [1 / s for s in self.strides],
                                         self.sampling_ratio, self.aligned)
        # every box gets exactly one level, so each row of ``out`` is written below; in the maps'
        # memory format, so that channels-last rows are copied whole rather than transposed
        cl = first.is_contiguous(memory_format=torch.channels_last)
        out = torch.empty((rois.shape[0], first.shape[1], self.output_size, self.output_size),
                          dtype=first.dtype, device=first.device,
                          memory_format=torch.channels_last if cl else torch.contiguous_format)
        for i, (feature, stride) in enumerate(zip(features, self.strides)):
            idx = torch.nonzero(level == i).squeeze(1)
            if idx.numel():
                out[idx] = self._pool(feature, rois[idx], stride).to(out.dtype)
        return out

    def _pool(self, feature: Tensor, rois: Tensor, stride: int) -> Tensor:
        return roi_align(feature, rois, self.output_size, 1.0 / stride, self.sampling_ratio,
                         self.aligned)
