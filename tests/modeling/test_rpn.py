import math

import pytest
import torch

from maskrcnn.modeling.rpn import rpn_losses, select_proposals, top_per_level


def bce(logit: float, label: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(label * math.log(p) + (1 - label) * math.log(1 - p))


def test_losses_are_normalised_as_torchvision_or_detectron2():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    pos = torch.tensor([True, False, True, False, False])
    neg = torch.tensor([False, True, False, False, True])  # anchor 3 is not sampled
    deltas = torch.tensor([[0.1, 0.2, 0.0, 0.0], [9.0, 9, 9, 9], [0.0, 0, 0.5, -0.5], [9.0, 9, 9, 9], [9.0, 9, 9, 9]])
    targets = torch.tensor([[0.0, 0, 0, 0], [0.0, 0, 0, 0]])  # of the two positives, in order
    kw = dict(pos=pos, neg=neg, beta=0.0, num_images=2, batch_size_per_image=8)
    sampled = [(2.0, 1.0), (-1.0, 0.0), (0.5, 1.0), (-2.0, 0.0)]
    bce_sum = sum(bce(x, y) for x, y in sampled)
    l1_sum = 0.1 + 0.2 + 0.5 + 0.5
    tv = rpn_losses(logits, deltas, labels, targets, norm="torchvision", **kw)
    assert tv["loss_objectness"].item() == pytest.approx(bce_sum / 4)
    assert tv["loss_rpn_box_reg"].item() == pytest.approx(l1_sum / 4)
    d2 = rpn_losses(logits, deltas, labels, targets, norm="detectron2", **kw)
    assert d2["loss_objectness"].item() == pytest.approx(bce_sum / 16)
    assert d2["loss_rpn_box_reg"].item() == pytest.approx(l1_sum / 16)


def test_top_per_level_takes_k_from_each_level_or_all_it_has():
    logits = torch.tensor([[5.0, 1, 3, 0, 9, 8, 7, 2, 6]])
    top, levels = top_per_level(logits, [3, 4, 2], k=2)
    assert top.tolist() == [[0, 2, 4, 5, 8, 7]] and levels.tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("min_size, kept", [(0.0, [0, 2, 3]), (1.0, [0, 3])])
def test_proposals_are_clipped_filtered_and_suppressed_per_level(min_size, kept):
    boxes = torch.tensor([[10.0, 10, 40, 40],  # best
                          [-20.0, 5, -1, 30],  # beyond the left edge: empty once clipped
                          [50.0, 50, 50.5, 70],  # half a pixel wide
                          [12.0, 12, 42, 42],  # overlaps the best, on another level
                          [11.0, 11, 41, 41]])  # overlaps the best on its level
    logits = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    levels = torch.tensor([0, 0, 1, 1, 0])
    out = select_proposals(boxes, logits, levels, (100, 100), post_nms_topk=10, nms_thresh=0.7,
                           min_size=min_size)
    assert out.tolist() == boxes[kept].tolist()
    out = select_proposals(boxes, logits, levels, (100, 100), post_nms_topk=1, nms_thresh=0.7,
                           min_size=min_size)
    assert out.tolist() == boxes[:1].tolist()
