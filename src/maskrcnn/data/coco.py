"""COCO-format instance segmentation data: the reader and its label mapping.

Labels inside the library are contiguous, 1..K (0 is background); ``category_ids[label - 1]``
is the data set's own id, which every output file uses.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from torch import Tensor

from maskrcnn.data.transforms import load_image
from maskrcnn.data.validate import DataError, check_images, check_records, read_json, summarise
from maskrcnn.structures.masks import PolygonMasks, RLEMasks


class CocoDataset:
    """Images and instance targets from a COCO instances JSON.

    ``dataset[i]`` -> (image (3, H, W) uint8 RGB, target) with target ``boxes`` (N, 4) xyxy
    float32, ``labels`` (N,) int64 in 1..K, ``masks`` (compact: PolygonMasks or RLEMasks),
    ``image_id``. Crowd regions (``iscrowd=1``) are left out of the targets; the evaluator reads
    them from the JSON. Bad records raise ``DataError`` listing every problem, or with
    ``skip_bad=True`` are dropped and counted in ``skipped``.

    >>> ds = CocoDataset("data/shapes/train.json", "data/shapes/train")  # doctest: +SKIP
    >>> image, target = ds[0]  # doctest: +SKIP
    """

    def __init__(self, annotation_json: str | Path, image_dir: str | Path, *, drop_empty: bool = False,
                 skip_bad: bool = False, transforms=None, check_image_files: bool = True):
        self.annotation_json, self.image_dir = str(annotation_json), Path(image_dir)
        self.transforms = transforms
        data, problems = read_json(annotation_json)
        if data is None:
            raise DataError(summarise(problems))
        problems = check_records(data, self.annotation_json)
        if check_image_files:
            problems += check_images(data, self.annotation_json, image_dir)
        fatal = [p for p in problems if p.image_id is None and p.annotation_id is None]
        if problems and (not skip_bad or fatal):
            hint = "" if skip_bad else " (run `maskrcnn check-data`, fix them, or skip them with data.skip_bad=true)"
            raise DataError(f"{len(problems)} problem(s) in {self.annotation_json}{hint}:\n"
                            + summarise(problems))
        bad_images = {p.image_id for p in problems if p.annotation_id is None}
        bad_annotations = {p.annotation_id for p in problems if p.annotation_id is not None}
        self.skipped = Counter(p.kind for p in problems)

        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in categories]
        self.class_names = [str(c.get("name", c["id"])) for c in categories]
        self.category_to_label = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        per_image: dict = {img["id"]: [] for img in data["images"] if img["id"] not in bad_images}
        for ann in data["annotations"]:
            if ann["id"] not in bad_annotations and ann["image_id"] in per_image:
                per_image[ann["image_id"]].append(ann)
        self.images = [img for img in data["images"] if img["id"] in per_image]
        self.annotations = [
            [a for a in per_image[img["id"]] if not a.get("iscrowd", 0)] for img in self.images]
        if drop_empty:
            keep = [i for i, anns in enumerate(self.annotations) if anns]
            self.skipped["empty-image"] += len(self.images) - len(keep)
            self.images = [self.images[i] for i in keep]
            self.annotations = [self.annotations[i] for i in keep]
        self.image_ids = [img["id"] for img in self.images]

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def label_to_category(self, label: int) -> int:
        return self.category_ids[label - 1]

    def skipped_summary(self) -> str:
        return ", ".join(f"{n} {kind}" for kind, n in sorted(self.skipped.items())) or "nothing"

    def __len__(self) -> int:
        return len(self.images)

    def aspect_ratios(self) -> list[float]:
        """Width / height of every image, from the JSON (no decoding)."""
        return [img["width"] / img["height"] for img in self.images]

    def target(self, index: int) -> dict:
        info, anns = self.images[index], self.annotations[index]
        h, w = info["height"], info["width"]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                               a["bbox"][1] + a["bbox"][3]] for a in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.category_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        segs = [a.get("segmentation") or _box_polygon(a["bbox"]) for a in anns]
        if all(isinstance(s, list) for s in segs):
            masks = PolygonMasks([[p for p in s] for s in segs], h, w)
        else:
            masks = RLEMasks.from_segmentations(segs, h, w)
        return {"boxes": boxes, "labels": labels, "masks": masks, "image_id": info["id"]}

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        info = self.images[index]
        image = load_image(self.image_dir / info["file_name"])
        target = self.target(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def _box_polygon(bbox: list[float]) -> list[list[float]]:
    x, y, w, h = bbox
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]
