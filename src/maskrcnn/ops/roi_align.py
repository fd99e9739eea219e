"""RoIAlign (Mask R-CNN §3): each output bin is the average of bilinearly interpolated samples
taken at regularly spaced points inside it. Nothing is rounded: neither the box coordinates
nor the bin edges.

Pixel convention. With ``aligned=True`` pixel i covers [i, i + 1) and holds its value at
i + 0.5, so the scaled box is shifted by -0.5 before sampling (Detectron2's ROIAlignV2). With
``aligned=False`` there is no shift and every RoI is at least one cell wide and high: the
original behaviour, which torchvision's detection models use. The numerics follow torchvision's
kernel (SPEC §1.6): a sample more than one cell outside the map counts as 0, a sample in
[-1, 0) or [size - 1, size] reads the edge cell, and each bin divides by its number of
samples.

How it is computed. For fixed boxes RoIAlign is linear in the feature map: with the map laid
out as rows ``F`` (N*H*W, C), channels last, the output is ``S @ F`` for a sparse matrix ``S``
with one row per output cell (K*PH*PW). Interpolation and the validity test both factorise
into a y part and an x part, so the taps are worked out per axis (a few cells per bin) and a
row of ``S`` is the outer product of its bin's y taps and x taps. The backward pass is
``S^T @ grad``: no scattered atomic adds, and no gradient for the boxes. When the levels of a
pyramid lie one after another in one table of rows, as FPN writes them when predicting, the
columns of ``S`` span the whole table and one product pools every box from its own level
(``roi_align_pyramid``).

On a GPU, building ``S`` row by row (dropping its zeros, counting each row's entries) would wait
on the device several times per call, and the time would go to the host. There each output cell
instead takes its bin's full outer product, zeros included: bags of one fixed size, summed by
``embedding_bag``, whose own backward is the product by ``S^T``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.ops.boxes import compute_dtype

_CHUNK_ENTRIES = 1 << 21  # nonzeros of S built at once: bounds memory for large sampling grids
_CHANNEL_BLOCK = 32  # channels per sparse product; measured fastest for NCHW input on CPU


def _axis_taps(start: Tensor, length: Tensor, pooled: int, size, ratio: int, aligned: bool):
    """Interpolation taps along one axis for K RoIs.

    ``start``, ``length`` (K,) are in feature cells; ``size`` is the map's size along the axis,
    an int or each RoI's (K,). Returns ``cells`` (K, pooled, D) int64, the distinct cells each
    bin reads (padded with the size), their summed weights (K, pooled, D) (0 where padded) and
    the number of samples per bin along this axis ``grid`` (K,).
    """
    if not aligned:
        length = length.clamp(min=1.0)
    bin_size = length / pooled
    if ratio > 0:
        grid = torch.full_like(start, ratio, dtype=torch.int64)
    else:
        grid = torch.ceil(bin_size).long()
    dtype, device = start.dtype, start.device
    size = torch.as_tensor(size, device=device).view(-1, 1, 1)  # (1 or K, 1, 1)
    p = torch.arange(pooled, device=device, dtype=dtype)[None, :, None]
    samples = ratio if ratio > 0 else max(int(grid.max()), 1)  # no wait on the device when fixed
    i = torch.arange(samples, device=device)[None, None, :]
    b, g = bin_size[:, None, None], grid[:, None, None]
    # operation order of the reference kernel: start + p * bin + (i + .5) * bin / grid
    pos = start[:, None, None] + p * b + (i.to(dtype) + 0.5) * b / g.clamp(min=1).to(dtype)  # (K, P, G)
    valid = (i < g) & (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0)
    low = pos.floor()
    edge = low >= size - 1
    low = torch.where(edge, (size - 1).to(dtype), low)
    frac = torch.where(edge, 0.0, pos - low)
    low = torch.where(valid, low, 0.0).long()
    high = torch.where(edge, low, low + 1)
    cells = torch.stack([low, high], -1).flatten(2)  # (K, pooled, 2g)
    weights = torch.stack([1 - frac, frac], -1).flatten(2)
    keep = valid[..., None].expand(-1, -1, -1, 2).flatten(2) & (weights != 0)
    cells = torch.where(keep, cells, size)
    # merge taps that hit the same cell, so each (row, column) of S appears once
    cells, order = cells.sort(dim=-1)
    weights = torch.where(keep, weights, 0.0).gather(-1, order)
    new = torch.ones_like(keep)
    new[..., 1:] = cells[..., 1:] != cells[..., :-1]
    slot = new.cumsum(-1) - 1
    merged_cells = size.expand_as(cells).clone().scatter_(-1, slot, cells)
    merged_weights = torch.zeros_like(weights).scatter_add_(-1, slot, weights)
    d = max(int((merged_cells < size).sum(-1).max()), 1)
    return merged_cells[..., :d], merged_weights[..., :d], grid


def _taps(rois: Tensor, output_size: tuple[int, int], size: tuple, spatial_scale,
          sampling_ratio: int, aligned: bool, dtype: torch.dtype):
    """The y and x taps (``_axis_taps``) of every RoI of ``rois`` (K, 5) on a map of ``size``
    (H, W), by ``spatial_scale``: each a number, or each RoI's (K,) when they pool from maps of
    different sizes."""
    offset = 0.5 if aligned else 0.0
    scale = torch.as_tensor(spatial_scale, dtype=torch.float64, device=rois.device).view(-1, 1)
    # scaled in double and rounded once, as the reference kernel does
    x1, y1, x2, y2 = (rois[:, 1:].double() * scale - offset).to(dtype).unbind(1)
    return (_axis_taps(y1, y2 - y1, output_size[0], size[0], sampling_ratio, aligned),
            _axis_taps(x1, x2 - x1, output_size[1], size[1], sampling_ratio, aligned))


def _chunks(y_weights: Tensor, x_weights: Tensor) -> list[tuple[int, int]]:
    """Consecutive RoI ranges [k0, k1) whose padded S entries stay near ``_CHUNK_ENTRIES``."""
    ny = (y_weights != 0).sum(-1).amax(-1)  # (K,) widest y tap list of each RoI
    nx = (x_weights != 0).sum(-1).amax(-1)
    cost = ny * nx * (y_weights.shape[1] * x_weights.shape[1])
    window = (cost.cumsum(0) - 1).div(_CHUNK_ENTRIES, rounding_mode="floor")
    ends = torch.unique_consecutive(window, return_counts=True)[1].cumsum(0).tolist()
    return list(zip([0] + ends[:-1], ends))


class _Sparse(NamedTuple):
    """A sparse matrix by rows: row r's entries are ``cols`` and ``values`` from ``offsets[r]``
    to ``offsets[r + 1]`` (the last row to the end)."""

    offsets: Tensor  # (rows,) int64
    cols: Tensor  # (nnz,) int64
    values: Tensor  # (nnz,)

    def mm(self, dense: Tensor) -> Tensor:
        """The product with ``dense`` (columns, C) -> (rows, C): per row, the weighted sum of the
        rows of ``dense`` it names, which is what ``embedding_bag`` computes: on the CPU about
        twice as fast as PyTorch's sparse CSR product, which zero-fills its output and copies it."""
        return F.embedding_bag(self.cols, dense, self.offsets, mode="sum",
                               per_sample_weights=self.values)


