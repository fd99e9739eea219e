"""The built-in data set: circles, triangles and rectangles that overlap and occlude each other
on noisy, textured backgrounds, written in COCO format.

It is small enough to train on a CPU in minutes yet needs what COCO needs: objects from ~12 px
to half the image, occlusion, clutter, both image orientations, and classes told apart by
shape alone (colours are random). Masks are exact: every shape is rasterised at pixel centres
with hard edges and drawn in order; an instance's mask is its shape minus the shapes drawn
after it. A shape left with less than 30% of itself (or 40 px) visible is not drawn at all, so
every visible object is annotated.

Category ids are deliberately not 1..K (circle 1, triangle 3, rectangle 7), so that a mix-up
between contiguous labels and the data set's ids shows up as wrong evaluation results.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

CATEGORY_IDS = {"circle": 1, "triangle": 3, "rectangle": 7, "star": 10, "ring": 12}
CLASSES = ("circle", "triangle", "rectangle")

MIN_VISIBLE_FRACTION = 0.3
MIN_VISIBLE_PIXELS = 40
MIN_CONTRAST = 70.0  # RGB distance to what lies underneath, so every object can be seen


def make_shapes(out_dir: str | Path, n_train: int, n_val: int, seed: int = 0, *,
                short_side: tuple[int, int] = (224, 288), max_side: int = 384,
                max_instances: int = 6, classes: tuple[str, ...] = CLASSES, workers: int | None = None
                ) -> dict[str, Path]:
    """Write ``out_dir/{train,val}/*.png`` and ``out_dir/{train,val}.json`` (COCO instances).

    Image sizes: short side uniform in ``short_side``, long side uniform up to ``max_side``,
    about 40% portrait. Each image holds 1..``max_instances`` shapes of ``classes`` (any of
    circle, triangle, rectangle, star, ring). The output depends only on the arguments (not on
    ``workers``, the number of processes, by default one per core up to 8).
    Returns {"train": json path, "val": json path}.

    >>> paths = make_shapes("data/shapes", n_train=1000, n_val=200, seed=0)  # doctest: +SKIP
    """
    unknown = [c for c in classes if c not in CATEGORY_IDS]
    if unknown or not classes:
        raise ValueError(f"unknown shape class(es) {unknown}; choose from {sorted(CATEGORY_IDS)}")
    out = Path(out_dir)
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    written = {}
    settings = (tuple(short_side), max_side, max_instances, tuple(classes))
    for split, count, code in (("train", n_train, 0), ("val", n_val, 1)):
        (out / split).mkdir(parents=True, exist_ok=True)
        jobs = [(out / split, seed, code, i, settings) for i in range(count)]
        if workers > 1 and count >= 32:  # below that, starting processes costs more than it saves
            with ProcessPoolExecutor(workers) as pool:
                results = list(pool.map(_write_image, jobs, chunksize=16))
        else:
            results = [_write_image(job) for job in jobs]
        images, annotations = [], []
        for i, (h, w, instances) in enumerate(results):
            images.append({"id": i + 1, "file_name": f"{i:06d}.png", "height": h, "width": w})
            for name, rle, area, bbox in instances:
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                    "category_id": CATEGORY_IDS[name], "segmentation": rle,
                                    "area": area, "bbox": bbox, "iscrowd": 0})
        coco = {"info": {"description": f"maskrcnn synthetic shapes, seed {seed}, {split}"},
                "images": images, "annotations": annotations,
                "categories": [{"id": CATEGORY_IDS[c], "name": c, "supercategory": "shape"}
                               for c in sorted(classes, key=CATEGORY_IDS.get)]}
        path = out / f"{split}.json"
        path.write_text(json.dumps(coco))
        written[split] = path
    return written


def _write_image(job) -> tuple[int, int, list]:
    folder, seed, code, index, (short_side, max_side, max_instances, classes) = job
    rng = np.random.default_rng(np.random.SeedSequence([seed % 2**63, code, index]))
    short = int(rng.integers(short_side[0], short_side[1] + 1))
    long = int(rng.integers(short, max(short, max_side) + 1))
    h, w = (long, short) if rng.random() < 0.4 else (short, long)
    image, instances = make_image(rng, h, w, classes, max_instances)
    Image.fromarray(image).save(folder / f"{index:06d}.png", compress_level=1)
    records = []
    for name, mask in instances:
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        bbox = [float(v) for v in mask_util.toBbox(rle)]
        records.append((name, {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                        int(mask.sum()), bbox))
    return h, w, records


def make_image(rng: np.random.Generator, h: int, w: int, classes: tuple[str, ...] = CLASSES,
               max_instances: int = 6) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """One (H, W, 3) uint8 image and its instances [(class name, visible (H, W) bool mask)],
    in drawing order; the visible masks are disjoint.

    >>> image, instances = make_image(np.random.default_rng(0), 64, 80)
    >>> image.shape, all(m.shape == (64, 80) for _, m in instances)
    ((64, 80, 3), True)
    """
    canvas = _background(rng, h, w)
    kept = layout(rng, h, w, classes, max_instances)
    for _, shape, _ in kept:
        _paint(rng, canvas, shape)
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    return image, [(name, visible) for name, _, visible in kept]


def layout(rng: np.random.Generator, h: int, w: int, classes: tuple[str, ...] = CLASSES,
           max_instances: int = 6) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """1..``max_instances`` random shapes as [(class name, shape mask, visible mask)] in drawing
    order, (H, W) bool each: visible = shape minus every shape drawn after it.

    A shape whose visible part would be under 30% of it or 40 px is left out altogether; that
    only uncovers the shapes beneath it, so deciding from the top down is exact.
    """
    wanted = int(rng.integers(1, max_instances + 1))
    placed = [(str(classes[rng.integers(len(classes))]), _shape(rng, h, w)) for _ in range(wanted)]
    kept: list[tuple[str, np.ndarray, np.ndarray]] = []
    covered = np.zeros((h, w), bool)
    for name, draw in reversed(placed):
        shape = draw(name)
        visible = shape & ~covered
        area = int(visible.sum())
        if area >= MIN_VISIBLE_PIXELS and area >= MIN_VISIBLE_FRACTION * shape.sum():
            kept.append((name, shape, visible))
            covered |= shape
    return kept[::-1]


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(H, W, 3) float32: a gradient, stripes, a blotchy texture, a checkerboard or speckles.

    Noise comes as blocks of a few pixels rather than per pixel: per-pixel noise makes the PNG
    files five times larger and slower to write, and the blocks are as hard to ignore.
    """
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    kind = int(rng.integers(5))
    angle = rng.uniform(0, math.pi)
    along = (math.cos(angle) * xx + math.sin(angle) * yy)
    if kind == 0:
        t = (along - along.min()) / max(float(along.max() - along.min()), 1e-6)
        img = a + (b - a) * t[..., None]
    elif kind == 1:
        b = a + (b - a) * rng.uniform(0.2, 0.6)  # muted stripes: texture, not a second object
        img = np.where((np.floor(along / rng.uniform(4, 24)) % 2 == 0)[..., None], a, b)
    elif kind == 2:
        cells = rng.uniform(0, 255, (int(rng.integers(3, 10)), int(rng.integers(3, 10)), 3))
        img = np.asarray(Image.fromarray(cells.astype(np.uint8)).resize((w, h), Image.BICUBIC))
    elif kind == 3:
        b = a + (b - a) * rng.uniform(0.2, 0.6)
        size = rng.uniform(8, 32)
        img = np.where(((np.floor(xx / size) + np.floor(yy / size)) % 2 == 0)[..., None], a, b)
    else:
        block = int(rng.integers(2, 5))
        speckle = rng.normal(0, rng.uniform(8, 30), (h // block + 1, w // block + 1, 3))
        img = a + np.repeat(np.repeat(speckle, block, 0), block, 1)[:h, :w]
    return np.ascontiguousarray(img, dtype=np.float32)


def _shape(rng: np.random.Generator, h: int, w: int):
    """A random placement; returns ``draw(name) -> (H, W) bool mask`` sampled at pixel centres."""
    # log-scale sizes from 18 px to half the short side, tilted towards larger ones; small
    # objects (COCO's area < 32^2) stay common without going below what a stride-4 level resolves
    size = 18.0 * (0.5 * min(h, w) / 18.0) ** (rng.random() ** 0.6)
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    angle = rng.uniform(0, 2 * math.pi)
    jitter = rng.uniform(-0.35, 0.35, 3)
    aspect = rng.uniform(1.0, 2.5)
    inner = rng.uniform(0.4, 0.65)
    r = size / 2

    def draw(name: str) -> np.ndarray:
        if name == "circle":
            return _disc(cx, cy, 0.85 * r, h, w)
        if name == "ring":
            return _disc(cx, cy, 0.9 * r, h, w) & ~_disc(cx, cy, 0.9 * r * inner, h, w)
        if name == "triangle":
            t = angle + np.array([0, 2 * math.pi / 3, 4 * math.pi / 3]) + jitter
            pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)
        elif name == "rectangle":
            half = np.array([r * math.cos(math.atan(1 / aspect)), r * math.sin(math.atan(1 / aspect))])
            corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half
            rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
            pts = corners @ rot.T + [cx, cy]
        else:  # five-pointed star
            t = angle + np.arange(10) * math.pi / 5
            radius = np.where(np.arange(10) % 2 == 0, r, r * inner * 0.75)
            pts = np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], 1)
        return _polygon(pts, h, w)

    return draw


def _window(x0: float, y0: float, x1: float, y1: float, h: int, w: int):
    """Pixel-centre grids of the part of the image inside [x0, x1] x [y0, y1]."""
    c0, c1 = max(int(math.floor(x0)), 0), min(int(math.ceil(x1)) + 1, w)
    r0, r1 = max(int(math.floor(y0)), 0), min(int(math.ceil(y1)) + 1, h)
    ys, xs = np.mgrid[r0:max(r1, r0), c0:max(c1, c0)].astype(np.float64) + 0.5
    return (slice(r0, max(r1, r0)), slice(c0, max(c1, c0))), xs, ys


def _disc(cx: float, cy: float, radius: float, h: int, w: int) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    where, xs, ys = _window(cx - radius, cy - radius, cx + radius, cy + radius, h, w)
    mask[where] = (xs - cx) ** 2 + (ys - cy) ** 2 <= radius ** 2
    return mask


def _polygon(pts: np.ndarray, h: int, w: int) -> np.ndarray:
    """Even-odd fill of a simple polygon (K, 2), vectorised over the pixels of its bounding box."""
    mask = np.zeros((h, w), bool)
    (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
    where, xs, ys = _window(x0, y0, x1, y1, h, w)
    inside = np.zeros(xs.shape, bool)
    for (ax, ay), (bx, by) in zip(pts, np.roll(pts, -1, axis=0)):
        if ay == by:
            continue  # a horizontal edge never crosses a horizontal ray
        spans = (ay > ys) != (by > ys)
        inside ^= spans & (xs < ax + (ys - ay) * (bx - ax) / (by - ay))
    mask[where] = inside
    return mask


def _paint(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray) -> None:
    """Fill ``mask`` with a random colour that stands out from what it covers, shaded by a
    gentle gradient of its own."""
    under = canvas[mask].mean(0)
    for _ in range(20):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - under) >= MIN_CONTRAST:
            break
    ys, xs = np.nonzero(mask)
    slope = rng.normal(0, 0.4, 2)
    shade = (xs - xs.mean()) * slope[0] + (ys - ys.mean()) * slope[1]
    canvas[ys, xs] = np.clip(colour + shade[:, None], 0, 255)
