import math
import tracemalloc

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from maskrcnn.structures.masks import BitMasks, PolygonMasks, RLEMasks, mask_extent, roi_align_binary


def rect(x0, y0, x1, y1):
    return [np.array([x0, y0, x1, y0, x1, y1, x0, y1], dtype=np.float64)]


def rle_masks(dense: np.ndarray) -> RLEMasks:
    """(N, H, W) 0/1 array -> RLEMasks."""
    rles = mask_util.encode(np.asfortranarray(dense.transpose(1, 2, 0).astype(np.uint8)))
    return RLEMasks(rles, dense.shape[1], dense.shape[2])


def all_types(dense: np.ndarray):
    return [rle_masks(dense), BitMasks(torch.from_numpy(dense))]


def reference_roi_align(mask: np.ndarray, box, m: int) -> np.ndarray:
    """Aligned RoIAlign with adaptive sampling, written out sample by sample (float64)."""
    height, width = mask.shape
    x1, y1, x2, y2 = [v - 0.5 for v in box[:2]] + [v - 0.5 for v in box[2:]]
    bw, bh = (x2 - x1) / m, (y2 - y1) / m
    gx, gy = math.ceil((x2 - x1) / m), math.ceil((y2 - y1) / m)
    out = np.zeros((m, m))
    if gx <= 0 or gy <= 0:
        return out
    for py in range(m):
        for px in range(m):
            total = 0.0
            for iy in range(gy):
                for ix in range(gx):
                    y = y1 + py * bh + (iy + 0.5) * bh / gy
                    x = x1 + px * bw + (ix + 0.5) * bw / gx
                    if y < -1 or y > height or x < -1 or x > width:
                        continue
                    y, x = max(y, 0.0), max(x, 0.0)
                    y0, x0 = int(y), int(x)
                    if y0 >= height - 1:
                        y0 = y1_ = height - 1
                        y = float(y0)
                    else:
                        y1_ = y0 + 1
                    if x0 >= width - 1:
                        x0 = x1_ = width - 1
                        x = float(x0)
                    else:
                        x1_ = x0 + 1
                    ly, lx = y - y0, x - x0
                    total += ((1 - ly) * (1 - lx) * mask[y0, x0] + (1 - ly) * lx * mask[y0, x1_]
                              + ly * (1 - lx) * mask[y1_, x0] + ly * lx * mask[y1_, x1_])
            out[py, px] = total / (gx * gy)
    return out


# ---------------------------------------------------------------- polygons, hand-computed

def test_polygon_crop_is_exact_inside_the_box():
    masks = PolygonMasks([rect(10, 10, 20, 20)], 40, 40)
    # the box is twice the square: the square fills the box's top-left quarter
    crop = masks.crop_and_resize(torch.tensor([[10.0, 10, 30, 30]]), 8)
    expected = torch.zeros(1, 8, 8)
    expected[0, :4, :4] = 1
    assert crop.dtype == torch.float32 and torch.equal(crop, expected)


def test_polygon_crop_scales_each_axis_separately_and_merges_parts():
    # two parts of one instance: the left and right quarters of a 16 x 4 box
    masks = PolygonMasks([rect(0, 0, 4, 4) + rect(12, 0, 16, 4)], 4, 16)
    crop = masks.crop_and_resize(torch.tensor([[0.0, 0, 16, 4]]), 4)[0]
    assert crop.tolist() == [[1, 0, 0, 1]] * 4


def test_degenerate_polygons_are_dropped_and_give_empty_masks():
    masks = PolygonMasks([[np.array([1.0, 1, 5, 5])], rect(0, 0, 2, 2)], 8, 8)
    assert masks.polygons[0] == [] and len(masks) == 2
    crop = masks.crop_and_resize(torch.tensor([[0.0, 0, 8, 8], [0, 0, 2, 2]]), 4)
    assert crop[0].sum() == 0 and crop[1].sum() == 16
    assert masks.area().tolist() == [0.0, 4.0]


# ------------------------------------------------------- bitmap RoIAlign, hand-computed

def test_aligned_sampling_reads_pixel_centres():
    dense = np.zeros((1, 4, 4), np.uint8)
    dense[0, :2, :2] = 1
    for masks in all_types(dense):
        # half-pixel alignment: bin (0, 0) of [1, 1, 3, 3] samples pixel (1, 1) exactly
        crop = masks.crop_and_resize(torch.tensor([[1.0, 1, 3, 3]]), 2)
        assert crop[0].tolist() == [[1, 0], [0, 0]]
        assert masks.crop_and_resize(torch.tensor([[0.0, 0, 2, 2]]), 2)[0].tolist() == [[1, 1], [1, 1]]


