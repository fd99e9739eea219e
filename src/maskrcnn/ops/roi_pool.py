"""RoIPool (Fast R-CNN): max pooling over bins whose edges are rounded to the feature grid.

Kept for the paper's ablation (Table 2c), where RoIAlign beats it by about 3 mask AP. Both
quantisations RoIAlign removes happen here: box corners are rounded to cells, then bin edges
are floored and ceiled. Numerics (box corners are scaled in the boxes' dtype), tie-breaking
and gradient routing follow torchvision's kernel: the first maximum in row-major order wins
and alone receives the gradient; an empty bin gives 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maskrcnn.ops.boxes import compute_dtype
from maskrcnn.ops.roi_align import as_rois, empty_pool

_CHUNK_ELEMENTS = 1 << 22  # gathered candidates per chunk of RoIs


def _round_half_away(x: Tensor) -> Tensor:
    # C's round(), not torch.round's half-to-even
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _bins(start: Tensor, extent: Tensor, pooled: int, size: int, dtype: torch.dtype):
    """Bin edges along one axis: ``lo``, ``hi`` (K, pooled) in cells, clipped to [0, size]."""
    bin_size = extent.to(dtype) / pooled
    p = torch.arange(pooled, device=start.device, dtype=dtype)
    lo = torch.floor(p * bin_size[:, None]).long() + start[:, None]
    hi = torch.ceil((p + 1) * bin_size[:, None]).long() + start[:, None]
    return lo.clamp(0, size), hi.clamp(0, size)


def _size_chunks(cost: list[int]) -> list[tuple[int, int]]:
    """Ranges of ``cost`` (ascending) whose count times largest cost stays within budget."""
    ranges, start = [], 0
    while start < len(cost):
        end = start + 1
        while end < len(cost) and (end + 1 - start) * cost[end] <= _CHUNK_ELEMENTS:
            end += 1
        ranges.append((start, end))
        start = end
    return ranges


def _max_cells(rows: Tensor, batch: Tensor, y: tuple[Tensor, Tensor], x: tuple[Tensor, Tensor],
               hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Maximum (K, PH, PW, C) of each bin and the flat index ``(b * H + row) * W + col`` of
    its first occurrence.

    ``rows`` (N*H*W + 1, C): channels-last features plus a last row of -inf, which stands in
    for the padding. ``y``, ``x``: bin edges from :func:`_bins`. RoIs are grouped by bin size
    so that padding every bin to its group's largest stays small. Empty bins give -inf.
    """
    (y_lo, y_hi), (x_lo, x_hi) = y, x
    h, w = hw
    pad = rows.shape[0] - 1
    k, ph, pw, c = y_lo.shape[0], y_lo.shape[1], x_lo.shape[1], rows.shape[1]
    bh = (y_hi - y_lo).amax(1).clamp(min=1)  # (K,) tallest bin of each RoI
    bw = (x_hi - x_lo).amax(1).clamp(min=1)
    order = (bh * bw).argsort()
    best = rows.new_empty((k, ph, pw, c))
    where = torch.empty((k, ph, pw, c), dtype=torch.int64, device=rows.device)
    for s0, s1 in _size_chunks(((bh * bw)[order] * (ph * pw * c)).tolist()):
        idx = order[s0:s1]
        ys = y_lo[idx, :, None] + torch.arange(int(bh[idx].max()), device=rows.device)  # (k, PH, bh)
        xs = x_lo[idx, :, None] + torch.arange(int(bw[idx].max()), device=rows.device)  # (k, PW, bw)
        inside = ((ys < y_hi[idx, :, None])[:, :, None, :, None]
                  & (xs < x_hi[idx, :, None])[:, None, :, None, :])  # (k, PH, PW, bh, bw)
        cells = (batch[idx, None, None] * h + ys)[:, :, None, :, None] * w + xs[:, None, :, None, :]
        cells = torch.where(inside, cells, pad).flatten(3)  # row-major within each bin
        values = rows.index_select(0, cells.flatten()).view(*cells.shape, c)
        best[idx], first = values.max(3)  # the first maximum, like the kernel's strict '>' scan
        where[idx] = cells.gather(3, first)
    return best, where


