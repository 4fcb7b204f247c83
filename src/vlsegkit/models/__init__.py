"""Complete vision-language segmentation models, their outputs and capabilities."""

from .base import VLSM, eval_mode, parse_text_prompts, prompts_per_image
from .biomedclipseg import BiomedCLIPSeg
from .capabilities import SupportsDecoderFeatures, SupportsHooks, SupportsUncertainty
from .clipseg import CLIPSeg
from .cris import CRIS, CRISOutput
from .medclipseg import MedCLIPSeg, MedCLIPSegPrefix
from .outputs import CLIPSegOutput, MedCLIPSegOutput, SegmentationOutput
from .tuned import TunedModel, load_tuned

__all__ = [
    "CRIS",
    "VLSM",
    "BiomedCLIPSeg",
    "CLIPSeg",
    "CLIPSegOutput",
    "CRISOutput",
    "MedCLIPSeg",
    "MedCLIPSegOutput",
    "MedCLIPSegPrefix",
    "SegmentationOutput",
    "SupportsDecoderFeatures",
    "SupportsHooks",
    "SupportsUncertainty",
    "TunedModel",
    "eval_mode",
    "load_tuned",
    "parse_text_prompts",
    "prompts_per_image",
]