def test_adaptive_sampling_averages_four_points_then_thresholds():
    # a 4x4 box at m=2 has ceil(4/2) = 2 x 2 samples per bin
    one_pixel = np.zeros((1, 4, 4), np.uint8)
    one_pixel[0, 0, 0] = 1  # 1 of 4 samples -> 0.25 -> 0
    two_pixels = np.zeros((1, 4, 4), np.uint8)
    two_pixels[0, :2, 0] = 1  # 2 of 4 samples -> 0.5 -> 1 (threshold is >= 0.5)
    box = torch.tensor([[0.0, 0, 4, 4]])
    for masks in all_types(one_pixel):
        assert masks.crop_and_resize(box, 2).sum() == 0
    for masks in all_types(two_pixels):
        assert masks.crop_and_resize(box, 2)[0].tolist() == [[1, 0], [0, 0]]


def test_samples_beyond_one_pixel_outside_the_image_count_as_zero():
    # bin (0, 0) of [-2, -2, 2, 2] samples x, y in {-2, -1}: only (-1, -1) lies within the
    # one-pixel margin (clamped to pixel (0, 0)) -> 1/4; bins (0, 1) and (1, 0) get 2/4
    for masks in all_types(np.ones((1, 4, 4), np.uint8)):
        crop = masks.crop_and_resize(torch.tensor([[-2.0, -2, 2, 2]]), 2)
        assert crop[0].tolist() == [[0, 1], [1, 1]]


def test_empty_or_inverted_box_gives_zeros():
    for masks in all_types(np.ones((1, 6, 6), np.uint8)):
        assert masks.crop_and_resize(torch.tensor([[3.0, 3, 3, 5]]), 4).sum() == 0
        assert masks.crop_and_resize(torch.tensor([[4.0, 1, 2, 5]]), 4).sum() == 0


def test_bitmap_crop_matches_a_float64_reference():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:23, 0:31]
    dense = np.stack([((xx - 12) ** 2 + (yy - 10) ** 2 < 60), (xx + 2 * yy > 30), rng.random((23, 31)) < 0.5])
    boxes = []
    for _ in range(40):
        x, y = rng.uniform(-4, 30), rng.uniform(-4, 22)
        boxes.append([x, y, x + rng.uniform(0.3, 25), y + rng.uniform(0.3, 25)])
    boxes = torch.tensor(boxes)
    index = torch.from_numpy(rng.integers(0, 3, 40))
    for masks in all_types(dense.astype(np.uint8)):
        crop = masks.crop_and_resize(boxes, 7, index)
        for r in range(40):
            ref = reference_roi_align(dense[index[r]].astype(np.float64), boxes[r].tolist(), 7)
            decided = np.abs(ref - 0.5) > 1e-9  # exact ties may round either way
            assert np.array_equal(crop[r].numpy()[decided], (ref >= 0.5)[decided].astype(np.float32)), r


def test_roi_align_binary_reads_only_what_it_needs():
    mask = np.zeros((5, 5), np.uint8)
    mask[1:4, 1:4] = 1
    out = roi_align_binary(mask, np.array([1.0, 1.0, 4.0, 4.0]), 3)
    assert out.tolist() == [[1.0] * 3] * 3


# -------------------------------------------------------------- agreement and interface

def test_polygon_and_rle_targets_agree():
    rng = np.random.default_rng(1)
    polys = []
    for _ in range(6):
        cx, cy, r = rng.uniform(15, 45), rng.uniform(15, 35), rng.uniform(5, 14)
        t = np.sort(rng.uniform(0, 2 * np.pi, 7))
        polys.append([np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1).ravel()])
    poly = PolygonMasks(polys, 50, 60)
    rle = RLEMasks(poly.to_rles(), 50, 60)
    boxes = poly.boxes() + torch.from_numpy(rng.normal(0, 1.5, (6, 4))).float()
    a, b = poly.crop_and_resize(boxes, 28), rle.crop_and_resize(boxes, 28)
    assert (a != b).float().mean() < 0.05  # they differ only along the edges


def test_rle_and_bitmap_crops_equal_plain_indexing_of_a_hand_built_mask():
    """A square box on pixel edges with side ``size`` (or twice it) samples only pixel centres,
    so its crop is the mask's sub-array (or each 2x2 block's majority, 2 of 4 counting as in)."""
    mask = torch.zeros(12, 16, dtype=torch.uint8)
    mask[2:10, 3:6] = 1  # an L: a bar and a foot
    mask[7:10, 6:13] = 1
    mask[4, 4] = 0  # a one-pixel hole
    mask[1, 13] = 1  # a speck
    rle = mask_util.encode(np.asfortranarray(mask.numpy()))
    blocks = mask[1:11, 4:14].float().reshape(5, 2, 5, 2).mean((1, 3))
    assert {0.0, 0.25, 0.5, 0.75, 1.0} <= set(blocks.flatten().tolist())
    for masks in (RLEMasks([rle], 12, 16), BitMasks(mask[None])):
        assert torch.equal(masks.to_tensor()[0], mask)
        crop = masks.crop_and_resize(torch.tensor([[3.0, 1, 14, 12]]), 11)[0]
        assert torch.equal(crop, mask[1:12, 3:14].float())
        crop = masks.crop_and_resize(torch.tensor([[4.0, 1, 14, 11]]), 10)[0]
        assert torch.equal(crop, mask[1:11, 4:14].float())
        halved = masks.crop_and_resize(torch.tensor([[4.0, 1, 14, 11]]), 5)[0]
        assert torch.equal(halved, (blocks >= 0.5).float())


