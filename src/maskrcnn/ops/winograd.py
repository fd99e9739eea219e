"""3x3 convolutions by Winograd's minimal filtering, F(4x4, 3x3) (Lavin & Gray, 2016).

A 4x4 block of a 3x3 convolution's output depends on a 6x6 block of its input. Transformed by
fixed matrices, the 6x6 input block ``d`` and the 3x3 filter ``g`` multiply elementwise:

    Y = A^T [(G g G^T) * (B^T d B)] A

so the channel sums become 36 independent matrix products of (tiles, C_in) by (C_in, C_out):
36 multiply-adds per output block and channel pair instead of 16 * 9 = 144. The transforms are
linear maps done as matrix products too: with the tiles laid out tile-major, (tiles, 36, C),
each tile's transform is one small product (36, 36) @ (36, C) in a batched call, and each
tile's 6x6 input block and 4x4 output block are rows of whole pixels in the NHWC maps.

Used at inference on the CPU, where the 256-channel convolutions of the FPN, the RPN and the
mask head take most of the time, and in training (``ops.training_conv``): the forward and data
gradient on large maps, and the weight gradient (``conv3x3_weight_grad``), whose sums over the
tiles are 36 products too.
Rounding differs from a direct convolution: about 1e-5 of the output's scale against 2e-6
(float32).

The work goes in chunks of tiles whose buffers are allocated once per call and reused, so that
the intermediates stay small; fresh large tensors cost page faults on every call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.ops.conv_swap import SwappedConv2d, is_3x3, swap_convs
from maskrcnn.ops.weight_cache import WeightCache

_BT = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
       [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
_G = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
      [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
_AT = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
# 2 Xeon cores, 256-channel P2 conv, earlier (36, tiles x C) layout: 114 ms; 121 at 96 tiles, 124
# at 384. 2 EPYC cores, tile-major: no other size faster on every conv (96, 384, 768 tried).
_TILES_PER_CHUNK = 192
_FIRST_CALL_PIXELS = 2048  # see WinogradConv2d._first_small_call
_ONES_COLUMN = 7  # the 6x6 block's (1, 1) entry: its column of the output transform is all ones


def _matrix(rows) -> Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def winograd_weights(weight: Tensor) -> Tensor:
    """(C_out, C_in, 3, 3) filters -> (36, C_in, C_out) transformed filters ``G g G^T``, in the
    weight's dtype.

    One matrix product, (36, 9) = G (x) G by the 9 taps laid out (9, C_in * C_out), so that it
    writes the result in its final layout (transposing the 36x larger result instead made the
    first call of a 512-channel convolution cost 150 ms on 2 cores). Each entry is a sum of 9
    terms: computing it in float64 changed no output beyond Winograd's own rounding."""
    c_out, c_in = weight.shape[:2]
    taps = weight.permute(2, 3, 1, 0).reshape(9, c_in * c_out)
    return (_filter_transform(weight) @ taps).reshape(36, c_in, c_out)


def _filter_transform(like: Tensor) -> Tensor:
    """Filter transform (36, 9) = G (x) G, acting on a 3x3 filter flattened row-major."""
    g = _matrix(_G).to(like)
    return torch.kron(g, g)


def _transforms(like: Tensor) -> tuple[Tensor, Tensor]:
    """Input transform (36, 36) = B^T (x) B^T and output transform (16, 36) = A^T (x) A^T, acting
    on a 6x6 block flattened row-major."""
    bt, at = _matrix(_BT), _matrix(_AT)
    return torch.kron(bt, bt).to(like), torch.kron(at, at).to(like)


