"""The optimizer: parameter groups, SGD or AdamW as one fused kernel, and the layout that
kernel needs on the CPU."""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Iterator

import torch
from torch import Tensor, nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two SGD groups: with weight decay, and normalisation
    parameters without it (decaying BN/GN scales towards 0 only fights the normalisation).

    >>> [len(g["params"]) for g in param_groups(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), 1e-4)]
    [2, 2]
    """
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    decay, no_decay = [], []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                (no_decay if isinstance(module, norm_types) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(solver, groups: list[dict]) -> torch.optim.Optimizer:
    """SGD with momentum, or AdamW (``solver.momentum`` as its beta1), over ``groups``.

    The fused implementation updates all parameters in one kernel: the same maths, and on a CPU
    2.4x (SGD) to 5x (AdamW) faster than the per-parameter loop, about 35 ms of each step of
    the small model with AdamW. Parameters on a device without it get the plain loop.

    >>> from maskrcnn.config import SolverConfig
    >>> type(build_optimizer(SolverConfig(optimizer="adamw"), [{"params": [nn.Parameter(torch.zeros(1))]}])).__name__
    'AdamW'
    """
    if solver.optimizer == "sgd":
        make = partial(torch.optim.SGD, lr=solver.base_lr, momentum=solver.momentum)
    else:  # "adamw"; the config refuses other optimizers
        make = partial(torch.optim.AdamW, lr=solver.base_lr, betas=(solver.momentum, 0.999))
    try:  # the optimizer fills defaults into the group dicts, so each attempt gets copies
        return make([dict(g) for g in groups], fused=True)
    except (RuntimeError, TypeError):  # a device without fused kernels for these parameters
        return make([dict(g) for g in groups])


@contextlib.contextmanager
def dense_layout(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Inside, every channels-last conv weight (O, I, kh, kw) of ``optimizer``, its gradient and
    its state tensors are the dense (O, kh, kw, I) tensors that their memory holds.

    The fused CPU kernels copy any tensor that is not contiguous in the default layout into one
    that is, and the result back: for the small CPU model's weights (13.6M values, 25 conv
    weights channels-last) an SGD step takes 8.2 ms that way and 4.1 ms on these views. The
    values are the same; on leaving, parameters, gradients and state have their usual shapes
    again (state created inside comes out channels-last, like its parameter).
    """
    swapped = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None or p.dim() != 4 or p.is_contiguous() or not _channels_last(p):
                continue
            state = optimizer.state[p]
            for key, value in state.items():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    state[key] = _to_dense(value)
            _set(p, _to_dense(p.data), _to_dense(p.grad))
            swapped.append(p)
    try:
        yield
    finally:
        for p in swapped:
            state = optimizer.state[p]
            for key, value in state.items():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    state[key] = _from_dense(value)
            _set(p, _from_dense(p.data), _from_dense(p.grad))


def _channels_last(t: Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last)


def _to_dense(t: Tensor) -> Tensor:
    """(O, I, kh, kw) -> (O, kh, kw, I) over the same channels-last memory (made so if needed)."""
    return t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)


def _from_dense(t: Tensor) -> Tensor:
    return t.permute(0, 3, 1, 2)


def _set(p: nn.Parameter, data: Tensor, grad: Tensor) -> None:
    p.grad = None  # a gradient must match its parameter's shape when it is set
    p.data = data
    p.grad = grad
