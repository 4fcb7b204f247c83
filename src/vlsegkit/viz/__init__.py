"""Pictures of predictions: mask overlays, heat maps, panels, contact sheets, reliability diagrams.

Overlays, colour maps, panels and sheets need only numpy and Pillow (text is drawn in Pillow's
bundled default font: no font file). ``reliability_diagram`` draws with
matplotlib, an optional extra (``pip install "vlsegkit[viz]"``); the numbers behind it
(``calibration_curve``) need numpy only.

Images are accepted as PIL images, numpy arrays ``(H, W)`` / ``(H, W, 3)`` (uint8, or float in
``[0, 1]``) or tensors ``(3, H, W)`` / ``(H, W)`` (see ``vlsegkit.models.base.to_image_tensor``);
every function returns ``(H, W, 3)`` uint8 arrays that ``PIL.Image.fromarray`` or ``save_image``
write as PNG. Normalised network inputs must be de-normalised first: float images outside ``[0, 1]``
are refused rather than silently clipped.

Everything is importable from ``vlsegkit.viz``; the submodules only group the code:
``vlsegkit.viz.images`` (conversion, overlays, colour maps, panels, files),
``vlsegkit.viz.sheets`` (overlay sheets across the score range, uncertainty sheets) and
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
from .sheets import (
    RankedExample,
    dice_per_image,
    overlay_sheet,
    save_overlay_sheet,
    select_examples,
    uncertainty_sheet,
)

__all__ = [
    "COLORMAPS",
    "FN_COLOR",
    "FP_COLOR",
    "TP_COLOR",
    "Calibration",
    "RankedExample",
    "apply_colormap",
    "calibration_curve",
    "dice_per_image",
    "heatmap_overlay",
    "overlay_mask",
    "overlay_prediction",
    "overlay_sheet",
    "panel",
    "reliability_diagram",
    "save_image",
    "save_overlay_sheet",
    "select_examples",
    "to_rgb_uint8",
    "uncertainty_sheet",
]
