"""Learning works: the small CPU model overfits one image with three overlapping instances."""

import math

import pytest
import torch

from maskrcnn.config import small_cpu_model
from maskrcnn.modeling.mask_rcnn import build_model


def three_overlapping_instances():
    h, w = 200, 256
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    disc = ((xx - 90) ** 2 + (yy - 100) ** 2) < 55**2
    square = (xx >= 110) & (xx < 200) & (yy >= 40) & (yy < 130)
    triangle = (yy >= 90) & (yy < 180) & ((xx - 150).abs() < (yy - 90))
    # later shapes occlude earlier ones; the visible parts are the instance masks
    triangle_vis = triangle
    square_vis = square & ~triangle
    disc_vis = disc & ~square & ~triangle
    masks = torch.stack([disc_vis, square_vis, triangle_vis]).to(torch.uint8)
    g = torch.Generator().manual_seed(0)
    image = 0.3 + 0.2 * torch.rand(3, h, w, generator=g)
    for m, colour in zip(masks, ([0.9, 0.2, 0.2], [0.2, 0.8, 0.3], [0.2, 0.3, 0.9])):
        image = torch.where(m.bool(), torch.tensor(colour)[:, None, None], image)
    boxes = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32),
              "labels": torch.tensor([1, 2, 3]), "masks": masks}
    return image, target


@pytest.mark.slow
def test_small_model_overfits_one_image():
    torch.manual_seed(0)
    image, target = three_overlapping_instances()
    model = build_model(small_cpu_model(num_classes=3))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    iterations = 300
    for it in range(iterations):
        # linear warm-up, then cosine decay: the last iterate settles instead of jittering
        scale = min(1.0, (it + 1) / 50) * 0.5 * (1 + math.cos(math.pi * it / iterations))
        for group in opt.param_groups:
            group["lr"] = 0.01 * scale
        losses = model([image], [target])
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        (out,) = model([image])
    for i in range(3):
        hits = out["labels"] == target["labels"][i]
        assert hits.any(), f"instance {i} not detected"
        gt = target["masks"][i].bool()
        ious = [((m & gt).sum() / (m | gt).sum()).item() for m in out["masks"][hits]]
        assert max(ious) >= 0.9, (i, ious)
