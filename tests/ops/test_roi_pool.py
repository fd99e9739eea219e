import pytest
import torch

tv_ops = pytest.importorskip("torchvision.ops")

from maskrcnn.ops import RoIPool, roi_pool  # noqa: E402
from test_roi_align import BOXES, feature  # noqa: E402


@pytest.mark.parametrize("scale,size", [(1.0, 2), (0.5, (3, 4)), (0.25, 7)])
def test_forward_and_gradient_equal_torchvision(scale, size):
    x = feature().requires_grad_(True)
    boxes = torch.cat([BOXES, torch.tensor([[0, 2.5, 3.5, 9.5, 7.5]], dtype=torch.float64)])
    ours = roi_pool(x, boxes, size, scale)
    theirs = tv_ops.roi_pool(x, boxes, size, scale)
    assert torch.equal(ours, theirs)
    grad = torch.randn_like(ours)
    (g1,) = torch.autograd.grad(ours, x, grad)
    (g2,) = torch.autograd.grad(theirs, x, grad)
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-12)
    torch.testing.assert_close(RoIPool(size, scale)(x, boxes), theirs)
