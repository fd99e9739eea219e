import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maskrcnn.ops import winograd
from maskrcnn.ops.winograd import WinogradConv2d, conv3x3, use_winograd, winograd_weights


def assert_winograd_close(got, expected):
    """Equal to Winograd's rounding: 2e-5 of the output's scale (the worst seen is about 8e-6)."""
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5 * expected.abs().max().item())


@pytest.mark.parametrize("shape", [(1, 8, 16, 20), (3, 8, 14, 14), (2, 8, 9, 13), (1, 8, 1, 2),
                                   (5, 8, 3, 6)])
@pytest.mark.parametrize("chunk", [1, 3, 192])
def test_conv3x3_equals_the_direct_convolution(shape, chunk, monkeypatch):
    """Any size (partial last tiles, several images per chunk, chunks across rows), with and
    without bias, with and without the ReLU, to float32 rounding; output in channels-last
    memory."""
    monkeypatch.setattr(winograd, "_TILES_PER_CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(6, shape[1], 3, 3, generator=g)
    bias = torch.randn(6, generator=g)
    for b, relu in ((None, False), (bias, False), (bias, True)):
        expected = F.conv2d(x.double(), weight.double(), None if b is None else b.double(), padding=1)
        got = conv3x3(x, winograd_weights(weight), b, relu)
        assert got.shape == expected.shape
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert_winograd_close(got.double(), expected.relu() if relu else expected)


@pytest.mark.parametrize("shape", [(1, 8, 16, 20), (3, 8, 14, 14), (2, 8, 9, 13), (1, 8, 1, 2),
                                   (5, 8, 3, 6), (0, 8, 9, 13)])
@pytest.mark.parametrize("chunk", [1, 3, 192])
def test_conv3x3_weight_grad_is_the_convolutions_weight_gradient(shape, chunk, monkeypatch):
    """The convolution's sizes and chunks and an empty batch, against autograd's float64
    gradient, to Winograd's rounding; 5 input and 6 output channels; channels-last, from either
    layout."""
    monkeypatch.setattr(winograd, "_TILES_PER_CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    n, _, h, w = shape
    x = torch.randn(n, 5, h, w, generator=g)
    grad_out = torch.randn(n, 6, h, w, generator=g)
    weight = torch.zeros(6, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    expected, = torch.autograd.grad(F.conv2d(x.double(), weight, padding=1), weight, grad_out.double())
    for layout in (torch.contiguous_format, torch.channels_last):
        x_, grad_out_ = (t.contiguous(memory_format=layout) for t in (x, grad_out))
        got = winograd.conv3x3_weight_grad(x_, grad_out_)
        assert got.shape == expected.shape and got.is_contiguous(memory_format=torch.channels_last)
        assert_winograd_close(got.double(), expected)


def test_conv3x3_reads_contiguous_input_too():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 7, 9, generator=g)
    weight = torch.randn(4, 4, 3, 3, generator=g)
    expected = F.conv2d(x, weight, padding=1)
    assert_winograd_close(conv3x3(x, winograd_weights(weight)), expected)


def test_conv3x3_writes_into_a_given_output():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 7, 9, generator=g).contiguous(memory_format=torch.channels_last)
    u, bias = winograd_weights(torch.randn(5, 4, 3, 3, generator=g)), torch.randn(5, generator=g)
    out = torch.full((2, 5, 7, 9), float("nan")).contiguous(memory_format=torch.channels_last)
    got = conv3x3(x, u, bias, True, out)
    assert got is out
    torch.testing.assert_close(got, conv3x3(x, u, bias, True), rtol=0, atol=0)


def test_use_winograd_swaps_only_eligible_convs_and_keeps_the_state_dict():
    model = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1), nn.Conv2d(128, 128, 3, 2, 1),
                          nn.Conv2d(128, 128, 1), nn.Conv2d(64, 64, 3, padding=1),
                          nn.Conv2d(128, 128, 3, padding=1, bias=False))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_winograd(model) == 2
    assert [type(m) is WinogradConv2d for m in model] == [True, False, False, False, True]
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_winograd_conv_runs_winograd_only_without_autograd(monkeypatch):
    """Predicting on float32 CPU tensors takes the Winograd path; a backward pass, autocast,
    other dtypes and maps thinner than a tile take the plain conv, so training through the
    module is unchanged."""
    conv = nn.Conv2d(8, 8, 3, padding=1)
    fast = WinogradConv2d.from_conv(conv)
    calls = []
    monkeypatch.setattr(winograd, "conv3x3", lambda *a: calls.append(1) or conv3x3(*a))
    monkeypatch.setattr(winograd, "_FIRST_CALL_PIXELS", 0)  # a first call on a small map: below
    x = torch.randn(1, 8, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_winograd_close(fast(x), conv(x))
        assert_winograd_close(fast(x, relu=True), F.relu(conv(x)))
    assert len(calls) == 2
    y = fast(x.requires_grad_(), relu=True)
    assert torch.equal(y, F.relu(conv(x)))
    y.sum().backward()
    assert len(calls) == 2 and conv.weight.grad is not None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast(x).dtype == torch.bfloat16
    with torch.no_grad():
        fast(x[:, :, :3])  # thinner than a tile
        fast(x[:, :, :, :3])
        fast.double()(x.double())
    assert len(calls) == 2


def test_a_first_call_on_a_small_map_is_direct_and_transforms_no_filters(monkeypatch):
    """Fewer than 2048 pixels: the first call takes the plain conv and leaves the filters
    untransformed; the next call on the same map is Winograd's. A first call on a larger
    batch is Winograd's at once."""
    made, real = [], winograd.winograd_weights
    monkeypatch.setattr(winograd, "winograd_weights", lambda *a: made.append(1) or real(*a))
    conv = nn.Conv2d(8, 8, 3, padding=1)
    g = torch.Generator().manual_seed(0)
    small, large = torch.randn(1, 8, 32, 63, generator=g), torch.randn(1, 8, 32, 64, generator=g)
    with torch.no_grad():
        fast = WinogradConv2d.from_conv(conv)
        assert torch.equal(fast(small, relu=True), F.relu(conv(small)))  # 2016 pixels
        assert len(made) == 0
        assert_winograd_close(fast(small), conv(small))
        assert len(made) == 1
        fast = WinogradConv2d.from_conv(conv)
        assert_winograd_close(fast(large), conv(large))  # 2048 pixels
        assert len(made) == 2


def test_transformed_weights_follow_in_place_weight_changes():
    conv = WinogradConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = conv(x)
        conv.weight.mul_(2)
        expected = F.conv2d(x, conv.weight, conv.bias, padding=1)
        # the stale filters would be off by the whole weighted sum, far above Winograd's rounding
        assert (before - expected).abs().max() > 0.1 * expected.abs().max()
        assert_winograd_close(conv(x), expected)


def test_mosaic_places_maps_between_zero_seams_and_gives_them_back():
    x = torch.arange(1.0, 1 + 4 * 2 * 2 * 3).view(4, 2, 2, 3)  # (R, C, H, W)
    mosaic = winograd.to_mosaic(x, across=3)
    assert mosaic.shape == (1, 2, 2 * 3 - 1, 3 * 4 - 1)
    assert torch.equal(mosaic[0, :, :2, 4:7], x[1]) and torch.equal(mosaic[0, :, 3:, :3], x[3])
    assert mosaic[0, :, 2].abs().sum() == 0 and mosaic[0, :, :, 3].abs().sum() == 0  # seams
    assert mosaic[0, :, 3:, 4:].abs().sum() == 0  # the places after the last map
    assert torch.equal(winograd.from_mosaic(mosaic, 4, 2, 3), x)
