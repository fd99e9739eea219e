import pytest
import torch

tv_ops = pytest.importorskip("torchvision.ops")

from maskrcnn.ops import batched_nms, nms  # noqa: E402


def random_set(n, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.randint(0, 50, (n, 2), generator=g).float()
    wh = torch.randint(1, 30, (n, 2), generator=g).float()
    scores = torch.randint(0, 20, (n,), generator=g).float() / 20  # many ties
    return torch.cat([xy, xy + wh], 1), scores, torch.randint(0, 5, (n,), generator=g)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7, 1 / 3])
def test_same_kept_indices_as_torchvision(seed, threshold):
    n = [1, 7, 60, 400, 999, 1001, 1600][seed % 7]  # both sides of torchvision's batched switch
    boxes, scores, idxs = random_set(n, seed)
    assert torch.equal(nms(boxes, scores, threshold), tv_ops.nms(boxes, scores, threshold))
    assert torch.equal(batched_nms(boxes, scores, idxs, threshold),
                       tv_ops.batched_nms(boxes, scores, idxs, threshold))


def test_iou_exactly_at_threshold_is_kept():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0]])  # IoU exactly 0.5
    scores = torch.tensor([0.9, 0.8])
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]  # suppression needs IoU > threshold
    assert nms(boxes, scores, 0.49).tolist() == [0]
    for threshold in (0.5, 0.49, 1 / 3):
        assert torch.equal(nms(boxes, scores, threshold), tv_ops.nms(boxes, scores, threshold))


def test_empty_input():
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).numel() == 0
