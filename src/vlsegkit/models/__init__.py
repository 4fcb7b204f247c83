"""Complete vision-language segmentation models."""

from .base import VLSM, SegmentationOutput
from .clipseg import CLIPSeg
from .medclipseg import MedCLIPSeg, MedCLIPSegLoss

__all__ = ["VLSM", "CLIPSeg", "MedCLIPSeg", "MedCLIPSegLoss", "SegmentationOutput"]
