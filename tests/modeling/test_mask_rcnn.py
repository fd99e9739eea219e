import pytest
import torch

from maskrcnn.config import replace_nested, small_cpu_model
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
