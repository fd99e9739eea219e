import numpy as np
import torch
from PIL import Image, ImageDraw

from maskrcnn.structures.instances import Instances
from maskrcnn.visualize import _label_font, instance_colours, overlay


def test_overlay_blends_each_mask_in_turn_where_it_is_set():
    """Every pixel of each mask, and only those, moves halfway to the mask's colour, masks in
    order (so where two overlap the second blends over the first); empty masks change nothing."""
    g = torch.Generator().manual_seed(0)
    image = (torch.rand(3, 40, 60, generator=g) * 255).to(torch.uint8)
    masks = torch.zeros(3, 40, 60, dtype=torch.bool)
    masks[0, 5:20, 10:30] = True
    masks[1, 15:38, 25:59] = torch.rand(23, 34, generator=g) > 0.5
    # boxes inside the masks, so that the outlines drawn on top leave the masks' edges visible
    boxes = torch.tensor([[14.0, 12.0, 24.0, 16.0], [32.0, 24.0, 50.0, 32.0],
                          [0.0, 0.0, 1.0, 1.0]])
    inst = Instances(boxes, torch.tensor([1, 2, 1]), [1, 2, 1], ["a", "b", "a"],
                     torch.tensor([0.9, 0.8, 0.1]), masks)
    expected = image.permute(1, 2, 0).numpy().astype(np.float32)
    for mask, colour in zip(masks.numpy(), instance_colours(3)):
        expected[mask] = 0.5 * expected[mask] + 0.5 * np.array(colour, np.float32)
    got = np.asarray(overlay(image, inst))
    # boxes and labels are drawn on top: leave out the pixels they cover (where an overlay that
    # blends nothing differs from the image)
    plain = image.permute(1, 2, 0).numpy()
    away = ~np.any(np.asarray(overlay(image, inst, alpha=0.0)) != plain, -1)
    assert away.sum() > 1000 and (masks[0].numpy() & masks[1].numpy() & away).any()
    assert np.array_equal(got[away], expected.astype(np.uint8)[away])
    # with the regions the masks were pasted into, the same picture
    inst.mask_regions = torch.tensor([[10, 5, 30, 20], [20, 10, 60, 40], [0, 0, 0, 0]])
    assert np.array_equal(np.asarray(overlay(image, inst)), got)


def test_labels_are_backed_as_wide_as_their_text_and_a_mismatched_image_is_refused():
    import pytest

    image = torch.full((3, 60, 200), 255, dtype=torch.uint8)
    masks = torch.zeros(2, 60, 200, dtype=torch.bool)
    boxes = torch.tensor([[2.0, 20.0, 30.0, 50.0], [130.0, 20.0, 150.0, 50.0]])  # labels apart
    inst = Instances(boxes, torch.tensor([1, 2]), [1, 2], ["MMMMMMMM", "círculo"], torch.tensor([0.93, 0.5]),
                     masks)
    got = np.asarray(overlay(image, inst))
    for box, name, colour in zip(boxes.tolist(), ["MMMMMMMM 0.93", "círculo 0.50"], instance_colours(2)):
        x0, y0 = int(box[0]), int(box[1]) - 13
        row = got[y0 + 4:y0 + 12, x0:].reshape(-1, 3)  # the label's band
        band = got[y0:y0 + 13, x0:]
        coloured = np.flatnonzero(np.all(band == colour, -1).any(0))  # columns with background
        text = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), name, font=_label_font())
        assert coloured.max() + 1 >= text[2], name  # the background reaches the text's end
        assert (row == 0).all(-1).any(), name  # black text is drawn on it
    with pytest.raises(ValueError, match=r"the masks are \(60, 200\) \(H, W\) but the image is \(200, 60\)"):
        overlay(image.transpose(1, 2), inst)