def test_indices_argument_equals_indexing_first():
    poly = PolygonMasks([rect(4, 6, 24, 30), rect(0, 0, 10, 10)], 40, 40)
    idx = torch.tensor([1, 0, 1, 1])
    boxes = torch.tensor([[0.0, 0, 10, 10], [4, 6, 24, 30], [0, 0, 20, 20], [2, 2, 8, 8]])
    for masks in (poly, RLEMasks(poly.to_rles(), 40, 40), BitMasks(poly.to_tensor())):
        assert torch.equal(masks.crop_and_resize(boxes, 14, idx), masks[idx].crop_and_resize(boxes, 14))


def test_one_box_per_mask_is_required():
    masks = PolygonMasks([rect(0, 0, 2, 2)] * 2, 4, 4)
    with pytest.raises(ValueError, match="2 masks"):
        masks.crop_and_resize(torch.zeros(3, 4), 4)
    assert masks[:0].crop_and_resize(torch.zeros(0, 4), 4).shape == (0, 4, 4)
    assert RLEMasks([], 4, 4).crop_and_resize(torch.zeros(0, 4), 4).shape == (0, 4, 4)


def test_indexing_with_every_kind_of_index():
    dense = np.zeros((3, 4, 5), np.uint8)
    for i in range(3):
        dense[i, i, :] = 1
    poly = PolygonMasks([rect(0, i, 5, i + 1) for i in range(3)], 4, 5)
    for masks in [poly] + all_types(dense):
        rows = lambda m: m.to_tensor().flatten(1).nonzero()[:, 1].div(5, rounding_mode="floor")
        assert type(masks[1]) is type(masks) and len(masks[1]) == 1
        assert masks[-1].to_tensor()[0, 2].all()
        assert len(masks[1:]) == 2 and len(masks[[2, 2]]) == 2
        assert masks[torch.tensor([2, 0, 2])].to_tensor()[:, :, 0].argmax(1).tolist() == [2, 0, 2]
        assert masks[torch.tensor([False, True, True])].to_tensor()[:, :, 0].argmax(1).tolist() == [1, 2]
        assert rows(masks[np.array([0])]).unique().tolist() == [0]
        with pytest.raises(IndexError):
            masks[3]
        with pytest.raises(IndexError):
            masks[torch.tensor([True, False])]


def test_flip_is_mirror_image_and_an_involution():
    poly = PolygonMasks([rect(0, 0, 5, 10), rect(10, 0, 20, 4)], 12, 30)
    dense = poly.to_tensor()
    assert dense.shape == (2, 12, 30) and dense[0, :10, :5].all() and dense.sum() == 50 + 40
    for masks in (poly, RLEMasks(poly.to_rles(), 12, 30), BitMasks(dense)):
        flipped = masks.flip_horizontal()
        assert type(flipped) is type(masks)
        assert torch.equal(flipped.to_tensor(), dense.flip(-1))
        assert torch.equal(flipped.flip_horizontal().to_tensor(), dense)
    assert poly.flip_horizontal().boxes().tolist() == [[25, 0, 30, 10], [10, 0, 20, 4]]


def test_area_boxes_and_resize():
    poly = PolygonMasks([rect(2, 1, 6, 4), [], ], 8, 10)
    assert poly.area().tolist() == [12.0, 0.0]
    assert poly.boxes().tolist() == [[2, 1, 6, 4], [0, 0, 0, 0]]
    for masks in (RLEMasks(poly.to_rles(), 8, 10), BitMasks(poly.to_tensor())):
        assert masks.area().tolist() == [12.0, 0.0]
        assert masks.boxes().tolist() == [[2, 1, 6, 4], [0, 0, 0, 0]]
        big = masks.resize(16, 20)
        assert (big.height, big.width) == (16, 20) and big.area().tolist() == [48.0, 0.0]
    big = poly.resize(16, 20)
    assert big.boxes().tolist() == [[4, 2, 12, 8], [0, 0, 0, 0]] and big.area()[0] == 48


