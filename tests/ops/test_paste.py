import pytest
import torch
import torch.nn.functional as F

tv_roi_heads = pytest.importorskip("torchvision.models.detection.roi_heads")

from maskrcnn.ops import paste_masks  # noqa: E402


def cases(seed, n=25, hw=(200, 300)):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(n, 28, 28, generator=g)
    c = torch.rand(n, 2, generator=g) * torch.tensor([hw[1], hw[0]], dtype=torch.float32)
    size = torch.rand(n, 2, generator=g) * 120
    boxes = torch.cat([c - size / 2, c + size / 2], 1)
    boxes[0] = torch.tensor([3.0, 4.0, 3.5, 4.2])  # tiny
    boxes[1] = torch.tensor([-50.0, -30.0, 40.0, 20.0])  # partly outside
    return masks, boxes


@pytest.mark.parametrize("seed", [0, 1])
def test_torchvision_mode_is_exact(seed):
    masks, boxes = cases(seed)
    expected = tv_roi_heads.paste_masks_in_image(masks[:, None], boxes, (200, 300))[:, 0]
    assert torch.equal(paste_masks(masks, boxes, (200, 300), soft=True), expected)
    assert torch.equal(paste_masks(masks, boxes, (200, 300)), expected > 0.5)


def test_detectron2_mode_matches_full_image_grid_sample():
    masks, boxes = cases(2)
    h, w = 200, 300
    ys = torch.arange(h, dtype=torch.float32) + 0.5
    xs = torch.arange(w, dtype=torch.float32) + 0.5
    expected = []
    for m, (x1, y1, x2, y2) in zip(masks, boxes.tolist()):
        gy = (ys - y1) / (y2 - y1) * 2 - 1
        gx = (xs - x1) / (x2 - x1) * 2 - 1
        grid = torch.stack([gx[None].expand(h, w), gy[:, None].expand(h, w)], -1)
        expected.append(F.grid_sample(m[None, None], grid[None], align_corners=False)[0, 0] >= 0.5)
    assert torch.equal(paste_masks(masks, boxes, (h, w), mode="detectron2"), torch.stack(expected))


@pytest.mark.parametrize("mode", ["torchvision", "detectron2"])
def test_result_inside_boxes_does_not_depend_on_image_size(mode):
    masks, boxes = cases(3, n=10, hw=(150, 250))
    boxes = boxes.clamp(min=0)
    small = paste_masks(masks, boxes, (200, 300), mode=mode)
    large = paste_masks(masks, boxes, (2000, 3000), mode=mode)
    assert torch.equal(large[:, :200, :300], small)
    assert not large[:, 200:, :].any() and not large[:, :, 300:].any()
