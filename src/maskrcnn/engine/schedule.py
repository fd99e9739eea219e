"""The learning-rate schedule as a pure function of the iteration (so resuming needs no state)."""

from __future__ import annotations

import math

from maskrcnn.config import SolverConfig


def lr_at(iteration: int, solver: SolverConfig, max_iter: int) -> float:
    """Linear warmup from ``warmup_factor``, then multi-step decay or cosine to zero.

    >>> from maskrcnn.config import SolverConfig
    >>> lr_at(0, SolverConfig(base_lr=0.02, warmup_iters=1000, warmup_factor=0.001), 90000)
    2e-05
    """
    base = solver.base_lr
    if solver.schedule == "cosine":
        progress = min(iteration / max(1, max_iter), 1.0)
        lr = base * 0.5 * (1 + math.cos(math.pi * progress))
    elif solver.schedule == "multistep":
        steps = [s * max_iter if s < 1 else s for s in solver.steps]
        lr = base * solver.gamma ** sum(iteration >= s for s in steps)
    else:
        raise ValueError(f"unknown schedule {solver.schedule!r}; use multistep or cosine")
    if iteration < solver.warmup_iters:
        alpha = iteration / solver.warmup_iters
        lr *= solver.warmup_factor * (1 - alpha) + alpha
    return lr
