"""Decoders turning tower features and a condition into mask logits."""

from .cris import (
    DynamicKernelProjector,
    TextConditionedFPN,
    VisionLanguageDecoder,
    VisionLanguageDecoderLayer,
    sine_position_1d,
    sine_position_2d,
)
from .film import FiLMDecoder, PostNormTransformerLayer

__all__ = [
    "DynamicKernelProjector",
    "FiLMDecoder",
    "PostNormTransformerLayer",
    "TextConditionedFPN",
    "VisionLanguageDecoder",
    "VisionLanguageDecoderLayer",
    "sine_position_1d",
    "sine_position_2d",
]
