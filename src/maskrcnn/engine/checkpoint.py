"""Training checkpoints that survive a kill at any moment and never unpickle anything.

Layout of a checkpoint folder (``save_checkpoint`` writes one per call)::

    checkpoints/
      last                      text: the name of the newest complete checkpoint
      iter_0000300/
        model.safetensors       the model's state dict (optionally with weight-file metadata)
        state.safetensors       optimizer tensors (momentum buffers) and RNG states
        state.json              iteration, optimizer hyper-parameters, scalar RNG parts,
                                AMP scaler, and the caller's ``extra`` (config, metrics, ...)

A folder is first written under a temporary name, every file and the folder are fsynced,
then it is renamed into place, and only then is ``last`` replaced (write, fsync, rename).
Each rename is atomic, so a kill leaves either the old or the new ``last`` pointing at a
complete folder. Older folders are deleted only after ``last`` has moved on. A write that
fails (a full disk) removes its partial folder and leaves ``last`` as it was.
``last`` itself is written by :func:`maskrcnn.atomic.atomic_write`, as weight files are.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from maskrcnn.atomic import TMP_PREFIX, atomic_write, fsync, temporary_name

FORMAT = "maskrcnn-checkpoint-v1"
POINTER = "last"
MODEL_FILE, STATE_FILE, META_FILE = "model.safetensors", "state.safetensors", "state.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not fit the model being restored."""


# ----------------------------------------------------------------------------- RNG state


def get_rng_state() -> tuple[dict[str, Tensor], dict]:
    """Every RNG training touches: (tensors, JSON-able scalars).

    torch CPU and CUDA generators, NumPy's global MT19937 and Python's ``random``.
    """
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    tensors["rng.python"] = torch.tensor(internal, dtype=torch.int64)
    scalars = {"numpy": [name, int(pos), int(has_gauss), float(gauss)],
               "python": [version, gauss_next]}
    return tensors, scalars


def set_rng_state(tensors: dict[str, Tensor], scalars: dict) -> None:
    """Restore what :func:`get_rng_state` returned."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                        key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    name, pos, has_gauss, gauss = scalars["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, gauss_next = scalars["python"]
    random.setstate((version, tuple(tensors["rng.python"].tolist()), gauss_next))


# ------------------------------------------------------------------------------- writing


def save_checkpoint(directory: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    iteration: int, extra: dict | None = None, scaler: torch.amp.GradScaler | None = None,
                    model_metadata: dict[str, str] | None = None, keep: int = 2) -> Path:
    """Atomically write a checkpoint folder under ``directory`` and point ``last`` at it.

    ``extra`` must be JSON-serialisable (the trainer stores the config, ``max_iter`` and
    elapsed time there). ``model_metadata`` goes into ``model.safetensors`` unchanged.
    The newest ``keep`` folders are kept. Returns the new folder.

    >>> save_checkpoint("runs/x/checkpoints", model=model, optimizer=opt, iteration=300)  # doctest: +SKIP
    PosixPath('runs/x/checkpoints/iter_0000300')
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(directory)
    tensors, meta = _optimizer_state(optimizer)
    rng_tensors, rng_scalars = get_rng_state()
    tensors.update(rng_tensors)
    meta.update(format=FORMAT, iteration=int(iteration), rng=rng_scalars, extra=extra or {},
                scaler=scaler.state_dict() if scaler is not None and scaler.is_enabled() else None)
    meta_text = json.dumps(meta)  # fails here, before anything is written, if extra is not JSON

    name = _free_name(directory, f"iter_{iteration:07d}")
    tmp = temporary_name(directory / name)
    tmp.mkdir()
    model_tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    try:
        save_file(model_tensors, str(tmp / MODEL_FILE), metadata=model_metadata)
        save_file(tensors, str(tmp / STATE_FILE))
        (tmp / META_FILE).write_text(meta_text)
        for f in (MODEL_FILE, STATE_FILE, META_FILE):
            fsync(tmp / f)
        fsync(tmp)
    except Exception as exc:  # disk full, ...: drop the partial folder, keep the last checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
        kept = _read_pointer(directory)
        raise CheckpointError(f"{directory}: could not write the checkpoint of iteration {iteration} "
                              f"({exc}); " + (f"the last complete one, {kept}, is unchanged"
                                              if kept else "there is no earlier checkpoint")) from exc
    os.replace(tmp, directory / name)
    _write_pointer(directory, name)
    _prune(directory, keep)
    return directory / name


