import itertools

import pytest
import torch

tv_ops = pytest.importorskip("torchvision.ops")

from maskrcnn.ops import RoIAlign, roi_align  # noqa: E402

H, W = 10, 13
BOXES = torch.tensor([
    [0, 1.3, 2.2, 7.7, 8.1],      # inside
    [1, -3.0, -2.0, 5.0, 4.0],    # partly outside (top-left)
    [0, 10.0, 3.0, 20.0, 30.0],   # partly outside (bottom-right)
    [1, -30.0, -30.0, -20.0, -20.0],  # wholly outside
    [0, 2.0, 2.0, 2.0, 6.0],      # zero width
    [1, 4.0, 4.0, 4.0, 4.0],      # a point
    [0, 3.0, 1.0, 2.5, 9.0],      # x2 < x1
    [1, -2.0, -2.0, 0.0, 0.0],    # 1x1 samples land exactly on -1 (scale 1)
    [0, 12.0, 9.0, 14.0, 11.0],   # 1x1 samples land exactly on W and H (scale 1)
    [1, 0.5, 0.5, 13.5, 10.5],    # whole map
], dtype=torch.float64)


def feature(channels=3, batch=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, H, W, generator=g, dtype=dtype)


@pytest.mark.parametrize("aligned,ratio", itertools.product([False, True], [-1, 0, 1, 2, 4]))
@pytest.mark.parametrize("scale,size", [(1.0, (1, 1)), (1.0, (2, 2)), (0.5, (3, 5)), (1 / 16, (7, 7))])
def test_forward_equals_torchvision_in_float64(aligned, ratio, scale, size):
    x = feature()
    got = roi_align(x, BOXES, size, scale, ratio, aligned)
    expected = tv_ops.roi_align(x, BOXES, size, scale, ratio, aligned)
    assert (got - expected).abs().max() < 1e-10


@pytest.mark.parametrize("channels,batch", [(1, 1), (16, 3)])
def test_random_boxes_channels_and_batches(channels, batch):
    g = torch.Generator().manual_seed(channels)
    x = feature(channels, batch, seed=channels)
    xy = torch.rand(40, 2, generator=g, dtype=torch.float64) * 40 - 8
    wh = torch.rand(40, 2, generator=g, dtype=torch.float64) * 30
    idx = torch.randint(0, batch, (40, 1), generator=g).double()
    rois = torch.cat([idx, xy, xy + wh], 1)
    for aligned, ratio in itertools.product([False, True], [-1, 2]):
        got = roi_align(x, rois, (4, 3), 0.25, ratio, aligned)
        expected = tv_ops.roi_align(x, rois, (4, 3), 0.25, ratio, aligned)
        assert (got - expected).abs().max() < 1e-10


def test_list_of_boxes_form_and_module():
    x = feature()
    per_image = [BOXES[BOXES[:, 0] == i, 1:] for i in range(2)]
    expected = tv_ops.roi_align(x, per_image, 3, 0.5, 2, True)
    torch.testing.assert_close(roi_align(x, per_image, 3, 0.5, 2, True), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(RoIAlign(3, 0.5, 2, True)(x, per_image), expected, rtol=0, atol=1e-10)


def test_float32_and_channels_last_close_to_torchvision():
    x = feature(8, dtype=torch.float32)
    rois = BOXES.float()
    expected = tv_ops.roi_align(x, rois, 5, 0.5, -1, False)
    torch.testing.assert_close(roi_align(x, rois, 5, 0.5, -1, False), expected, rtol=1e-5, atol=1e-5)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(roi_align(x_cl, rois, 5, 0.5, -1, False), expected, rtol=1e-5, atol=1e-5)


def test_no_boxes_gives_empty_output():
    x = feature()
    assert roi_align(x, torch.zeros(0, 5, dtype=torch.float64), 7).shape == (0, 3, 7, 7)


@pytest.mark.parametrize("aligned,ratio", [(False, -1), (True, 0), (False, 2), (True, 1)])
def test_gradient_is_exact_and_passes_gradcheck(aligned, ratio):
    x = feature().requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(len(BOXES), 3, 3, 4, generator=g, dtype=torch.float64)
    (ours,) = torch.autograd.grad(roi_align(x, BOXES, (3, 4), 0.5, ratio, aligned), x, grad_out)
    (theirs,) = torch.autograd.grad(tv_ops.roi_align(x, BOXES, (3, 4), 0.5, ratio, aligned), x, grad_out)
    assert (ours - theirs).abs().max() < 1e-10
    small = feature(2, 2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: roi_align(t, BOXES, (2, 3), 0.5, ratio, aligned), (small,))


def test_hand_computed_bilinear_value():
    x = torch.arange(16.0, dtype=torch.float64).view(1, 1, 4, 4)  # value = 4 * y + x
    # aligned, one sample at the centre of box (0, 0)-(2, 2) -> feature point (0.5, 0.5)
    out = roi_align(x, torch.tensor([[0, 0.0, 0.0, 2.0, 2.0]], dtype=torch.float64), 1, 1.0, 1, True)
    assert out.item() == pytest.approx(4 * 0.5 + 0.5)
