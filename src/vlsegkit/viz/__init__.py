"""Pictures of predictions and of training: overlays, heat maps, sheets, curves, calibration.

Overlays, colour maps, panels, sheets and training curves need only numpy and Pillow (text is drawn
in Pillow's bundled default font: no font file). ``reliability_diagram`` draws with matplotlib, an
optional extra (``pip install "vlsegkit[viz]"``); ``save_reliability_diagram`` skips it with one
warning when matplotlib is missing, and the numbers behind it (``calibration_curve``) need numpy
only.

Images are accepted as PIL images, numpy arrays ``(H, W)`` / ``(H, W, 3)`` (uint8, or float in
``[0, 1]``) or tensors ``(3, H, W)`` / ``(H, W)`` (see ``vlsegkit.models.base.to_image_tensor``).
Overlays, heat maps and panels return ``(H, W, 3)`` uint8 arrays, sheets and curves RGB
``PIL.Image.Image``s; ``save_image`` writes either (atomically, format from the suffix). Normalised network inputs must be de-normalised first: float images outside ``[0, 1]``
are refused rather than silently clipped.

Everything is importable from ``vlsegkit.viz``; the submodules only group the code:
``vlsegkit.viz.images`` (conversion, overlays, colour maps, panels, files),
``vlsegkit.viz.sheets`` (overlay sheets across the score range, uncertainty sheets),
``vlsegkit.viz.curves`` (training curves from ``fit``'s epoch records),
``vlsegkit.viz.zeroshot`` (the stages of MedCLIP-SAMv2's zero-shot pipeline) and
``vlsegkit.viz.calibration`` (calibration statistics, reliability diagram).
"""

from .calibration import (
    Calibration,
    calibration_curve,
    reliability_diagram,
    save_reliability_diagram,
)
from .curves import CURVE_COLORS, plot_training_curves, read_epoch_records, training_curves_image
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
from .zeroshot import draw_prompts, zeroshot_panel, zeroshot_sheet

__all__ = [
    "COLORMAPS",
    "CURVE_COLORS",
    "FN_COLOR",
    "FP_COLOR",
    "TP_COLOR",
    "Calibration",
    "RankedExample",
    "apply_colormap",
    "calibration_curve",
    "dice_per_image",
    "draw_prompts",
    "heatmap_overlay",
    "overlay_mask",
    "overlay_prediction",
    "overlay_sheet",
    "panel",
    "plot_training_curves",
    "read_epoch_records",
    "reliability_diagram",
    "save_image",
    "save_overlay_sheet",
    "save_reliability_diagram",
    "select_examples",
    "to_rgb_uint8",
    "training_curves_image",
    "uncertainty_sheet",
    "zeroshot_panel",
    "zeroshot_sheet",
]
