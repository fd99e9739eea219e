"""COCO-format instance segmentation data: the reader and its label mapping.

Labels inside the library are contiguous, 1..K (0 is background), in the order of the data
set's sorted category ids; ``category_ids[label - 1]`` is the data set's own id, which every
output file uses, so evaluation never mixes up ids.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from maskrcnn.data.transforms import load_image
from maskrcnn.data.validate import DataError, Problem, format_problems, read_and_check, read_json
from maskrcnn.structures.masks import PolygonMasks, RLEMasks


class CocoDataset:
    """Images and instance targets from a COCO instances JSON.

    ``dataset[i]`` -> ``(image, target)``: image (3, H, W) uint8 RGB, upright per EXIF;
    target ``boxes`` (N, 4) float32 xyxy clipped to the image, ``labels`` (N,) int64 in 1..K,
    ``masks`` (N instances, compact: ``RLEMasks`` if any of the image's annotations is RLE,
    else ``PolygonMasks``), ``image_id`` int and ``orig_size`` (H, W).

    Segmentations may be polygons, compressed or uncompressed RLE, or missing (the box is used).
    Crowd regions (``iscrowd=1``) are left out of the targets; the evaluator reads them from
    the JSON. Images without annotations are kept (negatives) unless ``drop_empty``.

    The file and (with ``check_images``) the image files are validated on construction:
    problems raise ``DataError`` listing them all, or with ``skip_bad=True`` the bad records
    are dropped and counted in ``skipped`` (problem kind -> records dropped).
    ``ground_truth()`` gives what the data set kept as a COCO dict, which evaluation scores.

    >>> ds = CocoDataset("data/shapes/train.json", "data/shapes/train")  # doctest: +SKIP
    >>> image, target = ds[0]  # doctest: +SKIP
    >>> ds.label_to_category(int(target["labels"][0]))  # doctest: +SKIP
    3
    """

    def __init__(self, annotation_json: str | Path, image_dir: str | Path, *, drop_empty: bool = False,
                 skip_bad: bool = False, transforms=None, check_images: bool = True):
        self.annotation_json, self.image_dir = str(annotation_json), Path(image_dir)
        self.transforms = transforms
        self._file_state = _file_state(annotation_json)
        data, problems = read_and_check(annotation_json, image_dir, check_images=check_images)
        fatal = [p for p in problems if p.where is None]
        if data is None or fatal or (problems and not skip_bad):
            raise DataError(_error_text(self.annotation_json, problems, skip_bad))
        self.skipped: Counter = Counter()
        bad = self._bad_records(problems)
        self._bad = frozenset(bad)

        categories = [c for k, c in enumerate(data["categories"]) if ("categories", k) not in bad]
        categories.sort(key=lambda c: c["id"])
        self.category_ids: list[int] = [c["id"] for c in categories]
        self.class_names: list[str] = [str(c.get("name", c["id"])) for c in categories]
        self.category_to_label: dict[int, int] = {cid: i + 1 for i, cid in enumerate(self.category_ids)}

        images = [img for k, img in enumerate(data["images"]) if ("images", k) not in bad]
        per_image: dict[int, list[dict]] = {img["id"]: [] for img in images}
        for k, ann in enumerate(data["annotations"]):
            if ("annotations", k) in bad:
                continue
            if ann["image_id"] not in per_image:
                self.skipped["annotation-of-skipped-image"] += 1
            elif not ann.get("iscrowd", 0):
                per_image[ann["image_id"]].append(ann)
        if drop_empty:
            kept = [img for img in images if per_image[img["id"]]]
            if len(kept) < len(images):
                self.skipped["empty-image"] += len(images) - len(kept)
            images = kept
        self._infos = images
        self._records = [_Record(img, per_image[img["id"]], self.category_to_label) for img in images]
        self.image_ids: list[int] = [img["id"] for img in images]

    def _bad_records(self, problems: list[Problem]) -> set[tuple[str, int]]:
        """Records to drop, each counted once under the kind of its first problem."""
        bad: set[tuple[str, int]] = set()
        for p in problems:
            if p.where not in bad:
                bad.add(p.where)
                self.skipped[p.kind] += 1
        return bad

    def ground_truth(self) -> dict:
        """The COCO instances dict of exactly what the data set kept: ``images`` (those of
        ``image_ids``), all their ``annotations`` that passed the checks (crowd regions included)
        and the kept ``categories``, each record as the file has it. Skipped records are left out.

        Read again from the file, which must not have changed since construction (else
        ``DataError``), so the data set holds no second copy of the annotations.
        """
        if _file_state(self.annotation_json) != self._file_state:
            raise DataError(f"{self.annotation_json} changed after the data set was built from it; "
                            "build the data set again to evaluate on the new file")
        data, problems = read_json(self.annotation_json)
        if data is None:
            raise DataError(format_problems(problems))
        return _kept_records(data, self._bad, {r.image_id for r in self._records})

    @property
    def num_classes(self) -> int:
        """K, the number of foreground classes."""
        return len(self.category_ids)

    def label_to_category(self, label: int) -> int:
        """The data set's category id of a contiguous label in 1..K."""
        if not 1 <= int(label) <= self.num_classes:
            raise ValueError(f"label {label} is not a foreground label 1..{self.num_classes} "
                             "(0 is background)")
        return self.category_ids[int(label) - 1]

    def skipped_summary(self) -> str:
        """The skipped records on one line, e.g. ``2 bbox-size, 1 image-missing``."""
        return ", ".join(f"{n} {kind}" for kind, n in sorted(self.skipped.items())) or "nothing"

    def __len__(self) -> int:
        return len(self._records)

    def image_info(self, index: int) -> dict:
        """The JSON record of image ``index`` (id, file_name, height, width, ...)."""
        return dict(self._infos[index])

    def aspect_ratios(self) -> list[float]:
        """Width / height of every image, from the JSON (no image is read)."""
        return [r.width / r.height for r in self._records]

    def target(self, index: int) -> dict:
        """Image ``index``'s target without reading the image."""
        return self._records[index].target()

    def load(self, index: int) -> tuple[Tensor, dict]:
        """Image and target before ``transforms``."""
        record = self._records[index]
        path = self.image_dir / record.file_name
        try:
            image = load_image(path)
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types for damaged files
            raise DataError(f"{self.annotation_json}: image {record.image_id} ({record.file_name}): "
                            f"{path} cannot be read ({type(exc).__name__}: {exc}); "
                            "run `maskrcnn check-data`") from exc
        if tuple(image.shape[1:]) != (record.height, record.width):
            raise DataError(f"{self.annotation_json}: image {record.image_id} ({record.file_name}): "
                            f"{path} is {image.shape[2]}x{image.shape[1]} (width x height) but the JSON "
                            f"says {record.width}x{record.height}; fix width/height")
        return image, record.target()

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        image, target = self.load(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


class _Record:
    """One image's training targets held compactly: numpy boxes and labels, polygon arrays or
    RLE bytes (few Python objects, so forked loader workers do not copy the data set)."""

    def __init__(self, info: dict, annotations: list[dict], category_to_label: dict[int, int]):
        self.image_id, self.file_name = info["id"], info["file_name"]
        self.height, self.width = int(info["height"]), int(info["width"])
        boxes = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # COCO [x, y, w, h] -> corners
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, self.width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, self.height)
        self.boxes = boxes.astype(np.float32)
        self.labels = np.array([category_to_label[a["category_id"]] for a in annotations], dtype=np.int64)
        self.segmentations = [self._segmentation(a) for a in annotations]
        self.any_rle = any(isinstance(s, dict) for s in self.segmentations)

    def _segmentation(self, annotation: dict):
        seg = annotation.get("segmentation")
        if isinstance(seg, dict):
            return RLEMasks([seg], self.height, self.width).rles[0]  # str/list counts -> bytes
        if not seg:  # no mask drawn: the box is the best mask there is
            seg = box_polygon(annotation["bbox"], self.width, self.height)
        return [np.asarray(p, dtype=np.float64) for p in seg]

    def target(self) -> dict:
        if self.any_rle:
            masks = RLEMasks.from_segmentations(self.segmentations, self.height, self.width)
        else:
            masks = PolygonMasks(self.segmentations, self.height, self.width)
        return {"boxes": torch.from_numpy(self.boxes.copy()), "labels": torch.from_numpy(self.labels.copy()),
                "masks": masks, "image_id": self.image_id, "orig_size": (self.height, self.width)}


