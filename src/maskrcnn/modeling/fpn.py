"""Feature Pyramid Network (Lin et al. 2017) on top of the ResNet stages (SPEC §1.3)."""

from __future__ import annotations

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
            lateral = self.lateral[i](features[i])
            # Size-based upsampling equals 2x when the input is padded to a multiple of 32.
            top = lateral.add_(F.interpolate(top, size=lateral.shape[-2:], mode="nearest"))
            outputs.insert(0, self.output[i](top))
        outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2))
        return outputs
