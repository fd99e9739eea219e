import pytest
import torch

from maskrcnn.config import paper_model, replace_nested, small_cpu_model
from maskrcnn.modeling.mask_rcnn import build_model

LOSSES = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}


def sample(h=120, w=150):
    masks = torch.zeros(2, h, w, dtype=torch.uint8)
    masks[0, 10:60, 20:90] = 1
    masks[1, 50:110, 70:140] = 1
    target = {"boxes": torch.tensor([[20.0, 10, 90, 60], [70, 50, 140, 110]]),
              "labels": torch.tensor([1, 2]), "masks": masks}
    return torch.rand(3, h, w), target


@pytest.mark.parametrize("fpn", [True, False])
def test_train_step_and_inference_shapes(fpn):
    torch.manual_seed(0)
    cfg = replace_nested(small_cpu_model(num_classes=2), **{"backbone.fpn": fpn})
    model = build_model(cfg)
    image, target = sample()
    losses = model([image, image.flip(-1)], [target, target])
    assert set(losses) == LOSSES and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.roi_heads.mask_head.predictor.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model([image, torch.rand(3, 90, 70)])
    for o, (h, w) in zip(out, [(120, 150), (90, 70)]):
        n = len(o["boxes"])
        assert o["boxes"].shape == (n, 4) and o["scores"].shape == (n,) and o["labels"].shape == (n,)
        assert o["masks"].shape == (n, h, w) and o["masks"].dtype == torch.bool
        if n:
            assert o["boxes"][:, 2].max() <= w and o["boxes"][:, 3].max() <= h


def test_the_paper_preset_trains_and_predicts_non_empty_boxes():
    """Detectron2's conventions together (each is tested on its own elsewhere): BGR 0-255 input,
    rounded PIL-like resizing, nominal anchor strides, L1 losses normalised by the sampling
    budget, empty detections dropped."""
    torch.manual_seed(0)
    cfg = replace_nested(paper_model(num_classes=2), **{
        "input.min_size_train": (112,), "input.min_size_test": 112, "input.max_size": 160,
        "roi_heads.score_thresh": 0.0})
    model = build_model(cfg)
    image, target = sample()
    losses = model([image], [target])
    assert set(losses) == LOSSES and all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert model.roi_heads.mask_head.predictor.weight.grad.abs().sum() > 0
    with torch.no_grad():
        out = model.eval()([image])[0]
    boxes = out["boxes"]
    assert len(boxes) == 100 and out["masks"].shape == (100, 120, 150)
    assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
    assert boxes[:, 2].max() <= 150 and boxes[:, 3].max() <= 120


@pytest.mark.parametrize("fast", [False, True])
def test_eval_with_gradients_on_predicts_as_without_and_is_differentiable(fast):
    """``model.eval()(images)`` outside ``torch.no_grad``, as a user may call it, on the plain
    model and on the one ``optimize_for_inference`` made."""
    torch.manual_seed(0)
    model = build_model(small_cpu_model(num_classes=3)).eval()
    if fast:
        model.optimize_for_inference()
    image = torch.rand(3, 120, 150)
    with torch.no_grad():
        expected = model([image])[0]
    out = model([image])[0]
    assert len(expected["boxes"]) > 0
    for key in ("boxes", "scores", "labels", "masks"):
        torch.testing.assert_close(out[key].detach(), expected[key], rtol=1e-4, atol=1e-4)
    out["scores"].sum().backward()
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("score_thresh", [0.0, 1.0])  # every candidate kept / none (kept: score > thresh)
def test_mask_probabilities_have_one_shape_with_or_without_detections(monkeypatch, score_thresh):
    """C4 with a 16-pixel mask pooler: res5 halves it to 8, the deconvolution doubles it back."""
    import maskrcnn.modeling.mask_rcnn as mask_rcnn

    seen = []
    real = mask_rcnn.postprocess
    monkeypatch.setattr(mask_rcnn, "postprocess", lambda results, *a, **k: seen.extend(results) or real(results, *a, **k))
    torch.manual_seed(0)
    cfg = replace_nested(small_cpu_model(num_classes=2), **{
        "backbone.fpn": False, "roi_heads.mask_pooler_resolution": 16, "roi_heads.score_thresh": score_thresh})
    with torch.no_grad():
        build_model(cfg).eval()([torch.rand(3, 64, 80)])
    probs = seen[0]["mask_probs"]
    assert probs.shape == (len(seen[0]["boxes"]), 16, 16) and probs.dtype == torch.float32
    assert (len(probs) > 0) == (score_thresh < 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.uint8])