def box_polygon(bbox, width: float, height: float) -> list[list[float]]:
    """COCO [x, y, w, h] -> the box clipped to a ``width`` x ``height`` image as one rectangle
    polygon: the mask of an annotation without a segmentation, in training and in evaluation.

    >>> box_polygon([-2, 1, 10, 4], 6, 4)
    [[0.0, 1.0, 6.0, 1.0, 6.0, 4.0, 0.0, 4.0]]
    """
    x, y, w, h = (float(v) for v in bbox)
    width, height = float(width), float(height)
    x1, x2 = min(max(x, 0.0), width), min(max(x + w, 0.0), width)
    y1, y2 = min(max(y, 0.0), height), min(max(y + h, 0.0), height)
    return [[x1, y1, x2, y1, x2, y2, x1, y2]]


def _file_state(path: str | Path) -> tuple[int, int] | None:
    """(size, modification time in ns) of a file, None if it is missing or out of reach."""
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _kept_records(data: dict, bad: frozenset[tuple[str, int]], image_ids: set[int]) -> dict:
    """The COCO dict of the records not in ``bad`` (``(section, position)`` pairs): the
    categories, the images with an id in ``image_ids`` and the annotations of those images."""
    def kept(section: str) -> list:
        return [r for k, r in enumerate(data[section]) if (section, k) not in bad]

    return {"images": [img for img in kept("images") if img["id"] in image_ids],
            "annotations": [a for a in kept("annotations") if a["image_id"] in image_ids],
            "categories": kept("categories")}


def _error_text(name: str, problems: list[Problem], skip_bad: bool) -> str:
    fatal = [p for p in problems if p.where is None]
    if fatal:
        return f"{name} cannot be used as a COCO instances file:\n" + format_problems(fatal)
    return (f"{len(problems)} problem(s) in {name}; fix them (`maskrcnn check-data` lists them all)"
            f"{'' if skip_bad else ' or skip the bad records with skip_bad=True (data.skip_bad in the config)'}:\n"
            + format_problems(problems))
