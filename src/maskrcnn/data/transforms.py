"""Image decoding and the training-time augmentation (horizontal flip).

Resizing to the network's input scale happens inside the model (``modeling/transform.py``), so
the data pipeline hands over images at their own resolution.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor


def load_image(path: str | Path) -> Tensor:
    """(3, H, W) uint8 RGB, upright per EXIF. Grayscale, palette, RGBA (alpha dropped) and 16-bit
    images are converted to 8-bit RGB.

    >>> load_image("photo.jpg").shape  # doctest: +SKIP
    torch.Size([3, 480, 640])
    """
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(im, dtype=np.float64)
            top = 65535.0 if array.max() > 255 else 255.0
            im = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
        elif im.mode == "F":
            array = np.asarray(im, dtype=np.float64)
            im = Image.fromarray(np.clip(array / max(array.max(), 1e-6) * 255, 0, 255).astype(np.uint8))
        rgb = np.asarray(im.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def hflip(image: Tensor, target: dict) -> tuple[Tensor, dict]:
    """Mirror an image (3, H, W) with its boxes and masks."""
    width = image.shape[-1]
    out = dict(target)
    boxes = target["boxes"]
    if boxes.numel():
        out["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
    masks = target.get("masks")
    if masks is not None:
        out["masks"] = masks.flip(-1) if isinstance(masks, Tensor) else masks.flip_horizontal()
    return image.flip(-1), out
