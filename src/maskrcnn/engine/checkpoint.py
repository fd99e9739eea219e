"""Training checkpoints: model, optimizer, iteration and RNG state in one safetensors file.

A checkpoint is written to a temporary file in the same folder, flushed to disk and then renamed
over the old one, so a kill at any moment leaves the previous checkpoint intact. Nothing is ever
unpickled: tensors live in safetensors, everything else is JSON metadata.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

NAME = "last_checkpoint.safetensors"


def save_checkpoint(directory: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    iteration: int, extra: dict | None = None) -> Path:
    """Write ``directory/last_checkpoint.safetensors`` atomically; returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for pid, state in opt["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    meta = {"iteration": iteration, "param_groups": opt["param_groups"], "extra": extra or {}}
    path = directory / NAME
    tmp = directory / (NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"state": json.dumps(meta)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
                    ) -> dict:
    """Restore what :func:`save_checkpoint` wrote; returns ``{"iteration", "extra"}``."""
    path = Path(path)
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if optimizer is not None:
        state: dict = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return {"iteration": meta["iteration"], "extra": meta["extra"]}
