import pytest
import torch
import torch.nn.functional as F

from maskrcnn.modeling.fpn import add_upsampled


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
