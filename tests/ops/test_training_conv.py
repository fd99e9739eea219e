"""The training convs: the same values and gradients as autograd's convolution, by Winograd on
large maps with many channels, with the weight gradient by either way of the products or by
Winograd's transforms (taken on maps with few pixels, and on every map where AVX2 is the
widest; with stride 2, the patches' product), both gradients from the pixels where the
output's gradient is nonzero, and a conv that still becomes Winograd's to predict."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maskrcnn.ops import training_conv
from maskrcnn.ops.training_conv import TrainingConv2d, use_training_convs
from maskrcnn.ops.winograd import WinogradConv2d, use_winograd


@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (1, 8, 1, 1), (3, 4, 6, 2), (1, 16, 2, 3),
                                   (2, 3, 1, 5), (2, 3, 5, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("way", ["weight_grad_3x3", "_by_patches", "_by_shifts"])
def test_weight_grad_3x3_is_the_convolutions_weight_gradient(shape, channels_last, way):
    """Both ways (and the choice between them, patches when N H W <= C_in) on batches of maps
    down to one pixel wide or high, where the shifted windows run into the next map."""
    torch.manual_seed(0)
    n, c_in, h, w = shape
    x = torch.randn(shape, dtype=torch.float64)
    conv = nn.Conv2d(c_in, 6, 3, padding=1, bias=False).double()
    if channels_last:
        x, conv = x.to(memory_format=torch.channels_last), conv.to(memory_format=torch.channels_last)
    grad_out = torch.randn(n, 6, h, w, dtype=torch.float64)
    expected, = torch.autograd.grad(conv(x), conv.weight, grad_out)
    got = getattr(training_conv, way)(grad_out, x)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (1, 8, 1, 1), (3, 4, 6, 2), (2, 3, 1, 5), (2, 3, 8, 9)])
@pytest.mark.parametrize("way", ["weight_grad_3x3", "_by_patches"])
def test_stride_2_weight_grad_is_the_convolutions_weight_gradient(shape, way):
    """Odd and even sizes (the last output pixel's neighbourhood in the padding or not), maps
    one pixel wide or high, and a float32 map a tile wide, which with stride 1 would take
    Winograd's transforms."""
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64).to(memory_format=torch.channels_last)
    conv = nn.Conv2d(shape[1], 6, 3, stride=2, padding=1, bias=False).double()
    y = conv(x)
    grad_out = torch.randn(y.shape, dtype=torch.float64)
    expected, = torch.autograd.grad(y, conv.weight, grad_out)
    got = getattr(training_conv, way)(grad_out, x, 2)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (1, 8, 1, 1), (3, 4, 6, 2), (2, 3, 1, 5), (2, 3, 5, 1)])
@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
def test_grads_at_pixels_are_the_convolutions_gradients(shape, share):
    """Output gradients nonzero at none, some or all pixels, on maps down to one pixel wide or
    high, whose neighbourhoods run over every edge."""
    torch.manual_seed(0)
    n, c_in, h, w = shape
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, c_in, 3, 3, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(n, 6, h, w, dtype=torch.float64) * (torch.rand(n, 1, h, w) < share)
    expected = torch.autograd.grad(nn.functional.conv2d(x, weight, padding=1), (x, weight), grad_out)
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    pixels = training_conv._nonzero_pixels(grad_out)
    assert len(pixels) == int((grad_out != 0).any(1).sum())
    got = training_conv.grads_at_pixels(grad_out, x.detach(), weight.detach(), pixels, True)
    for a, b in zip(got, expected):
        assert a.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert training_conv.grads_at_pixels(grad_out, x.detach(), weight.detach(), pixels, False)[0] is None


def counting(monkeypatch, name="weight_grad_3x3"):
    """The calls of ``training_conv``'s function ``name``, which still runs."""
    calls = []
    real = getattr(training_conv, name)
    monkeypatch.setattr(training_conv, name, lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("shape, dtype, way", [
    ((2, 8, 8, 9), torch.float32, "conv3x3_weight_grad"), ((2, 8, 4, 4), torch.float32, "conv3x3_weight_grad"),
    ((2, 8, 3, 9), torch.float32, "_by_shifts"), ((2, 8, 8, 9), torch.float64, "_by_shifts"),
    ((1, 64, 4, 5), torch.float32, "_by_patches")])
def test_weight_grad_3x3_takes_winograd_on_float32_maps_a_tile_wide(monkeypatch, shape, dtype, way):
    """Float32 maps at least 4 pixels high and wide take Winograd's weight gradient; thinner
    ones and other dtypes the shifted products, and batches with no more pixels than input
    channels the patches' product."""
    calls = {name: counting(monkeypatch, name) for name in ("conv3x3_weight_grad", "_by_shifts", "_by_patches")}
    x = torch.randn(shape, dtype=dtype)
    training_conv.weight_grad_3x3(torch.randn(shape[0], 6, *shape[2:], dtype=dtype), x)
    assert {name for name, c in calls.items() if c} == {way}


def plain_and_training_conv(c_in, c_out, stride=1):
    """A channels-last 3x3 ``nn.Conv2d`` and a ``TrainingConv2d`` with the same parameters."""
    plain = nn.Conv2d(c_in, c_out, 3, stride, padding=1).to(memory_format=torch.channels_last)
    fast = TrainingConv2d.from_conv(nn.Conv2d(c_in, c_out, 3, stride, padding=1))
    fast.load_state_dict(plain.state_dict())
    return plain, fast


def grads(conv, x):
    x = x.clone().requires_grad_()
    y = conv(x)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y).to(y.dtype))
    return y, x.grad, conv.weight.grad, conv.bias.grad


