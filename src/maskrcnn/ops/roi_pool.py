"""RoIPool (Fast R-CNN): max pooling over bins whose edges are rounded to the feature grid.

Kept for the paper's ablation (Table 2c), where replacing it by RoIAlign gains +3 mask AP. Both
quantisations RoIAlign removes happen here: box coordinates are rounded to cells, and bin edges
are floored/ceiled.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maskrcnn.ops.roi_align import _as_rois

_CHUNK_ELEMENTS = 1 << 22


def _round_half_away(x: Tensor) -> Tensor:
    # C's round(), not torch.round's half-to-even
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _bin_masks(start: Tensor, extent: Tensor, pooled: int, size: int, window: int) -> tuple[Tensor, Tensor]:
    """Membership (K, pooled, window) of window cells in each bin, and empty bins (K, pooled)."""
    bin_size = extent.to(torch.float32) / pooled
    p = torch.arange(pooled, device=start.device, dtype=torch.float32)
    lo = (torch.floor(p[None] * bin_size[:, None]).long() + start[:, None]).clamp(0, size)
    hi = (torch.ceil((p[None] + 1) * bin_size[:, None]).long() + start[:, None]).clamp(0, size)
    cell = start.clamp(0, size)[:, None, None] + torch.arange(window, device=start.device)[None, None]
    return (cell >= lo[..., None]) & (cell < hi[..., None]), hi <= lo


def roi_pool(input: Tensor, boxes, output_size, spatial_scale: float = 1.0) -> Tensor:
    """Max-pool (K, C, PH, PW) features for K boxes from ``input`` (N, C, H, W).

    ``boxes`` as in :func:`roi_align`. Empty bins give 0; the gradient goes to each bin's
    first maximum.

    >>> x = torch.arange(16.).view(1, 1, 4, 4)
    >>> roi_pool(x, torch.tensor([[0., 0., 0., 3., 3.]]), 2)
    tensor([[[[ 5.,  7.],
              [13., 15.]]]])
    """
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    ph, pw = output_size
    n, c, h, w = input.shape
    rois = _as_rois(boxes, input).detach()
    k = rois.shape[0]
    out = input.new_zeros((k, c, ph, pw))
    if k == 0:
        return out
    corners = _round_half_away(rois[:, 1:] * spatial_scale).long()
    x0, y0, x1, y1 = corners.unbind(1)
    rw, rh = (x1 - x0 + 1).clamp(min=1), (y1 - y0 + 1).clamp(min=1)
    lh = int((torch.minimum(y0 + rh, torch.tensor(h)) - y0.clamp(0, h)).clamp(min=1).max())
    lw = int((torch.minimum(x0 + rw, torch.tensor(w)) - x0.clamp(0, w)).clamp(min=1).max())
    in_y, empty_y = _bin_masks(y0, rh, ph, h, lh)
    in_x, empty_x = _bin_masks(x0, rw, pw, w, lw)
    rows = (y0.clamp(0, h)[:, None] + torch.arange(lh)).clamp(max=h - 1)
    cols = (x0.clamp(0, w)[:, None] + torch.arange(lw)).clamp(max=w - 1)
    step = max(1, _CHUNK_ELEMENTS // (c * ph * pw * lh * lw))
    pieces = []
    for s in range(0, k, step):
        sl = slice(s, s + step)
        b = rois[sl, 0].long()
        window = input[b[:, None, None], :, rows[sl, :, None], cols[sl, None, :]]  # (m, lh, lw, C)
        window = window.permute(0, 3, 1, 2)[:, :, None, None]  # (m, C, 1, 1, lh, lw)
        member = (in_y[sl, :, None, :, None] & in_x[sl, None, :, None, :])[:, None]  # (m,1,PH,PW,lh,lw)
        masked = torch.where(member, window, torch.finfo(input.dtype).min)
        best = masked.flatten(-2).max(-1).values
        empty = (empty_y[sl, :, None] | empty_x[sl, None, :])[:, None]
        pieces.append(torch.where(empty, torch.zeros((), dtype=input.dtype), best))
    return torch.cat(pieces)


class RoIPool(nn.Module):
    """Module form of :func:`roi_pool`."""

    def __init__(self, output_size, spatial_scale: float = 1.0):
        super().__init__()
        self.output_size, self.spatial_scale = output_size, spatial_scale

    def forward(self, input: Tensor, boxes) -> Tensor:
        return roi_pool(input, boxes, self.output_size, self.spatial_scale)
