"""Pasting m x m mask probabilities back into the image inside each detection box (SPEC §3.6).

Two rules are reproduced exactly:

* ``"torchvision"``: pad the map with one zero cell on each side, enlarge the box about its
  centre by (m + 2) / m, truncate it to integers, resize the padded map bilinearly to the
  integer box plus one pixel, binarise with ``> threshold``.
* ``"detectron2"``: sample the map bilinearly at every pixel centre, with zeros outside it,
  binarise with ``>= threshold``.

Work per instance is proportional to its box's area: each mask is resampled only over its
box's neighbourhood and written there into an output that starts zeroed.
"""

from __future__ import annotations

import math
import mmap

import torch
import torch.nn.functional as F
from torch import Tensor


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A zeroed tensor whose memory, on the CPU, costs only where it is written.

    An anonymous mapping is zero-filled by the kernel one 4 KiB page at a time, on first touch,
    so pasting costs follow box area rather than image area. Huge pages are refused for it: a
    single touch would then zero 2 MiB.
    """
    numel = math.prod(shape)
    if device.type != "cpu" or numel == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    buffer = mmap.mmap(-1, numel * torch.empty((), dtype=dtype).element_size())
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(buffer, dtype=dtype, count=numel).view(shape)  # keeps buffer alive


def _torchvision_boxes(boxes: Tensor, m: int) -> list[list[int]]:
    """Boxes (N, 4) enlarged by (m + 2) / m about their centres and truncated to int64, with
    torchvision's operation order."""
    scale = (m + 2) / m
    half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    cx = (boxes[:, 2] + boxes[:, 0]) * 0.5
    cy = (boxes[:, 3] + boxes[:, 1]) * 0.5
    expanded = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], 1)
    return expanded.to(torch.int64).tolist()


def _unclipped_regions(boxes: Tensor, m: int, mode: str) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) per box, ends exclusive, before clipping to the image: for
    ``"torchvision"`` the enlarged integer box plus one pixel, for ``"detectron2"`` one pixel
    beyond the box on each side, as Detectron2's CPU paste."""
    if mode == "torchvision":
        return [(x0, y0, x1 + 1, y1 + 1) for x0, y0, x1, y1 in _torchvision_boxes(boxes, m)]
    return [(math.floor(x0) - 1, math.floor(y0) - 1, math.ceil(x1) + 1, math.ceil(y1) + 1)
            for x0, y0, x1, y1 in boxes.tolist()]


def _clip(regions: list[tuple[int, int, int, int]], image_hw: tuple[int, int]) -> Tensor:
    h, w = image_hw
    regions = torch.tensor(regions, dtype=torch.int64).view(-1, 4)
    return torch.minimum(regions.clamp(min=0), torch.tensor([w, h, w, h]))


def paste_regions(boxes: Tensor, mask_size: int, image_hw: tuple[int, int],
                  mode: str = "torchvision") -> Tensor:
    """The part of the image that ``paste_masks`` writes for each of the (N, 4) boxes: (N, 4)
    int64 (x0, y0, x1, y1) on the CPU, ends exclusive, within the image; empty (x0 >= x1 or
    y0 >= y1) where none of it is visible. A pasted mask has no pixel set outside it.

    >>> paste_regions(torch.tensor([[2., 2., 6., 5.]]), 28, (8, 8), mode="detectron2").tolist()
    [[1, 1, 7, 6]]
    """
    return _clip(_unclipped_regions(boxes, mask_size, mode), image_hw)


def _torchvision_crop(padded: Tensor, whole: tuple[int, ...], region: list[int]) -> Tensor:
    """One padded (m + 2, m + 2) map resized to its ``whole`` region (its integer box plus one
    pixel), over the visible ``region``."""
    x0, y0, x1, y1 = whole
    ix0, iy0, ix1, iy1 = region
    size = (max(y1 - y0, 1), max(x1 - x0, 1))
    resized = F.interpolate(padded[None, None], size=size, mode="bilinear", align_corners=False)
    return resized[0, 0][iy0 - y0: iy1 - y0, ix0 - x0: ix1 - x0]


def _detectron2_crop(mask: Tensor, box: Tensor, region: list[int]) -> Tensor:
    """One (m, m) map sampled at the pixel centres of ``region``, with zeros outside the map;
    no pixel outside the region can reach 0.5."""
    ix0, iy0, ix1, iy1 = region
    # Detectron2's normalised coordinates: -1 and 1 are the box edges
    ys = torch.arange(iy0, iy1, device=mask.device, dtype=torch.float32) + 0.5
    xs = torch.arange(ix0, ix1, device=mask.device, dtype=torch.float32) + 0.5
    ys = (ys - box[1]) / (box[3] - box[1]) * 2 - 1
    xs = (xs - box[0]) / (box[2] - box[0]) * 2 - 1
    grid = torch.stack([xs[None, :].expand(len(ys), -1), ys[:, None].expand(-1, len(xs))], -1)
    mask = mask if mask.is_floating_point() else mask.float()
    crop = F.grid_sample(mask[None, None], grid[None].to(mask.dtype), align_corners=False)
    return crop[0, 0]


def paste_masks(masks: Tensor, boxes: Tensor, image_hw: tuple[int, int], mode: str = "torchvision",
                threshold: float = 0.5, soft: bool = False) -> Tensor:
    """Paste (N, m, m) probabilities at (N, 4) boxes (image pixels) into (N, H, W) masks.

    Returns bool masks, or with ``soft=True`` the resampled probabilities in ``masks``' dtype
    (zero outside each box's neighbourhood). ``mode`` is ``"torchvision"`` (binarised with
    ``> threshold``) or ``"detectron2"`` (``>= threshold``).

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
    n, h, w = masks.shape[0], *image_hw
    out = _zeros((n, h, w), masks.dtype if soft else torch.bool, masks.device)
    if n == 0:
        return out
    whole = _unclipped_regions(boxes, masks.shape[-1], mode)
    regions = _clip(whole, image_hw).tolist()
    if mode == "torchvision":
        padded = F.pad(masks, (1, 1, 1, 1))
    for i, (x0, y0, x1, y1) in enumerate(regions):
        if x0 >= x1 or y0 >= y1:
            continue
        if mode == "torchvision":
            values = _torchvision_crop(padded[i], whole[i], regions[i])
        else:
            values = _detectron2_crop(masks[i], boxes[i], regions[i])
        region = out[i, y0:y1, x0:x1]
        if soft:
            region.copy_(values)
        else:
            region.copy_(values > threshold if mode == "torchvision" else values >= threshold)
    return out
