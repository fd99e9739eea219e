"""The weight gradient of a 3x3 convolution on small maps, as one matrix product.

The gradient of a 3x3 convolution's weights is a sum over every output pixel p of the batch:

    dW[o, (ky, kx, i)] = sum_p dY[p, o] * X[p + (ky - 1, kx - 1), i]

With the 3x3 neighbourhoods of the input laid out as rows (im2col: P rows of 9 C_in values),
that is one matrix product, dY^T (C_out, P) @ patches (P, 9 C_in). oneDNN's CPU kernel for this
gradient runs at a third to a half of the matrix-product rate when the maps are small and the
channels many: res5 of a ResNet on 256-pixel images, 4 maps of 8x11 pixels with 512 channels,
took 26-30 ms in float32 against 10-12 ms for the product (10-13 against 4-5 ms in bfloat16;
2 Xeon cores). On larger maps oneDNN is as fast or faster, so the product is used only while the
batch has no more output pixels than the convolution has input channels; its patches are then
at most 9 C_in^2 values, the size of the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.ops.conv_swap import SwappedConv2d, is_3x3_same, swap_convs


def weight_grad_3x3(grad_out: Tensor, x: Tensor) -> Tensor:
    """The weight gradient (C_out, C_in, 3, 3) of a 3x3 convolution with stride 1 and padding 1
    of ``x`` (N, C_in, H, W) whose output's gradient is ``grad_out`` (N, C_out, H, W); in
    channels-last memory, in the inputs' dtype."""
    c_in = x.shape[1]
    pixels = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # (N, H + 2, W + 2, C_in)
    patches = pixels.unfold(1, 3, 1).unfold(2, 3, 1)  # (N, H, W, C_in, 3, 3)
    patches = patches.permute(0, 1, 2, 4, 5, 3).reshape(-1, 9 * c_in)  # (P, 9 C_in): ky, kx, i
    dy = grad_out.permute(0, 2, 3, 1).reshape(-1, grad_out.shape[1])  # (P, C_out)
    return (dy.t() @ patches).view(-1, 3, 3, c_in).permute(0, 3, 1, 2)


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


class SmallMapConv2d(SwappedConv2d):
    """A 3x3, stride-1, padding-1 ``nn.Conv2d`` whose weight gradient, when training on the CPU
    on a batch with no more output pixels than input channels, is ``weight_grad_3x3``; otherwise
    (and when predicting) the plain conv. Same parameters and state dict as the conv it replaces;
    the same outputs, and gradients that differ only by the order of the sums."""

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        if (x.device.type == "cpu" and torch.is_grad_enabled() and self.weight.requires_grad
                and n * h * w <= self.in_channels):
            return _Conv3x3.apply(x, self.weight, self.bias)
        return super().forward(x)


def use_small_map_conv(module: nn.Module) -> int:
    """Swap every plain 3x3, stride-1 conv inside ``module`` for a ``SmallMapConv2d`` sharing
    its parameters. Returns the number swapped."""
    return swap_convs(module, SmallMapConv2d, lambda conv: type(conv) is nn.Conv2d and is_3x3_same(conv))
