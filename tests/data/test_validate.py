import json
import random

import numpy as np
import pytest
from PIL import Image

from coco_files import rle_json, uncompressed_rle, write_coco
from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.validate import DataError, check_coco


def bad_data_set(root):
    """One problem of every kind, each on its own record. Returns (json, image dir, expected)
    where expected lists (record, words of the message) for every problem."""
    images = [{"id": 1, "file_name": "ok.png", "height": 40, "width": 50},
              {"id": 2, "file_name": "missing.png", "height": 40, "width": 50},
              {"id": 3, "file_name": "empty.png", "height": 40, "width": 50},
              {"id": 4, "file_name": "corrupt.png", "height": 40, "width": 50},
              {"id": 5, "file_name": "size.png", "height": 41, "width": 50},
              {"id": 5, "file_name": "dup.png", "height": 40, "width": 50},
              {"id": 6, "file_name": "rotated.jpg", "height": 40, "width": 50},
              {"id": 7, "file_name": "noheight.png", "width": 50}]
    a = {"image_id": 1, "category_id": 7, "iscrowd": 0}
    annotations = [
        {**a, "id": 1, "bbox": [10, 10, 0, 5]},
        {**a, "id": 2, "bbox": [30, 20, 45, 38]},  # corners written as [x1, y1, x2, y2]
        {**a, "id": 3, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 5, 1]]},
        {**a, "id": 4, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 5, 1, 5, 5, 1]]},
        {**a, "id": 5, "bbox": [1, 1, 5, 5], "category_id": 99},
        {**a, "id": 5, "bbox": [1, 1, 5, 5]},
        {**a, "id": 7},
        {**a, "id": 8, "bbox": [1, 1, 5, 5], "image_id": 42},
        {**a, "id": 9, "bbox": [1, 1, 5, 5], "segmentation": {"size": [40, 50], "counts": "@@@"}},
        {**a, "id": 10, "bbox": [1, 1, 5, 5], "segmentation": {"size": [30, 50], "counts": [1500]}},
        {**a, "id": 11, "bbox": [60, 10, 5, 5]},
        {**a, "id": 12, "bbox": [1, 1, 5, float("nan")]},
        "not an annotation",
    ]
    categories = [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 3, "name": "wolf"}]
    path, img_dir = write_coco(root, images[:1], annotations, categories)
    data = json.loads(path.read_text())
    data["images"] = images
    path.write_text(json.dumps(data))
    Image.new("RGB", (50, 40)).save(img_dir / "size.png")
    (img_dir / "empty.png").write_bytes(b"")
    (img_dir / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing an image needs")
    rotated = Image.new("RGB", (50, 40))
    exif = rotated.getexif()
    exif[0x0112] = 6  # stored 50x40, displayed rotated by 90 degrees as 40x50
    rotated.save(img_dir / "rotated.jpg", exif=exif)
    expected = [
        ("annotation 1 (image 1)", "bbox [10, 10, 0, 5] has non-positive width; COCO bbox is [x, y, width, height]"),
        ("annotation 2 (image 1)", "fits as corners [x1, y1, x2, y2]"),
        ("annotation 3 (image 1)", "polygon 0 has 2 point(s); a polygon needs at least 3"),
        ("annotation 4 (image 1)", "polygon 0 has an odd number of coordinates (7)"),
        ("annotation 5 (image 1)", "category_id 99 is not in 'categories' (known ids: [3, 7])"),
        ("annotation 5 (image 1)", "duplicate annotation id 5"),
        ("annotation 7 (image 1)", "missing key(s) bbox"),
        ("annotation 8 (image 42)", "image_id 42 is not in 'images'"),
        ("annotation 9 (image 1)", "not a valid COCO RLE string"),
        ("annotation 10 (image 1)", "RLE size [30, 50] differs from the image's [height, width] [40, 50]"),
        ("annotation 11 (image 1)", "lies entirely outside the 50x40 image"),
        ("annotation 12 (image 1)", "must be four finite numbers"),
        ("annotations[12]", "is a string; an annotation is an object"),
        ("category 3", "duplicate category id 3"),
        ("image 5 (dup.png)", "duplicate image id 5 (also used by size.png)"),
        ("image 7 (noheight.png)", "missing key(s) height"),
        ("image 2 (missing.png)", "file not found at"),
        ("image 3 (empty.png)", "0-byte file"),
        ("image 4 (corrupt.png)", "cannot be read as an image"),
        ("image 5 (size.png)", "is 50x40 (width x height, after EXIF rotation) but the JSON says 50x41"),
        ("image 5 (dup.png)", "file not found at"),
        ("image 6 (rotated.jpg)", "EXIF orientation 6 displays it as 40x50"),
    ]
    return path, img_dir, expected


def test_every_problem_is_reported_at_once_naming_file_and_record(tmp_path):
    path, img_dir, expected = bad_data_set(tmp_path)
    lines = [str(p) for p in check_coco(path, img_dir)]
    for record, words in expected:
        assert any(line.startswith(f"{path}: {record}: ") and words in line for line in lines), (record, lines)
    assert len(lines) == len(expected), "\n".join(lines)
    assert all("\n" not in line for line in lines)


def test_the_xyxy_hint_says_how_to_fix_the_box(tmp_path):
    path, img_dir, _ = bad_data_set(tmp_path)
    (line,) = [str(p) for p in check_coco(path, img_dir) if "annotation 2 " in str(p)]
    assert line == (f"{path}: annotation 2 (image 1): bbox [30, 20, 45, 38] reaches past the 50x40 image "
                    "as [x, y, width, height] but fits as corners [x1, y1, x2, y2]; "
                    "write it as [x1, y1, x2 - x1, y2 - y1]")


def test_image_checks_can_be_skipped(tmp_path):
    path, img_dir, _ = bad_data_set(tmp_path)
    assert not any(p.kind.startswith("image-") for p in check_coco(path, img_dir, check_images=False))


def test_a_clean_data_set_has_no_problems(small_coco):
    (path, img_dir), _ = small_coco
    assert check_coco(path, img_dir) == []


@pytest.mark.parametrize("text, words", [
    ('{"images": [}', "malformed JSON at line 1 column 13"),
    ('{\n  "images": [],\n  "annotations": [,]\n}', "malformed JSON at line 3 column 19"),
    ("[1, 2]", "top level is a list"),
    ('"images"', "top level is a string"),
    ("null", "top level is a null"),
    ('{"images": []}', "'annotations', 'categories'"),
    ('{"images": {}, "annotations": [], "categories": [{"id": 1}]}', "'images'"),
    ('{"images": [], "annotations": [], "categories": []}', "'categories' is empty"),
    ("", "malformed JSON at line 1 column 1"),
])
def test_files_that_are_not_coco_at_all(tmp_path, text, words):
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    (problem,) = check_coco(bad, tmp_path)
    assert str(problem).startswith(f"{bad}: file: ") and words in str(problem)
    with pytest.raises(DataError, match="cannot be used as a COCO instances file"):
        CocoDataset(bad, tmp_path)


def test_missing_and_binary_files(tmp_path):
    assert "no such file" in str(check_coco(tmp_path / "nope.json", tmp_path)[0])
    assert "is a directory" in str(check_coco(tmp_path, tmp_path)[0])
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    assert "not UTF-8" in str(check_coco(tmp_path / "binary.json", tmp_path)[0])


def test_records_of_any_wrong_type_never_raise(tmp_path):
    rng = random.Random(0)
    junk = [None, True, 3, -1.5, float("inf"), "x", [], [1, "a"], {}, {"id": []}, [[1, 2]], {"counts": 5},
            {"size": [2, 2], "counts": "0"}, {"size": "2x2", "counts": []}, [None, None, None, None]]
    keys = ["id", "image_id", "category_id", "bbox", "segmentation", "iscrowd", "area", "file_name",
            "height", "width", "name", "size", "counts"]
    for trial in range(150):
        def record():
            if rng.random() < 0.1:
                return rng.choice(junk)
            return {k: rng.choice(junk + [1, 2, 40]) for k in rng.sample(keys, rng.randint(0, len(keys)))}
        data = {"images": [record() for _ in range(3)], "annotations": [record() for _ in range(5)],
                "categories": [record() for _ in range(2)] or [{"id": 1}]}
        path = tmp_path / f"junk{trial}.json"
        path.write_text(json.dumps(data))
        problems = check_coco(path, tmp_path)  # must not raise
        assert all(str(p).startswith(f"{path}: ") for p in problems)
        try:
            CocoDataset(path, tmp_path, skip_bad=True)
        except DataError:
            pass  # a clean refusal is fine; any other exception is a bug


def test_rle_counts_are_checked_against_the_image_size(tmp_path):
    mask = np.zeros((40, 50), np.uint8)
    mask[3:9, 4:7] = 1
    good = rle_json(mask)
    short = {"size": [40, 50], "counts": [10, 20]}
    images = [{"id": 1, "file_name": "a.png", "height": 40, "width": 50}]
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [4, 3, 3, 6], "segmentation": good},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [4, 3, 3, 6], "segmentation": short}]
    path, img_dir = write_coco(tmp_path, images, anns)
    (problem,) = check_coco(path, img_dir)
    assert str(problem) == (f"{path}: annotation 2 (image 1): RLE runs cover 30 pixels but size "
                            "[40, 50] has 2000")


