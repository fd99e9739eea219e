"""Pasting m x m mask probabilities back into the image inside each detection box (SPEC §3.6).

Work and memory per instance are proportional to its box's area: each mask is resampled only
over its box's neighbourhood. The (N, H, W) boolean output is allocated zeroed and written
only there.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


_NUMPY = {torch.bool: np.bool_, torch.float32: np.float32, torch.float64: np.float64,
          torch.float16: np.float16}


def _torchvision_crop(mask: Tensor, box: Tensor, hw: tuple[int, int]):
    """One instance with torchvision's rule: pad the m x m map by one zero cell, enlarge the box
    by (m + 2) / m about its centre, truncate it to integers and resize the padded map to the
    integer box plus one pixel. Returns the visible crop and its (y0, x0) in the image."""
    m = mask.shape[-1]
    padded = F.pad(mask, (1, 1, 1, 1))
    scale = (m + 2) / m
    half_w = (box[2] - box[0]) * 0.5 * scale
    half_h = (box[3] - box[1]) * 0.5 * scale
    cx, cy = (box[2] + box[0]) * 0.5, (box[3] + box[1]) * 0.5
    x0, y0, x1, y1 = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h]).to(torch.int64).tolist()
    w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
    resized = F.interpolate(padded[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    ix0, iy0 = max(x0, 0), max(y0, 0)
    ix1, iy1 = min(x1 + 1, hw[1]), min(y1 + 1, hw[0])
    if ix0 >= ix1 or iy0 >= iy1:
        return None, 0, 0
    return resized[iy0 - y0: iy1 - y0, ix0 - x0: ix1 - x0], iy0, ix0


def _detectron2_crop(mask: Tensor, box: Tensor, hw: tuple[int, int]):
    """One instance sampled at every pixel centre of the box's neighbourhood (bilinear,
    align_corners=False, zeros outside the m x m map). Returns the crop and its (y0, x0)."""
    x1, y1, x2, y2 = box.tolist()
    ix0, iy0 = max(math.floor(x1) - 1, 0), max(math.floor(y1) - 1, 0)
    ix1, iy1 = min(math.ceil(x2) + 1, hw[1]), min(math.ceil(y2) + 1, hw[0])
    if ix0 >= ix1 or iy0 >= iy1:
        return None, 0, 0
    dtype, device = mask.dtype, mask.device
    ys = (torch.arange(iy0, iy1, device=device, dtype=torch.float32) + 0.5 - box[1]) / (box[3] - box[1]) * 2 - 1
    xs = (torch.arange(ix0, ix1, device=device, dtype=torch.float32) + 0.5 - box[0]) / (box[2] - box[0]) * 2 - 1
    grid = torch.stack([xs[None, :].expand(len(ys), -1), ys[:, None].expand(-1, len(xs))], -1)
    crop = F.grid_sample(mask[None, None].float(), grid[None].to(torch.float32), align_corners=False)
    return crop[0, 0].to(dtype), iy0, ix0


def paste_masks(masks: Tensor, boxes: Tensor, image_hw: tuple[int, int], mode: str = "torchvision",
                threshold: float = 0.5, soft: bool = False) -> Tensor:
    """Paste (N, m, m) probabilities at (N, 4) boxes into (N, H, W) image masks.

    ``mode="torchvision"`` reproduces torchvision's paste and binarises with ``> threshold``;
    ``mode="detectron2"`` samples at pixel centres and binarises with ``>= threshold``.
    ``soft=True`` returns the float probabilities instead.

    >>> paste_masks(torch.ones(1, 28, 28), torch.tensor([[2., 2., 6., 5.]]), (8, 8),
    ...             mode="detectron2").int()[0, 1:7]
    tensor([[0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 1, 1, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 1, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.int32)
    """
    if mode not in ("torchvision", "detectron2"):
        raise ValueError(f"paste mode must be 'torchvision' or 'detectron2', got {mode!r}")
    h, w = image_hw
    dtype = masks.dtype if soft else torch.bool
    if masks.device.type == "cpu":
        # numpy's zeros come from calloc: untouched pages cost nothing, so only the pages under
        # the boxes are ever written and the cost follows box area, not image area
        out = torch.from_numpy(np.zeros((masks.shape[0], h, w), dtype=_NUMPY[dtype]))
    else:
        out = torch.zeros((masks.shape[0], h, w), dtype=dtype, device=masks.device)
    crop_fn = _torchvision_crop if mode == "torchvision" else _detectron2_crop
    for i in range(masks.shape[0]):
        crop, y0, x0 = crop_fn(masks[i], boxes[i], image_hw)
        if crop is None:
            continue
        region = out[i, y0: y0 + crop.shape[0], x0: x0 + crop.shape[1]]
        if soft:
            region.copy_(crop)
        else:
            region.copy_(crop > threshold if mode == "torchvision" else crop >= threshold)
    return out
