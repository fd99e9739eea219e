"""Inside-the-model pre- and post-processing: normalise, resize, pad; rescale and paste (SPEC §3, §4.2).

Callers pass raw RGB images of any size; outputs come back in those images' pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from maskrcnn.config import InputConfig
from maskrcnn.ops import paste_masks, paste_regions
from maskrcnn.structures.image_list import ImageList


def resize_scale(hw: tuple[int, int], short: int, max_size: int) -> float:
    """Scale that brings the short side to ``short`` unless the long side would exceed ``max_size``."""
    return min(short / min(hw), max_size / max(hw))


def resized_size(hw: tuple[int, int], scale: float, rounding: str) -> tuple[int, int]:
    """(H, W) times ``scale``, floored as torchvision or rounded as Detectron2, and at least 1
    pixel, so that a panorama such as 2x3000 (0.9x1333 at scale 0.44) still runs where both
    would stop with an empty output size."""
    offset = 0.0 if rounding == "floor" else 0.5
    return max(1, int(hw[0] * scale + offset)), max(1, int(hw[1] * scale + offset))


def normalize(image: Tensor, cfg: InputConfig) -> Tensor:
    """(3, H, W) RGB uint8, or float of any precision in [0, 1] -> normalised float32 in the
    backbone's convention."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB image of shape (3, H, W), got {tuple(image.shape)}")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"the image is empty: shape {tuple(image.shape)}; pass images of at least 1x1 pixels")
    # one new tensor, then the same arithmetic in place: each new tensor of a large photo costs
    # its page faults (4000x3000: 0.11 s in place, 0.28 s with a new tensor per step)
    x = image.to(torch.float32, copy=True)
    if image.dtype == torch.uint8:
        x.div_(255)
    if cfg.channel_order == "BGR":
        x = x.flip(0)
    mean = torch.tensor(cfg.pixel_mean, dtype=x.dtype, device=x.device)[:, None, None]
    std = torch.tensor(cfg.pixel_std, dtype=x.dtype, device=x.device)[:, None, None]
    if cfg.pixel_scale != 1.0:
        x.mul_(cfg.pixel_scale)
    return x.sub_(mean).div_(std)


def resize(x: Tensor, scale: float, rounding: str, mode: str = "bilinear") -> Tensor:
    """Resize (C, H, W) to ``resized_size`` by ``mode``, "bilinear" (images) or "nearest"
    (masks). With floored sizes this is torchvision's call (``scale_factor`` with
    ``recompute_scale_factor=True`` samples at the ratio of input to floored output size);
    with rounded sizes, Detectron2's PIL resize: bilinear with PIL's antialiasing when
    shrinking, and PIL's nearest neighbour (pixel centres)."""
    h, w = x.shape[-2:]
    size = resized_size((h, w), scale, rounding)
    if size == (h, w):
        return x
    if x.numel() == 0:  # an image without instances has a (0, H, W) mask stack
        return x.new_zeros((x.shape[0], *size))
    like_pil = rounding == "round"
    if mode == "bilinear":
        return F.interpolate(x[None], size=size, mode=mode, align_corners=False, antialias=like_pil)[0]
    return F.interpolate(x[None], size=size, mode="nearest-exact" if like_pil else mode)[0]


def preprocess(images: list[Tensor], targets: list[dict] | None, cfg: InputConfig, training: bool
               ) -> tuple[ImageList, list[dict] | None, list[Tensor]]:
    """Normalise, resize and pad a batch; scale target boxes (and dense masks) alike.

    Returns the padded batch, the resized targets, and per image the (4,) factors that map
    input-pixel boxes to the coordinates of that image's GT masks: compact masks stay at the
    original resolution and are only cut at RoIs, dense (G, H, W) masks are resized here.
    """
    if not images:
        raise ValueError("the batch has no images")
    resized, new_targets, mask_scales = [], [], []
    for i, image in enumerate(images):
        try:
            x = normalize(image, cfg)
        except ValueError as e:
            raise ValueError(f"image {i} of the batch: {e}") from None
        if training:
            # One random draw per image, as torchvision, so seeded runs line up.
            choice = torch.empty(1).uniform_(0.0, float(len(cfg.min_size_train))).item()
            short = cfg.min_size_train[int(choice)]
        else:
            short = cfg.min_size_test
        hw = tuple(x.shape[-2:])
        scale = resize_scale(hw, short, cfg.max_size)
        x = resize(x, scale, cfg.size_rounding)
        resized.append(x)
        if targets is None:
            continue
        t = dict(targets[i])
        ratios = box_ratios(tuple(x.shape[-2:]), hw).to(x.device)
        t["boxes"] = t["boxes"].to(x.device, torch.float32) * ratios
        t["labels"] = t["labels"].to(x.device)
        if isinstance(t.get("masks"), Tensor):
            t["masks"] = resize(t["masks"].to(x.device).float(), scale, cfg.size_rounding, "nearest")
            mask_scales.append(torch.ones(4, device=x.device))
        else:
            mask_scales.append(ratios)
        new_targets.append(t)
    batch = ImageList.from_tensors(resized, cfg.size_divisibility)
    return batch, (new_targets if targets is not None else None), mask_scales


def box_ratios(new_hw: tuple[int, int], old_hw: tuple[int, int]) -> Tensor:
    """(4,) factors (w, h, w, h) taking boxes from ``old_hw`` pixels to ``new_hw`` pixels."""
    # float32 division of the sizes: the arithmetic torchvision uses, so boxes agree bit for bit
    new = torch.tensor(new_hw, dtype=torch.float32)
    old = torch.tensor(old_hw, dtype=torch.float32)
    rh, rw = new / old
    return torch.stack([rw, rh, rw, rh])


def postprocess(results: list[dict[str, Tensor]], image_sizes: list[tuple[int, int]],
                original_sizes: list[tuple[int, int]], *, paste: str, threshold: float
                ) -> list[dict[str, Tensor]]:
    """Boxes back to the caller's pixels and masks pasted into the caller's image.

    Per image: boxes (D, 4), labels (D,), scores (D,), masks (D, H, W) bool, and
    mask_regions (D, 4) int64 on the CPU: the part of the image each mask was pasted into
    (``paste_regions``), outside which it has no pixel set.
    """
    outputs = []
    for r, hw, orig in zip(results, image_sizes, original_sizes):
        boxes = r["boxes"] * box_ratios(orig, hw).to(r["boxes"].device)
        probs = r["mask_probs"]
        outputs.append({"boxes": boxes, "labels": r["labels"], "scores": r["scores"],
                        "masks": paste_masks(probs, boxes, orig, mode=paste, threshold=threshold),
                        "mask_regions": paste_regions(boxes, probs.shape[-1], orig, mode=paste)})
    return outputs