def _optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """Tensors of the per-parameter state under ``optimizer.{param index}.{key}``; the
    rest (hyper-parameters, non-tensor state) as JSON."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "optimizer_scalars": scalars}


def _free_name(directory: Path, name: str) -> str:
    """``name``, unless ``last`` names it already (a second save at one iteration)."""
    current = _read_pointer(directory)
    candidate, n = name, 0
    while (directory / candidate).exists():
        if candidate != current:
            shutil.rmtree(directory / candidate)  # left by a kill before ``last`` moved: unreferenced
            break
        n += 1
        candidate = f"{name}_{n}"
    return candidate


def _write_pointer(directory: Path, name: str) -> None:
    atomic_write(directory / POINTER, lambda tmp: tmp.write_text(name + "\n"))


def _prune(directory: Path, keep: int) -> None:
    current = _read_pointer(directory)
    # Zero-padded names sort by iteration; a second save at one iteration gets a suffix.
    folders = sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith("iter_"))
    old = [p for p in folders if p.name != current]
    for p in old[:max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)


def _remove_stale_temporaries(directory: Path) -> None:
    for p in directory.iterdir():
        if p.name.startswith(TMP_PREFIX):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------- reading


def _read_pointer(directory: Path) -> str | None:
    pointer = directory / POINTER
    return pointer.read_text().strip() if pointer.is_file() else None


def last_checkpoint(directory: str | Path) -> Path | None:
    """The folder ``directory/last`` names, or None when there is no checkpoint yet."""
    directory = Path(directory)
    name = _read_pointer(directory) if directory.is_dir() else None
    return directory / name if name else None


def _resolve(path: str | Path) -> Path:
    """A checkpoint folder, or a folder holding ``last``, -> the checkpoint folder."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    found = last_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path}: no checkpoint here (expected {META_FILE} or a '{POINTER}' file)")
    if not (found / META_FILE).is_file():
        raise CheckpointError(f"{path}/{POINTER} names {found.name}, which is missing or incomplete")
    return found


def read_checkpoint_info(path: str | Path) -> dict:
    """``state.json`` of a checkpoint (iteration, extra, ...) without touching any tensor."""
    return json.loads((_resolve(path) / META_FILE).read_text())


def load_checkpoint(path: str | Path, *, model: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> dict:
    """Restore a checkpoint into the given objects and the global RNGs of :func:`get_rng_state`
    to their state at the save; returns ``{"iteration", "extra", "path"}``.

    ``path`` is a checkpoint folder or the folder holding ``last``.

    >>> info = load_checkpoint("runs/x/checkpoints", model=model, optimizer=opt)  # doctest: +SKIP
    >>> info["iteration"]  # doctest: +SKIP
    300
    """
    folder = _resolve(path)
    meta = json.loads((folder / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder}: not a {FORMAT} checkpoint")
    tensors = load_file(str(folder / STATE_FILE))
    if model is not None:
        _load_model(model, load_file(str(folder / MODEL_FILE)), folder)
    if optimizer is not None:
        _load_optimizer(optimizer, tensors, meta, folder)
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    set_rng_state({k: v for k, v in tensors.items() if k.startswith("rng.")}, meta["rng"])
    return {"iteration": meta["iteration"], "extra": meta["extra"], "path": folder}


def _load_model(model: nn.Module, state: dict[str, Tensor], folder: Path) -> None:
    own = model.state_dict()
    differences = [f"{k} {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
                   for k, v in own.items() if k in state and state[k].shape != v.shape]
    differences += [f"{k} only in the file" for k in state if k not in own]
    differences += [f"{k} only in the model" for k in own if k not in state]
    if differences:
        more = f" and {len(differences) - 3} more" if len(differences) > 3 else ""
        raise CheckpointError(f"{folder}/{MODEL_FILE} does not fit this model (was the model config "
                              f"changed since it was written?): {'; '.join(differences[:3])}{more}")
    model.load_state_dict(state)


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict,
                    folder: Path) -> None:
    state: dict[int, dict] = {}
    for pid, values in meta["optimizer_scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except ValueError as exc:
        raise CheckpointError(f"{folder}: optimizer state does not fit this model's parameters "
                              f"({exc})") from None
    # Saved tensors are contiguous. A fused optimizer walks each parameter and its state as flat
    # memory, so the state gets its parameter's layout back (channels-last in bf16 mode).
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if isinstance(value, Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    optimizer.state[p][name] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def load_weights(path: str | Path) -> dict[str, Tensor]:
    """A model state dict from a ``.safetensors`` file or a checkpoint folder (or its parent).

    >>> model.load_state_dict(load_weights("runs/x/checkpoints"))  # doctest: +SKIP
    """
    path = Path(path)
    if path.is_dir():
        path = _resolve(path) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: expected a .safetensors file (weights are never unpickled); "
                         "convert .pth files with `maskrcnn convert`")
    return load_file(str(path))

