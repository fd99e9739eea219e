"""3x3 convolutions as the CPU trainer runs them, where oneDNN's kernels are slow.

**Forward and data gradient by Winograd** (``ops.winograd``) on maps of 4096 pixels or more
with 128 channels or more in and out, in float32: the data gradient of such a convolution is
itself one, of the output's gradient by the flipped filters with inputs and outputs swapped.
The filters are transformed each step (1.7 ms for 256 channels; the weights change). On 2 Zen 3
cores the forward took 0.51x-0.52x of oneDNN's time with 256 channels on 4 maps of 64x88 or 2 of
100x134, 0.64x with 128 channels on 64x88, 0.72x-0.76x on 28 to 64 RoIs of 14x14, 0.93x on 4
maps of 32x44; on 4 maps of 16x22 (1408 pixels) it lost (1.77x). Rounding as at inference,
about 1e-5 of the output's scale.

**The weight gradient without oneDNN's kernel.** It is a sum over every output pixel p of the
batch:

    dW[o, i, ky, kx] = sum_p dY[p, o] * X[p + (ky - 1, kx - 1), i]

oneDNN's CPU kernel for it runs well below the matrix-product rate in two cases, and there the
trainer computes it another way:

- small maps with many channels (res5 of a ResNet on 256-pixel images: 4 maps of 8x11 with 512
  channels took 26-30 ms against 10-12 ms for the product on 2 Xeon cores). With the 3x3
  neighbourhoods laid out as rows (im2col: P rows of 9 C_in values) the gradient is one product,
  dY^T (C_out, P) @ patches (P, 9 C_in), whose patches are at most the weights' size while the
  batch has no more output pixels than input channels;
- every map on CPUs whose widest vectors are AVX2 (no AVX-512). Stride-2 convs take the
  patches' product there, with the neighbourhoods of every other pixel as its rows: ResNet-18's
  three on the maps of 4 images of 256x352 (64 to 128 channels on 64x88, 128 to 256 on 32x44,
  256 to 512 on 16x22) took 12.2-12.9 ms with oneDNN's data gradient, against 15.9-17.0 ms for
  oneDNN's two gradients. Stride-1 float32 maps at least a tile
  (4 pixels) high and wide take Winograd's transforms (``winograd.conv3x3_weight_grad``): 36
  multiply-adds per 4x4 tile and channel pair instead of 144. On 2 Zen 3 cores that took
  0.22x-0.73x of the time of the nine products below with 64 to 256 channels on 2 to 64 maps
  of 14x14 to 64x88 (two runs), rounded to about 1e-5 of the gradient's scale. The nine
  products, for thinner maps and other dtypes, took 0.63x-0.94x of oneDNN's time there: with x
  zero-padded and both maps flattened over the padded (H + 2, W + 2) grid, shifting a pixel by
  (ky - 1, kx - 1) is shifting its row by a constant, so each (ky, kx) is one product of dY^T
  by a window of X's rows, with no im2col copy holding each input pixel nine times.

On AVX-512 CPUs oneDNN was as fast or faster than the patches' product on larger maps (a
256-channel conv on 4 maps of 16x22: 11.8 ms against 15.0 ms on 2 Xeon cores), so they keep its
kernel but where Winograd's transforms pay (``_winograd_grad_pays``): on 2 Zen 4 EPYC cores
with AVX-512 they took 0.50x-0.92x of oneDNN's time with 128 channels on 1 to 4 maps of 16x22
to 200x336, 0.48x-0.69x with 256 on 4 maps of 16x22 to 64x88 and 0.76x-0.91x with 256 on 16
to 128 RoIs of 14x14; with 64 channels 0.67x-1.94x, no consistent winner; they lost with 128
on 14x14 (1.29x-1.60x) and on 352 pixels or fewer (1.69x-3.04x). Stride-2 convs keep oneDNN's
there (the patches' product took 0.90x-1.29x of its time).

**Gradients that are zero at most pixels.** The RPN's losses see only the sampled anchors (256
per image by default, of tens of thousands), so the gradient of its 3x3 conv's output is
zero at every other pixel. Both of that conv's gradients are sums over the output's pixels, so
the pixels where it is zero can be left out: ``grads_at_pixels`` computes them from the others
alone, with the 3x3 neighbourhoods of those pixels as the rows of one product each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.ops.conv_swap import SwappedConv2d, is_3x3, swap_convs
from maskrcnn.ops.winograd import conv3x3, conv3x3_weight_grad, winograd_weights

AVX2_ONLY = torch.backends.cpu.get_cpu_capability() == "AVX2"
"""Whether this CPU's widest vectors are AVX2's, where no 3x3 weight gradient takes oneDNN's
kernel."""


def _float32(x: Tensor) -> bool:
    return x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


def _winograd_pays(x: Tensor, out_channels: int) -> bool:
    """Whether a float32 training conv of ``x`` (N, C_in, H, W) runs forward and data gradient
    by Winograd: 4096 pixels or more, 128 channels or more in and out, maps at least a tile
    (4 pixels) high and wide."""
    n, c, h, w = x.shape
    return _float32(x) and min(c, out_channels) >= 128 and n * h * w >= 4096 and min(h, w) >= 4


def _winograd_grad_pays(x: Tensor, out_channels: int) -> bool:
    """Whether, on a CPU with AVX-512, a stride-1 float32 training conv of ``x`` (N, C_in, H, W)
    takes Winograd's weight gradient rather than oneDNN's: 1024 pixels or more, and tiles that
    waste little for its width. The transforms cost less beside the products as the channels
    grow, so the 4x4 tiles may cover up to 1.1 x min(C_in, C_out) / 128 times the map's pixels:
    128-channel maps must be about whole tiles (16x22), 256-channel ones may be 14x14, and
    64-channel ones never take it (timings in ``docs/performance.md``)."""
    n, c, h, w = x.shape
    tiled = (-(-h // 4) * 4) * (-(-w // 4) * 4)
    return (_float32(x) and n * h * w >= 1024 and min(h, w) >= 4
            and tiled * 128 <= 1.1 * h * w * min(c, out_channels))


def _few_pixels(x_shape: torch.Size) -> bool:
    """Whether a batch (N, C, H, W) has no more pixels than channels: its patches' matrix is
    then at most the weights' size."""
    n, c, h, w = x_shape
    return n * h * w <= c


