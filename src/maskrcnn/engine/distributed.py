"""Multi-process training under ``torchrun``: gloo on CPUs, NCCL on GPUs.

Every helper is a no-op in a single process, so the trainer calls them unconditionally.
``torchrun --nproc_per_node=2 -m maskrcnn.cli train ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous address that :func:`init_from_env` reads.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as torch_dist

# Rank 0 evaluates and writes checkpoints while the others wait in a collective; evaluating
# COCO val on one GPU can take longer than the 10-30 minute default timeouts.
TIMEOUT = datetime.timedelta(hours=2)


def init_from_env(device_type: str = "cpu") -> tuple[int, int]:
    """Join the process group torchrun describes; returns (rank, world size), (0, 1) alone.

    >>> init_from_env()  # without torchrun
    (0, 1)
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch_dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        torch_dist.init_process_group(backend, timeout=TIMEOUT)
    return get_rank(), get_world_size()


def get_rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def get_world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def local_rank() -> int:
    """This process's GPU index on its machine."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True in the one process that logs, evaluates and writes files."""
    return get_rank() == 0


def barrier() -> None:
    if get_world_size() > 1:
        torch_dist.barrier()


def mean_losses(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each loss averaged over processes, as Python floats (one collective for all terms).

    A non-finite value on any process makes the mean non-finite on every process, so all of
    them stop together instead of some waiting forever in the next collective.

    >>> mean_losses({"loss_mask": torch.tensor(0.5)})
    {'loss_mask': 0.5}
    """
    values = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
    if get_world_size() > 1:
        if torch_dist.get_backend() == "nccl":
            values = values.cuda()
        torch_dist.all_reduce(values)
        values = values / get_world_size()
    return dict(zip(losses, values.cpu().tolist()))


def broadcast_int(value: int, src: int = 0) -> int:
    """Rank ``src``'s ``value`` on every process (decisions that must agree, e.g. when to stop)."""
    if get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    if torch_dist.get_backend() == "nccl":
        t = t.cuda()
    torch_dist.broadcast(t, src)
    return int(t.item())
