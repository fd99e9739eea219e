import pytest
import torch
import torch.nn.functional as F

from maskrcnn.config import small_cpu_model
from maskrcnn.modeling.mask_rcnn import build_model
from maskrcnn.modeling.transform import resize, resize_scale


@pytest.mark.parametrize("hw", [(480, 640), (300, 1333), (333, 500), (17, 23)])
def test_floored_resize_is_torchvisions_call(hw):
    x = torch.rand(3, *hw, generator=torch.Generator().manual_seed(0))
    scale = resize_scale(hw, 800, 1333)
    expected = F.interpolate(x[None], scale_factor=scale, mode="bilinear",
                             recompute_scale_factor=True, align_corners=False)[0]
    got = resize(x, scale, "floor")
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


@pytest.mark.parametrize("rounding", ["floor", "round"])
def test_resize_keeps_at_least_one_pixel(rounding):
    x = torch.rand(3, 2, 3000)
    scale = resize_scale((2, 3000), 800, 1333)  # 2 * 0.444 = 0.89 px high
    assert resize(x, scale, rounding).shape == (3, 1, 1333)
    assert resize(torch.rand(3, 3000, 1), scale, rounding).shape == (3, 1333, 1)


def test_model_predicts_on_a_thin_panorama():
    torch.manual_seed(0)
    model = build_model(small_cpu_model(3)).eval()
    with torch.inference_mode():
        out = model([torch.rand(3, 1, 500)])[0]  # 1 x 384 after resizing
    assert out["masks"].shape[1:] == (1, 500)
    assert out["boxes"].shape == (out["masks"].shape[0], 4)


@pytest.mark.parametrize("shape", [(3, 0, 10), (3, 10, 0)])
def test_an_empty_image_is_refused_clearly(shape):
    model = build_model(small_cpu_model(3)).eval()
    with pytest.raises(ValueError, match=r"image 1 of the batch: the image is empty"):
        model([torch.rand(3, 5, 5), torch.rand(shape)])