@pytest.mark.parametrize("avx2_only, size, used", [(False, (4, 5), True), (False, (8, 9), False),
                                                  (True, (8, 9), True)])
@pytest.mark.parametrize("stride", [1, 2])
def test_training_takes_weight_grad_3x3_with_the_same_outputs_and_gradients(monkeypatch, avx2_only, size, used,
                                                                            stride):
    """64 input channels: 2 maps of 4x5 (40 pixels) take ``weight_grad_3x3`` (the patches'
    product), 2 of 8x9 (Winograd's transforms with stride 1, the patches' product with stride
    2) only on a CPU whose widest vectors are AVX2's."""
    monkeypatch.setattr(training_conv, "AVX2_ONLY", avx2_only)
    torch.manual_seed(0)
    plain, fast = plain_and_training_conv(64, 32, stride)
    x = torch.randn(2, 64, *size).to(memory_format=torch.channels_last)
    calls = counting(monkeypatch)
    y_fast, *g_fast = grads(fast, x)
    y_plain, *g_plain = grads(plain, x)
    assert bool(calls) == used
    assert torch.equal(y_fast, y_plain)
    for a, b in zip(g_fast, g_plain):  # float32 sums in another order, or rounded as Winograd's
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def sparse_grads(monkeypatch, c_in, c_out, x, grad_out, bf16=False):
    """The gradients (x, weight, bias) of a ``sparse_grad`` training conv and of the plain conv
    with the same parameters, whose output's gradient is ``grad_out``; and the calls of
    ``grads_at_pixels``."""
    torch.manual_seed(0)
    plain, fast = plain_and_training_conv(c_in, c_out)
    fast.sparse_grad = True
    calls = counting(monkeypatch, "grads_at_pixels")
    results = []
    for conv in (fast, plain):
        x_ = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = conv(x_)
        y.backward(grad_out.to(y.dtype))
        results.append((x_.grad, conv.weight.grad, conv.bias.grad))
    return *results, calls


@pytest.mark.parametrize("share, used", [(0.1, True), (0.25, True), (0.5, False)])
def test_a_sparse_grad_conv_takes_its_gradients_at_the_nonzero_pixels_when_few(monkeypatch, share, used):
    """``sparse_grad``: gradients nonzero at 10% or 25% of the pixels take ``grads_at_pixels``,
    at half of them the dense path; either way the plain conv's gradients."""
    monkeypatch.setattr(training_conv, "AVX2_ONLY", False)
    torch.manual_seed(1)
    x = torch.randn(2, 16, 10, 12).to(memory_format=torch.channels_last)
    grad_out = torch.zeros(2, 8, 10, 12)
    grad_out.view(2, 8, -1)[:, :, :int(share * 120)] = torch.randn(2, 8, int(share * 120))
    fast, plain, calls = sparse_grads(monkeypatch, 16, 8, x, grad_out)
    assert bool(calls) == used
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_sparse_grad_conv_under_bf16_autocast_gives_the_plain_convs_gradients(monkeypatch):
    """Under bf16 autocast the gradients from the nonzero pixels are the plain conv's, in
    float32, to bf16 rounding."""
    torch.manual_seed(1)
    x = torch.randn(2, 64, 8, 10).to(memory_format=torch.channels_last)
    grad_out = torch.zeros(2, 32, 8, 10)
    grad_out[:, :, 2:4, 3:6] = torch.randn(2, 32, 2, 3)
    fast, plain, calls = sparse_grads(monkeypatch, 64, 32, x, grad_out, bf16=True)
    assert calls and [g.dtype for g in fast] == [torch.float32] * 3
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())


