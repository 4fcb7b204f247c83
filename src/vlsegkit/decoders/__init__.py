"""Decoders turning tower features and a condition into mask logits."""

from .film import FiLMDecoder, PostNormTransformerLayer

__all__ = ["FiLMDecoder", "PostNormTransformerLayer"]
