"""The Python API: load weights, segment images.

>>> predictor = maskrcnn.load("demo_out/model.safetensors")  # doctest: +SKIP
>>> instances = predictor("photo.jpg")  # doctest: +SKIP
>>> instances.class_names, instances.scores, instances.masks.shape  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from maskrcnn.config import ConfigError, check_device
from maskrcnn.data.transforms import image_tensor, load_image, to_uint8
from maskrcnn.modeling.mask_rcnn import MaskRCNN, build_model
from maskrcnn.structures.instances import Instances
from maskrcnn.weights import read_weights


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is the GPU when there is one, else the CPU; ``ConfigError`` for a name torch
    does not know, or a CUDA GPU that torch does not see."""
    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    found = torch.device(device)
    if found.type == "cuda" and (found.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device: {device}, but torch sees {torch.cuda.device_count()} CUDA GPUs"
                          f"{'' if torch.version.cuda else ' (this torch is built without CUDA)'}; "
                          "use cpu, or auto to take the GPU when there is one")
    return found


def to_image_tensor(image) -> Tensor:
    """A path, PIL image, (H, W[, C]) array or (3, H, W) tensor -> (3, H, W) uint8/float RGB.

    Files and PIL images are read as ``load_image`` reads them (upright, 8-bit RGB). An
    integer array other than uint8 is scaled to 8 bits (uint16: its full range); a float array
    is taken to hold values in [0, 1], as a float tensor is."""
    if isinstance(image, Tensor):
        return image
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return image_tensor(image)
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        if array.ndim != 3 or array.shape[2] not in (3, 4):
            raise ValueError(f"expected an (H, W, 3) RGB array, got shape {array.shape}")
        if array.dtype.kind in "iu" and array.dtype != np.uint8:
            array = to_uint8(array, sixteen_bit=array.dtype == np.uint16)
        tensor = torch.from_numpy(array[..., :3].copy()).permute(2, 0, 1)  # owned and writable
        return tensor if tensor.dtype == torch.uint8 else tensor.float()
    raise TypeError(f"cannot read an image from {type(image).__name__}")


class Predictor:
    """Runs a model in inference mode on single images or lists of them.

    >>> predictor = Predictor(model, class_names=["circle", "triangle"])  # doctest: +SKIP
    >>> predictor(PIL.Image.open("x.png")).scores  # doctest: +SKIP
    """

    def __init__(self, model: MaskRCNN, *, class_names: list[str] | None = None,
                 category_ids: list[int] | None = None, score_threshold: float = 0.5,
                 device: str = "auto"):
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        k = model.num_classes
        self.class_names = list(class_names) if class_names else [f"class_{i}" for i in range(1, k + 1)]
        self.category_ids = list(category_ids) if category_ids else list(range(1, k + 1))
        self.score_threshold = score_threshold

    def __call__(self, image) -> Instances:
        return self.predict([image])[0]

    def predict(self, images: list) -> list[Instances]:
        """Instances for each image. On the CPU each image runs on its own: a batch is padded
        to its largest height and width and only grows the working set there (R50-FPN on 2 Zen
        3 cores, three images of 480x640 together took 1.06x the time of one at a time, and
        1.42x with one of them 640x480), and each image's result is then its own, whatever else
        was in the list. On a GPU the list runs as one batch."""
        tensors = [to_image_tensor(im).to(self.device) for im in images]
        # detections below the threshold are dropped before their masks are computed
        with torch.inference_mode():
            if self.device.type == "cpu":
                outputs = [self.model([t], min_score=self.score_threshold)[0] for t in tensors]
            else:
                outputs = self.model(tensors, min_score=self.score_threshold)
        results = []
        for out in outputs:
            labels = out["labels"].cpu()
            results.append(Instances(
                boxes=out["boxes"].cpu(), labels=labels,
                category_ids=[self.category_ids[i - 1] for i in labels.tolist()],
                class_names=[self.class_names[i - 1] for i in labels.tolist()],
                scores=out["scores"].cpu(), masks=out["masks"].cpu(), mask_regions=out["mask_regions"]))
        return results


def load(weights: str | Path, *, device: str = "auto", score_threshold: float = 0.5,
         bf16: bool = False) -> Predictor:
    """A predictor from a weight file written by training, the demo or ``maskrcnn convert``.
    ``bf16=True`` is the opt-in bfloat16 mode (``MaskRCNN.use_bf16``).

    >>> predictor = load("demo_out/model.safetensors")  # doctest: +SKIP
    """
    state, config, names, ids = read_weights(weights)
    model = build_model(config, random_init=False)
    model.load_state_dict(state)  # strict: every tensor comes from the file
    model.optimize_for_inference()
    predictor = Predictor(model, class_names=names, category_ids=ids, score_threshold=score_threshold,
                          device=device)
    predictor.model.use_bf16(bf16)
    return predictor
