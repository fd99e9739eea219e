"""COCO box and mask AP computed by pycocotools itself, on results files it loads unchanged.

Two details decide whether numbers match other implementations:

* Category ids in the results are the data set's own (``label_to_category``), never the
  model's contiguous labels; mixing them up is the usual cause of "AP 0".
* Mask AP is computed from results without their ``bbox`` field. ``COCO.loadRes`` sets each
  result's area from its box when one is present, which would put instances into the wrong
  small/medium/large bucket for masks; Detectron2 and torchvision evaluate masks this way too.
  The results file keeps both fields.

Crowd regions need nothing here: pycocotools reads ``iscrowd`` from the ground truth and does
not count detections that fall on them as false positives.

Ground truth that ``check_coco`` accepts is evaluated as it is, even where labelling tools left
out fields pycocotools needs. pycocotools gets a completed copy (the file and the objects passed
in are never changed): a missing ``iscrowd`` is 0, a missing ``area`` is the segmentation's pixel
area, or the box's w * h without one, and an annotation without a segmentation (missing, null or
``[]``) has its box, clipped to the image, as a rectangle mask, which is the mask ``CocoDataset``
trains on, so mask AP scores such instances against their box.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from maskrcnn.data.coco import box_polygon
from maskrcnn.structures.masks import RLEMasks, mask_extent

STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")


def encode_masks(masks: Tensor, regions: Tensor | None = None) -> list[dict]:
    """(N, H, W) bool -> N compressed RLEs with ``counts`` as str (JSON-ready). ``regions``
    (N, 4) (x0, y0, x1, y1): where given, the part of the image outside which each mask is
    empty, the only part read (``Instances.mask_regions``).

    A COCO RLE counts alternating runs of 0s and 1s down the columns of the image, left to
    right. Every run before the first column a mask covers, and after its last, is 0s, so only
    those columns are read: they are copied into one Fortran-order buffer (over the rows the mask
    covers; the other rows stay 0), the runs are found there, and pycocotools compresses them.
    Reading all of an image for each mask cost 5 ms a mask at 4000x3000.

    >>> m = torch.zeros(1, 4, 5, dtype=torch.bool); m[0, 1:3, 2:4] = True
    >>> encode_masks(m)[0]["size"]
    [4, 5]
    """
    if len(masks) == 0:
        return []
    h, w = masks.shape[1:]
    buffer = np.zeros((h, w), dtype=np.uint8, order="F")
    rles = []
    for mask, region in zip(masks.cpu(), [None] * len(masks) if regions is None else regions.tolist()):
        extent = mask_extent(mask, region)
        if extent is None:
            counts = [h * w]
        else:
            y0, y1, x0, x1 = extent
            columns = buffer[:, x0:x1]
            columns[y0:y1] = mask[y0:y1, x0:x1].numpy()
            flat = columns.ravel(order="K")  # column after column, as the RLE runs
            changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # the first pixel of each new run
            # the runs start with 0s, none if the image's first pixel is set
            starts = np.concatenate([[0] if flat[0] else [], changes, [len(flat)] if flat[-1] else []])
            counts = np.diff(np.concatenate([[0], starts + x0 * h, [h * w]])).tolist()
            if counts[-1] == 0:  # the image's last pixel is set
                counts.pop()
            columns[y0:y1] = 0
        rle = mask_util.frPyObjects({"size": [h, w], "counts": counts}, h, w)
        rles.append({"size": [h, w], "counts": rle["counts"].decode("ascii")})
    return rles


def encode_mask(mask: Tensor) -> dict:
    """(H, W) bool -> one compressed RLE with ``counts`` as str."""
    return encode_masks(mask[None])[0]


def predictions_to_coco(outputs: Sequence[dict], image_ids: Sequence[int],
                        label_to_category: Callable[[int], int] | Sequence[int]) -> list[dict]:
    """Model outputs -> COCO results: ``image_id``, ``category_id``, ``bbox`` [x, y, w, h],
    ``score`` and ``segmentation`` (compressed RLE).

    ``outputs[i]`` (one per image): ``boxes`` (N, 4) xyxy, ``labels`` (N,) in 1..K, ``scores``
    (N,), ``masks`` (N, H, W) bool and, optionally, ``mask_regions`` (``encode_masks``).
    ``label_to_category`` is the data set's mapping (e.g. ``dataset.label_to_category``) or its
    list of category ids indexed by ``label - 1``.

    >>> out = {"boxes": torch.tensor([[1.0, 2, 4, 6]]), "labels": torch.tensor([2]),
    ...        "scores": torch.tensor([0.9]), "masks": torch.ones(1, 8, 8, dtype=torch.bool)}
    >>> r = predictions_to_coco([out], [42], [7, 9])[0]
    >>> r["image_id"], r["category_id"], r["bbox"]
    (42, 9, [1.0, 2.0, 3.0, 4.0])
    """
    if callable(label_to_category):
        to_category = label_to_category
    else:
        category_ids = list(label_to_category)

        def to_category(label: int) -> int:
            if not 1 <= label <= len(category_ids):
                raise ValueError(f"label {label} has no category id: the {len(category_ids)} ids given "
                                 f"map labels 1..{len(category_ids)}; pass one id per class of the model")
            return category_ids[label - 1]

    results = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().cpu()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        rles = encode_masks(out["masks"], out.get("mask_regions")) if "masks" in out else [None] * len(xywh)
        for box, label, score, rle in zip(xywh, out["labels"].tolist(), out["scores"].tolist(), rles):
            result = {"image_id": int(image_id), "category_id": int(to_category(int(label))),
                      "bbox": box, "score": float(score)}
            if rle is not None:
                result["segmentation"] = rle
            results.append(result)
    return results


def _complete_annotation(ann: dict, image: dict | None) -> dict:
    """A copy of ``ann`` with ``iscrowd``, ``segmentation`` and ``area`` as pycocotools reads them.

    Missing ``iscrowd`` -> 0; missing, null or empty ``segmentation`` -> the box (clipped to
    ``image``) as a rectangle polygon; missing ``area`` -> the given segmentation's pixel area,
    or the box's w * h without one. ``image`` is None for an annotation of an unknown image,
    which pycocotools never reads.

    >>> a = _complete_annotation({"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]},
    ...                          {"height": 10, "width": 10})
    >>> a["iscrowd"], a["area"], a["segmentation"]
    (0, 12.0, [[1.0, 2.0, 4.0, 2.0, 4.0, 6.0, 1.0, 6.0]])
    """
    out = dict(ann)
    out.setdefault("iscrowd", 0)
    segmentation = ann.get("segmentation")
    if "area" not in ann:
        w, h = ann["bbox"][2:]
        has_mask = bool(segmentation) and image is not None
        out["area"] = (float(RLEMasks.from_segmentations([segmentation], image["height"], image["width"])
                             .area()[0]) if has_mask else float(w * h))
    if not segmentation and image is not None:
        out["segmentation"] = box_polygon(ann["bbox"], image["width"], image["height"])
    return out


def _complete_ground_truth(data: dict) -> dict:
    """A COCO instances dict with every annotation completed by :func:`_complete_annotation`;
    ``data`` and its records are not changed."""
    images = {img["id"]: img for img in data["images"]}
    return {**data, "images": list(data["images"]), "categories": list(data["categories"]),
            "annotations": [_complete_annotation(a, images.get(a["image_id"])) for a in data["annotations"]]}


def _load_gt(annotations: str | Path | dict | COCO) -> COCO:
    """The ground truth as pycocotools evaluates it: a new ``COCO`` of the completed records."""
    if isinstance(annotations, COCO):
        data = annotations.dataset
    elif isinstance(annotations, dict):
        data = annotations
    else:
        data = json.loads(Path(annotations).read_text(encoding="utf-8"))
    gt = COCO()
    gt.dataset = _complete_ground_truth(data)
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def _load_results(gt: COCO, results: list[dict]) -> COCO:
    """``gt.loadRes``, which cannot take an empty list: then an empty results set."""
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return gt.loadRes(copy.deepcopy(results))
    empty = COCO()
    empty.dataset = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]),
                     "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        empty.createIndex()
    return empty


def _undefined_to_none(value: float) -> float | None:
    return None if value < 0 else float(value)  # pycocotools' -1: no ground truth in this range


def coco_metrics(annotations: str | Path | dict | COCO, results: list[dict],
                 image_ids: Sequence[int] | None = None) -> dict:
    """pycocotools' AP for "bbox" and "segm", and per-category AP (IoU 0.5:0.95, all areas).

    ``annotations`` is the ground truth: a COCO instances file, its parsed dict (e.g.
    ``CocoDataset.ground_truth()``) or a ``COCO`` object. Missing ``iscrowd``, ``area`` and
    ``segmentation`` are filled in on a copy as the module docstring says; an annotation
    without a segmentation counts for mask AP with its box as a rectangle mask.

    Returns ``{"bbox": {AP, AP50, AP75, APs, APm, APl}, "segm": {...}, "per_category":
    {name: {"bbox": AP, "segm": AP}}}``, fractions in [0, 1]; ``None`` where the ground truth
    has no instance to measure (e.g. APs without small objects). No detections give AP 0.
    ``image_ids`` restricts the evaluation (default: every image of the ground truth).
    """
    gt = _load_gt(annotations)
    cats = sorted(gt.dataset["categories"], key=lambda c: c["id"])
    names = [c.get("name", str(c["id"])) for c in cats]
    names = [n if names.count(n) == 1 else f"{n} ({c['id']})" for n, c in zip(names, cats)]
    metrics: dict = {"per_category": {n: {} for n in names}}
    for iou_type in IOU_TYPES:
        # Mask results lose their box so that loadRes takes each instance's area from the mask.
        dets = results if iou_type == "bbox" else [{k: v for k, v in r.items() if k != "bbox"}
                                                   for r in results if "segmentation" in r]
        ev = COCOeval(gt, _load_results(gt, dets), iou_type)
        if image_ids is not None:
            ev.params.imgIds = sorted(int(i) for i in image_ids)
        with contextlib.redirect_stdout(io.StringIO()):
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        metrics[iou_type] = {k: _undefined_to_none(v) for k, v in zip(STATS, ev.stats[:6])}
        precision = ev.eval["precision"]  # (IoU thresholds, recall, category, area, max dets)
        for name, cat in zip(names, cats):
            p = precision[:, :, ev.params.catIds.index(cat["id"]), 0, -1]
            metrics["per_category"][name][iou_type] = float(p[p > -1].mean()) if (p > -1).any() else None
    return metrics


def evaluate(model: torch.nn.Module, dataset, *, batch_size: int = 1, device: str | torch.device | None = None,
             out_json: str | Path | None = None, progress: bool = True,
             category_ids: Sequence[int] | None = None) -> dict:
    """Run ``model`` on every image of a ``CocoDataset`` and score it with pycocotools.

    The model runs in eval mode under ``torch.inference_mode`` (its mode is restored after).
    The ground truth is ``dataset.ground_truth()``: exactly the images and annotations the data
    set kept (records it skipped with ``skip_bad`` are neither run nor scored).
    ``out_json`` receives the COCO results file. Returns :func:`coco_metrics`' dict.
    ``category_ids[label - 1]`` is the category id of the model's label (default: the data
    set's own, for a model trained on it; a weight file's, e.g. torchvision's COCO ids 1..90).

    >>> metrics = evaluate(model, CocoDataset("val.json", "val"), out_json="results.json")  # doctest: +SKIP
    >>> print(format_table(metrics))  # doctest: +SKIP
    """
    from tqdm import tqdm

    from maskrcnn.data.loader import build_test_loader

    category_ids = list(category_ids or dataset.category_ids)
    classes = getattr(model, "num_classes", len(category_ids))
    if classes != len(category_ids):
        raise ValueError(f"the model predicts {classes} classes but {len(category_ids)} category ids were "
                         "given (default: the data set's); pass category_ids, one per class of the model")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[dict] = []
    try:
        with torch.inference_mode():
            loader = build_test_loader(dataset, batch_size=batch_size)
            for images, targets in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
                outputs = model([im.to(device) for im in images])
                outputs = [{k: v.cpu() for k, v in o.items()} for o in outputs]
                results += predictions_to_coco(outputs, [t["image_id"] for t in targets],
                                               category_ids)
    finally:
        model.train(was_training)
    if out_json:
        out_json = Path(out_json)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results))
    return coco_metrics(dataset.ground_truth(), results, dataset.image_ids)


def format_table(metrics: dict) -> str:
    """The AP table in percent, then AP per category; ``-`` where AP is undefined.

    >>> row = {k: 0.5 for k in STATS}
    >>> print(format_table({"bbox": row, "segm": row, "per_category": {"cat": {"bbox": 0.5, "segm": None}}}))
                AP    AP50    AP75     APs     APm     APl
    box       50.0    50.0    50.0    50.0    50.0    50.0
    mask      50.0    50.0    50.0    50.0    50.0    50.0
    <BLANKLINE>
    category              box AP  mask AP
    cat                     50.0        -
    """
    def cell(value: float | None, width: int) -> str:
        return f"{'-':>{width}s}" if value is None else f"{100 * value:{width}.1f}"

    lines = [f"{'':6s}" + "".join(f"{k:>8s}" for k in STATS)]
    for kind, label in (("bbox", "box"), ("segm", "mask")):
        lines.append(f"{label:6s}" + "".join(cell(metrics[kind][k], 8) for k in STATS))
    lines += ["", f"{'category':20s}{'box AP':>8s}{'mask AP':>9s}"]
    for name, values in metrics.get("per_category", {}).items():
        lines.append(f"{name[:20]:20s}{cell(values.get('bbox'), 8)}{cell(values.get('segm'), 9)}")
    return "\n".join(lines)