def weight_grad_3x3(grad_out: Tensor, x: Tensor, stride: int = 1) -> Tensor:
    """The weight gradient (C_out, C_in, 3, 3) of a 3x3 convolution with padding 1 and
    ``stride`` of ``x`` (N, C_in, H, W) whose output's gradient is ``grad_out`` (N, C_out, H', W');
    in channels-last memory, in the inputs' dtype. Stride 2, and batches with no more pixels than
    input channels, take the patches' product; other float32 maps at least a tile (4 pixels) high
    and wide take Winograd's transforms (``winograd.conv3x3_weight_grad``); the rest the nine
    shifted products."""
    if stride != 1 or _few_pixels(x.shape):
        return _by_patches(grad_out, x, stride)
    if x.dtype == torch.float32 and min(x.shape[-2:]) >= 4:
        return conv3x3_weight_grad(x, grad_out)
    return _by_shifts(grad_out, x)


def _by_patches(grad_out: Tensor, x: Tensor, stride: int = 1) -> Tensor:
    c_in = x.shape[1]
    pixels = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # (N, H + 2, W + 2, C_in)
    patches = pixels.unfold(1, 3, stride).unfold(2, 3, stride)  # (N, H', W', C_in, 3, 3)
    patches = patches.permute(0, 1, 2, 4, 5, 3).reshape(-1, 9 * c_in)  # (P, 9 C_in): ky, kx, i
    dy = grad_out.permute(0, 2, 3, 1).reshape(-1, grad_out.shape[1])  # (P, C_out)
    return (dy.t() @ patches).view(-1, 3, 3, c_in).permute(0, 3, 1, 2)