def test_constructor_accepts_json_and_uncompressed_rle():
    mask = np.zeros((5, 4), np.uint8)
    mask[1:3, 1:3] = 1
    compressed = mask_util.encode(np.asfortranarray(mask))
    as_json = {"size": [5, 4], "counts": compressed["counts"].decode()}
    runs = [6, 2, 3, 2, 7]  # column-major: 6 zeros, 2 ones, 3 zeros, 2 ones, 7 zeros
    masks = RLEMasks([compressed, as_json, {"size": [5, 4], "counts": runs}], 5, 4)
    assert all(isinstance(r["counts"], bytes) for r in masks.rles)
    assert all(torch.equal(t, torch.from_numpy(mask)) for t in masks.to_tensor())
    from_segs = RLEMasks.from_segmentations([as_json, [[1, 1, 3, 1, 3, 3, 1, 3]]], 5, 4)
    assert torch.equal(from_segs.to_tensor()[1], torch.from_numpy(mask))


def test_cat_keeps_order_and_checks_sizes():
    a = PolygonMasks([rect(0, 0, 1, 1)], 4, 4)
    b = PolygonMasks([rect(1, 1, 3, 3), rect(0, 0, 4, 4)], 4, 4)
    assert PolygonMasks.cat([a, b]).area().tolist() == [1.0, 4.0, 16.0]
    ra, rb = RLEMasks(a.to_rles(), 4, 4), RLEMasks(b.to_rles(), 4, 4)
    assert RLEMasks.cat([ra, rb]).area().tolist() == [1.0, 4.0, 16.0]
    assert BitMasks.cat([BitMasks(a.to_tensor()), BitMasks(b.to_tensor())]).area().tolist() == [1.0, 4.0, 16.0]
    with pytest.raises(ValueError, match="cannot concatenate"):
        PolygonMasks.cat([a, PolygonMasks([], 5, 4)])


def test_results_follow_the_boxes_device_and_dtype():
    masks = PolygonMasks([rect(0, 0, 2, 2)], 4, 4)
    out = masks.crop_and_resize(torch.tensor([[0.0, 0, 4, 4]], dtype=torch.float64), 2)
    assert out.dtype == torch.float32 and out.device.type == "cpu"


# -------------------------------------------------------------------------------- memory

def test_masks_stay_compact_and_cropping_never_decodes_all_instances():
    h, w, n = 1000, 1500, 40
    poly = PolygonMasks([rect(10 * i, 5 * i, 10 * i + 600, 5 * i + 400) for i in range(n)], h, w)
    rle = RLEMasks(poly.to_rles(), h, w)
    assert sum(len(r["counts"]) for r in rle.rles) < 0.01 * n * h * w  # bytes, against n*H*W as bitmaps
    boxes = poly.boxes()
    # polygons never touch the image; RLE decodes one instance and reads its box in float64
    for masks, budget in ((poly, 1e6), (rle, 8 * h * w)):
        tracemalloc.start()
        masks.crop_and_resize(boxes, 28)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < budget < n * h * w, (type(masks).__name__, peak)


def test_mask_extent_matches_the_set_pixels():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        mask = torch.zeros(13, 17, dtype=torch.bool)
        y0, x0 = torch.randint(0, 13, (1,), generator=g).item(), torch.randint(0, 17, (1,), generator=g).item()
        mask[y0:, x0:] = torch.rand(13 - y0, 17 - x0, generator=g) > 0.7
        ys, xs = mask.nonzero(as_tuple=True)
        expected = (ys.min().item(), ys.max().item() + 1, xs.min().item(), xs.max().item() + 1) if len(ys) else None
        assert mask_extent(mask) == expected
    assert mask_extent(torch.zeros(4, 5, dtype=torch.bool)) is None
    assert mask_extent(torch.ones(4, 5, dtype=torch.bool)) == (0, 4, 0, 5)
    assert mask_extent(torch.zeros(0, 5, dtype=torch.bool)) is None
    assert mask_extent(torch.ones(9, 9, dtype=torch.bool)[2:7:2, 1:4]) == (0, 3, 0, 3)  # a strided view


def test_mask_extent_reads_only_the_region_given():
    mask = torch.zeros(13, 17, dtype=torch.bool)
    mask[4:9, 6:8] = True
    assert mask_extent(mask, (5, 3, 10, 12)) == mask_extent(mask) == (4, 9, 6, 8)
    assert mask_extent(mask, (7, 5, 17, 13)) == (5, 9, 7, 8)  # the region cuts the mask
    mask[0, 0] = True  # a pixel outside the region is not seen: the caller knows there is none
    assert mask_extent(mask, (5, 3, 10, 12)) == (4, 9, 6, 8)
    assert mask_extent(mask, (0, 0, 0, 0)) is None
    assert mask_extent(mask, (17, 3, 17, 12)) is None  # the empty region of a box right of the image
