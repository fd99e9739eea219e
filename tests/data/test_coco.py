import pickle

import numpy as np
import pytest
import torch

from coco_files import write_coco
from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.transforms import TrainTransform
from maskrcnn.data.validate import DataError
from maskrcnn.structures.masks import PolygonMasks, RLEMasks


def test_all_three_segmentation_formats_read_to_the_same_mask(small_coco):
    (path, images), mask = small_coco
    ds = CocoDataset(path, images)
    image, t = ds[0]
    assert image.shape == (3, 40, 50) and image.dtype == torch.uint8
    assert isinstance(t["masks"], RLEMasks)  # one RLE in the image: its polygon is converted too
    dense = t["masks"].to_tensor()
    assert dense.shape == (2, 40, 50)
    assert torch.equal(dense[1], torch.from_numpy(mask))  # compressed RLE
    assert torch.equal(dense[0], torch.from_numpy(mask))  # polygon [5, 10] - [25, 20]
    _, t2 = ds[1]
    assert torch.equal(t2["masks"].to_tensor()[0], torch.from_numpy(mask))  # uncompressed RLE


def test_targets_have_xyxy_boxes_contiguous_labels_and_ids(small_coco):
    (path, images), _ = small_coco
    ds = CocoDataset(path, images)
    _, t = ds[0]
    assert t["boxes"].dtype == torch.float32 and t["boxes"].tolist() == [[5, 10, 25, 20]] * 2
    assert t["labels"].dtype == torch.int64 and t["labels"].tolist() == [2, 1]  # ids 7 and 3
    assert t["image_id"] == 1 and t["orig_size"] == (40, 50)


def test_label_mapping_round_trips(small_coco):
    (path, images), _ = small_coco
    ds = CocoDataset(path, images)
    # categories sorted by id give the labels: id 3 -> 1, id 7 -> 2
    assert ds.num_classes == 2 and ds.category_ids == [3, 7] and ds.class_names == ["dog", "cat"]
    assert ds.category_to_label == {3: 1, 7: 2}
    for label in (1, 2):
        assert ds.category_to_label[ds.label_to_category(label)] == label
    with pytest.raises(ValueError, match="0 is background"):
        ds.label_to_category(0)


def test_crowd_regions_are_not_training_targets(small_coco):
    (path, images), _ = small_coco
    _, t = CocoDataset(path, images)[1]
    assert t["labels"].tolist() == [1] and len(t["masks"]) == 1 and t["boxes"].shape == (1, 4)


def test_empty_images_are_kept_by_default_and_dropped_on_request(small_coco):
    (path, images), _ = small_coco
    ds = CocoDataset(path, images)
    assert len(ds) == 3 and ds.image_ids == [1, 2, 3]
    image, t = ds[2]
    assert image.shape == (3, 40, 50)
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and len(t["masks"]) == 0
    assert t["masks"].crop_and_resize(t["boxes"], 28).shape == (0, 28, 28)
    dropped = CocoDataset(path, images, drop_empty=True)
    assert dropped.image_ids == [1, 2] and dropped.skipped == {"empty-image": 1}


def test_polygon_only_images_stay_polygons_and_missing_masks_use_the_box(tmp_path):
    images = [{"id": 4, "file_name": "a.png", "height": 30, "width": 30}]
    anns = [{"id": 1, "image_id": 4, "category_id": 7, "bbox": [0, 0, 10, 10], "segmentation": [[0, 0, 10, 0, 10, 10]]},
            {"id": 2, "image_id": 4, "category_id": 7, "bbox": [12, 2, 6, 8]},
            {"id": 3, "image_id": 4, "category_id": 3, "bbox": [1, 1, 4, 4], "segmentation": []}]
    path, img_dir = write_coco(tmp_path, images, anns)
    _, t = CocoDataset(path, img_dir)[0]
    assert isinstance(t["masks"], PolygonMasks)
    # triangle: 45 of 100 pixel centres lie strictly inside (10 sit on the hypotenuse); boxes 6x8, 4x4
    assert t["masks"].area().tolist() == [45.0, 48.0, 16.0]
    assert t["masks"].boxes()[1:].tolist() == [[12, 2, 18, 10], [1, 1, 5, 5]]


