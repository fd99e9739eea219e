"""Instance masks that stay compact (polygons or COCO RLE) until they are cut to RoIs.

A data set's masks never become full-image bitmaps per instance in memory: an image's masks are
decoded only while its mask targets are built, and only for that image (SPEC §2.4).
"""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_util
import torch
from torch import Tensor


def _select(n: int, idx) -> list[int]:
    if isinstance(idx, int):
        return [range(n)[idx]]
    if isinstance(idx, slice):
        return list(range(n))[idx]
    idx = torch.as_tensor(idx)
    if idx.dtype == torch.bool:
        idx = idx.nonzero().flatten()
    return idx.flatten().tolist()


class PolygonMasks:
    """Per instance a list of flat ``[x0, y0, x1, y1, ...]`` polygons in an (H, W) image."""

    def __init__(self, polygons: list[list[np.ndarray]], height: int, width: int):
        self.polygons = [[np.asarray(p, dtype=np.float64) for p in inst] for inst in polygons]
        self.height, self.width = int(height), int(width)

    def __len__(self) -> int:
        return len(self.polygons)

    def __getitem__(self, idx) -> "PolygonMasks":
        return PolygonMasks([self.polygons[i] for i in _select(len(self), idx)], self.height, self.width)

    def flip_horizontal(self) -> "PolygonMasks":
        flipped = []
        for inst in self.polygons:
            polys = []
            for p in inst:
                q = p.copy()
                q[0::2] = self.width - q[0::2]
                polys.append(q)
            flipped.append(polys)
        return PolygonMasks(flipped, self.height, self.width)

    def to_rles(self) -> list[dict]:
        rles = []
        for inst in self.polygons:
            parts = mask_util.frPyObjects([p.tolist() for p in inst], self.height, self.width)
            rles.append(mask_util.merge(parts))
        return rles

    def to_tensor(self) -> Tensor:
        """(N, H, W) uint8."""
        return RLEMasks(self.to_rles(), self.height, self.width).to_tensor()

    def crop_and_resize(self, boxes: Tensor, size: int, indices: Tensor | None = None) -> Tensor:
        """Rasterise instance ``indices[r]``'s polygons inside ``boxes[r]`` at ``size`` x ``size``.

        boxes (R, 4) in this mask's pixels; indices (R,) (default: instance r) -> (R, size, size).
        Vertices are shifted to the box and scaled by size / box extent, then rasterised
        (Detectron2's polygon mask targets; exact, no resampling of a bitmap).
        """
        indices = range(len(boxes)) if indices is None else indices.tolist()
        out = np.zeros((len(boxes), size, size), dtype=np.float32)
        for i, (inst, box) in enumerate(zip([self.polygons[j] for j in indices], boxes.tolist())):
            x1, y1, x2, y2 = box
            sx, sy = size / max(x2 - x1, 0.1), size / max(y2 - y1, 0.1)
            polys = []
            for p in inst:
                q = p.copy()
                q[0::2] = (q[0::2] - x1) * sx
                q[1::2] = (q[1::2] - y1) * sy
                polys.append(q.tolist())
            if polys:
                rle = mask_util.merge(mask_util.frPyObjects(polys, size, size))
                out[i] = mask_util.decode(rle)
        return torch.from_numpy(out)


class RLEMasks:
    """Per instance a compressed COCO RLE (``{"size": [H, W], "counts": bytes}``)."""

    def __init__(self, rles: list[dict], height: int, width: int):
        self.rles = rles
        self.height, self.width = int(height), int(width)

    @classmethod
    def from_segmentations(cls, segmentations: list, height: int, width: int) -> "RLEMasks":
        """From COCO ``segmentation`` fields: polygons, compressed or uncompressed RLE."""
        rles = []
        for seg in segmentations:
            if isinstance(seg, list):
                rles.append(mask_util.merge(mask_util.frPyObjects(seg, height, width)))
            elif isinstance(seg.get("counts"), list):
                rles.append(mask_util.frPyObjects(seg, height, width))
            else:
                counts = seg["counts"]
                rles.append({"size": list(seg["size"]),
                             "counts": counts.encode() if isinstance(counts, str) else counts})
        return cls(rles, height, width)

    def __len__(self) -> int:
        return len(self.rles)

    def __getitem__(self, idx) -> "RLEMasks":
        return RLEMasks([self.rles[i] for i in _select(len(self), idx)], self.height, self.width)

    def to_tensor(self) -> Tensor:
        """(N, H, W) uint8."""
        if not self.rles:
            return torch.zeros((0, self.height, self.width), dtype=torch.uint8)
        return torch.from_numpy(np.ascontiguousarray(mask_util.decode(self.rles).transpose(2, 0, 1)))

    def flip_horizontal(self) -> "RLEMasks":
        if not self.rles:
            return RLEMasks([], self.height, self.width)
        flipped = np.asfortranarray(mask_util.decode(self.rles)[:, ::-1, :])
        return RLEMasks(mask_util.encode(flipped), self.height, self.width)

    def crop_and_resize(self, boxes: Tensor, size: int, indices: Tensor | None = None) -> Tensor:
        """Instance ``indices[r]``'s bitmap resampled inside ``boxes[r]`` at ``size`` x ``size``
        with aligned, adaptively sampled RoIAlign, thresholded at 0.5 (Detectron2's bitmask
        targets). boxes (R, 4), indices (R,) (default: instance r) -> (R, size, size)."""
        from maskrcnn.ops import roi_align

        if len(boxes) == 0:
            return torch.zeros((0, size, size))
        indices = torch.arange(len(boxes)) if indices is None else indices.cpu()
        wanted = indices.unique()
        dense = self[wanted].to_tensor().float()[:, None]  # each instance decoded once
        slot = torch.searchsorted(wanted, indices).float()
        rois = torch.cat([slot[:, None], boxes.float().cpu()], 1)
        return (roi_align(dense, rois, size, 1.0, 0, True)[:, 0] >= 0.5).float()


def area(masks) -> Tensor:
    """(N,) pixel areas of compact masks."""
    rles = masks.rles if isinstance(masks, RLEMasks) else masks.to_rles()
    return torch.as_tensor(mask_util.area(rles) if rles else [], dtype=torch.float32)
