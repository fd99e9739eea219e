import importlib
import itertools

import pytest
import torch

tv_ops = pytest.importorskip("torchvision.ops")

from maskrcnn.ops import RoIAlign, roi_align  # noqa: E402

roi_align_module = importlib.import_module("maskrcnn.ops.roi_align")  # the package re-exports the name

H, W = 10, 13  # non-square on purpose
# (batch, x1, y1, x2, y2) in feature cells, before any half-pixel shift
CELL_BOXES = torch.tensor([
    [0, 1.3, 2.2, 7.7, 8.1],      # inside
    [1, -3.0, -2.0, 5.0, 4.0],    # partly outside (top-left)
    [0, 10.0, 3.0, 20.0, 30.0],   # partly outside (bottom-right)
    [1, -30.0, -30.0, -20.0, -20.0],  # wholly outside
    [0, 2.0, 2.0, 2.0, 6.0],      # zero width
    [1, 3.0, 5.0, 9.0, 5.0],      # zero height
    [1, 4.0, 4.0, 4.0, 4.0],      # a point
    [0, 3.0, 1.0, 2.5, 9.0],      # x2 < x1
    [1, -2.0, -2.0, 0.0, 0.0],    # centre on -1: middle samples land exactly on -1
    [0, -4.0, -4.0, 2.0, 2.0],    # centre on -1, wider
    [0, 12.0, 9.0, 14.0, 11.0],   # centre on (W, H): middle samples land exactly on W and H
    [1, 10.0, 7.0, 16.0, 13.0],   # centre on (W, H), wider
    [1, 0.0, 0.0, 13.0, 10.0],    # whole map
], dtype=torch.float64)


def rois_for(aligned, scale, cell_boxes=CELL_BOXES):
    """Image-pixel boxes whose samples land where ``cell_boxes`` says after scaling and shifting."""
    rois = cell_boxes.clone()
    rois[:, 1:] = (rois[:, 1:] + (0.5 if aligned else 0.0)) / scale
    return rois


def feature(channels=3, batch=2, dtype=torch.float64, seed=0, hw=(H, W)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, *hw, generator=g, dtype=torch.float64).to(dtype)


def max_error(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("ratio", [-1, 0, 1, 2, 4])
@pytest.mark.parametrize("scale,size", [(1.0, (1, 1)), (1.0, (3, 3)), (0.25, (3, 5)),
                                        (1 / 16, (7, 7)), (0.3, (2, 4))])
def test_forward_equals_torchvision_in_float64(aligned, ratio, scale, size):
    x = feature()
    rois = rois_for(aligned, scale)
    expected = tv_ops.roi_align(x, rois, size, scale, ratio, aligned)
    assert max_error(roi_align(x, rois, size, scale, ratio, aligned), expected) < 1e-10


def test_samples_on_the_border_follow_the_reference_rule():
    x = torch.arange(1.0, 1.0 + H * W, dtype=torch.float64).view(1, 1, H, W)

    def one_sample(cx, cy):  # a single sample (1x1 output, ratio 1) at (cx, cy)
        box = torch.tensor([[0, cx - 1, cy - 1, cx + 1, cy + 1]], dtype=torch.float64)
        return roi_align(x, box, 1, 1.0, 1, False).item()

    assert one_sample(-1.0, -1.0) == x[0, 0, 0, 0]  # exactly -1: clamped to the edge cell
    assert one_sample(-1.0 - 1e-9, 2.0) == 0.0  # just beyond: contributes nothing
    assert one_sample(float(W), float(H)) == x[0, 0, H - 1, W - 1]  # exactly (W, H): edge cell
    assert one_sample(float(W) + 1e-9, 3.0) == 0.0
    assert one_sample(2.5, 3.25) == pytest.approx(1 + 3.25 * W + 2.5)  # plain bilinear inside


@pytest.mark.parametrize("channels,batch", [(1, 1), (3, 2), (16, 3)])
def test_random_boxes_channels_and_batches(channels, batch):
    g = torch.Generator().manual_seed(channels)
    x = feature(channels, batch, seed=channels, hw=(17, 11))
    xy = torch.rand(60, 2, generator=g, dtype=torch.float64) * 60 - 12
    wh = torch.rand(60, 2, generator=g, dtype=torch.float64) * 40
    idx = torch.randint(0, batch, (60, 1), generator=g).double()
    rois = torch.cat([idx, xy, xy + wh], 1)
    for aligned, ratio in itertools.product([False, True], [-1, 0, 2]):
        expected = tv_ops.roi_align(x, rois, (4, 3), 0.25, ratio, aligned)
        assert max_error(roi_align(x, rois, (4, 3), 0.25, ratio, aligned), expected) < 1e-10


def test_list_of_boxes_form_and_module():
    x = feature()
    rois = rois_for(True, 0.5)
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    expected = tv_ops.roi_align(x, per_image, 3, 0.5, 2, True)
    assert max_error(roi_align(x, per_image, 3, 0.5, 2, True), expected) < 1e-10
    module = RoIAlign((3, 3), spatial_scale=0.5, sampling_ratio=2, aligned=True)
    assert max_error(module(x, per_image), expected) < 1e-10
    assert "aligned=True" in repr(module)


def test_float32_half_and_channels_last():
    x = feature(8)
    rois = rois_for(False, 0.5)
    expected = tv_ops.roi_align(x, rois, 5, 0.5, -1, False)
    x32 = x.float()
    got = roi_align(x32, rois.float(), 5, 0.5, -1, False)
    assert got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)
    x_cl = x32.contiguous(memory_format=torch.channels_last)
    got_cl = roi_align(x_cl, rois.float(), 5, 0.5, -1, False)
    assert got_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got_cl, expected.float(), rtol=1e-5, atol=1e-5)
    got_half = roi_align(x.half(), rois.half(), 5, 0.5, -1, False)
    assert got_half.dtype == torch.float16
    torch.testing.assert_close(got_half.float(), expected.float(), rtol=1e-2, atol=1e-2)


