"""COCO evaluation through pycocotools: results files it loads unchanged, the data set's own
category ids, AP 1 for perfect predictions, crowd regions honoured, mask areas for mask AP."""

import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from maskrcnn.evaluation.coco_eval import coco_metrics, encode_masks, evaluate, format_table, \
    predictions_to_coco

H, W = 40, 50
CATEGORIES = [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}]  # not contiguous, not sorted


def box_mask(x, y, w, h):
    m = np.zeros((H, W), bool)
    m[y:y + h, x:x + w] = True
    return m


def rle(mask):
    r = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode()
    return r


@pytest.fixture
def gt_file(tmp_path):
    """Image 1: a cat (polygon) and a dog (RLE); image 2: a dog and a crowd of cats;
    image 3: nothing. PNG files next to the JSON so a CocoDataset can read them."""
    images = [{"id": i, "file_name": f"{i}.png", "height": H, "width": W} for i in (1, 2, 3)]
    anns = [
        {"id": 10, "image_id": 1, "category_id": 7, "bbox": [5, 10, 20, 10], "area": 200, "iscrowd": 0,
         "segmentation": [[5, 10, 25, 10, 25, 20, 5, 20]]},
        {"id": 11, "image_id": 1, "category_id": 3, "bbox": [30, 5, 12, 30], "area": 360, "iscrowd": 0,
         "segmentation": rle(box_mask(30, 5, 12, 30))},
        {"id": 12, "image_id": 2, "category_id": 3, "bbox": [2, 2, 20, 20], "area": 400, "iscrowd": 0,
         "segmentation": rle(box_mask(2, 2, 20, 20))},
        {"id": 13, "image_id": 2, "category_id": 7, "bbox": [30, 20, 15, 15], "area": 225, "iscrowd": 1,
         "segmentation": rle(box_mask(30, 20, 15, 15))},
    ]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    for img in images:
        Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(tmp_path / img["file_name"])
    return path


def perfect_outputs(path):
    """Model-style outputs reproducing every non-crowd GT instance (labels 1..K by sorted id)."""
    coco = COCO(str(path))
    label = {3: 1, 7: 2}
    outputs = []
    for image_id in (1, 2, 3):
        anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                               a["bbox"][1] + a["bbox"][3]] for a in anns], dtype=torch.float32).reshape(-1, 4)
        masks = torch.from_numpy(np.stack([coco.annToMask(a) for a in anns]).astype(bool)) if anns \
            else torch.zeros(0, H, W, dtype=torch.bool)
        outputs.append({"boxes": boxes, "labels": torch.tensor([label[a["category_id"]] for a in anns],
                                                               dtype=torch.int64),
                        "scores": torch.linspace(0.9, 0.5, len(anns)), "masks": masks})
    return outputs


def test_perfect_predictions_score_one_with_the_data_sets_own_ids(gt_file, tmp_path):
    results = predictions_to_coco(perfect_outputs(gt_file), [1, 2, 3], [3, 7])
    assert sorted(r["category_id"] for r in results) == [3, 3, 7]
    first = results[0]
    assert first["bbox"] == [5.0, 10.0, 20.0, 10.0] and isinstance(first["segmentation"]["counts"], str)
    out = tmp_path / "results.json"
    out.write_text(json.dumps(results))
    COCO(str(gt_file)).loadRes(str(out))  # the file as written, unchanged
    metrics = coco_metrics(gt_file, results)
    for kind in ("bbox", "segm"):
        assert metrics[kind]["AP"] == pytest.approx(1.0)
        assert metrics[kind]["AP50"] == pytest.approx(1.0)
    assert metrics["per_category"]["cat"]["segm"] == pytest.approx(1.0)
    assert metrics["per_category"]["dog"]["bbox"] == pytest.approx(1.0)


def test_a_callable_mapping_equals_the_id_list(gt_file):
    outputs = perfect_outputs(gt_file)
    assert predictions_to_coco(outputs, [1, 2, 3], lambda label: [3, 7][label - 1]) == \
        predictions_to_coco(outputs, [1, 2, 3], [3, 7])


