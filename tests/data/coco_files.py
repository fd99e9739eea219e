"""Helpers that write small COCO data sets for the data tests."""

import json

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

CATEGORIES = [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}]


def write_coco(root, images, annotations, categories=None, *, files=True):
    """``root/ann.json`` plus, if ``files``, a random-pixel PNG of the right size per image.
    Returns (json path, image dir)."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for img in images if files else []:
        path = img_dir / img["file_name"]
        if not path.exists():
            pixels = rng.integers(0, 255, (img["height"], img["width"], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)
    data = {"images": images, "annotations": annotations,
            "categories": CATEGORIES if categories is None else categories}
    path = root / "ann.json"
    path.write_text(json.dumps(data))
    return path, img_dir


def rle_json(mask: np.ndarray) -> dict:
    """A compressed RLE as it appears in COCO JSON (counts as str)."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """Column-major run lengths starting with a run of zeros (COCO's crowd format)."""
    flat = mask.flatten(order="F")
    runs, value, count = [], 0, 0
    for v in flat:
        if v != value:
            runs.append(count)
            value, count = v, 0
        count += 1
    runs.append(count)
    return {"size": list(mask.shape), "counts": runs}
