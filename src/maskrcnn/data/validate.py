"""Checks of a COCO instances file and its images that report every problem at once.

Each problem is one line naming the file, the record and what to do, e.g.::

    instances.json: annotation 17 (image 3): bbox [10, 10, 0, 5] has non-positive width;
    COCO bbox is [x, y, width, height]

Nothing here raises on bad input: a file that is not JSON, not an object, or holds records of
the wrong types yields problems, never a traceback.

An annotation needs ``id``, ``image_id``, ``category_id`` and ``bbox``. ``iscrowd``, ``area`` and
``segmentation`` are optional, as labelling tools often leave them out, and are checked when
present; training and evaluation both accept every file without problems here: without
``iscrowd`` an instance is not a crowd, without ``area`` the evaluator computes it (from the
segmentation, else the box), and without a segmentation (missing, null or ``[]``) the box stands
in for the mask, as a rectangle, in training targets and in mask AP alike.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# EXIF orientations 5-8 are rotated by 90 degrees: the displayed image has width and height swapped
_SWAPS_SIDES = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


class DataError(ValueError):
    """A data set that cannot be used as it is; the message lists the problems."""


@dataclass(frozen=True)
class Problem:
    """One problem of a data set.

    ``record`` names it for people ("annotation 17 (image 3)", "image 3 (a.jpg)", "file");
    ``kind`` is a short key for counting ("bbox-size", "image-missing", ...); ``where`` is the
    record's (section, position) in the JSON lists, None for problems of the whole file.
    """

    file: str
    record: str
    kind: str
    message: str
    image_id: object = None
    annotation_id: object = None
    where: tuple[str, int] | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"{self.file}: {self.record}: {self.message}"


def format_problems(problems: list[Problem], limit: int = 20) -> str:
    """The first ``limit`` problems, one per line, and how many more there are."""
    lines = [str(p) for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"... and {len(problems) - limit} more (run `maskrcnn check-data` to list all)")
    return "\n".join(lines)


def check_coco(annotation_json: str | Path, image_dir: str | Path, *, check_images: bool = True
               ) -> list[Problem]:
    """Every problem of a COCO instances file and (optionally) of its image files.

    >>> for problem in check_coco("annotations/instances.json", "images/"):  # doctest: +SKIP
    ...     print(problem)
    """
    return read_and_check(annotation_json, image_dir, check_images=check_images)[1]


def read_and_check(annotation_json: str | Path, image_dir: str | Path, *, check_images: bool = True
                   ) -> tuple[dict | None, list[Problem]]:
    """The parsed JSON (None if unusable as a whole) and all its problems."""
    data, problems = read_json(annotation_json)
    if data is None:
        return None, problems
    name = str(annotation_json)
    problems = _Checker(data, name).run()
    if check_images:
        problems += check_image_files(data, name, image_dir)
    return data, problems


def read_json(path: str | Path) -> tuple[dict | None, list[Problem]]:
    """The parsed file, or None and why it cannot be used as a COCO instances file at all."""
    name = str(path)

    def fatal(kind: str, message: str):
        return None, [Problem(name, "file", kind, message)]

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return fatal("file", "no such file; check the path to the annotation JSON")
    except IsADirectoryError:
        return fatal("file", "is a directory; pass the annotation JSON file itself")
    except UnicodeDecodeError:
        return fatal("json", "is not UTF-8 text; expected a COCO JSON file")
    except OSError as exc:
        return fatal("file", f"cannot be read ({exc.strerror or type(exc).__name__})")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return fatal("json", f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}")
    except RecursionError:
        return fatal("json", "JSON nested too deeply to be a COCO file")
    if not isinstance(data, dict):
        return fatal("json", f"top level is a {_type(data)}; a COCO instances file is an object "
                             "with 'images', 'annotations' and 'categories' lists")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        return fatal("keys", f"missing or non-list top-level key(s) {', '.join(repr(k) for k in missing)}; "
                             "a COCO instances file needs 'images', 'annotations' and 'categories' lists")
    if not data["categories"]:
        return fatal("keys", "'categories' is empty; list every class as {\"id\": ..., \"name\": ...}")
    return data, []


def _type(value) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if isinstance(value, (int, float)) else type(value).__name__)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


def _fmt(values) -> str:
    """A JSON list as the user wrote it, with floats kept short."""
    if isinstance(values, list):
        return "[" + ", ".join(f"{v:g}" if isinstance(v, float) else repr(v) for v in values) + "]"
    return repr(values)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Checker:
    """Problems of the JSON records themselves (no image files read)."""

    def __init__(self, data: dict, name: str):
        self.data, self.name = data, name
        self.problems: list[Problem] = []
        self.images: dict = {}  # id -> first record with that id
        self.invalid_images: set = set()  # ids of image records with problems of their own
        self.categories: set = set()

    def run(self) -> list[Problem]:
        for k, category in enumerate(self.data["categories"]):
            self._category(k, category)
        for k, image in enumerate(self.data["images"]):
            self._image(k, image)
        seen: set = set()
        for k, ann in enumerate(self.data["annotations"]):
            self._annotation(k, ann, seen)
        return self.problems

    def _add(self, record: str, kind: str, message: str, where: tuple[str, int], **ids) -> None:
        self.problems.append(Problem(self.name, record, kind, message, where=where, **ids))

    def _category(self, k: int, cat) -> None:
        where = ("categories", k)
        if not isinstance(cat, dict) or "id" not in cat:
            return self._add(f"categories[{k}]", "keys", f"{_show(cat)} has no 'id'; a category is "
                             "{\"id\": integer, \"name\": string}", where)
        if not _is_int(cat["id"]):
            return self._add(f"categories[{k}]", "type", f"category id {_show(cat['id'])} is not an "
                             "integer", where)
        if cat["id"] in self.categories:
            return self._add(f"category {cat['id']}", "duplicate-id", f"duplicate category id "
                             f"{cat['id']}; give every category its own id", where)
        self.categories.add(cat["id"])

    def _image(self, k: int, img) -> None:
        where = ("images", k)
        if not isinstance(img, dict):
            return self._add(f"images[{k}]", "type", f"is a {_type(img)}; an image is an object with "
                             "id, file_name, height, width", where)
        iid = img.get("id")
        record = f"image {iid}" if _is_int(iid) else f"images[{k}]"
        if isinstance(img.get("file_name"), str):
            record += f" ({img['file_name']})"
        missing = [key for key in ("id", "file_name", "height", "width") if key not in img]
        if missing:
            self._invalid(iid)
            return self._add(record, "keys", f"missing key(s) {', '.join(missing)}; an image needs "
                             "id, file_name, height and width", where)
        wrong = [key for key, ok in (("id", _is_int(iid)),
                                     ("file_name", isinstance(img["file_name"], str) and img["file_name"]),
                                     ("height", _is_positive_int(img["height"])),
                                     ("width", _is_positive_int(img["width"]))) if not ok]
        if wrong:
            self._invalid(iid)
            return self._add(record, "type", "; ".join(f"{key} {_show(img[key])} is invalid" for key in wrong)
                             + "; id, height and width must be positive integers and file_name a path",
                             where, image_id=iid if _is_int(iid) else None)
        if iid in self.images:
            return self._add(record, "duplicate-id", f"duplicate image id {iid} (also used by "
                             f"{self.images[iid]['file_name']}); give every image its own id",
                             where, image_id=iid)
        self.images[iid] = img

    def _invalid(self, image_id) -> None:
        if _is_int(image_id):
            self.invalid_images.add(image_id)

    def _annotation(self, k: int, ann, seen: set) -> None:
        where = ("annotations", k)
        if not isinstance(ann, dict):
            return self._add(f"annotations[{k}]", "type", f"is a {_type(ann)}; an annotation is an "
                             "object with id, image_id, category_id, bbox", where)
        found = self._annotation_problems(ann, seen)
        if found:  # names are built only for bad records: COCO has ~10^6 good ones
            aid, iid = ann.get("id"), ann.get("image_id")
            record = (f"annotation {aid}" if _is_int(aid) else f"annotations[{k}]") + \
                     (f" (image {iid})" if _is_int(iid) else "")
            ids = {"annotation_id": aid if _is_int(aid) else None, "image_id": iid if _is_int(iid) else None}
            for kind, message in found:
                self._add(record, kind, message, where, **ids)

    def _annotation_problems(self, ann: dict, seen: set) -> list[tuple[str, str]]:
        missing = [key for key in ("id", "image_id", "category_id", "bbox") if key not in ann]
        if missing:
            return [("keys", f"missing key(s) {', '.join(missing)}; an annotation needs id, image_id, "
                             "category_id and bbox")]
        aid, iid = ann["id"], ann["image_id"]
        if not _is_int(aid) or not _is_int(iid):
            return [("type", "id and image_id must be integers")]
        found = []
        if aid in seen:
            found.append(("duplicate-id", f"duplicate annotation id {aid}; give every annotation its own id"))
        seen.add(aid)
        image = self.images.get(iid)
        if image is None and iid in self.invalid_images:
            found.append(("image-invalid", f"the record of image {iid} is invalid (see its own problem); "
                                           "fix that image record"))
        elif image is None:
            found.append(("unknown-image", f"image_id {iid} is not in 'images'; add the image or remove "
                                           "the annotation"))
        if not _is_int(ann["category_id"]) or ann["category_id"] not in self.categories:
            known = sorted(self.categories)
            found.append(("unknown-category", f"category_id {_show(ann['category_id'])} is not in "
                                              f"'categories' (known ids: {_fmt(known[:20])}"
                                              f"{' ...' if len(known) > 20 else ''})"))
        if ann.get("iscrowd", 0) not in (0, 1):
            found.append(("type", f"iscrowd {_show(ann['iscrowd'])} must be 0 or 1"))
        if "area" in ann and not (_is_number(ann["area"]) and ann["area"] >= 0):
            found.append(("area", f"area {_show(ann['area'])} must be a non-negative number of pixels; "
                                  "fix it, or remove the key and evaluation computes it"))
        found += _bbox_problems(ann["bbox"], image)
        found += _segmentation_problems(ann.get("segmentation"), image)
        return found


def _numbers(values) -> bool:
    """Whether ``values`` is a flat list of finite numbers (one numpy pass: polygons are long)."""
    if not isinstance(values, list):
        return False
    try:
        array = np.asarray(values)
    except (ValueError, TypeError, OverflowError):  # ragged nesting, huge ints
        return False
    return array.ndim == 1 and array.dtype.kind in "iuf" and bool(np.isfinite(array).all())


def _is_positive_int(v) -> bool:
    return _is_number(v) and v > 0 and float(v).is_integer()


_MIN_BOX_SIDE = 0.01
"""The least width and height (pixels) of a box's part inside its image: a thinner box has no
area in float32, no overlap with any anchor and no finite regression target."""


def _bbox_problems(bbox, image: dict | None) -> list[tuple[str, str]]:
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        return [("bbox-type", f"bbox {_show(bbox)} must be four finite numbers [x, y, width, height]")]
    x, y, w, h = bbox
    sides = [name for name, v in (("width", w), ("height", h)) if v <= 0]
    if sides:
        return [("bbox-size", f"bbox {_fmt(bbox)} has non-positive {' and '.join(sides)}; "
                              "COCO bbox is [x, y, width, height]")]
    if image is None:
        return []
    width, height = image["width"], image["height"]
    tol = 1.0  # annotation tools round box edges to whole pixels, sometimes one past the border
    overflows = x + w > width + tol or y + h > height + tol
    fits_as_corners = x < w <= width + tol and y < h <= height + tol
    if overflows and fits_as_corners:
        return [("bbox-xyxy", f"bbox {_fmt(bbox)} reaches past the {width}x{height} image as "
                              "[x, y, width, height] but fits as corners [x1, y1, x2, y2]; "
                              "write it as [x1, y1, x2 - x1, y2 - y1]")]
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        return [("bbox-outside", f"bbox {_fmt(bbox)} lies entirely outside the {width}x{height} image; "
                                 "fix its coordinates or remove the annotation")]
    inside = {"width": min(x + w, width) - max(x, 0), "height": min(y + h, height) - max(y, 0)}
    thin = [f"{side} {size:.2g}" for side, size in inside.items() if size < _MIN_BOX_SIDE]
    if thin:
        return [("bbox-size", f"bbox {_fmt(bbox)} has {' and '.join(thin)} px inside the image, under "
                              f"the {_MIN_BOX_SIDE} px a box needs; fix its size or remove the annotation")]
    return []


def _segmentation_problems(seg, image: dict | None) -> list[tuple[str, str]]:
    if seg is None or seg == []:
        return []  # the box stands in for the mask
    if isinstance(seg, list):
        if not isinstance(seg[0], list) and _numbers(seg):
            return [("polygon", "segmentation is one flat list of numbers; it must be a list of polygons: "
                                "wrap it as [[x0, y0, x1, y1, ...]]")]
        out = []
        for k, poly in enumerate(seg):
            if not _numbers(poly):
                out.append(("polygon", f"polygon {k} must be a flat list of numbers [x0, y0, x1, y1, ...]"))
            elif len(poly) % 2:
                out.append(("polygon", f"polygon {k} has an odd number of coordinates ({len(poly)}); "
                                       "write flat [x0, y0, x1, y1, ...] pairs"))
            elif len(poly) < 6:
                out.append(("polygon", f"polygon {k} has {len(poly) // 2} point(s); a polygon needs at "
                                       "least 3 (x, y) points, i.e. 6 numbers"))
        return out
    if isinstance(seg, dict):
        return _rle_problems(seg, image)
    return [("segmentation", f"segmentation is a {_type(seg)}; use a list of polygons or an RLE object "
                             "{\"size\": [h, w], \"counts\": ...}")]


def _rle_problems(seg: dict, image: dict | None) -> list[tuple[str, str]]:
    size, counts = seg.get("size"), seg.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v >= 0 for v in size)):
        return [("rle", f"RLE size {_show(size)} must be [height, width]")]
    h, w = size
    if image is not None and (h, w) != (image["height"], image["width"]):
        return [("rle", f"RLE size [{h}, {w}] differs from the image's [height, width] "
                        f"[{image['height']}, {image['width']}]; the mask must cover the whole image")]
    if isinstance(counts, list):
        if not all(_is_int(c) and c >= 0 for c in counts):
            return [("rle", "uncompressed RLE counts must be non-negative integers")]
        runs = counts
    elif isinstance(counts, str):
        runs = _decode_rle_string(counts)
        if runs is None:
            return [("rle", "compressed RLE counts is not a valid COCO RLE string")]
    else:
        return [("rle", f"RLE counts is a {_type(counts)}; use a COCO RLE string or a list of run lengths")]
    if sum(runs) != h * w:
        return [("rle", f"RLE runs cover {sum(runs)} pixels but size [{h}, {w}] has {h * w}")]
    return []


def _decode_rle_string(s: str) -> list[int] | None:
    """Run lengths of a compressed COCO RLE string (pycocotools' LEB128-like code), or None if
    the string is malformed, checked here because the C decoder reads past bad input."""
    runs: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                return None
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << 5 * k
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << 5 * k
        if len(runs) > 2:
            x += runs[-2]  # runs after the first two are stored as differences
        if x < 0:
            return None
        runs.append(x)
    return runs


def check_image_files(data: dict, name: str, image_dir: str | Path, *, threads: int = 8) -> list[Problem]:
    """Missing, empty and unreadable images, and sizes that differ from the JSON.

    Reads headers and verifies the files without decoding pixels; EXIF-rotated images count
    with their displayed (upright) size, as ``load_image`` returns them.
    """
    root = Path(image_dir)
    jobs = [(k, img) for k, img in enumerate(data["images"])
            if isinstance(img, dict) and isinstance(img.get("file_name"), str) and img["file_name"]
            and _is_int(img.get("id")) and _is_positive_int(img.get("height"))
            and _is_positive_int(img.get("width"))]

    def check(job) -> Problem | None:
        k, img = job
        message = _image_file_problem(root / img["file_name"], img)
        if message is None:
            return None
        kind, text = message
        return Problem(name, f"image {img['id']} ({img['file_name']})", kind, text,
                       image_id=img["id"], where=("images", k))

    if len(jobs) > 64:  # file checks wait on the disk, so threads overlap them
        with ThreadPoolExecutor(threads) as pool:
            found = list(pool.map(check, jobs))
    else:
        found = [check(job) for job in jobs]
    return [p for p in found if p is not None]


def _ends_with(path: Path, marker: bytes) -> bool:
    """Whether the file ends with ``marker`` (a whole JPEG ends with its end-of-image marker)."""
    with open(path, "rb") as f:
        f.seek(-len(marker), 2)
        return f.read() == marker


def read_image_header(path: Path) -> tuple[tuple[int, int], int]:
    """The stored (width, height) and EXIF orientation of an image file whose data is whole;
    Pillow's error for a damaged or truncated one."""
    with Image.open(path) as im:
        im.verify()  # must come straight after open; the file is opened again to read the size
    with Image.open(path) as im:
        size, orientation = im.size, im.getexif().get(_EXIF_ORIENTATION, 1)
        if not (im.format == "JPEG" and _ends_with(path, b"\xff\xd9")):
            # verify() checks some formats only; decoding finds a truncated JPEG, BMP or TIFF
            im.draft("RGB", (1, 1))  # a JPEG decodes at 1/8 scale, still reading every byte
            im.load()
    return size, orientation


def _image_file_problem(path: Path, img: dict) -> tuple[str, str] | None:
    if not path.is_file():
        return "image-missing", f"file not found at {path}; check file_name and the image directory"
    if path.stat().st_size == 0:
        return "image-empty", f"{path} is a 0-byte file; copy the image again"
    try:
        stored, orientation = read_image_header(path)
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for damaged files
        return "image-corrupt", f"{path} cannot be read as an image ({type(exc).__name__}: " \
                                f"{str(exc)[:80]}); replace or remove it"
    shown = stored[::-1] if orientation in _SWAPS_SIDES else stored
    expected = (int(img["width"]), int(img["height"]))
    if shown == expected:
        return None
    if stored == expected:
        return "image-size", (f"{path} is stored as {stored[0]}x{stored[1]} (width x height) but its EXIF "
                              f"orientation {orientation} displays it as {shown[0]}x{shown[1]}, which is "
                              f"how it is read; set width {shown[0]} and height {shown[1]} in the JSON "
                              "(and rotate the annotations), or strip the EXIF orientation")
    return "image-size", (f"{path} is {shown[0]}x{shown[1]} (width x height, after EXIF rotation) but "
                          f"the JSON says {expected[0]}x{expected[1]}; fix width/height or the file")