def test_under_bf16_autocast_it_computes_as_autocast_does(monkeypatch):
    torch.manual_seed(0)
    plain, fast = plain_and_training_conv(64, 32)
    x = torch.randn(2, 64, 4, 5).to(memory_format=torch.channels_last)
    calls = counting(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_fast, *g_fast = grads(fast, x)
        y_plain, *g_plain = grads(plain, x)
    assert calls and y_fast.dtype == torch.bfloat16 and torch.equal(y_fast, y_plain)
    assert [g.dtype for g in g_fast] == [torch.float32] * 3
    for a, b in zip(g_fast, g_plain):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_float64_gradients_are_the_convolutions_to_float64_rounding():
    torch.manual_seed(0)
    conv = TrainingConv2d.from_conv(nn.Conv2d(40, 4, 3, padding=1).double())
    x = torch.randn(1, 40, 3, 3, dtype=torch.float64, requires_grad=True)
    y = conv(x)
    grad_out = torch.randn_like(y)
    params = (x, conv.weight, conv.bias)
    got = torch.autograd.grad(y, params, grad_out)
    expected = torch.autograd.grad(F.conv2d(x, conv.weight, conv.bias, padding=1), params, grad_out)
    for a, b in zip(got, expected):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_predicting_and_frozen_weights_take_the_plain_conv(monkeypatch):
    conv = TrainingConv2d.from_conv(nn.Conv2d(64, 8, 3, padding=1))
    x = torch.randn(1, 64, 3, 3)
    calls = counting(monkeypatch)
    with torch.no_grad():
        conv(x)
    conv.weight.requires_grad_(False)
    conv.bias.requires_grad_(False)
    conv(x.requires_grad_()).sum().backward()
    assert not calls and x.grad is not None


def test_use_training_convs_swaps_the_3x3_convs_and_they_still_become_winograds():
    """3x3 convs with padding 1 and stride 1 or 2 train as ``TrainingConv2d``; those with stride 1
    still become Winograd's to predict."""
    model = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1), nn.Conv2d(128, 128, 3, stride=2, padding=1),
                          nn.Conv2d(128, 128, 1), nn.Conv2d(128, 128, 3, padding=1, bias=False),
                          nn.Conv2d(128, 128, 3, stride=2), nn.Conv2d(128, 128, 3, stride=3, padding=1))
    state = model.state_dict()
    assert use_training_convs(model) == 3
    assert [type(m) for m in model] == [TrainingConv2d, TrainingConv2d, nn.Conv2d, TrainingConv2d,
                                        nn.Conv2d, nn.Conv2d]
    assert model[1].stride == (2, 2)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert use_winograd(model) == 2 and isinstance(model[3], WinogradConv2d)
    assert type(model[1]) is TrainingConv2d


@pytest.mark.parametrize("avx2_only", [False, True])
def test_large_maps_train_by_winograd_with_the_convs_values_and_gradients(monkeypatch, avx2_only):
    """128 channels on a 64x64 map (4096 pixels): forward and data gradient by Winograd, the
    weight gradient by ``weight_grad_3x3`` (Winograd's too) on every CPU."""
    monkeypatch.setattr(training_conv, "AVX2_ONLY", avx2_only)
    torch.manual_seed(0)
    plain, fast = plain_and_training_conv(128, 128)
    x = torch.randn(1, 128, 64, 64).to(memory_format=torch.channels_last)
    winograd, products = counting(monkeypatch, "conv3x3"), counting(monkeypatch)
    y_fast, *g_fast = grads(fast, x)
    y_plain, *g_plain = grads(plain, x)
    assert len(winograd) == 2 and len(products) == 1
    assert y_fast.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip([y_fast, *g_fast], [y_plain, *g_plain]):  # Winograd rounds to ~1e-5 of the scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("shape, out_channels, pays", [
    ((4, 128, 16, 22), 128, True),  # whole tiles but the last column's: 1.09x the pixels
    ((4, 128, 16, 16), 256, True),  # 1024 pixels of whole tiles
    ((2, 128, 16, 16), 256, False),  # 512 pixels: too few
    ((8, 128, 14, 14), 128, False),  # tiles of 16x16, 1.31x the pixels: too many for 128 channels
    ((8, 256, 14, 14), 256, True),  # ... but not for 256
    ((8, 256, 14, 14), 128, False),  # the narrower side counts
    ((4, 64, 64, 88), 64, False),  # 64 channels never
    ((4, 512, 8, 11), 512, False),  # 352 pixels
    ((8, 256, 64, 3), 256, False),  # thinner than a tile
])
def test_winograd_weight_gradient_rule_on_avx512(shape, out_channels, pays):
    assert training_conv._winograd_grad_pays(torch.empty(shape), out_channels) == pays
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not training_conv._winograd_grad_pays(torch.empty(shape), out_channels)


@pytest.mark.parametrize("shape, autocast", [((1, 128, 32, 32), False), ((1, 64, 64, 64), False),
                                             ((4, 128, 64, 3), False), ((1, 128, 64, 64), True)])
def test_small_thin_or_narrow_maps_and_autocast_keep_the_direct_conv(monkeypatch, shape, autocast):
    """1024 pixels, 64 channels, maps thinner than a tile, and bf16 autocast: no Winograd."""
    conv = TrainingConv2d.from_conv(nn.Conv2d(shape[1], shape[1], 3, padding=1))
    winograd = counting(monkeypatch, "conv3x3")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        conv(torch.randn(shape).requires_grad_()).float().sum().backward()
    assert not winograd and conv.weight.grad is not None
