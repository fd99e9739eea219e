import pytest
import torch
import torch.nn.functional as F

from maskrcnn.modeling.fpn import FPN, add_upsampled, pyramid_table
from maskrcnn.ops.winograd import use_winograd


@pytest.mark.parametrize("top_size,size", [((5, 7), (10, 14)), ((5, 7), (9, 13)), ((4, 4), (4, 4))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_add_upsampled_equals_nearest_interpolation_plus_add(top_size, size, channels_last):
    """Predicting (the broadcast path) and training: values and both gradients equal the
    upsample-then-add, exactly 2x or not."""
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    lateral = torch.randn(2, 3, *size, generator=g).to(memory_format=fmt).requires_grad_()
    top = torch.randn(2, 3, *top_size, generator=g).to(memory_format=fmt).requires_grad_()
    grad = torch.randn(2, 3, *size, generator=g)

    expected = lateral * 1 + F.interpolate(top, size=size, mode="nearest")
    with torch.no_grad():
        assert torch.equal(add_upsampled(lateral.detach().clone(), top.detach()), expected)
    got = add_upsampled(lateral * 1, top)
    assert torch.equal(got, expected)
    expected_grads = torch.autograd.grad(expected, (lateral, top), grad)
    got_grads = torch.autograd.grad(got, (lateral, top), grad)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("winograd", [False, True])
def test_predicting_writes_the_levels_into_one_table(winograd):
    """Predicting on channels-last maps, P2-P5 are views of one buffer, level after level, whose
    rows ``pyramid_table`` gives; their values are those of the maps computed one by one
    (training). NCHW maps, or autograd, give separate maps and no table."""
    torch.manual_seed(0)
    fpn = FPN([8, 16, 32, 64], out_channels=128).to(memory_format=torch.channels_last)
    if winograd:
        assert use_winograd(fpn) == 4
    g = torch.Generator().manual_seed(0)
    sizes = [(24, 36), (12, 18), (6, 9), (3, 5)]
    c = [torch.randn(2, ch, h, w, generator=g).contiguous(memory_format=torch.channels_last)
         for ch, (h, w) in zip([8, 16, 32, 64], sizes)]
    expected = fpn(c)  # autograd: one map at a time
    assert pyramid_table(expected[:4]) is None
    with torch.inference_mode():
        got = fpn(c)
        nchw = fpn([x.contiguous() for x in c])
    assert pyramid_table(nchw[:4]) is None
    table = pyramid_table(got[:4])
    assert table.shape == (2 * sum(h * w for h, w in sizes), 128)
    assert table.data_ptr() == got[0].data_ptr()
    rows = torch.cat([p.permute(0, 2, 3, 1).reshape(-1, 128) for p in got[:4]])
    assert torch.equal(table, rows)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 if winograd else 1e-6)
    assert pyramid_table(got[1:4]) is not None and pyramid_table([got[0], got[2]]) is None
