import math

import pytest
import torch

tv_ops = pytest.importorskip("torchvision.ops")
tv_utils = pytest.importorskip("torchvision.models.detection._utils")

from maskrcnn.ops import box_iou, clip_boxes, decode, encode, remove_small_boxes  # noqa: E402


def random_boxes(n, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 100
    return torch.cat([xy, xy + 1 + torch.rand(n, 2, generator=g) * 50], 1)


def test_iou_matches_torchvision_and_hand_value():
    a, b = random_boxes(30, 0), random_boxes(20, 1)
    torch.testing.assert_close(box_iou(a, b), tv_ops.box_iou(a, b), rtol=0, atol=0)
    assert box_iou(torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[1.0, 0, 3, 2]])).item() == pytest.approx(1 / 3)


def test_clip_and_small_boxes():
    boxes = torch.tensor([[-5.0, 2, 30, 40], [3, 3, 3.0005, 9], [1, 1, 1.25, 2]])
    assert clip_boxes(boxes, (20, 25))[0].tolist() == [0, 2, 25, 20]
    assert remove_small_boxes(boxes, 0.5).tolist() == [0]
    assert torch.equal(remove_small_boxes(boxes, 1e-3), tv_ops.remove_small_boxes(boxes, 1e-3))
    assert torch.equal(clip_boxes(boxes, (20, 25)), tv_ops.clip_boxes_to_image(boxes, (20, 25)))


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_coder_matches_torchvision_and_round_trips(weights):
    ref, target = random_boxes(50, 2), random_boxes(50, 3)
    coder = tv_utils.BoxCoder(weights)
    deltas = encode(ref, target, weights)
    torch.testing.assert_close(deltas, coder.encode_single(target, ref))
    torch.testing.assert_close(decode(deltas, ref, weights), target, atol=1e-4, rtol=0)
    many = torch.randn(50, 12)  # 3 classes of deltas per reference box
    torch.testing.assert_close(decode(many, ref, weights), coder.decode_single(many, ref))


def test_decode_clamps_log_scale():
    huge = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    box = decode(huge, torch.tensor([[0.0, 0.0, 10.0, 10.0]]), (1.0, 1.0, 1.0, 1.0))
    assert (box[0, 2] - box[0, 0]).item() == pytest.approx(10 * 1000 / 16, rel=1e-5)
    assert math.isfinite(box.sum().item())
