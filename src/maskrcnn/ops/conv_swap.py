"""3x3 convolutions swapped for subclasses that compute them another way on the CPU
(``ops.winograd`` when predicting, ``ops.training_conv`` when training), sharing the plain
conv's parameters, so the state dict does not change."""

from __future__ import annotations

from typing import Callable

from torch import nn


def is_3x3(conv: nn.Conv2d, stride: int = 1) -> bool:
    """Whether ``conv`` is a 3x3 conv with zero padding 1 and ``stride``; with stride 1 its
    output is the input's size."""
    return (conv.kernel_size == (3, 3) and conv.stride == (stride, stride) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


class SwappedConv2d(nn.Conv2d):
    """Base of the convs that stand in for a plain ``nn.Conv2d``."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "SwappedConv2d":
        """A ``cls`` holding ``conv``'s own weight and bias parameters."""
        new = cls(conv.in_channels, conv.out_channels, 3, stride=conv.stride, padding=1,
                  bias=conv.bias is not None, device="meta")
        new.weight, new.bias = conv.weight, conv.bias
        new.train(conv.training)
        return new


def swap_convs(module: nn.Module, cls: type[SwappedConv2d], when: Callable[[nn.Module], bool]) -> int:
    """Replace every conv inside ``module`` for which ``when`` holds by ``cls.from_conv`` of it.
    Returns the number replaced."""
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if when(child):
                setattr(parent, name, cls.from_conv(child))
                swapped += 1
    return swapped
