"""vlsegkit: text-driven (vision-language) medical image segmentation in PyTorch."""

from ._version import __version__
from .decoders import FiLMDecoder
from .encoders import TokenState, Tower
from .hub import CheckpointError
from .layers import PixelTextHead, PVLAdapter, PVLAttention
from .losses import DiceBCELoss, SoftPatchContrastiveLoss
from .models import VLSM, CLIPSeg, MedCLIPSeg, MedCLIPSegLoss, SegmentationOutput
from .ops import probabilistic_attention
from .prompts import (
    VPT,
    CoCoOp,
    CoOp,
    LearnableUpsampler,
    MaPLe,
    SharedAttention,
    SharedSeparate,
    TunedModel,
    load_tuned,
)
from .registry import create_model, list_models
from .tokenizers import BertTokenizer, CLIPTokenizer, TextBatch, load_tokenizer

__all__ = [
    "VLSM",
    "VPT",
    "BertTokenizer",
    "CLIPSeg",
    "CLIPTokenizer",
    "CheckpointError",
    "CoCoOp",
    "CoOp",
    "DiceBCELoss",
    "FiLMDecoder",
    "LearnableUpsampler",
    "MaPLe",
    "MedCLIPSeg",
    "MedCLIPSegLoss",
    "PVLAdapter",
    "PVLAttention",
    "PixelTextHead",
    "SegmentationOutput",
    "SharedAttention",
    "SharedSeparate",
    "SoftPatchContrastiveLoss",
    "TextBatch",
    "TokenState",
    "Tower",
    "TunedModel",
    "__version__",
    "create_model",
    "list_models",
    "load_tokenizer",
    "load_tuned",
    "probabilistic_attention",
]
