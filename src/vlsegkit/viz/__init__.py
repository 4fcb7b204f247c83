"""Pictures of predictions: mask overlays, heat maps, side-by-side panels, reliability diagrams.

Overlays, colour maps and panels need only numpy and Pillow. ``reliability_diagram`` draws with
matplotlib, an optional extra (``pip install "vlsegkit[viz]"``); the numbers behind it
(``calibration_curve``) need numpy only.

Images are accepted as PIL images, numpy arrays ``(H, W)`` / ``(H, W, 3)`` (uint8, or float in
``[0, 1]``) or tensors ``(3, H, W)`` / ``(H, W)`` (see ``vlsegkit.models.base.to_image_tensor``);
every function returns ``(H, W, 3)`` uint8 arrays that ``PIL.Image.fromarray`` or ``save_image``
write as PNG. Normalised network inputs must be de-normalised first: float images outside ``[0, 1]``
are refused rather than silently clipped.

Everything is importable from ``vlsegkit.viz``; the submodules only group the code:
``vlsegkit.viz.images`` (conversion, overlays, colour maps, panels, files) and
``vlsegkit.viz.calibration`` (calibration statistics, reliability diagram).
"""

from .calibration import Calibration, calibration_curve, reliability_diagram
from .images import (
    COLORMAPS,
    FN_COLOR,
    FP_COLOR,
    TP_COLOR,
    apply_colormap,
    heatmap_overlay,
    overlay_mask,
    overlay_prediction,
    panel,
    save_image,
    to_rgb_uint8,
)

__all__ = [
    "COLORMAPS",
    "FN_COLOR",
    "FP_COLOR",
    "TP_COLOR",
    "Calibration",
    "apply_colormap",
    "calibration_curve",
    "heatmap_overlay",
    "overlay_mask",
    "overlay_prediction",
    "panel",
    "reliability_diagram",
    "save_image",
    "to_rgb_uint8",
]
