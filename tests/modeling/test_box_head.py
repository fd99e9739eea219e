import pytest
import torch
import torch.nn.functional as F

from maskrcnn.modeling.box_head import BoxHead, detect


def _reference(head: BoxHead, x: torch.Tensor) -> torch.Tensor:
    """Both FC layers in float64 on the flattened (C, S, S) features."""
    h = F.linear(x.double().flatten(1), head.fc6.weight.double(), head.fc6.bias.double())
    return F.relu(F.linear(F.relu(h), head.fc7.weight.double(), head.fc7.bias.double()))


@pytest.mark.parametrize("onednn", [True, False])
def test_channels_last_prediction_equals_the_flattened_product(onednn, monkeypatch):
    """The fast path's product of channels-last rows by permuted weights, through oneDNN's
    product and ReLU or PyTorch's, equals the matrix product on the (C, S, S)-flattened
    features that training uses."""
    from maskrcnn.modeling import box_head

    if not onednn:
        monkeypatch.setattr(box_head, "fusable", lambda x: False)
    torch.manual_seed(0)
    head = BoxHead(8 * 7 * 7, 32)
    torch.nn.init.normal_(head.fc6.bias)
    x = torch.randn(5, 8, 7, 7)
    expected = _reference(head, x)
    with torch.no_grad():
        for layout in (torch.contiguous_format, torch.channels_last):
            got = head(x.contiguous(memory_format=layout))
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # with autograd the product runs as before and gradients reach fc6
    head(x.contiguous(memory_format=torch.channels_last)).sum().backward()
    assert head.fc6.weight.grad is not None


def test_the_permuted_weights_follow_changed_weights():
    torch.manual_seed(0)
    head = BoxHead(4 * 3 * 3, 6)
    x = torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        head(x)
        head.fc6.weight.mul_(-2)  # an in-place change, as loading a state dict makes
        torch.testing.assert_close(head(x).double(), _reference(head, x), rtol=1e-5, atol=1e-5)


def test_training_on_more_channels_last_rois_than_outputs_permutes_the_weights(monkeypatch):
    """With more RoIs than fc6 has outputs, training multiplies the channels-last rows by the
    weights permuted under autograd (the smaller copy to make): the same values and gradients
    as the product on the flattened features, which fewer RoIs keep."""
    from maskrcnn.modeling import box_head

    calls = []
    real = box_head._channels_last_columns
    monkeypatch.setattr(box_head, "_channels_last_columns", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    head = BoxHead(8 * 3 * 3, 16)
    torch.nn.init.normal_(head.fc6.bias)
    for rois, permuted in ((40, True), (10, False)):
        x = torch.randn(rois, 8, 3, 3)
        results = []
        for layout in (torch.contiguous_format, torch.channels_last):
            head.zero_grad()
            xi = x.contiguous(memory_format=layout).detach().requires_grad_()
            y = head(xi)
            y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
            results.append((y, xi.grad, head.fc6.weight.grad.clone(), head.fc6.bias.grad.clone()))
        assert bool(calls) == permuted
        calls.clear()
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_head_that_has_predicted_can_be_copied_and_saved():
    """Its cached fast-path weights (oneDNN's packed layout, which has no storage to copy) are
    left behind and made again by the copy."""
    import copy
    import io

    torch.manual_seed(0)
    head = BoxHead(8 * 3 * 3, 6).to(memory_format=torch.channels_last)
    x = torch.randn(4, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = head(x)
        buffer = io.BytesIO()
        torch.save(head, buffer)
        buffer.seek(0)
        for clone in (copy.deepcopy(head), torch.load(buffer, weights_only=False)):
            torch.testing.assert_close(clone(x), expected)


def test_empty_detections_are_dropped_before_nms_or_after_the_top_k():
    """A proposal beyond the image clips to an empty box. torchvision's rule (``min_size`` > 0)
    drops it before the NMS, so the other box is the one detection; Detectron2's (0) lets it
    take the one place and then drops it, leaving none."""
    proposals = torch.tensor([[120.0, 10, 150, 40], [10.0, 10, 50, 40]])
    logits = torch.tensor([[0.0, 6.0], [0.0, 5.0]])  # the empty box scores higher
    kw = dict(weights=(10.0, 10.0, 5.0, 5.0), score_thresh=0.05, nms_thresh=0.5)
    boxes, scores, labels = detect(logits, torch.zeros(2, 4), proposals, (100, 100), topk=1, min_size=1e-2, **kw)
    assert boxes.tolist() == [[10.0, 10.0, 50.0, 40.0]] and labels.tolist() == [1]
    boxes, _, _ = detect(logits, torch.zeros(2, 4), proposals, (100, 100), topk=1, min_size=0.0, **kw)
    assert boxes.shape == (0, 4)
    boxes, _, _ = detect(logits, torch.zeros(2, 4), proposals, (100, 100), topk=2, min_size=0.0, **kw)
    assert boxes.tolist() == [[10.0, 10.0, 50.0, 40.0]]
