"""The Python API's predictor."""

import pytest
import torch

from maskrcnn.api import Predictor, load, pick_device
from maskrcnn.config import ConfigError, small_cpu_model
from maskrcnn.evaluation.coco_eval import encode_masks
from maskrcnn.modeling.mask_rcnn import build_model
from maskrcnn.weights import save_weights


def test_predictor_runs_each_image_alone_on_the_cpu():
    """A list of images of three sizes: one model call per image, and each image's instances
    are those it gets on its own."""
    torch.manual_seed(0)
    model = build_model(small_cpu_model(3))
    predictor = Predictor(model, score_threshold=0.0, device="cpu")
    calls = []
    real = model.forward
    model.forward = lambda images, *a, **k: calls.append(len(images)) or real(images, *a, **k)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=g) for h, w in ((96, 128), (128, 96), (80, 80))]
    together = predictor.predict(images)
    assert calls == [1, 1, 1]
    for image, inst in zip(images, together):
        alone = predictor(image)
        assert len(inst) == len(alone) > 0
        for field in ("boxes", "labels", "scores", "masks"):
            assert torch.equal(getattr(inst, field), getattr(alone, field)), field


def test_load_draws_no_random_numbers_and_takes_every_weight_from_the_file(tmp_path):
    torch.manual_seed(0)
    model = build_model(small_cpu_model(3))
    path = save_weights(tmp_path / "w.safetensors", model, class_names=["a", "b", "c"])
    rng = torch.get_rng_state()
    predictor = load(path, device="cpu", score_threshold=0.0)
    assert torch.equal(torch.get_rng_state(), rng)  # layer initialisation was skipped
    model.optimize_for_inference()
    loaded = predictor.model.state_dict()
    assert loaded.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value), key
    image = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model([image])[0]
    got = predictor(image)
    assert len(got) == len(expected["scores"]) > 0
    assert torch.equal(got.boxes, expected["boxes"]) and torch.equal(got.masks, expected["masks"])


def test_detections_below_the_threshold_get_no_mask_computed():
    """The predictor's threshold applies before the mask head: it sees only the detections
    kept, and they come out as the model's own outputs filtered afterwards."""
    torch.manual_seed(0)
    model = build_model(small_cpu_model(3)).eval()
    image = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        everything = model([image])[0]
    threshold = everything["scores"].median().item()
    keep = everything["scores"] >= threshold
    assert 0 < keep.sum() < len(keep)
    seen = []
    real = model.roi_heads.mask_head.forward
    model.roi_heads.mask_head.forward = lambda x, labels: seen.append(len(x)) or real(x, labels)
    got = Predictor(model, score_threshold=threshold, device="cpu")(image)
    assert seen == [int(keep.sum())]
    assert torch.equal(got.scores, everything["scores"][keep])
    assert torch.equal(got.boxes, everything["boxes"][keep])
    assert torch.equal(got.masks, everything["masks"][keep])


def test_instances_name_the_regions_their_masks_were_pasted_into():
    """Each mask is empty outside its region, indexing keeps the regions, and the COCO results,
    which read only the regions, equal those of the whole masks."""
    torch.manual_seed(0)
    predictor = Predictor(build_model(small_cpu_model(3)), score_threshold=0.0, device="cpu")
    inst = predictor(torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0)))
    assert len(inst) > 2 and inst.mask_regions.shape == (len(inst), 4)
    for mask, (x0, y0, x1, y1) in zip(inst.masks, inst.mask_regions.tolist()):
        assert (x1 - x0) * (y1 - y0) < mask.numel()
        outside = mask.clone()
        outside[y0:y1, x0:x1] = False
        assert not outside.any()
    assert torch.equal(inst[[2, 0]].mask_regions, inst.mask_regions[[2, 0]])
    assert inst.masks.any() and encode_masks(inst.masks, inst.mask_regions) == encode_masks(inst.masks)


def test_a_gpu_that_torch_does_not_see_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match="device: cuda:1, but torch sees 1 CUDA GPUs.*; use cpu, or auto"):
        pick_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match="device: cuda, but torch sees 0 CUDA GPUs"):
        pick_device("cuda")
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        Predictor(build_model(small_cpu_model(3)), device="gpu")


def test_a_pil_image_or_an_array_reads_as_its_file_does(tmp_path):
    """16-bit and EXIF-rotated images, given as PIL images, are read as from their files; a
    uint16 array is scaled from its full range."""
    import numpy as np
    from PIL import Image

    from maskrcnn.api import to_image_tensor

    deep = (np.arange(12 * 20, dtype=np.uint16).reshape(12, 20) * 250).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    rotated = Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 20, 3), dtype=np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6  # displayed turned by 90 degrees
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    for name in ("deep.png", "rotated.jpg"):
        with Image.open(tmp_path / name) as im:
            assert torch.equal(to_image_tensor(im), to_image_tensor(tmp_path / name)), name
    assert to_image_tensor(tmp_path / "rotated.jpg").shape == (3, 20, 12)
    from_array = to_image_tensor(np.repeat(deep[..., None], 3, 2))
    assert from_array.dtype == torch.uint8 and torch.equal(from_array, to_image_tensor(tmp_path / "deep.png"))


def test_a_torch_device_object_is_taken_as_it_is():
    assert pick_device(torch.device("cpu")) == torch.device("cpu")
    model = build_model(small_cpu_model(3))
    assert Predictor(model, device=torch.device("cpu")).device == torch.device("cpu")