def test_dataset_refuses_bad_data_listing_the_problems(tmp_path):
    path, img_dir, expected = bad_data_set(tmp_path)
    with pytest.raises(DataError) as info:
        CocoDataset(path, img_dir)
    text = str(info.value)
    assert text.startswith(f"{len(expected)} problem(s) in {path}") and "skip_bad=True" in text
    assert "annotation 1 (image 1): bbox [10, 10, 0, 5] has non-positive width" in text
    assert "... and 2 more" in text and len(text.splitlines()) == 1 + 20 + 1


def test_skip_bad_drops_bad_records_and_counts_them(tmp_path):
    path, img_dir, _ = bad_data_set(tmp_path)
    ds = CocoDataset(path, img_dir, skip_bad=True)
    assert ds.image_ids == [1]  # the only image without a problem
    assert ds.category_ids == [3, 7] and ds.class_names == ["dog", "cat"]  # the first id 3 wins
    assert ds.skipped["bbox-size"] == 1 and ds.skipped["image-missing"] == 1
    assert ds.skipped["duplicate-id"] == 3  # one annotation, one image, one category
    assert ds.skipped["image-size"] == 2  # size.png and rotated.jpg
    assert sum(ds.skipped.values()) == 21  # every bad record once (annotation 5 has two problems)
    assert "1 bbox-size" in ds.skipped_summary() and "\n" not in ds.skipped_summary()
    _, target = ds[0]
    assert target["image_id"] == 1 and len(target["labels"]) == 0  # all of image 1's annotations were bad


