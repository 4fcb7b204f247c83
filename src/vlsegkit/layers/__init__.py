"""Reusable layers: adapters, attention blocks and decoder heads."""

from vlsegkit.layers.pixel_text_head import LayerNorm2d, PixelTextHead, ScaleBlock
from vlsegkit.layers.pvl import PVLAdapter, PVLAttention, PVLTwoWayLayer
from vlsegkit.layers.upsampler import LearnableUpsampler

__all__ = [
    "LayerNorm2d",
    "LearnableUpsampler",
    "PVLAdapter",
    "PVLAttention",
    "PVLTwoWayLayer",
    "PixelTextHead",
    "ScaleBlock",
]
