"""The project's weight file: one ``.safetensors`` holding the tensors plus, as metadata, the
model config and the data set's class names and category ids. Loading never unpickles."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from maskrcnn.atomic import atomic_write
from maskrcnn.config import ConfigError, ModelConfig, from_dict, to_dict

FORMAT = "maskrcnn-weights-v1"


def weights_metadata(config: ModelConfig, class_names: list[str] | None = None,
                     category_ids: list[int] | None = None) -> dict[str, str]:
    """The metadata that makes a ``.safetensors`` file a weight file: the format tag, the model
    config, and the class names and category ids of classes 1..K (``class_1``... and 1..K
    when not given)."""
    k = config.roi_heads.num_classes
    names = list(class_names) if class_names else [f"class_{i}" for i in range(1, k + 1)]
    ids = list(category_ids) if category_ids else list(range(1, k + 1))
    return {"format": FORMAT, "config": json.dumps(to_dict(config)),
            "class_names": json.dumps(names), "category_ids": json.dumps(ids)}


def save_weights(path: str | Path, model: nn.Module, *, class_names: list[str] | None = None,
                 category_ids: list[int] | None = None) -> Path:
    """Write ``model`` (a ``MaskRCNN``) with :func:`weights_metadata`, atomically as
    :func:`maskrcnn.atomic.atomic_write` does: a kill or a failed write (a full
    disk) leaves any old file intact and no partial file under ``path``; a failed write
    raises ``OSError`` saying so."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = weights_metadata(model.config, class_names, category_ids)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    try:
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    except Exception as exc:  # disk full, permissions, ...
        raise OSError(f"{path}: could not write the weights ({exc}); any earlier file there is "
                      "unchanged") from exc


def read_weights(path: str | Path) -> tuple[dict, ModelConfig, list[str], list[int]]:
    """(state dict, model config, class names, category ids) from a weight file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises several types for foreign files
        raise ValueError(f"{path}: not a safetensors weight file ({exc}); convert torchvision "
                         "weights with `maskrcnn convert --from torchvision IN.pth OUT`") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: safetensors file without maskrcnn metadata; convert it with "
                         "`maskrcnn convert` or load it with maskrcnn.from_torchvision")
    try:
        config = from_dict(ModelConfig, json.loads(meta["config"]))
    except ConfigError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return (load_file(str(path)), config, json.loads(meta["class_names"]),
            json.loads(meta["category_ids"]))
