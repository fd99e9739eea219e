"""Data: the COCO reader and its validation, the built-in shapes set, image loading and
augmentation, and the deterministic training loader."""

from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.loader import build_test_loader, build_train_loader, collate, pad_batch
from maskrcnn.data.shapes import make_shapes
from maskrcnn.data.transforms import TrainTransform, hflip, load_image, resize_shortest_edge
from maskrcnn.data.validate import DataError, Problem, check_coco

__all__ = ["CocoDataset", "DataError", "Problem", "TrainTransform", "build_test_loader", "build_train_loader",
           "check_coco", "collate", "hflip", "load_image", "make_shapes", "pad_batch", "resize_shortest_edge"]
