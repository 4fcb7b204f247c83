"""Reusable layers: adapters, attention blocks and decoder heads."""

from vlsegkit.layers.pixel_text_head import PixelTextHead, ScaleBlock
from vlsegkit.layers.pvl import PVLAdapter, PVLAttention, PVLTwoWayLayer

__all__ = ["PVLAdapter", "PVLAttention", "PVLTwoWayLayer", "PixelTextHead", "ScaleBlock"]
