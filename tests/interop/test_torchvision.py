"""Building a model from torchvision's weights: layers the file fills are never initialised,
layers it cannot fill keep their initialisation."""

import pytest
import torch

tv_detection = pytest.importorskip("torchvision.models.detection")

from maskrcnn.config import small_cpu_model  # noqa: E402
from maskrcnn.interop.torchvision import (convert_state_dict, from_torchvision, load_backbone_weights,  # noqa: E402
                                          read_state_dict)
from maskrcnn.modeling.mask_rcnn import build_model  # noqa: E402

HEADS = {"roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
         "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias",
         "roi_heads.mask_head.predictor.weight", "roi_heads.mask_head.predictor.bias"}


@pytest.fixture(scope="module")
def tv_state():
    torch.manual_seed(0)
    return tv_detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()


def test_a_file_that_fills_the_model_draws_no_random_numbers(tv_state):
    rng = torch.get_rng_state()
    model = from_torchvision(tv_state, verbose=False)
    assert torch.equal(torch.get_rng_state(), rng)  # layer initialisation was skipped
    report = model.load_report
    assert not (report.missing or report.mismatched or report.unexpected)
    own = model.state_dict()
    for key, value in convert_state_dict(tv_state).items():
        assert torch.equal(own[key], value), key


def test_layers_the_file_cannot_fill_keep_their_initialisation(tv_state):
    """The report names the file's own keys and shapes (background slots included)."""
    torch.manual_seed(5)
    model = from_torchvision(tv_state, num_classes=3, verbose=False)
    report = model.load_report
    assert set(report.mismatched) == {
        ("roi_heads.box_predictor.cls_score.weight", (91, 1024), (4, 1024)),
        ("roi_heads.box_predictor.cls_score.bias", (91,), (4,)),
        ("roi_heads.box_predictor.bbox_pred.weight", (364, 1024), (12, 1024)),
        ("roi_heads.box_predictor.bbox_pred.bias", (364,), (12,)),
        ("roi_heads.mask_predictor.mask_fcn_logits.weight", (91, 256, 1, 1), (3, 256, 1, 1)),
        ("roi_heads.mask_predictor.mask_fcn_logits.bias", (91,), (3,))}
    assert not (report.missing or report.unexpected)
    assert model.roi_heads.box_predictor.cls_score.weight.shape == (4, 1024)
    torch.manual_seed(5)
    initial = build_model(model.config).state_dict()  # the preset's initialisation
    own = model.state_dict()
    assert all(torch.equal(own[key], initial[key]) for key in HEADS)
    for key, value in convert_state_dict(tv_state).items():
        if key not in HEADS:
            assert torch.equal(own[key], value), key


def test_a_file_of_another_architecture_is_refused_naming_the_keys(tv_state):
    faster = {k: v for k, v in tv_state.items() if "mask" not in k}  # Faster R-CNN: no mask head
    with pytest.raises(ValueError, match=r"^the state dict: not a torchvision maskrcnn_resnet50_fpn state dict: "
                                         r"missing roi_heads.mask_head.convs.0.weight, "
                                         r"roi_heads.mask_head.convs.0.bias, roi_heads.mask_head.convs.1.weight "
                                         r"\(12 in all\)$"):
        from_torchvision(faster, num_classes=3)
    deeper = {**tv_state, "backbone.body.layer3.6.conv1.weight": torch.zeros(256, 1024, 1, 1)}  # an R-101's
    with pytest.raises(ValueError, match=r"state dict: not in the model: backbone.body.layer3.6.conv1.weight$"):
        from_torchvision(deeper)
    wider = {**tv_state, "backbone.fpn.inner_blocks.0.0.weight": torch.zeros(128, 256, 1, 1)}
    with pytest.raises(ValueError, match=r"not in the model: backbone.fpn.inner_blocks.0.0.weight "
                                         r"\(128, 256, 1, 1\)$"):
        from_torchvision(wider)


