import numpy as np
import pytest

from coco_files import rle_json, uncompressed_rle, write_coco


@pytest.fixture
def small_coco(tmp_path):
    """Three 40x50 images: image 1 holds a polygon and a compressed RLE, image 2 an uncompressed
    RLE and a crowd region, image 3 nothing. Returns ((json, image dir), the RLE mask)."""
    mask = np.zeros((40, 50), np.uint8)
    mask[10:20, 5:25] = 1
    crowd = np.zeros((40, 50), np.uint8)
    crowd[20:35, 30:45] = 1
    images = [{"id": i, "file_name": f"{name}.png", "height": 40, "width": 50}
              for i, name in ((1, "a"), (2, "b"), (3, "c"))]
    annotations = [
        {"id": 10, "image_id": 1, "category_id": 7, "bbox": [5, 10, 20, 10], "area": 200, "iscrowd": 0,
         "segmentation": [[5, 10, 25, 10, 25, 20, 5, 20]]},
        {"id": 11, "image_id": 1, "category_id": 3, "bbox": [5, 10, 20, 10], "area": 200, "iscrowd": 0,
         "segmentation": rle_json(mask)},
        {"id": 12, "image_id": 2, "category_id": 3, "bbox": [5, 10, 20, 10], "area": 200, "iscrowd": 0,
         "segmentation": uncompressed_rle(mask)},
        {"id": 13, "image_id": 2, "category_id": 7, "bbox": [30, 20, 15, 15], "area": 225, "iscrowd": 1,
         "segmentation": uncompressed_rle(crowd)},
    ]
    return write_coco(tmp_path, images, annotations), mask
