"""Complete vision-language segmentation models, their outputs and capabilities."""

from .base import VLSM, eval_mode, parse_text_prompts, prompts_per_image
from .capabilities import (
    SupportsDecoderFeatures,
    SupportsHooks,
    SupportsTextFree,
    SupportsUncertainty,
)
from .clipseg import CLIPSeg
from .cotexnet import CoTexNet, CoTexNetOutput, CoTexNetText
from .medclipseg import MedCLIPSeg, MedCLIPSegPrefix
from .outputs import CLIPSegOutput, MedCLIPSegOutput, SegmentationOutput
from .tuned import TunedModel, load_tuned

__all__ = [
    "VLSM",
    "CLIPSeg",
    "CLIPSegOutput",
    "CoTexNet",
    "CoTexNetOutput",
    "CoTexNetText",
    "MedCLIPSeg",
    "MedCLIPSegOutput",
    "MedCLIPSegPrefix",
    "SegmentationOutput",
    "SupportsDecoderFeatures",
    "SupportsHooks",
    "SupportsTextFree",
    "SupportsUncertainty",
    "TunedModel",
    "eval_mode",
    "load_tuned",
    "parse_text_prompts",
    "prompts_per_image",
]