def test_images_of_any_float_or_uint8_dtype_give_the_float32_result(dtype):
    torch.manual_seed(0)
    model = build_model(small_cpu_model(num_classes=2)).eval()
    image = torch.rand(3, 64, 80)
    if dtype == torch.uint8:
        image = (image * 255).round()
        expected_input = image / 255
    else:
        expected_input = image.to(dtype).float()
    with torch.no_grad():
        got = model([image.to(dtype)])[0]
        expected = model([expected_input])[0]
    torch.testing.assert_close(got["boxes"], expected["boxes"])
    assert got["boxes"].dtype == torch.float32


def test_an_empty_batch_predicts_nothing_and_cannot_train():
    model = build_model(small_cpu_model(num_classes=2))
    with pytest.raises(ValueError, match="no images"):
        model([], [])
    with torch.no_grad():
        assert model.eval()([]) == []


def test_image_without_instances_gives_finite_zero_box_and_mask_losses():
    torch.manual_seed(0)
    model = build_model(small_cpu_model(num_classes=2))
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 100, 100, dtype=torch.uint8)}
    losses = model([torch.rand(3, 100, 100)], [empty])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_box_reg"] == 0 and losses["loss_mask"] == 0 and losses["loss_rpn_box_reg"] == 0
    sum(losses.values()).backward()


def test_bad_boxes_are_rejected_with_the_image_index():
    model = build_model(small_cpu_model(num_classes=2))
    image, target = sample()
    target["boxes"] = torch.tensor([[20.0, 10, 90, 60], [70, 50, 30, 20]])  # xywh passed as xyxy
    with pytest.raises(ValueError, match="target 1: box .* non-positive width"):
        model([image, image], [sample()[1], target])


def test_train_mode_without_targets_says_what_to_do():
    model = build_model(small_cpu_model(num_classes=2))
    with pytest.raises(ValueError, match="model.eval"):
        model([torch.rand(3, 64, 64)])


def test_channels_last_layout_changes_only_rounding_and_outlives_bf16(monkeypatch):
    """use_channels_last puts weights and the backbone's input in channels-last memory with the
    same losses to float rounding; bf16 is channels-last whatever it says, and turning bf16 off
    goes back to the layout it chose."""
    from maskrcnn import precision

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    torch.manual_seed(0)
    model = build_model(small_cpu_model(num_classes=2))
    image, target = sample()
    layouts = []
    model.backbone.register_forward_pre_hook(lambda _, args: layouts.append(
        not args[0].is_contiguous() and args[0].is_contiguous(memory_format=torch.channels_last)))
    weight = model.backbone.body.layer1[0].conv1.weight
    features, losses = [], []
    model.backbone.register_forward_hook(lambda _, args, out: features.append(out))
    for channels_last in (False, True):
        model.use_channels_last(channels_last)
        torch.manual_seed(1)
        losses.append(model([image], [target]))
    assert layouts == [False, True] and not weight.is_contiguous()
    for a, b in zip(*features):  # train-mode BN: batch statistics of one image
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    for name, value in losses[1].items():  # a proposal can flip on a rounding difference
        torch.testing.assert_close(value, losses[0][name], rtol=0.01, atol=1e-5)
    model.use_channels_last(False).use_bf16(True)
    assert not weight.is_contiguous()
    model.use_bf16(False)
    assert weight.is_contiguous()
    model.use_channels_last(True).use_bf16(True).use_bf16(False)
    assert not weight.is_contiguous()


