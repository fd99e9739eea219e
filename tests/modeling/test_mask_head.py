import pytest
import torch

from maskrcnn.modeling.mask_head import MaskHead, mask_loss, mask_targets


@pytest.mark.parametrize("channels_last, onednn", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("rois", [0, 6, 37])
def test_inference_with_labels_gives_each_rois_own_class_channel(channels_last, rois, onednn,
                                                                  monkeypatch):
    """The inference path (deconv as a matrix product, own class row only, 16 RoIs at a time),
    through PyTorch's product or, on channels-last RoIs, oneDNN's product and ReLU, equals the
    training path's transposed conv and full predictor."""
    from maskrcnn.modeling import mask_head

    if not onednn:
        monkeypatch.setattr(mask_head, "fusable", lambda x: False)
    torch.manual_seed(0)
    head = MaskHead(16, (16, 16), num_classes=5).eval()
    torch.nn.init.normal_(head.predictor.weight, std=0.1)
    torch.nn.init.normal_(head.predictor.bias, std=0.1)
    x = torch.randn(rois, 16, 7, 7)
    if channels_last:
        head, x = head.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(1, 6, (rois,))
    with torch.no_grad():
        full = head(x)  # (R, K, 14, 14)
        own = head(x, labels)  # (R, 14, 14)
    assert full.shape == (rois, 5, 14, 14) and own.shape == (rois, 14, 14)
    torch.testing.assert_close(own, full[torch.arange(rois), labels - 1], rtol=1e-5, atol=1e-5)


def test_mask_loss_reaches_only_the_ground_truth_class_channel():
    logits = torch.zeros(3, 4, 2, 2, requires_grad=True)
    labels = torch.tensor([2, 4, 2])
    targets = torch.ones(3, 2, 2)
    loss = mask_loss(logits, labels, targets)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())  # BCE of p=0.5 vs 1
    loss.backward()
    touched = logits.grad.abs().sum((2, 3)) > 0  # (R, K)
    expected = torch.zeros(3, 4, dtype=torch.bool)
    expected[torch.arange(3), labels - 1] = True
    assert torch.equal(touched, expected)


def test_forward_and_gradients_equal_the_plain_layer_stack():
    # the transposed conv's bias is added apart from the conv; the head must still be
    # conv-ReLU ... deconv(+bias)-ReLU-1x1, gradients included
    torch.manual_seed(0)
    head = MaskHead(8, (8,), num_classes=3)
    torch.nn.init.normal_(head.deconv.bias, std=0.5)
    torch.nn.init.normal_(head.predictor.weight, std=0.3)
    x = torch.randn(4, 8, 7, 7)
    g = torch.randn(4, 3, 14, 14)

    def plain(t):
        t = torch.relu(head.convs[0](t))
        return head.predictor(torch.relu(head.deconv(t)))

    grads = []
    for forward in (head, plain):
        head.zero_grad()
        out = forward(x)
        (out * g).sum().backward()
        grads.append((out.detach(), *(p.grad.clone() for p in head.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_soft_targets_of_polygons_are_those_of_their_decoded_masks():
    """torchvision's soft targets (``roi_align_soft``) from a compact structure equal those of
    the same masks as a dense tensor; binary targets stay binary."""
    from maskrcnn.structures.masks import PolygonMasks

    polygons = [[[10.0, 10, 50, 12, 45, 40, 12, 35]], [[30.0, 5, 60, 5, 60, 30]], [[1.0, 1, 4, 1, 4, 4]]]
    structure = PolygonMasks(polygons, 48, 64)
    boxes = torch.tensor([[8.0, 8, 52, 42], [28.3, 3.7, 61.5, 31.2], [11.0, 9, 40, 30]])
    matched = torch.tensor([0, 1, 0])
    soft = mask_targets(structure, boxes, matched, 28, "roi_align_soft")
    dense = structure.to_tensor()
    torch.testing.assert_close(soft, mask_targets(dense, boxes, matched, 28, "roi_align_soft"), rtol=0, atol=0)
    assert ((soft > 0) & (soft < 1)).any()  # soft along the edges
    binary = mask_targets(structure, boxes, matched, 28, "binary")
    assert set(binary.unique().tolist()) <= {0.0, 1.0}
    assert (binary - soft).abs().mean() < 0.1  # the same shapes