def _by_shifts(grad_out: Tensor, x: Tensor) -> Tensor:
    n, c_in, h, w = x.shape
    c_out = grad_out.shape[1]
    # x padded by a pixel all round and the gradient by two rows and columns at the bottom
    # right, on the same (H + 2, W + 2) grids, one row per grid pixel: the gradient's pixel
    # (y, x) faces x's (y + ky, x + kx), ky (W + 2) + kx rows further on. The gradient's last
    # 2 (W + 2) + 2 rows (two columns and two rows of padding) are zeros, so its windows end
    # there and the shifted windows of x stay inside it.
    xs = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1)).view(-1, c_in)
    dy = F.pad(grad_out.permute(0, 2, 3, 1), (0, 0, 0, 2, 0, 2)).view(-1, c_out)
    rows = len(dy) - (2 * (w + 2) + 2)
    dy = dy[:rows].t()  # (C_out, rows)
    out = x.new_empty(c_out, 3, 3, c_in)
    for ky in range(3):
        for kx in range(3):
            shift = ky * (w + 2) + kx
            torch.mm(dy, xs[shift:shift + rows], out=out[:, ky, kx])
    return out.permute(0, 3, 1, 2)


_SPARSE_SHARE = 4
"""A conv marked ``sparse_grad`` takes ``grads_at_pixels`` when at most 1 in this many of its
output's pixels has a nonzero gradient."""


