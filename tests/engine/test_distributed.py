"""Two CPU processes on gloo take the same step as one process given the same global batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from maskrcnn.engine.trainer import param_groups


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 2, generator=g)


def step(model, x, y):
    opt = torch.optim.SGD(param_groups(model, 1e-4), lr=0.1, momentum=0.9)
    loss = nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    return grads, [p.detach().clone() for p in model.parameters()]


def worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = nn.parallel.DistributedDataParallel(tiny_model())
    x, y = batch()
    grads, weights = step(model, x[rank * 2:(rank + 1) * 2], y[rank * 2:(rank + 1) * 2])
    torch.save({"grads": grads, "weights": weights}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path):
    mp.spawn(worker, args=(free_port(), tmp_path), nprocs=2, join=True)
    grads, weights = step(tiny_model(), *batch())
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for a, b in zip(got["grads"], grads):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        for a, b in zip(got["weights"], weights):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
