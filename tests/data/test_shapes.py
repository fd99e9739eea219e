import json
from collections import Counter

import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image
from pycocotools.coco import COCO

from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.shapes import _disc, _polygon, layout, make_shapes
from maskrcnn.data.validate import check_coco


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, 40, 6, seed=5, workers=2)
    return root


def decode(annotation) -> np.ndarray:
    seg = annotation["segmentation"]
    return mask_util.decode({"size": seg["size"], "counts": seg["counts"].encode()})


def test_files_are_valid_coco_that_pycocotools_and_the_reader_load(shapes):
    for split, n in (("train", 40), ("val", 6)):
        coco = COCO(str(shapes / f"{split}.json"))
        assert len(coco.getImgIds()) == n
        assert check_coco(shapes / f"{split}.json", shapes / split) == []
        ds = CocoDataset(shapes / f"{split}.json", shapes / split)
        assert ds.class_names == ["circle", "triangle", "rectangle"]
        assert ds.category_ids == [1, 3, 7]  # not 1..K, so label/id mix-ups show


def test_masks_are_disjoint_and_match_area_and_box(shapes):
    data = json.loads((shapes / "train.json").read_text())
    by_image = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    assert len(by_image) == len(data["images"])  # every image has at least one shape
    for img in data["images"]:
        anns = by_image[img["id"]]
        masks = np.stack([decode(a) for a in anns])
        assert masks.shape[1:] == (img["height"], img["width"])
        assert masks.sum(0).max() == 1, "visible masks of one image must not overlap"
        for a, m in zip(anns, masks):
            assert a["area"] == m.sum() >= 40 and a["iscrowd"] == 0
            ys, xs = np.nonzero(m)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        with Image.open(shapes / "train" / img["file_name"]) as im:
            assert im.size == (img["width"], img["height"]) and im.mode == "RGB"


def test_visible_masks_are_the_shapes_minus_what_is_drawn_later():
    rng = np.random.default_rng(0)
    occluded = 0
    for _ in range(60):
        kept = layout(rng, 120, 160)
        for i, (_, shape, visible) in enumerate(kept):
            later = np.zeros_like(shape)
            for _, other, _ in kept[i + 1:]:
                later |= other
            assert np.array_equal(visible, shape & ~later)
            assert visible.sum() >= max(40, 0.3 * shape.sum())
            occluded += int(visible.sum() < shape.sum())
    assert occluded > 10  # occlusion is common, not a corner case


def test_rasterisation_is_exact_at_pixel_centres():
    square = _polygon(np.array([[2.0, 1.0], [6.0, 1.0], [6.0, 4.0], [2.0, 4.0]]), 6, 8)
    expected = np.zeros((6, 8), bool)
    expected[1:4, 2:6] = True
    assert np.array_equal(square, expected)
    disc = _disc(4.0, 4.0, 1.5, 8, 8)
    assert np.array_equal(np.argwhere(disc), [[3, 3], [3, 4], [4, 3], [4, 4]])  # centres at 0.71 px
    star = _polygon(np.array([[0.0, 0], [8, 0], [4, 4], [8, 8], [0, 8]]), 8, 8)  # concave notch
    assert star[0, 6] and not star[4, 6] and star[4, 2] and not star[3, 7]


def test_same_seed_same_files_any_workers(shapes, tmp_path):
    make_shapes(tmp_path, 40, 6, seed=5, workers=1)
    for name in ("train.json", "val.json", "train/000003.png", "val/000005.png"):
        assert (tmp_path / name).read_bytes() == (shapes / name).read_bytes(), name
    make_shapes(tmp_path / "other", 3, 1, seed=6)
    assert (tmp_path / "other/train/000000.png").read_bytes() != (shapes / "train/000000.png").read_bytes()


def test_sizes_orientations_and_class_balance(tmp_path):
    make_shapes(tmp_path, 150, 0, seed=1)
    data = json.loads((tmp_path / "train.json").read_text())
    sides = [(img["height"], img["width"]) for img in data["images"]]
    assert all(224 <= min(s) <= 288 and max(s) <= 384 for s in sides)
    portrait = sum(h > w for h, w in sides)
    assert 0.25 < portrait / len(sides) < 0.55
    counts = Counter(a["category_id"] for a in data["annotations"])
    assert all(0.25 < counts[c] / len(data["annotations"]) < 0.42 for c in (1, 3, 7))
    areas = np.array([a["area"] for a in data["annotations"]])
    assert areas.min() < 200 and areas.max() > 8000  # small to large objects
    per_image = Counter(a["image_id"] for a in data["annotations"])
    assert min(per_image.values()) >= 1 and max(per_image.values()) <= 6


def test_other_classes_and_bad_names(tmp_path):
    paths = make_shapes(tmp_path, 4, 0, seed=0, classes=("star", "ring"))
    data = json.loads(paths["train"].read_text())
    assert [c["name"] for c in data["categories"]] == ["star", "ring"]
    with pytest.raises(ValueError, match="unknown shape class"):
        make_shapes(tmp_path, 1, 0, classes=("hexagon",))