def test_boxes_are_clipped_to_the_image(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "height": 20, "width": 30}]
    anns = [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [-0.5, 2, 30.5, 18.8]}]
    path, img_dir = write_coco(tmp_path, images, anns)
    _, t = CocoDataset(path, img_dir)[0]
    assert t["boxes"].tolist() == [[0, 2, 30, 20]]


def test_image_info_and_aspect_ratios_come_from_the_json(small_coco):
    (path, images), _ = small_coco
    ds = CocoDataset(path, images)
    assert ds.image_info(1) == {"id": 2, "file_name": "b.png", "height": 40, "width": 50}
    assert ds.aspect_ratios() == [1.25] * 3


def test_transforms_are_applied_by_getitem_but_not_by_load(small_coco):
    (path, images), _ = small_coco
    ds = CocoDataset(path, images, transforms=TrainTransform(flip_prob=1.0))
    raw, raw_t = ds.load(0)
    flipped, t = ds[0]
    assert torch.equal(flipped, raw.flip(-1))
    assert t["boxes"].tolist() == [[25, 10, 45, 20]] * 2
    assert torch.equal(t["masks"].to_tensor(), raw_t["masks"].to_tensor().flip(-1))


def test_a_file_changed_after_construction_gives_a_one_line_error(small_coco):
    (path, images), _ = small_coco
    ds = CocoDataset(path, images)
    (images / "a.png").write_bytes(b"broken")
    with pytest.raises(DataError, match=r"image 1 \(a.png\): .* cannot be read"):
        ds[0]


def test_image_files_can_be_left_unchecked(small_coco):
    (path, images), _ = small_coco
    (images / "c.png").unlink()
    with pytest.raises(DataError, match="file not found"):
        CocoDataset(path, images)
    ds = CocoDataset(path, images, check_images=False)
    assert len(ds) == 3 and ds.target(2)["boxes"].shape == (0, 4)


def test_dataset_pickles_for_loader_workers(small_coco):
    (path, images), _ = small_coco
    ds = pickle.loads(pickle.dumps(CocoDataset(path, images)))
    _, t = ds[0]
    assert t["labels"].tolist() == [2, 1]
    assert all(isinstance(s, (dict, list)) for r in ds._records for s in r.segmentations)
    assert all(isinstance(p, np.ndarray) for r in ds._records for s in r.segmentations
               if isinstance(s, list) for p in s)


def test_ground_truth_is_exactly_what_the_data_set_kept(tmp_path):
    """Skipped annotations and images, and the annotations of skipped images, are left out;
    crowd regions of kept images stay in (the evaluator needs them); records are unchanged."""
    images = [{"id": i, "file_name": f"{i}.png", "height": 30, "width": 30} for i in (1, 2, 3, 4)]
    anns = [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [0, 0, 10, 10]},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 10, 10], "segmentation": "a polygon"},
            {"id": 3, "image_id": 2, "category_id": 3, "bbox": [5, 5, 10, 10], "iscrowd": 1},
            {"id": 4, "image_id": 3, "category_id": 3, "bbox": [5, 5, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 5, "image_id": 1, "category_id": 3, "bbox": [40, 0, 5, 5]}]
    path, img_dir = write_coco(tmp_path, images, anns)
    (img_dir / "3.png").unlink()
    ds = CocoDataset(path, img_dir, skip_bad=True)
    assert ds.skipped == {"segmentation": 1, "bbox-outside": 1, "image-missing": 1,
                          "annotation-of-skipped-image": 1}
    gt = ds.ground_truth()
    assert gt["images"] == [images[0], images[1], images[3]]
    assert gt["annotations"] == [anns[0], anns[2]]
    assert gt["categories"] == [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}]
    dropped = CocoDataset(path, img_dir, skip_bad=True, drop_empty=True).ground_truth()
    assert [img["id"] for img in dropped["images"]] == [1]  # image 2 holds only a crowd region
    assert dropped["annotations"] == [anns[0]]
    assert pickle.loads(pickle.dumps(ds)).ground_truth() == gt


def test_ground_truth_refuses_a_file_changed_after_construction(small_coco):
    (path, images), _ = small_coco
    ds = CocoDataset(path, images)
    assert len(ds.ground_truth()["annotations"]) == 4
    path.write_text(path.read_text().replace('"iscrowd": 1', '"iscrowd": 0 '))
    with pytest.raises(DataError, match="changed after the data set was built"):
        ds.ground_truth()
