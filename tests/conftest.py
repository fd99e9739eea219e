import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image


def write_coco(root, images, annotations, categories=None):
    """A COCO file plus PNG images (random pixels) in ``root``; returns (json path, image dir)."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for img in images:
        if not (img_dir / img["file_name"]).exists():
            Image.fromarray(rng.integers(0, 255, (img["height"], img["width"], 3), dtype=np.uint8)).save(
                img_dir / img["file_name"])
    data = {"images": images, "annotations": annotations,
            "categories": categories or [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}]}
    path = root / "ann.json"
    path.write_text(json.dumps(data))
    return path, img_dir


def rle_of(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


@pytest.fixture
def small_coco(tmp_path):
    """Two 40x50 images: a polygon, a compressed RLE, an uncompressed RLE, a crowd; one empty image."""
    mask = np.zeros((40, 50), np.uint8)
    mask[10:20, 5:25] = 1
    flat = mask.flatten(order="F")
    runs, last, count = [], 0, 0
    for v in flat:
        if v != last:
            runs.append(count)
            count, last = 0, v
        count += 1
    runs.append(count)
    images = [{"id": 1, "file_name": "a.png", "height": 40, "width": 50},
              {"id": 2, "file_name": "b.png", "height": 40, "width": 50},
              {"id": 3, "file_name": "c.png", "height": 40, "width": 50}]
    annotations = [
        {"id": 10, "image_id": 1, "category_id": 7, "bbox": [5, 10, 20, 10], "area": 200, "iscrowd": 0,
         "segmentation": [[5, 10, 25, 10, 25, 20, 5, 20]]},
        {"id": 11, "image_id": 1, "category_id": 3, "bbox": [5, 10, 20, 10], "area": 200, "iscrowd": 0,
         "segmentation": rle_of(mask)},
        {"id": 12, "image_id": 2, "category_id": 3, "bbox": [5, 10, 20, 10], "area": 200, "iscrowd": 0,
         "segmentation": {"size": [40, 50], "counts": runs}},
        {"id": 13, "image_id": 2, "category_id": 7, "bbox": [30, 20, 15, 15], "area": 225, "iscrowd": 1,
         "segmentation": {"size": [40, 50], "counts": [0, 2000]}},
    ]
    return write_coco(tmp_path, images, annotations), mask
