"""The Python API's predictor."""

import torch

from maskrcnn.api import Predictor
from maskrcnn.config import small_cpu_model
from maskrcnn.modeling.mask_rcnn import build_model


def test_predictor_runs_each_image_alone_on_the_cpu():
    """A list of images of three sizes: one model call per image, and each image's instances
    are those it gets on its own."""
    torch.manual_seed(0)
    model = build_model(small_cpu_model(3))
    predictor = Predictor(model, score_threshold=0.0, device="cpu")
    calls = []
    real = model.forward
    model.forward = lambda images, *a: calls.append(len(images)) or real(images, *a)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=g) for h, w in ((96, 128), (128, 96), (80, 80))]
    together = predictor.predict(images)
    assert calls == [1, 1, 1]
    for image, inst in zip(images, together):
        alone = predictor(image)
        assert len(inst) == len(alone) > 0
        for field in ("boxes", "labels", "scores", "masks"):
            assert torch.equal(getattr(inst, field), getattr(alone, field)), field
