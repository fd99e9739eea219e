import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn.data.transforms import TrainTransform, hflip, load_image, resize_shortest_edge, shortest_edge_size
from maskrcnn.structures.masks import BitMasks, PolygonMasks, RLEMasks


def chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(2, 0, 1)


@pytest.fixture
def pattern():
    """A 10x20 RGB image whose left quarter is white and the rest a colour ramp."""
    rgb = np.zeros((10, 20, 3), np.uint8)
    rgb[..., 0] = np.arange(20) * 10
    rgb[..., 1] = 60
    rgb[:, :5] = 255
    return rgb


def test_exif_orientation_is_applied(tmp_path, pattern):
    im = Image.fromarray(pattern)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "r.png", exif=exif)  # PNG keeps the pixels exact
    loaded = load_image(tmp_path / "r.png")
    assert loaded.shape == (3, 20, 10)
    # displayed upright, the white quarter (left when stored) is at the top
    assert torch.equal(loaded, chw(np.rot90(pattern, k=-1).copy()))


def test_grayscale_palette_and_la_become_rgb(tmp_path, pattern):
    gray = pattern[..., 0]
    Image.fromarray(gray).save(tmp_path / "g.png")
    assert torch.equal(load_image(tmp_path / "g.png"), chw(np.repeat(gray[..., None], 3, 2)))
    Image.fromarray(pattern).convert("P").save(tmp_path / "p.png")
    palette = load_image(tmp_path / "p.png")
    assert palette.shape == (3, 10, 20) and palette.dtype == torch.uint8
    Image.fromarray(gray).convert("LA").save(tmp_path / "la.png")
    assert torch.equal(load_image(tmp_path / "la.png"), chw(np.repeat(gray[..., None], 3, 2)))


def test_alpha_is_dropped(tmp_path, pattern):
    alpha = np.full((10, 20, 1), 7, np.uint8)  # nearly transparent: the colours still count
    Image.fromarray(np.concatenate([pattern, alpha], 2)).save(tmp_path / "a.png")
    assert torch.equal(load_image(tmp_path / "a.png"), chw(pattern))
    im = Image.fromarray(pattern).convert("P")
    im.info["transparency"] = 0
    im.save(tmp_path / "pt.png", transparency=0)
    assert load_image(tmp_path / "pt.png").shape == (3, 10, 20)


def test_sixteen_bit_images_use_their_full_range(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    loaded = load_image(tmp_path / "d.png")
    assert loaded.dtype == torch.uint8 and loaded.shape == (3, 1, 4)
    assert loaded[0, 0].tolist() == [0, 1, 128, 255]
    assert torch.equal(loaded[0], loaded[2])


def test_32_bit_images_are_scaled_by_their_range(tmp_path):
    Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32), mode="I").save(tmp_path / "i8.tif")
    assert load_image(tmp_path / "i8.tif")[0, 0].tolist() == [0, 100, 255]
    Image.fromarray(np.array([[-10.0, 0.0, 10.0]], dtype=np.float32), mode="F").save(tmp_path / "f.tif")
    assert load_image(tmp_path / "f.tif")[0, 0].tolist() == [0, 128, 255]


def test_hflip_moves_image_boxes_and_every_mask_type_together():
    image = torch.arange(3 * 4 * 10, dtype=torch.uint8).view(3, 4, 10)
    poly = PolygonMasks([[np.array([1.0, 0, 3, 0, 3, 2, 1, 2])]], 4, 10)
    boxes = torch.tensor([[1.0, 0, 3, 2]])
    for masks in (poly, RLEMasks(poly.to_rles(), 4, 10), BitMasks(poly.to_tensor())):
        target = {"boxes": boxes, "masks": masks, "labels": torch.tensor([1]), "image_id": 5}
        flipped, t = hflip(image, target)
        assert torch.equal(flipped, image.flip(-1))
        assert t["boxes"].tolist() == [[7, 0, 9, 2]]
        dense = t["masks"].to_tensor()[0]
        assert dense[:2, 7:9].all() and dense.sum() == 4
        # the flipped box still fits the flipped mask exactly
        assert t["masks"].boxes().tolist() == t["boxes"].tolist()
        assert t["image_id"] == 5 and target["boxes"] is boxes  # the input is left alone
    plain = hflip(image, {"boxes": boxes, "masks": poly.to_tensor()})[1]["masks"]
    assert torch.equal(plain, poly.to_tensor().flip(-1))


def test_train_transform_flips_with_its_probability():
    image = torch.arange(6, dtype=torch.uint8).view(1, 1, 6).expand(3, 1, 6)
    target = {"boxes": torch.tensor([[0.0, 0, 1, 1]])}
    never, always = TrainTransform(0.0), TrainTransform(1.0)
    assert torch.equal(never(image, target)[0], image)
    assert torch.equal(always(image, target)[0], image.flip(-1))
    half = TrainTransform(0.5)
    g = torch.Generator().manual_seed(0)
    flips = [bool(half(image, target, generator=g)[0][0, 0, 0] == 5) for _ in range(400)]
    assert 150 < sum(flips) < 250
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert [half(image, target, g1)[1]["boxes"].tolist() for _ in range(8)] == \
           [half(image, target, g2)[1]["boxes"].tolist() for _ in range(8)]


def test_shortest_edge_rule():
    assert shortest_edge_size(480, 640, 800, 1333) == (800, 1067)
    assert shortest_edge_size(500, 2000, 800, 1333) == (333, 1333)  # the long side caps the scale
    assert shortest_edge_size(640, 480, 800, 1333) == (1067, 800)
    assert shortest_edge_size(100, 100, 224, 320) == (224, 224)


def test_resize_shortest_edge_scales_boxes_and_keeps_masks_compact():
    image = torch.zeros(3, 20, 40, dtype=torch.uint8)
    image[:, 5:10, 10:20] = 200
    poly = PolygonMasks([[np.array([10.0, 5, 20, 5, 20, 10, 10, 10])]], 20, 40)
    target = {"boxes": torch.tensor([[10.0, 5, 20, 10]]), "masks": poly}
    resized, t = resize_shortest_edge(image, target, 40, 1000)
    assert resized.shape == (3, 40, 80) and resized.dtype == torch.uint8
    assert resized[0, 12:18, 22:38].eq(200).all()
    assert t["boxes"].tolist() == [[20, 10, 40, 20]]
    assert isinstance(t["masks"], PolygonMasks) and t["masks"].area().tolist() == [200.0]
    rle_t = resize_shortest_edge(image, {"boxes": target["boxes"], "masks": RLEMasks(poly.to_rles(), 20, 40)},
                                 40, 1000)[1]
    assert isinstance(rle_t["masks"], RLEMasks)
    assert torch.equal(rle_t["masks"].to_tensor(), t["masks"].to_tensor())


def test_images_without_instances_flip_and_resize():
    image = torch.zeros(3, 10, 20, dtype=torch.uint8)
    for masks in (PolygonMasks([], 10, 20), RLEMasks([], 10, 20)):
        target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "masks": masks}
        _, flipped = hflip(image, target)
        assert flipped["boxes"].shape == (0, 4) and len(flipped["masks"]) == 0
        resized, t = resize_shortest_edge(image, target, 20, 100)
        assert resized.shape == (3, 20, 40) and t["boxes"].shape == (0, 4)
        assert (t["masks"].height, t["masks"].width) == (20, 40)
