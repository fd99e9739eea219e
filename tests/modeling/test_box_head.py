import torch
import torch.nn.functional as F

from maskrcnn.modeling.box_head import BoxHead


def _reference(head: BoxHead, x: torch.Tensor) -> torch.Tensor:
    """Both FC layers in float64 on the flattened (C, S, S) features."""
    h = F.linear(x.double().flatten(1), head.fc6.weight.double(), head.fc6.bias.double())
    return F.relu(F.linear(F.relu(h), head.fc7.weight.double(), head.fc7.bias.double()))


def test_channels_last_prediction_equals_the_flattened_product():
    """The fast path's product of channels-last rows by permuted weights equals the matrix
    product on the (C, S, S)-flattened features that training uses."""
    torch.manual_seed(0)
    head = BoxHead(8 * 7 * 7, 32)
    torch.nn.init.normal_(head.fc6.bias)
    x = torch.randn(5, 8, 7, 7)
    expected = _reference(head, x)
    with torch.no_grad():
        for layout in (torch.contiguous_format, torch.channels_last):
            got = head(x.contiguous(memory_format=layout))
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # with autograd the product runs as before and gradients reach fc6
    head(x.contiguous(memory_format=torch.channels_last)).sum().backward()
    assert head.fc6.weight.grad is not None


def test_the_permuted_weights_follow_changed_weights():
    torch.manual_seed(0)
    head = BoxHead(4 * 3 * 3, 6)
    x = torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        head(x)
        head.fc6.weight.mul_(-2)  # an in-place change, as loading a state dict makes
        torch.testing.assert_close(head(x).double(), _reference(head, x), rtol=1e-5, atol=1e-5)