def test_no_boxes_gives_an_empty_output_that_still_backpropagates():
    x = feature().requires_grad_(True)
    out = roi_align(x, torch.zeros(0, 5, dtype=torch.float64), 7)
    assert out.shape == (0, 3, 7, 7)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_boxes_all_outside_the_map_give_zeros_and_no_gradient():
    x = feature().requires_grad_(True)
    rois = torch.tensor([[0, -30.0, -30.0, -20.0, -20.0], [1, 40.0, 40.0, 50.0, 50.0]], dtype=torch.float64)
    out = roi_align(x, rois, 2, 1.0, 2, False)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_bad_batch_index_is_an_error():
    with pytest.raises(ValueError, match="batch indices"):
        roi_align(feature(), torch.tensor([[2.0, 0, 0, 4, 4]], dtype=torch.float64), 2)


@pytest.mark.parametrize("aligned,ratio,scale", [(False, -1, 0.5), (True, 0, 0.25), (False, 2, 1.0),
                                                 (True, 1, 1 / 16), (True, 4, 0.5)])
def test_gradient_equals_torchvision_and_passes_gradcheck(aligned, ratio, scale):
    x = feature().requires_grad_(True)
    rois = rois_for(aligned, scale).requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(len(rois), 3, 3, 4, generator=g, dtype=torch.float64)
    ours = roi_align(x, rois, (3, 4), scale, ratio, aligned)
    (ours_grad,) = torch.autograd.grad(ours, x, grad_out)
    theirs = tv_ops.roi_align(x, rois.detach(), (3, 4), scale, ratio, aligned)
    (theirs_grad,) = torch.autograd.grad(theirs, x, grad_out)
    assert max_error(ours_grad, theirs_grad) < 1e-10
    assert torch.autograd.gradcheck(lambda t: roi_align(t, rois.detach(), (3, 4), scale, ratio, aligned),
                                    (x,), fast_mode=True)


def test_full_gradcheck_on_a_small_map():
    x = feature(2, 2, hw=(5, 6)).requires_grad_(True)
    rois = torch.tensor([[0, -0.7, 0.4, 3.3, 4.9], [1, 2.0, -1.0, 7.0, 2.5], [1, 4.5, 4.5, 4.5, 6.0]],
                        dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, (2, 3), 1.0, -1, False), (x,))


def test_boxes_get_no_gradient():
    x = feature().requires_grad_(True)
    rois = rois_for(False, 1.0).requires_grad_(True)
    roi_align(x, rois, 2, 1.0, 2, False).sum().backward()
    assert rois.grad is None and x.grad is not None