def conv3x3(x: Tensor, u: Tensor, bias: Tensor | None = None, relu: bool = False,
            out: Tensor | None = None) -> Tensor:
    """The 3x3 convolution with stride 1 and padding 1 of ``x`` (N, C_in, H, W) by the filters
    whose ``winograd_weights`` are ``u`` (36, C_in, C_out), plus ``bias`` (C_out,), through a
    ReLU if ``relu``.

    Returns (N, C_out, H, W) in channels-last memory: ``out`` itself if given (a channels-last
    tensor of that shape, not overlapping ``x``), otherwise a new tensor. No autograd of its
    own: inference calls it directly, and ``ops.training_conv`` from an autograd function.

    Column 7 of the output transform, the 6x6 block's (1, 1) entry, is all ones, so the bias
    goes into that one of the 36 products, (tiles, C_out), instead of into every output pixel;
    the ReLU is applied as the blocks are written out. Both save a pass over the output map.
    """
    n, c, h, w = x.shape
    co = u.shape[2]
    nhwc = x.permute(0, 2, 3, 1)
    result = out if out is not None else torch.empty(
        (n, co, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    pixels = result.permute(0, 2, 3, 1)  # (N, H, W, C_out), its memory

    tiles = _InputTiles(nhwc, _TILES_PER_CHUNK)
    v = torch.empty_like(tiles.d)
    m = x.new_empty((36, tiles.size, co))
    y = x.new_empty((tiles.size, 16, co))
    kb, ka = (t.expand(tiles.size, *t.shape) for t in _transforms(x))  # one per tile, no copies
    for i0, i1, r0, r1 in tiles.chunks():
        k = tiles.fill(i0, i1, r0, r1)
        vk = torch.bmm(kb[:k], tiles.d[:k], out=v[:k])  # (k, 36, C_in)
        mk = torch.bmm(vk.transpose(0, 1), u, out=m[:, :k])  # (36, k, C_out)
        if bias is not None:
            mk[_ONES_COLUMN].add_(bias)
        yk = torch.bmm(ka[:k], mk.transpose(0, 1), out=y[:k])  # (k, 16, C_out)
        blocks = yk.view(i1 - i0, r1 - r0, tiles.tw, 4, 4, co)
        _put(pixels[i0:i1, 4 * r0:min(h, 4 * r1)], blocks, relu)
    return result


def conv3x3_weight_grad(x: Tensor, grad_out: Tensor) -> Tensor:
    """The weight gradient (C_out, C_in, 3, 3), channels-last, of the 3x3 convolution with
    stride 1 and padding 1 of ``x`` (N, C_in, H, W) whose output's gradient is ``grad_out``
    (N, C_out, H, W), by the same transforms as ``conv3x3``.

    Each output block is Y = A^T [U * V] A with U = G g G^T, so summed over the blocks

        dU = sum over blocks of (A dY A^T) * V,    dg = G^T dU G

    and the sum over blocks is 36 matrix products (C_out, tiles) @ (tiles, C_in): 36
    multiply-adds per tile and channel pair instead of 144."""
    n, c, h, w = x.shape
    co = grad_out.shape[1]
    if n == 0:  # no blocks to sum over
        return x.new_zeros((co, c, 3, 3)).contiguous(memory_format=torch.channels_last)
    tiles = _InputTiles(x.permute(0, 2, 3, 1), _TILES_PER_CHUNK)
    v = torch.empty_like(tiles.d)
    # the chunk's output gradient on whole tiles, zero past the map's bottom and right edges
    tw = tiles.tw
    band = grad_out.new_zeros((tiles.imgs, 4 * tiles.rows, 4 * tw, co))
    e = grad_out.new_empty((tiles.size, 16, co))
    f = grad_out.new_empty((tiles.size, 36, co))
    kb, ka = _transforms(x)
    kb, ka_t = kb.expand(tiles.size, 36, 36), ka.t().expand(tiles.size, 36, 16)
    du = x.new_empty((36, co, c))
    dy = grad_out.permute(0, 2, 3, 1)
    for chunk, (i0, i1, r0, r1) in enumerate(tiles.chunks()):
        k = tiles.fill(i0, i1, r0, r1)
        vk = torch.bmm(kb[:k], tiles.d[:k], out=v[:k])  # (k, 36, C_in)
        ni, nr = i1 - i0, r1 - r0
        rows = min(h, 4 * r1) - 4 * r0
        bandv = band[:ni, :4 * nr]
        bandv[:, :rows, :w] = dy[i0:i1, 4 * r0:4 * r0 + rows]
        bandv[:, rows:].zero_()
        e[:k].view(ni, nr, tw, 4, 4, co).copy_(bandv.view(ni, nr, 4, tw, 4, co).transpose(2, 3))
        fk = torch.bmm(ka_t[:k], e[:k], out=f[:k])  # (k, 36, C_out): A dY A^T
        # (36, C_out, k) @ (36, k, C_in), the first chunk's written, the others' added
        du.baddbmm_(fk.permute(1, 2, 0), vk.transpose(0, 1), beta=1 if chunk else 0)
    taps = torch.matmul(_filter_transform(x).t(), du.transpose(0, 1))  # (C_out, 9, C_in)
    return taps.view(co, 3, 3, c).permute(0, 3, 1, 2)


class _InputTiles:
    """The 6x6 input blocks of the 4x4 output tiles of a 3x3 convolution of ``nhwc``
    (N, H, W, C), a chunk at a time: ``imgs`` images by ``rows`` tile rows, about
    ``per_chunk`` tiles, laid out tile-major in ``d`` (tiles, 36, C). A chunk's input band,
    zero-padded, lives in one buffer reused from chunk to chunk."""

    def __init__(self, nhwc: Tensor, per_chunk: int):
        n, h, w, c = nhwc.shape
        self.nhwc = nhwc
        self.th, self.tw = -(-h // 4), -(-w // 4)  # the last tiles may overhang
        self.rows = max(1, min(self.th, per_chunk // self.tw))
        self.imgs = max(1, min(n, per_chunk // (self.th * self.tw))) if self.rows == self.th else 1
        self.size = self.imgs * self.rows * self.tw
        self.band = nhwc.new_zeros((self.imgs, 4 * self.rows + 2, 4 * self.tw + 2, c))
        self.d = nhwc.new_empty((self.size, 36, c))

    def chunks(self):
        """(first image, end image, first tile row, end tile row) of each chunk."""
        n = self.nhwc.shape[0]
        for i0 in range(0, n, self.imgs):
            for r0 in range(0, self.th, self.rows):
                yield i0, min(n, i0 + self.imgs), r0, min(self.th, r0 + self.rows)

    def fill(self, i0: int, i1: int, r0: int, r1: int) -> int:
        """Lay out the chunk's blocks in ``d``; returns their number."""
        _, h, w, c = self.nhwc.shape
        ni, nr = i1 - i0, r1 - r0
        top, bottom = 4 * r0 - 1, min(h, 4 * r1 + 1)  # input rows of the band
        skip = 1 if top < 0 else 0
        band = self.band[:ni, :4 * nr + 2]
        band[:, skip:skip + bottom - top - skip, 1:w + 1] = self.nhwc[i0:i1, top + skip:bottom]
        band[:, bottom - top:].zero_()
        if skip:
            band[:, 0].zero_()
        k = ni * nr * self.tw
        blocks = band.unfold(1, 6, 4).unfold(2, 6, 4).permute(0, 1, 2, 4, 5, 3)
        self.d[:k].view(ni, nr, self.tw, 6, 6, c).copy_(blocks)
        return k


def _put(dest: Tensor, blocks: Tensor, relu: bool) -> None:
    """Write output blocks (n, rows, cols, 4, 4, C) into ``dest`` (n, H, W, C), H <= 4 rows and
    W <= 4 cols, through a ReLU if ``relu``: full blocks in one copy, a partial last row or
    column apart."""
    blocks = blocks.permute(0, 1, 3, 2, 4, 5)  # (n, rows, 4, cols, 4, C)
    for r0, r1, sr in _parts(dest.shape[1]):
        band = dest.narrow(1, 4 * r0, (r1 - r0) * sr).unflatten(1, (r1 - r0, sr))
        for c0, c1, sc in _parts(dest.shape[2]):
            d = band.narrow(3, 4 * c0, (c1 - c0) * sc).unflatten(3, (c1 - c0, sc))
            s = blocks[:, r0:r1, :sr, c0:c1, :sc]
            if relu:
                torch.clamp_min(s, 0, out=d)
            else:
                d.copy_(s)


def _parts(size: int) -> list[tuple[int, int, int]]:
    """An axis of ``size`` pixels as (first tile, end tile, pixels per tile): the full 4-pixel
    tiles, then the partial last one if any."""
    full, rest = divmod(size, 4)
    return [(0, full, 4)] * (full > 0) + [(full, full + 1, rest)] * (rest > 0)


class WinogradConv2d(SwappedConv2d):
    """A 3x3, stride-1, padding-1 ``nn.Conv2d`` that runs as ``conv3x3`` when it is only
    predicting on the CPU in float32 (no autograd, no autocast); otherwise as the plain conv.
    Same parameters and state dict as the conv it replaces. The transformed filters are computed
    on first use (on a small map, the second: ``_first_small_call``) and kept (4x the weights'
    memory) until the weights change."""

    @classmethod
    def eligible(cls, conv: nn.Module) -> bool:
        # plain convs and those that train another way (``ops.training_conv``)
        return isinstance(conv, nn.Conv2d) and not isinstance(conv, cls) and is_3x3(conv)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._transformed = WeightCache(winograd_weights)
        self._called = False

    def fast(self, x: Tensor) -> bool:
        """Whether ``x`` goes through ``conv3x3``: float32 on the CPU, no autocast, no autograd,
        and maps at least one 4-pixel tile high and wide. Thinner maps have too few output
        pixels per tile to pay for reading the transformed filters, 4x the weights (a
        512-channel conv on a 1x42 map: 7.0 ms against 1.7 ms for oneDNN's; on 3x42, 8.0 against
        4.4; on 10x42, 8.1 against 9.8; 2 Xeon cores)."""
        return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
                and min(x.shape[-2:]) >= 4 and not torch.is_autocast_enabled("cpu")
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)))

    def forward(self, x: Tensor, relu: bool = False, out: Tensor | None = None) -> Tensor:
        """The conv of ``x`` (N, C_in, H, W), through a ReLU if ``relu`` (in the same pass on
        the fast path), written into ``out`` if given (see ``conv3x3``)."""
        if not self.fast(x) or self._first_small_call(x):
            y = super().forward(x)
            y = F.relu(y, inplace=True) if relu else y
            return y if out is None else out.copy_(y)
        bias = None if self.bias is None else self.bias.detach()
        return conv3x3(x, self._transformed(self.weight), bias, relu, out)

    def _first_small_call(self, x: Tensor) -> bool:
        """Whether this is the conv's first fast call and on fewer than ``_FIRST_CALL_PIXELS``
        pixels (N H W): it then runs direct, and the filters are transformed on the next call.
        On maps that small one call saves less than the transform costs into fresh memory (512
        channels on 10x42: direct 10.7-13.5 ms, the transform and Winograd 21.4-29.0 ms; on
        25x42: 22.4-23.4 against 25.9-26.9 ms; 2 Zen 4 cores, fresh processes), and a process
        that segments one image never needs those filters: R50-FPN's first inference then adds
        76-138 MiB less memory (res5's filters alone are 113 MB), in about the same time or
        less. That first call rounds as the direct conv does, the later ones as Winograd's."""
        first, self._called = not self._called, True
        n, _, h, w = x.shape
        return first and n * h * w < _FIRST_CALL_PIXELS


def to_mosaic(x: Tensor, across: int) -> Tensor:
    """(R, C, H, W) -> (1, C, rows (H + 1) - 1, across (W + 1) - 1), channels-last: the maps
    ``across`` to a row, each but the last of a row or column followed by a zero seam, a row or
    column of zeros; the places after the R-th map are zero. A 3x3 convolution with zero
    padding of 1 gives each map's pixels what it gives the map alone, as long as the seams are
    zero: a pixel's 3x3 neighbourhood reaches into a seam, not past it (the mask head's convs,
    ``ops.conv_relu.conv_relu_stack``)."""
    r, c, h, w = x.shape
    rows = -(-r // across)
    mosaic = x.new_zeros((rows * (h + 1) - 1, across * (w + 1) - 1, c))
    _copy_places(_places(mosaic, rows, across, h, w), x.permute(0, 2, 3, 1), into=True)
    return mosaic[None].permute(0, 3, 1, 2)


def from_mosaic(y: Tensor, r: int, h: int, w: int) -> Tensor:
    """The first R maps (R, C, H, W), channels-last, of a channels-last mosaic (1, C, H', W')."""
    c, hm, wm = y.shape[1:]
    maps = y.new_empty((r, h, w, c))
    places = _places(y[0].permute(1, 2, 0), (hm + 1) // (h + 1), (wm + 1) // (w + 1), h, w)
    _copy_places(places, maps, into=False)
    return maps.permute(0, 3, 1, 2)


def _places(pixels: Tensor, rows: int, across: int, h: int, w: int) -> Tensor:
    """The (rows, across, H, W, C) view of the maps' places in contiguous mosaic pixels (H', W', C)."""
    assert pixels.is_contiguous()
    wm, c = pixels.shape[1:]
    return pixels.as_strided((rows, across, h, w, c), ((h + 1) * wm * c, (w + 1) * c, wm * c, c, 1))


def _copy_places(places: Tensor, maps: Tensor, into: bool) -> None:
    """Copy the R maps (R, H, W, C) into their places (rows, across, H, W, C), or back."""
    r, across = maps.shape[0], places.shape[1]
    full = r // across
    pairs = [(places[:full], maps[:full * across].unflatten(0, (full, across)))]
    pairs += [(places[k // across, k % across], maps[k]) for k in range(full * across, r)]
    for place, m in pairs:
        if into:
            place.copy_(m)
        else:
            m.copy_(place)


def use_winograd(module: nn.Module, min_channels: int = 128) -> int:
    """Swap every eligible 3x3 conv with at least ``min_channels`` inputs and outputs inside
    ``module`` for a ``WinogradConv2d`` sharing its parameters. Returns the number swapped."""
    return swap_convs(module, WinogradConv2d, lambda conv: WinogradConv2d.eligible(conv) and min(
        conv.in_channels, conv.out_channels) >= min_channels)