def test_a_label_without_a_category_id_is_refused_by_name(gt_file):
    outputs = perfect_outputs(gt_file)
    with pytest.raises(ValueError, match=r"label 2 has no category id: the 1 ids given map labels 1..1"):
        predictions_to_coco(outputs, [1, 2, 3], [3])
    outputs[0]["labels"] = torch.zeros_like(outputs[0]["labels"])
    with pytest.raises(ValueError, match="label 0 has no category id"):
        predictions_to_coco(outputs, [1, 2, 3], [3, 7])


def test_swapped_category_ids_score_zero(gt_file):
    """The classic mix-up: model labels written as category ids."""
    results = predictions_to_coco(perfect_outputs(gt_file), [1, 2, 3], [7, 3])
    assert coco_metrics(gt_file, results)["segm"]["AP"] == pytest.approx(0.0)


def extra_detection(outputs, image_index, mask, score=0.99, label=2):
    o = outputs[image_index]
    ys, xs = np.nonzero(mask)
    box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
    outputs[image_index] = {"boxes": torch.cat([o["boxes"], box]),
                            "labels": torch.cat([o["labels"], torch.tensor([label])]),
                            "scores": torch.cat([o["scores"], torch.tensor([score])]),
                            "masks": torch.cat([o["masks"], torch.from_numpy(mask)[None]])}
    return outputs


def test_a_detection_on_a_crowd_region_is_not_a_false_positive(gt_file):
    on_crowd = extra_detection(perfect_outputs(gt_file), 1, box_mask(32, 22, 10, 10))
    metrics = coco_metrics(gt_file, predictions_to_coco(on_crowd, [1, 2, 3], [3, 7]))
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)
    elsewhere = extra_detection(perfect_outputs(gt_file), 1, box_mask(25, 0, 10, 10))
    metrics = coco_metrics(gt_file, predictions_to_coco(elsewhere, [1, 2, 3], [3, 7]))
    assert metrics["bbox"]["AP"] < 0.9 and metrics["segm"]["AP"] < 0.9


def test_mask_ap_uses_mask_areas_not_box_areas(gt_file):
    """A false positive whose mask is medium-sized (1120 px^2) but whose box is tiny belongs to
    the medium bucket for mask AP, so it must not cost APs, where all the ground truth is
    (pycocotools would take the area from the box if the results kept their boxes)."""
    outputs = extra_detection(perfect_outputs(gt_file), 2, box_mask(0, 0, 40, 28), label=1)
    outputs[2]["boxes"][-1] = torch.tensor([0.0, 0.0, 2.0, 2.0])
    metrics = coco_metrics(gt_file, predictions_to_coco(outputs, [1, 2, 3], [3, 7]))
    assert metrics["segm"]["APs"] == pytest.approx(1.0)
    assert metrics["bbox"]["APs"] < 1.0  # as a box it is small, and a false positive
    assert metrics["segm"]["AP"] < 1.0  # over all areas it counts


def test_no_detections_give_zero_ap_and_undefined_ranges_none(gt_file):
    metrics = coco_metrics(gt_file, [])
    assert metrics["bbox"]["AP"] == 0.0 and metrics["segm"]["AP"] == 0.0
    assert metrics["per_category"]["cat"]["bbox"] == 0.0
    assert metrics["segm"]["APl"] is None  # no large ground-truth object: undefined, not 0
    assert "-" in format_table(metrics)


def test_encode_masks_round_trips():
    masks = torch.rand(3, 7, 9, generator=torch.Generator().manual_seed(0)) > 0.5
    decoded = mask_util.decode([{**r, "counts": r["counts"].encode()} for r in encode_masks(masks)])
    assert np.array_equal(decoded.transpose(2, 0, 1), masks.numpy())


