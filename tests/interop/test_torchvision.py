"""Building a model from torchvision's weights: layers the file fills are never initialised,
layers it cannot fill keep their initialisation."""

import pytest
import torch

tv_detection = pytest.importorskip("torchvision.models.detection")

from maskrcnn.interop.torchvision import convert_state_dict, from_torchvision  # noqa: E402


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
    model = from_torchvision(tv_state, num_classes=3, verbose=False)
    report = model.load_report
    mismatched = {key for key, _, _ in report.mismatched}
    assert mismatched == {"roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
                          "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias",
                          "roi_heads.mask_head.predictor.weight", "roi_heads.mask_head.predictor.bias"}
    predictor = model.roi_heads.box_predictor
    assert predictor.cls_score.weight.shape == (4, 1024)
    assert abs(predictor.cls_score.weight.std().item() - 0.01) < 0.002  # normal_(std=0.01)
    assert torch.equal(predictor.cls_score.bias, torch.zeros(4))
    assert torch.equal(model.roi_heads.mask_head.predictor.bias, torch.zeros(3))
    own = model.state_dict()
    for key, value in convert_state_dict(tv_state).items():
        if key not in mismatched:
            assert torch.equal(own[key], value), key
