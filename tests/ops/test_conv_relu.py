import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maskrcnn.ops import conv_relu as conv_relu_module
from maskrcnn.ops import winograd
from maskrcnn.ops.conv_relu import conv_relu, conv_relu_stack
from maskrcnn.ops.winograd import WinogradConv2d, conv3x3
from test_winograd import assert_winograd_close  # tests/ops is on the path: no package there


def _pointwise_calls(run):
    with torch.profiler.profile() as prof:
        out = run()
    return out, sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_convolution_pointwise")


@pytest.mark.parametrize("kernel, stride", [(1, 1), (3, 2), (7, 2)])
def test_conv_relu_fuses_a_plain_conv_with_the_same_values(kernel, stride):
    """Predicting on channels-last float32 maps, one oneDNN call with the ReLU as a post-op,
    equal bit for bit to the conv and the ReLU apart."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, kernel, stride, kernel // 2).to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 19, 23).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = F.relu(conv(x))
        got, calls = _pointwise_calls(lambda: conv_relu(conv, x))
    assert calls == 1
    assert torch.equal(got, expected)


def test_conv_relu_takes_the_plain_ops_under_autograd_or_in_the_default_layout():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 1)
    x = torch.randn(1, 8, 5, 6)
    got, calls = _pointwise_calls(lambda: conv_relu(conv, x))  # weights need gradients
    assert calls == 0 and got.requires_grad
    torch.testing.assert_close(got, F.relu(conv(x)))
    with torch.no_grad():
        assert _pointwise_calls(lambda: conv_relu(conv, x))[1] == 0  # not channels-last


def test_conv_relu_passes_the_relu_to_a_winograd_conv(monkeypatch):
    torch.manual_seed(0)
    conv = WinogradConv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(1, 8, 12, 12)
    seen = []
    monkeypatch.setattr(WinogradConv2d, "forward", lambda self, x, relu=False: seen.append(relu) or x)
    conv_relu(conv, x)
    assert seen == [True]


@pytest.mark.parametrize("r, h, w", [(12, 14, 14), (13, 14, 14), (14, 5, 7)])
def test_conv_relu_stack_of_a_mosaic_equals_one_map_at_a_time(r, h, w, monkeypatch):
    """Many small maps go through the convs as one mosaic (full rows of places and a partial
    last one), with the same result as each map alone, to Winograd's rounding. Each conv after
    the first writes into the previous conv's input where the channels match (not the fourth
    here, which has fewer outputs)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(r, 8, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    convs = [nn.Conv2d(8, 8, 3, padding=1) for _ in range(3)] + [nn.Conv2d(8, 6, 3, padding=1)]
    with torch.no_grad():
        for conv in convs:
            conv.bias.normal_(generator=g)  # the seams' nonzero biases must not leak
        expected = x.double()
        for conv in convs:
            expected = F.relu(F.conv2d(expected, conv.weight.double(), conv.bias.double(), padding=1))
        fast = [WinogradConv2d.from_conv(c) for c in convs]
        inputs, outs = [], []

        def watched(x, *a):
            inputs.append(x)
            outs.append(a[3] if len(a) > 3 else None)
            return conv3x3(x, *a)

        monkeypatch.setattr(winograd, "conv3x3", watched)
        monkeypatch.setattr(winograd, "_FIRST_CALL_PIXELS", 0)  # every call Winograd's
        got = conv_relu_stack(x, fast)
    rows = -(-r // 3)
    assert [t.shape for t in inputs] == [(1, 8, rows * (h + 1) - 1, 3 * (w + 1) - 1)] * 4
    assert outs[0] is None and outs[3] is None
    assert [outs[1].data_ptr(), outs[2].data_ptr()] == [inputs[0].data_ptr(), inputs[1].data_ptr()]
    assert got.shape == (r, 6, h, w) and got.is_contiguous(memory_format=torch.channels_last)
    assert_winograd_close(got.double(), expected)


def test_a_small_mosaics_first_pass_is_direct_with_the_same_maps(monkeypatch):
    """14 maps of 5x7 make a mosaic of 29x23 pixels, under ``_FIRST_CALL_PIXELS``: fresh convs
    run it direct (no Winograd filters), seams and all, and give each map's own result."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(14, 8, 5, 7, generator=g).contiguous(memory_format=torch.channels_last)
    convs = [nn.Conv2d(8, 8, 3, padding=1) for _ in range(2)]
    calls = []
    monkeypatch.setattr(winograd, "conv3x3", lambda *a: calls.append(1) or conv3x3(*a))
    with torch.no_grad():
        for conv in convs:
            conv.bias.normal_(generator=g)
        expected = x
        for conv in convs:
            expected = F.relu(conv(expected))
        got = conv_relu_stack(x, [WinogradConv2d.from_conv(c) for c in convs])
    assert not calls
    torch.testing.assert_close(got, expected)


def test_conv_relu_stack_goes_one_map_at_a_time_for_few_maps_or_in_training(monkeypatch):
    convs = [WinogradConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1))]
    calls = []
    monkeypatch.setattr(conv_relu_module, "to_mosaic", lambda *a, f=winograd.to_mosaic: calls.append(1) or f(*a))
    x = torch.randn(conv_relu_module._MOSAIC_MIN_MAPS, 4, 6, 6)
    with torch.no_grad():
        conv_relu_stack(x[:-1], convs)
        assert conv_relu_stack(x, []) is x  # no convs (the C4 mask head)
    conv_relu_stack(x.requires_grad_(), convs).sum().backward()
    assert not calls and convs[0].weight.grad is not None
    with torch.no_grad():
        conv_relu_stack(x, convs)
    assert calls == [1]