def test_channels_last_gradient_equals_torchvision():
    x = feature(6).float()
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    x = x.requires_grad_(True)
    rois = rois_for(True, 0.5).float()
    grad_out = torch.randn(len(rois), 6, 2, 2)
    (ours,) = torch.autograd.grad(roi_align(x_cl, rois, 2, 0.5, 0, True), x_cl, grad_out)
    (theirs,) = torch.autograd.grad(tv_ops.roi_align(x, rois, 2, 0.5, 0, True), x, grad_out)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def gpu_form(x, rois, size, *args):
    """RoIAlign as CUDA tensors take it (fixed-size bags), run on the CPU."""
    return roi_align_module._roi_align_bags(x, rois, (size, size), *args)


@pytest.mark.parametrize("pool", [roi_align, gpu_form])
def test_many_chunks_give_the_same_forward_and_gradient(monkeypatch, pool):
    monkeypatch.setattr(roi_align_module, "_CHUNK_ENTRIES", 50)  # a few RoIs per chunk (bags: one)
    x = feature(40).requires_grad_(True)  # 40 channels: two channel blocks, one partial
    rois = rois_for(False, 0.25)
    grad_out = torch.randn(len(rois), 40, 3, 3, dtype=torch.float64)
    ours = pool(x, rois, 3, 0.25, -1, False)
    theirs = tv_ops.roi_align(x, rois, 3, 0.25, -1, False)
    assert max_error(ours, theirs) < 1e-10
    (g1,) = torch.autograd.grad(ours, x, grad_out)
    (g2,) = torch.autograd.grad(theirs, x, grad_out)
    assert max_error(g1, g2) < 1e-10