def _by_rows(rows: Tensor, cols: Tensor, values: Tensor, n_rows: int) -> _Sparse:
    """The matrix of entries already sorted by row, (n_rows, any)."""
    counts = torch.bincount(rows, minlength=n_rows)
    return _Sparse(counts.cumsum(0) - counts, cols, values)


def _entries(start: Tensor, width: Tensor, y, x) -> tuple[Tensor, Tensor]:
    """The entries of S for k RoIs whose taps are ``y`` and ``x``, on maps whose first rows are
    ``start`` (k,) and whose widths are ``width`` (k,): each output cell's values and columns
    (k, PH, PW, Dy, Dx), the outer product of its bin's y taps and x taps divided by the bin's
    number of samples. Padded taps have value 0."""
    y_cells, y_weights, y_grid = y
    x_cells, x_weights, x_grid = x
    count = (y_grid * x_grid).clamp(min=1).to(y_weights.dtype)  # samples per bin
    values = (y_weights / count[:, None, None])[:, :, None, :, None] * x_weights[:, None, :, None, :]
    y_offset = start[:, None, None] + y_cells * width[:, None, None]  # (k, PH, Dy)
    cols = y_offset[:, :, None, :, None] + x_cells[:, None, :, None, :]
    return values, cols


def _operator(start: Tensor, width: Tensor, k0: int, k1: int, y, x, columns: int,
              transpose: bool):
    """The rows of S for RoIs [k0, k1), (rows, ``columns``), and S^T if ``transpose``."""
    y_cells, y_weights, y_grid = (t[k0:k1] for t in y)
    x_cells, x_weights, x_grid = (t[k0:k1] for t in x)
    # trim the padding to this chunk's widest tap lists
    dy = max(int((y_weights != 0).sum(-1).max()), 1)
    dx = max(int((x_weights != 0).sum(-1).max()), 1)
    values, cols = _entries(start[k0:k1], width[k0:k1],
                            (y_cells[..., :dy], y_weights[..., :dy], y_grid),
                            (x_cells[..., :dx], x_weights[..., :dx], x_grid))
    entries = values.flatten().nonzero().squeeze(1)
    rows = entries.div(dy * dx, rounding_mode="floor")
    cols, values = cols.flatten()[entries], values.flatten()[entries]
    n_rows = (k1 - k0) * y_cells.shape[1] * x_cells.shape[1]
    s = _by_rows(rows, cols, values, n_rows)
    if not transpose:
        return s, None
    key = cols.int() if columns < 2**31 else cols  # int32 keys sort twice as fast
    order = key.argsort(stable=True)  # rows stay ascending within each column
    return s, _by_rows(cols[order], rows[order], values[order], columns)


