import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from maskrcnn.data.coco import CocoDataset
from maskrcnn.evaluation.coco_eval import coco_metrics, format_table, predictions_to_coco


def gt_as_outputs(ds):
    outputs = []
    for i in range(len(ds)):
        t = ds.target(i)
        outputs.append({"boxes": t["boxes"], "labels": t["labels"], "scores": torch.full((len(t["labels"]),), 0.5),
                        "masks": t["masks"].to_tensor().bool()})
    return outputs


def test_perfect_predictions_score_ap_one_and_use_dataset_ids(small_coco, tmp_path):
    (path, images), _ = small_coco
    ds = CocoDataset(path, images)
    results = predictions_to_coco(gt_as_outputs(ds), ds.image_ids, ds.category_ids)
    assert {r["category_id"] for r in results} == {3, 7}
    out = tmp_path / "results.json"
    out.write_text(json.dumps(results))
    COCO(str(path)).loadRes(str(out))  # pycocotools loads the file unchanged
    metrics = coco_metrics(path, results, ds.image_ids, ds.class_names, ds.category_ids)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)
    assert metrics["per_category"]["dog"]["segm"] == pytest.approx(1.0)
    assert "mask" in format_table(metrics)


def test_detection_on_a_crowd_region_is_not_a_false_positive(small_coco):
    (path, images), _ = small_coco
    ds = CocoDataset(path, images)
    outputs = gt_as_outputs(ds)
    crowd = torch.zeros(1, 40, 50, dtype=torch.bool)
    crowd[0, 20:35, 30:45] = True  # inside image 2's crowd region (category 7 = label 2)
    o = outputs[1]
    outputs[1] = {"boxes": torch.cat([o["boxes"], torch.tensor([[30.0, 20, 45, 35]])]),
                  "labels": torch.cat([o["labels"], torch.tensor([2])]),
                  "scores": torch.cat([o["scores"], torch.tensor([0.99])]),
                  "masks": torch.cat([o["masks"], crowd])}
    results = predictions_to_coco(outputs, ds.image_ids, ds.category_ids)
    metrics = coco_metrics(path, results, ds.image_ids, ds.class_names, ds.category_ids)
    assert metrics["segm"]["AP"] == pytest.approx(1.0)
    # the same detection away from the crowd region is a false positive and costs AP
    far = [dict(r) for r in results]
    far[-1]["bbox"] = [0.0, 30.0, 10.0, 9.0]
    far[-1]["segmentation"] = predictions_to_coco(
        [{"boxes": torch.tensor([[0.0, 30, 10, 39]]), "labels": torch.tensor([2]),
          "scores": torch.tensor([0.99]), "masks": torch.from_numpy(np.pad(np.ones((9, 10), bool), ((30, 1), (0, 40))))[None]}],
        [2], ds.category_ids)[0]["segmentation"]
    assert coco_metrics(path, far, ds.image_ids, ds.class_names, ds.category_ids)["segm"]["AP"] < 0.99


def test_no_detections_give_zero_ap(small_coco):
    (path, images), _ = small_coco
    ds = CocoDataset(path, images)
    metrics = coco_metrics(path, [], ds.image_ids, ds.class_names, ds.category_ids)
    assert metrics["segm"]["AP"] == 0.0 and metrics["per_category"]["cat"]["bbox"] == 0.0
