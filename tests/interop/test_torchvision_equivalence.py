"""The whole model equals torchvision's maskrcnn_resnet50_fpn on shared random weights."""

import pytest
import torch

tv_detection = pytest.importorskip("torchvision.models.detection")

from maskrcnn.interop.torchvision import from_torchvision  # noqa: E402

SIZES = [(3, 300, 451), (3, 417, 250), (3, 365, 389)]  # (C, H, W): non-square, not multiples of 32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    tv = tv_detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    with torch.no_grad():
        # Random classifier weights give every class ~1/91 probability, all under the 0.05 score
        # threshold; sharpening them makes the random model produce detections to compare.
        tv.roi_heads.box_predictor.cls_score.weight.mul_(40)
        tv.roi_heads.box_predictor.bbox_pred.weight.mul_(5)
    path = tmp_path_factory.mktemp("weights") / "tv_maskrcnn.pth"
    torch.save(tv.state_dict(), path)
    ours = from_torchvision(path, verbose=False)
    return tv.eval(), ours.eval()


def make_images(seed, sizes=SIZES):
    g = torch.Generator().manual_seed(seed)
    images = []
    for c, h, w in sizes:
        # smooth blobs rather than white noise, so the random backbone responds to structure
        low = torch.rand(c, h // 16 + 1, w // 16 + 1, generator=g)
        images.append(torch.nn.functional.interpolate(low[None], size=(h, w), mode="bilinear")[0])
    return images


def capture_proposals(module):
    store = []
    module.register_forward_hook(lambda m, i, o: store.append([p.detach().clone() for p in o[0]]))
    return store


def mask_iou(a, b):
    inter = (a & b).sum().item()
    union = (a | b).sum().item()
    return 1.0 if union == 0 else inter / union


def test_eval_outputs_match_torchvision(models):
    tv, ours = models
    assert not ours.load_report.missing and not ours.load_report.unexpected
    tv_props, our_props = capture_proposals(tv.rpn), capture_proposals(ours.rpn)
    images = make_images(1)
    with torch.no_grad():
        expected = tv(images)
        got = ours(images)
    for p_tv, p_ours in zip(tv_props[-1], our_props[-1]):
        assert p_tv.shape == p_ours.shape
        torch.testing.assert_close(p_ours, p_tv, atol=1e-3, rtol=0)
    assert_same_detections(expected, got, SIZES)


def assert_same_detections(expected, got, sizes):
    total = 0
    for e, g, (_, h, w) in zip(expected, got, sizes):
        assert len(g["boxes"]) == len(e["boxes"])
        total += len(g["boxes"])
        torch.testing.assert_close(g["boxes"], e["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(g["scores"], e["scores"], atol=1e-4, rtol=0)
        assert torch.equal(g["labels"], e["labels"])
        assert g["masks"].shape == (len(e["boxes"]), h, w) and g["masks"].dtype == torch.bool
        for gm, em in zip(g["masks"], e["masks"][:, 0] > 0.5):
            assert mask_iou(gm, em) >= 0.99
    assert total >= 10, "the comparison needs detections to be meaningful"


@pytest.mark.parametrize("size", [(3, 30, 1000), (3, 1000, 30)])
def test_extreme_aspect_matches_torchvision(models, size):
    """A 30x1000 image becomes 40x1333, padded to 64 rows. As a first image it would give
    torchvision's poolers P2 at 1/2 instead of 1/4 (README, Load torchvision weights), so, as
    in any run whose first image is of ordinary height, torchvision sees one first; ours has the
    strides fixed. Then the two agree on the panorama and on its transpose."""
    tv, ours = models
    with torch.no_grad():
        if tv.roi_heads.box_roi_pool.scales is None:
            tv(make_images(1)[:1])
        assert tv.roi_heads.box_roi_pool.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
        images = make_images(5, [size])
        assert_same_detections(tv(images), ours(images), [size])


def make_targets(images, seed):
    g = torch.Generator().manual_seed(seed)
    targets = []
    for img in images:
        _, h, w = img.shape
        n = 3
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = 20 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.35, h * 0.35])
        boxes = torch.cat([xy, xy + wh], 1)
        masks = torch.zeros(n, h, w, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.round().int().tolist()):
            masks[i, y1:y2, x1 + (x2 - x1) // 4: x2] = 1  # not a box-filling mask
        labels = torch.randint(1, 91, (n,), generator=g)
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    return targets


def test_train_losses_match_torchvision(models):
    tv, ours = models
    images = make_images(2)
    targets = make_targets(images, 3)
    tv.train()
    ours.train()
    try:
        with torch.no_grad():
            torch.manual_seed(7)
            expected = tv(images, [dict(t) for t in targets])
            torch.manual_seed(7)
            got = ours(images, [dict(t) for t in targets])
    finally:
        tv.eval()
        ours.eval()
    assert set(got) == set(expected)
    for key in expected:
        assert torch.isfinite(got[key])
        torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=0, msg=key)
    assert expected["loss_mask"] > 0 and expected["loss_box_reg"] > 0


def test_fast_inference_path_keeps_detections(models):
    """Folded norms and channels-last change only float rounding: the same detections."""
    import copy

    tv, ours = models
    fast = copy.deepcopy(ours).optimize_for_inference()
    images = make_images(4)[:1]
    with torch.no_grad():
        (expected,) = tv(images)
        (got,) = fast(images)
    n = min(len(got["boxes"]), len(expected["boxes"]), 20)
    assert n >= 5
    torch.testing.assert_close(got["boxes"][:n], expected["boxes"][:n], atol=0.05, rtol=0)
    torch.testing.assert_close(got["scores"][:n], expected["scores"][:n], atol=1e-3, rtol=0)
