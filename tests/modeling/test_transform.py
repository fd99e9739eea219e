import pytest
import torch
import torch.nn.functional as F

from maskrcnn.config import paper_model, small_cpu_model, torchvision_model
from maskrcnn.modeling.mask_rcnn import build_model
from maskrcnn.modeling.transform import normalize, resize, resize_scale


@pytest.mark.parametrize("hw", [(480, 640), (300, 1333), (333, 500), (17, 23)])
def test_floored_resize_is_torchvisions_call(hw):
    x = torch.rand(3, *hw, generator=torch.Generator().manual_seed(0))
    scale = resize_scale(hw, 800, 1333)
    expected = F.interpolate(x[None], scale_factor=scale, mode="bilinear",
                             recompute_scale_factor=True, align_corners=False)[0]
    got = resize(x, scale, "floor")
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


@pytest.mark.parametrize("hw", [(1600, 2000), (600, 500), (17, 23)])  # shrunk, enlarged
def test_rounded_resize_is_detectron2s_pil_resize(hw):
    """Detectron2 resizes uint8 images with PIL's bilinear filter (antialiased when shrinking)
    and masks with PIL's nearest neighbour, to sizes rounded to the nearest pixel."""
    import numpy as np
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.rand(1, 3, hw[0] // 8 + 2, hw[1] // 8 + 2, generator=g), size=hw,
                           mode="bilinear")[0]  # a photo-like image: texture at several scales
    image = (smooth * 200 + torch.rand(3, *hw, generator=g) * 55).to(torch.uint8)
    scale = resize_scale(hw, 800, 1000)
    got = resize(image.float(), scale, "round")
    h, w = got.shape[-2:]
    assert (h, w) == (int(hw[0] * scale + 0.5), int(hw[1] * scale + 0.5))
    pil = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((w, h), Image.BILINEAR)
    expected = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float()
    assert (got - expected).abs().mean() < 0.5 and (got - expected).abs().max() <= 2  # PIL rounds to uint8
    mask = torch.rand(1, *hw, generator=g) > 0.5
    got = resize(mask.float(), scale, "round", "nearest")[0] > 0.5
    pil = Image.fromarray(mask[0].numpy()).resize((w, h), Image.NEAREST)
    assert torch.equal(got, torch.from_numpy(np.array(pil)))


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


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
@pytest.mark.parametrize("preset", [torchvision_model, paper_model])
def test_normalize_is_the_conventions_formula_and_leaves_its_input_alone(dtype, preset):
    """torchvision: RGB in [0, 1], minus its mean, over its std; the paper: BGR in 0-255."""
    cfg = preset().input
    g = torch.Generator().manual_seed(0)
    image = (torch.rand(3, 9, 11, generator=g) * 255).to(dtype) if dtype == torch.uint8 else \
        torch.rand(3, 9, 11, generator=g, dtype=dtype)
    before = image.clone()
    x = image.float() / 255 if dtype == torch.uint8 else image.float()
    if cfg.channel_order == "BGR":
        x = x.flip(0)
    mean, std = (torch.tensor(v)[:, None, None] for v in (cfg.pixel_mean, cfg.pixel_std))
    assert torch.equal(normalize(image, cfg), (x * cfg.pixel_scale - mean) / std)
    assert torch.equal(image, before)
