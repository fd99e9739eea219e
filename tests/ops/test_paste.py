import math
import os

import pytest
import torch
import torch.nn.functional as F

tv_roi_heads = pytest.importorskip("torchvision.models.detection.roi_heads")

from maskrcnn.ops import paste_masks  # noqa: E402
from maskrcnn.ops.paste import paste_regions  # noqa: E402


def cases(seed, n=25, hw=(200, 300), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(n, 28, 28, generator=g, dtype=torch.float64).to(dtype)
    c = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([hw[1], hw[0]])
    size = torch.rand(n, 2, generator=g, dtype=torch.float64) * 120
    boxes = torch.cat([c - size / 2, c + size / 2], 1).to(dtype)
    special = [[3.0, 4.0, 3.5, 4.2],  # tiny
               [-50.0, -30.0, 40.0, 20.0],  # partly outside, top-left
               [hw[1] - 10.0, hw[0] - 5.0, hw[1] + 60.0, hw[0] + 30.0],  # partly outside, bottom-right
               [-20.0, 70.0, -1.5, 90.0],  # left of the image; its enlarged edge truncates to 0
               [20.0, 30.0, 20.0, 30.0],  # a point
               [0.0, 0.0, float(hw[1]), float(hw[0])]]  # whole image
    boxes[: len(special)] = torch.tensor(special, dtype=dtype)
    return masks, boxes


def detectron2_reference(masks, boxes, hw):
    """Every pixel centre of the whole image sampled with grid_sample, one mask at a time."""
    h, w = hw
    ys = torch.arange(h, dtype=torch.float32) + 0.5
    xs = torch.arange(w, dtype=torch.float32) + 0.5
    out = []
    for m, (x1, y1, x2, y2) in zip(masks, boxes.tolist()):
        gy = (ys - y1) / (y2 - y1) * 2 - 1
        gx = (xs - x1) / (x2 - x1) * 2 - 1
        grid = torch.stack([gx[None].expand(h, w), gy[:, None].expand(h, w)], -1)
        out.append(F.grid_sample(m[None, None], grid[None], align_corners=False)[0, 0])
    return torch.stack(out)


@pytest.mark.parametrize("seed,dtype", [(0, torch.float32), (1, torch.float32), (2, torch.float64)])
def test_torchvision_mode_is_exact(seed, dtype):
    masks, boxes = cases(seed, dtype=dtype)
    expected = tv_roi_heads.paste_masks_in_image(masks[:, None], boxes, (200, 300))[:, 0]
    soft = paste_masks(masks, boxes, (200, 300), soft=True)
    assert soft.dtype == dtype and torch.equal(soft, expected)
    hard = paste_masks(masks, boxes, (200, 300))
    assert hard.dtype == torch.bool and torch.equal(hard, expected > 0.5)
    assert torch.equal(paste_masks(masks, boxes, (200, 300), threshold=0.7), expected > 0.7)


def test_masks_set_in_a_few_rows_or_none_paste_exactly():
    """Maps zero but for a band of rows (and one wholly zero): the binary pastes equal
    torchvision's and the full-image reference."""
    masks, boxes = cases(6)
    masks[:, :9] = 0
    masks[:, 15:] = 0
    masks[3] = 0
    expected = tv_roi_heads.paste_masks_in_image(masks[:, None], boxes, (200, 300))[:, 0] > 0.5
    hard = paste_masks(masks, boxes, (200, 300))
    assert torch.equal(hard, expected) and not hard[3].any()
    assert hard.any(2).sum() < hard[:, :, 0].numel() / 4  # most rows hold no set pixel
    keep = [i for i in range(len(boxes)) if i != 4]  # D2 divides by zero for a point
    masks, boxes = masks[keep], boxes[keep]
    expected = detectron2_reference(masks, boxes, (200, 300)) >= 0.5
    assert torch.equal(paste_masks(masks, boxes, (200, 300), mode="detectron2"), expected)


def test_detectron2_mode_matches_full_image_grid_sample():
    masks, boxes = cases(3)
    boxes = boxes[[i for i in range(len(boxes)) if i != 4]]  # D2 divides by zero for a point
    masks = masks[: len(boxes)]
    expected = detectron2_reference(masks, boxes, (200, 300))
    assert torch.equal(paste_masks(masks, boxes, (200, 300), mode="detectron2"), expected >= 0.5)
    # soft values: Detectron2's, inside one pixel around the box, zero beyond
    soft = paste_masks(masks, boxes, (200, 300), mode="detectron2", soft=True)
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        ys = slice(max(math.floor(y1) - 1, 0), max(math.ceil(y2) + 1, 0))
        xs = slice(max(math.floor(x1) - 1, 0), max(math.ceil(x2) + 1, 0))
        assert torch.equal(soft[i, ys, xs], expected[i, ys, xs])
        soft[i, ys, xs] = 0
    assert not soft.any()


@pytest.mark.parametrize("mode", ["torchvision", "detectron2"])
def test_pasted_masks_are_empty_outside_their_regions(mode):
    """Soft pastes of all-ones maps, so every pixel a paste writes is positive: none lies
    outside its region, and the region lies within the box enlarged by (m + 2) / m about its
    centre and two pixels on each side, clipped to the image."""
    masks, boxes = cases(5)
    masks = torch.ones_like(masks)
    boxes = boxes[[i for i in range(len(boxes)) if i != 4]]  # D2 divides by zero for a point
    soft = paste_masks(masks[: len(boxes)], boxes, (200, 300), mode=mode, soft=True)
    regions = paste_regions(boxes, 28, (200, 300), mode)
    assert regions.shape == (len(boxes), 4) and regions.dtype == torch.int64
    for mask, box, (x0, y0, x1, y1) in zip(soft, boxes.tolist(), regions.tolist()):
        assert 0 <= x0 <= 300 and 0 <= x1 <= 300 and 0 <= y0 <= 200 and 0 <= y1 <= 200
        grow_x, grow_y = (box[2] - box[0]) / 28 + 2, (box[3] - box[1]) / 28 + 2
        if x0 < x1 and y0 < y1:
            assert box[0] - grow_x <= x0 and x1 <= box[2] + grow_x
            assert box[1] - grow_y <= y0 and y1 <= box[3] + grow_y
        outside = mask.clone()
        outside[y0:y1, x0:x1] = 0
        assert not outside.any()


def test_wholly_outside_boxes_paste_nothing():
    # torchvision's own paste fails on these (its clipped slices go negative)
    masks = torch.ones(3, 28, 28)
    boxes = torch.tensor([[-90.0, 10.0, -40.0, 50.0], [10.0, 300.0, 50.0, 340.0], [-9.0, -9.0, -3.0, -3.0]])
    for mode in ("torchvision", "detectron2"):
        assert not paste_masks(masks, boxes, (200, 300), mode=mode).any()


@pytest.mark.parametrize("mode", ["torchvision", "detectron2"])
def test_threshold_is_strict_for_torchvision_and_inclusive_for_detectron2(mode):
    masks, boxes = cases(5, n=8)
    soft = paste_masks(masks, boxes, (200, 300), mode=mode, soft=True)
    i, y, x = (int(v) for v in torch.nonzero(soft > 0.2)[17])
    hard = paste_masks(masks, boxes, (200, 300), mode=mode, threshold=soft[i, y, x].item())
    assert hard[i, y, x].item() == (mode == "detectron2")


def test_hand_computed_torchvision_geometry():
    # a 2x2 map of ones at box (4, 4)-(8, 8) is padded to 4x4 and the box enlarged by 4/2 about
    # its centre to (2, 2)-(10, 10): a 9x9 resize whose middle is 1 and whose rim fades out
    out = paste_masks(torch.ones(1, 2, 2), torch.tensor([[4.0, 4.0, 8.0, 8.0]]), (12, 12), soft=True)[0]
    assert out[6, 6] == 1 and out[2, 2] == 0 and out[:2].sum() == 0 and out[:, 11].sum() == 0
    assert torch.equal(out, out.T)  # symmetric box, symmetric paste


@pytest.mark.parametrize("mode", ["torchvision", "detectron2"])
def test_result_inside_boxes_does_not_depend_on_image_size(mode):
    masks, boxes = cases(4, n=10, hw=(150, 250))
    boxes = boxes[6:].clamp(min=0)
    masks = masks[6:]
    small = paste_masks(masks, boxes, (200, 300), mode=mode)
    large = paste_masks(masks, boxes, (2000, 3000), mode=mode)
    assert small.any()
    assert torch.equal(large[:, :200, :300], small)
    assert not large[:, 200:, :].any() and not large[:, :, 300:].any()


def test_no_instances_and_bad_mode():
    assert paste_masks(torch.zeros(0, 28, 28), torch.zeros(0, 4), (5, 6)).shape == (0, 5, 6)
    with pytest.raises(ValueError, match="paste mode"):
        paste_masks(torch.zeros(1, 28, 28), torch.zeros(1, 4), (5, 6), mode="nearest")


def resident_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads Linux's /proc")
def test_memory_is_committed_only_around_the_boxes():
    """100 small boxes in 100 images of 4000 x 3000: 1.2 GB of output, a few MB touched."""
    boxes = torch.tensor([[100.0, 200.0, 140.0, 230.0]]).repeat(100, 1)
    before = resident_mb()
    out = paste_masks(torch.ones(100, 28, 28), boxes, (3000, 4000))
    assert resident_mb() - before < 100
    assert out.shape == (100, 3000, 4000) and bool(out[:, 215, 120].all())
    assert int(out[7].sum()) == int(out[7, 190:240, 90:150].sum()) > 0
    out[0, 0, 0] = True  # writable
