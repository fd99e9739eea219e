import pytest
import torch

from maskrcnn.ops.linear_relu import fusable, linear_relu, packed

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="this build of PyTorch has no oneDNN")


@pytest.mark.parametrize("rows", [0, 1, 37])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_relu_equals_the_product_and_relu(rows, with_bias):
    torch.manual_seed(0)
    x, w, b = torch.randn(rows, 50), torch.randn(24, 50), torch.randn(24)
    bias = b if with_bias else None
    expected = torch.nn.functional.linear(x.double(), w.double(), b.double() if with_bias else None)
    with torch.no_grad():
        got = linear_relu(x, packed(w), bias)
    assert got.shape == (rows, 24) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected.clamp(min=0), rtol=1e-5, atol=1e-5)


def test_packed_weights_of_a_transposed_view_are_its_values():
    """``packed`` takes any (D_out, D_in) view, such as a transposed matrix."""
    torch.manual_seed(0)
    x, w = torch.randn(5, 8), torch.randn(8, 6)
    with torch.no_grad():
        torch.testing.assert_close(linear_relu(x, packed(w.t()), None), (x @ w).clamp(min=0))


def test_fusable_only_when_predicting_in_float32_on_the_cpu():
    x = torch.randn(3, 4)
    assert not fusable(x)  # autograd on
    with torch.no_grad():
        assert fusable(x)
        assert not fusable(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fusable(x)
    with torch.inference_mode():
        assert fusable(x)
