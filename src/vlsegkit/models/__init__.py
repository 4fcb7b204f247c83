"""Complete vision-language segmentation models."""

from .base import VLSM, SegmentationOutput
from .clipseg import CLIPSeg

__all__ = ["VLSM", "CLIPSeg", "SegmentationOutput"]