def test_encode_masks_equals_pycocotools_on_whole_masks():
    """Empty and full masks, single corner pixels, one full column and one full row, in that
    order, encoded one after another (each is written into and cleared from one buffer)."""
    masks = torch.zeros(6, 10, 12, dtype=torch.bool)
    masks[1] = True
    masks[2, 0, 0] = masks[3, 9, 11] = True
    masks[4, :, 5] = masks[5, 4, :] = True
    whole = mask_util.encode(np.asfortranarray(masks.numpy().astype(np.uint8).transpose(1, 2, 0)))
    assert encode_masks(masks) == [{**r, "counts": r["counts"].decode()} for r in whole]


def test_encode_masks_equals_pycocotools_on_random_masks():
    """Speckled rectangles anywhere in the image, touching its edges or not."""
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(40, 17, 23, dtype=torch.bool)
    for mask in masks:
        y0, x0 = torch.randint(0, 17, (1,), generator=g).item(), torch.randint(0, 23, (1,), generator=g).item()
        y1, x1 = torch.randint(y0, 18, (1,), generator=g).item(), torch.randint(x0, 24, (1,), generator=g).item()
        mask[y0:y1, x0:x1] = torch.rand(y1 - y0, x1 - x0, generator=g) > 0.3
    whole = mask_util.encode(np.asfortranarray(masks.numpy().astype(np.uint8).transpose(1, 2, 0)))
    assert encode_masks(masks) == [{**r, "counts": r["counts"].decode()} for r in whole]


class GroundTruthModel(torch.nn.Module):
    """Stands in for Mask R-CNN: returns the perfect outputs image by image, in order."""

    def __init__(self, outputs):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.outputs, self.calls = outputs, 0

    def forward(self, images):
        assert not self.training and torch.is_inference_mode_enabled()
        assert all(im.shape == (3, H, W) for im in images)
        out = self.outputs[self.calls:self.calls + len(images)]
        self.calls += len(images)
        return out


def test_evaluate_runs_the_model_and_writes_a_loadable_results_file(gt_file, tmp_path):
    from maskrcnn.data.coco import CocoDataset

    dataset = CocoDataset(gt_file, tmp_path)
    model = GroundTruthModel(perfect_outputs(gt_file)).train()
    metrics = evaluate(model, dataset, batch_size=2, device="cpu", out_json=tmp_path / "out" / "r.json",
                       progress=False)
    assert model.training  # mode restored
    assert metrics["segm"]["AP"] == pytest.approx(1.0) and metrics["bbox"]["AP"] == pytest.approx(1.0)
    COCO(str(gt_file)).loadRes(str(tmp_path / "out" / "r.json"))
    table = format_table(metrics)
    assert "cat" in table and "dog" in table and "100.0" in table


def test_evaluate_refuses_a_model_with_another_number_of_classes(gt_file, tmp_path):
    from maskrcnn.data.coco import CocoDataset

    model = GroundTruthModel(perfect_outputs(gt_file))
    model.num_classes = 90
    with pytest.raises(ValueError, match="the model predicts 90 classes but 2 category ids were given"):
        evaluate(model, CocoDataset(gt_file, tmp_path), progress=False)
    assert model.calls == 0  # refused before running


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def test_ground_truth_with_only_the_required_fields_is_evaluated(tmp_path):
    """Labelling tools often write annotations without iscrowd, area and segmentation: what
    check_coco accepts is scored, each box standing in for its mask as a rectangle."""
    from maskrcnn.data.validate import check_coco

    images = [{"id": 1, "file_name": "1.png", "height": H, "width": W}]
    anns = [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [5, 10, 20, 10]}]
    path = write_json(tmp_path / "minimal.json", {"images": images, "annotations": anns, "categories": CATEGORIES})
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "1.png")
    text = path.read_text()
    assert check_coco(path, tmp_path) == []

    def detection(mask):
        return {"boxes": torch.tensor([[5.0, 10, 25, 20]]), "labels": torch.tensor([2]),
                "scores": torch.tensor([0.9]), "masks": torch.from_numpy(mask)[None]}

    metrics = coco_metrics(path, predictions_to_coco([detection(box_mask(5, 10, 20, 10))], [1], [3, 7]))
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)
    assert metrics["bbox"]["APs"] == pytest.approx(1.0) and metrics["bbox"]["APm"] is None  # area 200
    half = coco_metrics(path, predictions_to_coco([detection(box_mask(5, 10, 10, 10))], [1], [3, 7]))
    assert half["bbox"]["AP"] == pytest.approx(1.0)
    # IoU 0.5 with the rectangle: a match at the 0.5 threshold only, 1 of AP's 10
    assert half["segm"]["AP50"] == pytest.approx(1.0) and half["segm"]["AP75"] == pytest.approx(0.0)
    assert half["segm"]["AP"] == pytest.approx(0.1)
    assert path.read_text() == text  # completed on a copy


