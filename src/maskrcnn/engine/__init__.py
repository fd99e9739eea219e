"""Training: the loop (``train``), atomic checkpoints, the learning-rate schedule and the
multi-process helpers used under ``torchrun``."""

from maskrcnn.engine.checkpoint import CheckpointError, last_checkpoint, load_checkpoint, load_weights, \
    save_checkpoint
from maskrcnn.engine.schedule import lr_at
from maskrcnn.engine.trainer import TrainingError, train

__all__ = ["CheckpointError", "TrainingError", "last_checkpoint", "load_checkpoint", "load_weights",
           "lr_at", "save_checkpoint", "train"]
