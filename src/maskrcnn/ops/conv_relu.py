"""A convolution and the ReLU after it in one pass over the output, when predicting on the CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.ops.winograd import WinogradConv2d


def onednn_fusable(conv: nn.Module, x: Tensor) -> bool:
    """Whether oneDNN can run ``conv`` on ``x`` (N, C, H, W) with post-ops: a plain conv with a
    bias, float32 channels-last weights and maps on the CPU, outside autograd and autocast."""
    channels_last = torch.channels_last
    return (type(conv) is nn.Conv2d and conv.bias is not None
            and torch.backends.mkldnn.is_available() and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and x.device.type == "cpu"
            and x.dtype == conv.weight.dtype == torch.float32
            and x.is_contiguous(memory_format=channels_last)
            and conv.weight.is_contiguous(memory_format=channels_last))


def conv_relu(conv: nn.Module, x: Tensor) -> Tensor:
    """relu(conv(x)), (N, C_out, H', W'). A Winograd conv applies the ReLU as it writes its
    output, and oneDNN as a post-op of the conv (the same values as the conv and a ReLU apart);
    otherwise the two ops, the ReLU in place."""
    if isinstance(conv, WinogradConv2d):
        return conv(x, relu=True)
    if onednn_fusable(conv, x):
        return torch.ops.mkldnn._convolution_pointwise(
            x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups,
            "relu", [], "")
    return F.relu(conv(x), inplace=True)
