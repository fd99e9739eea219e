"""maskrcnn: a readable, fast, from-scratch PyTorch implementation of Mask R-CNN.

>>> import maskrcnn
>>> model = maskrcnn.build_model(maskrcnn.config.small_cpu_model(num_classes=3))
>>> predictor = maskrcnn.load("demo_out/model.safetensors")  # doctest: +SKIP
"""

from maskrcnn import config, visualize
from maskrcnn.api import Predictor, load
from maskrcnn.interop.torchvision import from_torchvision
from maskrcnn.modeling.mask_rcnn import build_model

__all__ = ["config", "visualize", "Predictor", "load", "from_torchvision", "build_model"]
__version__ = "0.1.0"
