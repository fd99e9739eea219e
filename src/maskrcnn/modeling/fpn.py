"""Feature Pyramid Network (Lin et al. 2017) on top of the ResNet stages (SPEC §1.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.ops.winograd import WinogradConv2d


class FPN(nn.Module):
    """Lateral 1x1 convs, nearest top-down upsampling, 3x3 output convs, P6 by subsampling P5.

    ``forward([C2..C5])`` -> ``[P2, P3, P4, P5, P6]``, each (N, out_channels, H/stride, W/stride).
    P6 (stride 64) feeds only the RPN. When predicting on the CPU in channels-last memory,
    P2-P5 are written one after another into one buffer, so that RoIAlign can pool every box
    from the pyramid in one product (``pyramid_table``).
    """

    def __init__(self, in_channels: list[int], out_channels: int = 256):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1)
                                    for _ in in_channels)
        self.out_channels = out_channels
        for conv in [*self.lateral, *self.output]:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        into = self._pyramid(features)
        top = self.lateral[-1](features[-1])
        outputs = [_conv(self.output[-1], top, into[-1])]
        for i in range(len(features) - 2, -1, -1):
            top = add_upsampled(self.lateral[i](features[i]), top)
            outputs.insert(0, _conv(self.output[i], top, into[i]))
        outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2))
        return outputs

    def _pyramid(self, features: list[Tensor]) -> list[Tensor | None]:
        """When predicting on the CPU (no autograd, no autocast) with channels-last maps, the
        maps P2-P5 are to be written into: (N, C, H_l, W_l) channels-last views of one buffer,
        level after level. Otherwise Nones."""
        x = features[0]
        if (x.device.type != "cpu" or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu")
                or not x.is_contiguous(memory_format=torch.channels_last)):
            return [None] * len(features)
        n, c = x.shape[0], self.out_channels
        sizes = [f.shape[-2:] for f in features]
        rows = [n * h * w for h, w in sizes]
        buffer = x.new_empty((sum(rows), c))
        return [part.view(n, h, w, c).permute(0, 3, 1, 2)
                for part, (h, w) in zip(buffer.split(rows), sizes)]


def _conv(conv: nn.Module, x: Tensor, out: Tensor | None) -> Tensor:
    """``conv(x)``, written into ``out`` if given."""
    if out is None:
        return conv(x)
    if isinstance(conv, WinogradConv2d):
        return conv(x, out=out)
    return out.copy_(conv(x))


def pyramid_table(maps: list[Tensor]) -> Tensor | None:
    """The (T, C) rows of ``maps`` (N, C, H_l, W_l) when they lie one after another in one
    channels-last buffer, as FPN writes them when predicting on the CPU; otherwise None."""
    first = maps[0]
    end = first.storage_offset()
    for m in maps:
        if (m.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or m.storage_offset() != end or m.shape[:2] != first.shape[:2]
                or not m.is_contiguous(memory_format=torch.channels_last)):
            return None
        end += m.numel()
    c = first.shape[1]
    return first.as_strided(((end - first.storage_offset()) // c, c), (c, 1))


def add_upsampled(lateral: Tensor, top: Tensor) -> Tensor:
    """``lateral`` (N, C, H, W) += ``top`` (N, C, h, w) upsampled to (H, W) by nearest neighbour,
    in place. When predicting and H, W = 2h, 2w (an input padded to a multiple of 32), each top
    cell is added to its 2x2 block through a broadcast view, without building the upsampled map
    (4x faster at P2). With autograd the upsample's backward is the faster one (the broadcast
    made a training step 3-4% slower), so training upsamples."""
    (h, w), (big_h, big_w) = top.shape[-2:], lateral.shape[-2:]
    grad = torch.is_grad_enabled() and (lateral.requires_grad or top.requires_grad)
    if grad or (big_h, big_w) != (2 * h, 2 * w):
        return lateral.add_(F.interpolate(top, size=(big_h, big_w), mode="nearest"))
    blocks = lateral.unflatten(3, (w, 2)).unflatten(2, (h, 2))  # (N, C, h, 2, w, 2)
    blocks.add_(top[:, :, :, None, :, None])
    return lateral
