"""vlsegkit: text-driven (vision-language) medical image segmentation in PyTorch."""

from ._version import __version__
from .decoders import FiLMDecoder
from .encoders import TokenState, Tower
from .hub import CheckpointError
from .models import VLSM, CLIPSeg, SegmentationOutput
from .registry import create_model, list_models

__all__ = [
    "VLSM",
    "CLIPSeg",
    "CheckpointError",
    "FiLMDecoder",
    "SegmentationOutput",
    "TokenState",
    "Tower",
    "__version__",
    "create_model",
    "list_models",
]
