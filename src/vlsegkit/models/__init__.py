"""Complete vision-language segmentation models (and the dual encoder contrastive fine-tuning
trains), their outputs and capabilities."""

from .base import VLSM, eval_mode, parse_text_prompts, prompts_per_image
from .biomedclipseg import BiomedCLIPSeg
from .capabilities import (
    SupportsDecoderFeatures,
    SupportsHooks,
    SupportsRetrieval,
    SupportsTextFree,
    SupportsUncertainty,
)
from .clipseg import CLIPSeg
from .cotexnet import CoTexNet, CoTexNetOutput, CoTexNetText
from .cris import CRIS, CRISOutput
from .dual_encoder import DualEncoder, DualEncoderOutput
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
    "CoTexNet",
    "CoTexNetOutput",
    "CoTexNetText",
    "DualEncoder",
    "DualEncoderOutput",
    "MedCLIPSeg",
    "MedCLIPSegOutput",
    "MedCLIPSegPrefix",
    "SegmentationOutput",
    "SupportsDecoderFeatures",
    "SupportsHooks",
    "SupportsRetrieval",
    "SupportsTextFree",
    "SupportsUncertainty",
    "TunedModel",
    "eval_mode",
    "load_tuned",
    "parse_text_prompts",
    "prompts_per_image",
]