def _neighbourhoods(pixels: Tensor, hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The 3x3 neighbourhood of each of ``pixels`` (n,), flat indices over a batch of (H, W)
    maps: the neighbours' flat indices (n, 9), in (ky, kx) order and clamped into the pixel's
    map, and whether each lies inside the map (n, 9)."""
    h, w = hw
    image, y, x = pixels // (h * w), pixels // w % h, pixels % w
    offsets = torch.arange(-1, 2, device=pixels.device)
    ys = (y[:, None] + offsets).repeat_interleave(3, 1)
    xs = (x[:, None] + offsets).repeat(1, 3)
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    return (image[:, None] * h + ys.clamp(0, h - 1)) * w + xs.clamp(0, w - 1), inside


def grads_at_pixels(grad_out: Tensor, x: Tensor, weight: Tensor, pixels: Tensor, need_x: bool
                    ) -> tuple[Tensor | None, Tensor]:
    """The data gradient (None unless ``need_x``) and the weight gradient, both channels-last,
    of a 3x3 convolution with stride 1 and padding 1 of ``x`` (N, C_in, H, W) by ``weight``
    (C_out, C_in, 3, 3), whose output's gradient ``grad_out`` (N, C_out, H, W) is zero outside
    ``pixels`` (n,), flat indices over (N, H, W): both sums over the output's pixels taken over
    ``pixels`` alone."""
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    dy = grad_out.permute(0, 2, 3, 1).reshape(-1, c_out)[pixels]  # (n, C_out)
    index, inside = _neighbourhoods(pixels, (h, w))
    index, outside = index.view(-1), ~inside.view(-1, 1)
    rows = x.permute(0, 2, 3, 1).reshape(-1, c_in)  # (N H W, C_in)
    patches = rows[index].masked_fill_(outside, 0).view(len(pixels), 9 * c_in)  # ky, kx, i
    grad_w = (dy.t() @ patches).view(c_out, 3, 3, c_in).permute(0, 3, 1, 2)
    if not need_x:
        return None, grad_w
    # each neighbour's share of the pixel's gradient, added where it lies
    shares = (dy @ weight.permute(0, 2, 3, 1).reshape(c_out, 9 * c_in)).view(-1, c_in)
    grad_x = rows.new_zeros(rows.shape).index_add_(0, index, shares.masked_fill_(outside, 0))
    return grad_x.view(n, h, w, c_in).permute(0, 3, 1, 2), grad_w


def _nonzero_pixels(grad_out: Tensor) -> Tensor:
    """Flat indices over (N, H, W) of the pixels where ``grad_out`` (N, C, H, W), channels-last,
    is nonzero in some channel, (n,)."""
    rows = grad_out.permute(0, 2, 3, 1).reshape(-1, grad_out.shape[1])
    return rows.abs().amax(1).nonzero().view(-1)  # 7x faster than .ne(0).any(1) on 64 channels


class _Conv3x3(torch.autograd.Function):
    """conv2d(x, weight, bias, stride, padding=1), forward and data gradient by Winograd if
    ``winograd``, the weight gradient by ``weight_grad_3x3`` if ``products`` (otherwise
    oneDNN's), and both gradients by ``grads_at_pixels`` if ``sparse_grad`` and the output's
    gradient is zero at most pixels; under CPU autocast, computed in its dtype as autocast
    computes a convolution."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, winograd: bool,
                products: bool, sparse_grad: bool) -> Tensor:
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        ctx.dtypes = (x.dtype, weight.dtype)
        x, weight = x.to(dtype), weight.to(dtype)
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.winograd, ctx.products = bias is not None, winograd, products
        ctx.sparse_grad, ctx.stride = sparse_grad, stride
        bias = None if bias is None else bias.to(dtype)
        if winograd:
            return conv3x3(x, winograd_weights(weight), bias)
        with torch.autocast("cpu", enabled=False):
            return F.conv2d(x, weight, bias, stride, padding=1)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.to(x.dtype).contiguous(memory_format=torch.channels_last)
        need_x = ctx.needs_input_grad[0]
        pixels = _nonzero_pixels(grad_out) if ctx.sparse_grad else None
        if pixels is not None and len(pixels) * _SPARSE_SHARE <= grad_out[:, 0].numel():
            grad_x, grad_w = grads_at_pixels(grad_out, x, weight, pixels, need_x)
        else:
            grad_x, grad_w = _dense_grads(ctx, grad_out, x, weight, need_x)
        sum_dtype = torch.promote_types(grad_out.dtype, torch.float32)  # float64 stays float64
        grad_b = grad_out.sum((0, 2, 3), dtype=sum_dtype) if ctx.has_bias else None
        grad_x = None if grad_x is None else grad_x.to(ctx.dtypes[0])
        grad_b = None if grad_b is None else grad_b.to(ctx.dtypes[1])
        return grad_x, grad_w.to(ctx.dtypes[1]), grad_b, None, None, None, None


def _dense_grads(ctx, grad_out: Tensor, x: Tensor, weight: Tensor, need_x: bool
                 ) -> tuple[Tensor | None, Tensor]:
    """``_Conv3x3``'s data gradient (None unless ``need_x``) and weight gradient over every pixel."""
    mask = [need_x and not ctx.winograd, not ctx.products, False]
    onednn = (torch.ops.aten.convolution_backward(
        grad_out, x, weight, None, [ctx.stride] * 2, [1, 1], [1, 1], False, [0, 0], 1, mask)
        if any(mask) else (None, None))
    grad_x = onednn[0]
    if need_x and ctx.winograd:  # the conv of grad_out by the flipped, transposed filters
        grad_x = conv3x3(grad_out, winograd_weights(weight.flip(2, 3).transpose(0, 1)))
    return grad_x, weight_grad_3x3(grad_out, x, ctx.stride) if ctx.products else onednn[1]


class TrainingConv2d(SwappedConv2d):
    """A 3x3, padding-1 ``nn.Conv2d`` with stride 1 or 2 that, when training on the CPU, takes
    the weight gradient from ``weight_grad_3x3`` on AVX2-only CPUs, on batches with no more
    pixels than input channels, and with stride 1 where Winograd's pays (``_winograd_grad_pays``).
    With stride 1 it also runs forward and data gradient by Winograd where that pays
    (``_winograd_pays``); with ``sparse_grad`` set, both gradients come from
    ``grads_at_pixels`` when the output's gradient is nonzero at no more than a quarter of its
    pixels. Otherwise (and when predicting, and on GPUs) the plain conv. Same parameters and
    state dict as the conv it replaces; the same sums, rounded as Winograd's or in another order."""

    sparse_grad = False
    """Whether the output's gradient is expected to be zero at most pixels (the RPN's conv)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and torch.is_grad_enabled() and self.weight.requires_grad:
            stride = self.stride[0]
            winograd = stride == 1 and _winograd_pays(x, self.out_channels)
            products = (AVX2_ONLY or _few_pixels(x.shape)
                        or (stride == 1 and _winograd_grad_pays(x, self.out_channels)))
            sparse_grad = stride == 1 and self.sparse_grad
            if winograd or products or sparse_grad:
                return _Conv3x3.apply(x, self.weight, self.bias, stride, winograd, products, sparse_grad)
        return super().forward(x)


def use_training_convs(module: nn.Module) -> int:
    """Swap every plain 3x3 conv with padding 1 and stride 1 or 2 inside ``module`` for a
    ``TrainingConv2d`` sharing its parameters. Returns the number swapped."""
    return swap_convs(module, TrainingConv2d, lambda conv: type(conv) is nn.Conv2d
                      and (is_3x3(conv) or is_3x3(conv, stride=2)))
