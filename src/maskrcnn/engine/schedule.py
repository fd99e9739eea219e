"""The learning-rate schedule as a pure function of the iteration.

Because the rate at iteration ``it`` depends only on ``(it, solver config, max_iter)``, a
resumed run needs no scheduler state: the checkpoint's iteration (and, for wall-time runs, its
``max_iter``) is enough to continue on exactly the same curve.
"""

from __future__ import annotations

import math

from maskrcnn.config import SolverConfig


def step_iterations(solver: SolverConfig, max_iter: int) -> list[int]:
    """The decay iterations: ``steps`` below 1 are fractions of ``max_iter``.

    >>> from maskrcnn.config import SolverConfig
    >>> step_iterations(SolverConfig(steps=(0.5, 0.75)), 1000)
    [500, 750]
    """
    return [int(round(s * max_iter)) if s < 1 else int(s) for s in solver.steps]


def lr_at(iteration: int, solver: SolverConfig, max_iter: int) -> float:
    """The learning rate used for the update of ``iteration`` (counted from 0).

    Linear warmup over ``warmup_iters`` from ``base_lr * warmup_factor`` to ``base_lr``,
    multiplied into either multi-step decay (x ``gamma`` at each of ``steps``) or a cosine
    from ``base_lr`` at 0 to 0 at ``max_iter``.

    >>> from maskrcnn.config import SolverConfig
    >>> s = SolverConfig(base_lr=0.02, warmup_iters=1000, warmup_factor=0.001, steps=(60000, 80000))
    >>> lr_at(0, s, 90000), lr_at(1000, s, 90000), round(lr_at(70000, s, 90000), 6)
    (2e-05, 0.02, 0.002)
    """
    base = solver.base_lr
    if solver.schedule == "cosine":
        progress = min(iteration / max(1, max_iter), 1.0)
        lr = base * 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # "multistep"; the config refuses other schedules
        lr = base * solver.gamma ** sum(iteration >= s for s in step_iterations(solver, max_iter))
    if iteration < solver.warmup_iters:
        alpha = iteration / solver.warmup_iters
        lr *= solver.warmup_factor * (1.0 - alpha) + alpha
    return lr