def _roi_align_bags(input: Tensor, rois: Tensor, output_size: tuple[int, int],
                    spatial_scale: float, sampling_ratio: int, aligned: bool) -> Tensor:
    """RoIAlign as fixed-size bags, the form for GPUs (module docstring); autograd's backward.
    The same arguments and result as :func:`roi_align` with ``rois`` (K, 5), K > 0."""
    n, c, h, w = input.shape
    (ph, pw), dtype = output_size, compute_dtype(input.dtype)
    y, x = _taps(rois, output_size, (h, w), spatial_scale, sampling_ratio, aligned, dtype)
    # padded taps (cell == size, value 0) read cell 0, so that every column exists
    y = (y[0].clamp(max=h - 1), *y[1:])
    x = (x[0].clamp(max=w - 1), *x[1:])
    rows = _as_rows(input, dtype)  # (N*H*W, C)
    start, width = _map_starts(rois, h, w)
    k, bag = rois.shape[0], ph * pw * y[0].shape[-1] * x[0].shape[-1]
    step = max(_CHUNK_ENTRIES // bag, 1)  # RoIs whose bags are built at once
    pieces = []
    for k0 in range(0, k, step):
        part = slice(k0, min(k0 + step, k))
        values, cols = _entries(start[part], width[part], [t[part] for t in y],
                                [t[part] for t in x])
        bags = len(values) * ph * pw
        pooled = F.embedding_bag(cols.reshape(bags, -1), rows, mode="sum",
                                 per_sample_weights=values.reshape(bags, -1))
        pieces.append(pooled.view(-1, ph, pw, c))
    out = torch.cat(pieces).permute(0, 3, 1, 2)  # channels-last memory
    fmt = torch.channels_last if _channels_last(input) else torch.contiguous_format
    return out.to(input.dtype, memory_format=fmt)


def _map_starts(rois: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
    """Each RoI's map on an (N, C, H, W) input laid out as rows: its first row and width (K,)."""
    batch = rois[:, 0].long()
    return batch * (h * w), torch.full_like(batch, w)


def _pool(rows, blocks: list[tuple[int, int]], maps: tuple[Tensor, Tensor, int], y, x,
          out_dtype: torch.dtype, fmt: torch.memory_format, transpose: bool):
    """``S @ rows`` for K RoIs: the output (K, C, PH, PW) in ``out_dtype`` and memory format
    ``fmt``, and for each chunk of RoIs (k0, k1, S^T if ``transpose`` else None).

    The maps are laid out as rows, one per pixel: ``rows(c0, c1)`` gives their channels
    [c0, c1), (columns, c1 - c0), for each of ``blocks``. ``maps`` is (start, width, columns):
    the first row and the width of each RoI's map (K,), and the number of rows. ``y``, ``x``:
    the RoIs' taps (``_taps``)."""
    start, width, columns = maps
    k, ph, pw = y[0].shape[0], y[0].shape[1], x[0].shape[1]
    c = blocks[-1][1]
    chunks, pieces = _chunks(y[1], x[1]), []
    single = fmt == torch.channels_last and len(chunks) == 1  # the whole output in one product
    out = None if single else torch.empty((k, c, ph, pw), dtype=out_dtype,
                                          device=start.device, memory_format=fmt)
    for k0, k1 in chunks:
        s, s_t = _operator(start, width, k0, k1, y, x, columns, transpose)
        pieces.append((k0, k1, s_t))
        for c0, c1 in blocks:
            pooled = s.mm(rows(c0, c1))  # (rows, c1 - c0)
            pooled = pooled.view(k1 - k0, ph, pw, c1 - c0).permute(0, 3, 1, 2)
            if single:  # the product's rows are already the channels-last output's memory
                out = pooled.to(out_dtype)
            else:
                out[k0:k1, c0:c1] = pooled
    return out, pieces


def _channel_blocks(input: Tensor) -> list[tuple[int, int]]:
    """Channel ranges processed together. An NCHW map is turned into channels-last rows a few
    channels at a time, so each block's rows stay in cache; channels-last maps need no change."""
    c = input.shape[1]
    step = c if _channels_last(input) else _CHANNEL_BLOCK
    return [(c0, min(c0 + step, c)) for c0 in range(0, c, step)]


def _channels_last(t: Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _as_rows(t: Tensor, dtype: torch.dtype) -> Tensor:
    """(A, B, C, D) -> contiguous (A*C*D, B) rows, channels last."""
    a, b, c, d = t.shape
    return t.permute(0, 2, 3, 1).contiguous().view(a * c * d, b).to(dtype)


class _RoIAlign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, rois, output_size, spatial_scale, sampling_ratio, aligned, needs_grad):
        n, c, h, w = input.shape
        dtype = compute_dtype(input.dtype)
        y, x = _taps(rois, output_size, (h, w), spatial_scale, sampling_ratio, aligned, dtype)
        start, width = _map_starts(rois, h, w)
        fmt = torch.channels_last if _channels_last(input) else torch.contiguous_format
        out, pieces = _pool(lambda c0, c1: _as_rows(input[:, c0:c1], dtype),
                            _channel_blocks(input), (start, width, n * h * w), y, x,
                            input.dtype, fmt, needs_grad)
        ctx.pieces, ctx.input_shape, ctx.input_dtype, ctx.fmt = pieces, input.shape, input.dtype, fmt
        return out

    @staticmethod
    def backward(ctx, grad_out):
        n, c, h, w = ctx.input_shape
        grad = torch.empty(ctx.input_shape, dtype=ctx.input_dtype, device=grad_out.device,
                           memory_format=ctx.fmt)
        for c0, c1 in _channel_blocks(grad):
            g = _unpool(ctx.pieces, grad_out[:, c0:c1])  # (N*H*W, block)
            grad[:, c0:c1] = g.view(n, h, w, c1 - c0).permute(0, 3, 1, 2)
        return grad, None, None, None, None, None, None


class _RoIAlignRows(torch.autograd.Function):
    """``_pool`` of maps already laid out as one table of rows (T, C), with its gradient."""

    @staticmethod
    def forward(ctx, table, maps, y, x, needs_grad):
        dtype = compute_dtype(table.dtype)
        out, pieces = _pool(lambda c0, c1: table.to(dtype), [(0, table.shape[1])], maps, y, x,
                            table.dtype, torch.channels_last, needs_grad)
        ctx.pieces, ctx.table_dtype = pieces, table.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _unpool(ctx.pieces, grad_out).to(ctx.table_dtype), None, None, None, None


def _unpool(pieces, grad_out: Tensor) -> Tensor:
    """``S^T @ grad_out``: the gradient (columns, C) of the rows pooled into (K, C, PH, PW)
    outputs, summed over the chunks of RoIs, (k0, k1, S^T) each, that ``_pool`` kept."""
    dtype = compute_dtype(grad_out.dtype)
    total = None
    for k0, k1, s_t in pieces:
        g = s_t.mm(_as_rows(grad_out[k0:k1], dtype))
        total = g if total is None else total.add_(g)
    return total


def as_rois(boxes, input: Tensor) -> Tensor:
    """(K, 5) ``[batch_index, x1, y1, x2, y2]`` rows on ``input``'s device, from a tensor of
    rows or a list of per-image (K_i, 4); batch indices must be integers in [0, N)."""
    if isinstance(boxes, (list, tuple)):
        boxes = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1)
                           for i, b in enumerate(boxes)])
    if boxes.dim() != 2 or boxes.shape[1] != 5:
        raise ValueError(f"boxes must be (K, 5) [batch, x1, y1, x2, y2] or a list of (K_i, 4), "
                         f"got {tuple(boxes.shape)}")
    rois = boxes.detach().to(device=input.device)
    batch = rois[:, 0]
    if bool(((batch < 0) | (batch >= input.shape[0]) | (batch != batch.floor())).any()):
        raise ValueError(f"box batch indices must be integers in [0, {input.shape[0]})")
    return rois


