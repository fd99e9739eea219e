import pytest
import torch
from torch import nn

from maskrcnn.modeling.resnet import FrozenBatchNorm2d, ResNet, fold_norms, fuse_block_ends, residual_relu


@pytest.mark.parametrize("depth,groups,width,channels", [
    (18, 1, 64, [64, 128, 256, 512]),
    (34, 1, 64, [64, 128, 256, 512]),
    (50, 1, 64, [256, 512, 1024, 2048]),
    (101, 32, 8, [256, 512, 1024, 2048]),  # ResNeXt-101 32x8d
])
def test_stage_channels_and_strides(depth, groups, width, channels):
    body = ResNet(depth=depth, groups=groups, width_per_group=width, freeze_at=0)
    outs = body(torch.zeros(1, 3, 64, 96))
    assert [o.shape[1] for o in outs] == channels
    assert [o.shape[-2:] for o in outs] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    if groups > 1:
        assert body.layer1[0].conv2.groups == 32 and body.layer1[0].conv2.out_channels == 256


def test_stride_position_follows_config():
    msra = ResNet(depth=50, stride_in_1x1=True)
    v15 = ResNet(depth=50, stride_in_1x1=False)
    assert msra.layer2[0].conv1.stride == (2, 2) and msra.layer2[0].conv2.stride == (1, 1)
    assert v15.layer2[0].conv1.stride == (1, 1) and v15.layer2[0].conv2.stride == (2, 2)


def test_freeze_at_stops_gradients_and_statistics():
    body = ResNet(depth=18, norm="BN", freeze_at=2)
    assert not any(p.requires_grad for p in body.conv1.parameters())
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())
    assert isinstance(body.bn1, FrozenBatchNorm2d) and isinstance(body.layer1[0].bn1, FrozenBatchNorm2d)
    assert isinstance(body.layer2[0].bn1, torch.nn.BatchNorm2d)


def test_frozen_bn_is_the_batchnorm_affine_map():
    bn = torch.nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    frozen = FrozenBatchNorm2d(4)
    frozen.load_state_dict(bn.state_dict())
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(frozen(x), bn(x))


def test_folding_norms_keeps_outputs():
    torch.manual_seed(0)
    body = ResNet(depth=18, norm="BN", freeze_at=0)
    body.train()
    body(torch.randn(4, 3, 64, 64))  # give the BatchNorms non-trivial running statistics
    body.eval()
    x = torch.randn(2, 3, 64, 96)
    expected = body(x)
    assert fold_norms(body) == 20
    for a, b in zip(body(x), expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_folding_a_norm_without_affine_part_keeps_outputs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, affine=False))
    net.train()(torch.randn(4, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    expected = net.eval()(x)
    assert fold_norms(net) == 1 and isinstance(net[1], nn.Identity)
    torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stem_pools_before_its_relu_with_the_same_values_and_gradients(dtype):
    # Half the BN scales negative and an integer-valued input: many windows whose maximum is
    # <= 0, and ties, where the order of pooling and ReLU could show in the gradient.
    body = ResNet(depth=18, norm="BN", freeze_at=0).to(dtype)
    with torch.no_grad():
        body.bn1.weight.copy_(torch.linspace(-1, 1, 64))
        body.conv1.weight.copy_(torch.randint(-1, 2, body.conv1.weight.shape, dtype=dtype))
    x = torch.randint(0, 3, (2, 3, 32, 48)).to(dtype)

    def grads(stem):
        body.zero_grad()
        out = stem(x)
        (out * torch.linspace(-1, 2, out.numel(), dtype=dtype).view_as(out)).sum().backward()
        return out.detach(), body.conv1.weight.grad.clone(), body.bn1.weight.grad.clone()

    ours = grads(lambda t: body(t)[0])
    relu_first = grads(lambda t: body.layer1(body.maxpool(torch.relu(body.bn1(body.conv1(t))))))
    for a, b in zip(ours, relu_first):
        assert torch.equal(a, b)


@pytest.mark.parametrize("depth", [18, 50])
def test_fused_block_ends_keep_the_outputs(depth):
    """After fold_norms, the fused conv + sum + ReLU ends (one oneDNN call into the shortcut's
    memory) and the fused conv + ReLU inside the blocks give the plain path's stage outputs;
    they are taken only when predicting."""
    torch.manual_seed(0)
    net = ResNet(depth=depth, freeze_at=0).eval()
    for m in net.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2), m.running_mean.uniform_(-0.1, 0.1)
    fold_norms(net)
    net = net.to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 64, 96).contiguous(memory_format=torch.channels_last)
    expected = [t.detach() for t in net(x)]  # with autograd on: the plain ops
    blocks = sum(len(getattr(net, f"layer{i}")) for i in range(1, 5))
    assert fuse_block_ends(net) == blocks
    with torch.no_grad(), torch.profiler.profile() as prof:
        got = net(x)
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls["mkldnn::_convolution_pointwise_"] == blocks  # the ends, in place
    inner_relus = 1 if depth == 18 else 2  # BasicBlock: conv1; Bottleneck: conv1 and conv2
    assert calls["mkldnn::_convolution_pointwise"] == inner_relus * blocks
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    x.requires_grad_()
    net(x)[-1].sum().backward()  # autograd takes the plain ops
    assert x.grad is not None


def test_residual_relu_fused_writes_into_the_shortcut():
    conv = torch.nn.Conv2d(8, 16, 1).to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 5, 7).contiguous(memory_format=torch.channels_last)
    identity = torch.randn(2, 16, 5, 7).contiguous(memory_format=torch.channels_last)
    expected = torch.relu(conv(x) + identity).detach()
    with torch.no_grad():
        got = residual_relu(conv, torch.nn.Identity(), x, identity.clone(), fused=False)
        torch.testing.assert_close(got, expected)
        got = residual_relu(conv, torch.nn.Identity(), x, identity, fused=True)
    assert got.data_ptr() == identity.data_ptr()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
