"""Detections of one image, as returned by the predictor."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Instances:
    """N detected instances in the pixels of the input image (H, W).

    boxes (N, 4) xyxy float; labels (N,) contiguous 1..K; category_ids (N,) the data set's own
    ids; class_names N strings; scores (N,); masks (N, H, W) bool.

    mask_regions (N, 4) int64 (x0, y0, x1, y1), ends exclusive, or None: the part of the image
    each mask was pasted into, outside which it has no pixel set. The overlay and the COCO
    results read each mask only there: most of a pasted mask's memory is never written, and
    reading it would fault in its pages (a 4000x3000 photo's mask: 5.5 ms and 12 MB of resident
    memory on 2 Zen 3 cores). Set it to None after setting pixels outside it.
    """

    boxes: Tensor
    labels: Tensor
    category_ids: list[int]
    class_names: list[str]
    scores: Tensor
    masks: Tensor
    mask_regions: Tensor | None = None

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def __getitem__(self, idx) -> "Instances":
        """Select instances with a bool mask or an index tensor/list (e.g. ``inst[inst.scores > .5]``)."""
        import torch

        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        keep = idx.tolist() if idx.dim() else [int(idx)]
        regions = None if self.mask_regions is None else self.mask_regions[keep]
        return Instances(self.boxes[keep], self.labels[keep], [self.category_ids[i] for i in keep],
                         [self.class_names[i] for i in keep], self.scores[keep], self.masks[keep], regions)
