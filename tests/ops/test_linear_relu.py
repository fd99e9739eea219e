import pytest
import torch

from maskrcnn.ops.linear_relu import (fusable, linear_relu, linear_relu_trained, onednn_float32,
                                      packed)

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
    assert onednn_float32(x) and not fusable(x)  # autograd on
    with torch.no_grad():
        assert fusable(x)
        assert not fusable(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fusable(x)
    with torch.inference_mode():
        assert fusable(x)


@pytest.mark.parametrize("with_bias", [True, False])
def test_trained_linear_relu_values_and_gradients_equal_the_layer_and_relu(with_bias):
    """Forward and the three gradients, through the ReLU (about half the outputs are cut),
    against float64 autograd of F.linear and a ReLU."""
    torch.manual_seed(0)
    x, w, b = torch.randn(37, 50), torch.randn(24, 50), torch.randn(24)
    grad = torch.randn(37, 24)
    results = []
    for dtype, fn in ((torch.float32, linear_relu_trained),
                      (torch.float64, lambda *a: torch.nn.functional.linear(*a).relu())):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, w, b)]
        y = fn(leaves[0], leaves[1], leaves[2] if with_bias else None)
        y.backward(grad.to(dtype))
        results.append([y] + [t.grad for t in leaves[:3 if with_bias else 2]])
    assert results[1][0].eq(0).float().mean().item() > 0.3  # the ReLU cuts some outputs
    for got, expected in zip(*results):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


def test_trained_linear_relu_with_no_rows_has_zero_weight_gradients():
    x = torch.zeros(0, 20, requires_grad=True)
    w, b = torch.randn(7, 20, requires_grad=True), torch.randn(7, requires_grad=True)
    y = linear_relu_trained(x, w, b)
    assert y.shape == (0, 7)
    y.sum().backward()
    assert x.grad.shape == (0, 20)
    assert torch.equal(w.grad, torch.zeros(7, 20)) and torch.equal(b.grad, torch.zeros(7))


def test_trained_linear_relu_skips_the_gradients_not_asked_for():
    torch.manual_seed(0)
    x, w = torch.randn(5, 8), torch.randn(6, 8, requires_grad=True)
    linear_relu_trained(x, w, None).sum().backward()
    assert x.grad is None and w.grad is not None
