"""A padded batch of images that remembers each image's own size."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor


@dataclass
class ImageList:
    """``tensor`` (N, C, Hp, Wp) zero-padded at the bottom/right; ``image_sizes`` [(h, w)] before
    padding."""

    tensor: Tensor
    image_sizes: list[tuple[int, int]]

    @classmethod
    def from_tensors(cls, images: list[Tensor], divisor: int = 32) -> "ImageList":
        """Pad (C, H_i, W_i) images to a common size divisible by ``divisor``."""
        h = max(img.shape[-2] for img in images)
        w = max(img.shape[-1] for img in images)
        if divisor > 1:
            h, w = math.ceil(h / divisor) * divisor, math.ceil(w / divisor) * divisor
        batch = images[0].new_zeros((len(images), images[0].shape[0], h, w))
        for img, slot in zip(images, batch):
            slot[:, : img.shape[-2], : img.shape[-1]].copy_(img)
        return cls(batch, [tuple(img.shape[-2:]) for img in images])
