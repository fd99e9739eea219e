"""The built-in data set: circles, triangles and rectangles that overlap and occlude each other on
noisy, textured backgrounds, written in COCO format.

Masks are exact: every shape is rasterised at pixel centres with hard edges, drawn in order, and
each instance's mask is what remains visible after the shapes drawn later. A new shape is only
accepted if every earlier shape stays at least half visible, so each drawn object is annotated.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

CLASSES = ("circle", "triangle", "rectangle")


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    kind = rng.integers(3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:  # linear gradient between two colours
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        angle = rng.uniform(0, 2 * math.pi)
        t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
        img = a + (b - a) * t[..., None]
    elif kind == 1:  # stripes
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        period = rng.uniform(6, 30)
        angle = rng.uniform(0, math.pi)
        phase = (np.cos(angle) * xx + np.sin(angle) * yy) / period
        img = np.where((np.floor(phase) % 2 == 0)[..., None], a, b)
    else:  # blotchy texture: coarse random colours upsampled
        cells = rng.uniform(0, 255, (rng.integers(3, 9), rng.integers(3, 9), 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(cells).resize((w, h), Image.BICUBIC), dtype=np.float32)
    return img.astype(np.float32)


def _rasterise(rng: np.random.Generator, kind: int, h: int, w: int) -> np.ndarray:
    """One random shape as an (H, W) bool mask, sampled at pixel centres."""
    size = math.exp(rng.uniform(math.log(14), math.log(0.5 * min(h, w))))
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    if kind == 0:
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= (size / 2) ** 2
    angle = rng.uniform(0, 2 * math.pi)
    if kind == 1:  # triangle: three points on a circle, reasonably spread
        offsets = np.array([0, 2 * math.pi / 3, 4 * math.pi / 3]) + rng.uniform(-0.35, 0.35, 3)
        pts = np.stack([cx + size / 1.6 * np.cos(angle + offsets), cy + size / 1.6 * np.sin(angle + offsets)], 1)
    else:  # rectangle with a random aspect ratio and rotation
        aspect = rng.uniform(0.5, 2.0)
        hw_, hh = size / 2 * math.sqrt(aspect), size / 2 / math.sqrt(aspect)
        corners = np.array([[-hw_, -hh], [hw_, -hh], [hw_, hh], [-hw_, hh]])
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        pts = corners @ rot.T + [cx, cy]
    return _inside_convex(pts, xs, ys)


def _inside_convex(pts: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    inside_pos = np.ones(xs.shape, bool)
    inside_neg = np.ones(xs.shape, bool)
    for (x0, y0), (x1, y1) in zip(pts, np.roll(pts, -1, axis=0)):
        cross = (x1 - x0) * (ys - y0) - (y1 - y0) * (xs - x0)
        inside_pos &= cross >= 0
        inside_neg &= cross <= 0
    return inside_pos | inside_neg


def make_image(rng: np.random.Generator, h: int, w: int, max_instances: int = 6):
    """One image (H, W, 3) uint8 and its instances [(class index, visible mask)]."""
    img = _background(rng, h, w)
    shapes: list[tuple[int, np.ndarray]] = []
    visible: list[np.ndarray] = []
    target = rng.integers(1, max_instances + 1)
    for _ in range(target * 4):
        if len(shapes) == target:
            break
        kind = int(rng.integers(len(CLASSES)))
        mask = _rasterise(rng, kind, h, w)
        area = mask.sum()
        if area < 60:
            continue
        new_visible = [v & ~mask for v in visible]
        if any(nv.sum() < max(0.5 * s[1].sum(), 40) for nv, s in zip(new_visible, shapes)):
            continue  # would hide an earlier shape too much
        shapes.append((kind, mask))
        visible = new_visible + [mask.copy()]
    for kind, mask in shapes:
        colour = rng.uniform(0, 255, 3)
        shade = rng.normal(0, rng.uniform(0, 12), (h, w, 1))  # texture on the shape itself
        img[mask] = np.clip(colour + shade[mask], 0, 255)
    img += rng.normal(0, rng.uniform(2, 14), img.shape)
    image = np.clip(img, 0, 255).astype(np.uint8)
    return image, [(kind, v) for (kind, _), v in zip(shapes, visible)]


def make_shapes(out_dir: str | Path, n_train: int, n_val: int, seed: int = 0) -> dict[str, Path]:
    """Write ``out_dir/{train,val}/*.png`` and ``out_dir/{train,val}.json`` (COCO instances).

    >>> paths = make_shapes("data/shapes", n_train=1000, n_val=200, seed=0)  # doctest: +SKIP
    """
    out = Path(out_dir)
    written = {}
    for split, count, split_seed in (("train", n_train, seed), ("val", n_val, seed + 1_000_003)):
        rng = np.random.default_rng(split_seed)
        (out / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            short, long = int(rng.integers(192, 257)), int(rng.integers(256, 321))
            h, w = (short, long) if rng.random() < 0.7 else (long, short)
            image, instances = make_image(rng, h, w)
            name = f"{split}_{i:05d}.png"
            Image.fromarray(image).save(out / split / name, compress_level=1)
            images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
            for kind, mask in instances:
                rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                x, y, bw, bh = mask_util.toBbox(rle).tolist()
                annotations.append({
                    "id": len(annotations) + 1, "image_id": i + 1, "category_id": kind + 1,
                    "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
                    "area": float(mask.sum()), "bbox": [x, y, bw, bh], "iscrowd": 0})
        coco = {"images": images, "annotations": annotations,
                "categories": [{"id": k + 1, "name": n, "supercategory": "shape"}
                               for k, n in enumerate(CLASSES)]}
        path = out / f"{split}.json"
        path.write_text(json.dumps(coco))
        written[split] = path
    return written
