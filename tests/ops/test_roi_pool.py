import pytest
import torch

tv_ops = pytest.importorskip("torchvision.ops")

from maskrcnn.ops import RoIPool, roi_pool  # noqa: E402

H, W = 10, 13
BOXES = torch.tensor([
    [0, 1.3, 2.2, 7.7, 8.1],       # inside
    [1, -3.0, -2.0, 5.0, 4.0],     # partly outside
    [0, 10.0, 3.0, 30.0, 30.0],    # partly outside
    [1, -30.0, -30.0, -20.0, -20.0],  # wholly outside: every bin empty
    [0, 5.0, 5.0, 5.0, 5.0],       # a point: one cell
    [1, 9.0, 1.0, 3.0, 7.0],       # x2 < x1: treated as one cell wide
    [0, 5.0, 3.0, 15.0, 7.0],      # corners at .5 after scaling by 0.5: C rounds half away from 0
    [1, -5.0, 1.0, 7.0, 3.0],      # -2.5 after scaling by 0.5
    [0, 0.0, 0.0, 26.0, 20.0],     # the whole map at scale 0.5
], dtype=torch.float64)


def feature(channels=3, batch=2, dtype=torch.float64, ties=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values, so most bins hold several maxima
        return torch.randint(0, 3, (batch, channels, H, W), generator=g).to(dtype)
    return torch.randn(batch, channels, H, W, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("scale,size", [(1.0, 2), (0.5, (3, 4)), (0.25, 7), (1 / 3, (2, 5))])
def test_forward_and_gradient_equal_torchvision(scale, size, ties):
    x = feature(ties=ties).requires_grad_(True)
    ours = roi_pool(x, BOXES, size, scale)
    theirs = tv_ops.roi_pool(x, BOXES, size, scale)
    assert torch.equal(ours, theirs)
    grad = torch.randn_like(ours)
    (g1,) = torch.autograd.grad(ours, x, grad)
    (g2,) = torch.autograd.grad(theirs, x, grad)
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-12)


def test_float32_channels_last_list_form_and_module():
    x = feature(5, dtype=torch.float32)
    boxes = BOXES.float()
    expected = tv_ops.roi_pool(x, boxes, 3, 0.5)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(roi_pool(x_cl, boxes, 3, 0.5), expected)
    per_image = [boxes[boxes[:, 0] == i, 1:] for i in range(2)]
    assert torch.equal(RoIPool(3, 0.5)(x, per_image), tv_ops.roi_pool(x, per_image, 3, 0.5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_corners_are_scaled_in_the_boxes_dtype(dtype):
    # 45 * 0.7 is 31.5 in float32 (rounds to 32) but 31.499... in double (rounds to 31)
    x = torch.arange(64 * 64.0).view(1, 1, 64, 64).to(dtype)
    starts = torch.arange(0, 50, 0.25, dtype=dtype)[:, None]
    boxes = torch.cat([torch.zeros_like(starts), starts, starts, starts + 10, starts + 7], 1)
    for scale in (0.7, 0.3, 1 / 3, 0.1):
        assert torch.equal(roi_pool(x, boxes, 2, scale), tv_ops.roi_pool(x, boxes, 2, scale))


def test_empty_bins_give_zero_and_no_gradient():
    x = feature().requires_grad_(True)
    out = roi_pool(x, BOXES[3:4], 2, 1.0)  # wholly outside the map
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_no_boxes():
    x = feature().requires_grad_(True)
    out = roi_pool(x, torch.zeros(0, 5, dtype=torch.float64), 7)
    assert out.shape == (0, 3, 7, 7)
    out.sum().backward()


@pytest.mark.parametrize("batch_index", [1.0, -1.0, 0.7])
def test_batch_indices_outside_the_batch_or_fractional_are_refused(batch_index):
    x = torch.arange(16.0).view(1, 1, 4, 4)
    with pytest.raises(ValueError, match=r"batch indices must be integers in \[0, 1\)"):
        roi_pool(x, torch.tensor([[batch_index, 0.0, 0, 1, 1]]), 1)
