"""RoIAlign (Mask R-CNN §3): average of bilinearly interpolated samples in each output bin, with
no rounding of box coordinates or bin edges. Forward and backward are written here.

Pixel convention. ``aligned=True`` treats pixel i as covering [i, i + 1) with its value at
i + 0.5, so box coordinates are shifted by -0.5 before sampling (Detectron2's ROIAlignV2).
``aligned=False`` is the original behaviour (no shift, RoIs at least 1x1 feature cell), which
torchvision's detection models use. Semantics at the border follow SPEC §1.6 exactly: a sample
more than one cell outside the map contributes 0, samples in [-1, 0) clamp to the edge.

How it is computed. Bilinear interpolation is separable and so is the validity test, so each
RoI's output is ``Wy @ F @ Wx^T``: ``Wy`` (PH, Lh) holds, for each output row, the averaged
interpolation weights of its samples over the Lh distinct feature rows they touch, ``Wx``
likewise for columns. Features are gathered once per RoI window in channels-last order and contracted
with two batched matrix products; the backward pass applies the transposes and accumulates
into the feature map with one ``index_add_`` per chunk of RoIs, so there is no per-sample
scattering.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

_CHUNK_ELEMENTS = 1 << 18  # gathered elements per chunk: small enough to stay in cache


def _axis_weights(start: Tensor, length: Tensor, pooled: int, size: int, ratio: int, aligned: bool):
    """Interpolation weights along one axis for K RoIs.

    start, length: (K,) RoI start and extent in feature cells. Returns the weights
    (K, pooled, L) over each RoI's list of touched cells, that list (K, L) (padded with cell 0)
    and its length (K,).
    """
    if not aligned:
        length = length.clamp(min=1.0)
    bin_size = length / pooled
    if ratio > 0:
        grid = torch.full_like(start, ratio, dtype=torch.int64)
    else:
        grid = torch.ceil(length / pooled).to(torch.int64)
    g = max(int(grid.max()), 1) if grid.numel() else 1
    dtype, device = start.dtype, start.device
    p = torch.arange(pooled, device=device, dtype=dtype)[None, :, None]
    i = torch.arange(g, device=device)[None, None, :]
    # same operation order as the reference kernel: start + p * bin + (i + .5) * bin / grid
    pos = start[:, None, None] + p * bin_size[:, None, None] + (i.to(dtype) + 0.5) * bin_size[
        :, None, None] / grid.clamp(min=1).to(dtype)[:, None, None]
    valid = (i < grid[:, None, None]) & (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0)
    low = pos.floor().to(torch.int64)
    edge = low >= size - 1
    low = torch.where(edge, size - 1, low)
    high = torch.where(edge, size - 1, low + 1)
    pos = torch.where(edge, low.to(dtype), pos)
    frac = pos - low.to(dtype)
    scale = valid.to(dtype) / grid.clamp(min=1).to(dtype)[:, None, None]
    k = start.shape[0]
    cells = torch.stack([low, high], -1).reshape(k, -1)  # (K, P * g * 2) touched cells
    weights = torch.stack([(1 - frac) * scale, frac * scale], -1).reshape(k, pooled, -1)
    # Each RoI reads only the distinct cells its samples touch: sort, mark first occurrences,
    # and give every sample the slot of its cell in that short list.
    valid2 = valid[..., None].expand(-1, -1, -1, 2).reshape(k, -1)
    big = size + 1
    ordered, perm = torch.where(valid2, cells, big).sort(dim=1)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first &= ordered != big
    slot_sorted = (first.cumsum(1) - 1).clamp(min=0)
    slots = torch.empty_like(slot_sorted).scatter_(1, perm, slot_sorted)
    count = first.sum(1)
    n_cells = max(int(count.max()), 1) if k else 1
    table = torch.zeros(k, n_cells, dtype=torch.int64, device=device)
    rows, cols = torch.nonzero(first, as_tuple=True)
    table[rows, slot_sorted[rows, cols]] = ordered[rows, cols]
    local = torch.zeros(k, pooled, n_cells, dtype=dtype, device=device)
    local.scatter_add_(2, slots.view(k, pooled, -1).clamp(max=n_cells - 1), weights)
    return local, table, count.clamp(min=1)


def _plan(rois: Tensor, shape, output_size, spatial_scale, sampling_ratio, aligned):
    """Per-RoI weights and the chunks of RoIs (sorted by window size) processed together."""
    _, channels, height, width = shape
    ph, pw = output_size
    offset = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * spatial_scale - offset
    y1 = rois[:, 2] * spatial_scale - offset
    x2 = rois[:, 3] * spatial_scale - offset
    y2 = rois[:, 4] * spatial_scale - offset
    wy, ty, ly = _axis_weights(y1, y2 - y1, ph, height, sampling_ratio, aligned)
    wx, tx, lx = _axis_weights(x1, x2 - x1, pw, width, sampling_ratio, aligned)
    order = (ly * lx).argsort()
    sizes = ((ly * lx)[order] * channels).tolist()
    chunks, start, k = [], 0, rois.shape[0]
    while start < k:
        # sizes ascend, so a chunk's last RoI has its largest window
        end = start + 1
        while end < k and sizes[end] * (end + 1 - start) <= _CHUNK_ELEMENTS:
            end += 1
        idx = order[start:end]
        hy, hx = int(ly[idx].max()), int(lx[idx].max())
        rows, cols = ty[idx, :hy], tx[idx, :hx]
        batch = rois[idx, 0].to(torch.int64)
        flat = (batch[:, None, None] * height + rows[:, :, None]) * width + cols[:, None, :]
        chunks.append((idx, wy[idx, :, :hy], wx[idx, :, :hx], flat.reshape(-1)))
        start = end
    return chunks


class _RoIAlign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, rois, output_size, spatial_scale, sampling_ratio, aligned):
        n, c, h, w = input.shape
        ph, pw = output_size
        k = rois.shape[0]
        out = input.new_zeros((k, ph, pw, c))
        chunks = _plan(rois, input.shape, output_size, spatial_scale, sampling_ratio, aligned)
        rows = input.permute(0, 2, 3, 1).reshape(n * h * w, c)  # channels-last rows
        for idx, wy, wx, flat in chunks:
            m, hy, hx = wy.shape[0], wy.shape[2], wx.shape[2]
            window = rows.index_select(0, flat).view(m, hy, hx * c)
            t = torch.bmm(wy.to(input.dtype), window).view(m * ph, hx, c)  # contract rows
            wxe = wx.to(input.dtype)[:, None].expand(m, ph, pw, hx).reshape(m * ph, pw, hx)
            out[idx] = torch.bmm(wxe, t).view(m, ph, pw, c)  # contract columns
        ctx.chunks = chunks
        ctx.input_shape = input.shape
        ctx.output_size = output_size
        return out.permute(0, 3, 1, 2).contiguous()

    @staticmethod
    def backward(ctx, grad_out):
        n, c, h, w = ctx.input_shape
        ph, pw = ctx.output_size
        g = grad_out.permute(0, 2, 3, 1)  # (K, PH, PW, C)
        grad_rows = grad_out.new_zeros((n * h * w, c))
        for idx, wy, wx, flat in ctx.chunks:
            m, hx = wy.shape[0], wx.shape[2]
            gi = g[idx].reshape(m * ph, pw, c)
            wxt = wx.to(g.dtype)[:, None].expand(m, ph, pw, hx).reshape(m * ph, pw, hx).transpose(1, 2)
            t = torch.bmm(wxt, gi).view(m, ph, hx * c)
            window = torch.bmm(wy.to(g.dtype).transpose(1, 2), t)  # (m, hy, hx * c)
            grad_rows.index_add_(0, flat, window.reshape(-1, c))
        grad_input = grad_rows.view(n, h, w, c).permute(0, 3, 1, 2)
        return grad_input, None, None, None, None, None


def _as_rois(boxes, input: Tensor) -> Tensor:
    if isinstance(boxes, (list, tuple)):
        boxes = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])
    if boxes.dim() != 2 or boxes.shape[1] != 5:
        raise ValueError(f"boxes must be (K, 5) [batch, x1, y1, x2, y2] or a list of (K_i, 4), "
                         f"got {tuple(boxes.shape)}")
    return boxes.to(input.dtype)


def roi_align(input: Tensor, boxes, output_size, spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """Pool (K, C, PH, PW) features for K boxes from ``input`` (N, C, H, W).

    ``boxes``: (K, 5) rows ``[batch_index, x1, y1, x2, y2]`` or a list of per-image (K_i, 4), in
    input-image pixels; ``spatial_scale`` maps them to the feature map (1 / stride).
    ``sampling_ratio`` > 0 samples that many points per bin along each axis; <= 0 uses
    ``ceil(roi_size / output_size)`` per RoI. No gradient flows to ``boxes``.

    >>> x = torch.arange(16.).view(1, 1, 4, 4)
    >>> roi_align(x, torch.tensor([[0., 0., 0., 2., 2.]]), 1, aligned=True)
    tensor([[[[5.]]]])
    """
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    rois = _as_rois(boxes, input).detach()
    if rois.shape[0] == 0:
        return input.new_zeros((0, input.shape[1], *output_size))
    return _RoIAlign.apply(input, rois, tuple(output_size), float(spatial_scale),
                           int(sampling_ratio), bool(aligned))


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align`."""

    def __init__(self, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1,
                 aligned: bool = False):
        super().__init__()
        self.output_size, self.spatial_scale = output_size, spatial_scale
        self.sampling_ratio, self.aligned = sampling_ratio, aligned

    def forward(self, input: Tensor, boxes) -> Tensor:
        return roi_align(input, boxes, self.output_size, self.spatial_scale,
                         self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}")
