"""A convolution and the ReLU after it in one pass over the output, when predicting on the CPU;
and stacks of such 3x3 convolutions on many small maps (the mask head's)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.ops.winograd import WinogradConv2d, from_mosaic, to_mosaic


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


_MOSAIC_ACROSS = 3
_MOSAIC_MIN_MAPS = 12  # 7 RoIs: 1.10x the time one by one (2 of 9 places empty); 12: 0.84x


def conv_relu_stack(x: Tensor, convs) -> Tensor:
    """``x`` (R, C, H, W) through [3x3 conv, ReLU] for each of ``convs`` in turn.

    Many small maps, such as the mask head's 14x14 RoI features, waste a quarter of Winograd's
    work one by one: a 14-pixel side takes four 4-pixel tiles, 16 pixels. So when at least
    ``_MOSAIC_MIN_MAPS`` maps go through ``WinogradConv2d``'s fast path, they go as one mosaic
    (``to_mosaic``) instead, whose seams are cleared after each ReLU: three 14-pixel maps and
    their two seams are 44 pixels, 11 tiles. The same sums as one map at a time, tiled
    differently (100 RoIs of 256 channels, four convs: 0.88x-0.93x the time, 2 Xeon cores)."""
    r, _, h, w = x.shape
    mosaic = (len(convs) > 0 and r >= _MOSAIC_MIN_MAPS
              and all(isinstance(c, WinogradConv2d) and c.fast(x) for c in convs))
    if not mosaic:
        for conv in convs:
            x = conv_relu(conv, x)
        return x
    y, spare = to_mosaic(x, _MOSAIC_ACROSS), None
    for conv in convs:
        # each conv after the first writes into the previous conv's input where it fits:
        # no fresh pages to fault in
        y, spare = conv(y, relu=True, out=spare if _fits(spare, y, conv) else None), y
        pixels = y[0].permute(1, 2, 0)  # (rows, columns, C), channels-last
        pixels[h::h + 1].zero_()
        pixels[:, w::w + 1].zero_()
    return from_mosaic(y, r, h, w)


def _fits(buffer: Tensor | None, x: Tensor, conv: nn.Conv2d) -> bool:
    """Whether ``buffer`` can hold ``conv``'s output for ``x``, a map of the same size."""
    return (buffer is not None and buffer.shape[1] == conv.out_channels
            and buffer.shape[2:] == x.shape[2:])
