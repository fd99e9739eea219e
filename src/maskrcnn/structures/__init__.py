"""Typed containers for what flows between the stages: compact instance masks, boxes, images."""

from maskrcnn.structures.masks import BitMasks, PolygonMasks, RLEMasks

__all__ = ["BitMasks", "PolygonMasks", "RLEMasks"]
