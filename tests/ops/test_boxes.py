import math

import pytest
import torch

tv_ops = pytest.importorskip("torchvision.ops")
tv_utils = pytest.importorskip("torchvision.models.detection._utils")

from maskrcnn.ops import box_area, box_iou, clip_boxes, decode, encode, remove_small_boxes  # noqa: E402


def random_boxes(n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 100
    return torch.cat([xy, xy + 1 + torch.rand(n, 2, generator=g, dtype=torch.float64) * 50], 1).to(dtype)


def test_hand_computed_area_and_iou():
    a = torch.tensor([[0.0, 0, 2, 2], [0, 0, 4, 1]])
    b = torch.tensor([[1.0, 0, 3, 2], [10, 10, 11, 11]])
    assert box_area(a).tolist() == [4, 4]
    assert box_iou(a, b).tolist() == [[pytest.approx(1 / 3), 0.0], [pytest.approx(2 / 6), 0.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_iou_and_area_bit_equal_to_torchvision(dtype):
    a, b = random_boxes(30, 0, dtype), random_boxes(20, 1, dtype)
    a[3] = b[5]  # identical boxes
    a[4, 2:] = a[4, :2]  # empty box: 0 / 0 stays NaN as in torchvision
    assert torch.equal(box_area(a), tv_ops.box_area(a))
    torch.testing.assert_close(box_iou(a, b), tv_ops.box_iou(a, b), rtol=0, atol=0, equal_nan=True)


def test_clip_matches_torchvision_for_one_and_many_boxes_per_row():
    boxes = torch.tensor([[-5.0, 2, 30, 40], [3, -3, 3.5, 9], [1, 1, 1.25, 2]])
    assert clip_boxes(boxes, (20, 25))[0].tolist() == [0, 2, 25, 20]
    assert torch.equal(clip_boxes(boxes, (20, 25)), tv_ops.clip_boxes_to_image(boxes, (20, 25)))
    per_class = torch.randn(5, 3, 4) * 40  # (N, C, 4) and its (N, 4C) view clip alike
    expected = tv_ops.clip_boxes_to_image(per_class.reshape(5, 12), (30, 20))
    assert torch.equal(clip_boxes(per_class.reshape(5, 12), (30, 20)), expected)
    assert torch.equal(clip_boxes(per_class, (30, 20)).reshape(5, 12), expected)


def test_remove_small_boxes_keeps_sides_equal_to_min_size():
    boxes = torch.tensor([[0.0, 0, 1, 5], [0, 0, 0.5, 5], [0, 0, 5, 0.999], [2, 2, 3, 3]])
    assert remove_small_boxes(boxes, 1.0).tolist() == [0, 3]
    for min_size in (1e-3, 0.5, 1.0):
        assert torch.equal(remove_small_boxes(boxes, min_size), tv_ops.remove_small_boxes(boxes, min_size))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_coder_is_bit_equal_to_torchvision(weights, dtype):
    ref, target = random_boxes(50, 2, dtype), random_boxes(50, 3, dtype)
    coder = tv_utils.BoxCoder(weights)
    deltas = encode(ref, target, weights)
    assert torch.equal(deltas, coder.encode_single(target, ref))
    g = torch.Generator().manual_seed(4)
    many = (torch.randn(50, 12, generator=g, dtype=torch.float64) * 3).to(dtype)  # 3 classes per box
    assert torch.equal(decode(many, ref, weights), coder.decode_single(many, ref))
    assert torch.equal(decode(deltas, ref, weights), coder.decode_single(deltas, ref))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_deltas_decode_in_float32(dtype):
    # exp(4.2) * 1100 = 73,000 overflows float16
    ref = torch.cat([torch.tensor([[0.0, 0, 1100, 20]]), random_boxes(50, 7)])
    g = torch.Generator().manual_seed(8)
    deltas = torch.cat([torch.tensor([[0.0, 0, 4.2, 0]]), torch.randn(50, 4, generator=g) * 3])
    deltas = deltas.to(dtype)
    for weights in ((1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)):
        expected = tv_utils.BoxCoder(weights).decode_single(deltas.float(), ref)
        assert torch.equal(decode(deltas, ref, weights), expected)


def test_decode_inverts_encode():
    ref, target = random_boxes(40, 5, torch.float64), random_boxes(40, 6, torch.float64)
    weights = (10.0, 10.0, 5.0, 5.0)
    torch.testing.assert_close(decode(encode(ref, target, weights), ref, weights), target,
                               rtol=0, atol=1e-12)


def test_decode_clamps_log_scale_after_removing_weights():
    huge = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    ref = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    box = decode(huge, ref, (1.0, 1.0, 1.0, 1.0))
    assert (box[0, 2] - box[0, 0]).item() == pytest.approx(10 * 1000 / 16, rel=1e-5)
    assert math.isfinite(box.sum().item())
    # 20 / 5 = 4 is below the clamp, so the weight is removed first
    box = decode(torch.tensor([[0.0, 0.0, 20.0, 0.0]]), ref, (10.0, 10.0, 5.0, 5.0))
    assert (box[0, 2] - box[0, 0]).item() == pytest.approx(10 * math.exp(4), rel=1e-6)
    box = decode(torch.tensor([[0.0, 0.0, 1.0, 0.0]]), ref, (1.0, 1.0, 1.0, 1.0), clamp=0.5)
    assert (box[0, 2] - box[0, 0]).item() == pytest.approx(10 * math.exp(0.5), rel=1e-6)
