"""Checks of a COCO-format data set that report every problem at once, each on one line naming
the file, the record and what to do."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps


class DataError(ValueError):
    """A data set that cannot be used as it is; the message lists the problems."""


@dataclass(frozen=True)
class Problem:
    file: str
    record: str  # e.g. "annotation 17 (image 3)", "image 5", "file"
    kind: str  # short key used for skip counts, e.g. "bbox", "image-missing"
    message: str
    image_id: int | None = None
    annotation_id: int | None = None

    def __str__(self) -> str:
        return f"{self.file}: {self.record}: {self.message}"


def read_json(path: str | Path) -> tuple[dict | None, list[Problem]]:
    """The parsed file, or None and the problem (missing file, malformed JSON, wrong shape)."""
    path = Path(path)
    name = str(path)
    if not path.is_file():
        return None, [Problem(name, "file", "missing", "no such file")]
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        return None, [Problem(name, "file", "json", f"malformed JSON at line {exc.lineno} column "
                                                    f"{exc.colno}: {exc.msg}")]
    except UnicodeDecodeError:
        return None, [Problem(name, "file", "json", "not a text file; expected COCO JSON")]
    if not isinstance(data, dict):
        return None, [Problem(name, "file", "json", f"top level is a {type(data).__name__}; expected "
                                                    "an object with images, annotations, categories")]
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        return None, [Problem(name, "file", "keys", f"missing or non-list top-level key(s) "
                                                    f"{', '.join(missing)}; COCO instance files need "
                                                    "images, annotations and categories lists")]
    return data, []


def check_records(data: dict, name: str) -> list[Problem]:
    """Problems in the JSON records themselves (no image files read)."""
    problems: list[Problem] = []
    cats, images = {}, {}
    for c in data["categories"]:
        if not isinstance(c, dict) or "id" not in c:
            problems.append(Problem(name, "category", "keys", f"category {c!r} has no 'id'"))
        elif c["id"] in cats:
            problems.append(Problem(name, f"category {c['id']}", "duplicate",
                                    "duplicate category id; ids must be unique"))
        else:
            cats[c["id"]] = c
    for img in data["images"]:
        missing = [k for k in ("id", "file_name", "height", "width") if not isinstance(img, dict) or k not in img]
        if missing:
            rid = img.get("id", "?") if isinstance(img, dict) else "?"
            problems.append(Problem(name, f"image {rid}", "keys",
                                    f"missing key(s) {', '.join(missing)}", image_id=None))
        elif img["id"] in images:
            problems.append(Problem(name, f"image {img['id']}", "duplicate",
                                    "duplicate image id; ids must be unique", image_id=img["id"]))
        else:
            images[img["id"]] = img
    seen = set()
    for ann in data["annotations"]:
        problems += _check_annotation(ann, name, images, cats, seen)
    return problems


def _check_annotation(ann, name: str, images: dict, cats: dict, seen: set) -> list[Problem]:
    if not isinstance(ann, dict):
        return [Problem(name, "annotation", "keys", f"annotation {ann!r} is not an object")]
    aid, iid = ann.get("id", "?"), ann.get("image_id", "?")
    where = f"annotation {aid} (image {iid})"

    def problem(kind: str, message: str) -> Problem:
        return Problem(name, where, kind, message, image_id=iid if iid != "?" else None,
                       annotation_id=aid if aid != "?" else None)

    missing = [k for k in ("id", "image_id", "category_id", "bbox") if k not in ann]
    if missing:
        return [problem("keys", f"missing key(s) {', '.join(missing)}")]
    out = []
    if aid in seen:
        out.append(problem("duplicate", "duplicate annotation id; ids must be unique"))
    seen.add(aid)
    if iid not in images:
        out.append(problem("unknown-image", "image_id not listed in 'images'"))
    if ann["category_id"] not in cats:
        out.append(problem("unknown-category", f"category_id {ann['category_id']} is not in "
                                               f"'categories' (known: {sorted(cats)[:20]})"))
    bbox = ann["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        out.append(problem("bbox", f"bbox {bbox!r} must be [x, y, width, height] numbers"))
    else:
        x, y, w, h = bbox
        img = images.get(iid)
        if w <= 0 or h <= 0:
            out.append(problem("bbox", f"bbox {bbox} has non-positive width or height; COCO bbox "
                                       "is [x, y, width, height]"))
        elif img and (x + w > img["width"] + 1 or y + h > img["height"] + 1) and w > x and h > y \
                and w <= img["width"] + 1 and h <= img["height"] + 1:
            out.append(problem("bbox", f"bbox {bbox} extends past the {img['width']}x{img['height']} "
                                       "image but fits as [x1, y1, x2, y2]; convert it to "
                                       "[x, y, x2 - x, y2 - y]"))
        elif img and (x + w > img["width"] + 1 or y + h > img["height"] + 1 or x < -1 or y < -1):
            out.append(problem("bbox", f"bbox {bbox} lies outside the {img['width']}x{img['height']} image"))
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        for k, poly in enumerate(seg):
            if not isinstance(poly, list) or len(poly) % 2 or len(poly) < 6:
                n = len(poly) if isinstance(poly, list) else 0
                out.append(problem("polygon", f"polygon {k} has {n} coordinates; a polygon needs "
                                              "at least 3 (x, y) points, i.e. 6 numbers"))
    elif isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            out.append(problem("segmentation", "RLE segmentation needs 'counts' and 'size'"))
    elif seg is not None:
        out.append(problem("segmentation", "segmentation must be a list of polygons or an RLE object"))
    return out


def check_images(data: dict, name: str, image_dir: str | Path) -> list[Problem]:
    """Missing, empty, unreadable images and sizes that differ from the JSON."""
    problems = []
    root = Path(image_dir)
    for img in data["images"]:
        if not isinstance(img, dict) or not {"id", "file_name", "height", "width"} <= img.keys():
            continue
        where = f"image {img['id']} ({img['file_name']})"
        path = root / img["file_name"]
        if not path.is_file():
            problems.append(Problem(name, where, "image-missing", f"file not found at {path}",
                                    image_id=img["id"]))
            continue
        if path.stat().st_size == 0:
            problems.append(Problem(name, where, "image-empty", f"{path} is a 0-byte file",
                                    image_id=img["id"]))
            continue
        try:
            with Image.open(path) as im:
                im.load()
                size = ImageOps.exif_transpose(im).size
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types for corrupt files
            problems.append(Problem(name, where, "image-corrupt", f"{path} cannot be read as an image "
                                                                  f"({type(exc).__name__})",
                                    image_id=img["id"]))
            continue
        if size != (img["width"], img["height"]):
            problems.append(Problem(name, where, "image-size",
                                    f"{path} is {size[0]}x{size[1]} (after EXIF rotation) but the JSON "
                                    f"says {img['width']}x{img['height']}; fix width/height"))
    return problems


def check_coco(annotation_json: str | Path, image_dir: str | Path, *, check_images_: bool = True
               ) -> list[Problem]:
    """Every problem of a COCO instances file and its images.

    >>> for problem in check_coco("annotations.json", "images/"):  # doctest: +SKIP
    ...     print(problem)
    """
    data, problems = read_json(annotation_json)
    if data is None:
        return problems
    name = str(annotation_json)
    problems = check_records(data, name)
    if check_images_:
        problems += check_images(data, name, image_dir)
    return problems


def summarise(problems: list[Problem], limit: int = 20) -> str:
    lines = [str(p) for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"... and {len(problems) - limit} more")
    return "\n".join(lines)
