"""maskrcnn: a readable, fast, from-scratch PyTorch implementation of Mask R-CNN.

>>> import maskrcnn
>>> config = maskrcnn.config.small_cpu_model(num_classes=3)
>>> config.backbone.depth
18
"""

from maskrcnn import config

__all__ = ["config"]
__version__ = "0.1.0"
