"""Complete vision-language segmentation models."""

from .base import VLSM, SegmentationOutput
from .clipseg import CLIPSeg
from .medclipseg import MedCLIPSeg as MedCLIPSeg

__all__ = ["VLSM", "CLIPSeg", "SegmentationOutput"]
