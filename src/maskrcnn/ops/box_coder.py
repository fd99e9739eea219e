"""Box regression parameterisation (R-CNN, SPEC §1.10): deltas of a target box relative to a
reference box, as centre offsets in units of the reference size and log size ratios.

Weights scale the deltas: (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for the box head. The
arithmetic follows torchvision's BoxCoder operation for operation, so float32 and float64
results agree bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from maskrcnn.ops.boxes import compute_dtype

SCALE_CLAMP = math.log(1000.0 / 16)  # keeps exp() finite for wild predictions


def encode(reference: Tensor, target: Tensor, weights: tuple[float, float, float, float]) -> Tensor:
    """Deltas (N, 4) that turn ``reference`` boxes (N, 4) into ``target`` boxes (N, 4).

    >>> encode(torch.tensor([[0., 0., 10., 10.]]), torch.tensor([[1., 0., 11., 10.]]), (1, 1, 1, 1))
    tensor([[0.1000, 0.0000, 0.0000, 0.0000]])
    """
    wx, wy, ww, wh = weights
    rw = reference[:, 2] - reference[:, 0]
    rh = reference[:, 3] - reference[:, 1]
    rx = reference[:, 0] + 0.5 * rw
    ry = reference[:, 1] + 0.5 * rh
    tw = target[:, 2] - target[:, 0]
    th = target[:, 3] - target[:, 1]
    tx = target[:, 0] + 0.5 * tw
    ty = target[:, 1] + 0.5 * th
    return torch.stack([wx * (tx - rx) / rw, wy * (ty - ry) / rh,
                        ww * torch.log(tw / rw), wh * torch.log(th / rh)], dim=1)


def decode(deltas: Tensor, reference: Tensor, weights: tuple[float, float, float, float],
           clamp: float = SCALE_CLAMP) -> Tensor:
    """Boxes from deltas: (N, 4C) deltas on (N, 4) references -> (N, 4C) boxes (C >= 1).

    The log-size deltas are clamped at ``clamp`` after removing the weights; encoding is not
    clamped. Boxes come in the deltas' dtype, float32 for half-precision deltas: in
    float16, ``exp(dw) * w`` (up to 62.5 w) overflows once w passes 1,048 pixels, and
    bfloat16 would round the references' corners.

    >>> decode(torch.tensor([[0.1, 0., 0., 0.]]), torch.tensor([[0., 0., 10., 10.]]), (1, 1, 1, 1))
    tensor([[ 1.,  0., 11., 10.]])
    """
    wx, wy, ww, wh = weights
    deltas = deltas.to(compute_dtype(deltas.dtype))
    reference = reference.to(deltas.dtype)
    w = (reference[:, 2] - reference[:, 0])[:, None]
    h = (reference[:, 3] - reference[:, 1])[:, None]
    cx = reference[:, 0, None] + 0.5 * w
    cy = reference[:, 1, None] + 0.5 * h
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw = (deltas[:, 2::4] / ww).clamp(max=clamp)
    dh = (deltas[:, 3::4] / wh).clamp(max=clamp)
    px, py = dx * w + cx, dy * h + cy
    half_w = 0.5 * (torch.exp(dw) * w)
    half_h = 0.5 * (torch.exp(dh) * h)
    return torch.stack([px - half_w, py - half_h, px + half_w, py + half_h], dim=2).flatten(1)
