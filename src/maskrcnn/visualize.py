"""Overlays of predictions on images, and training curves."""

from __future__ import annotations

import colorsys
import functools
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from maskrcnn.structures.instances import Instances
from maskrcnn.structures.masks import mask_extent


def instance_colours(n: int) -> list[tuple[int, int, int]]:
    """``n`` well-separated colours (golden-ratio hue steps)."""
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.85, 1.0))
            for i in range(n)]


def overlay(image, instances: Instances, alpha: float = 0.5) -> Image.Image:
    """Each instance's mask in its own colour, with its box, class name and score.

    ``image``: a path, PIL image, (H, W, 3) array or (3, H, W) tensor.

    >>> picture = overlay("photo.jpg", predictor("photo.jpg"))  # doctest: +SKIP
    >>> picture.save("overlay.png")  # doctest: +SKIP
    """
    from maskrcnn.api import to_image_tensor

    tensor = to_image_tensor(image)
    if len(instances) and tuple(instances.masks.shape[1:]) != tuple(tensor.shape[1:]):
        raise ValueError(f"the masks are {tuple(instances.masks.shape[1:])} (H, W) but the image is "
                         f"{tuple(tensor.shape[1:])}; pass the image the instances were predicted on")
    array = tensor.permute(1, 2, 0).cpu().numpy()
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).astype(np.uint8)
    canvas = array.astype(np.float32)
    colours = instance_colours(len(instances))
    # each mask is blended within the rows and columns it covers, not over the whole image,
    # and those are looked for only within the region it was pasted into, if known
    regions = [None] * len(instances) if instances.mask_regions is None else instances.mask_regions.tolist()
    for mask, region, colour in zip(instances.masks.cpu(), regions, colours):
        extent = mask_extent(mask, region)
        if extent is not None:
            y0, y1, x0, x1 = extent
            pixels, inside = canvas[y0:y1, x0:x1], mask[y0:y1, x0:x1, None].numpy()
            np.copyto(pixels, (1 - alpha) * pixels + alpha * np.array(colour, np.float32), where=inside)
    picture = Image.fromarray(canvas.astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    font = _label_font()
    for box, name, score, colour in zip(instances.boxes.tolist(), instances.class_names,
                                        instances.scores.tolist(), colours):
        draw.rectangle(box, outline=colour, width=2)
        label = f"{name} {score:.2f}"
        x, y = box[0], max(0, box[1] - 13)
        draw.rectangle(draw.textbbox((x + 1, y), label, font=font), fill=colour)  # as wide as the text
        draw.text((x + 1, y), label, fill=(0, 0, 0), font=font)
    return picture


@functools.lru_cache(maxsize=1)
def _label_font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans (matplotlib's, covering Latin, Greek and Cyrillic letters), else Pillow's own."""
    from matplotlib import font_manager

    try:
        return ImageFont.truetype(font_manager.findfont("DejaVu Sans", fallback_to_default=False), 11)
    except (OSError, ValueError):
        return ImageFont.load_default(size=11)


def plot_training_curves(metrics_jsonl: str | Path, out_png: str | Path) -> Path:
    """Losses and (when logged) mask/box AP against iteration, from a trainer's metrics file.

    Loss rows are those with ``total_loss`` (the trainer writes it with each ``loss_*`` term in
    every log row); evaluation rows are those with ``bbox`` or ``segm``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    train = [r for r in rows if "total_loss" in r]
    evals = [r for r in rows if "segm" in r or "bbox" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted({k for r in train for k in r if k.startswith("loss")} | {"total_loss"}):
        pts = [(r["iteration"], r[key]) for r in train if key in r]
        if pts:
            axes[0].plot(*zip(*pts), label=key)
    axes[0].set_xlabel("iteration")
    axes[0].set_yscale("log")
    axes[0].set_title("training losses")
    axes[0].legend(fontsize=7)
    for kind in ("bbox", "segm"):
        pts = [(r["iteration"], r[kind]["AP"]) for r in evals if kind in r]
        if pts:
            axes[1].plot(*zip(*pts), marker="o", label=f"{kind} AP")
    axes[1].set_xlabel("iteration")
    axes[1].set_title("validation AP")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
