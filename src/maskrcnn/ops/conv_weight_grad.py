"""The weight gradient of a 3x3 convolution as matrix products.

The gradient of a 3x3 convolution's weights is a sum over every output pixel p of the batch:

    dW[o, i, ky, kx] = sum_p dY[p, o] * X[p + (ky - 1, kx - 1), i]

oneDNN's CPU kernel for it runs well below the matrix-product rate in two cases, and there the
trainer computes it with ``torch.mm`` instead:

- small maps with many channels (res5 of a ResNet on 256-pixel images: 4 maps of 8x11 with 512
  channels took 26-30 ms against 10-12 ms for the product on 2 Xeon cores). With the 3x3
  neighbourhoods laid out as rows (im2col: P rows of 9 C_in values) the gradient is one product,
  dY^T (C_out, P) @ patches (P, 9 C_in), whose patches are at most the weights' size while the
  batch has no more output pixels than input channels;
- every map on CPUs whose widest vectors are AVX2 (no AVX-512), where nine products took
  0.63x-0.94x of the kernel's time on 2 Zen 3 cores (64 to 256 channels). With x zero-padded
  and both maps flattened over the padded (H + 2, W + 2) grid, shifting a pixel by
  (ky - 1, kx - 1) is shifting its row by a constant, so each (ky, kx) is one product of dY^T by
  a window of X's rows, with no im2col copy holding each input pixel nine times.

On AVX-512 CPUs oneDNN was as fast or faster on larger maps (a 256-channel conv on 4 maps of
16x22: 11.8 ms against 15.0 ms for the patches' product), so they keep its kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.ops.conv_swap import SwappedConv2d, is_3x3_same, swap_convs

AVX2_ONLY = torch.backends.cpu.get_cpu_capability() == "AVX2"
"""Whether this CPU's widest vectors are AVX2's, where every 3x3 weight gradient is products."""


def _few_pixels(x_shape: torch.Size) -> bool:
    """Whether a batch (N, C, H, W) has no more pixels than channels: its patches' matrix is
    then at most the weights' size."""
    n, c, h, w = x_shape
    return n * h * w <= c


def weight_grad_3x3(grad_out: Tensor, x: Tensor) -> Tensor:
    """The weight gradient (C_out, C_in, 3, 3) of a 3x3 convolution with stride 1 and padding 1
    of ``x`` (N, C_in, H, W) whose output's gradient is ``grad_out`` (N, C_out, H, W); in
    channels-last memory, in the inputs' dtype. Batches with no more pixels than input channels
    take the patches' product, the others the nine shifted products."""
    return (_by_patches if _few_pixels(x.shape) else _by_shifts)(grad_out, x)


def _by_patches(grad_out: Tensor, x: Tensor) -> Tensor:
    c_in = x.shape[1]
    pixels = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # (N, H + 2, W + 2, C_in)
    patches = pixels.unfold(1, 3, 1).unfold(2, 3, 1)  # (N, H, W, C_in, 3, 3)
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


class _Conv3x3(torch.autograd.Function):
    """conv2d(x, weight, bias, padding=1) whose weight gradient is ``weight_grad_3x3``; under
    CPU autocast, computed in its dtype as autocast computes a convolution."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        ctx.dtypes = (x.dtype, weight.dtype)
        x, weight = x.to(dtype), weight.to(dtype)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        with torch.autocast("cpu", enabled=False):
            return F.conv2d(x, weight, None if bias is None else bias.to(dtype), padding=1)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.to(x.dtype).contiguous(memory_format=torch.channels_last)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                [True, False, False])[0].to(ctx.dtypes[0])
        grad_w = weight_grad_3x3(grad_out, x).to(ctx.dtypes[1])
        grad_b = grad_out.sum((0, 2, 3), dtype=torch.float32).to(ctx.dtypes[1]) if ctx.has_bias else None
        return grad_x, grad_w, grad_b


class ProductGradConv2d(SwappedConv2d):
    """A 3x3, stride-1, padding-1 ``nn.Conv2d`` whose weight gradient, when training on an
    AVX2-only CPU or on a batch with no more pixels than input channels, is ``weight_grad_3x3``;
    otherwise (and when predicting, and on GPUs) the plain conv. Same parameters and state dict
    as the conv it replaces; the same outputs, and gradients that differ only by the order of
    the sums."""

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type == "cpu" and torch.is_grad_enabled() and self.weight.requires_grad
                and (AVX2_ONLY or _few_pixels(x.shape))):
            return _Conv3x3.apply(x, self.weight, self.bias)
        return super().forward(x)


def use_product_grad_conv(module: nn.Module) -> int:
    """Swap every plain 3x3, stride-1 conv inside ``module`` for a ``ProductGradConv2d`` sharing
    its parameters. Returns the number swapped."""
    return swap_convs(module, ProductGradConv2d, lambda conv: type(conv) is nn.Conv2d and is_3x3_same(conv))
