"""Reusable layers: adapters, attention blocks and decoder heads."""

from vlsegkit.layers.pixel_text_head import LayerNorm2d, PixelTextHead, ScaleBlock
from vlsegkit.layers.pvl import PVLAdapter, PVLAttention, PVLTwoWayLayer
from vlsegkit.layers.sankd import (
    SANKD,
    CLSEmbeddingPredictor,
    MappingModule,
    sankd_kl_divergence,
)
from vlsegkit.layers.upsampler import LearnableUpsampler

__all__ = [
    "SANKD",
    "CLSEmbeddingPredictor",
    "LayerNorm2d",
    "LearnableUpsampler",
    "MappingModule",
    "PVLAdapter",
    "PVLAttention",
    "PVLTwoWayLayer",
    "PixelTextHead",
    "ScaleBlock",
    "sankd_kl_divergence",
]
