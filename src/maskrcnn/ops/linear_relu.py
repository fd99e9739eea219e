"""A fully connected layer and the ReLU after it in one call to oneDNN's kernel, on the CPU in
float32: the box head's fc6 and fc7 (predicting and training), and the mask head's deconv as a
product when predicting.

oneDNN multiplies by weights packed once into its own layout (``packed``, kept by the layers in
a ``WeightCache``) and adds the bias and the ReLU as it writes the result. On 2 Zen 4 EPYC cores
(AVX-512) that took 0.89x the time of PyTorch's product (MKL's) and ReLU for fc6 on 1000 RoIs
of 256 x 7 x 7 (117.7 against 132.3 ms), 0.79x for fc7 (9.7 against 12.3 ms) and 0.83x-0.87x
for the mask head's deconv on 16 RoIs (7.6-7.8 against 8.8-9.3 ms, the bias and ReLU apart).
In training (``linear_relu_trained``) the weights change every step and are used as they are;
for fc6 on 2048 RoIs the forward took 257 against 302 ms, the data gradient 284 against 349 ms
and the weight gradient 264 against 315 ms.
Rounding differs from PyTorch's product by the order of the sums only.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def onednn_float32(x: Tensor) -> bool:
    """Whether oneDNN's product can take ``x``: float32 on the CPU, outside autocast, with
    oneDNN in this build of PyTorch."""
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and not torch.is_autocast_enabled("cpu"))


def fusable(x: Tensor) -> bool:
    """Whether ``linear_relu`` can take ``x``: ``onednn_float32`` and outside autograd."""
    return onednn_float32(x) and not torch.is_grad_enabled()


def packed(weight: Tensor) -> Tensor:
    """(D_out, D_in) weights in oneDNN's layout for ``linear_relu`` (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)


def linear_relu(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """relu(x @ W^T + bias), (R, D_out), for ``x`` (R, D_in) and ``weight`` = ``packed(W)``."""
    return _product(x, weight, bias, relu=True)


def _product(x: Tensor, weight: Tensor, bias: Tensor | None = None, relu: bool = False) -> Tensor:
    """x @ W^T + bias, through a ReLU if ``relu``, by oneDNN; W (D_out, D_in) packed or plain
    (a plain one, or a view of one, is reordered on each call)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none", [], "")


def linear_relu_trained(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """relu(x @ W^T + bias), (R, D_out), for ``x`` (R, D_in) and plain ``weight`` W
    (D_out, D_in), with autograd: forward and both gradients are oneDNN's products (on the
    weights as they are, which change every step)."""
    return _LinearReLU.apply(x, weight, bias)


class _LinearReLU(torch.autograd.Function):
    """relu(x @ W^T + bias) and its gradients through the ReLU, each one oneDNN product."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        y = _product(x, weight, bias, relu=True)
        ctx.save_for_backward(x, weight, y)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight, y = ctx.saved_tensors
        grad = grad.masked_fill(y <= 0, 0)  # through the ReLU
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _product(grad, weight.t())  # (R, D_out) @ W
        if ctx.needs_input_grad[1]:
            # (D_out, R) @ x; oneDNN has no product over R = 0 rows, whose sum is zero
            grad_w = _product(grad.t(), x.t()) if x.shape[0] else torch.zeros_like(weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b
