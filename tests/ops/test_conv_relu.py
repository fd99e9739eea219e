import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maskrcnn.ops.conv_relu import conv_relu
from maskrcnn.ops.winograd import WinogradConv2d


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
