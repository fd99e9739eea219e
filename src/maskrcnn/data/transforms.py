"""Image decoding and the augmentations that move images, boxes and masks together.

Resizing to the network's input scale happens inside the model, so by default the data
pipeline hands over images at their own resolution and only flips them (SPEC §4.2);
``resize_shortest_edge`` is here for callers who want to resize beforehand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from maskrcnn.modeling.transform import resize_scale, resized_size

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def load_image(path: str | Path) -> Tensor:
    """(3, H, W) uint8 RGB of an image file, as ``image_tensor`` reads it.

    >>> load_image("photo.jpg").shape  # doctest: +SKIP
    torch.Size([3, 480, 640])
    """
    with Image.open(path) as im:
        return image_tensor(im)


def image_tensor(im: Image.Image) -> Tensor:
    """(3, H, W) uint8 RGB of a PIL image, upright per its EXIF orientation.

    Grayscale, palette, LA/RGBA (alpha dropped: the colour channels are what annotators saw),
    CMYK and 16-bit images become 8-bit RGB. 16-bit data maps its full range [0, 65535] to
    [0, 255]; 32-bit integer or float images are taken as 8-bit if their values fit, as 16-bit
    if they fit that, and are min-max scaled otherwise (``to_uint8``).
    """
    im = ImageOps.exif_transpose(im)
    if im.mode in _SIXTEEN_BIT or im.mode in ("I", "F"):
        im = Image.fromarray(to_uint8(np.asarray(im), sixteen_bit=im.mode in _SIXTEEN_BIT))
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # palette transparency must go through RGBA to be dropped cleanly
    rgb = np.asarray(im.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def to_uint8(array: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    """Pixel values of another depth as uint8: the 16-bit range, 0-255 or 0-65535 where the
    values fit them, else their own minimum to maximum, onto 0-255."""
    a = array.astype(np.float64)
    if sixteen_bit:
        top, low = 65535.0, 0.0
    elif a.size == 0 or (a.min() >= 0 and a.max() <= 255):
        top, low = 255.0, 0.0
    elif a.min() >= 0 and a.max() <= 65535:
        top, low = 65535.0, 0.0
    else:
        low, top = float(a.min()), float(a.max())
    scaled = (a - low) / max(top - low, 1e-12) * 255.0
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def hflip(image: Tensor, target: dict) -> tuple[Tensor, dict]:
    """Mirror an image (3, H, W) left-right with its boxes (N, 4) and masks.

    x1' = W - x2 and x2' = W - x1, so boxes stay ordered; other target entries are copied.

    >>> image = torch.zeros(3, 4, 10, dtype=torch.uint8)
    >>> hflip(image, {"boxes": torch.tensor([[1.0, 0, 3, 2]])})[1]["boxes"].tolist()
    [[7.0, 0.0, 9.0, 2.0]]
    """
    width = image.shape[-1]
    out = dict(target)
    if "boxes" in target:
        boxes = target["boxes"]
        out["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
    masks = target.get("masks")
    if masks is not None:
        out["masks"] = masks.flip(-1) if isinstance(masks, Tensor) else masks.flip_horizontal()
    return image.flip(-1), out


def shortest_edge_size(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """(new_h, new_w) with the short side ``short`` unless the long side would exceed ``max_size``.

    >>> shortest_edge_size(480, 640, 800, 1333)
    (800, 1067)
    """
    hw = (height, width)
    return resized_size(hw, resize_scale(hw, short, max_size), "round")


def resize_shortest_edge(image: Tensor, target: dict, short: int, max_size: int) -> tuple[Tensor, dict]:
    """Resize (3, H, W) uint8 by the rule of SPEC §4.2 (PIL bilinear), with boxes and masks.

    Boxes scale by the actual size ratios; masks stay compact (polygons are scaled, RLE is
    resized with nearest neighbour one instance at a time).

    >>> image = torch.zeros(3, 100, 200, dtype=torch.uint8)
    >>> resize_shortest_edge(image, {"boxes": torch.zeros(0, 4)}, 50, 1000)[0].shape
    torch.Size([3, 50, 100])
    """
    height, width = image.shape[-2:]
    new_h, new_w = shortest_edge_size(height, width, short, max_size)
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    resized = torch.from_numpy(np.asarray(pil.resize((new_w, new_h), Image.BILINEAR)).copy())
    out = dict(target)
    if "boxes" in target:
        ratio = torch.tensor([new_w / width, new_h / height] * 2, dtype=target["boxes"].dtype)
        out["boxes"] = target["boxes"] * ratio
    masks = target.get("masks")
    if masks is not None:
        if isinstance(masks, Tensor):
            out["masks"] = torch.nn.functional.interpolate(
                masks[:, None].float(), size=(new_h, new_w), mode="nearest-exact")[:, 0].to(masks.dtype)
        else:
            out["masks"] = masks.resize(new_h, new_w)
    return resized.permute(2, 0, 1).contiguous(), out


class TrainTransform:
    """The training augmentation: a horizontal flip with probability ``flip_prob``.

    The coin comes from ``generator`` when given, else from torch's global generator; the
    training loader seeds it per (seed, iteration, position in the batch) for exact resume.

    >>> flip = TrainTransform(flip_prob=1.0)
    >>> image, target = flip(torch.arange(3).view(1, 1, 3).expand(3, 1, 3), {"boxes": torch.zeros(0, 4)})
    >>> image[0, 0].tolist()
    [2, 1, 0]
    """

    def __init__(self, flip_prob: float = 0.5):
        self.flip_prob = float(flip_prob)

    def __call__(self, image: Tensor, target: dict, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, dict]:
        if self.flip_prob > 0 and torch.rand((), generator=generator).item() < self.flip_prob:
            return hflip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"TrainTransform(flip_prob={self.flip_prob})"
