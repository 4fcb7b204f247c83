"""Adapter hook families: modules inserted between or inside the blocks of frozen towers.

- :class:`PVLAdapters`: MedCLIPSeg's probabilistic vision-language adapters (Koleilat et al. 2026),
  one :class:`~vlsegkit.layers.PVLAdapter` before each chosen block of both towers, in lockstep.
- :class:`BottleneckAdapters`: VLSM-Adapter's Houlsby-style bottleneck adapters (Dhakal et al.,
  MICCAI 2024), *shallow* (on what the decoder reads) or *dense* (inside every block).

Both are :class:`~vlsegkit.encoders.TowerHook` s: a model owns them (``hooks=[...]``) or a frozen
model is tuned with them (``BottleneckAdapters().attach(model)``).
"""

from .bottleneck import BottleneckAdapter, BottleneckAdapters
from .pvl import PVLAdapters
from .roi_tokens import ROIPseudoTokens, ROISlots

__all__ = [
    "BottleneckAdapter",
    "BottleneckAdapters",
    "PVLAdapters",
    "ROIPseudoTokens",
    "ROISlots",
]