def triangle_and_box(triangle_box, **extra):
    """A 100x100 image with a thin triangle (900 px) drawn in ``triangle_box`` and a box
    without a mask (40x40 = 1600 px); ``extra`` goes into the triangle's annotation."""
    return {"images": [{"id": 1, "file_name": "1.png", "height": 100, "width": 100}],
            "categories": CATEGORIES,
            "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": triangle_box,
                             "segmentation": [[0, 0, 60, 0, 0, 30]], **extra},
                            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [50, 50, 40, 40]}]}


def test_a_missing_area_is_the_segmentations_else_the_boxs():
    """Small is under 32^2 px, medium under 96^2: the area decides which AP counts an instance."""
    metrics = coco_metrics(triangle_and_box([0, 0, 60, 30]), [])
    for kind in ("bbox", "segm"):
        assert metrics[kind]["APs"] == 0.0 and metrics[kind]["APm"] == 0.0 and metrics[kind]["APl"] is None
    wide_box = coco_metrics(triangle_and_box([0, 0, 60, 60]), [])  # the box (3600 px) would be medium
    assert wide_box["bbox"]["APs"] == 0.0 and wide_box["segm"]["APs"] == 0.0
    given = coco_metrics(triangle_and_box([0, 0, 60, 30], area=5000.0), [])  # a given area is kept
    assert given["bbox"]["APs"] is None and given["segm"]["APs"] is None


def test_a_ground_truth_dict_passed_in_is_not_changed():
    gt = triangle_and_box([0, 0, 60, 30])
    before = json.loads(json.dumps(gt))
    results = [{"image_id": 1, "category_id": 7, "bbox": [50, 50, 40, 40], "score": 0.9}]
    assert coco_metrics(gt, results)["bbox"]["APm"] == pytest.approx(1.0)
    assert gt == before


def test_a_coco_object_passed_in_is_not_changed(gt_file):
    coco = COCO(str(gt_file))
    before = json.loads(json.dumps(coco.dataset))
    metrics = coco_metrics(coco, predictions_to_coco(perfect_outputs(gt_file), [1, 2, 3], [3, 7]))
    assert metrics["segm"]["AP"] == pytest.approx(1.0)
    assert coco.dataset == before


@pytest.mark.parametrize("bad", [
    {"segmentation": "a polygon"},  # pycocotools: "string indices must be integers"
    {"bbox": [60, 10, 5, 5], "segmentation": [[5, 5, 9, 5, 9, 9]]},  # outside: a miss, if scored
])
def test_evaluate_scores_only_what_a_skip_bad_dataset_kept(gt_file, tmp_path, bad):
    from maskrcnn.data.coco import CocoDataset

    outputs = perfect_outputs(gt_file)
    data = json.loads(gt_file.read_text())
    data["annotations"].append({"id": 99, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5],
                                "area": 25, "iscrowd": 0, **bad})
    path = write_json(tmp_path / "with_bad.json", data)
    dataset = CocoDataset(path, tmp_path, skip_bad=True)
    assert sum(dataset.skipped.values()) == 1
    metrics = evaluate(GroundTruthModel(outputs), dataset, device="cpu", progress=False)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)
