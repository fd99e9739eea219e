"""The small-map weight gradient: the same gradients as autograd's convolution, taken only on
maps with few pixels, the same forward, and a conv that still becomes Winograd's to predict."""

import pytest
import torch
from torch import nn

from maskrcnn.ops import small_map_conv
from maskrcnn.ops.small_map_conv import SmallMapConv2d, use_small_map_conv, weight_grad_3x3
from maskrcnn.ops.winograd import WinogradConv2d, use_winograd


@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (1, 8, 1, 1), (3, 4, 6, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_weight_grad_3x3_is_the_convolutions_weight_gradient(shape, channels_last):
    torch.manual_seed(0)
    n, c_in, h, w = shape
    x = torch.randn(shape, dtype=torch.float64)
    conv = nn.Conv2d(c_in, 6, 3, padding=1, bias=False).double()
    if channels_last:
        x, conv = x.to(memory_format=torch.channels_last), conv.to(memory_format=torch.channels_last)
    grad_out = torch.randn(n, 6, h, w, dtype=torch.float64)
    expected, = torch.autograd.grad(conv(x), conv.weight, grad_out)
    torch.testing.assert_close(weight_grad_3x3(grad_out, x), expected, rtol=1e-12, atol=1e-12)


def counting(monkeypatch):
    calls = []
    real = small_map_conv.weight_grad_3x3
    monkeypatch.setattr(small_map_conv, "weight_grad_3x3", lambda *a: calls.append(1) or real(*a))
    return calls


def grads(conv, x):
    x = x.clone().requires_grad_()
    y = conv(x)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y).to(y.dtype))
    return y, x.grad, conv.weight.grad, conv.bias.grad


@pytest.mark.parametrize("batch, size, used", [(2, (4, 5), True), (2, (8, 9), False)])
def test_small_maps_train_with_the_same_outputs_and_gradients(monkeypatch, batch, size, used):
    """64 input channels: 2 maps of 4x5 (40 pixels) take the matrix product, 2 of 8x9 do not."""
    torch.manual_seed(0)
    plain = nn.Conv2d(64, 32, 3, padding=1).to(memory_format=torch.channels_last)
    fast = SmallMapConv2d.from_conv(nn.Conv2d(64, 32, 3, padding=1))
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(batch, 64, *size).to(memory_format=torch.channels_last)
    calls = counting(monkeypatch)
    y_fast, *g_fast = grads(fast, x)
    y_plain, *g_plain = grads(plain, x)
    assert bool(calls) == used
    assert torch.equal(y_fast, y_plain)
    for a, b in zip(g_fast, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_under_bf16_autocast_it_computes_as_autocast_does(monkeypatch):
    torch.manual_seed(0)
    plain = nn.Conv2d(64, 32, 3, padding=1).to(memory_format=torch.channels_last)
    fast = SmallMapConv2d.from_conv(nn.Conv2d(64, 32, 3, padding=1))
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(2, 64, 4, 5).to(memory_format=torch.channels_last)
    calls = counting(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_fast, *g_fast = grads(fast, x)
        y_plain, *g_plain = grads(plain, x)
    assert calls and y_fast.dtype == torch.bfloat16 and torch.equal(y_fast, y_plain)
    assert [g.dtype for g in g_fast] == [torch.float32] * 3
    for a, b in zip(g_fast, g_plain):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_predicting_and_frozen_weights_take_the_plain_conv(monkeypatch):
    conv = SmallMapConv2d.from_conv(nn.Conv2d(64, 8, 3, padding=1))
    x = torch.randn(1, 64, 3, 3)
    calls = counting(monkeypatch)
    with torch.no_grad():
        conv(x)
    conv.weight.requires_grad_(False)
    conv.bias.requires_grad_(False)
    conv(x.requires_grad_()).sum().backward()
    assert not calls and x.grad is not None


def test_use_small_map_conv_swaps_the_3x3_convs_and_they_still_become_winograds():
    model = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1), nn.Conv2d(128, 128, 3, stride=2, padding=1),
                          nn.Conv2d(128, 128, 1), nn.Conv2d(128, 128, 3, padding=1, bias=False))
    state = model.state_dict()
    assert use_small_map_conv(model) == 2
    assert [type(m) for m in model] == [SmallMapConv2d, nn.Conv2d, nn.Conv2d, SmallMapConv2d]
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert use_winograd(model) == 2 and isinstance(model[3], WinogradConv2d)
