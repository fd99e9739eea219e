"""The operators Mask R-CNN is built from, written here: RoIAlign, RoIPool, NMS, box coding,
box arithmetic and mask pasting; and, for CPU inference, 3x3 convolutions by Winograd's minimal
filtering (``maskrcnn.ops.winograd``)."""

from maskrcnn.ops.box_coder import decode, encode
from maskrcnn.ops.boxes import box_area, box_iou, clip_boxes, non_empty_boxes, remove_small_boxes
from maskrcnn.ops.nms import batched_nms, nms
from maskrcnn.ops.paste import paste_masks, paste_regions
from maskrcnn.ops.roi_align import RoIAlign, roi_align
from maskrcnn.ops.roi_pool import RoIPool, roi_pool

__all__ = ["decode", "encode", "box_area", "box_iou", "clip_boxes", "non_empty_boxes", "remove_small_boxes",
           "batched_nms", "nms", "paste_masks", "paste_regions", "RoIAlign", "roi_align", "RoIPool",
           "roi_pool"]