def test_an_area_when_given_must_be_a_non_negative_number(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "height": 40, "width": 50}]
    a = {"image_id": 1, "category_id": 3, "bbox": [4, 3, 3, 6]}
    anns = [{**a, "id": 1}, {**a, "id": 2, "area": 18}, {**a, "id": 3, "area": 0.5},
            {**a, "id": 4, "area": "18"}, {**a, "id": 5, "area": -1}, {**a, "id": 6, "area": None}]
    path, img_dir = write_coco(tmp_path, images, anns)
    problems = check_coco(path, img_dir)
    assert [p.annotation_id for p in problems] == [4, 5, 6] and {p.kind for p in problems} == {"area"}
    assert str(problems[1]) == (f"{path}: annotation 5 (image 1): area -1 must be a non-negative number "
                                "of pixels; fix it, or remove the key and evaluation computes it")


def test_what_the_checker_accepts_evaluates_with_the_same_masks_as_training(tmp_path):
    """Every optional-field variant check_coco accepts: coco_metrics scores it, and predictions
    equal to the training targets (boxes and masks) score AP 1."""
    import torch

    from maskrcnn.evaluation.coco_eval import coco_metrics, predictions_to_coco

    mask, strip = np.zeros((40, 50), np.uint8), np.zeros((40, 50), np.uint8)
    mask[20:30, 30:45] = 1
    strip[32:38, 2:20] = 1
    images = [{"id": 1, "file_name": "a.png", "height": 40, "width": 50}]
    a = {"image_id": 1, "category_id": 3}
    anns = [{**a, "id": 1, "bbox": [2, 2, 8, 6]},
            {**a, "id": 2, "bbox": [12, 2, 8, 6], "segmentation": None, "iscrowd": 0},
            {**a, "id": 3, "bbox": [22, 2, 8, 6], "segmentation": []},
            {**a, "id": 4, "bbox": [32, 2, 8, 6], "iscrowd": 0, "area": 48},
            {**a, "id": 5, "bbox": [2, 20, 8, 8], "segmentation": [[2, 20, 10, 20, 10, 28, 2, 28]]},
            {**a, "id": 6, "bbox": [30, 20, 15, 10], "segmentation": rle_json(mask)},
            {**a, "id": 7, "bbox": [2, 32, 18, 6], "segmentation": uncompressed_rle(strip)},
            {**a, "id": 8, "bbox": [12, 20, 8, 8], "iscrowd": 1}]
    path, img_dir = write_coco(tmp_path, images, anns)
    assert check_coco(path, img_dir) == []
    ds = CocoDataset(path, img_dir)
    target = ds.target(0)
    masks = target["masks"].to_tensor()
    output = {"boxes": target["boxes"], "labels": target["labels"], "masks": masks,
              "scores": torch.linspace(0.9, 0.4, len(masks))}
    results = predictions_to_coco([output], [1], ds.label_to_category)
    for source in (path, ds.ground_truth()):
        metrics = coco_metrics(source, results)
        assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)