@pytest.mark.parametrize("pool", [roi_align, gpu_form])
def test_large_adaptive_grids_as_for_mask_targets(pool):
    # full-resolution binary masks pooled to 28x28 with ceil(roi / 28) samples per bin
    g = torch.Generator().manual_seed(3)
    masks = (torch.rand(3, 1, 200, 240, generator=g) > 0.5).double()
    xy = torch.rand(12, 2, generator=g, dtype=torch.float64) * 100
    wh = 20 + torch.rand(12, 2, generator=g, dtype=torch.float64) * 180
    rois = torch.cat([torch.randint(0, 3, (12, 1), generator=g).double(), xy, xy + wh], 1)
    expected = tv_ops.roi_align(masks, rois, 28, 1.0, -1, False)
    assert max_error(pool(masks, rois, 28, 1.0, -1, False), expected) < 1e-10


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("ratio", [-1, 2])
@pytest.mark.parametrize("scale,size", [(1.0, (1, 1)), (0.25, (3, 5)), (1 / 16, (7, 7))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_gpu_form_equals_torchvision_forward_and_gradient(aligned, ratio, scale, size, channels_last):
    """The fixed-size bags that CUDA tensors take, run here on the CPU: every edge case of
    CELL_BOXES, both images, in the input's memory format."""
    x = feature(4)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    rois = rois_for(aligned, scale)
    ours = roi_align_module._roi_align_bags(x, rois, size, scale, ratio, aligned)
    theirs = tv_ops.roi_align(x, rois, size, scale, ratio, aligned)
    assert max_error(ours, theirs) < 1e-10
    assert ours.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    grad_out = torch.randn(theirs.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (g1,) = torch.autograd.grad(ours, x, grad_out)
    (g2,) = torch.autograd.grad(theirs, x, grad_out)
    assert max_error(g1, g2) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_gpu_form_sums_half_precision_inputs_in_float32(dtype):
    x = feature(6, dtype=torch.float32).to(dtype).requires_grad_(True)
    rois = rois_for(True, 0.5).float()
    ours = roi_align_module._roi_align_bags(x, rois, (2, 3), 0.5, 0, True)
    exact = roi_align(x.detach().float(), rois, (2, 3), 0.5, 0, True)
    assert ours.dtype == dtype and torch.equal(ours, exact.to(dtype))
    ours.float().sum().backward()
    x32 = x.detach().float().requires_grad_(True)
    tv_ops.roi_align(x32, rois, (2, 3), 0.5, 0, True).sum().backward()
    assert x.grad.dtype == dtype and x32.grad.abs().sum() > 0
    # the float32 gradient rounded once to the dtype: within half an ulp of it
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(x.grad.float(), x32.grad, rtol=eps, atol=1e-6)


def test_hand_computed_bilinear_value():
    x = torch.arange(16.0, dtype=torch.float64).view(1, 1, 4, 4)  # value = 4 * y + x
    # aligned, one sample at the centre of box (0, 0)-(2, 2): feature point (0.5, 0.5)
    out = roi_align(x, torch.tensor([[0, 0.0, 0.0, 2.0, 2.0]], dtype=torch.float64), 1, 1.0, 1, True)
    assert out.item() == pytest.approx(4 * 0.5 + 0.5)
    # legacy: 2x2 samples of the 1x1 bin of box (1, 1)-(3, 3) at 1.5 and 2.5 average to 2
    out = roi_align(x, torch.tensor([[0, 1.0, 1.0, 3.0, 3.0]], dtype=torch.float64), 1, 1.0, 2, False)
    assert out.item() == pytest.approx(4 * 2 + 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    x = feature(5).requires_grad_(True)
    rois = rois_for(False, 0.5)
    grad_out = torch.randn(len(rois), 5, 3, 3, dtype=torch.float64)
    cpu = roi_align(x, rois, 3, 0.5, 2, False)
    (cpu_grad,) = torch.autograd.grad(cpu, x, grad_out)
    xc = x.detach().cuda().requires_grad_(True)
    gpu = roi_align(xc, rois.cuda(), 3, 0.5, 2, False)
    (gpu_grad,) = torch.autograd.grad(gpu, xc, grad_out.cuda())
    assert max_error(gpu.cpu(), cpu) < 1e-10 and max_error(gpu_grad.cpu(), cpu_grad) < 1e-10


def test_under_autocast_the_sums_stay_float32_and_the_output_keeps_the_input_dtype():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 20, 24, generator=g)
    rois = torch.tensor([[0, 1.3, 2.2, 15.1, 17.9], [1, 0.0, 0.0, 23.0, 19.0]])
    ref = roi_align(x, rois, 7, 1.0, 2, True)
    low_in = x.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same = roi_align(x, rois, 7, 1.0, 2, True)
        low = roi_align(low_in, rois, 7, 1.0, 2, True)
    assert torch.equal(same, ref)
    assert low.dtype == torch.bfloat16
    assert torch.equal(low, roi_align(low_in.detach().float(), rois, 7, 1.0, 2, True).bfloat16())
    low.float().sum().backward()
    x32 = low_in.detach().float().requires_grad_(True)
    tv_ops.roi_align(x32, rois, 7, 1.0, 2, True).sum().backward()
    assert low_in.grad.dtype == torch.bfloat16 and x32.grad.abs().sum() > 0
    # the float32 gradient rounded once to bfloat16: within half an ulp of it
    eps = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(low_in.grad.float(), x32.grad, rtol=eps, atol=1e-6)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("ratio", [0, 2])
def test_a_pyramid_table_pools_each_box_as_roi_align_on_its_level(aligned, ratio):
    """Three levels of two images, laid out as one table: every box's bins are what roi_align
    gives on its own level (the same sums in the same order), in the order of the boxes."""
    shapes, scales = [(10, 13), (5, 7), (3, 4)], [1.0, 0.5, 0.25]
    maps = [feature(channels=4, dtype=torch.float32, seed=i, hw=hw) for i, hw in enumerate(shapes)]
    table = torch.cat([m.permute(0, 2, 3, 1).reshape(-1, 4) for m in maps])
    halves = CELL_BOXES[:4].clone()
    halves[:, 1:] *= 0.5
    rois = torch.cat([rois_for(aligned, 1.0), rois_for(aligned, 1.0, halves)])
    levels = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1, 0, 1, 2, 0, 1, 2, 0, 1, 1])
    got = roi_align_module.roi_align_pyramid(table, shapes, rois, levels, 3, scales, ratio,
                                             aligned)
    assert got.is_contiguous(memory_format=torch.channels_last)
    expected = torch.cat([roi_align(maps[lv], rois[k:k + 1], 3, scales[lv], ratio, aligned)
                          for k, lv in enumerate(levels.tolist())])
    assert torch.equal(got, expected)


def test_a_pyramid_table_with_no_boxes_gives_an_empty_output_that_still_backpropagates():
    shapes, scales = [(10, 13), (5, 7)], [1.0, 0.5]
    table = torch.randn(2 * (10 * 13 + 5 * 7), 4, dtype=torch.float64, requires_grad=True)
    out = roi_align_module.roi_align_pyramid(table, shapes, torch.zeros(0, 5, dtype=torch.float64),
                                             torch.zeros(0, dtype=torch.int64), 7, scales)
    assert out.shape == (0, 4, 7, 7) and out.dtype == torch.float64
    out.sum().backward()
    assert torch.equal(table.grad, torch.zeros_like(table))