class _RoIPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, rois, output_size, spatial_scale):
        ph, pw = output_size
        n, c, h, w = input.shape
        dtype = compute_dtype(input.dtype)
        # the kernel's product in the boxes' dtype, the scale rounded to it: in float32,
        # 45 * 0.7 is 31.5 and rounds to 32, where in double it is 31.499... and rounds to 31
        corners = _round_half_away(rois[:, 1:] * rois.new_tensor(spatial_scale)).long()
        x0, y0, x1, y1 = corners.unbind(1)
        y = _bins(y0, (y1 - y0 + 1).clamp(min=1), ph, h, dtype)  # malformed RoIs count as 1x1
        x = _bins(x0, (x1 - x0 + 1).clamp(min=1), pw, w, dtype)
        batch = rois[:, 0].long()
        rows = input.new_empty((n * h * w + 1, c), dtype=dtype)
        rows[:-1].view(n, h, w, c).copy_(input.permute(0, 2, 3, 1))
        rows[-1] = float("-inf")
        best, cells = _max_cells(rows, batch, y, x, (h, w))  # (K, PH, PW, C)
        empty = ((y[1] <= y[0])[:, :, None] | (x[1] <= x[0])[:, None, :])[:, None]  # (K, 1, PH, PW)
        out = torch.where(empty, 0.0, best.permute(0, 3, 1, 2)).to(input.dtype)
        # cell (b * H + row) * W + col, as an index into the NCHW input:
        # (b * C + channel) * H * W + row * W + col
        channel = torch.arange(c, device=input.device)[None, :, None, None] * (h * w)
        image = (batch * ((c - 1) * h * w))[:, None, None, None]
        flat = cells.permute(0, 3, 1, 2) + image + channel  # (K, C, PH, PW)
        ctx.save_for_backward(torch.where(empty, -1, flat))
        ctx.input_shape = input.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (flat,) = ctx.saved_tensors
        routed = flat >= 0  # empty bins pass nothing back
        grad = grad_out.new_zeros(ctx.input_shape)
        grad.view(-1).scatter_add_(0, flat.clamp(min=0).flatten(),
                                   torch.where(routed, grad_out, 0.0).flatten())
        return grad, None, None, None


def roi_pool(input: Tensor, boxes, output_size, spatial_scale: float = 1.0) -> Tensor:
    """Max-pool (K, C, PH, PW) features for K boxes from ``input`` (N, C, H, W).

    ``boxes`` as in :func:`roi_align`: (K, 5) ``[batch_index, x1, y1, x2, y2]`` rows or a list
    of per-image (K_i, 4), in image pixels. Empty bins give 0. The gradient of each bin goes
    to its first maximum in row-major order.

    >>> x = torch.arange(16.).view(1, 1, 4, 4)
    >>> roi_pool(x, torch.tensor([[0., 0., 0., 3., 3.]]), 2)
    tensor([[[[ 5.,  7.],
              [13., 15.]]]])
    """
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    rois = as_rois(boxes, input)
    if rois.shape[0] == 0:
        return empty_pool(input, output_size)
    return _RoIPool.apply(input, rois, tuple(output_size), float(spatial_scale))


class RoIPool(nn.Module):
    """Module form of :func:`roi_pool`.

    >>> pool = RoIPool(7, spatial_scale=1 / 16)
    >>> pool(torch.zeros(1, 8, 50, 50), [torch.tensor([[0., 0., 64., 64.]])]).shape
    torch.Size([1, 8, 7, 7])
    """

    def __init__(self, output_size, spatial_scale: float = 1.0):
        super().__init__()
        self.output_size, self.spatial_scale = output_size, spatial_scale

    def forward(self, input: Tensor, boxes) -> Tensor:
        return roi_pool(input, boxes, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"