def test_truncated_thin_flat_huge_and_orphaned_records_are_named(tmp_path):
    images = [{"id": 1, "file_name": "ok.png", "height": 40, "width": 50},
              {"id": 2, "file_name": "cut.jpg", "height": 40, "width": 50},
              {"id": 3, "file_name": "nowidth.png", "height": 40}]
    a = {"image_id": 1, "category_id": 7}
    annotations = [
        {**a, "id": 1, "bbox": [20.25, 4, 0.00001, 20]},  # no width left once in float32
        {**a, "id": 2, "bbox": [49.995, 4, 5, 20]},  # 0.005 px of it inside the image
        {**a, "id": 3, "bbox": [1, 1, 5, 5], "segmentation": [1, 1, 6, 1, 6, 6]},  # one polygon, unwrapped
        {**a, "id": 4, "bbox": [1, 1, 5, 10 ** 400]},
        {**a, "id": 5, "bbox": [1, 1, 5, 5], "image_id": 3},
        {**a, "id": 6, "bbox": [1, 1, 5, 5.5]},
    ]
    path, img_dir = write_coco(tmp_path, images[:1], annotations)
    data = json.loads(path.read_text())
    data["images"] = images
    path.write_text(json.dumps(data))
    pixels = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(img_dir / "cut.jpg", quality=95)
    whole = (img_dir / "cut.jpg").read_bytes()
    (img_dir / "cut.jpg").write_bytes(whole[: len(whole) * 2 // 3])
    lines = [str(p)[len(f"{path}: "):] for p in check_coco(path, img_dir)]
    huge, cut = lines.pop(4), lines.pop()  # the number is shortened; the bytes left depend on libjpeg
    assert huge.startswith("annotation 4 (image 1): bbox [1, 1, 5, 1000") and huge.endswith(
        "... must be four finite numbers [x, y, width, height]")
    assert lines == [
        "image 3 (nowidth.png): missing key(s) width; an image needs id, file_name, height and width",
        "annotation 1 (image 1): bbox [20.25, 4, 1e-05, 20] has width 1e-05 px inside the image, under "
        "the 0.01 px a box needs; fix its size or remove the annotation",
        "annotation 2 (image 1): bbox [49.995, 4, 5, 20] has width 0.005 px inside the image, under "
        "the 0.01 px a box needs; fix its size or remove the annotation",
        "annotation 3 (image 1): segmentation is one flat list of numbers; it must be a list of "
        "polygons: wrap it as [[x0, y0, x1, y1, ...]]",
        "annotation 5 (image 3): the record of image 3 is invalid (see its own problem); fix that image "
        "record",
    ]
    assert cut.startswith(f"image 2 (cut.jpg): {img_dir / 'cut.jpg'} cannot be read as an image (OSError: "
                          "image file is truncated") and cut.endswith("replace or remove it")