def test_bf16_mode_trains_and_predicts_with_float32_outputs_close_to_float32(monkeypatch):
    from maskrcnn import precision

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)  # emulated where the CPU lacks it
    torch.manual_seed(0)
    model = build_model(replace_nested(small_cpu_model(num_classes=2), **{"roi_heads.score_thresh": 0.0}))
    image, target = sample()
    layouts = []  # bf16 runs the backbone channels-last, where oneDNN's bf16 kernels are fastest
    model.backbone.register_forward_pre_hook(lambda _, args: layouts.append(
        not args[0].is_contiguous() and args[0].is_contiguous(memory_format=torch.channels_last)))
    losses = {}
    for bf16 in (False, True):
        model.use_bf16(bf16)
        torch.manual_seed(1)  # the same sampled anchors and RoIs
        losses[bf16] = model([image], [target])
    assert layouts == [False, True]
    assert not model.backbone.body.layer1[0].conv1.weight.is_contiguous()  # channels-last
    for name, value in losses[True].items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, losses[False][name], rtol=0.05, atol=0.01)
    sum(losses[True].values()).backward()
    grad = model.backbone.body.conv1.weight.grad
    assert grad.dtype == torch.float32 and grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        features = model.backbone(image[None])
        logits32, deltas32 = model.rpn.head(features)
        model.use_bf16(True)
        with precision.bf16_autocast("cpu", True):
            logits16, deltas16 = model.rpn.head(model.backbone(image[None]))
        out = model([image])[0]
    assert logits16.dtype == deltas16.dtype == torch.float32
    torch.testing.assert_close(logits16, logits32, rtol=0.05, atol=0.05)
    assert out["boxes"].dtype == out["scores"].dtype == torch.float32 and out["masks"].dtype == torch.bool
    assert len(out["scores"]) > 0
    model.use_bf16(False)  # back to the float32 path's layout
    assert all(p.is_contiguous() for p in model.parameters())


@pytest.fixture(scope="module")
def untrained_heads():
    """The RoI heads' parameters of the torchvision preset and of torchvision's own model."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    from maskrcnn.config import torchvision_model

    torch.manual_seed(0)
    mine = dict(build_model(torchvision_model()).roi_heads.named_parameters())
    tv = dict(maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).roi_heads.named_parameters())
    return mine, tv


@pytest.mark.parametrize("ours, theirs", [
    ("box_head.fc6", "box_head.fc6"), ("box_head.fc7", "box_head.fc7"),
    ("box_predictor.cls_score", "box_predictor.cls_score"), ("box_predictor.bbox_pred", "box_predictor.bbox_pred"),
    ("mask_head.deconv", "mask_predictor.conv5_mask"), ("mask_head.predictor", "mask_predictor.mask_fcn_logits"),
    ("mask_head.convs.0", "mask_head.0.0"),
])
def test_the_torchvision_presets_heads_start_as_torchvisions(untrained_heads, ours, theirs):
    """Same distributions of initial weights and biases as torchvision's untrained model
    (SPEC §1.8-1.9): the same spread, and as many values beyond two spreads (4.6% for normal
    draws, none for uniform ones). Shapes differ where torchvision keeps a background class."""
    mine, tv = untrained_heads
    for kind in ("weight", "bias"):
        a, b = mine[f"{ours}.{kind}"].detach(), tv[f"{theirs}.{kind}"].detach()
        if b.std() == 0:
            assert a.abs().max() == 0, kind
            continue
        many = b.numel() > 10_000
        assert a.std().item() == pytest.approx(b.std().item(), rel=0.05 if many else 0.3), kind
        if many:
            tails = [(t.abs() > 2 * t.std()).float().mean().item() for t in (a, b)]
            assert tails[0] == pytest.approx(tails[1], abs=0.01), kind
