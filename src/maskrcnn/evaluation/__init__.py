"""COCO evaluation with pycocotools: results files, box and mask AP, per-category AP."""

from maskrcnn.evaluation.coco_eval import coco_metrics, evaluate, format_table, predictions_to_coco

__all__ = ["coco_metrics", "evaluate", "format_table", "predictions_to_coco"]
