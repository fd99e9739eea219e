"""COCO box and mask AP computed by pycocotools itself, on results files it loads unchanged."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def encode_mask(mask: Tensor) -> dict:
    """(H, W) bool -> compressed RLE with ``counts`` as str (JSON-ready)."""
    rle = mask_util.encode(np.asfortranarray(mask.cpu().numpy().astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def predictions_to_coco(outputs: list[dict], image_ids: list[int], category_ids: list[int]) -> list[dict]:
    """Model outputs -> COCO results (xywh boxes, RLE masks, the data set's own category ids)."""
    results = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].tolist()
        for i, (x1, y1, x2, y2) in enumerate(boxes):
            results.append({"image_id": int(image_id),
                            "category_id": int(category_ids[int(out["labels"][i]) - 1]),
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(out["scores"][i]),
                            "segmentation": encode_mask(out["masks"][i])})
    return results


def coco_metrics(annotation_json: str | Path, results: list[dict], image_ids: list[int],
                 class_names: list[str], category_ids: list[int]) -> dict:
    """AP table for "bbox" and "segm" plus per-category AP (fractions in [0, 1])."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotation_json))
    metrics: dict = {"per_category": {name: {} for name in class_names}}
    for iou_type in ("bbox", "segm"):
        if not results:
            metrics[iou_type] = {k: 0.0 for k in STATS}
            for name in class_names:
                metrics["per_category"][name][iou_type] = 0.0
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(results)
            ev = COCOeval(gt, dt, iou_type)
            ev.params.imgIds = list(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        metrics[iou_type] = {k: max(float(v), 0.0) for k, v in zip(STATS, ev.stats[:6])}
        precision = ev.eval["precision"]  # (iou, recall, category, area, max dets)
        for k, (name, cid) in enumerate(zip(class_names, category_ids)):
            idx = ev.params.catIds.index(cid)
            p = precision[:, :, idx, 0, -1]
            metrics["per_category"][name][iou_type] = float(p[p > -1].mean()) if (p > -1).any() else 0.0
    return metrics


def evaluate(model, dataset, *, device=None, batch_size: int = 1, out_json: str | Path | None = None,
             progress: bool = True) -> dict:
    """Run ``model`` on every image of a ``CocoDataset`` and score it with pycocotools.

    >>> metrics = evaluate(model, CocoDataset("val.json", "val"))  # doctest: +SKIP
    >>> metrics["segm"]["AP"]  # doctest: +SKIP
    """
    from tqdm import tqdm

    from maskrcnn.data.loader import build_test_loader

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    results = []
    loader = build_test_loader(dataset, batch_size=batch_size)
    with torch.inference_mode():
        for images, targets in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
            outputs = model([im.to(device) for im in images])
            outputs = [{k: v.cpu() for k, v in o.items()} for o in outputs]
            results += predictions_to_coco(outputs, [t["image_id"] for t in targets], dataset.category_ids)
    model.train(was_training)
    if out_json:
        Path(out_json).write_text(json.dumps(results))
    return coco_metrics(dataset.annotation_json, results, dataset.image_ids, dataset.class_names,
                        dataset.category_ids)


def format_table(metrics: dict) -> str:
    """The AP table (percent) and the per-category AP."""
    lines = [f"{'':6s}" + "".join(f"{k:>8s}" for k in STATS)]
    for kind, label in (("bbox", "box"), ("segm", "mask")):
        lines.append(f"{label:6s}" + "".join(f"{100 * metrics[kind][k]:8.1f}" for k in STATS))
    lines.append("")
    lines.append(f"{'category':20s}{'box AP':>8s}{'mask AP':>9s}")
    for name, values in metrics["per_category"].items():
        lines.append(f"{name:20s}{100 * values['bbox']:8.1f}{100 * values['segm']:9.1f}")
    return "\n".join(lines)
