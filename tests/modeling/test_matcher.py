import torch

from maskrcnn.modeling.matcher import BELOW_LOW, BETWEEN, match, sample_balanced


def test_thresholds_and_low_quality_matches():
    iou = torch.tensor([[0.9, 0.5, 0.1, 0.2],
                        [0.1, 0.2, 0.25, 0.25]])  # GT 1's best IoU 0.25 is shared by two preds
    assert match(iou, 0.7, 0.3, allow_low_quality=False).tolist() == [0, BETWEEN, BELOW_LOW, BELOW_LOW]
    # low-quality: both predictions tying for GT 1's best become matched, to their own argmax
    assert match(iou, 0.7, 0.3, allow_low_quality=True).tolist() == [0, BETWEEN, 1, 1]


def test_sampler_caps_positives_and_fills_with_negatives():
    torch.manual_seed(0)
    labels = torch.tensor([1] * 10 + [0] * 100 + [-1] * 5)
    (pos,), (neg,) = sample_balanced([labels], 16, 0.25)
    assert pos.sum() == 4 and neg.sum() == 12
    assert (labels[pos] == 1).all() and (labels[neg] == 0).all()
    (pos,), (neg,) = sample_balanced([torch.tensor([0, 0, 1])], 16, 0.5)
    assert pos.tolist() == [False, False, True] and neg.tolist() == [True, True, False]
