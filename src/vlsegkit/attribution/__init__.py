"""Attribution: which image regions (or prompt tokens) a text prompt relies on.

- :class:`M2IBAttributor`: saliency maps from the multi-modal information bottleneck (M2IB,
  Wang et al. 2023), as MedCLIP-SAMv2 uses them to prompt SAM; batched, with a per-image mask and
  optimiser, on any CLIP-family towers.
- :class:`M2IBBottleneck`: the bottleneck itself, a :class:`~vlsegkit.encoders.TowerHook` run by
  :func:`~vlsegkit.encoders.run_towers`.
"""

from .m2ib import M2IBAttributor, M2IBBottleneck, TextAttribution, m2ib_capacity

__all__ = ["M2IBAttributor", "M2IBBottleneck", "TextAttribution", "m2ib_capacity"]
