"""Feature Pyramid Network (Lin et al. 2017) on top of the ResNet stages (SPEC §1.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FPN(nn.Module):
    """Lateral 1x1 convs, nearest top-down upsampling, 3x3 output convs, P6 by subsampling P5.

    ``forward([C2..C5])`` -> ``[P2, P3, P4, P5, P6]``, each (N, out_channels, H/stride, W/stride).
    P6 (stride 64) feeds only the RPN.
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
        top = self.lateral[-1](features[-1])
        outputs = [self.output[-1](top)]
        for i in range(len(features) - 2, -1, -1):
            top = add_upsampled(self.lateral[i](features[i]), top)
            outputs.insert(0, self.output[i](top))
        outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2))
        return outputs


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