def empty_pool(input: Tensor, output_size: tuple[int, int]) -> Tensor:
    """(0, C, PH, PW): an empty slice of ``input``, which keeps the autograd graph whole."""
    return input[:0, :, :1, :1].expand(0, -1, *output_size)


def roi_align(input: Tensor, boxes, output_size, spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """Pool (K, C, PH, PW) features for K boxes from ``input`` (N, C, H, W).

    ``boxes``: (K, 5) rows ``[batch_index, x1, y1, x2, y2]`` or a list of per-image (K_i, 4),
    in input-image pixels; ``spatial_scale`` maps them onto the feature map (1 / stride).
    ``output_size``: int or (PH, PW). ``sampling_ratio`` > 0 takes that many samples per bin
    along each axis; <= 0 takes ``ceil(roi_size / output_size)`` per RoI. Gradients flow to
    ``input`` only. A channels-last input gives a channels-last output.

    >>> x = torch.arange(16.).view(1, 1, 4, 4)  # value 4 * y + x at pixel centre (x, y)
    >>> roi_align(x, torch.tensor([[0., 1., 1., 3., 3.]]), 1, aligned=True)  # samples at 1 and 2
    tensor([[[[7.5000]]]])
    """
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    rois = as_rois(boxes, input)
    if rois.shape[0] == 0:
        return empty_pool(input, output_size)
    # autocast must not lower the sums' precision; the output keeps the input's dtype
    with torch.autocast(input.device.type, enabled=False):
        if input.device.type != "cpu":
            return _roi_align_bags(input, rois, tuple(output_size), float(spatial_scale),
                                   int(sampling_ratio), bool(aligned))
        # forward runs without grad mode, so whether S^T will be needed is decided here
        needs_grad = torch.is_grad_enabled() and input.requires_grad
        return _RoIAlign.apply(input, rois, tuple(output_size), float(spatial_scale),
                               int(sampling_ratio), bool(aligned), needs_grad)


def roi_align_pyramid(table: Tensor, shapes: list[tuple[int, int]], rois: Tensor, levels: Tensor,
                      output_size: int, scales: list[float], sampling_ratio: int = -1,
                      aligned: bool = False) -> Tensor:
    """RoIAlign of each RoI on its own level of a pyramid stored as one table of rows: what
    :func:`roi_align` gives level by level, in one product for all RoIs, already in the RoIs'
    order. On the CPU; gradients flow to ``table``.

    ``table`` (T, C): the levels' maps one after another, channels last, level l's N maps of
    ``shapes[l]`` (H_l, W_l) as N * H_l * W_l rows; ``rois`` (K, 5) as for :func:`roi_align`;
    ``levels`` (K,) each RoI's level; ``scales`` each level's spatial scale. Returns
    (K, C, S, S), channels-last, in the table's dtype.
    """
    if rois.shape[0] == 0:  # an empty slice of the table, as empty_pool gives
        return table[:0, :, None, None].expand(0, -1, output_size, output_size)
    device = table.device
    sizes = torch.tensor(shapes, device=device)  # (L, 2): H_l, W_l
    areas = sizes.prod(1)
    n = table.shape[0] // int(areas.sum())
    first = n * (areas.cumsum(0) - areas)  # each level's first row
    h, w = sizes[levels].unbind(1)
    start = first[levels] + rois[:, 0].long() * h * w
    scale = torch.tensor(scales, dtype=torch.float64, device=device)[levels]
    dtype = compute_dtype(table.dtype)
    with torch.autocast(device.type, enabled=False):
        y, x = _taps(rois, (output_size, output_size), (h, w), scale, sampling_ratio, aligned,
                     dtype)
        needs_grad = torch.is_grad_enabled() and table.requires_grad
        return _RoIAlignRows.apply(table, (start, w, table.shape[0]), y, x, needs_grad)


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align`.

    >>> pool = RoIAlign(7, spatial_scale=1 / 16, sampling_ratio=2)
    >>> pool(torch.zeros(1, 8, 50, 50), [torch.tensor([[0., 0., 64., 64.]])]).shape
    torch.Size([1, 8, 7, 7])
    """

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