def test_only_state_dicts_of_tensors_are_read(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a pickled module: never unpickled
    torch.save({"weight": torch.zeros(1), "epoch": 3}, tmp_path / "mixed.pth")
    (tmp_path / "junk.pth").write_bytes(b"e" * 100)
    (tmp_path / "junk.safetensors").write_bytes(b"e" * 100)
    for name in ("module.pth", "mixed.pth", "junk.pth", "junk.safetensors"):
        with pytest.raises(ValueError) as info:
            read_state_dict(tmp_path / name)
        assert str(info.value) == (f"{tmp_path / name}: not a state dict of tensors; save one with "
                                   "torch.save(model.state_dict(), path)")


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return build_model(small_cpu_model(3))  # ResNet-18


@pytest.mark.parametrize("depth, blocks", [(34, "80 in the file not in it"), (50, "188 in the file not in it")])
def test_backbone_weights_of_another_depth_are_refused_and_nothing_is_loaded(small, tmp_path, depth, blocks):
    from torchvision.models import resnet34, resnet50

    torch.save((resnet34 if depth == 34 else resnet50)().state_dict(), tmp_path / "r.pth")
    before = {k: v.clone() for k, v in small.state_dict().items()}
    with pytest.raises(ValueError, match=f"^{tmp_path / 'r.pth'} holds ResNet-{depth} weights, but the model's "
                                         f"backbone is a ResNet-18 \\(.*{blocks}"):
        load_backbone_weights(small, tmp_path / "r.pth")
    assert all(torch.equal(v, before[k]) for k, v in small.state_dict().items())


def test_backbone_weights_are_refused_for_a_model_with_the_papers_conventions(tmp_path):
    """The paper preset (BGR 0-255, stride on the 1x1 conv) is set up for MSRA's weights; with the
    overrides the message gives, torchvision's ImageNet ResNet-50 loads."""
    from torchvision.models import resnet50

    from maskrcnn.config import Config, apply_overrides, paper_model

    torch.save(resnet50().state_dict(), tmp_path / "r50.pth")
    with pytest.raises(ValueError) as info:
        load_backbone_weights(build_model(paper_model(3)), tmp_path / "r50.pth")
    overrides = str(info.value).split("set ")[-1].split(" ")
    assert overrides == ["model.input.channel_order=RGB", "model.input.pixel_scale=1.0",
                         "model.input.pixel_mean=[0.485,0.456,0.406]", "model.input.pixel_std=[0.229,0.224,0.225]",
                         "model.backbone.stride_in_1x1=false"]
    cfg = apply_overrides(Config(model=paper_model(3)), overrides).model
    report = load_backbone_weights(build_model(cfg), tmp_path / "r50.pth")
    assert len(report.loaded) == len([k for k in resnet50().state_dict() if not k.startswith("fc.")
                                      and not k.endswith("num_batches_tracked")])


def test_backbone_weights_load_into_a_group_norm_backbone_without_their_running_statistics(tmp_path):
    from torchvision.models import resnet18

    from maskrcnn.config import replace_nested

    torch.save(resnet18().state_dict(), tmp_path / "r18.pth")
    model = build_model(replace_nested(small_cpu_model(3), **{"backbone.norm": "GN"}))
    report = load_backbone_weights(model, tmp_path / "r18.pth")
    tv = torch.load(tmp_path / "r18.pth")
    body = model.backbone.body.state_dict()
    assert torch.equal(body["bn1.weight"], tv["bn1.weight"]) and torch.equal(body["layer4.1.conv2.weight"],
                                                                             tv["layer4.1.conv2.weight"])
    assert not any(k.endswith("running_mean") for k in report.loaded)


def test_a_detection_model_file_is_not_backbone_weights(small, tv_state):
    with pytest.raises(ValueError, match="^the state dict holds no torchvision ResNet weights"):
        load_backbone_weights(small, tv_state)
