"""Detections of one image, as returned by the predictor."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Instances:
    """N detected instances in the pixels of the input image (H, W).

    boxes (N, 4) xyxy float; labels (N,) contiguous 1..K; category_ids (N,) the data set's own
    ids; class_names N strings; scores (N,); masks (N, H, W) bool.
    """

    boxes: Tensor
    labels: Tensor
    category_ids: list[int]
    class_names: list[str]
    scores: Tensor
    masks: Tensor

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def __getitem__(self, idx) -> "Instances":
        """Select instances with a bool mask or an index tensor/list (e.g. ``inst[inst.scores > .5]``)."""
        import torch

        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        keep = idx.tolist() if idx.dim() else [int(idx)]
        return Instances(self.boxes[keep], self.labels[keep], [self.category_ids[i] for i in keep],
                         [self.class_names[i] for i in keep], self.scores[keep], self.masks[keep])
