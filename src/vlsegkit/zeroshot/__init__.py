"""Zero-shot text-prompted segmentation (MedCLIP-SAMv2, Koleilat et al. 2025).

- :class:`MedCLIPSAM`: CLIP towers + :class:`~vlsegkit.attribution.M2IBAttributor` saliency +
  :class:`SaliencyPrompter` post-processing + :class:`SAMRefiner` (transformers ``SamModel``).
- :class:`SaliencyPrompter`: saliency -> coarse mask -> box / point prompts, the paper's path
  (Otsu, component confidence) by default and the released one (2-means, largest components) as
  ``mode="released"``; :func:`otsu_threshold`, :func:`two_means_threshold`,
  :func:`component_statistics`, :func:`keep_largest_components`.
"""

from .pipeline import MedCLIPSAM, ZeroShotResult
from .postprocess import (
    POINT_PAD_LABEL,
    ComponentStatistics,
    SaliencyPrompter,
    SaliencyPrompts,
    component_statistics,
    keep_largest_components,
    otsu_threshold,
    two_means_threshold,
)
from .sam import PromptType, SAMImages, SAMRefiner

__all__ = [
    "POINT_PAD_LABEL",
    "ComponentStatistics",
    "MedCLIPSAM",
    "PromptType",
    "SAMImages",
    "SAMRefiner",
    "SaliencyPrompter",
    "SaliencyPrompts",
    "ZeroShotResult",
    "component_statistics",
    "keep_largest_components",
    "otsu_threshold",
    "two_means_threshold",
]
