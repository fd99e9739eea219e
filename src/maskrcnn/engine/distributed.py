"""Multi-process training under ``torchrun``: gloo on CPUs, NCCL on GPUs."""

from __future__ import annotations

import os

import torch
import torch.distributed as torch_dist


def init() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch_dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        torch_dist.init_process_group(backend)
    return (torch_dist.get_rank(), torch_dist.get_world_size()) if world > 1 else (0, 1)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier(world: int) -> None:
    if world > 1:
        torch_dist.barrier()


def mean_losses(losses: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    """Loss values averaged over processes, for logging."""
    values = torch.stack([v.detach().float() for v in losses.values()])
    if world > 1:
        torch_dist.all_reduce(values)
        values /= world
    return {k: float(v) for k, v in zip(losses, values)}
